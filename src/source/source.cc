#include "source/source.h"

#include "common/errors.h"
#include "source/detail/s3.h"

#include <fmt/format.h>
#include <pugixml.hpp>

#include <algorithm>
#include <charconv>

namespace sluice::source {

std::optional<uint32_t> Source::find(std::string_view key) const {
  const auto& objs = objects();
  auto it = std::lower_bound(objs.begin(), objs.end(), key,
                             [](const Object& o, std::string_view k) { return o.key < k; });
  if (it == objs.end() || it->key != key) return std::nullopt;
  return static_cast<uint32_t>(it - objs.begin());
}

void Source::check(const Range& r) const {
  const auto& objs = objects();
  if (r.object >= objs.size())
    sluice::detail::fail(ErrorCode::kInvalidArgument, "{}: no object {} (has {})", url(), r.object,
                         objs.size());
  const Object& o = objs[r.object];
  if (r.offset > o.size || r.length > o.size - r.offset)
    sluice::detail::fail(ErrorCode::kInvalidArgument,
                         "read {} [{}+{}]: past the end ({} bytes listed)", name(r.object),
                         r.offset, r.length, o.size);
}

bool is_remote(std::string_view path) { return path.starts_with("s3://"); }

std::unique_ptr<Source> open_store(const std::string& url, const SourceOptions& options) {
  if (is_remote(url)) return detail::open_s3(url, options, {});
  return detail::open_dir(url, options);
}

namespace {

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// EncodingType "url": S3 writes a space as '+' (form encoding), other bytes as %XX.
Result<std::string> url_decode(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '+') {
      out += ' ';
    } else if (in[i] == '%') {
      int hi = i + 2 < in.size() ? hex_value(in[i + 1]) : -1;
      int lo = hi >= 0 ? hex_value(in[i + 2]) : -1;
      if (lo < 0) return failure(fmt::format("bad %-escape at byte {}", i));
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else {
      out += in[i];
    }
  }
  return out;
}

std::string_view trimmed(const char* s) {
  std::string_view v(s);
  while (!v.empty() && std::isspace(static_cast<unsigned char>(v.front()))) v.remove_prefix(1);
  while (!v.empty() && std::isspace(static_cast<unsigned char>(v.back()))) v.remove_suffix(1);
  return v;
}

}  // namespace

Result<ListPage> parse_list_page(std::string_view xml) {
  pugi::xml_document doc;
  pugi::xml_parse_result parsed =
      doc.load_buffer(xml.data(), xml.size(), pugi::parse_default, pugi::encoding_utf8);
  if (!parsed)
    return failure(fmt::format("not XML: {} at byte {}", parsed.description(), parsed.offset));
  pugi::xml_node root = doc.document_element();
  if (std::string_view(root.name()) != "ListBucketResult") {
    std::string why = fmt::format("expected <ListBucketResult>, got <{}>", root.name());
    if (std::string_view(root.name()) == "Error")
      why += fmt::format(" {}", root.child("Code").text().get());
    return failure(std::move(why));
  }
  bool url_encoded = trimmed(root.child("EncodingType").text().get()) == "url";

  ListPage page;
  size_t n = 0;
  for (pugi::xml_node c : root.children("Contents")) {
    ++n;
    pugi::xml_node key = c.child("Key");
    if (!key) return failure(fmt::format("<Contents> {} has no <Key>", n));
    std::string_view raw = key.text().get();
    if (raw.empty()) return failure(fmt::format("<Contents> {} has an empty <Key>", n));
    Object obj;
    if (url_encoded) {
      auto decoded = url_decode(raw);
      if (!decoded) return failure(fmt::format("<Key> \"{}\": {}", raw, decoded.error()));
      obj.key = std::move(*decoded);
    } else {
      obj.key = std::string(raw);
    }
    pugi::xml_node size = c.child("Size");
    if (!size) return failure(fmt::format("<Key> \"{}\" has no <Size>", raw));
    std::string_view digits = trimmed(size.text().get());
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), obj.size);
    if (digits.empty() || ec != std::errc() || end != digits.data() + digits.size())
      return failure(fmt::format("<Key> \"{}\": <Size> \"{}\" is not a byte count", raw,
                                 std::string_view(size.text().get())));
    // The ETag goes back to the server in an If-Match header: printable ASCII only.
    obj.version = std::string(trimmed(c.child("ETag").text().get()));
    if (std::any_of(obj.version.begin(), obj.version.end(),
                    [](char ch) { return ch < 0x20 || ch > 0x7e; }))
      return failure(
          fmt::format("<Key> \"{}\": <ETag> holds a character that is not printable "
                      "ASCII",
                      raw));
    page.objects.push_back(std::move(obj));
  }

  std::string_view truncated = trimmed(root.child("IsTruncated").text().get());
  if (truncated == "true") {
    page.truncated = true;
  } else if (!truncated.empty() && truncated != "false") {
    return failure(fmt::format("<IsTruncated> \"{}\" is neither true nor false", truncated));
  }
  page.next_token = std::string(trimmed(root.child("NextContinuationToken").text().get()));
  if (page.truncated && page.next_token.empty())
    return failure("<IsTruncated> true without a <NextContinuationToken>");
  return page;
}

namespace detail {

S3ErrorBody parse_error_body(std::string_view xml) {
  pugi::xml_document doc;
  if (!doc.load_buffer(xml.data(), xml.size(), pugi::parse_default, pugi::encoding_utf8)) return {};
  pugi::xml_node root = doc.document_element();
  if (std::string_view(root.name()) != "Error") return {};
  return {std::string(trimmed(root.child("Code").text().get())),
          std::string(trimmed(root.child("Message").text().get()))};
}

}  // namespace detail
}  // namespace sluice::source
