// The S3 source: ListObjectsV2 at open, ranged GETs through libcurl's multi interface.

#include "source/detail/s3.h"
#include "common/errors.h"
#include "source/source.h"

#include <curl/curl.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <thread>

namespace sluice::source {
namespace {

using sluice::detail::fail;
using Clock = std::chrono::steady_clock;

// SHA-256 of the empty payload: real S3 wants x-amz-content-sha256 on every request, and
// curl 7.88 does not add it (it signs it when given, as it signs every header we pass).
constexpr char kContentSha[] =
    "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
constexpr size_t kErrorBodyLimit = 64 << 10;  // an S3 error document is a few hundred bytes
constexpr size_t kListBodyLimit = 64 << 20;   // a page of 1000 keys is a few hundred KiB
constexpr auto kBackoffFirst = std::chrono::milliseconds(50);
constexpr auto kBackoffMax = std::chrono::milliseconds(2000);

[[noreturn]] void fail_errno_code(ErrorCode code, int err, std::string message) {
  throw Error(code, message, err);
}

void global_init() {
  static std::once_flag once;
  std::call_once(once, [] {
    CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (rc != CURLE_OK) fail(ErrorCode::kIo, "curl_global_init: {}", curl_easy_strerror(rc));
  });
}

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

std::string escape(std::string_view s) {
  char* e = curl_easy_escape(nullptr, s.data(), static_cast<int>(s.size()));
  if (!e) throw std::bad_alloc();
  std::string out(e);
  curl_free(e);
  return out;
}

// "a b/c+d" -> "a%20b/c%2Bd": each segment escaped, the slashes kept (S3's canonical URI).
std::string escape_path(std::string_view key) {
  std::string out;
  for (size_t start = 0;;) {
    size_t slash = key.find('/', start);
    out += escape(key.substr(start, slash == std::string_view::npos ? slash : slash - start));
    if (slash == std::string_view::npos) return out;
    out += '/';
    start = slash + 1;
  }
}

struct Config {
  std::string endpoint, region, key_id, secret, token;
  unsigned max_in_flight, retries;
  uint32_t timeout_ms;
};

Config make_config(const SourceOptions& o) {
  Config c;
  c.region = !o.region.empty()                    ? o.region
             : !env("AWS_REGION").empty()         ? env("AWS_REGION")
             : !env("AWS_DEFAULT_REGION").empty() ? env("AWS_DEFAULT_REGION")
                                                  : "us-east-1";
  c.endpoint = !o.endpoint.empty()                   ? o.endpoint
               : !env("AWS_ENDPOINT_URL_S3").empty() ? env("AWS_ENDPOINT_URL_S3")
               : !env("AWS_ENDPOINT_URL").empty()    ? env("AWS_ENDPOINT_URL")
                                                     : "https://s3." + c.region + ".amazonaws.com";
  while (c.endpoint.ends_with('/')) c.endpoint.pop_back();
  // Credentials come as a set: all from the options when a key id is given there, else all
  // from the environment, never a key from one and a token from the other.
  if (!o.access_key_id.empty() || !o.secret_access_key.empty()) {
    c.key_id = o.access_key_id, c.secret = o.secret_access_key, c.token = o.session_token;
  } else {
    c.key_id = env("AWS_ACCESS_KEY_ID"), c.secret = env("AWS_SECRET_ACCESS_KEY");
    c.token = env("AWS_SESSION_TOKEN");
  }
  if (c.key_id.empty() != c.secret.empty())
    fail(ErrorCode::kInvalidArgument,
         "S3 credentials: {} is set but {} is not (set both, or neither for a public bucket)",
         c.key_id.empty() ? "AWS_SECRET_ACCESS_KEY" : "AWS_ACCESS_KEY_ID",
         c.key_id.empty() ? "AWS_ACCESS_KEY_ID" : "AWS_SECRET_ACCESS_KEY");
  c.max_in_flight = std::max(1u, o.max_in_flight);
  c.retries = o.retries;
  c.timeout_ms = std::max<uint32_t>(1, o.timeout_ms);
  return c;
}

struct SlistDeleter {
  void operator()(curl_slist* l) const { curl_slist_free_all(l); }
};
using Slist = std::unique_ptr<curl_slist, SlistDeleter>;

// One request, retried as a whole, and what its current attempt has received.
struct Job {
  enum class Kind {
    kRange,   // Range: bytes=a-b into dest; 206, or 200 when the range is the whole object
    kWhole,   // GET of the whole object into dest, exactly `length` bytes
    kBuffer,  // GET into `buffer` (a listing page)
  };
  Kind kind = Kind::kRange;
  std::string url, what;
  uint64_t offset = 0, length = 0;
  std::byte* dest = nullptr;
  std::string* buffer = nullptr;
  bool whole_object = false;
  Slist headers;
  std::atomic<uint64_t>* bytes_counter = nullptr;

