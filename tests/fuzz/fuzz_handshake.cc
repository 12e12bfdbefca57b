// The shard server's handshake as both sides parse it: a client's hello arriving in pieces at
// the server (bounded, refused as early as its bytes show garbage, never accepted without the
// token), and a server's hello and answer at the client.
#include "fuzz_common.h"
#include "net/handshake.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

using namespace sluice;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto in = fuzz::bytes(data, size);
  static const net::Mac token(std::span(reinterpret_cast<const uint8_t*>("fuzz token"), 10));
  static const net::Nonce server_nonce{7, 7, 7};

  // Server side: the first byte picks the piece size, as TCP may cut a stream anywhere.
  if (!in.empty()) {
    const size_t piece = 1 + std::to_integer<size_t>(in[0]) % 97;
    std::vector<std::byte> received;
    auto rest = in.subspan(1);
    for (size_t at = 0; at < rest.size(); at += piece) {
      auto chunk = rest.subspan(at, std::min(piece, rest.size() - at));
      received.insert(received.end(), chunk.begin(), chunk.end());
      net::HelloParse p = net::parse_client_hello(received);
      if (p.state == net::HelloParse::kNeedMore) {
        // Waiting is bounded: never for more than one hello and its largest address.
        if (received.size() >= sizeof(net::ClientHello) + net::kMaxWorkerAddress) __builtin_trap();
        continue;
      }
      if (p.state == net::HelloParse::kBad) {
        if (p.error.empty()) __builtin_trap();  // a refusal always says why
        break;
      }
      if (p.address.size() != p.hello.address_bytes || p.address.empty() ||
          p.address.size() > net::kMaxWorkerAddress ||
          received.size() != sizeof(net::ClientHello) + p.address.size())
        __builtin_trap();
      // Nobody gets in without the token: the fuzzer cannot forge an HMAC.
      net::Digest want = net::client_proof(token, server_nonce, p.hello.nonce, p.address);
      if (net::equal_constant_time(want, p.hello.proof)) __builtin_trap();
      break;
    }
  }

  // Client side: a server's hello, then its answer and what follows it.
  fuzz::expect_only_errors([&] {
    (void)net::parse_server_hello(in.first(std::min(in.size(), sizeof(net::ServerHello))));
  });
  if (auto a = net::parse_accept(in.first(std::min(in.size(), sizeof(net::Accept))))) {
    const uint32_t limit =
        a->status == net::AcceptStatus::kOk ? net::kMaxWorkerAddress : net::kMaxRefusalText;
    if (a->data_bytes > limit) __builtin_trap();  // what the client would then allocate
  }
  return 0;
}
