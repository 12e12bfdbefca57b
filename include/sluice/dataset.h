#pragma once

#include <sluice/export.h>
#include <sluice/options.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sluice {

namespace detail {
struct DatasetInternals;
}

/// Element type of a field. Values are part of the on-disk format (docs/format.md).
enum class DType : uint8_t {
  kUInt8 = 0,
  kInt8 = 1,
  kUInt16 = 2,
  kInt16 = 3,
  kUInt32 = 4,
  kInt32 = 5,
  kUInt64 = 6,
  kInt64 = 7,
  kFloat16 = 8,
  kBFloat16 = 9,
  kFloat32 = 10,
  kFloat64 = 11,
  kBool = 12,
};

SLUICE_EXPORT size_t dtype_size(DType dtype);
SLUICE_EXPORT std::string_view dtype_name(DType dtype);
/// Parses a name as printed by dtype_name ("uint8", "float32", ...); nullopt if unknown.
SLUICE_EXPORT std::optional<DType> dtype_from_name(std::string_view name);

/// One named field of every sample. A field is fixed-size when no dimension of `shape` is -1
/// (an empty shape is a scalar); otherwise its byte length varies per sample and must be a
/// multiple of the element size. Raw bytes are {kUInt8, {-1}}.
struct SLUICE_EXPORT FieldSpec {
  std::string name;
  DType dtype = DType::kUInt8;
  std::vector<int64_t> shape = {-1};

  bool fixed_size() const;
  /// Bytes per sample for a fixed-size field; 0 for a variable-size one.
  uint64_t fixed_bytes() const;
  bool operator==(const FieldSpec&) const = default;
};

/// Where one sample's record lies: shard `shard`, bytes [offset, offset + size).
struct SampleExtent {
  uint32_t shard = 0;
  uint64_t offset = 0;
  uint32_t size = 0;
  uint32_t checksum = 0;  // low 32 bits of XXH3-64 of the record, seeded with the sample index
};

struct ShardInfo {
  std::filesystem::path path;  // absolute path of the shard file
  uint64_t first_sample = 0;   // global index of the shard's first sample
  uint64_t num_samples = 0;
  uint64_t file_bytes = 0;
  bool local = true;  // false: the file is not on this node (OpenOptions::allow_absent_shards)
};

struct DatasetOpenOptions {
  // Shard files missing from the directory are left to remote peers instead of being an error;
  // their samples have no extent here. The manifest must be present.
  bool allow_absent_shards = false;
};

struct WriterOptions {
  std::vector<FieldSpec> fields;        // the schema; names unique, at least one field
  uint64_t shard_bytes = 256ull << 20;  // start a new shard once its data reaches this size
  uint64_t shard_samples = 1ull << 20;  // ... or holds this many samples (bounds writer memory)
  uint32_t alignment = 4096;            // power of two >= 512: the direct-I/O block size
  std::vector<std::string> classes;     // optional label names, stored in the manifest
  bool overwrite = false;               // replace an existing dataset at the destination
};

/// Writes a packed dataset. Everything goes to a hidden sibling directory that is renamed to
/// the destination by finish(), so a pack that fails or is killed never leaves a directory
/// that looks complete. Not thread-safe. Throws sluice::Error.
class SLUICE_EXPORT DatasetWriter {
 public:
  static std::unique_ptr<DatasetWriter> create(const std::filesystem::path& dir,
                                               const WriterOptions& options);
  virtual ~DatasetWriter();

  /// Appends one sample: one byte span per field, in schema order. Returns its global index.
  virtual uint64_t add(std::span<const std::span<const std::byte>> fields) = 0;
  /// Flushes, fsyncs and publishes the dataset. Without it the destination never appears.
  virtual void finish() = 0;
  virtual uint64_t num_samples() const = 0;
  virtual uint64_t bytes_written() const = 0;
};

/// A sample's fields as views into its record bytes (valid while the record buffer is).
struct SampleFields {
  std::vector<std::span<const std::byte>> fields;  // in schema order
};

