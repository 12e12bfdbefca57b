#pragma once

// The little cryptography the shard server's handshake needs, from OpenSSL's libcrypto:
// HMAC-SHA256, random nonces, and a constant-time comparison. Nothing here is hand-written.

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string_view>

struct evp_mac_ctx_st;

namespace sluice::net {

using Digest = std::array<uint8_t, 32>;  // HMAC-SHA256
using Nonce = std::array<uint8_t, 32>;

/// HMAC-SHA256 under one key, kept ready (keyed once) for many messages. Move-only. compute()
/// may run on one thread at a time per Mac; copies are cheap to make with the key again.
class Mac {
 public:
  /// Throws Error(kIo) when libcrypto refuses (never seen; it would be a broken install).
  explicit Mac(std::span<const uint8_t> key);
  ~Mac();
  Mac(Mac&& other) noexcept : ctx_(other.ctx_) { other.ctx_ = nullptr; }
  Mac& operator=(Mac&& other) noexcept;
  Mac(const Mac&) = delete;
  Mac& operator=(const Mac&) = delete;

  /// The MAC of the parts, concatenated.
  Digest compute(std::initializer_list<std::span<const std::byte>> parts) const;

 private:
  evp_mac_ctx_st* ctx_ = nullptr;
};

/// Bytes of a string, for Mac::compute.
inline std::span<const std::byte> bytes_of(std::string_view s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}
template <typename T, size_t N>
std::span<const std::byte> bytes_of(const std::array<T, N>& a) {
  return std::as_bytes(std::span<const T>(a));
}

/// Fills `out` from the operating system's cryptographic random source; throws Error(kIo).
void random_bytes(std::span<uint8_t> out);

/// Whether a and b are equal, in time that depends only on their lengths.
bool equal_constant_time(std::span<const uint8_t> a, std::span<const uint8_t> b);

}  // namespace sluice::net
