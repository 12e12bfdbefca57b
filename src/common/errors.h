#pragma once

#include <sluice/error.h>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace sluice::detail {

/// Throws Error(code, message).
template <typename... Args>
[[noreturn]] void fail(ErrorCode code, fmt::format_string<Args...> format, Args&&... args) {
  throw Error(code, fmt::format(format, std::forward<Args>(args)...));
}

/// Throws the Error for a failed system call: "<what>: <strerror> (<ERRNAME>)", with kNotFound
/// for ENOENT and kIo otherwise; sys_errno() carries `err`.
[[noreturn]] void fail_errno(int err, const std::string& what);

/// "EIO (Input/output error)".
std::string errno_text(int err);

}  // namespace sluice::detail
