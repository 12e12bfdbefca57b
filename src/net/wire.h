#pragma once

// The shard server's messages, carried as UCX active messages. A client asks for samples by
// global index (never by file offset); the server answers with their records, or with an error.
//
//   request  AM kRequestAm: header RequestHeader, data: count x uint64 sample indices; sent on
//                           a connection authenticated by the handshake (net/handshake.h)
//   reply    AM kReplyAm:   header ReplyHeader,   data: on success the records in request order
//                           (each where its RecordInfo says: under direct I/O a record sits
//                           inside its block-aligned cover), padding to 8 bytes, then count x
//                           RecordInfo; on error the message text
//   checkpoint AM kRequestAm: header CheckpointHeader (its own magic), data: a checkpoint's
//                           name (CHECKPOINT or CHECKPOINT/FILE), then the op's payload: a
//                           peer keeps copies of checkpoint files (`sluice serve
//                           --checkpoint-dir`); answered with a kReplyAm (kRead: the bytes and
//                           their checksum; kList: the files)
//   record   AM kRecordAm:  header RecordHeader,  data: one record's bytes. A record at least
//                           RequestHeader::separate_bytes long travels in a message of its own
//                           (its RecordInfo says kSeparate), so that both ends move it from and
//                           into its final place: the server's page cache or read buffer, the
//                           client's batch.
//
// All fields are little-endian (the only byte order sluice runs on). Every field of a message
// from a peer is checked before use: parse_* return an error text instead of trusting it.

#include "common/result.h"
#include "net/crypto.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sluice::net {

inline constexpr uint16_t kRequestAm = 0x51;
inline constexpr uint16_t kReplyAm = 0x52;
inline constexpr uint16_t kRecordAm = 0x53;
inline constexpr uint32_t kRequestMagic = 0x51524c53;  // "SLRQ"
inline constexpr uint32_t kReplyMagic = 0x50524c53;    // "SLRP"
inline constexpr uint32_t kRecordMagic = 0x43524c53;   // "SLRC"
// 2: RecordInfo carries the record's offset. 3: large records in messages of their own.
// 4: requests name their connection and carry a MAC under its session key; kBusy.
inline constexpr uint16_t kWireVersion = 4;
inline constexpr uint64_t kSeparate = ~uint64_t{0};  // RecordInfo::offset of such a record

using RequestMac = std::array<uint8_t, 16>;

/// Bytes at the start of a request that name its connection and authenticate the rest; a
/// server reads nothing else of a request before the MAC checks out.
inline constexpr size_t kRequestAuthBytes = 24;

struct RequestHeader {
  uint64_t conn = 0;  // the connection's id, from the handshake (net/handshake.h)
  RequestMac mac{};   // request_mac() of everything after this field and the data
  uint32_t magic = kRequestMagic;
  uint16_t version = kWireVersion;
  uint16_t reserved = 0;
  uint64_t request_id = 0;
  uint32_t count = 0;           // sample indices in the data
  uint32_t separate_bytes = 0;  // records at least this long come as kRecordAm (0: none do)
};
static_assert(sizeof(RequestHeader) == 48);

/// The first 16 bytes of HMAC-SHA256 under the session key over a request's header past
/// kRequestAuthBytes, then its data.
RequestMac request_mac(const Mac& session, std::span<const std::byte> header,
                       std::span<const std::byte> data);

enum class ReplyStatus : uint16_t {
  kOk = 0,
  kBadRequest = 1,    // malformed: wrong size, magic, version, count
  kUnauthorized = 2,  // token mismatch
  kOutOfRange = 3,    // a sample index >= the dataset's sample count
  kReadError = 4,     // the server could not read or verify a sample
  kTooLarge = 5,      // the reply would exceed the server's limit
  kBusy = 6,          // too much queued (this connection's or the server's): send it again later
  kNotFound = 7,      // no such checkpoint or file (checkpoint ops)
};

struct ReplyHeader {
  uint32_t magic = kReplyMagic;
  uint16_t version = kWireVersion;
  ReplyStatus status = ReplyStatus::kOk;
  uint64_t request_id = 0;
  uint32_t count = 0;       // records in the table (0 on error)
  uint32_t separate = 0;    // of them, sent as kRecordAm
  uint64_t data_bytes = 0;  // bytes of the AM data
};
static_assert(sizeof(ReplyHeader) == 32);

/// Where one record lies in a reply's data, and its checksum (as in the shard index: low 32 bits
/// of XXH3-64 of the record seeded with the sample index), so that the client checks the bytes
/// end to end.
struct RecordInfo {
  uint64_t offset = 0;  // from the start of the reply's data
  uint32_t size = 0;
  uint32_t checksum = 0;
};
static_assert(sizeof(RecordInfo) == 16);

