#include "net/wire.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

namespace sluice::net {

RequestMac request_mac(const Mac& session, std::span<const std::byte> header,
                       std::span<const std::byte> data) {
  Digest d = session.compute({header.subspan(std::min(header.size(), kRequestAuthBytes)), data});
  RequestMac m;
  std::memcpy(m.data(), d.data(), m.size());
  return m;
}

Result<RequestHeader> parse_request(std::span<const std::byte> header, size_t data_bytes,
                                    uint32_t max_count) {
  RequestHeader h;
  if (header.size() != sizeof h) {
    return failure(fmt::format("request header is {} bytes, expected {}", header.size(), sizeof h));
  }
  std::memcpy(&h, header.data(), sizeof h);
  if (h.magic != kRequestMagic) {
    return failure(fmt::format("request magic {:#x}, expected {:#x}", h.magic, kRequestMagic));
  }
  if (h.version != kWireVersion) {
    return failure(
        fmt::format("request version {}, this server speaks {}", h.version, kWireVersion));
  }
  if (h.count == 0 || h.count > max_count) {
    return failure(fmt::format("request for {} samples (1 to {} allowed)", h.count, max_count));
  }
  if (data_bytes != uint64_t{h.count} * sizeof(uint64_t)) {
    return failure(fmt::format("request names {} samples but carries {} bytes of indices", h.count,
                               data_bytes));
  }
  return h;
}

Result<ReplyHeader> parse_reply(std::span<const std::byte> header) {
  ReplyHeader h;
  if (header.size() != sizeof h) {
    return failure(fmt::format("reply header is {} bytes, expected {}", header.size(), sizeof h));
  }
  std::memcpy(&h, header.data(), sizeof h);
  if (h.magic != kReplyMagic || h.version != kWireVersion) {
    return failure(
        fmt::format("reply magic {:#x} version {}: not a sluice shard server of version {}",
                    h.magic, h.version, kWireVersion));
  }
  if (h.status > ReplyStatus::kBusy) {
    return failure(fmt::format("reply status {} unknown", static_cast<unsigned>(h.status)));
  }
  return h;
}

Result<std::vector<RecordInfo>> parse_records(const ReplyHeader& reply,
                                              std::span<const std::byte> data) {
  const uint64_t table = uint64_t{reply.count} * sizeof(RecordInfo);
  if (data.size() != reply.data_bytes || data.size() < table) {
    return failure(fmt::format("reply of {} records carries {} bytes (header says {})", reply.count,
                               data.size(), reply.data_bytes));
  }
  std::vector<RecordInfo> infos(reply.count);
  if (table > 0)  // memcpy from or to null is undefined even for 0 bytes (found by fuzz_wire)
    std::memcpy(infos.data(), data.data() + data.size() - table, table);
  const uint64_t records_end = data.size() - table;
  uint64_t at = 0;  // end of the previous record
  uint32_t separate = 0;
  for (size_t i = 0; i < infos.size(); ++i) {
    const RecordInfo& r = infos[i];
    if (r.offset == kSeparate) {
      ++separate;
      continue;
    }
    if (r.offset < at || r.offset > records_end || r.size > records_end - r.offset) {
      return failure(fmt::format("record {} at [{}+{}] overlaps its predecessor or the table at {}",
                                 i, r.offset, r.size, records_end));
    }
    at = r.offset + r.size;
  }
  if (separate != reply.separate) {
    return failure(fmt::format("reply says {} records come separately, its table {}",
                               reply.separate, separate));
  }
  return infos;
}

Result<RecordHeader> parse_record_header(std::span<const std::byte> header, size_t data_bytes) {
  RecordHeader h;
  if (header.size() != sizeof h) {
    return failure(fmt::format("record header is {} bytes, expected {}", header.size(), sizeof h));
  }
  std::memcpy(&h, header.data(), sizeof h);
  if (h.magic != kRecordMagic || h.version != kWireVersion) {
    return failure(
        fmt::format("record magic {:#x} version {}: not a sluice shard server of version {}",
                    h.magic, h.version, kWireVersion));
  }
  if (data_bytes != h.size) {
    return failure(fmt::format("record message says {} bytes, carries {}", h.size, data_bytes));
  }
  return h;
}

std::string to_string(ReplyStatus status) {
  switch (status) {
    case ReplyStatus::kOk:
      return "ok";
    case ReplyStatus::kBadRequest:
      return "bad request";
    case ReplyStatus::kUnauthorized:
      return "unauthorized (token mismatch)";
    case ReplyStatus::kOutOfRange:
      return "sample out of range";
    case ReplyStatus::kReadError:
      return "read error";
    case ReplyStatus::kTooLarge:
      return "reply too large";
    case ReplyStatus::kBusy:
      return "server busy";
  }
  return "unknown";
}

}  // namespace sluice::net
