#pragma once

// The on-disk byte layout of a packed dataset (docs/format.md is the prose version).
// All integers are little-endian; sluice builds only on little-endian hosts.

#include "common/result.h"

#include <sluice/dataset.h>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sluice::format {

static_assert(std::endian::native == std::endian::little, "sluice's format is little-endian");

inline constexpr uint32_t kVersion = 1;
inline constexpr char kManifestMagic[8] = {'S', 'L', 'U', 'I', 'C', 'E', 'M', 'F'};
inline constexpr char kShardMagic[8] = {'S', 'L', 'U', 'I', 'C', 'E', 'S', 'H'};
inline constexpr std::string_view kManifestName = "manifest.sluice";
inline constexpr std::string_view kShardExtension = ".sluice";  // shard-NNNNN.sluice
inline constexpr uint32_t kShardHeaderBytes = 4096;  // header block; data starts after it
inline constexpr uint32_t kPageBytes = 4096;         // index regions start page-aligned (mmap)
inline constexpr uint32_t kMinAlignment = 512;
inline constexpr uint32_t kMaxAlignment = 1u << 20;

/// Fixed part of the manifest file; followed by `body_bytes` of body (see encode_manifest).
struct ManifestHeader {
  char magic[8];
  uint32_t version;
  uint32_t alignment;
  uint64_t dataset_id;
  uint64_t num_samples;
  uint64_t total_bytes;
  uint32_t num_shards;
  uint32_t num_fields;
  uint32_t num_classes;
  uint32_t reserved;
  uint64_t body_bytes;
  uint64_t body_checksum;    // XXH3-64 of the body
  uint64_t header_checksum;  // XXH3-64 of the bytes of this struct before this field
};
static_assert(sizeof(ManifestHeader) == 80);

/// First bytes of every shard file (the rest of the kShardHeaderBytes block is zero).
struct ShardHeader {
  char magic[8];
  uint32_t version;
  uint32_t header_bytes;
  uint64_t dataset_id;
  uint32_t shard_id;
  uint32_t alignment;
  uint64_t first_sample;
  uint64_t num_samples;
  uint64_t data_offset;      // first record byte (== header_bytes)
  uint64_t data_end;         // one past the last record byte
  uint64_t index_offset;     // page-aligned; num_samples IndexEntry follow
  uint64_t file_bytes;       // index_offset + num_samples * sizeof(IndexEntry)
  uint64_t index_checksum;   // XXH3-64 of the index region
  uint64_t header_checksum;  // XXH3-64 of the bytes of this struct before this field
};
static_assert(sizeof(ShardHeader) == 96);

/// One sample's entry in its shard's index: 16 bytes, so the index of 10^8 samples is 1.6 GB
/// of memory-mapped file and costs nothing until touched.
struct IndexEntry {
  uint64_t offset;    // record start within the shard file
  uint32_t size;      // record bytes
  uint32_t checksum;  // record_checksum(record, global index)
};
static_assert(sizeof(IndexEntry) == 16);

struct ShardEntry {
  std::string name;  // file name inside the dataset directory
  uint64_t num_samples = 0;
  uint64_t file_bytes = 0;
};

struct Manifest {
  uint32_t version = kVersion;
  uint32_t alignment = 4096;
  uint64_t dataset_id = 0;
  uint64_t num_samples = 0;
  uint64_t total_bytes = 0;
  std::vector<FieldSpec> fields;
  std::vector<std::string> classes;
  std::vector<ShardEntry> shards;
};

uint64_t checksum64(const void* data, size_t size, uint64_t seed = 0);
/// The per-sample checksum: low 32 bits of XXH3-64 seeded with the sample's global index, so a
/// record that landed under another index fails too.
uint32_t record_checksum(const void* data, size_t size, uint64_t index);
/// Ok when `record` matches `stored`, else the one wording of a mismatch every reader uses:
/// "sample I: checksum mismatch (stored S, computed C)" (callers put the file or peer first).
Status check_record(std::span<const std::byte> record, uint64_t index, uint32_t stored);

std::string shard_name(uint32_t shard_id);

std::vector<std::byte> encode_manifest(const Manifest& manifest);
/// Parses and validates a manifest; throws Error(kCorruption) with `source` and the reason.
Manifest decode_manifest(std::span<const std::byte> bytes, const std::string& source);

void seal_shard_header(ShardHeader& header);
/// Checks magic, version, checksum and internal consistency; throws kCorruption naming `source`.
void validate_shard_header(const ShardHeader& header, const std::string& source);

/// Where each field of a record lies. Fixed-size fields take their schema size; the lengths of
/// all variable-size fields but the last are stored as u32 in a trailer at the record's end;
/// the last takes what remains.
class RecordLayout {
 public:
  explicit RecordLayout(const std::vector<FieldSpec>& fields);
  size_t num_fields() const { return fields_.size(); }
  size_t num_variable() const { return num_variable_; }
  uint64_t fixed_bytes() const { return fixed_bytes_; }
  uint64_t trailer_bytes() const { return num_variable_ > 1 ? 4 * (num_variable_ - 1) : 0; }
  /// Record size for these field lengths (which must fit the schema; see check_lengths).
  uint64_t record_bytes(std::span<const uint64_t> lengths) const;
  /// Ok when `lengths` fit the schema, else the reason naming the field.
  Status check_lengths(std::span<const uint64_t> lengths) const;
  /// Splits a record; ok, else the reason.
  Status split(std::span<const std::byte> record,
               std::vector<std::span<const std::byte>>& out) const;

 private:
  std::vector<FieldSpec> fields_;
  size_t num_variable_ = 0;
  uint64_t fixed_bytes_ = 0;
};

/// Where the next record goes: `offset`, or the next `alignment` boundary when the record would
/// otherwise cover more `alignment`-sized blocks than ceil(size / alignment). So a record's
/// aligned cover is as small as it can be, and reading it never reads more of a neighbour than
/// the padding of its first and last blocks.
uint64_t place_record(uint64_t offset, uint64_t size, uint32_t alignment);

inline uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

}  // namespace sluice::format