  // The current attempt.
  CURL* easy = nullptr;
  uint64_t got = 0;
  bool overflow = false, wrong_status = false, too_large = false;
  std::string error_body;
  bool has_content_range = false;
  uint64_t range_first = 0, range_last = 0;
  char errbuf[CURL_ERROR_SIZE] = {};

  unsigned attempts = 0;
  Clock::time_point not_before{};

  void reset_attempt() {
    got = 0;
    overflow = wrong_status = too_large = has_content_range = false;
    error_body.clear();
    if (buffer) buffer->clear();
    errbuf[0] = 0;
  }
};

long status_of(CURL* easy) {
  long status = 0;
  curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
  return status;
}

size_t on_write(char* data, size_t size, size_t count, void* user) {
  Job& j = *static_cast<Job*>(user);
  size_t n = size * count;
  long status = status_of(j.easy);
  if (status / 100 != 2) {  // an error document: keep its start for the message
    j.error_body.append(data, std::min(n, kErrorBodyLimit - j.error_body.size()));
    return n;
  }
  if (j.kind == Job::Kind::kBuffer) {
    if (j.buffer->size() + n > kListBodyLimit) {
      j.too_large = true;
      return 0;
    }
    j.buffer->append(data, n);
    return n;
  }
  bool status_ok = j.kind == Job::Kind::kWhole ? status == 200
                                               : status == 206 || (status == 200 && j.whole_object);
  if (!status_ok) {
    j.wrong_status = true;
    return 0;
  }
  if (n > j.length - j.got) {  // never past dest: the body is longer than asked
    j.overflow = true;
    return 0;
  }
  std::memcpy(j.dest + j.got, data, n);
  j.got += n;
  j.bytes_counter->fetch_add(n, std::memory_order_relaxed);
  return n;
}

// Content-Range of a 206: which bytes the server says it sends.
size_t on_header(char* data, size_t size, size_t count, void* user) {
  Job& j = *static_cast<Job*>(user);
  size_t n = size * count;
  std::string_view line(data, n);
  if (line.starts_with("HTTP/")) j.has_content_range = false;  // a new response
  constexpr std::string_view kName = "content-range:";
  if (line.size() > kName.size() && strncasecmp(line.data(), kName.data(), kName.size()) == 0) {
    unsigned long long first = 0, last = 0;
    std::string value(line.substr(kName.size()));
    if (std::sscanf(value.c_str(), " bytes %llu-%llu", &first, &last) == 2) {
      j.has_content_range = true;
      j.range_first = first, j.range_last = last;
    }
  }
  return n;
}

// One thread's connections: a multi handle (its connection cache keeps them alive between
// read() calls) and the easy handles it reuses.
class Worker {
 public:
  explicit Worker(const Config& c) : config_(c), multi_(curl_multi_init()) {
    if (!multi_) throw std::bad_alloc();
    curl_multi_setopt(multi_, CURLMOPT_MAXCONNECTS, static_cast<long>(c.max_in_flight));
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  ~Worker() {
    for (CURL* e : all_) curl_easy_cleanup(e);
    curl_multi_cleanup(multi_);
  }

  CURLM* multi() const { return multi_; }

  CURL* take() {
    if (!free_.empty()) {
      CURL* e = free_.back();
      free_.pop_back();
      return e;
    }
    CURL* e = curl_easy_init();
    if (!e) throw std::bad_alloc();
    all_.push_back(e);
    const Config& c = config_;
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(c.timeout_ms));
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, static_cast<long>(c.timeout_ms));
    // A body that stalls (under 1 byte/s) fails after the timeout's seconds even when the
    // transfer timeout is far off.
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME,
                     std::max(1L, static_cast<long>(c.timeout_ms / 1000)));
    curl_easy_setopt(e, CURLOPT_PATH_AS_IS, 1L);  // keys are paths as they are: no "/../" folding
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 256L << 10);
    if (!c.key_id.empty()) {
      curl_easy_setopt(e, CURLOPT_AWS_SIGV4, ("aws:amz:" + c.region + ":s3").c_str());
      // USERNAME + PASSWORD is CURLOPT_USERPWD "key:secret" without trouble from a ':' inside.
      curl_easy_setopt(e, CURLOPT_USERNAME, c.key_id.c_str());
      curl_easy_setopt(e, CURLOPT_PASSWORD, c.secret.c_str());
    }
    return e;
  }

  void give(CURL* e) {
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, nullptr);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, nullptr);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, nullptr);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, nullptr);
    free_.push_back(e);
  }

 private:
  const Config& config_;
  CURLM* multi_;
  std::vector<CURL*> all_, free_;
};

