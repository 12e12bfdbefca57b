// The remote wire: a request as the shard server parses it, a reply and its record table as
// the client parses them.
#include "fuzz_common.h"
#include "net/wire.h"

#include <algorithm>
#include <cstring>
#include <string>

using namespace sluice;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto in = fuzz::bytes(data, size);
  std::string error;
  const size_t header = std::min<size_t>(size, sizeof(net::RequestHeader));
  fuzz::expect_only_errors(
      [&] { net::parse_request(in.first(header), size - header, 4096, &error); });
  const size_t reply_header = std::min<size_t>(size, sizeof(net::ReplyHeader));
  fuzz::expect_only_errors([&] {
    if (auto reply = net::parse_reply(in.first(reply_header), &error)) {
      reply->data_bytes = size - reply_header;
      if (auto records = net::parse_records(*reply, in.subspan(reply_header), &error)) {
        uint64_t total = 0;
        for (const auto& r : *records) total += r.size;
        if (total > size) __builtin_trap();  // the table must fit the data it describes
      }
    }
  });
  return 0;
}
