#include "net/crypto.h"

#include "common/errors.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

namespace sluice::net {
namespace {

[[noreturn]] void fail_openssl(const char* what) {
  char text[256] = "unknown error";
  if (unsigned long e = ERR_get_error()) ERR_error_string_n(e, text, sizeof text);
  detail::fail(ErrorCode::kIo, "libcrypto: {}: {}", what, text);
}

// Fetched once per process: fetching is the slow part of an EVP_MAC.
EVP_MAC* hmac_algorithm() {
  static EVP_MAC* mac = EVP_MAC_fetch(nullptr, OSSL_MAC_NAME_HMAC, nullptr);
  if (!mac) fail_openssl("HMAC unavailable");
  return mac;
}

}  // namespace

Mac::Mac(std::span<const uint8_t> key) {
  ctx_ = EVP_MAC_CTX_new(hmac_algorithm());
  if (!ctx_) fail_openssl("HMAC context");
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                         OSSL_PARAM_construct_end()};
  // An empty key (a server run with --no-token) is still a key to HMAC; libcrypto wants a
  // non-null pointer for it.
  static const uint8_t kEmpty = 0;
  if (EVP_MAC_init(ctx_, key.empty() ? &kEmpty : key.data(), key.size(), params) != 1) {
    EVP_MAC_CTX_free(ctx_);
    ctx_ = nullptr;
    fail_openssl("HMAC-SHA256 key");
  }
}

Mac::~Mac() { EVP_MAC_CTX_free(ctx_); }

Mac& Mac::operator=(Mac&& other) noexcept {
  if (this != &other) {
    EVP_MAC_CTX_free(ctx_);
    ctx_ = other.ctx_;
    other.ctx_ = nullptr;
  }
  return *this;
}

Digest Mac::compute(std::initializer_list<std::span<const std::byte>> parts) const {
  // A copy of the keyed context starts each message from the key's state.
  EVP_MAC_CTX* c = EVP_MAC_CTX_dup(ctx_);
  if (!c) fail_openssl("HMAC context copy");
  Digest out{};
  size_t length = 0;
  bool ok = true;
  for (auto part : parts)
    if (!part.empty())
      ok = ok &&
           EVP_MAC_update(c, reinterpret_cast<const unsigned char*>(part.data()), part.size()) == 1;
  ok = ok && EVP_MAC_final(c, out.data(), &length, out.size()) == 1 && length == out.size();
  EVP_MAC_CTX_free(c);
  if (!ok) fail_openssl("HMAC-SHA256");
  return out;
}

void random_bytes(std::span<uint8_t> out) {
  if (RAND_bytes(out.data(), static_cast<int>(out.size())) != 1) fail_openssl("random bytes");
}

bool equal_constant_time(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace sluice::net