// Transfers in a worker's multi handle; removes what is left when a run ends early (an
// error), so that nothing writes into a dest after read() returns or throws.
class Active {
 public:
  explicit Active(Worker& w) : w_(w) {}
  Active(const Active&) = delete;
  Active& operator=(const Active&) = delete;
  ~Active() {
    for (CURL* e : easies_) {
      curl_multi_remove_handle(w_.multi(), e);
      w_.give(e);
    }
  }
  size_t size() const { return easies_.size(); }
  void add(CURL* e) {
    easies_.push_back(e);
    if (CURLMcode rc = curl_multi_add_handle(w_.multi(), e); rc != CURLM_OK) {
      easies_.pop_back();
      w_.give(e);
      fail(ErrorCode::kIo, "curl_multi_add_handle: {}", curl_multi_strerror(rc));
    }
  }
  void remove(CURL* e) {
    curl_multi_remove_handle(w_.multi(), e);
    easies_.erase(std::find(easies_.begin(), easies_.end(), e));
    w_.give(e);
  }

 private:
  Worker& w_;
  std::vector<CURL*> easies_;
};

bool retryable(CURLcode rc) {
  switch (rc) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_PARTIAL_FILE:
    case CURLE_GOT_NOTHING:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return true;
    default:
      return false;
  }
}

int errno_of(CURLcode rc) {
  switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
      return ETIMEDOUT;
    case CURLE_COULDNT_CONNECT:
      return ECONNREFUSED;
    case CURLE_COULDNT_RESOLVE_HOST:
      return EHOSTUNREACH;
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_PARTIAL_FILE:
    case CURLE_GOT_NOTHING:
      return ECONNRESET;
    default:
      return EIO;
  }
}

bool retryable(long status, const std::string& code) {
  return status >= 500 || status == 429 || status == 408 || code == "SlowDown" ||
         code == "RequestTimeout" || code == "InternalError" || code == "ServiceUnavailable" ||
         code == "Throttling" || code == "ThrottlingException";
}

Clock::duration backoff(unsigned attempt) {
  static thread_local std::minstd_rand rng(std::random_device{}());
  auto d = kBackoffFirst * (1u << std::min(attempt - 1, 10u));
  auto cap = std::chrono::duration_cast<std::chrono::microseconds>(
      std::min<Clock::duration>(d, kBackoffMax));
  // Equal jitter: half fixed, half random, so that clients throttled together spread out.
  auto half = cap.count() / 2;
  return std::chrono::microseconds(half + std::uniform_int_distribution<int64_t>(0, half)(rng));
}

class S3Source final : public Source {
 public:
  S3Source(const std::string& url, const SourceOptions& options, const detail::S3Tuning& tuning)
      : config_(make_config(options)) {
    global_init();
    std::string_view rest = std::string_view(url).substr(5);  // past "s3://"
    size_t slash = rest.find('/');
    bucket_ = std::string(rest.substr(0, slash));
    if (slash != std::string_view::npos) prefix_ = std::string(rest.substr(slash + 1));
    while (prefix_.ends_with('/')) prefix_.pop_back();
    while (prefix_.starts_with('/')) prefix_.erase(0, 1);
    if (bucket_.empty())
      fail(ErrorCode::kInvalidArgument, "{}: no bucket (expected s3://bucket[/prefix])", url);
    url_ = "s3://" + bucket_ + (prefix_.empty() ? "" : "/" + prefix_);
    list(std::max(1u, tuning.list_page_size));
  }

  const std::string& url() const override { return url_; }
  const std::vector<Object>& objects() const override { return objects_; }

