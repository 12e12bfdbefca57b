#pragma once

// The shard server's front door: an ordinary TCP connection on which a client proves that it
// holds the cluster's token before the two sides exchange UCX worker addresses. Nothing a peer
// sends reaches UCX (or any parser beyond these fixed, bounded messages) before that proof.
//
//   client                                  server
//   connect ------------------------------> accept (limits: connections, handshakes, deadline)
//           <------------------------------ ServerHello: fresh 32-byte nonce Ns
//   ClientHello: nonce Nc, address_bytes,
//     proof = HMAC(token, "client" Ns Nc A_c),
//     then A_c (its UCX worker address) --> checks the proof (constant time), or refuses
//           <------------------------------ Accept: conn id, proof = HMAC(token, "server" Ns Nc
//                                             conn A_c A_s), then A_s (its worker address)
//   checks the server's proof; UCX endpoints both ways on A_s / A_c (the data path: RDMA, TCP
//   or shared memory, as UCX picks). The TCP connection stays open: closing it ends the session.
//
// Each request on the data path then carries the conn id and a MAC under the session key
// HMAC(token, "session" Ns Nc conn), which never crosses the wire. A recorded handshake does not
// verify against the next nonce, so it cannot be replayed; a request's MAC binds it to its
// connection, and replies go only to that connection's endpoint. The token authenticates; it
// does not encrypt: the records themselves cross the fabric in clear (docs/cluster.md).
//
// All fields little-endian. parse_* check every byte before anything trusts it.

#include "common/result.h"
#include "net/crypto.h"
#include "net/tcp.h"

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace sluice::net {

inline constexpr uint32_t kServerHelloMagic = 0x31484c53;  // "SLH1"
inline constexpr uint32_t kClientHelloMagic = 0x31434c53;  // "SLC1"
inline constexpr uint32_t kAcceptMagic = 0x31414c53;       // "SLA1"
inline constexpr uint16_t kHandshakeVersion = 1;
// A UCX worker address is a few hundred bytes (215 with shared memory and TCP on two
// interfaces); this leaves room for many NICs and nothing more.
inline constexpr uint32_t kMaxWorkerAddress = 16 << 10;
inline constexpr uint32_t kMaxRefusalText = 512;
inline constexpr uint16_t kServerOpen = 1;  // ServerHello::flags: this server runs without a token

struct ServerHello {
  uint32_t magic = kServerHelloMagic;
  uint16_t version = kHandshakeVersion;
  uint16_t flags = 0;  // kServerOpen
  Nonce nonce{};
};
static_assert(sizeof(ServerHello) == 40);

struct ClientHello {
  uint32_t magic = kClientHelloMagic;
  uint16_t version = kHandshakeVersion;
  uint16_t reserved = 0;
  uint32_t address_bytes = 0;  // the client's worker address, right after this header
  uint32_t reserved2 = 0;
  Nonce nonce{};
  Digest proof{};
};
static_assert(sizeof(ClientHello) == 80);

enum class AcceptStatus : uint16_t {
  kOk = 0,
  kUnauthorized = 1,  // the proof did not verify: another token
  kRefused = 2,       // a malformed hello, another version, a worker address UCX refused
};

struct Accept {
  uint32_t magic = kAcceptMagic;
  uint16_t version = kHandshakeVersion;
  AcceptStatus status = AcceptStatus::kOk;
  uint32_t data_bytes = 0;  // kOk: the server's worker address; else the reason, as text
  uint32_t reserved = 0;
  uint64_t conn = 0;  // the id every request names
  Digest proof{};
};
static_assert(sizeof(Accept) == 56);

/// What the bytes a server has received so far on a connection make of a ClientHello.
struct HelloParse {
  enum State { kNeedMore, kBad, kComplete } state = kNeedMore;
  std::string error;                   // kBad: what is wrong
  ClientHello hello{};                 // kComplete
  std::span<const std::byte> address;  // kComplete: the client's worker address (unverified)
};
/// Garbage is refused as early as its first bytes show it (magic, version, sizes), so a peer
/// never makes the server wait for or hold more than sizeof(ClientHello) + kMaxWorkerAddress.
/// Bytes past the hello are an error: a client waits for the Accept.
HelloParse parse_client_hello(std::span<const std::byte> received);

/// Checks a ServerHello / an Accept header from a server; returns it or sets `error`.
Result<ServerHello> parse_server_hello(std::span<const std::byte> bytes);
Result<Accept> parse_accept(std::span<const std::byte> bytes);

/// The proofs and the session key (see the top of this file). `token` is the HMAC key.
Digest client_proof(const Mac& token, const Nonce& server, const Nonce& client,
                    std::span<const std::byte> client_address);
Digest server_proof(const Mac& token, const Nonce& server, const Nonce& client, uint64_t conn,
                    std::span<const std::byte> client_address,
                    std::span<const std::byte> server_address);
Digest session_key(const Mac& token, const Nonce& server, const Nonce& client, uint64_t conn);

/// What the client side of a handshake ends with.
struct Session {
  detail::UniqueFd control;  // the TCP connection; the session ends when either side closes it
  uint64_t conn = 0;
  Digest key{};
  std::vector<std::byte> server_address;  // the server's UCX worker address, proven
};

/// Runs the client side on a connected socket by `deadline`. Throws Error: kConfig when the
/// token does not match (either way), kIo for anything else (timeouts, a refusal, a server that
/// is not a sluice shard server or does not prove the token), with a message saying which;
/// "cancelled" once `*cancel` is set.
Session client_handshake(detail::UniqueFd control, const std::string& token,
                         std::span<const std::byte> worker_address, Clock::time_point deadline,
                         const std::atomic<bool>* cancel = nullptr);

}  // namespace sluice::net
