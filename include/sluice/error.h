#pragma once

#include <sluice/export.h>

#include <stdexcept>
#include <string>

namespace sluice {

/// What went wrong, coarse enough to map onto a language's error types (Python: kConfig and
/// kInvalidArgument -> ValueError, kNotFound -> FileNotFoundError, kIo -> OSError with errno,
/// kCorruption -> sluice.CorruptionError).
enum class ErrorCode {
  kInvalidArgument,  // a bad value passed through the API or the CLI
  kConfig,           // a config file or key that is wrong; message names file:line: key
  kNotFound,         // a file or directory the user named does not exist
  kIo,               // a system call failed; sys_errno() holds errno
  kCorruption,       // bytes on disk disagree with their header, index or checksum
  kUnsupported,      // valid input that this build or machine cannot handle
};

/// The one error type sluice throws at its API boundary. what() is a complete, user-facing
/// sentence that names the input (file, shard, sample, key) and the cause.
class SLUICE_EXPORT Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message, int sys_errno = 0)
      : std::runtime_error(message), code_(code), sys_errno_(sys_errno) {}

  ErrorCode code() const noexcept { return code_; }
  /// errno of the failed system call for kIo and kNotFound; 0 otherwise.
  int sys_errno() const noexcept { return sys_errno_; }

 private:
  ErrorCode code_;
  int sys_errno_;
};

/// The Error for a failed system call: "WHAT: ENAME (strerror)" (`EIO (Input/output error)`),
/// kNotFound for ENOENT and kIo otherwise; sys_errno() carries `err`.
SLUICE_EXPORT Error errno_error(int err, const std::string& what);

}  // namespace sluice
