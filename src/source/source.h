#pragma once

// Where a dataset's bytes come from when they are not on this node: an S3 bucket (or any S3
// compatible) or a directory on a slow shared file system. A Source lists its objects once,
// when opened, and reads byte ranges of them straight into caller memory.

#include "common/result.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sluice::source {

struct SourceOptions {
  // Empty: read from the environment as AWS tools do: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL
  // (default https://s3.REGION.amazonaws.com), AWS_REGION or AWS_DEFAULT_REGION (default
  // us-east-1), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (optional).
  // Without a key id and secret, requests go unsigned (public buckets).
  std::string endpoint, region, access_key_id, secret_access_key, session_token;
  unsigned max_in_flight = 32;  // transfers at once per read() call
  // Extra attempts per range on 5xx, 429, SlowDown, a reset or timeout; exponential backoff
  // with jitter (from 50 ms, capped at 2 s).
  unsigned retries = 5;
  // Per attempt (connect + transfer); also a low-speed limit so a stalled body fails.
  uint32_t timeout_ms = 30000;
};

/// One object under the root; `key` is relative to it ("a/b.shard").
struct Object {
  std::string key;
  uint64_t size = 0;
  // What changes when the object is rewritten: the S3 ETag (reads send it as If-Match), or a
  // file's modification time and inode. Empty when the listing gave none.
  std::string version;
};

/// `length` bytes of object `object` (an index into objects()) from `offset`, into `dest`.
struct Range {
  uint32_t object = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::byte* dest = nullptr;
};

class Source {
 public:
  virtual ~Source() = default;
  /// "s3://bucket/prefix" or the directory path: what errors name.
  virtual const std::string& url() const = 0;
  /// Every object under the root, recursively, sorted by key; listed once when opened.
  virtual const std::vector<Object>& objects() const = 0;
  /// Reads every range into its dest, up to max_in_flight at once. Thread-safe (several threads
  /// may call it at once). Throws sluice::Error naming the object (s3://bucket/key), range and
  /// cause: kNotFound for 404/NoSuchKey/NoSuchBucket, kIo with sys_errno EACCES for 403, kIo
  /// after the retries are spent (how many attempts, the last cause), kCorruption when the body
  /// is shorter or longer than asked or the object's version is no longer the listed one (S3:
  /// 412 to If-Match), kInvalidArgument for a range past the listed size. When it
  /// throws, no transfer is left writing into any dest.
  virtual void read(std::span<const Range> ranges) = 0;
  /// Whole-object read (small metadata files such as a manifest); kCorruption when the object's
  /// size is no longer the listed one.
  virtual std::vector<std::byte> get(uint32_t object) = 0;
  /// Counters since open: bytes received into dests, requests sent (including retries), retries.
  virtual uint64_t bytes_read() const = 0;
  virtual uint64_t requests() const = 0;
  virtual uint64_t retries() const = 0;
  /// Index of `key` in objects(), or nullopt.
  std::optional<uint32_t> find(std::string_view key) const;
  /// Object `object` as a user finds it: "s3://bucket/prefix/key", or the file's path.
  virtual std::string name(uint32_t object) const = 0;

 protected:
  /// Throws kInvalidArgument for a range of no listed object or past its listed size.
  void check(const Range& r) const;
};

/// True for "s3://..." paths.
bool is_remote(std::string_view path);

/// Opens a store of objects (not a Dataset: Dataset::open_source reads a dataset in place).
/// "s3://bucket[/prefix]" -> S3 (lists the prefix with ListObjectsV2, paginated, at open; an
/// empty listing is kNotFound naming the URL; 403/404 as in read()); anything else -> a local
/// directory read with pread (a "slow shared file system" source; listing recursive, regular
/// files only; an empty directory is kNotFound too).
std::unique_ptr<Source> open_store(const std::string& url, const SourceOptions& options = {});

/// One ListObjectsV2 response page.
struct ListPage {
  std::vector<Object> objects;  // full keys, as listed (URL-decoded for EncodingType url); ETags
  bool truncated = false;
  std::string next_token;
};

/// Parses one ListObjectsV2 response page (XML): Key, Size and ETag of each <Contents>,
/// IsTruncated, NextContinuationToken. Exposed for tests and the fuzz target; a failure says what
/// is wrong.
Result<ListPage> parse_list_page(std::string_view xml);

}  // namespace sluice::source
