// The cache disk given up (full, failing): the loader's engines read the source instead.

#include "cache/sample_cache.h"

#include "common/errors.h"
#include "common/log.h"

#include <deque>
#include <optional>

namespace sluice::cache {

namespace fs = std::filesystem;

void SampleCache::read_source(std::span<SourceRead> reads) {
  const auto& objects = source_->objects();
  const fs::path data = mirror_.dir / "data";
  std::vector<source::Range> ranges;
  std::vector<size_t> which;
  for (size_t i = 0; i < reads.size(); ++i) {
    SourceRead& r = reads[i];
    // The descriptor's path names the object: the mirror holds each at its key.
    std::error_code ec;
    fs::path p = fs::read_symlink(fmt::format("/proc/self/fd/{}", r.fd), ec);
    std::optional<uint32_t> object;
    if (!ec && objects.size() == 1 && objects[0].key.empty() && p == mirror_.path)
      object = 0;
    else if (!ec)
      object = source_->find(p.lexically_relative(data).generic_string());
    if (!object) {
      detail::log_line(
          fmt::format("cache: [internal] {}:{}: descriptor {} ({}) is not a mirror "
                      "file of {}",
                      __FILE__, __LINE__, r.fd, p.string(), source_->url()));
      r.result = -EIO;
      continue;
    }
    const uint64_t size = objects[*object].size;
    const uint64_t length = r.offset >= size ? 0 : std::min<uint64_t>(r.length, size - r.offset);
    r.result = static_cast<int32_t>(length);
    if (length == 0) continue;
    ranges.push_back({*object, r.offset, length, r.dest});
    which.push_back(i);
  }
  try {
    source_->read(ranges);
  } catch (const Error& e) {
    detail::log_line(fmt::format("cache: {}", e.what()));
    for (size_t i : which) reads[i].result = -(e.sys_errno() ? e.sys_errno() : EIO);
  }
}

namespace {
// See SampleCache::layer. Reads given up on the disk are answered at the next flush or reap,
// all of one batch in one Source::read (many ranged reads in flight).
class FallbackEngine final : public io::Engine {
 public:
  FallbackEngine(std::unique_ptr<io::Engine> inner, SampleCache& cache, std::vector<int> files)
      : inner_(std::move(inner)), cache_(cache), files_(std::move(files)) {}

  std::string describe() const override { return inner_->describe(); }
  uint32_t queue_depth() const override { return inner_->queue_depth(); }
  bool register_buffer(std::span<std::byte> b) override { return inner_->register_buffer(b); }

  int submit(const io::Request& r) override {
    if (cache_.disk_given_up()) {
      pending_.push_back(r);
      return 0;
    }
    int rc = inner_->submit(r);
    if (rc == 0) sent_.emplace(r.tag, r);
    return rc;
  }
  int flush() override {
    serve();
    return inner_->flush();
  }
  int reap(std::span<io::Completion> out, std::chrono::milliseconds timeout) override {
    serve();
    size_t n = 0;
    if (!sent_.empty()) {
      int got = inner_->reap(out, ready_.empty() ? timeout : std::chrono::milliseconds(0));
      if (got < 0) return got;
      for (int i = 0; i < got; ++i) {
        auto it = sent_.find(out[i].tag);
        if (it == sent_.end()) {  // not ours to judge
          out[n++] = out[i];
          continue;
        }
        io::Request r = it->second;
        sent_.erase(it);
        const int32_t rc = out[i].result;
        if (rc < 0 && rc != -EAGAIN && rc != -EINTR && rc != -ECANCELED) {
          cache_.give_up_disk(
              fmt::format("a read of the cache failed: {}", detail::errno_text(-rc)));
          pending_.push_back(r);
          continue;
        }
        out[n++] = out[i];
      }
      serve();
    }
    while (n < out.size() && !ready_.empty()) {
      out[n++] = ready_.front();
      ready_.pop_front();
    }
    return static_cast<int>(n);
  }

 private:
  void serve() {
    if (pending_.empty()) return;
    std::vector<SampleCache::SourceRead> reads;
    for (const io::Request& r : pending_)
      reads.push_back({r.fd >= 0 ? r.fd : files_.at(r.file), r.offset, r.length, r.dest});
    cache_.read_source(reads);
    for (size_t i = 0; i < reads.size(); ++i) ready_.push_back({pending_[i].tag, reads[i].result});
    pending_.clear();
  }

  std::unique_ptr<io::Engine> inner_;
  SampleCache& cache_;
  std::vector<int> files_;
  std::unordered_map<uint64_t, io::Request> sent_;  // to the disk, not yet completed
  std::vector<io::Request> pending_;                // for the source
  std::deque<io::Completion> ready_;
};
}  // namespace

std::unique_ptr<io::Engine> SampleCache::layer(std::unique_ptr<io::Engine> engine,
                                               std::vector<int> files) {
  return std::make_unique<FallbackEngine>(std::move(engine), *this, std::move(files));
}

}  // namespace sluice::cache
