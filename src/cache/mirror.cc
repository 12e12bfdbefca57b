#include "cache/mirror.h"

#include "common/errors.h"
#include "common/log.h"
#include "index/tar_index.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <iterator>
#include <mutex>
#include <thread>

namespace sluice::cache {

namespace fs = std::filesystem;
using detail::fail;

namespace {

constexpr uint64_t kShardHeader = 4096;  // a packed shard's header block
constexpr uint64_t kNpyHead = 64 << 10;  // enough for any .npy header sluice reads

uint64_t free_bytes(const fs::path& dir) {
  struct statvfs st {};
  if (statvfs(dir.c_str(), &st) != 0) return 0;
  return static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
}

// Takes `file`'s flock in `mode` (LOCK_EX or LOCK_SH), waiting at most `timeout`.
void take_lock(int fd, int mode, const fs::path& file, std::chrono::seconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (flock(fd, mode | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK && errno != EINTR) detail::fail_errno(errno, "lock " + file.string());
    if (std::chrono::steady_clock::now() > until)
      fail(ErrorCode::kIo, "cache.dir: {} still held by another process after {} s", file.string(),
           timeout.count());
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// Joins the shared cache under `root`: open.lock taken (exclusive) for the opening, and
// users.lock (shared) for as long as the process uses it. The first user (nobody else holds
// users.lock) removes the slot directories that earlier versions made, one per process.
void join_cache(Mirror& m, const fs::path& root) {
  m.open_lock = detail::open_file(root / "open.lock", O_RDWR | O_CREAT);
  take_lock(m.open_lock.get(), LOCK_EX, root / "open.lock", std::chrono::minutes(10));
  m.lock = detail::open_file(root / "users.lock", O_RDWR | O_CREAT);
  m.first_user = flock(m.lock.get(), LOCK_EX | LOCK_NB) == 0;
  take_lock(m.lock.get(), LOCK_SH, root / "users.lock", std::chrono::seconds(10));
  if (!m.first_user) return;
  std::error_code ec;
  bool removed = false;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    if (!e.path().filename().string().starts_with("slot-")) continue;
    std::error_code rec;
    removed |= fs::remove_all(e.path(), rec) > 0;
  }
  if (removed)
    detail::log_line(fmt::format(
        "cache: removed the per-process slots of an earlier version from {}", root.string()));
}

// Where a source object lands in the mirror, refusing keys that would leave it.
fs::path object_path(const fs::path& dir, const std::string& key, const std::string& url) {
  fs::path rel = fs::path(key).lexically_normal();
  if (key.empty() || rel.is_absolute() || *rel.begin() == "..")
    fail(ErrorCode::kUnsupported, "{}: object key \"{}\" cannot be mirrored", url, key);
  return dir / "data" / rel;
}

// The metadata regions of one object: what Dataset::open reads before any sample.
struct Region {
  uint32_t object;
  uint64_t offset, length;
};

// Removes the memory caches of processes that died without removing them (kill -9): their
// lock is free. A directory without a lock file yet may be one being made: left unless old.
void sweep_memory_mirrors(const fs::path& base) {
  auto older_than = [](const fs::path& p, std::chrono::seconds age) {
    std::error_code ec;
    auto t = fs::last_write_time(p, ec);
    return !ec && fs::file_time_type::clock::now() - t > age;
  };
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(base, ec)) {
    if (!e.path().filename().string().starts_with("sluice-cache-")) continue;
    int fd = ::open((e.path() / "lock").c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) {
      if (!older_than(e.path(), std::chrono::minutes(10))) continue;
    } else {
      // A free lock made a moment ago may be one its maker has not taken yet.
      const bool dead = flock(fd, LOCK_EX | LOCK_NB) == 0 &&
                        older_than(e.path() / "lock", std::chrono::seconds(10));
      if (!dead) {
        ::close(fd);
        continue;
      }
    }
    std::error_code rec;
    uint64_t removed = fs::remove_all(e.path(), rec);
    if (fd >= 0) ::close(fd);
    if (!rec && removed)
      detail::log_line(
          fmt::format("cache: removed {}, the memory cache of a process that ended "
                      "without removing it",
                      e.path().string()));
  }
}

using Walked = std::vector<std::pair<Region, std::vector<std::byte>>>;

// A WebDataset tar has no index: its members are found by walking its headers from the start.
// The walk reads the object in chunks of kTarChunk (one ranged read each), jumping over members
// larger than a chunk. What the scan reads (headers, long names, pax records, integer fields)
// becomes the mirror's metadata, so that the scan of the mirror finds what the source holds.
constexpr uint64_t kTarChunk = 4 << 20;

Walked walk_tar(source::Source& source, uint32_t object) {
  const uint64_t size = source.objects()[object].size;
  const std::string label = source.name(object);
  std::vector<std::byte> chunk;
  uint64_t chunk_at = 0;
  Walked out;
  auto read = [&](std::span<std::byte> dest, uint64_t offset) {
    if (dest.empty()) return;  // an empty long name or pax record: nothing to read or keep
    if (offset > size || dest.size() > size - offset)
      fail(ErrorCode::kCorruption, "{}: ends inside the {} bytes at offset {}", label, dest.size(),
           offset);
    if (dest.size() > kTarChunk) {
      source::Range r{object, offset, dest.size(), dest.data()};
      source.read({&r, 1});
    } else {
      if (chunk.empty() || offset < chunk_at || offset + dest.size() > chunk_at + chunk.size()) {
        chunk.resize(std::min(kTarChunk, size - offset));
        chunk_at = offset;
        source::Range r{object, offset, chunk.size(), chunk.data()};
        source.read({&r, 1});
      }
      std::memcpy(dest.data(), chunk.data() + (offset - chunk_at), dest.size());
    }
    out.push_back({{object, offset, dest.size()}, {dest.begin(), dest.end()}});
  };
  index::scan_tar(label, read, size);
  return out;
}

// Walks the tars side by side, a few at a time (each walk is one ranged read after another).
std::vector<Walked> walk_tars(source::Source& source, const std::vector<uint32_t>& tars) {
  std::vector<Walked> walked(tars.size());
  std::atomic<size_t> next{0};
  std::mutex mu;
  std::exception_ptr error;
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < tars.size();) {
      try {
        walked[i] = walk_tar(source, tars[i]);
      } catch (...) {
        std::lock_guard lock(mu);
        if (!error) error = std::current_exception();
        next = tars.size();
      }
    }
  };
  {
    std::vector<std::jthread> pool;
    for (size_t t = 0; t < std::min<size_t>(16, tars.size()); ++t) pool.emplace_back(work);
  }
  if (error) std::rethrow_exception(error);
  return walked;
}

}  // namespace