/// An open packed dataset. Opening reads the manifest and each shard's header and maps each
/// shard's sample index: O(shards), independent of the sample count. Immutable after open;
/// every const method is thread-safe. Throws sluice::Error (kNotFound, kCorruption, kIo).
class SLUICE_EXPORT Dataset {
 public:
  static std::shared_ptr<Dataset> open(const std::filesystem::path& dir,
                                       const DatasetOpenOptions& options = {});
  /// Opens what `source.format` names (auto detects; the one place formats are told apart, used
  /// by the Loader, `sluice pack/inspect/verify` and Python's sluice.Dataset): packed shards as
  /// open() does, or a source read in place: `npy` (a NumPy .npy array of shape (N, ...): N samples
  /// of one field "data" with its dtype and shape), `tokens` (a flat uint16/uint32 token file as
  /// windows of seq_len tokens every stride tokens: one field "tokens" [seq_len]) or `files` (a
  /// tree of class directories, one sample per file: "data" bytes and an int64 "label", the index
  /// of the file's directory name among the sorted names; auto: a directory without a manifest) or
  /// `tar` (WebDataset shards: a .tar file or a directory of them; members grouped into samples by
  /// the key before the first dot, fields named by the extension, `cls`/`label` as int64; the
  /// header scan is cached beside the tar or in ~/.cache/sluice). Throws kConfig for missing
  /// parameters, kCorruption naming the file for a bad header or a truncated file, kUnsupported for
  /// formats this build does not read in place.
  static std::shared_ptr<Dataset> open_source(const DatasetOptions& source,
                                              const DatasetOpenOptions& options = {});
  ~Dataset();
  Dataset(const Dataset&) = delete;
  Dataset& operator=(const Dataset&) = delete;

  const std::filesystem::path& path() const;
  uint64_t num_samples() const;
  uint64_t total_bytes() const;  // sum of record sizes
  uint32_t alignment() const;
  uint32_t format_version() const;  // 0 for sources read in place
  /// True for packed shards (aligned, checksummed records); false for sources read in place
  /// (npy, tokens, files, tar), which have neither.
  bool packed() const;
  /// What open_source found (never kAuto): kShards for packed shards, else the in-place reader.
  DatasetFormat format() const;
  const std::vector<FieldSpec>& fields() const;
  const std::vector<std::string>& classes() const;
  const std::vector<ShardInfo>& shards() const;
  /// Sample counts per shard, in shard order (what the sampler's `shard` mode groups by).
  std::vector<uint64_t> shard_sizes() const;

  /// Where sample `index` lies. Throws kInvalidArgument when index >= num_samples(),
  /// kNotFound when its shard is not on this node, and kCorruption when its index entry points
  /// outside the shard's data region.
  SampleExtent extent(uint64_t index) const;
  /// Reads the record of sample `index` with pread and checks its checksum.
  std::vector<std::byte> read_record(uint64_t index) const;
  /// The same into `dest` (at least extent(index).size bytes); returns the record's size.
  size_t read_record_into(uint64_t index, std::span<std::byte> dest) const;
  /// Sample `index`'s key: in WebDataset tar shards its `__key__` (the member names up to the
  /// first '.'), in a files tree its path relative to the root; "" for other formats.
  std::string sample_key(uint64_t index) const;
  /// Splits a record into its fields; throws kCorruption when the lengths do not add up.
  SampleFields parse_record(uint64_t index, std::span<const std::byte> record) const;

  /// Checks every header, index and sample checksum. `progress(done, total)` is called now and
  /// then with bytes checked. Returns one line per problem (empty when the dataset is sound),
  /// each naming the shard file and, where it applies, the sample index. A source read in place
  /// has no checksums: every sample is read and split into its fields (a file that shrank, a
  /// tar member cut short or an unreadable file is a problem).
  std::vector<std::string> verify(
      const std::function<void(uint64_t, uint64_t)>& progress = {}) const;

 private:
  // What the loader, the shard server and the read planner use, and users need not, is
  // Impl's, reached through src/index/internals.h.
  friend struct detail::DatasetInternals;
  struct Impl;
  explicit Dataset(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace sluice
