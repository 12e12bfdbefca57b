#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace sluice::cli {

struct PackArgs {
  std::vector<std::filesystem::path> sources;
  std::filesystem::path output;
  std::string format = "auto";
  uint64_t shard_bytes = 256ull << 20;
  uint32_t alignment = 4096;
  bool force = false;
  bool json = false;
  uint64_t seq_len = 0;  // tokens: window length, stride and token type, as in the config
  uint64_t stride = 0;
  std::string dtype = "uint16";
};

struct OrderArgs {
  std::filesystem::path config;
  int64_t rank = -1;        // -1: from the config / environment
  int64_t world_size = -1;  // -1: from the config / environment
  uint64_t epoch = 0;
  uint64_t position = 0;  // resume point in the epoch's global order
  bool json = false;
};

struct BenchArgs {
  std::filesystem::path config;
  double seconds = 10;
  uint64_t epochs = 0;  // > 0: run this many epochs instead of `seconds`
  bool json = false;
};

struct ServeArgs {
  std::filesystem::path dataset;         // empty: none (only with checkpoint_dir)
  std::filesystem::path checkpoint_dir;  // keep peers' checkpoint copies here
  std::string listen = "0.0.0.0:7070";
  std::filesystem::path token_file;  // else $SLUICE_TOKEN
  bool no_token = false;             // serve without a token (refused unless said)
  uint32_t threads = 4;
  std::string direct = "auto";  // auto, on, off
  bool json = false;
};

struct EmbedCreateArgs {
  std::filesystem::path path;
  uint64_t rows = 0;
  uint32_t dim = 0;
  std::string dtype = "float32";
  std::string init = "zeros";
  uint64_t seed = 0;
  std::string shard_size;  // empty: the default (1 GiB)
};

// Each returns the process exit code; user errors throw sluice::Error.
/// Packs Arrow data (parquet files, a directory of them, a `datasets` save_to_disk directory):
/// the Python package supplies it (pyarrow); the plain binary has none and says so.
using ArrowPack = std::function<int(const PackArgs&)>;

/// The whole command line: build/sluice's main(), and the `sluice` command the wheel installs
/// (sluice._C.cli, with `arrow` set). Returns the exit code.
int run(int argc, char** argv, const ArrowPack& arrow = {});

/// Whether `path` is Arrow data for `arrow`: a .parquet or .arrow file (or a missing path so
/// named), or a directory holding one at its top level.
bool arrow_source(const std::filesystem::path& path);

int run_pack(const PackArgs& args, const ArrowPack& arrow);
int run_inspect(const std::filesystem::path& dataset, bool json);
int run_verify(const std::filesystem::path& dataset, bool json);
int run_order(const OrderArgs& args);
int run_bench(const BenchArgs& args);
int run_serve(const ServeArgs& args);
int run_embed_create(const EmbedCreateArgs& args);
int run_embed_inspect(const std::filesystem::path& path, bool json);

/// "256M", "1GiB", "4096" -> bytes; throws Error(kInvalidArgument) naming `text`.
uint64_t parse_size(const std::string& text);

}  // namespace sluice::cli