Mirror open_mirror(source::Source& source, const CacheOptions& options) {
  const auto& objects = source.objects();
  const std::string& url = source.url();
  Mirror m;
  if (options.dir.empty()) {
    fs::path base = fs::exists("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    sweep_memory_mirrors(base);
    std::string tmpl = (base / "sluice-cache-XXXXXX").string();  // mkdtemp's pattern
    if (!mkdtemp(tmpl.data()))
      detail::fail_errno(errno, "make a memory cache under " + base.string());
    m.dir = tmpl;
    m.temporary = true;
    // Held while the process lives: a later one removes the directory of a killed one.
    m.lock = detail::open_file(m.dir / "lock", O_RDWR | O_CREAT);
    if (flock(m.lock.get(), LOCK_EX | LOCK_NB) != 0)
      detail::fail_errno(errno, "lock " + (m.dir / "lock").string());
  } else {
    // One directory per source: the URL's hash names it, the URL itself is written inside.
    m.dir = options.dir / fmt::format("{:016x}", std::hash<std::string>{}(url));
    std::error_code ec;
    fs::create_directories(m.dir, ec);
    if (ec) fail(ErrorCode::kIo, "cache.dir: cannot create {}: {}", m.dir.string(), ec.message());
    const fs::path& root = m.dir;
    auto fd = detail::open_file(root / "source", O_WRONLY | O_CREAT | O_TRUNC);
    std::string line = url + "\n";
    detail::write_full(fd.get(), std::as_bytes(std::span(line)), (root / "source").string());
  }
  m.room = free_bytes(m.dir);

  // One object whose key is the whole prefix (s3://b/train.bin): the dataset is that file.
  bool single = objects.size() == 1 && objects[0].key.empty();
  std::vector<fs::path> paths;
  for (const auto& o : objects)
    paths.push_back(single ? m.dir / "data" / fs::path(url).filename()
                           : object_path(m.dir, o.key, url));
  m.path = single ? paths[0] : m.dir / "data";
  m.files = paths;

  // An object's name as the dataset sees it: its key, or for a single object the URL's file.
  auto name_of = [&](uint32_t i) {
    return single ? fs::path(url).filename().string()
                  : fs::path(objects[i].key).filename().string();
  };
  const bool packed = source.find("manifest.sluice").has_value();
  std::vector<uint32_t> tars;
  for (uint32_t i = 0; i < objects.size(); ++i)
    if (!packed && name_of(i).ends_with(".tar")) tars.push_back(i);

  // The metadata: packed shards' header blocks first (they say where each index is).
  std::vector<Region> regions;
  std::vector<uint32_t> shards;
  for (uint32_t i = 0; i < objects.size(); ++i) {
    const auto& o = objects[i];
    const std::string name = name_of(i);
    if (packed && name == "manifest.sluice") {
      regions.push_back({i, 0, o.size});
    } else if (packed && name.ends_with(".sluice")) {
      if (o.size < kShardHeader)
        fail(ErrorCode::kCorruption, "{}/{}: {} bytes, shorter than a shard header", url, o.key,
             o.size);
      shards.push_back(i);
      regions.push_back({i, 0, kShardHeader});
    } else if (name.ends_with(".npy")) {
      regions.push_back({i, 0, std::min(o.size, kNpyHead)});
    }
  }
  auto fetch = [&](const std::vector<Region>& want) {
    std::vector<std::vector<std::byte>> bytes(want.size());
    std::vector<source::Range> ranges;
    for (size_t k = 0; k < want.size(); ++k) {
      bytes[k].resize(want[k].length);
      if (want[k].length)
        ranges.push_back({want[k].object, want[k].offset, want[k].length, bytes[k].data()});
    }
    source.read(ranges);
    return bytes;
  };
  auto got = fetch(regions);
  std::vector<Region> indexes;
  for (size_t k = 0; k < regions.size(); ++k) {
    const auto& o = objects[regions[k].object];
    if (!packed || o.key.ends_with("manifest.sluice")) continue;
    uint64_t index_offset = 0;
    std::memcpy(&index_offset, got[k].data() + 64, 8);
    if (index_offset < kShardHeader || index_offset > o.size)
      fail(ErrorCode::kCorruption, "{}/{}: index offset {} outside the object ({} bytes)", url,
           o.key, index_offset, o.size);
    indexes.push_back({regions[k].object, index_offset, o.size - index_offset});
  }
  auto got_index = fetch(indexes);
  for (size_t k = 0; k < indexes.size(); ++k) {
    regions.push_back(indexes[k]);
    got.push_back(std::move(got_index[k]));
  }
  for (auto& walked : walk_tars(source, tars)) {
    for (auto& [region, bytes] : walked) {
      regions.push_back(region);
      got.push_back(std::move(bytes));
    }
  }

  // The objects' versions (ETags, file times): a rewrite that left the metadata as it was (an
  // .npy's head, a tar's headers) still changed the samples.
  std::string versions;
  for (const auto& o : objects) versions += fmt::format("{}\t{}\t{}\n", o.key, o.size, o.version);
  m.identity = std::hash<std::string>{}(versions);
  if (!m.temporary) join_cache(m, m.dir);

  // Compare with what the mirror holds: the object sizes, the metadata, the versions.
  const bool reused = fs::exists(m.dir / "state");
  bool same = reused;
  std::vector<detail::UniqueFd> fds(objects.size());
  for (uint32_t i = 0; i < objects.size(); ++i) {
    std::error_code ec;
    fs::create_directories(paths[i].parent_path(), ec);
    fds[i] = detail::open_file(paths[i], O_RDWR | O_CREAT);
    same = same && detail::file_size(fds[i].get(), paths[i].string()) == objects[i].size;
  }
  for (size_t k = 0; same && k < regions.size(); ++k) {
    const Region& r = regions[k];
    // A hole punched over metadata inside a sample's span (a tar member's header between its
    // fields) reads as zeros: that byte was evicted, not changed.
    std::vector<std::byte> old(r.length);
    size_t n = detail::pread_full(fds[r.object].get(), old, r.offset, paths[r.object].string());
    same = n == r.length;
    for (size_t i = 0; same && i < n; ++i) same = old[i] == got[k][i] || old[i] == std::byte{0};
  }
  if (same) {
    std::ifstream in(m.dir / "versions", std::ios::binary);
    std::string had((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    same = had == versions;
  }
  if (!same && !m.first_user)
    fail(ErrorCode::kIo,
         "cache: {} changed at the source since {} was filled, and another process still reads "
         "that cache; stop it, or give this one another cache.dir",
         url, m.dir.string());
  if (!same) {
    if (reused)
      detail::log_line(
          fmt::format("cache: {} changed at the source since {} was filled; starting it over", url,
                      m.dir.string()));
    fs::remove(m.dir / "state");  // what it listed is gone
    for (uint32_t i = 0; i < objects.size(); ++i) {
      // Drop every cached sample: keep only the metadata written next.
      uint64_t size = objects[i].size;
      if (ftruncate(fds[i].get(), 0) != 0 || ftruncate(fds[i].get(), static_cast<off_t>(size)) != 0)
        detail::fail_errno(errno, "size " + paths[i].string());
    }
    if (!m.temporary) {
      std::ofstream out(m.dir / "versions.tmp", std::ios::binary | std::ios::trunc);
      out << versions;
      if (!out.flush())
        fail(ErrorCode::kIo, "cache: cannot write {}", (m.dir / "versions.tmp").string());
      out.close();
      fs::rename(m.dir / "versions.tmp", m.dir / "versions");
    }
  }
  // Written also when the same: it puts back headers punched out with an evicted sample, for
  // the scan of the mirror at Dataset::open (nothing is punched out while open.lock is held).
  for (size_t k = 0; k < regions.size(); ++k)
    detail::write_full(fds[regions[k].object].get(), got[k], paths[regions[k].object].string(),
                       static_cast<int64_t>(regions[k].offset));
  return m;
}

void remove_mirror(const Mirror& mirror) {
  if (!mirror.temporary) return;
  std::error_code ec;
  fs::remove_all(mirror.dir, ec);
}

void fill_mirror(source::Source& source, const Mirror& mirror, uint64_t chunk) {
  std::vector<std::byte> buffer(chunk);
  for (uint32_t i = 0; i < source.objects().size(); ++i) {
    const uint64_t size = source.objects()[i].size;
    auto fd = detail::open_file(mirror.files[i], O_WRONLY);
    for (uint64_t at = 0; at < size; at += chunk) {
      const uint64_t n = std::min(chunk, size - at);
      source::Range r{i, at, n, buffer.data()};
      source.read({&r, 1});
      detail::write_full(fd.get(), std::span(buffer.data(), n), mirror.files[i].string(),
                         static_cast<int64_t>(at));
    }
  }
}

std::string name_source(std::string text, const Mirror& mirror, const std::string& url) {
  const std::string local = mirror.path.string();
  for (size_t at; (at = text.find(local)) != std::string::npos;)
    text.replace(at, local.size(), url);
  return text;
}

RemoteDataset open_remote_dataset(const LoaderOptions& o, const DatasetOpenOptions& open) {
  const std::string path = o.dataset.path.string();
  source::SourceOptions so;
  so.endpoint = o.dataset.s3.endpoint;
  so.region = o.dataset.s3.region;
  so.access_key_id = o.dataset.s3.access_key_id;
  so.secret_access_key = o.dataset.s3.secret_access_key;
  so.session_token = o.dataset.s3.session_token;
  so.timeout_ms = o.io.timeout_ms;
  RemoteDataset r;
  r.source = source::open_store(path, so);
  r.mirror = open_mirror(*r.source, o.cache);
  DatasetOptions d = o.dataset;
  d.path = r.mirror.path;
  try {
    r.dataset = Dataset::open_source(d, open);
  } catch (const Error& e) {
    remove_mirror(r.mirror);
    throw Error(e.code(), name_source(e.what(), r.mirror, path), e.sys_errno());
  }
  return r;
}

}  // namespace sluice::cache
