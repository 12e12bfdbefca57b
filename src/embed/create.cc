// EmbeddingTable::create: shard files and a manifest written into a staging directory beside
// the table, fsynced, then renamed into place.

#include <sluice/embedding.h>
#include <sluice/error.h>

#include "common/errors.h"
#include "common/file.h"
#include "common/partial_dir.h"
#include "embed/layout.h"
#include "embed/values.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace sluice {

namespace fs = std::filesystem;
using detail::fail;

std::string_view to_string(EmbeddingDtype dtype) {
  switch (dtype) {
    case EmbeddingDtype::kFloat32:
      return "float32";
    case EmbeddingDtype::kFloat16:
      return "float16";
    case EmbeddingDtype::kBFloat16:
      return "bfloat16";
  }
  return "?";
}

EmbeddingDtype embedding_dtype(std::string_view name) {
  if (name == "float32") return EmbeddingDtype::kFloat32;
  if (name == "float16") return EmbeddingDtype::kFloat16;
  if (name == "bfloat16") return EmbeddingDtype::kBFloat16;
  fail(ErrorCode::kInvalidArgument, "embedding dtype \"{}\": expected float32, float16 or bfloat16",
       name);
}

size_t element_bytes(EmbeddingDtype dtype) { return dtype == EmbeddingDtype::kFloat32 ? 4 : 2; }

namespace {

constexpr uint64_t kMaxShards = 1 << 20;

// Writes one shard: its rows unit by unit, from `data` or the init, in 4 MiB pieces.
void write_shard(const fs::path& file, const embed::Layout& l, uint64_t shard,
                 const EmbeddingSpec& spec, const embed::Init& init, const std::byte* data) {
  auto fd = detail::open_file(file, O_WRONLY | O_CREAT | O_EXCL);
  const uint64_t bytes = l.shard_bytes(shard);
  if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0)
    detail::fail_errno(errno, fmt::format("size {} to {} bytes", file.string(), bytes));
  if (!data && init.kind == embed::Init::kZeros) {  // a sparse file reads as zeros
    detail::fsync_or_throw(fd.get(), file.string());
    return;
  }
  const uint64_t units_per_piece = std::max<uint64_t>(1, (4 << 20) / l.unit_bytes);
  std::vector<std::byte> piece(units_per_piece * l.unit_bytes);
  std::vector<std::byte> rows(l.rows_per_unit * l.row_bytes);
  const uint64_t first_row = shard * l.rows_per_shard, shard_rows = l.rows_in_shard(shard);
  for (uint64_t unit = 0; unit < l.units_in_shard(shard); unit += units_per_piece) {
    const uint64_t units = std::min(units_per_piece, l.units_in_shard(shard) - unit);
    std::memset(piece.data(), 0, units * l.unit_bytes);
    for (uint64_t u = 0; u < units; ++u) {
      const uint64_t r0 = (unit + u) * l.rows_per_unit;
      const uint64_t n = std::min(l.rows_per_unit, shard_rows - r0);
      std::byte* dest = piece.data() + u * l.unit_bytes;
      if (data)
        std::memcpy(dest, data + (first_row + r0) * l.row_bytes, n * l.row_bytes);
      else
        embed::fill_rows(init, spec.seed, l.dtype, l.dim, first_row + r0, n, dest);
    }
    detail::write_full(fd.get(), std::span(piece.data(), units * l.unit_bytes), file.string(),
                       static_cast<int64_t>(unit * l.unit_bytes));
  }
  detail::fsync_or_throw(fd.get(), file.string());
}

}  // namespace

void EmbeddingTable::create(const fs::path& path, const EmbeddingSpec& spec,
                            const std::byte* data) {
  if (path.filename().empty())
    fail(ErrorCode::kInvalidArgument, "embedding table: {}: names no directory", path.string());
  if (spec.rows == 0 || spec.dim == 0)
    fail(ErrorCode::kInvalidArgument, "embedding table {}: rows and dim must be > 0 (got {} x {})",
         path.string(), spec.rows, spec.dim);
  if (spec.rows > (uint64_t{1} << 62))
    fail(ErrorCode::kInvalidArgument, "embedding table {}: {} rows is more than 2^62",
         path.string(), spec.rows);
  const embed::Init init = data ? embed::Init{} : embed::parse_init(spec.init);
  std::error_code ec;
  if (fs::exists(path, ec))
    fail(ErrorCode::kInvalidArgument, "embedding table {}: already exists", path.string());
  const uint64_t row_bytes = uint64_t{spec.dim} * element_bytes(spec.dtype);
  const uint64_t shards =
      spec.rows / std::max<uint64_t>(1, spec.shard_bytes / std::max<uint64_t>(row_bytes, 1)) + 1;
  if (shards > kMaxShards)
    fail(ErrorCode::kInvalidArgument,
         "embedding table {}: {} rows of {} bytes need about {} shard files of {} bytes (at most "
         "{}): raise shard_bytes",
         path.string(), spec.rows, row_bytes, shards, spec.shard_bytes, kMaxShards);
  const embed::Layout l = embed::Layout::make(spec.rows, spec.dim, spec.dtype, spec.shard_bytes);
  const fs::path parent = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  // What creates killed midway left beside it (a table's worth of shards, perhaps): gone first.
  detail::remove_partial_dirs(path, "embedding table " + path.string());
  detail::PartialDir staging_dir = detail::make_partial_dir(path);  // locked until renamed
  const fs::path& staging = staging_dir.path();
  try {
    for (uint64_t s = 0; s < l.shards(); ++s)
      write_shard(staging / l.shard_files[s], l, s, spec, init, data);
    EmbeddingSpec recorded = spec;
    if (data) recorded.init = "array";
    const std::string text = embed::manifest_text(l, recorded);
    {
      auto fd = detail::open_file(staging / embed::kManifest, O_WRONLY | O_CREAT | O_EXCL);
      detail::write_full(fd.get(), std::as_bytes(std::span(text)),
                         (staging / embed::kManifest).string());
      detail::fsync_or_throw(fd.get(), (staging / embed::kManifest).string());
    }
    detail::fsync_dir(staging);
    // rename(2) over an existing empty directory would succeed: RENAME_NOREPLACE refuses.
    if (::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, path.c_str(), RENAME_NOREPLACE) != 0) {
      if (errno == EEXIST)
        fail(ErrorCode::kInvalidArgument, "embedding table {}: already exists", path.string());
      detail::fail_errno(errno, "rename " + staging.string() + " to " + path.string());
    }
    detail::fsync_dir(parent);
  } catch (...) {
    fs::remove_all(staging, ec);
    throw;
  }
}

}  // namespace sluice
