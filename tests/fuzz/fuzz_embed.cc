// An embedding table's files as a crash or a disk could leave them: the journal (replayed on
// open) and the manifest. Replay must stop at the first damaged record and hand out only
// whole ones; a bad manifest is an error, never a layout that reads past its shards.
#include "embed/journal.h"
#include "embed/layout.h"
#include "fuzz_common.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

using namespace sluice;

namespace {
const std::filesystem::path& scratch() {
  static const std::filesystem::path dir = [] {
    auto d = std::filesystem::temp_directory_path() /
             ("sluice-fuzz-embed-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

void write(const std::filesystem::path& file, const uint8_t* data, size_t size) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  write(scratch() / embed::kJournal, data, size);
  for (size_t row_bytes : {4ul, 12ul, 512ul}) {
    fuzz::expect_only_errors([&] {
      embed::Journal::replay(scratch() / embed::kJournal, row_bytes, [&](auto ids, auto rows) {
        if (rows.size() != ids.size() * row_bytes) __builtin_trap();
      });
    });
  }
  write(scratch() / embed::kManifest, data, size);
  fuzz::expect_only_errors([&] {
    embed::Layout l = embed::read_manifest(scratch());
    // Whatever it accepts places every row inside its shard.
    for (uint64_t row : {uint64_t{0}, l.rows / 2, l.rows - 1})
      if (l.unit_of(row) * l.unit_bytes + l.offset_in_unit(row) + l.row_bytes >
          l.shard_bytes(l.shard_of(row)))
        __builtin_trap();
  });
  return 0;
}
