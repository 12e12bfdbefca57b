#pragma once

// What a Dataset holds (Dataset::Impl), shared by its two halves and by nothing outside index/:
// dataset.cc opens packed shards and answers for every format (extent, read_record, verify);
// in_place.cc opens the sources read in place (npy, tokens, a files tree, tar shards) and fills
// in the same Impl, so that the readers never ask which opener made it.

#include <sluice/dataset.h>

#include "common/file.h"
#include "format/layout.h"
#include "index/tar_index.h"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace sluice {
namespace index {

// One shard's open file and memory-mapped index (packed shards); a source read in place keeps
// only the descriptor (its file, its root directory, or its tar).
struct Shard {
  detail::UniqueFd fd;
  format::ShardHeader header{};
  const format::IndexEntry* index = nullptr;
  void* map = nullptr;
  size_t map_bytes = 0;

  Shard() = default;
  Shard(Shard&& o) noexcept
      : fd(std::move(o.fd)), header(o.header), index(o.index), map(o.map), map_bytes(o.map_bytes) {
    o.map = nullptr;
    o.index = nullptr;
  }
  Shard& operator=(Shard&&) = delete;
  ~Shard();  // unmaps the index
};

}  // namespace index

struct Dataset::Impl {
  using Shard = index::Shard;

  std::filesystem::path dir;
  DatasetFormat format = DatasetFormat::kShards;
  format::Manifest manifest;
  std::vector<ShardInfo> infos;
  std::vector<Shard> shards;
  std::vector<uint64_t> first_samples;  // per shard, for the binary search in extent()
  format::RecordLayout layout{{}};
  // Sources read in place (npy, tokens): one file, sample i at base + i * stride, item bytes
  // long; no index, no checksums.
  struct Array {
    uint64_t base = 0, stride = 0, item = 0;
  };
  std::optional<Array> array;
  // files: a tree read in place. Compact per-sample metadata: relative paths back to back.
  struct Files {
    std::string names;
    std::vector<uint64_t> name_at;  // N + 1 offsets into names
    std::vector<uint32_t> sizes;
    std::vector<int64_t> labels;
  };
  std::optional<Files> files;
  // tar: WebDataset shards read in place, one TarIndex per tar (= shard).
  std::vector<index::TarIndex> tars;

  // What every source read in place has instead of a manifest: its schema and sizes, version 0,
  // and the O_DIRECT block as alignment (reads cover whole blocks).
  void describe_in_place(DatasetFormat in_place, std::vector<FieldSpec> fields, uint64_t samples,
                         uint64_t bytes) {
    format = in_place;
    manifest.fields = std::move(fields);
    manifest.num_samples = samples;
    manifest.total_bytes = bytes;
    manifest.alignment = 4096;
    manifest.version = 0;
    layout = format::RecordLayout(manifest.fields);
  }
  // A single-file source (npy, tokens, a files tree's root directory) as the one shard.
  void add_single_shard(Shard s, uint64_t samples, uint64_t file_bytes) {
    infos.push_back({dir, 0, samples, file_bytes, true});
    first_samples.push_back(0);
    shards.push_back(std::move(s));
  }

  // Packed shards: opens shard `id` of the manifest, checks its header against the manifest
  // and the file, and maps its index (dataset.cc). Absent and `allow_absent`: not local.
  void open_shard(uint32_t id, bool allow_absent);

  // What sluice's own layers use and users do not (src/index/internals.h; dataset.cc).
  // File descriptor of shard `shard`, opened read-only; owned here (-1 when absent).
  int shard_fd(uint32_t shard) const;
  // The shard that holds sample `index` (no I/O, also for absent shards).
  uint32_t shard_of(uint64_t index) const;
  // parse_record into `fields` (reused storage); "" or why the record does not split.
  std::string split_record(uint64_t index, std::span<const std::byte> record,
                           std::vector<std::span<const std::byte>>& fields) const;
  // `files` datasets (a tree read in place): sample `index`'s file, relative to dir; empty
  // for other datasets. Its record is the file's bytes; its label comes from its directory.
  std::string_view sample_file(uint64_t index) const;
  // `files` datasets: opens sample `index`'s file read-only (with O_DIRECT when `direct`);
  // the caller owns the descriptor. Throws naming the file and the sample.
  int open_sample(uint64_t index, bool direct) const;
};

}  // namespace sluice
