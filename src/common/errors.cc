#include "common/errors.h"

#include <string.h>

namespace sluice::detail {

std::string errno_text(int err) {
  const char* name = strerrorname_np(err);
  return fmt::format("{} ({})", name ? name : fmt::format("errno {}", err), strerror(err));
}

void fail_errno(int err, const std::string& what) { throw errno_error(err, what); }

}  // namespace sluice::detail

namespace sluice {

Error errno_error(int err, const std::string& what) {
  return Error(err == ENOENT ? ErrorCode::kNotFound : ErrorCode::kIo,
               fmt::format("{}: {}", what, detail::errno_text(err)), err);
}

}  // namespace sluice
