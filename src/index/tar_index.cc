#include "index/tar_index.h"

#include "common/errors.h"
#include "common/file.h"
#include "format/layout.h"

#include <fcntl.h>
#include <fmt/ranges.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <set>

namespace sluice::index {

namespace fs = std::filesystem;
using detail::fail;

namespace {

constexpr size_t kBlock = 512;
// 2: the tar's inode, device and change time join its size and mtime, and the cache carries a
// checksum of itself.
constexpr char kCacheMagic[8] = {'S', 'L', 'T', 'A', 'R', 'I', 'X', '3'};  // 3: keys

// A numeric header field: octal text, or base-256 binary when the high bit is set (GNU).
uint64_t tar_number(const char* p, size_t n) {
  if (static_cast<unsigned char>(p[0]) & 0x80) {
    uint64_t v = static_cast<unsigned char>(p[0]) & 0x7f;
    for (size_t i = 1; i < n; ++i) v = v << 8 | static_cast<unsigned char>(p[i]);
    return v;
  }
  uint64_t v = 0;
  for (size_t i = 0; i < n && p[i]; ++i)
    if (p[i] >= '0' && p[i] <= '7') v = v * 8 + static_cast<uint64_t>(p[i] - '0');
  return v;
}

std::string c_string(const char* p, size_t n) { return std::string(p, strnlen(p, n)); }

struct Member {
  std::string name;
  uint64_t data = 0, size = 0;
};

// A compressed tar is named as one, not reported as a damaged header or a truncated file.
void refuse_compressed(const std::string& label, const TarReader& read, uint64_t size) {
  unsigned char m[6] = {};
  if (size < sizeof m) return;
  read(std::as_writable_bytes(std::span(m)), 0);
  const char* kind = m[0] == 0x1f && m[1] == 0x8b                ? "gzip"
                     : m[0] == 'B' && m[1] == 'Z' && m[2] == 'h' ? "bzip2"
                     : std::memcmp(m,
                                   "\xfd"
                                   "7zXZ\0",
                                   6) == 0
                         ? "xz"
                     : m[0] == 0x28 && m[1] == 0xb5 && m[2] == 0x2f && m[3] == 0xfd ? "zstd"
                                                                                    : nullptr;
  if (kind)
    fail(ErrorCode::kUnsupported,
         "{}: a {}-compressed tar: sluice reads WebDataset shards uncompressed (each sample in "
         "place at its offset); decompress it first",
         label, kind);
}

// Every regular file in the tar, in order (pax 'path' records and GNU long names applied).
std::vector<Member> scan_members(const std::string& label, const TarReader& read, uint64_t size) {
  refuse_compressed(label, read, size);
  std::vector<Member> members;
  char h[kBlock];
  std::string long_name;
  uint64_t at = 0;
  int zero_blocks = 0;
  while (at + kBlock <= size) {
    read(std::as_writable_bytes(std::span(h)), at);
    if (std::all_of(h, h + kBlock, [](char c) { return c == 0; })) {
      if (++zero_blocks == 2) break;
      at += kBlock;
      continue;
    }
    zero_blocks = 0;
    uint64_t stored = tar_number(h + 148, 8), sum = 0;
    for (size_t i = 0; i < kBlock; ++i)
      sum += (i >= 148 && i < 156) ? ' ' : static_cast<unsigned char>(h[i]);
    if (stored != sum)
      fail(ErrorCode::kCorruption, "{}: bad tar header at offset {}: checksum {} != {}", label, at,
           stored, sum);
    const uint64_t n = tar_number(h + 124, 12), data = at + kBlock;
    if (data > size || n > size - data)  // compared without overflow: n may be near 2^64
      fail(ErrorCode::kCorruption, "{}: tar member at offset {} ({} bytes) runs past the end ({})",
           label, at, n, size);
    const char type = h[156];
    // Long names and pax records are names and short key=value lists: a huge one is damage,
    // not something to allocate for.
    constexpr uint64_t kMaxHeaderData = 1 << 20;
    if ((type == 'L' || type == 'x' || type == 'g') && n > kMaxHeaderData)
      fail(ErrorCode::kCorruption,
           "{}: tar {} header at offset {} says {} bytes (at most {} expected): damaged?", label,
           type == 'L' ? "long-name" : "pax", at, n, kMaxHeaderData);
    std::string name = c_string(h, 100);
    if (std::memcmp(h + 257, "ustar", 5) == 0 && h[345]) name = c_string(h + 345, 155) + "/" + name;
    if (type == 'L' || type == 'x') {  // the next member's name: GNU long name, or pax path=
      std::string text(n, '\0');
      read(std::as_writable_bytes(std::span(text)), data);
      if (type == 'L') {
        long_name = c_string(text.data(), text.size());
      } else {
        for (size_t p = 0; p < text.size();) {  // records: "LEN key=value\n"
          size_t space = text.find(' ', p);
          uint64_t len = 0;
          std::from_chars(text.data() + p, text.data() + space, len);
          if (space == std::string::npos || len == 0 || p + len > text.size()) break;
          std::string record = text.substr(space + 1, p + len - space - 2);
          if (record.starts_with("path=")) long_name = record.substr(5);
          p += len;
        }
      }
    } else if (type == '0' || type == '\0' || type == '7') {
      members.push_back({long_name.empty() ? name : long_name, data, n});
      long_name.clear();
    } else if (type != 'g') {
      long_name.clear();  // directories, links and the like: not samples
    }
    at = data + (n + kBlock - 1) / kBlock * kBlock;
  }
  if (zero_blocks == 0)  // every writer ends a tar with zero blocks; without them it was cut
    fail(ErrorCode::kCorruption,
         "{}: truncated: no end-of-archive blocks (the file ends at {} bytes, inside a member "
         "or header)",
         label, size);
  return members;
}

}  // namespace

TarIndex scan_tar(const std::string& label, int fd, uint64_t size) {
  return scan_tar(
      label,
      [&](std::span<std::byte> dest, uint64_t offset) {
        if (detail::pread_full(fd, dest, offset, label) != dest.size())
          fail(ErrorCode::kCorruption, "{}: ends inside the {} bytes at offset {}", label,
               dest.size(), offset);
      },
      size);
}

TarIndex scan_tar(const std::string& label, const TarReader& read, uint64_t size) {
  std::vector<Member> members = scan_members(label, read, size);
  // WebDataset's grouping: key = the path up to the first '.' of the file name; consecutive
  // members with one key are one sample, the rest of the name after that '.' is the field.
  struct Sample {
    std::string key;
    std::map<std::string, const Member*> fields;
  };
  std::vector<Sample> samples;
  for (const Member& m : members) {
    size_t slash = m.name.rfind('/');
    size_t dot = m.name.find('.', slash == std::string::npos ? 0 : slash + 1);
    if (dot == std::string::npos) continue;  // no extension: not part of a sample
    std::string key = m.name.substr(0, dot), ext = m.name.substr(dot + 1);
    if (samples.empty() || samples.back().key != key) samples.push_back({key, {}});
    if (!samples.back().fields.emplace(ext, &m).second)
      fail(ErrorCode::kCorruption, "{}: sample \"{}\": field \"{}\" appears twice", label, key,
           ext);
  }
  TarIndex t;
  if (samples.empty())
    fail(ErrorCode::kCorruption, "{}: no samples (no member has a key.field name)", label);
  std::set<std::string> all;  // every field any sample has
  for (const Sample& s : samples)
    for (const auto& [ext, _] : s.fields) all.insert(ext);
  for (const std::string& ext : all) {
    t.fields.push_back(ext);
    t.is_int.push_back(ext == "cls" || ext == "label");
  }
  const size_t nf = t.fields.size();
  for (const Sample& s : samples) {
    uint64_t start = UINT64_MAX, end = 0;
    for (const auto& [_, m] : s.fields) {
      start = std::min(start, m->data);
      end = std::max(end, m->data + m->size);
    }
    if (end - start > UINT32_MAX)
      fail(ErrorCode::kUnsupported, "{}: sample \"{}\" spans {} bytes (at most 4 GiB)", label,
           s.key, end - start);
    t.start.push_back(start);
    t.span.push_back(static_cast<uint32_t>(end - start));
    t.keys.push_back(s.key);
    for (size_t f = 0; f < nf; ++f) {
      auto it = s.fields.find(t.fields[f]);
      t.present.push_back(it != s.fields.end());
      if (it == s.fields.end()) {
        t.offset.push_back(0);
        t.size.push_back(0);
        t.ints.push_back(-1);
        continue;
      }
      const Member& m = *it->second;
      t.offset.push_back(static_cast<uint32_t>(m.data - start));
      t.size.push_back(static_cast<uint32_t>(m.size));
      int64_t value = 0;
      if (t.is_int[f]) {
        std::string text(m.size, '\0');
        read(std::as_writable_bytes(std::span(text)), m.data);
        size_t b = text.find_first_not_of(" \t\r\n"), e = text.find_last_not_of(" \t\r\n");
        auto r = b == std::string::npos
                     ? std::from_chars_result{nullptr, std::errc::invalid_argument}
                     : std::from_chars(text.data() + b, text.data() + e + 1, value);
        if (r.ec != std::errc() || r.ptr != text.data() + e + 1)
          fail(ErrorCode::kCorruption, "{}: sample \"{}\": field \"{}\" is not an integer: \"{}\"",
               label, s.key, t.fields[f], text.substr(0, 40));
      }
      t.ints.push_back(value);
    }
  }
  return t;
}

namespace {

// Cache file: magic, tar size, tar mtime (ns), counts, field names, then the arrays.
template <typename T>
void put(std::string& out, const std::vector<T>& v) {
  uint64_t n = v.size();
  out.append(reinterpret_cast<const char*>(&n), 8);
  out.append(reinterpret_cast<const char*>(v.data()), n * sizeof(T));
}
template <typename T>
bool get(std::string_view& in, std::vector<T>& v) {
  uint64_t n;
  if (in.size() < 8) return false;
  std::memcpy(&n, in.data(), 8);
  in.remove_prefix(8);
  if (n > in.size() / sizeof(T)) return false;
  v.resize(n);
  std::memcpy(v.data(), in.data(), n * sizeof(T));
  in.remove_prefix(n * sizeof(T));
  return true;
}

// What identifies the tar a cache was made from. The change time moves with any write and
// with any mtime set back by hand (utime updates it), which size and mtime alone miss.
struct TarStamp {
  uint64_t size = 0;
  int64_t mtime = 0, ctime = 0;  // ns
  uint64_t ino = 0, dev = 0;
  bool operator==(const TarStamp&) const = default;
};
constexpr size_t kCacheHeader = 8 + sizeof(TarStamp) + 8;  // magic, stamp, payload checksum

// Names one after another, each ended by '\0'.
std::vector<char> joined(const std::vector<std::string>& names) {
  std::vector<char> out;
  for (const auto& n : names) {
    out.insert(out.end(), n.begin(), n.end());
    out.push_back('\0');
  }
  return out;
}
std::vector<std::string> split_names(const std::vector<char>& names) {
  std::vector<std::string> out;
  for (size_t p = 0; p < names.size();) {
    out.emplace_back(names.data() + p, strnlen(names.data() + p, names.size() - p));
    p += out.back().size() + 1;
  }
  return out;
}

std::string encode(const TarIndex& t, const TarStamp& stamp) {
  std::string payload;
  put(payload, joined(t.fields));
  put(payload, t.is_int);
  put(payload, t.start);
  put(payload, t.span);
  put(payload, t.offset);
  put(payload, t.size);
  put(payload, t.ints);
  put(payload, joined(t.keys));
  put(payload, t.present);
  std::string out(kCacheMagic, 8);
  out.append(reinterpret_cast<const char*>(&stamp), sizeof stamp);
  const uint64_t sum = format::checksum64(payload.data(), payload.size());
  out.append(reinterpret_cast<const char*>(&sum), 8);
  return out + payload;
}

// A cache is used only when it was made from this very tar and is whole: anything else (another
// tar, a damaged or cut cache) means a rescan, never an index that lies.
bool decode(std::string_view in, const TarStamp& stamp, TarIndex& t) {
  if (in.size() < kCacheHeader || std::memcmp(in.data(), kCacheMagic, 8) != 0) return false;
  TarStamp cached;
  uint64_t sum;
  std::memcpy(&cached, in.data() + 8, sizeof cached);
  std::memcpy(&sum, in.data() + 8 + sizeof cached, 8);
  in.remove_prefix(kCacheHeader);
  if (!(cached == stamp) || format::checksum64(in.data(), in.size()) != sum) return false;
  std::vector<char> names, keys;
  if (!get(in, names) || !get(in, t.is_int) || !get(in, t.start) || !get(in, t.span) ||
      !get(in, t.offset) || !get(in, t.size) || !get(in, t.ints) || !get(in, keys) ||
      !get(in, t.present) || !in.empty())
    return false;
  t.fields = split_names(names);
  t.keys = split_names(keys);
  const size_t n = t.start.size(), nf = t.fields.size();
  if (!(nf > 0 && t.is_int.size() == nf && t.span.size() == n && t.offset.size() == n * nf &&
        t.size.size() == n * nf && t.ints.size() == n * nf && t.keys.size() == n &&
        t.present.size() == n * nf))
    return false;
  for (size_t i = 0; i < n; ++i)  // every sample inside the tar, as the scan would have it
    if (t.start[i] > stamp.size || t.span[i] > stamp.size - t.start[i]) return false;
  return true;
}

fs::path user_cache_path(const fs::path& tar) {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  fs::path dir = xdg && *xdg ? fs::path(xdg) : fs::path(home ? home : "/tmp") / ".cache";
  size_t h = std::hash<std::string>{}(fs::absolute(tar).string());
  return dir / "sluice" / (tar.filename().string() + "-" + std::to_string(h) + ".sluice-index");
}

bool write_atomically(const fs::path& path, const std::string& bytes) {
  std::error_code ec;
  fs::create_directories(path.parent_path(), ec);
  fs::path tmp = path.string() + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) return false;
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!f) return false;
  }
  fs::rename(tmp, path, ec);
  if (ec) fs::remove(tmp, ec);
  return !ec;
}

}  // namespace

