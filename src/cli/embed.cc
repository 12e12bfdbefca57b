// sluice embed create / inspect: embedding tables (include/sluice/embedding.h).

#include <sluice/embedding.h>
#include <sluice/error.h>

#include "cli/commands.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>

namespace sluice::cli {

int run_embed_create(const EmbedCreateArgs& args) {
  EmbeddingSpec spec;
  spec.rows = args.rows;
  spec.dim = args.dim;
  spec.dtype = embedding_dtype(args.dtype);
  spec.init = args.init;
  spec.seed = args.seed;
  if (!args.shard_size.empty()) spec.shard_bytes = parse_size(args.shard_size);
  EmbeddingTable::create(args.path, spec);
  fmt::print("{}: {} rows x {} {} ({})\n", args.path.string(), spec.rows, spec.dim, args.dtype,
             spec.init);
  return 0;
}

int run_embed_inspect(const std::filesystem::path& path, bool json) {
  EmbeddingOptions options;
  options.readonly = true;  // checks the manifest and every shard's size; holds off writers
  auto table = EmbeddingTable::open(path, options);
  std::ifstream in(path / "manifest.json");
  std::stringstream text;
  text << in.rdbuf();
  auto m = nlohmann::json::parse(text.str());
  std::error_code ec;
  const auto journal = std::filesystem::file_size(path / "journal", ec);
  m["journal_bytes"] = ec ? 0 : journal;  // updates a crash left, replayed on the next open
  if (json) {
    fmt::print("{}\n", m.dump());
    return 0;
  }
  uint64_t bytes = 0;
  for (const auto& s : m["shards"]) bytes += s["bytes"].get<uint64_t>();
  fmt::print("{}: {} rows x {} {} ({} bytes a row, {} to a {}-byte unit), {} shard{}, {} bytes\n",
             path.string(), table->rows(), table->dim(), to_string(table->dtype()),
             table->row_bytes(), m["rows_per_unit"].get<uint64_t>(),
             m["unit_bytes"].get<uint64_t>(), m["shards"].size(),
             m["shards"].size() == 1 ? "" : "s", bytes);
  fmt::print("init: {}, seed {}\n", m["init"].get<std::string>(), m["seed"].get<uint64_t>());
  if (m["journal_bytes"].get<uint64_t>() > 0)
    fmt::print("journal: {} bytes of updates not yet in place (applied on the next open)\n",
               m["journal_bytes"].get<uint64_t>());
  return 0;
}

}  // namespace sluice::cli
