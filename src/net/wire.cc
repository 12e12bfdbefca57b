#include "net/wire.h"

#include "common/check.h"

#include <fmt/format.h>
#include <xxhash.h>

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

bool valid_checkpoint_name(std::string_view name, bool file) {
  if (name.empty() || name.size() > kMaxCheckpointName || name == "." || name == "..") return false;
  if (!file && name.front() == '.') return false;  // staging directories start with '.'
  // Names ending so are the store's own (net/replica_store.cc).
  if (file && name.ends_with(".sluice")) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-';
  });
}

uint64_t checkpoint_chunk_checksum(std::span<const std::byte> chunk, uint64_t offset) {
  return XXH3_64bits_withSeed(chunk.data(), chunk.size(), offset);
}

FileChecksum::FileChecksum() : state_(XXH3_createState()) {
  SLUICE_CHECK(state_ != nullptr);
  XXH3_64bits_reset(static_cast<XXH3_state_t*>(state_));
}

FileChecksum::~FileChecksum() { XXH3_freeState(static_cast<XXH3_state_t*>(state_)); }

void FileChecksum::update(std::span<const std::byte> bytes) {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(state_), bytes.data(), bytes.size());
}

uint64_t FileChecksum::digest() const {
  return XXH3_64bits_digest(static_cast<const XXH3_state_t*>(state_));
}

Result<CheckpointRequest> parse_checkpoint_request(std::span<const std::byte> header,
                                                   std::span<const std::byte> data) {
  CheckpointRequest r;
  CheckpointHeader& h = r.header;
  if (header.size() != sizeof h)
    return failure(
        fmt::format("checkpoint request header is {} bytes, expected {}", header.size(), sizeof h));
  std::memcpy(&h, header.data(), sizeof h);
  if (h.magic != kCheckpointMagic || h.version != kWireVersion)
    return failure(fmt::format("checkpoint request magic {:#x} version {}, this server speaks {}",
                               h.magic, h.version, kWireVersion));
  if (h.name_bytes > data.size() || h.name_bytes > 2 * kMaxCheckpointName + 1)
    return failure(
        fmt::format("checkpoint request names {} bytes of {}", h.name_bytes, data.size()));
  std::string_view name(reinterpret_cast<const char*>(data.data()), h.name_bytes);
  r.payload = data.subspan(h.name_bytes);
  const bool per_file =
      h.op == CheckpointOp::kWrite || h.op == CheckpointOp::kCommit || h.op == CheckpointOp::kRead;
  if (!per_file && h.op != CheckpointOp::kPublish && h.op != CheckpointOp::kList)
    return failure(fmt::format("checkpoint op {} unknown", static_cast<unsigned>(h.op)));
  if (per_file) {
    const size_t slash = name.find('/');
    if (slash == std::string_view::npos)
      return failure("checkpoint request: a file op names no CHECKPOINT/FILE");
    r.checkpoint = name.substr(0, slash);
    r.file = name.substr(slash + 1);
  } else {
    r.checkpoint = name;
  }
  if (!valid_checkpoint_name(r.checkpoint, false) ||
      (per_file && !valid_checkpoint_name(r.file, true)))
    return failure("checkpoint request: a name outside [A-Za-z0-9._-] (or reserved)");
  if (h.op == CheckpointOp::kWrite && r.payload.size() > kMaxCheckpointChunk)
    return failure(fmt::format("checkpoint write of {} bytes (at most {})", r.payload.size(),
                               kMaxCheckpointChunk));
  if (h.op == CheckpointOp::kRead && (h.length == 0 || h.length > kMaxCheckpointChunk))
    return failure(
        fmt::format("checkpoint read of {} bytes (1 to {})", h.length, kMaxCheckpointChunk));
  if (h.op != CheckpointOp::kWrite && h.op != CheckpointOp::kPublish && !r.payload.empty())
    return failure("checkpoint request: a payload where its op takes none");
  if (h.op == CheckpointOp::kPublish && r.payload.size() > 1 << 20)
    return failure("checkpoint publish: a file list over 1 MiB");
  if (h.op == CheckpointOp::kWrite && checkpoint_chunk_checksum(r.payload, h.offset) != h.checksum)
    return failure(fmt::format("checkpoint write {}/{} [{}+{}]: checksum mismatch", r.checkpoint,
                               r.file, h.offset, r.payload.size()));
  if ((h.op == CheckpointOp::kWrite || h.op == CheckpointOp::kRead) &&
      h.offset > (uint64_t{1} << 50))
    return failure(fmt::format("checkpoint request: offset {} out of range", h.offset));
  return r;
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
  if (h.status > ReplyStatus::kNotFound) {
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
    case ReplyStatus::kNotFound:
      return "not found";
  }
  return "unknown";
}

}  // namespace sluice::net