void remap_fields(TarIndex& t, const std::vector<std::string>& fields) {
  if (t.fields == fields) return;
  const size_t n = t.num_samples(), from = t.fields.size(), to = fields.size();
  std::vector<int64_t> at(to, -1);  // each new field's old column
  for (size_t f = 0; f < to; ++f)
    for (size_t g = 0; g < from; ++g)
      if (t.fields[g] == fields[f]) at[f] = static_cast<int64_t>(g);
  TarIndex r;
  r.fields = fields;
  for (const auto& name : fields) r.is_int.push_back(name == "cls" || name == "label");
  r.start = std::move(t.start);
  r.span = std::move(t.span);
  r.keys = std::move(t.keys);
  for (size_t i = 0; i < n; ++i)
    for (size_t f = 0; f < to; ++f) {
      const bool has = at[f] >= 0;
      const size_t k = i * from + static_cast<size_t>(std::max<int64_t>(at[f], 0));
      r.offset.push_back(has ? t.offset[k] : 0);
      r.size.push_back(has ? t.size[k] : 0);
      r.ints.push_back(has ? t.ints[k] : -1);
      r.present.push_back(has ? t.present[k] : 0);
    }
  t = std::move(r);
}

void check_fields(const std::string& label, const TarIndex& t,
                  const std::vector<std::string>& optional) {
  const size_t nf = t.fields.size();
  for (size_t f = 0; f < nf; ++f) {
    if (std::find(optional.begin(), optional.end(), t.fields[f]) != optional.end()) continue;
    for (size_t i = 0; i < t.num_samples(); ++i)
      if (!t.present[i * nf + f])
        fail(ErrorCode::kCorruption,
             "{}: sample \"{}\" has no field \"{}\", which other samples have (if some samples "
             "lack it by design, say so: dataset.fields: {{{}: optional}})",
             label, t.keys[i], t.fields[f], t.fields[f]);
  }
}