/// The header of a record sent in a message of its own; the message's data is the record.
struct RecordHeader {
  uint32_t magic = kRecordMagic;
  uint16_t version = kWireVersion;
  uint16_t reserved = 0;
  uint64_t request_id = 0;
  uint32_t record = 0;  // its position in the request
  uint32_t size = 0;    // bytes of data
};
static_assert(sizeof(RecordHeader) == 24);

// --- checkpoint copies ---------------------------------------------------------------------

inline constexpr uint32_t kCheckpointMagic = 0x4b434c53;   // "SLCK"
inline constexpr uint32_t kMaxCheckpointChunk = 8u << 20;  // payload of a kWrite, bytes of a kRead
inline constexpr size_t kMaxCheckpointName = 255;          // a checkpoint's or a file's name

enum class CheckpointOp : uint16_t {
  kWrite = 1,    // CHECKPOINT/FILE: the payload at `offset` of the file's incoming copy
  kCommit = 2,   // CHECKPOINT/FILE: the incoming copy is whole at `length` bytes: make it durable
  kPublish = 3,  // CHECKPOINT: payload = its files, one per line; all committed: make it visible
  kList = 4,     // CHECKPOINT: reply = "SIZE FILE" lines of the visible copy
  kRead = 5,     // CHECKPOINT/FILE: reply = `length` bytes at `offset`, then their checksum (8)
};

struct CheckpointHeader {
  uint64_t conn = 0;  // as RequestHeader: the connection, and the MAC of everything after it
  RequestMac mac{};
  uint32_t magic = kCheckpointMagic;
  uint16_t version = kWireVersion;
  CheckpointOp op = CheckpointOp::kWrite;
  uint64_t request_id = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t checksum = 0;    // kWrite: checkpoint_chunk_checksum; kCommit: the FileChecksum
  uint32_t name_bytes = 0;  // the data starts with the name
  uint32_t reserved = 0;
};
static_assert(sizeof(CheckpointHeader) == 72);
static_assert(offsetof(CheckpointHeader, request_id) == offsetof(RequestHeader, request_id));
static_assert(offsetof(CheckpointHeader, magic) == offsetof(RequestHeader, magic));

/// A checked checkpoint op: names valid (no path tricks: [A-Za-z0-9._-], no "." or "..", a
/// checkpoint's not starting with '.'), sizes within limits. Views into the message.
struct CheckpointRequest {
  CheckpointHeader header;
  std::string checkpoint;
  std::string file;  // empty for kPublish and kList
  std::span<const std::byte> payload;
};
Result<CheckpointRequest> parse_checkpoint_request(std::span<const std::byte> header,
                                                   std::span<const std::byte> data);
/// Whether `name` may name a checkpoint (or, with `file`, a file in one) on a peer's disk.
bool valid_checkpoint_name(std::string_view name, bool file);
/// XXH3-64 of a chunk of a checkpoint file, seeded with its offset (a chunk sent to the wrong
/// place fails too).
uint64_t checkpoint_chunk_checksum(std::span<const std::byte> chunk, uint64_t offset);

/// XXH3-64 of a whole checkpoint file, fed in order: the writer's kCommit carries it, the peer
/// checks what arrived against it and keeps it, kList reports it, a restore checks its bytes.
class FileChecksum {
 public:
  FileChecksum();
  ~FileChecksum();
  FileChecksum(const FileChecksum&) = delete;
  FileChecksum& operator=(const FileChecksum&) = delete;
  void update(std::span<const std::byte> bytes);
  uint64_t digest() const;

 private:
  void* state_;  // XXH3_state_t
};

/// Checks a request's header and data length; returns the header, or sets `error`.
Result<RequestHeader> parse_request(std::span<const std::byte> header, size_t data_bytes,
                                    uint32_t max_count);
/// Checks a reply's header; returns it, or sets `error`.
Result<ReplyHeader> parse_reply(std::span<const std::byte> header);
/// Checks the records table at the end of a successful reply's data against its header: the
/// records lie in order, without overlap, before the table, except the header's `separate`
/// ones (offset kSeparate). Returns the table, or sets `error`.
Result<std::vector<RecordInfo>> parse_records(const ReplyHeader& reply,
                                              std::span<const std::byte> data);

/// Checks a kRecordAm header and its data length; returns it, or sets `error`.
Result<RecordHeader> parse_record_header(std::span<const std::byte> header, size_t data_bytes);

std::string to_string(ReplyStatus status);

}  // namespace sluice::net
