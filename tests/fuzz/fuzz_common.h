#pragma once

// libFuzzer targets share this: a parser of outside bytes may reject its input only with
// sluice::Error (a user error with a message); anything else (a crash, a sanitizer report,
// another exception) is a bug.

#include <sluice/error.h>

#include <cstddef>
#include <cstdint>
#include <span>

namespace sluice::fuzz {

inline std::span<const std::byte> bytes(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const std::byte*>(data), size};
}

template <typename F>
void expect_only_errors(F&& f) {
  try {
    f();
  } catch (const Error&) {  // rejected with a message: fine
  }
}

}  // namespace sluice::fuzz
