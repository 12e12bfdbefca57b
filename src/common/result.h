#pragma once

// sluice's one internal error style.
//
// A check of something that cannot be trusted (bytes from a peer, a record read from disk, a
// handshake message) returns a Result<T>: the value, or why not, in words that say what was
// wrong. It does not know where the bytes came from, so it neither throws nor logs. Its
// caller knows the file, sample or peer. It adds that and throws sluice::Error
// (common/errors.h) with the ErrorCode that fits, or, in a loop that must survive bad input
// (the shard server), answers or drops it. Other failures (I/O, resources, configuration)
// throw sluice::Error where they happen. Errors cross threads as std::exception_ptr, and
// the public API speaks sluice::Error.

#include <string>
#include <utility>
#include <variant>

namespace sluice {

/// Why a check failed.
struct Failure {
  std::string why;
};

inline Failure failure(std::string why) { return {std::move(why)}; }

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit
  Result(Failure f) : v_(std::in_place_index<1>, std::move(f)) {}    // NOLINT: implicit

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& operator*() { return std::get<0>(v_); }
  const T& operator*() const { return std::get<0>(v_); }
  T* operator->() { return &std::get<0>(v_); }
  const T* operator->() const { return &std::get<0>(v_); }
  /// Why not (only when !ok()).
  const std::string& error() const { return std::get<1>(v_).why; }

 private:
  std::variant<T, Failure> v_;
};

/// A check without a value: ok, or why not.
template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Failure f) : why_(std::move(f.why)), ok_(false) {}  // NOLINT: implicit

  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const std::string& error() const { return why_; }

 private:
  std::string why_;
  bool ok_ = true;
};

using Status = Result<void>;

}  // namespace sluice
