// The source subsystem against real components: moto's S3 server (as a process), a fake HTTP
// server for the faults moto cannot make (throttling, resets, stalls, 403, wrong bodies), and a
// directory on the local file system.

#include "source/source.h"
#include "source/detail/s3.h"
#include "test_util.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

namespace sluice::source {
namespace {

using sluice::testing::TempDir;
using namespace std::chrono_literals;

std::vector<std::byte> bytes_of(std::string_view s) {
  auto p = reinterpret_cast<const std::byte*>(s.data());
  return {p, p + s.size()};
}

// Deterministic object content.
std::string content(size_t n, unsigned seed) {
  std::string s(n, '\0');
  uint32_t x = seed * 2654435761u + 1;
  for (auto& c : s) {
    x = x * 1664525u + 1013904223u;
    c = static_cast<char>(x >> 24);
  }
  return s;
}

template <typename F>
Error expect_error(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "no error thrown";
  return Error(ErrorCode::kInvalidArgument, "none");
}

// ---------------------------------------------------------------------------------------------
// SigV4, computed here independently of curl (OpenSSL HMAC), to check what the source sends.

std::string hex(const unsigned char* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) out += {d[p[i] >> 4], d[p[i] & 15]};
  return out;
}

std::string sha256_hex(std::string_view s) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  EVP_Digest(s.data(), s.size(), md, &len, EVP_sha256(), nullptr);
  return hex(md, len);
}

std::string hmac(std::string_view key, std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(data.data()), data.size(), md, &len);
  return std::string(reinterpret_cast<char*>(md), len);
}

struct SigV4Request {
  std::string method, path, query;             // path and query as sent (already escaped)
  std::map<std::string, std::string> headers;  // lower-case names -> values
  std::vector<std::string> signed_headers;     // lower-case, sorted
};

std::string sigv4_signature(const SigV4Request& r, std::string_view secret, std::string_view region,
                            std::string_view service = "s3") {
  // Canonical query: parameters sorted (they are escaped already).
  std::vector<std::string> params;
  for (size_t start = 0; start < r.query.size();) {
    size_t amp = r.query.find('&', start);
    if (amp == std::string::npos) amp = r.query.size();
    params.push_back(r.query.substr(start, amp - start));
    start = amp + 1;
  }
  std::sort(params.begin(), params.end());
  std::string query;
  for (auto& p : params) query += (query.empty() ? "" : "&") + p;
  std::string canonical = r.method + "\n" + r.path + "\n" + query + "\n";
  std::string names;
  for (auto& h : r.signed_headers) {
    canonical += h + ":" + r.headers.at(h) + "\n";
    names += (names.empty() ? "" : ";") + h;
  }
  canonical += "\n" + names + "\n" + r.headers.at("x-amz-content-sha256");
  std::string date = r.headers.at("x-amz-date");
  std::string scope =
      date.substr(0, 8) + "/" + std::string(region) + "/" + std::string(service) + "/aws4_request";
  std::string to_sign = "AWS4-HMAC-SHA256\n" + date + "\n" + scope + "\n" + sha256_hex(canonical);
  std::string k = hmac("AWS4" + std::string(secret), date.substr(0, 8));
  k = hmac(k, region);
  k = hmac(k, service);
  k = hmac(k, "aws4_request");
  std::string sig = hmac(k, to_sign);
  return hex(reinterpret_cast<const unsigned char*>(sig.data()), sig.size());
}