  void read(std::span<const Range> ranges) override {
    std::vector<Job> jobs;
    jobs.reserve(ranges.size());
    for (const Range& r : ranges) {
      check(r);
      if (r.length == 0) continue;
      Job& j = jobs.emplace_back();
      j.kind = Job::Kind::kRange;
      j.url = object_url(r.object);
      j.what = fmt::format("read {} [{}+{}]", name(r.object), r.offset, r.length);
      j.offset = r.offset, j.length = r.length, j.dest = r.dest;
      j.whole_object = r.offset == 0 && r.length == objects_[r.object].size;
      j.headers = headers(fmt::format("Range: bytes={}-{}", r.offset, r.offset + r.length - 1),
                          objects_[r.object].version);
    }
    run(jobs);
  }

  std::vector<std::byte> get(uint32_t object) override {
    if (object >= objects_.size())
      fail(ErrorCode::kInvalidArgument, "{}: no object {} (has {})", url_, object, objects_.size());
    std::vector<std::byte> out(objects_[object].size);
    std::vector<Job> jobs(1);
    Job& j = jobs[0];
    j.kind = Job::Kind::kWhole;
    j.url = object_url(object);
    j.what = fmt::format("get {}", name(object));
    j.length = out.size(), j.dest = out.data();
    j.headers = headers({}, objects_[object].version);
    run(jobs);
    return out;
  }

  uint64_t bytes_read() const override { return bytes_read_.load(); }
  uint64_t requests() const override { return requests_.load(); }
  uint64_t retries() const override { return retries_.load(); }

 private:
  // "s3://bucket/prefix/key": what a user finds in the console.
  std::string name(uint32_t object) const override {
    return fmt::format("s3://{}/{}", bucket_, full_key(object));
  }
  std::string full_key(uint32_t object) const {
    if (objects_[object].key.empty()) return prefix_;  // the prefix is the object
    return prefix_.empty() ? objects_[object].key : prefix_ + "/" + objects_[object].key;
  }
  std::string object_url(uint32_t object) const {
    return fmt::format("{}/{}/{}", config_.endpoint, escape(bucket_),
                       escape_path(full_key(object)));
  }

  // `etag`: the listed version; a read of an object rewritten since fails (412) rather than
  // mixing two versions' bytes.
  Slist headers(const std::string& extra, const std::string& etag = {}) const {
    curl_slist* l = curl_slist_append(nullptr, kContentSha);
    if (l && !config_.token.empty())
      l = curl_slist_append(l, ("x-amz-security-token: " + config_.token).c_str());
    if (l && !extra.empty()) l = curl_slist_append(l, extra.c_str());
    if (l && !etag.empty()) l = curl_slist_append(l, ("If-Match: " + etag).c_str());
    if (!l) throw std::bad_alloc();
    return Slist(l);
  }

  void list(unsigned page_size) {
    list_under(prefix_.empty() ? "" : prefix_ + "/", page_size);
    if (objects_.empty() && !prefix_.empty()) {
      // s3://bucket/train.bin: the prefix names one object (a token file, an .npy): its key is "".
      list_under(prefix_, page_size, true);
    }
    std::sort(objects_.begin(), objects_.end(),
              [](const Object& a, const Object& b) { return a.key < b.key; });
    if (objects_.empty())
      fail_errno_code(
          ErrorCode::kNotFound, ENOENT,
          fmt::format("{}: no objects under this prefix (at {})", url_, config_.endpoint));
  }

  // Lists the keys under `list_prefix`, keeping them relative to it; `exact`: only the key that
  // is the prefix itself, kept as "".
  void list_under(const std::string& list_prefix, unsigned page_size, bool exact = false) {
    std::string token;
    for (unsigned page = 1;; ++page) {
      std::string body;
      std::vector<Job> jobs(1);
      Job& j = jobs[0];
      j.kind = Job::Kind::kBuffer;
      j.buffer = &body;
      // SigV4 signs the query as sent, so it goes out canonical: sorted, each value escaped.
      std::string query;
      if (!token.empty()) query += "continuation-token=" + escape(token) + "&";
      query += fmt::format("encoding-type=url&list-type=2&max-keys={}", page_size);
      if (!list_prefix.empty()) query += "&prefix=" + escape(list_prefix);
      j.url = fmt::format("{}/{}?{}", config_.endpoint, escape(bucket_), query);
      j.what =
          page == 1 ? fmt::format("list {}", url_) : fmt::format("list {} (page {})", url_, page);
      j.headers = headers({});
      run(jobs);

      auto parsed = parse_list_page(body);
      if (!parsed)
        fail_errno_code(ErrorCode::kIo, EPROTO,
                        fmt::format("{}: bad ListObjectsV2 response from {}: {}", j.what,
                                    config_.endpoint, parsed.error()));
      for (Object& o : parsed->objects) {
        if (!o.key.starts_with(list_prefix))
          fail_errno_code(
              ErrorCode::kIo, EPROTO,
              fmt::format("{}: the server listed \"{}\", outside the prefix", j.what, o.key));
        o.key.erase(0, list_prefix.size());
        if (exact) {
          if (o.key.empty()) objects_.push_back(std::move(o));
          continue;
        }
        if (o.key.empty() || o.key.ends_with('/')) continue;  // a console's "folder" marker
        objects_.push_back(std::move(o));
      }
      if (!parsed->truncated || (exact && !objects_.empty())) break;
      if (parsed->next_token == token)
        fail_errno_code(
            ErrorCode::kIo, EPROTO,
            fmt::format("{}: the server repeats continuation token \"{}\"", j.what, token));
      token = std::move(parsed->next_token);
    }
  }

