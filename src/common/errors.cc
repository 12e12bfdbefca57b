#include "common/errors.h"

#include <string.h>

namespace sluice::detail {

std::string errno_text(int err) {
  const char* name = strerrorname_np(err);
  return fmt::format("{} ({})", name ? name : fmt::format("errno {}", err), strerror(err));
}

void fail_errno(int err, const std::string& what) {
  throw Error(err == ENOENT ? ErrorCode::kNotFound : ErrorCode::kIo,
              fmt::format("{}: {}", what, errno_text(err)), err);
}

}  // namespace sluice::detail
