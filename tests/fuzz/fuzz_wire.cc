// The remote wire: a request (a sample read, a checkpoint op) as the shard server parses it, a
// reply and its record table as the client parses them.
#include "fuzz_common.h"
#include "net/wire.h"

#include <algorithm>
#include <cstring>
#include <string>

using namespace sluice;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto in = fuzz::bytes(data, size);
  const size_t header = std::min<size_t>(size, sizeof(net::RequestHeader));
  fuzz::expect_only_errors(
      [&] { (void)net::parse_request(in.first(header), size - header, 4096); });
  const size_t ckpt_header = std::min<size_t>(size, sizeof(net::CheckpointHeader));
  fuzz::expect_only_errors([&] {
    auto r = net::parse_checkpoint_request(in.first(ckpt_header), in.subspan(ckpt_header));
    if (!r) return;
    // Accepted names stay inside the store: one component each, no "." or "..", no '/'.
    for (const std::string* name : {&r->checkpoint, &r->file}) {
      if (name->find('/') != std::string::npos || *name == "." || *name == "..") __builtin_trap();
      if (name == &r->checkpoint && (name->empty() || name->front() == '.')) __builtin_trap();
    }
    const auto* end = in.data() + in.size();
    if (r->payload.data() + r->payload.size() != end) __builtin_trap();  // within the message
    if (r->payload.size() > net::kMaxCheckpointChunk + (1 << 20)) __builtin_trap();
  });
  const size_t reply_header = std::min<size_t>(size, sizeof(net::ReplyHeader));
  fuzz::expect_only_errors([&] {
    if (auto reply = net::parse_reply(in.first(reply_header))) {
      reply->data_bytes = size - reply_header;
      if (auto records = net::parse_records(*reply, in.subspan(reply_header))) {
        // Every record lies inside the data, after its predecessor: what the client hashes and
        // the loader copies stays inside the reply.
        uint64_t end = 0;
        for (const auto& r : *records) {
          if (r.offset == net::kSeparate) continue;  // sent in a message of its own
          if (r.offset < end || r.offset + r.size > size - reply_header) __builtin_trap();
          end = r.offset + r.size;
        }
      }
    }
  });
  const size_t record_header = std::min<size_t>(size, sizeof(net::RecordHeader));
  fuzz::expect_only_errors([&] {
    if (auto h = net::parse_record_header(in.first(record_header), size - record_header))
      if (h->size != size - record_header) __builtin_trap();  // the size it says is what came
  });
  return 0;
}
