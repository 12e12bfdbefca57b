#include "embed/journal.h"

#include "common/errors.h"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstring>
#include <vector>

namespace sluice::embed {

namespace {

constexpr uint32_t kMagic = 0x314a4553;  // "SEJ1"

struct Header {
  uint32_t magic = kMagic;
  uint32_t count = 0;    // ids in the record
  uint64_t seq = 0;      // the record's number since the journal was last emptied
  uint64_t payload = 0;  // XXH3 of ids then rows, seeded with seq
  uint64_t self = 0;     // XXH3 of the fields above
};
static_assert(sizeof(Header) == 32);

uint64_t header_sum(const Header& h) { return XXH3_64bits(&h, offsetof(Header, self)); }

}  // namespace

Journal::Journal(const std::filesystem::path& file)
    : path_(file), fd_(detail::open_file(file, O_RDWR | O_CREAT | O_APPEND)) {
  bytes_ = detail::file_size(fd_.get(), path_.string());
}

void Journal::append(std::span<const int64_t> ids, std::span<const std::byte> rows) {
  Header h;
  h.count = static_cast<uint32_t>(ids.size());
  h.seq = seq_;
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset_withSeed(state, h.seq);
  XXH3_64bits_update(state, ids.data(), ids.size_bytes());
  XXH3_64bits_update(state, rows.data(), rows.size());
  h.payload = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  h.self = header_sum(h);
  iovec iov[3] = {{&h, sizeof h},
                  {const_cast<int64_t*>(ids.data()), ids.size_bytes()},
                  {const_cast<std::byte*>(rows.data()), rows.size()}};
  const size_t total = sizeof h + ids.size_bytes() + rows.size();
  // Only this writer appends (the table's write lock), so the record's pieces follow each
  // other; a crash between them leaves a tail whose checksum fails.
  size_t done = 0;
  while (done < total) {
    size_t skip = done;
    int first = 0;
    while (skip >= iov[first].iov_len) skip -= iov[first++].iov_len;
    iovec rest[3];
    int count = 0;
    for (int i = first; i < 3; ++i, ++count) rest[count] = iov[i];
    rest[0].iov_base = static_cast<char*>(rest[0].iov_base) + skip;
    rest[0].iov_len -= skip;
    ssize_t n = ::writev(fd_.get(), rest, count);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : ENOSPC;
      // Cut the partial record off again, so the next one follows a whole record.
      if (::ftruncate(fd_.get(), static_cast<off_t>(bytes_)) != 0)
        detail::fail_errno(errno, "truncate " + path_.string() + " after a failed append");
      detail::fail_errno(err, "append to " + path_.string());
    }
    done += static_cast<size_t>(n);
  }
  bytes_ += total;
  ++seq_;
}

void Journal::sync() { detail::fsync_or_throw(fd_.get(), path_.string()); }

void Journal::clear() {
  if (::ftruncate(fd_.get(), 0) != 0) detail::fail_errno(errno, "truncate " + path_.string());
  bytes_ = 0;
  seq_ = 0;
}

uint64_t Journal::replay(
    const std::filesystem::path& file, size_t row_bytes,
    const std::function<void(std::span<const int64_t>, std::span<const std::byte>)>& apply) {
  detail::UniqueFd fd = detail::open_file(file, O_RDONLY);
  const uint64_t size = detail::file_size(fd.get(), file.string());
  uint64_t at = 0, records = 0;
  std::vector<int64_t> ids;
  std::vector<std::byte> rows;
  while (at + sizeof(Header) <= size) {
    Header h;
    detail::pread_full(fd.get(), std::as_writable_bytes(std::span(&h, 1)), at, file.string());
    if (h.magic != kMagic || h.seq != records || h.self != header_sum(h)) break;
    const uint64_t payload = h.count * (sizeof(int64_t) + row_bytes);
    if (at + sizeof h + payload > size) break;  // cut off by a crash
    ids.resize(h.count);
    rows.resize(h.count * row_bytes);
    detail::pread_full(fd.get(), std::as_writable_bytes(std::span(ids)), at + sizeof h,
                       file.string());
    detail::pread_full(fd.get(), rows, at + sizeof h + ids.size() * sizeof(int64_t), file.string());
    XXH3_state_t* state = XXH3_createState();
    XXH3_64bits_reset_withSeed(state, h.seq);
    XXH3_64bits_update(state, ids.data(), ids.size() * sizeof(int64_t));
    XXH3_64bits_update(state, rows.data(), rows.size());
    const uint64_t sum = XXH3_64bits_digest(state);
    XXH3_freeState(state);
    if (sum != h.payload) break;
    apply(ids, rows);
    at += sizeof h + payload;
    ++records;
  }
  return records;
}

}  // namespace sluice::embed
