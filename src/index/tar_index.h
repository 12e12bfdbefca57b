#pragma once

// WebDataset tar shards read in place: one scan of the tar headers gives every sample's span
// (its members are consecutive in the tar) and each field's place in that span. The scan is
// cached beside the tar (TAR.sluice-index), or under $XDG_CACHE_HOME/sluice (~/.cache/sluice)
// when the tar's directory is read-only; the cache names the tar's size and mtime, so a
// changed tar is scanned again.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace sluice::index {

struct TarIndex {
  std::vector<std::string> fields;  // extensions any sample has, sorted ("cls", "jpg", ...)
  std::vector<uint8_t> is_int;      // per field: an integer in text (cls, label) -> int64
  std::vector<uint64_t> start;      // per sample: offset of its first member's data
  std::vector<uint32_t> span;       // per sample: bytes from start to its last member's end
  std::vector<uint32_t> offset;     // per sample and field: data offset within the span
  std::vector<uint32_t> size;       // per sample and field
  std::vector<int64_t> ints;        // per sample and field: the value of an integer field
  std::vector<std::string> keys;    // per sample: its WebDataset __key__ (names up to the '.')
  std::vector<uint8_t> present;     // per sample and field: 1 when the sample has it (else
                                    // offset and size 0, int -1)
  size_t num_samples() const { return start.size(); }
};

/// Scans `tar` (open descriptor `fd`, `size` bytes), or loads its cached index. Throws
/// Error(kCorruption) naming the tar, the byte offset and the cause for a bad header or a
/// member that runs past the end. Samples that lack a field are recorded (`present`); whether
/// that is allowed is the dataset's to say (check_fields).
TarIndex load_tar_index(const std::filesystem::path& tar, int fd, uint64_t size);

/// The scan itself, without the cache (`label` names the tar in errors). Same errors.
TarIndex scan_tar(const std::string& label, int fd, uint64_t size);

/// Reads dest.size() bytes of the tar at `offset`, whole, or throws naming the tar.
using TarReader = std::function<void(std::span<std::byte> dest, uint64_t offset)>;

/// The scan over any reader (the node cache walks a tar in an object store with it): what it
/// reads is every header, long name, pax record and integer field, and nothing else.
TarIndex scan_tar(const std::string& label, const TarReader& read, uint64_t size);

/// Puts `t`'s fields in the order of `fields` (a superset of them); fields it lacks are absent
/// from every sample.
void remap_fields(TarIndex& t, const std::vector<std::string>& fields);

/// Throws Error(kCorruption) naming the tar, the first sample that lacks a field not in
/// `optional`, and the field.
void check_fields(const std::string& label, const TarIndex& t,
                  const std::vector<std::string>& optional);

/// Where the cached index of `tar` lives (for tests).
std::filesystem::path tar_index_cache_path(const std::filesystem::path& tar);

}  // namespace sluice::index
