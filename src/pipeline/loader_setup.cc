#include "pipeline/loader_setup.h"

#include "cache/mirror.h"
#include "common/errors.h"
#include "common/host.h"
#include "common/log.h"
#include "memory/cuda.h"
#include "read/direct.h"
#include "source/source.h"

#include <algorithm>

namespace sluice::pipeline {

using detail::fail;
using detail::log_line;

namespace {

// What the environment decides, resolved once: peers from $SLUICE_PEERS (io.threads: auto
// once the files have chosen direct I/O or not).
LoaderOptions resolved(LoaderOptions o) {
  o.distributed.peers = o.resolved_peers();
  return o;
}

// A dataset not on this node (s3://, or any path with cache.dir) is opened on its mirror,
// a local stand-in that the cache fills (cache/mirror.h); `source` and `mirror` are kept for
// open_cache().
std::shared_ptr<Dataset> open_dataset(const LoaderOptions& o,
                                      std::unique_ptr<source::Source>& source,
                                      cache::Mirror& mirror) {
  if (o.dataset.path.empty()) fail(ErrorCode::kConfig, "dataset.path: missing");
  DatasetOpenOptions open;
  open.allow_absent_shards = !o.distributed.peers.empty();
  const std::string path = o.dataset.path.string();
  if (!source::is_remote(path) && o.cache.dir.empty()) return Dataset::open_source(o.dataset, open);
  if (!o.distributed.peers.empty() || !o.distributed.listen.empty())
    fail(ErrorCode::kConfig,
         "{}: a cached dataset (s3:// or cache.dir) cannot also use distributed.peers or "
         "distributed.listen",
         path);
  cache::RemoteDataset remote = cache::open_remote_dataset(o, open);
  source = std::move(remote.source);
  mirror = std::move(remote.mirror);
  return remote.dataset;
}

// Whether batch buffers are to be page-locked: yes for cuda:N (which needs that device) and
// for pinned when there is a device to pin for; pinned without one falls back, saying so.
bool probe_device(const DeviceOptions& d) {
  if (d.kind == DeviceKind::kCpu) return false;
  auto found = memory::cuda_devices();
  const int devices = found ? *found : 0;
  if (d.kind == DeviceKind::kCuda) {
    if (!found) fail(ErrorCode::kUnsupported, "device: cuda:{}: {}", d.index, found.error());
    if (d.index >= devices)
      fail(ErrorCode::kConfig, "device: cuda:{}: this machine has {} CUDA device{}", d.index,
           devices, devices == 1 ? "" : "s");
    return true;
  }
  if (devices == 0) {
    log_line("device: pinned: " + found.error() + "; batches stay in ordinary (pageable) memory");
    return false;
  }
  return true;
}

// The read path's choices, once the files are open: how many loader threads (io.threads:
// auto depends on direct I/O), and whether records go straight into their batch slots.
void choose_reads(LoaderParts& p) {
  const read::DatasetFiles& files = *p.files;
  if (p.options.io.threads == 0) {
    std::string why;
    p.options.io.threads = p.options.resolved_io_threads(&why, files.direct());
    log_line(why);
  }
  const auto& shards = p.dataset->shards();
  const auto& fields = p.dataset->fields();
  const bool all_local = std::all_of(shards.begin(), shards.end(), [](auto& s) { return s.local; });
  BuildOptions& b = p.build;
  b.verify = p.options.io.verify;
  b.timeout_ms = p.options.io.timeout_ms;
  b.direct = files.direct();
  b.one_field_bytes = p.dataset->packed() && fields.size() == 1 && fields[0].fixed_size()
                          ? fields[0].fixed_bytes()
                          : 0;
  b.direct_to_batch = all_local && b.one_field_bytes > 0 &&
                      b.one_field_bytes % files.alignment() == 0 &&
                      b.one_field_bytes <= UINT32_MAX && p.options.transforms.empty();
  if (p.options.io.direct == DirectIo::kAuto)
    log_line((files.direct() ? "direct I/O (O_DIRECT) on: "
                             : "direct I/O off, reading through the page cache: ") +
             files.why());
  else if (p.options.io.direct == DirectIo::kOn)
    log_line("direct I/O (O_DIRECT) on");
}

// Config `transforms`: each named field's transform, and the batch's fields as they come out
// of it (a fixed-shape tensor instead of the stored bytes).
void compile_transforms(LoaderParts& p) {
  if (p.options.transforms.empty()) return;
  const auto& stored = p.dataset->fields();
  auto fields = std::make_shared<std::vector<FieldSpec>>(stored);
  BuildOptions& b = p.build;
  b.transforms.assign(stored.size(), nullptr);
  b.seed = p.options.seed;
  b.skip_transform_errors = p.options.transform_errors == TransformErrors::kSkip;
  for (const FieldTransform& t : p.options.transforms) {
    auto it = std::find_if(stored.begin(), stored.end(),
                           [&](const FieldSpec& f) { return f.name == t.field; });
    if (it == stored.end()) {
      std::vector<std::string> names;
      for (const auto& f : stored) names.push_back(f.name);
      fail(ErrorCode::kConfig, "transforms.{}: {} has no field \"{}\" (its fields: {})", t.field,
           p.dataset->path().string(), t.field, fmt::join(names, ", "));
    }
    const size_t f = static_cast<size_t>(it - stored.begin());
    auto compiled = std::make_shared<const transform::ImageTransform>(t);
    (*fields)[f].dtype = compiled->dtype();
    (*fields)[f].shape = compiled->shape();
    b.transforms[f] = std::move(compiled);
  }
  p.fields = std::move(fields);
}

std::unique_ptr<cache::SampleCache> open_cache(const LoaderParts& p,
                                               std::unique_ptr<source::Source> source,
                                               cache::Mirror mirror) {
  const CacheOptions& c = p.options.cache;
  uint64_t capacity = c.dir.empty() ? c.memory : c.capacity;
  std::string why;
  if (capacity == 0 && c.dir.empty()) {
    // Each rank on the node has a memory cache of its own: the quarter is the node's.
    const uint32_t ranks = p.options.resolved_local_world_size();
    capacity = std::max<uint64_t>(detail::memory_room().bytes / 4 / ranks, 64 << 20);
    why = ranks > 1 ? fmt::format(
                          " (a quarter of the free memory, shared by {} ranks on this "
                          "node)",
                          ranks)
                    : " (a quarter of the free memory)";
  } else if (capacity == 0) {
    capacity = std::max<uint64_t>(mirror.room / 2, 64 << 20);
    why = " (half the free space there)";
  }
  const std::string where =
      c.dir.empty() ? "in memory (" + mirror.dir.string() + ")" : mirror.dir.string();
  auto cache = std::make_unique<cache::SampleCache>(p.dataset, std::move(source), std::move(mirror),
                                                    c.policy, capacity, c.fetch_size,
                                                    p.options.io.timeout_ms);
  log_line(fmt::format("cache: {} MB{} {}, policy {}, fetch_size {}", capacity >> 20, why, where,
                       to_string(c.policy), c.fetch_size));
  if (!c.dir.empty() && c.memory)
    log_line(
        "cache.memory: with cache.dir the page cache is the memory tier; cache.memory "
        "applies to a memory-only cache");
  return cache;
}

std::unique_ptr<ShardServer> start_server(const LoaderParts& p) {
  const DistributedOptions& d = p.options.distributed;
  ServerOptions so;
  so.listen = d.listen;
  so.token = p.token;
  so.no_token = d.no_token;
  so.io = p.options.io;
  if (p.token.empty() && !so.no_token)
    fail(ErrorCode::kConfig,
         "distributed.listen: no token: set distributed.token or distributed.token_file (or "
         "$SLUICE_TOKEN), or distributed.no_token: true to serve without one (a single "
         "trusted host only)");
  auto server = ShardServer::start(p.dataset, so);
  log_line(fmt::format("serving this node's shards on {}", server->address()));
  return server;
}

}  // namespace

LoaderParts set_up_loader(const LoaderOptions& options) {
  LoaderParts p;
  p.options = resolved(options);
  std::unique_ptr<source::Source> source;
  cache::Mirror mirror;
  p.dataset = open_dataset(p.options, source, mirror);
  p.fields = std::make_shared<const std::vector<FieldSpec>>(p.dataset->fields());
  p.pin = probe_device(p.options.device);
  // A mirror's holes are not worth reading ahead: no warming behind a cache.
  p.files = std::make_unique<read::DatasetFiles>(p.dataset, p.options.io.direct, "io.direct",
                                                 /*may_warm=*/!source);
  choose_reads(p);
  compile_transforms(p);
  p.token = p.options.distributed.resolved_token();
  if (source) p.cache = open_cache(p, std::move(source), std::move(mirror));
  if (!p.options.distributed.listen.empty()) p.server = start_server(p);
  return p;
}

}  // namespace sluice::pipeline
