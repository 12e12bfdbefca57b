#include "net/handshake.h"

#include "common/errors.h"

#include <fmt/format.h>

#include <cstring>

namespace sluice::net {

using detail::fail;

namespace {

template <typename T>
T load(std::span<const std::byte> bytes) {
  T t;
  std::memcpy(&t, bytes.data(), sizeof t);
  return t;
}

template <typename T>
std::span<const std::byte> bytes_of_value(const T& t) {
  return std::as_bytes(std::span<const T>(&t, 1));
}

std::span<const uint8_t> key_bytes(const std::string& token) {
  return {reinterpret_cast<const uint8_t*>(token.data()), token.size()};
}

}  // namespace

HelloParse parse_client_hello(std::span<const std::byte> received) {
  HelloParse r;
  auto bad = [&](std::string why) {
    r.state = HelloParse::kBad;
    r.error = std::move(why);
    return r;
  };
  if (received.size() >= 4) {
    uint32_t magic = load<uint32_t>(received);
    if (magic != kClientHelloMagic)
      return bad(fmt::format("not a sluice client (hello magic {:#010x})", magic));
  }
  if (received.size() >= 6) {
    uint16_t version = load<uint16_t>(received.subspan(4));
    if (version != kHandshakeVersion)
      return bad(
          fmt::format("handshake version {}, this server speaks {}", version, kHandshakeVersion));
  }
  if (received.size() < sizeof(ClientHello)) return r;
  r.hello = load<ClientHello>(received);
  const uint32_t n = r.hello.address_bytes;
  if (n == 0 || n > kMaxWorkerAddress)
    return bad(fmt::format("worker address of {} bytes (1 to {} allowed)", n, kMaxWorkerAddress));
  const size_t total = sizeof(ClientHello) + n;
  if (received.size() < total) return r;
  if (received.size() > total)
    return bad(fmt::format("{} bytes after the hello, before the server's answer",
                           received.size() - total));
  r.address = received.subspan(sizeof(ClientHello), n);
  r.state = HelloParse::kComplete;
  return r;
}

Result<ServerHello> parse_server_hello(std::span<const std::byte> bytes) {
  if (bytes.size() != sizeof(ServerHello)) {
    return failure(fmt::format("server hello of {} bytes", bytes.size()));
  }
  auto h = load<ServerHello>(bytes);
  if (h.magic != kServerHelloMagic) {
    return failure(fmt::format("not a sluice shard server (hello magic {:#010x})", h.magic));
  }
  if (h.version != kHandshakeVersion) {
    return failure(fmt::format("the server speaks handshake version {}, this client {}", h.version,
                               kHandshakeVersion));
  }
  if ((h.flags & ~kServerOpen) != 0) {
    return failure(fmt::format("server hello flags {:#x} unknown", h.flags));
  }
  return h;
}

Result<Accept> parse_accept(std::span<const std::byte> bytes) {
  if (bytes.size() != sizeof(Accept)) {
    return failure(fmt::format("server answer of {} bytes", bytes.size()));
  }
  auto a = load<Accept>(bytes);
  if (a.magic != kAcceptMagic || a.version != kHandshakeVersion) {
    return failure(fmt::format("answer magic {:#010x} version {}: not a sluice shard server",
                               a.magic, a.version));
  }
  if (a.status > AcceptStatus::kRefused) {
    return failure(fmt::format("answer status {} unknown", static_cast<unsigned>(a.status)));
  }
  const uint32_t limit = a.status == AcceptStatus::kOk ? kMaxWorkerAddress : kMaxRefusalText;
  if ((a.status == AcceptStatus::kOk && a.data_bytes == 0) || a.data_bytes > limit) {
    return failure(fmt::format("answer of {} bytes (at most {})", a.data_bytes, limit));
  }
  return a;
}

Digest client_proof(const Mac& token, const Nonce& server, const Nonce& client,
                    std::span<const std::byte> client_address) {
  return token.compute(
      {bytes_of("sluice client proof v1"), bytes_of(server), bytes_of(client), client_address});
}

Digest server_proof(const Mac& token, const Nonce& server, const Nonce& client, uint64_t conn,
                    std::span<const std::byte> client_address,
                    std::span<const std::byte> server_address) {
  return token.compute({bytes_of("sluice server proof v1"), bytes_of(server), bytes_of(client),
                        bytes_of_value(conn), client_address, server_address});
}

Digest session_key(const Mac& token, const Nonce& server, const Nonce& client, uint64_t conn) {
  return token.compute({bytes_of("sluice session key v1"), bytes_of(server), bytes_of(client),
                        bytes_of_value(conn)});
}

Session client_handshake(detail::UniqueFd control, const std::string& token,
                         std::span<const std::byte> worker_address, Clock::time_point deadline,
                         const std::atomic<bool>* cancel) {
  const int fd = control.get();
  ServerHello sh;
  read_exact(fd, std::as_writable_bytes(std::span(&sh, 1)), deadline, "handshake: server hello",
             cancel);
  if (auto checked = parse_server_hello(bytes_of_value(sh)); !checked)
    fail(ErrorCode::kIo, "handshake: {}", checked.error());
  const bool open = sh.flags & kServerOpen;
  if (open && !token.empty())
    fail(ErrorCode::kConfig,
         "the server runs without a token (--no-token) but this client has one; refusing a "
         "server that cannot prove the token");
  Mac token_mac(key_bytes(token));
  ClientHello ch;
  random_bytes(ch.nonce);
  ch.address_bytes = static_cast<uint32_t>(worker_address.size());
  ch.proof = client_proof(token_mac, sh.nonce, ch.nonce, worker_address);
  std::vector<std::byte> out(sizeof ch + worker_address.size());
  std::memcpy(out.data(), &ch, sizeof ch);
  std::memcpy(out.data() + sizeof ch, worker_address.data(), worker_address.size());
  write_all(fd, out, deadline, "handshake: client hello", cancel);
  Accept a;
  read_exact(fd, std::as_writable_bytes(std::span(&a, 1)), deadline, "handshake: server answer",
             cancel);
  if (auto checked = parse_accept(bytes_of_value(a)); !checked)
    fail(ErrorCode::kIo, "handshake: {}", checked.error());
  std::vector<std::byte> data(a.data_bytes);
  read_exact(fd, data, deadline, "handshake: server answer", cancel);
  if (a.status != AcceptStatus::kOk) {
    std::string why(reinterpret_cast<const char*>(data.data()), data.size());
    if (a.status == AcceptStatus::kUnauthorized)
      fail(ErrorCode::kConfig, "unauthorized: {}{}", why,
           token.empty() ? " (this client has no token: set distributed.token, "
                           "distributed.token_file or $SLUICE_TOKEN)"
                         : "");
    fail(ErrorCode::kIo, "refused: {}", why);
  }
  Digest want = server_proof(token_mac, sh.nonce, ch.nonce, a.conn, worker_address, data);
  if (!equal_constant_time(want, a.proof))
    fail(ErrorCode::kConfig, "the server did not prove the token: it runs with another one");
  Session s;
  s.control = std::move(control);
  s.conn = a.conn;
  s.key = session_key(token_mac, sh.nonce, ch.nonce, a.conn);
  s.server_address = std::move(data);
  return s;
}

}  // namespace sluice::net
