// `sluice inspect`, `sluice verify` and `sluice order`.

#include <sluice/sluice.h>

#include "cli/commands.h"
#include "cli/progress.h"
#include "common/errors.h"

#include <nlohmann/json.hpp>

#include <stdlib.h>

#include <cstdio>
#include <iostream>
#include <memory>

namespace sluice::cli {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string shape_text(const FieldSpec& f) {
  std::string s = "[";
  for (size_t i = 0; i < f.shape.size(); ++i)
    s += (i ? ", " : "") + (f.shape[i] < 0 ? std::string("*") : std::to_string(f.shape[i]));
  return s + "]";
}

bool is_remote(const fs::path& path) { return path.string().starts_with("s3://"); }

// Whatever the Loader would read at `path` with `dataset: PATH`: packed shards, or a source read
// in place (a directory of .tar shards or one .tar, a tree of files, a .npy array), here or in an
// object store (s3://; `cache_dir`: where its mirror goes, else memory).
std::shared_ptr<Dataset> open_any(const fs::path& path, bool fetch_all = false,
                                  const fs::path& cache_dir = {}) {
  LoaderOptions options;
  options.dataset.path = path;
  options.cache.dir = cache_dir;
  return open_dataset(options, fetch_all);
}

// What to call the dataset: its path, or for an object store's its URL (not its mirror's path).
std::string name_of(const Dataset& ds, const fs::path& path) {
  return is_remote(path) ? path.string() : ds.path().string();
}

// A directory for a remote dataset's bytes while `sluice verify` checks them, removed after.
struct ScratchDir {
  fs::path path;
  ScratchDir() {
    std::string tmpl = (fs::temp_directory_path() / "sluice-verify-XXXXXX").string();
    if (!mkdtemp(tmpl.data())) throw errno_error(errno, "make " + tmpl);
    path = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::string format_text(const Dataset& ds) {
  switch (ds.format()) {
    case DatasetFormat::kShards:
      return fmt::format("sluice packed shards, version {}, {}-byte alignment", ds.format_version(),
                         ds.alignment());
    case DatasetFormat::kTar:
      return "WebDataset tar shards, read in place (no stored checksums)";
    case DatasetFormat::kFiles:
      return "a tree of files, read in place (labels: the first directory under the root)";
    case DatasetFormat::kNpy:
      return "a NumPy .npy array, read in place";
    default:
      return fmt::format("{}, read in place", to_string(ds.format()));
  }
}

}  // namespace

int run_inspect(const fs::path& path, bool as_json) {
  auto ds = open_any(path);
  if (as_json) {
    json fields = json::object();
    for (const auto& f : ds->fields())
      fields[f.name] = {
          {"dtype", dtype_name(f.dtype)}, {"shape", f.shape}, {"fixed_size", f.fixed_size()}};
    json shards = json::array();
    for (const auto& s : ds->shards())
      shards.push_back({{"file", s.path.filename().string()},
                        {"first_sample", s.first_sample},
                        {"samples", s.num_samples},
                        {"file_bytes", s.file_bytes}});
    json out = {{"path", name_of(*ds, path)},
                {"format", to_string(ds->format())},
                {"format_version", ds->format_version()},
                {"samples", ds->num_samples()},
                {"shards", ds->shards().size()},
                {"bytes", ds->total_bytes()},
                {"alignment", ds->alignment()},
                {"fields", fields},
                {"classes", ds->classes()},
                {"shard_files", shards}};
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  fmt::print("dataset   {}\n", name_of(*ds, path));
  fmt::print("format    {}\n", format_text(*ds));
  fmt::print("samples   {}\nshards    {}\nbytes     {}\n", ds->num_samples(), ds->shards().size(),
             ds->total_bytes());
  fmt::print("fields\n");
  for (const auto& f : ds->fields())
    fmt::print("  {:<12} {:<8} {}{}\n", f.name, dtype_name(f.dtype), shape_text(f),
               f.fixed_size() ? "" : "  (variable size)");
  if (!ds->classes().empty()) {
    fmt::print("classes   {}:", ds->classes().size());
    size_t shown = std::min<size_t>(ds->classes().size(), 10);
    for (size_t i = 0; i < shown; ++i) fmt::print(" {}", ds->classes()[i]);
    fmt::print("{}\n", shown < ds->classes().size() ? " ..." : "");
  }
  return 0;
}

int run_verify(const fs::path& path, bool as_json) {
  std::shared_ptr<Dataset> ds;
  std::vector<std::string> problems;
  // An object store's dataset is copied whole into a scratch directory first, then checked
  // there as a local one is: its problems named by the object's URL.
  std::unique_ptr<ScratchDir> scratch;
  if (is_remote(path)) scratch = std::make_unique<ScratchDir>();
  try {
    ds = open_any(path, /*fetch_all=*/true, scratch ? scratch->path : fs::path());
  } catch (const Error& e) {
    if (e.code() != ErrorCode::kCorruption && e.code() != ErrorCode::kNotFound) throw;
    problems.push_back(e.what());
  }
  if (ds) {
    Progress progress("verify", ds->total_bytes(), "B", !as_json);
    problems = ds->verify([&](uint64_t done, uint64_t) { progress.update(done); });
    progress.finish();
    if (is_remote(path))
      for (auto& p : problems)
        for (size_t at; (at = p.find(ds->path().string())) != std::string::npos;)
          p.replace(at, ds->path().string().size(), path.string());
  }
  if (as_json) {
    json out = {{"ok", problems.empty()}, {"problems", problems}};
    if (ds)
      out.update({{"samples", ds->num_samples()},
                  {"shards", ds->shards().size()},
                  {"bytes", ds->total_bytes()}});
    std::cout << out.dump(2) << "\n";
  } else if (problems.empty()) {
    fmt::print("OK: {} samples in {} shards, {} bytes, {}\n", ds->num_samples(),
               ds->shards().size(), ds->total_bytes(),
               ds->packed() ? "every checksum matches"
                            : "every sample read and split (read in place: no stored checksums)");
  } else {
    constexpr size_t kShown = 20;
    for (size_t i = 0; i < std::min(problems.size(), kShown); ++i)
      fmt::print(stderr, "{}\n", problems[i]);
    if (problems.size() > kShown)
      fmt::print(stderr, "... and {} more problems\n", problems.size() - kShown);
    fmt::print(stderr, "verify FAILED: {} problem{} in {}\n", problems.size(),
               problems.size() == 1 ? "" : "s", path.string());
  }
  return problems.empty() ? 0 : 1;
}

int run_order(const OrderArgs& args) {
  LoaderOptions options = LoaderOptions::from_yaml(args.config);
  if (options.dataset.path.empty())
    detail::fail(ErrorCode::kConfig, "{}: dataset.path: missing", args.config.string());
  auto ds = open_dataset(options);
  uint32_t world =
      args.world_size >= 0 ? static_cast<uint32_t>(args.world_size) : options.resolved_world_size();
  uint32_t rank = args.rank >= 0 ? static_cast<uint32_t>(args.rank) : options.resolved_rank();
  Sampler sampler(options.sampler_options(), ds->num_samples(), ds->shard_sizes());
  RankPlan plan = sampler.plan({args.epoch, args.position}, rank, world);

  std::vector<SampleRef> batch;
  if (args.json) {
    json indices = json::array(), padding = json::array();
    for (uint64_t s = 0; s < plan.num_batches(); ++s) {
      plan.batch(s, batch);
      for (const auto& r : batch) {
        if (r.padding) padding.push_back(indices.size());
        indices.push_back(r.index);
      }
    }
    std::cout << json{{"rank", rank},
                      {"world_size", world},
                      {"epoch", args.epoch},
                      {"position", args.position},
                      {"batches", plan.num_batches()},
                      {"batch_size", options.batch_size},
                      {"indices", indices},
                      {"padding", padding}}
              << "\n";
    return 0;
  }
  // One index per line; a padding sample (drop_last: false, repeated to even out the ranks)
  // is printed as "<index> pad".
  fmt::memory_buffer out;
  for (uint64_t s = 0; s < plan.num_batches(); ++s) {
    plan.batch(s, batch);
    for (const auto& r : batch) {
      if (r.padding)
        fmt::format_to(std::back_inserter(out), "{} pad\n", r.index);
      else
        fmt::format_to(std::back_inserter(out), "{}\n", r.index);
    }
    if (out.size() > (1 << 20)) {
      std::fwrite(out.data(), 1, out.size(), stdout);
      out.clear();
    }
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  return 0;
}

}  // namespace sluice::cli