// The signer above reproduces AWS's documented example ("Example: GET Object", S3 API
// reference, sig-v4-header-based-auth): the first 10 bytes of examplebucket/test.txt.
TEST(SigV4Test, ReproducesAwsGetObjectExample) {
  SigV4Request r;
  r.method = "GET";
  r.path = "/test.txt";
  r.headers = {
      {"host", "examplebucket.s3.amazonaws.com"},
      {"range", "bytes=0-9"},
      {"x-amz-content-sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      {"x-amz-date", "20130524T000000Z"}};
  r.signed_headers = {"host", "range", "x-amz-content-sha256", "x-amz-date"};
  EXPECT_EQ(sigv4_signature(r, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1"),
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41");
}

// ---------------------------------------------------------------------------------------------
// A fake HTTP server: a thread per connection, a handler per request.

struct Request {
  std::string method, target;
  std::map<std::string, std::string> headers;  // lower-case names
};

// A header's value, "" when absent (handlers run on server threads: no exceptions there).
std::string header(const Request& r, const std::string& name) {
  auto it = r.headers.find(name);
  return it == r.headers.end() ? "" : it->second;
}

bool send_all(int fd, std::string_view s) {
  while (!s.empty()) {
    ssize_t n = ::send(fd, s.data(), s.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    s.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

std::string response(int status, const std::string& body, const std::string& extra = {},
                     size_t content_length = std::string::npos) {
  if (content_length == std::string::npos) content_length = body.size();
  return fmt::format("HTTP/1.1 {} X\r\nContent-Length: {}\r\n{}\r\n{}", status, content_length,
                     extra, body);
}

std::string error_xml(const std::string& code, const std::string& message) {
  return "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>" + code + "</Code><Message>" +
         message + "</Message><RequestId>1</RequestId></Error>";
}

class FakeServer {
 public:
  // Writes the response to fd; false closes the connection.
  using Handler = std::function<bool(const Request&, int fd)>;

  explicit FakeServer(Handler h) : handler_(std::move(h)) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::listen(listen_fd_, 64) != 0 ||
        ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0)
      throw std::runtime_error("fake server: bind/listen failed");
    port_ = ntohs(a.sin_port);
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  FakeServer(const FakeServer&) = delete;
  FakeServer& operator=(const FakeServer&) = delete;
  ~FakeServer() {
    stop_ = true;
    ::shutdown(listen_fd_, SHUT_RDWR);
    acceptor_.join();
    {
      std::lock_guard lock(mu_);
      for (int fd : conns_) ::shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : threads_) t.join();
    ::close(listen_fd_);
  }

  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }
  std::vector<Request> requests() const {
    std::lock_guard lock(mu_);
    return requests_;
  }
  int connections() const { return connections_.load(); }

  // For handlers that stall: waits until the client closes or the server stops, 15 s at most
  // (so that a client without timeouts fails the test instead of hanging it).
  void wait_until_closed(int fd) const {
    char buf[256];
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
    while (!stop_ && std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 50) > 0 && ::recv(fd, buf, sizeof buf, 0) <= 0) return;
    }
  }

 private:
  void accept_loop() {
    while (!stop_) {
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (stop_) return;
        continue;
      }
      ++connections_;
      std::lock_guard lock(mu_);
      conns_.push_back(fd);
      threads_.emplace_back([this, fd] { serve(fd); });
    }
  }

  void serve(int fd) {
    std::string buf;
    char chunk[4096];
    for (;;) {
      size_t end;
      while ((end = buf.find("\r\n\r\n")) == std::string::npos) {
        ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
        if (n <= 0) return;  // closed (fd stays open until the destructor: no reuse races)
        buf.append(chunk, static_cast<size_t>(n));
      }
      Request r;
      std::string head = buf.substr(0, end);
      buf.erase(0, end + 4);
      size_t eol = head.find("\r\n");
      std::string line = head.substr(0, eol);
      size_t sp1 = line.find(' '), sp2 = line.rfind(' ');
      r.method = line.substr(0, sp1);
      r.target = line.substr(sp1 + 1, sp2 - sp1 - 1);
      while (eol != std::string::npos) {
        size_t next = head.find("\r\n", eol + 2);
        std::string h = head.substr(eol + 2, next == std::string::npos ? next : next - eol - 2);
        eol = next;
        size_t colon = h.find(':');
        if (colon == std::string::npos) continue;
        std::string name = h.substr(0, colon);
        std::transform(name.begin(), name.end(), name.begin(), ::tolower);
        size_t v = h.find_first_not_of(' ', colon + 1);
        r.headers[name] = v == std::string::npos ? "" : h.substr(v);
      }
      {
        std::lock_guard lock(mu_);
        requests_.push_back(r);
      }
      if (!handler_(r, fd)) {
        ::shutdown(fd, SHUT_RDWR);  // closed in the destructor: no reuse of the number meanwhile
        return;
      }
    }
  }

  Handler handler_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  mutable std::mutex mu_;
  std::vector<int> conns_;
  std::vector<std::thread> threads_;
  std::vector<Request> requests_;
  std::thread acceptor_;
};

// S3 on the fake server: bucket "bkt" with the given objects, ranged GETs as S3 answers them,
// and a `fault` that may take over the n-th object GET (1-based).
class FakeS3 {
 public:
  using Fault = std::function<bool(const Request&, int fd, int n, bool& handled)>;

  explicit FakeS3(std::map<std::string, std::string> objects, Fault fault = {})
      : objects_(std::move(objects)),
        fault_(std::move(fault)),
        server_([this](const Request& r, int fd) { return handle(r, fd); }) {}

  std::string endpoint() const { return server_.endpoint(); }
  FakeServer& server() { return server_; }
  int gets() const { return gets_.load(); }

  SourceOptions options() const {
    SourceOptions o;
    o.endpoint = endpoint();
    o.region = "us-west-2";
    o.access_key_id = "AKIDTEST";
    o.secret_access_key = "secret/with+chars";
    o.timeout_ms = 5000;
    return o;
  }

 private:
  bool handle(const Request& r, int fd) {
    if (r.target.starts_with("/bkt?")) {
      std::string xml =
          "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult "
          "xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>bkt</Name>";
      for (auto& [k, v] : objects_)
        xml += fmt::format("<Contents><Key>{}</Key><Size>{}</Size></Contents>", k, v.size());
      xml += "<IsTruncated>false</IsTruncated></ListBucketResult>";
      return send_all(fd, response(200, xml));
    }
    int n = ++gets_;
    if (fault_) {
      bool handled = false;
      bool keep = fault_(r, fd, n, handled);
      if (handled) return keep;
    }
    auto it = objects_.find(r.target.substr(5));  // past "/bkt/"
    if (it == objects_.end())
      return send_all(fd,
                      response(404, error_xml("NoSuchKey", "The specified key does not exist.")));
    unsigned long long first = 0, last = 0;
    auto range = r.headers.find("range");
    if (range == r.headers.end()) return send_all(fd, response(200, it->second));
    if (std::sscanf(range->second.c_str(), "bytes=%llu-%llu", &first, &last) != 2) return false;
    std::string body = it->second.substr(first, last - first + 1);
    return send_all(fd, response(206, body,
                                 fmt::format("Content-Range: bytes {}-{}/{}\r\n", first, last,
                                             it->second.size())));
  }

  std::map<std::string, std::string> objects_;
  Fault fault_;
  std::atomic<int> gets_{0};
  FakeServer server_;
};

// The body of `key` [first, last] as S3 would send it, through `fd`: headers, then `send`
// bytes of the body (all when npos).
void send_partial(int fd, const std::string& data, size_t first, size_t last, size_t send) {
  std::string body = data.substr(first, last - first + 1);
  std::string head = fmt::format(
      "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\n\r\n",
      body.size(), first, last, data.size());
  send_all(fd, head + body.substr(0, std::min(send, body.size())));
}

// Waits until the peer's kernel has acknowledged every byte sent on `fd` (the send queue is
// empty): what was sent has arrived, whatever the peer's thread is doing.
void wait_delivered(int fd) {
  const auto until = std::chrono::steady_clock::now() + 10s;
  int queued = 0;
  while (::ioctl(fd, SIOCOUTQ, &queued) == 0 && queued > 0 &&
         std::chrono::steady_clock::now() < until)
    std::this_thread::yield();
  EXPECT_EQ(queued, 0) << "the client never received the first bytes";
}

void reset_connection(int fd) {
  linger l{1, 0};  // close with RST
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  ::shutdown(fd, SHUT_RDWR);
}

const std::string kObj = content(1000, 7);

TEST(FakeS3Test, SignsEveryRequestWithSigV4) {
  FakeS3 s3({{"dir/obj", kObj}});
  auto options = s3.options();
  options.session_token = "TOKEN123";
  auto src = detail::open_s3("s3://bkt/dir", options, {});
  ASSERT_EQ(src->objects().size(), 1u);
  EXPECT_EQ(src->objects()[0].key, "obj");
  std::vector<std::byte> buf(100);
  Range r{0, 100, 100, buf.data()};
  src->read({&r, 1});
  EXPECT_EQ(buf, bytes_of(std::string_view(kObj).substr(100, 100)));

  auto requests = s3.server().requests();
  ASSERT_EQ(requests.size(), 2u);  // the listing, then the GET
  for (const Request& req : requests) {
    SCOPED_TRACE(req.target);
    std::string auth = header(req, "authorization");
    std::string date = header(req, "x-amz-date");
    ASSERT_EQ(date.size(), 16u);
    std::string prefix = "AWS4-HMAC-SHA256 Credential=AKIDTEST/" + date.substr(0, 8) +
                         "/us-west-2/s3/aws4_request, SignedHeaders=";
    ASSERT_TRUE(auth.starts_with(prefix)) << auth;
    size_t sig_at = auth.find(", Signature=");
    ASSERT_NE(sig_at, std::string::npos);
    std::string signed_list = auth.substr(prefix.size(), sig_at - prefix.size());
    EXPECT_EQ(header(req, "x-amz-content-sha256"),
              "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    EXPECT_EQ(header(req, "x-amz-security-token"), "TOKEN123");
    SigV4Request sr;
    sr.method = req.method;
    size_t q = req.target.find('?');
    sr.path = req.target.substr(0, q);
    sr.query = q == std::string::npos ? "" : req.target.substr(q + 1);
    sr.headers = req.headers;
    for (size_t start = 0; start <= signed_list.size();) {
      size_t semi = signed_list.find(';', start);
      if (semi == std::string::npos) semi = signed_list.size();
      sr.signed_headers.push_back(signed_list.substr(start, semi - start));
      start = semi + 1;
    }
    for (const char* h : {"host", "x-amz-content-sha256", "x-amz-date", "x-amz-security-token"})
      EXPECT_NE(std::find(sr.signed_headers.begin(), sr.signed_headers.end(), h),
                sr.signed_headers.end())
          << h << " not signed: " << signed_list;
    EXPECT_EQ(auth.substr(sig_at + 12), sigv4_signature(sr, "secret/with+chars", "us-west-2"));
  }
  EXPECT_EQ(requests[0].method, "GET");
  EXPECT_EQ(requests[0].target, "/bkt?encoding-type=url&list-type=2&max-keys=1000&prefix=dir%2F");
  EXPECT_EQ(requests[1].target, "/bkt/dir/obj");
  EXPECT_EQ(header(requests[1], "range"), "bytes=100-199");
  EXPECT_NE(header(requests[1], "authorization").find("SignedHeaders=host;range;"),
            std::string::npos);
}

TEST(FakeS3Test, RetriesSlowDownThenSucceeds) {
  FakeS3 s3({{"obj", kObj}}, [](const Request&, int fd, int n, bool& handled) {
    if (n > 2) return true;
    handled = true;
    return send_all(fd, response(503, error_xml("SlowDown", "Please reduce your request rate.")));
  });
  auto src = detail::open_s3("s3://bkt", s3.options(), {});
  std::vector<std::byte> buf(kObj.size());
  Range r{0, 0, kObj.size(), buf.data()};
  src->read({&r, 1});
  EXPECT_EQ(buf, bytes_of(kObj));
  EXPECT_EQ(src->retries(), 2u);
  EXPECT_EQ(src->requests(), 4u);  // list + 3 GETs
  EXPECT_EQ(src->bytes_read(), kObj.size());
  EXPECT_EQ(s3.gets(), 3);
}

TEST(FakeS3Test, RetriesAConnectionResetMidBody) {
  FakeS3 s3({{"obj", kObj}}, [](const Request& r, int fd, int n, bool& handled) {
    if (n != 1) return true;
    handled = true;
    EXPECT_EQ(header(r, "range"), "bytes=10-509");
    send_partial(fd, kObj, 10, 509, 200);
    wait_delivered(fd);  // the first bytes have arrived
    reset_connection(fd);
    return false;
  });
  auto src = detail::open_s3("s3://bkt", s3.options(), {});
  std::vector<std::byte> buf(500);
  Range r{0, 10, 500, buf.data()};
  src->read({&r, 1});
  EXPECT_EQ(buf, bytes_of(std::string_view(kObj).substr(10, 500)));
  EXPECT_EQ(src->retries(), 1u);
  EXPECT_EQ(s3.gets(), 2);
}

TEST(FakeS3Test, AccessDeniedIsClearAndNotRetried) {
  FakeS3 s3({{"obj", kObj}}, [](const Request&, int fd, int, bool& handled) {
    handled = true;
    return send_all(fd, response(403, error_xml("AccessDenied", "Access Denied")));
  });
  auto src = detail::open_s3("s3://bkt", s3.options(), {});
  std::vector<std::byte> buf(10);
  Range r{0, 0, 10, buf.data()};
  Error e = expect_error([&] { src->read({&r, 1}); });
  EXPECT_EQ(e.code(), ErrorCode::kIo);
  EXPECT_EQ(e.sys_errno(), EACCES);
  std::string what = e.what();
  EXPECT_NE(what.find("s3://bkt/obj [0+10]"), std::string::npos) << what;
  EXPECT_NE(what.find("access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"),
            std::string::npos)
      << what;
  EXPECT_NE(what.find("AccessDenied"), std::string::npos) << what;
  EXPECT_EQ(src->retries(), 0u);
  EXPECT_EQ(s3.gets(), 1);
}

TEST(FakeS3Test, StalledBodyTimesOutAfterTheRetries) {
  FakeServer* server = nullptr;
  FakeS3 s3({{"obj", kObj}}, [&](const Request&, int fd, int, bool& handled) {
    handled = true;
    send_partial(fd, kObj, 0, 99, 10);
    server->wait_until_closed(fd);
    return false;
  });
  server = &s3.server();
  auto options = s3.options();
  options.timeout_ms = 1000;
  options.retries = 1;
  auto src = detail::open_s3("s3://bkt", options, {});
  std::vector<std::byte> buf(100);
  Range r{0, 0, 100, buf.data()};
  auto start = std::chrono::steady_clock::now();
  Error e = expect_error([&] { src->read({&r, 1}); });
  auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(e.code(), ErrorCode::kIo);
  EXPECT_EQ(e.sys_errno(), ETIMEDOUT) << e.what();
  std::string what = e.what();
  EXPECT_NE(what.find("s3://bkt/obj [0+100]: failed after 2 attempts; last: Timeout"),
            std::string::npos)
      << what;
  EXPECT_EQ(s3.gets(), 2);
  EXPECT_LT(took, 20s);  // a bound, not a timing: two 1 s attempts must not hang
}

TEST(FakeS3Test, BodyLongerThanTheRangeIsCorruption) {
  FakeS3 s3({{"obj", kObj}}, [](const Request&, int fd, int, bool& handled) {
    handled = true;
    return send_all(fd, response(206, kObj.substr(0, 60), "Content-Range: bytes 0-49/1000\r\n"));
  });
  auto src = detail::open_s3("s3://bkt", s3.options(), {});
  std::vector<std::byte> buf(50 + 16, std::byte{0x5a});
  Range r{0, 0, 50, buf.data()};
  Error e = expect_error([&] { src->read({&r, 1}); });
  EXPECT_EQ(e.code(), ErrorCode::kCorruption) << e.what();
  EXPECT_NE(std::string(e.what()).find("s3://bkt/obj [0+50]: the body is longer than asked"),
            std::string::npos)
      << e.what();
  for (size_t i = 50; i < buf.size(); ++i) ASSERT_EQ(buf[i], std::byte{0x5a}) << i;  // no overflow
}

TEST(FakeS3Test, BodyShorterThanTheRangeIsCorruption) {
  FakeS3 s3({{"obj", kObj}}, [](const Request&, int fd, int, bool& handled) {
    handled = true;
    return send_all(fd, response(206, kObj.substr(0, 40), "Content-Range: bytes 0-39/1000\r\n"));
  });
  auto src = detail::open_s3("s3://bkt", s3.options(), {});
  std::vector<std::byte> buf(50);
  Range r{0, 0, 50, buf.data()};
  Error e = expect_error([&] { src->read({&r, 1}); });
  EXPECT_EQ(e.code(), ErrorCode::kCorruption) << e.what();
  EXPECT_NE(std::string(e.what()).find("40 bytes received where 50 were asked"), std::string::npos)
      << e.what();
}

TEST(FakeS3Test, WholeObjectToARangedGetIsAnError) {
  FakeS3 s3({{"obj", kObj}}, [](const Request&, int fd, int, bool& handled) {
    handled = true;
    return send_all(fd, response(200, kObj));
  });
  auto src = detail::open_s3("s3://bkt", s3.options(), {});
  std::vector<std::byte> buf(50);
  Range r{0, 0, 50, buf.data()};
  Error e = expect_error([&] { src->read({&r, 1}); });
  EXPECT_EQ(e.code(), ErrorCode::kIo) << e.what();
  EXPECT_NE(std::string(e.what()).find("does the server ignore Range?"), std::string::npos);
  // ...but a 200 is right when the range is the whole object.
  std::vector<std::byte> all(kObj.size());
  Range whole{0, 0, kObj.size(), all.data()};
  src->read({&whole, 1});
  EXPECT_EQ(all, bytes_of(kObj));
}

TEST(FakeS3Test, ManyRangesReuseConnections) {
  FakeS3 s3({{"a", content(5000, 1)}, {"b", content(7000, 2)}});
  auto options = s3.options();
  options.max_in_flight = 4;
  auto src = detail::open_s3("s3://bkt", options, {});
  for (int round = 0; round < 3; ++round) {
    std::vector<std::vector<std::byte>> bufs(40, std::vector<std::byte>(100));
    std::vector<Range> ranges;
    for (uint32_t i = 0; i < 40; ++i) ranges.push_back({i % 2, i * 100u, 100, bufs[i].data()});
    src->read(ranges);
    for (uint32_t i = 0; i < 40; ++i)
      ASSERT_EQ(
          bufs[i],
          bytes_of(
              std::string_view(content(i % 2 ? 7000 : 5000, i % 2 + 1)).substr(i * 100u, 100)));
  }
  // 3 rounds x 40 ranges over at most 4 connections (plus the listing's), kept between calls.
  EXPECT_LE(s3.server().connections(), 5);
  EXPECT_EQ(src->requests(), 121u);
}

// ---------------------------------------------------------------------------------------------
// moto's S3 server, one process for the suite.

std::string moto_path() {
  if (const char* env = std::getenv("SLUICE_MOTO_SERVER"); env && *env) return env;
#ifdef SLUICE_MOTO_SERVER_DEFAULT
  return SLUICE_MOTO_SERVER_DEFAULT;
#else
  return "";
#endif
}

size_t discard(char*, size_t size, size_t n, void*) { return size * n; }

// A plain request; the HTTP status, 0 when none. Signed, as moto answers an unsigned DELETE
// with 403 (it does not check the signature itself).
long http(const std::string& method, const std::string& url, const std::string& body = {}) {
  CURL* c = curl_easy_init();
  curl_easy_setopt(c, CURLOPT_URL, url.c_str());
  curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method.c_str());
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 10000L);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_AWS_SIGV4, "aws:amz:us-east-1:s3");
  curl_easy_setopt(c, CURLOPT_USERPWD, "testing:testing");
  // Not curl's default form type, which moto (werkzeug) parses as a form and drops.
  curl_slist* headers = curl_slist_append(nullptr, "Content-Type: application/octet-stream");
  if (method == "PUT") curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
  if (method == "PUT") {
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body.data());
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
  }
  long status = 0;
  if (curl_easy_perform(c) == CURLE_OK) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(c);
  curl_slist_free_all(headers);
  return status;
}

class MotoTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string moto = moto_path();
    if (moto.empty() || ::access(moto.c_str(), X_OK) != 0) return;
    std::string addr = sluice::testing::free_loopback_address();
    std::string port = addr.substr(addr.find(':') + 1);
    log_ = (std::filesystem::temp_directory_path() / ("sluice-moto-" + port + ".log")).string();
    std::vector<std::string> args = {moto, "-H", "127.0.0.1", "-p", port};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ == 0) {  // only async-signal-safe calls until exec
      // Dies with the test, even one that crashes before TearDownTestSuite.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      ::setpgid(0, 0);  // its own group, killed whole
      int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd >= 0) ::dup2(fd, 1), ::dup2(fd, 2);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    if (pid_ < 0) {
      failure_ = "fork: " + std::string(strerror(errno));
      return;
    }
    endpoint_ = "http://" + addr;
    auto deadline = std::chrono::steady_clock::now() + 60s;
    while (http("GET", endpoint_ + "/") == 0) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        failure_ = "moto_server exited at start (log: " + log_ + ")";
        return;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        failure_ = "moto_server did not answer within 60 s (log: " + log_ + ")";
        return;
      }
      std::this_thread::sleep_for(100ms);
    }
    ::setenv("AWS_ENDPOINT_URL", endpoint_.c_str(), 1);
    ::unsetenv("AWS_ENDPOINT_URL_S3");
    ::setenv("AWS_REGION", "us-east-1", 1);
    ::setenv("AWS_ACCESS_KEY_ID", "testing", 1);
    ::setenv("AWS_SECRET_ACCESS_KEY", "testing", 1);
    ::unsetenv("AWS_SESSION_TOKEN");
  }

  static void TearDownTestSuite() {
    if (pid_ <= 0) return;
    ::kill(-pid_, SIGTERM);
    for (int i = 0; i < 100; ++i) {
      if (::waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(50ms);
    }
    if (pid_ > 0) {
      ::kill(-pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
    std::filesystem::remove(log_);
  }

  void SetUp() override {
    if (pid_ <= 0 && failure_.empty())
      GTEST_SKIP() << "moto_server not found (scripts/test.sh installs it)";
    ASSERT_TRUE(failure_.empty()) << failure_;
  }

  static void make_bucket(const std::string& bucket) {
    ASSERT_EQ(http("PUT", endpoint_ + "/" + bucket), 200);
  }
  static void put(const std::string& bucket, const std::string& escaped_key,
                  const std::string& data) {
    ASSERT_EQ(http("PUT", endpoint_ + "/" + bucket + "/" + escaped_key, data), 200) << escaped_key;
  }

  static inline pid_t pid_ = -1;
  static inline std::string endpoint_, log_, failure_;
};

TEST_F(MotoTest, ListsPagesStripsThePrefixAndReadsRanges) {
  make_bucket("list-b");
  std::map<std::string, std::string> want;  // relative key -> content
  for (unsigned i = 0; i < 25; ++i) {
    std::string key = fmt::format("f{:03}.bin", i);
    want[key] = content(300 + i * 37, i);
    put("list-b", "data/set1/" + key, want[key]);
  }
  want["sub/deep/x.bin"] = content(5000, 99);
  put("list-b", "data/set1/sub/deep/x.bin", want["sub/deep/x.bin"]);
  want["we ird+key \xc3\xa9.bin"] = content(64, 5);  // a space, a plus, UTF-8: escaped right
  put("list-b", "data/set1/we%20ird%2Bkey%20%C3%A9.bin", want["we ird+key \xc3\xa9.bin"]);
  want["empty"] = "";
  put("list-b", "data/set1/empty", "");
  put("list-b", "data/set10/not-mine", "x");  // shares the prefix string, not the folder
  put("list-b", "data/other.bin", "y");

  detail::S3Tuning tuning;
  tuning.list_page_size = 7;
  auto src = detail::open_s3("s3://list-b/data/set1/", {}, tuning);
  EXPECT_EQ(src->url(), "s3://list-b/data/set1");
  ASSERT_EQ(src->objects().size(), want.size());
  size_t i = 0;
  for (auto& [key, data] : want) {
    EXPECT_EQ(src->objects()[i].key, key);
    EXPECT_EQ(src->objects()[i].size, data.size());
    ++i;
  }
  EXPECT_EQ(src->requests(), 4u);  // 28 keys in pages of 7
  EXPECT_EQ(src->find("sub/deep/x.bin"), std::optional<uint32_t>(want.size() - 2));
  EXPECT_EQ(src->find("nope"), std::nullopt);

  // Many ranges at once, across objects, and from several threads at once.
  auto read_all = [&](unsigned seed) {
    std::vector<std::vector<std::byte>> bufs;
    std::vector<Range> ranges;
    std::vector<std::string> expect;
    uint32_t n = static_cast<uint32_t>(src->objects().size());
    for (uint32_t k = 0; k < 120; ++k) {
      uint32_t obj = (k * 7 + seed) % n;
      uint64_t size = src->objects()[obj].size;
      if (size == 0) continue;
      uint64_t off = (k * 131 + seed) % size;
      uint64_t len = std::min<uint64_t>(size - off, 1 + (k * 17) % 200);
      bufs.emplace_back(len);
      expect.push_back(want[src->objects()[obj].key].substr(off, len));
      ranges.push_back({obj, off, len, nullptr});
    }
    for (size_t k = 0; k < ranges.size(); ++k) ranges[k].dest = bufs[k].data();
    src->read(ranges);
    for (size_t k = 0; k < ranges.size(); ++k) ASSERT_EQ(bufs[k], bytes_of(expect[k])) << k;
  };
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < 3; ++t)
    threads.emplace_back([&, t] {
      try {
        read_all(t);
      } catch (const std::exception& e) {
        ADD_FAILURE() << e.what();
      }
    });
  for (auto& t : threads) t.join();
  read_all(3);

  auto weird = src->find("we ird+key \xc3\xa9.bin");
  ASSERT_TRUE(weird);
  EXPECT_EQ(src->get(*weird), bytes_of(want["we ird+key \xc3\xa9.bin"]));
  EXPECT_EQ(src->get(src->find("empty").value()), std::vector<std::byte>{});
  EXPECT_EQ(src->get(src->find("sub/deep/x.bin").value()), bytes_of(want["sub/deep/x.bin"]));
  EXPECT_EQ(src->retries(), 0u);
}

TEST_F(MotoTest, MissingKeyAndMissingBucketAreNotFound) {
  make_bucket("nf-b");
  put("nf-b", "p/a", content(100, 1));
  put("nf-b", "p/gone", content(100, 2));
  auto src = open_store("s3://nf-b/p");
  ASSERT_EQ(http("DELETE", endpoint_ + "/nf-b/p/gone"), 204);
  std::vector<std::byte> buf(10);
  Range r{src->find("gone").value(), 5, 10, buf.data()};
  Error e = expect_error([&] { src->read({&r, 1}); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  EXPECT_NE(std::string(e.what()).find("read s3://nf-b/p/gone [5+10]: HTTP 404 NoSuchKey"),
            std::string::npos)
      << e.what();
  EXPECT_EQ(src->retries(), 0u);

  Error b = expect_error([] { open_store("s3://no-such-bucket-here/x"); });
  EXPECT_EQ(b.code(), ErrorCode::kNotFound);
  EXPECT_NE(std::string(b.what()).find("list s3://no-such-bucket-here/x: HTTP 404 NoSuchBucket"),
            std::string::npos)
      << b.what();

  Error empty = expect_error([] { open_store("s3://nf-b/nothing/here"); });
  EXPECT_EQ(empty.code(), ErrorCode::kNotFound);
  EXPECT_NE(std::string(empty.what()).find("s3://nf-b/nothing/here: no objects"), std::string::npos)
      << empty.what();

  Error range = expect_error([&] {
    Range past{src->find("a").value(), 95, 10, buf.data()};
    src->read({&past, 1});
  });
  EXPECT_EQ(range.code(), ErrorCode::kInvalidArgument) << range.what();
}

// ---------------------------------------------------------------------------------------------
// A directory.

TEST(DirSourceTest, ListsRecursivelyAndReads) {
  TempDir dir;
  std::filesystem::create_directories(dir / "sub/deeper");
  std::map<std::string, std::string> want = {{"a.bin", content(4000, 1)},
                                             {"sub/b.bin", content(10, 2)},
                                             {"sub/deeper/c.bin", content(70000, 3)},
                                             {"z", ""}};
  for (auto& [k, v] : want) std::ofstream(dir / k, std::ios::binary) << v;
  ::mkfifo((dir / "fifo").c_str(), 0644);  // not a regular file: not listed
  SourceOptions options;
  options.max_in_flight = 4;
  auto src = open_store(dir.path().string(), options);
  EXPECT_FALSE(is_remote(dir.path().string()));
  EXPECT_TRUE(is_remote("s3://b/p"));
  ASSERT_EQ(src->objects().size(), want.size());
  size_t i = 0;
  for (auto& [k, v] : want) {
    EXPECT_EQ(src->objects()[i].key, k);
    EXPECT_EQ(src->objects()[i].size, v.size());
    ++i;
  }
  std::vector<std::vector<std::byte>> bufs;
  std::vector<Range> ranges;
  for (uint32_t k = 0; k < 50; ++k) {
    uint32_t obj = k % 3;
    uint64_t size = src->objects()[obj].size;
    uint64_t off = (k * 977) % size, len = std::min<uint64_t>(size - off, 1 + k * 13);
    bufs.emplace_back(len);
    ranges.push_back({obj, off, len, bufs.back().data()});
  }
  src->read(ranges);
  for (size_t k = 0; k < ranges.size(); ++k)
    ASSERT_EQ(bufs[k], bytes_of(std::string_view(want[src->objects()[ranges[k].object].key])
                                    .substr(ranges[k].offset, ranges[k].length)));
  EXPECT_EQ(src->get(src->find("sub/b.bin").value()), bytes_of(want["sub/b.bin"]));
  EXPECT_EQ(src->get(src->find("z").value()), std::vector<std::byte>{});

  // A file cut short after the listing.
  std::filesystem::resize_file(dir / "sub/deeper/c.bin", 100);
  std::vector<std::byte> buf(50);
  Range r{src->find("sub/deeper/c.bin").value(), 80, 50, buf.data()};
  Error e = expect_error([&] { src->read({&r, 1}); });
  EXPECT_EQ(e.code(), ErrorCode::kCorruption);
  EXPECT_NE(std::string(e.what()).find("sub/deeper/c.bin [80+50]: unexpected end of file"),
            std::string::npos)
      << e.what();
  Error g = expect_error([&] { src->get(src->find("sub/deeper/c.bin").value()); });
  EXPECT_EQ(g.code(), ErrorCode::kCorruption) << g.what();
}

TEST(DirSourceTest, MissingAndEmptyDirectoriesAreNotFound) {
  TempDir dir;
  Error missing = expect_error([&] { open_store((dir / "nope").string()); });
  EXPECT_EQ(missing.code(), ErrorCode::kNotFound);
  EXPECT_NE(std::string(missing.what()).find("nope"), std::string::npos);
  Error empty = expect_error([&] { open_store(dir.path().string()); });
  EXPECT_EQ(empty.code(), ErrorCode::kNotFound);
}

// ---------------------------------------------------------------------------------------------
// The ListObjectsV2 parser.

TEST(ParseListPageTest, GoodPage) {
  auto page = parse_list_page(R"(<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>
  <EncodingType>url</EncodingType>
  <IsTruncated>false</IsTruncated>
  <Contents><Key>p/a%20b+c%2Bd</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified>
    <ETag>"x"</ETag><Size>123</Size><StorageClass>STANDARD</StorageClass></Contents>
  <Contents><Key>p/e%C3%A9</Key><Size> 18446744073709551615 </Size></Contents>
</ListBucketResult>)");
  ASSERT_TRUE(page.ok()) << page.error();
  ASSERT_EQ(page->objects.size(), 2u);
  EXPECT_EQ(page->objects[0].key, "p/a b c+d");
  EXPECT_EQ(page->objects[0].size, 123u);
  EXPECT_EQ(page->objects[1].key, "p/e\xc3\xa9");
  EXPECT_EQ(page->objects[1].size, UINT64_MAX);
  EXPECT_EQ(page->objects[0].version, "\"x\"");  // the ETag, sent back as If-Match
  EXPECT_EQ(page->objects[1].version, "");
  EXPECT_FALSE(page->truncated);

  auto plain = parse_list_page(
      "<ListBucketResult><Contents><Key>a+b&amp;c</Key><Size>0</Size></Contents>"
      "</ListBucketResult>");
  ASSERT_TRUE(plain.ok()) << plain.error();
  EXPECT_EQ(plain->objects[0].key, "a+b&c");  // no EncodingType: taken as is
}

TEST(ParseListPageTest, TruncatedPage) {
  auto page = parse_list_page(
      "<ListBucketResult><IsTruncated>true</IsTruncated>"
      "<NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>"
      "<Contents><Key>k</Key><Size>1</Size></Contents></ListBucketResult>");
  ASSERT_TRUE(page.ok()) << page.error();
  EXPECT_TRUE(page->truncated);
  EXPECT_EQ(page->next_token, "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=");
  auto no_token =
      parse_list_page("<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>");
  ASSERT_FALSE(no_token.ok());
  EXPECT_NE(no_token.error().find("NextContinuationToken"), std::string::npos);
}

TEST(ParseListPageTest, BadPagesFailSayingWhy) {
  struct Case {
    const char* xml;
    const char* why;
  } cases[] = {
      {"<ListBucketResult><Contents><Key>k</Key>", "not XML"},
      {"", "not XML"},
      {"<Error><Code>AccessDenied</Code></Error>", "got <Error> AccessDenied"},
      {"<ListBucketResult><Contents><Size>1</Size></Contents></ListBucketResult>", "no <Key>"},
      {"<ListBucketResult><Contents><Key>k</Key></Contents></ListBucketResult>", "no <Size>"},
      {"<ListBucketResult><Contents><Key>k</Key><Size>12x</Size></Contents></ListBucketResult>",
       "not a byte count"},
      {"<ListBucketResult><Contents><Key>k</Key><Size>1</Size><ETag>\"a\r\nX-Evil: 1\"</ETag>"
       "</Contents></ListBucketResult>",
       "not printable ASCII"},
      {"<ListBucketResult><Contents><Key>k</Key><Size>-1</Size></Contents></ListBucketResult>",
       "not a byte count"},
      {"<ListBucketResult><Contents><Key>k</Key><Size>18446744073709551616</Size></Contents>"
       "</ListBucketResult>",
       "not a byte count"},
      {"<ListBucketResult><EncodingType>url</EncodingType><Contents><Key>k%4</Key><Size>1</Size>"
       "</Contents></ListBucketResult>",
       "bad %-escape"},
      {"<ListBucketResult><IsTruncated>maybe</IsTruncated></ListBucketResult>", "maybe"},
  };
  for (const Case& c : cases) {
    auto page = parse_list_page(c.xml);
    ASSERT_FALSE(page.ok()) << c.xml;
    EXPECT_NE(page.error().find(c.why), std::string::npos) << c.xml << " -> " << page.error();
  }
}

TEST(ParseErrorBodyTest, CodeAndMessage) {
  auto e = detail::parse_error_body(error_xml("SlowDown", "Please reduce your request rate."));
  EXPECT_EQ(e.code, "SlowDown");
  EXPECT_EQ(e.message, "Please reduce your request rate.");
  EXPECT_EQ(detail::parse_error_body("<html>503</html>").code, "");
  EXPECT_EQ(detail::parse_error_body("garbage").code, "");
}

}  // namespace
}  // namespace sluice::source
