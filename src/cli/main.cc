// The `sluice` command line: pack, inspect, verify, order, bench, serve, embed. run() is shared by
// build/sluice (cli.cc) and the wheel's command (sluice._C.cli).

#include <sluice/sluice.h>

#include "cli/commands.h"

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <cstdio>

namespace sluice::cli {

namespace {
// "pack", or "embed create": the subcommands chosen, for errors.
std::string command_name(const CLI::App& app) {
  std::string name;
  for (const CLI::App* a = &app; !a->get_subcommands().empty(); a = a->get_subcommands().front())
    name += (name.empty() ? "" : " ") + a->get_subcommands().front()->get_name();
  return name;
}
}  // namespace

int run(int argc, char** argv, const ArrowPack& arrow) {
  CLI::App app{"sluice: a data loader that keeps GPUs fed"};
  app.require_subcommand(1);
  app.set_version_flag("--version", sluice::version());

  PackArgs pack;
  std::string shard_size;
  auto* pack_cmd = app.add_subcommand("pack", "Pack a source dataset into sluice shards");
  pack_cmd
      ->add_option("SRC", pack.sources,
                   "Source: a directory tree (one file per sample, label = the first directory "
                   "under it), a .npy array, a token file (--format tokens --seq-len N), or "
                   "parquet / Arrow (files, a directory of them, a `datasets` save_to_disk "
                   "directory; with the pip-installed command)")
      ->required();
  pack_cmd->add_option("-o,--output", pack.output, "Destination dataset directory")->required();
  pack_cmd->add_option("--format", pack.format, "Source format")
      ->check(CLI::IsMember({"auto", "files", "tar", "npy", "tokens", "parquet"}));
  pack_cmd->add_option("--shard-size", shard_size, "Bytes of sample data per shard (e.g. 256M)");
  pack_cmd->add_option("--alignment", pack.alignment, "Direct-I/O block size (power of two)");
  pack_cmd->add_flag("--force", pack.force, "Replace an existing dataset at the destination");
  pack_cmd->add_flag("--json", pack.json, "Print a JSON summary, no progress bar");
  pack_cmd->add_option("--seq-len", pack.seq_len, "tokens: tokens per sample (window length)");
  pack_cmd->add_option("--stride", pack.stride, "tokens: tokens between windows (default seq-len)");
  pack_cmd->add_option("--dtype", pack.dtype, "tokens: uint16 or uint32")
      ->check(CLI::IsMember({"uint16", "uint32"}));

  std::string dataset;
  bool json = false;
  auto* inspect_cmd = app.add_subcommand(
      "inspect", "Describe a dataset: packed, or read in place (tar shards, a files tree, .npy)");
  inspect_cmd->add_option("DST", dataset, "Dataset directory or file")->required();
  inspect_cmd->add_flag("--json", json, "Machine-readable output");

  auto* verify_cmd = app.add_subcommand("verify", "Check every header, index entry and checksum");
  verify_cmd->add_option("DST", dataset, "Dataset directory or file")->required();
  verify_cmd->add_flag("--json", json, "Machine-readable output");

  OrderArgs order;
  auto* order_cmd = app.add_subcommand("order",
                                       "Print the global sample indices a rank "
                                       "receives in an epoch, in delivery order");
  order_cmd->add_option("CONFIG", order.config, "YAML config")->required();
  order_cmd->add_option("--rank", order.rank, "Rank (default: the config's, or $RANK)");
  order_cmd->add_option("--world-size", order.world_size,
                        "World size (default: the config's, or $WORLD_SIZE)");
  order_cmd->add_option("--epoch", order.epoch, "Epoch");
  order_cmd->add_option("--position", order.position,
                        "Resume from this many samples of the epoch consumed (all ranks)");
  order_cmd->add_flag("--json", order.json, "Machine-readable output");

  BenchArgs bench;
  auto* bench_cmd = app.add_subcommand("bench",
                                       "Run the loader with a consumer that touches "
                                       "every sample; print samples/s, bytes/s, wait fraction");
  bench_cmd->add_option("CONFIG", bench.config, "YAML config")->required();
  bench_cmd->add_option("--seconds", bench.seconds, "How long to run (default 10)");
  bench_cmd->add_option("--epochs", bench.epochs, "Run this many epochs instead");
  bench_cmd->add_flag("--json", bench.json, "Machine-readable output, no progress bar");

  ServeArgs serve;
  auto* serve_cmd =
      app.add_subcommand("serve",
                         "Serve a dataset's samples to remote loaders (UCX), and keep "
                         "peers' checkpoint copies");
  serve_cmd->add_option("DATASET", serve.dataset,
                        "Dataset directory (optional with --checkpoint-dir)");
  serve_cmd->add_option("--checkpoint-dir", serve.checkpoint_dir,
                        "Keep copies of peers' checkpoints here (token holders only)");
  serve_cmd->add_option("--listen", serve.listen, "HOST:PORT to listen on (default 0.0.0.0:7070)");
  serve_cmd->add_option("--token-file", serve.token_file,
                        "File holding the shared token (default: $SLUICE_TOKEN)");
  serve_cmd->add_flag("--no-token", serve.no_token,
                      "Serve without a token: anyone who can connect reads (trusted host only)");
  serve_cmd->add_option("--threads", serve.threads, "Replies read at once (default 4)");
  serve_cmd
      ->add_option("--direct", serve.direct,
                   "O_DIRECT reads: auto (when the file system allows), on, off (page cache)")
      ->check(CLI::IsMember({"auto", "on", "off"}));
  serve_cmd->add_flag("--json", serve.json, "Print the address as JSON once listening");

  EmbedCreateArgs embed;
  std::filesystem::path embed_path;
  auto* embed_cmd = app.add_subcommand("embed", "Embedding tables on disk");
  embed_cmd->require_subcommand(1);
  auto* embed_create = embed_cmd->add_subcommand("create", "Make a new embedding table");
  embed_create->add_option("PATH", embed.path, "Table directory (must not exist)")->required();
  embed_create->add_option("--rows", embed.rows, "Rows")->required();
  embed_create->add_option("--dim", embed.dim, "Elements per row")->required();
  embed_create->add_option("--dtype", embed.dtype, "float32, float16 or bfloat16")
      ->check(CLI::IsMember({"float32", "float16", "bfloat16"}));
  embed_create->add_option("--init", embed.init, "zeros, normal:STD or uniform:A");
  embed_create->add_option("--seed", embed.seed, "Seed of the init (default 0)");
  embed_create->add_option("--shard-size", embed.shard_size, "Largest shard file (default 1G)");
  auto* embed_inspect = embed_cmd->add_subcommand("inspect", "Describe an embedding table");
  embed_inspect->add_option("PATH", embed_path, "Table directory")->required();
  embed_inspect->add_flag("--json", json, "Machine-readable output");

  CLI11_PARSE(app, argc, argv);
  try {
    if (!shard_size.empty()) pack.shard_bytes = parse_size(shard_size);
    if (*pack_cmd) return run_pack(pack, arrow);
    if (*inspect_cmd) return run_inspect(dataset, json);
    if (*verify_cmd) return run_verify(dataset, json);
    if (*order_cmd) return run_order(order);
    if (*bench_cmd) return run_bench(bench);
    if (*serve_cmd) return run_serve(serve);
    if (*embed_create) return run_embed_create(embed);
    if (*embed_inspect) return run_embed_inspect(embed_path, json);
  } catch (const sluice::Error& e) {
    fmt::print(stderr, "sluice {}: {}\n", command_name(app), e.what());
    return e.code() == sluice::ErrorCode::kInvalidArgument ? 2 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "sluice {}: {}\n", command_name(app), e.what());
    return 1;
  }
  return 0;
}

}  // namespace sluice::cli