  class Lease {
   public:
    explicit Lease(S3Source& s) : s_(s) {
      {
        std::lock_guard lock(s.pool_mu_);
        if (!s.pool_.empty()) {
          w_ = std::move(s.pool_.back());
          s.pool_.pop_back();
        }
      }
      if (!w_) w_ = std::make_unique<Worker>(s.config_);
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() {
      std::lock_guard lock(s_.pool_mu_);
      s_.pool_.push_back(std::move(w_));
    }
    Worker& operator*() { return *w_; }

   private:
    S3Source& s_;
    std::unique_ptr<Worker> w_;
  };

  void start(Active& active, Worker& w, Job& j) {
    j.reset_attempt();
    ++j.attempts;
    j.easy = w.take();
    j.bytes_counter = &bytes_read_;
    curl_easy_setopt(j.easy, CURLOPT_URL, j.url.c_str());
    curl_easy_setopt(j.easy, CURLOPT_HTTPHEADER, j.headers.get());
    curl_easy_setopt(j.easy, CURLOPT_WRITEDATA, &j);
    curl_easy_setopt(j.easy, CURLOPT_HEADERDATA, &j);
    curl_easy_setopt(j.easy, CURLOPT_PRIVATE, &j);
    curl_easy_setopt(j.easy, CURLOPT_ERRORBUFFER, j.errbuf);
    active.add(j.easy);
    requests_.fetch_add(1, std::memory_order_relaxed);
  }

  // What one finished attempt means: done (true), retry (false), or an Error thrown.
  bool judge(Job& j, CURLcode rc, long status, std::string& cause, int& err) {
    if (j.overflow)
      fail(ErrorCode::kCorruption, "{}: the body is longer than asked (object changed?)", j.what);
    if (j.wrong_status)
      fail_errno_code(ErrorCode::kIo, EPROTO,
                      fmt::format("{}: HTTP {} to a {} GET (does the server ignore Range?)", j.what,
                                  status, j.kind == Job::Kind::kRange ? "ranged" : "plain"));
    if (j.too_large)
      fail_errno_code(ErrorCode::kIo, EPROTO,
                      fmt::format("{}: response longer than {} bytes", j.what, kListBodyLimit));
    if (rc == CURLE_OK && status / 100 == 2) {
      if (j.kind == Job::Kind::kBuffer) return true;
      if (j.got != j.length)
        fail(ErrorCode::kCorruption,
             "{}: {} bytes received where {} were asked (object changed or truncated?)", j.what,
             j.got, j.length);
      if (status == 206 && j.has_content_range &&
          (j.range_first != j.offset || j.range_last != j.offset + j.length - 1))
        fail(ErrorCode::kCorruption, "{}: the server sent bytes {}-{} (object changed?)", j.what,
             j.range_first, j.range_last);
      return true;
    }
    if (rc == CURLE_OK) {  // an HTTP error
      detail::S3ErrorBody e = detail::parse_error_body(j.error_body);
      cause = fmt::format("HTTP {}", status);
      if (!e.code.empty()) cause += " " + e.code;
      if (!e.message.empty()) cause += fmt::format(" ({})", e.message);
      err = EIO;
      if (retryable(status, e.code)) return false;
      if (status == 404 || e.code == "NoSuchKey" || e.code == "NoSuchBucket")
        fail_errno_code(ErrorCode::kNotFound, ENOENT, fmt::format("{}: {}", j.what, cause));
      if (status == 403)
        fail_errno_code(
            ErrorCode::kIo, EACCES,
            fmt::format("{}: access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): {}",
                        j.what, cause));
      if (status == 416)
        fail(ErrorCode::kCorruption, "{}: {} (object changed or truncated?)", j.what, cause);
      if (status == 412)
        fail(ErrorCode::kCorruption,
             "{}: the object changed at the source since it was listed ({}); open the dataset "
             "again to read the new version",
             j.what, cause);
      fail_errno_code(ErrorCode::kIo, EIO,
                      fmt::format("{}: {} from {}", j.what, cause, config_.endpoint));
    }
    cause = curl_easy_strerror(rc);
    if (j.errbuf[0]) cause += fmt::format(" ({})", j.errbuf);
    err = errno_of(rc);
    if (retryable(rc)) return false;
    fail_errno_code(ErrorCode::kIo, err, fmt::format("{}: {}", j.what, cause));
  }

