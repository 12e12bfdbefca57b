#include "net/client_request.h"

#include "format/layout.h"

#include <fmt/format.h>

namespace sluice::net {

void Pending::check_records(bool verify) {
  ReadRequest& r = *request;
  std::span<const std::byte> data = dest;
  auto table = parse_records(reply, data);
  if (!table || table->size() != r.indices.size()) {
    corrupt = fmt::format(
        "malformed reply: {}",
        table ? fmt::format("{} records for {} samples", table->size(), r.indices.size())
              : table.error());
    return;
  }
  r.records = std::move(*table);
  table_ok = true;
  for (size_t i = 0; i < r.records.size(); ++i) {
    const RecordInfo& info = r.records[i];
    if (info.offset != kSeparate) {
      if (separate[i] != 0) return corrupt_record(i, "sent both in the reply and apart");
      r.record_data[i] = data.subspan(info.offset, info.size);
      check_sum(i, verify);
    } else if (separate[i] == 2) {
      check_separate(i, verify);
    }
  }
}

void Pending::check_separate(size_t i, bool verify) {
  ReadRequest& r = *request;
  if (r.records[i].offset != kSeparate || r.records[i].size != r.record_data[i].size())
    return corrupt_record(i, "its message does not match the reply's table");
  check_sum(i, verify);
}

void Pending::check_sum(size_t i, bool verify) {
  if (!verify || !corrupt.empty()) return;
  ReadRequest& r = *request;
  const RecordInfo& info = r.records[i];
  auto checked =
      format::check_record({r.record_data[i].data(), info.size}, r.indices[i], info.checksum);
  if (!checked) corrupt = checked.error() + ": damaged on the peer's disk or in transit";
}

void Pending::corrupt_record(size_t i, std::string_view why) {
  if (corrupt.empty())
    corrupt = fmt::format("malformed reply: sample {}: {}", request->indices[i], why);
}

}  // namespace sluice::net