fs::path tar_index_cache_path(const fs::path& tar) { return tar.string() + ".sluice-index"; }

TarIndex load_tar_index(const fs::path& tar, int fd, uint64_t size) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) detail::fail_errno(errno, "stat " + tar.string());
  TarStamp stamp;
  stamp.size = size;
  stamp.mtime = int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
  stamp.ctime = int64_t{st.st_ctim.tv_sec} * 1000000000 + st.st_ctim.tv_nsec;
  stamp.ino = st.st_ino;
  stamp.dev = st.st_dev;
  for (const fs::path& cache : {tar_index_cache_path(tar), user_cache_path(tar)}) {
    std::ifstream f(cache, std::ios::binary);
    if (!f) continue;
    std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    TarIndex t;
    if (decode(bytes, stamp, t)) return t;
  }
  TarIndex t = scan_tar(tar.string(), fd, size);
  std::string bytes = encode(t, stamp);
  // Beside the tar only in a directory meant to be written: root writes through a mode without
  // write bits (0555), which says the dataset is read-only all the same.
  const fs::path dir = tar.parent_path().empty() ? fs::path(".") : tar.parent_path();
  struct stat dst {};
  const bool writable = ::stat(dir.c_str(), &dst) == 0 && (dst.st_mode & 0222) != 0 &&
                        ::access(dir.c_str(), W_OK) == 0;
  if (!writable || !write_atomically(tar_index_cache_path(tar), bytes))
    write_atomically(user_cache_path(tar), bytes);  // best effort: a rescan is correct
  return t;
}

}  // namespace sluice::index