  // Runs every job to success, or throws the first failure with nothing left in flight.
  void run(std::vector<Job>& jobs) {
    if (jobs.empty()) return;
    Lease lease(*this);
    Worker& w = *lease;
    Active active(w);
    std::deque<Job*> ready;
    for (Job& j : jobs) ready.push_back(&j);
    std::vector<Job*> waiting;  // backing off before their next attempt
    while (!ready.empty() || !waiting.empty() || active.size() > 0) {
      auto now = Clock::now();
      for (auto it = waiting.begin(); it != waiting.end();) {
        if ((*it)->not_before <= now) {
          ready.push_back(*it);
          it = waiting.erase(it);
        } else {
          ++it;
        }
      }
      while (active.size() < config_.max_in_flight && !ready.empty()) {
        start(active, w, *ready.front());
        ready.pop_front();
      }
      int running = 0;
      if (CURLMcode rc = curl_multi_perform(w.multi(), &running); rc != CURLM_OK)
        fail(ErrorCode::kIo, "curl_multi_perform: {}", curl_multi_strerror(rc));
      int queued = 0;
      while (CURLMsg* m = curl_multi_info_read(w.multi(), &queued)) {
        if (m->msg != CURLMSG_DONE) continue;
        CURL* e = m->easy_handle;
        CURLcode rc = m->data.result;
        Job* j = nullptr;
        curl_easy_getinfo(e, CURLINFO_PRIVATE, &j);
        long status = status_of(e);
        active.remove(e);
        std::string cause;
        int err = 0;
        if (judge(*j, rc, status, cause, err)) continue;
        if (j->attempts > config_.retries)
          fail_errno_code(ErrorCode::kIo, err,
                          fmt::format("{}: failed after {} attempt{}; last: {}", j->what,
                                      j->attempts, j->attempts == 1 ? "" : "s", cause));
        retries_.fetch_add(1, std::memory_order_relaxed);
        j->not_before = Clock::now() + backoff(j->attempts);
        waiting.push_back(j);
      }
      // Sleep until a socket is ready, curl's own timer fires, or a backoff ends.
      auto wait = std::chrono::milliseconds(active.size() > 0 ? 1000 : 0);
      if (!waiting.empty() && ready.empty()) {
        auto next = std::min_element(waiting.begin(), waiting.end(),
                                     [](Job* a, Job* b) { return a->not_before < b->not_before; });
        auto until =
            std::chrono::ceil<std::chrono::milliseconds>((*next)->not_before - Clock::now());
        wait = active.size() > 0 ? std::min(wait, until) : until;
      }
      if (wait.count() > 0) {
        if (active.size() > 0)
          curl_multi_poll(w.multi(), nullptr, 0, static_cast<int>(wait.count()), nullptr);
        else
          std::this_thread::sleep_for(wait);
      }
    }
  }

  Config config_;
  std::string bucket_, prefix_, url_;
  std::vector<Object> objects_;
  std::mutex pool_mu_;
  std::vector<std::unique_ptr<Worker>> pool_;
  std::atomic<uint64_t> bytes_read_{0}, requests_{0}, retries_{0};
};

}  // namespace

std::unique_ptr<Source> detail::open_s3(const std::string& url, const SourceOptions& options,
                                        const S3Tuning& tuning) {
  return std::make_unique<S3Source>(url, options, tuning);
}

}  // namespace sluice::source
