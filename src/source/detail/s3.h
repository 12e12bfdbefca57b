#pragma once

// Internals of the S3 source that tests reach and no other subsystem may touch.

#include "source/source.h"

#include <memory>
#include <string>
#include <string_view>

namespace sluice::source::detail {

/// Knobs that only tests turn.
struct S3Tuning {
  unsigned list_page_size = 1000;  // ListObjectsV2 max-keys (1000 is S3's own maximum)
};

/// open_store() for an "s3://" URL, with `tuning`.
std::unique_ptr<Source> open_s3(const std::string& url, const SourceOptions& options,
                                const S3Tuning& tuning);

/// open_store() for a directory.
std::unique_ptr<Source> open_dir(const std::string& path, const SourceOptions& options);

/// The S3 error body's <Code> and <Message> ("NoSuchKey", "The specified key does not
/// exist."); empty strings when the body is not an S3 error document.
struct S3ErrorBody {
  std::string code, message;
};
S3ErrorBody parse_error_body(std::string_view xml);

}  // namespace sluice::source::detail
