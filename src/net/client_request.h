#pragma once

// One request of a PeerClient on the wire (client.cc sends it and routes its reply to it), and
// the checks of a sample read's reply: its record table against the request, every record
// against its checksum.

#include "net/client.h"
#include "net/tcp.h"
#include "net/wire.h"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sluice::net {

class ClientImpl;  // client.cc
struct Pending;

// A rendezvous receive in progress: the reply's data (record < 0) or a separate record.
struct Receive {
  Pending* pending = nullptr;
  int64_t record = -1;
  std::span<std::byte> dest;
  void* request = nullptr;  // UCX's, until it completes
};

// One request on the wire. Lives until read() returns, after every callback that names it.
struct Pending {
  uint64_t id = 0;
  ReadRequest* request = nullptr;  // nullptr for send_raw and call
  RawCall* call = nullptr;         // call(): where the reply goes
  RequestHeader header;
  bool raw = false;  // send_raw: raw_header goes instead of header
  bool sign = true;  // send_raw: set the connection id and MAC
  std::vector<std::byte> raw_header;
  std::span<const std::byte> raw_data;
  // kBusy: the server asked to send it again later; when, and the wait after the next kBusy.
  std::optional<Clock::time_point> resend_at;
  std::chrono::milliseconds backoff{1};
  bool done = false;  // the reply's message is settled (data in, or an error)
  ReplyHeader reply;
  std::string message;  // the server's error text, or a transport failure
  bool transport_failed = false;
  std::span<std::byte> dest;  // where the reply data goes, exactly its length
  std::string corrupt;        // what the checks found wrong
  bool table_ok = false;      // the reply's record table is in and well-formed
  ClientImpl* client = nullptr;
  // Records in messages of their own: per record 0 (not yet), 1 (arriving), 2 (landed).
  std::vector<uint8_t> separate;
  size_t separate_landed = 0;
  std::vector<std::unique_ptr<Receive>> receives;

  bool complete() const {
    return transport_failed || (done && (reply.status != ReplyStatus::kOk || !request ||
                                         !corrupt.empty() || separate_landed == reply.separate));
  }

  // The reply's data is in: checks its record table, then (with `verify`) every record against
  // the checksum the server sent (seeded with the sample index, as in the shard index), the
  // separate ones that landed already included. Runs as soon as the data is in: the bytes are
  // still in cache, and other replies keep arriving meanwhile. What it finds goes to `corrupt`,
  // which read() throws.
  void check_records(bool verify);
  // Record `i`, which came in a message of its own, once both it and the table are in.
  void check_separate(size_t i, bool verify);

 private:
  void check_sum(size_t i, bool verify);
  void corrupt_record(size_t i, std::string_view why);
};

}  // namespace sluice::net
