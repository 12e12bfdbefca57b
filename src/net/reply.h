#pragma once

// What the shard server sends: a reply in flight (its header, its pooled buffer, the records
// sent in messages of their own) and the pool of reply buffers.

#include "memory/aligned_buffer.h"
#include "net/wire.h"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string_view>
#include <vector>

namespace sluice::net {

// Reply data lives in pooled memory::AlignedBuffers: zeroed once when allocated (so a reply
// never carries memory other than dataset bytes), then reused. Reuse is what keeps them
// registered: UCX registers a send buffer with the NIC (verbs) on first use and keeps it in its
// registration cache, so a pooled buffer is registered once. (Mapping them ourselves with
// ucp_mem_map gave nothing more and made shutdown racy: UCX may still hold a region when a
// send to a dead peer is cancelled.)
using memory::AlignedBuffer;

// One authenticated request, queued for the server's reader threads.
struct Job {
  uint64_t conn = 0;
  uint64_t request_id = 0;
  uint32_t separate_bytes = 0;  // as RequestHeader::separate_bytes
  std::vector<uint64_t> indices;
  // A checkpoint op instead (its names and payload copied out of the message).
  std::optional<CheckpointRequest> checkpoint;
  std::vector<std::byte> payload;
};

// A record that goes in a message of its own, straight from where it lies: the shard's
// mapping (page cache) or the reply buffer it was read into (direct I/O).
struct Part {
  RecordHeader header;
  const std::byte* data = nullptr;
};

// One reply in flight: its messages' headers and data stay alive until UCX reports every send
// complete.
struct Reply {
  ReplyHeader header;
  AlignedBuffer buffer;
  size_t size = 0;  // bytes of the kReplyAm data, from buffer.data()
  std::vector<Part> parts;
  size_t sends_left = 0;
  uint64_t conn = 0;      // the connection it answers
  bool counted = true;    // a data reply: counts in Conn::outstanding (else in Conn::unsent_errors)
  void* owner = nullptr;  // the server sending it
};

/// Reply buffers, any thread. Buffers handed out count as busy until given back; past the
/// server's max_reply_memory of them its readers wait (busy_bytes()).
class ReplyBuffers {
 public:
  /// `returned`: called after each give_back (the server wakes a reader that waits for memory).
  explicit ReplyBuffers(std::function<void()> returned) : returned_(std::move(returned)) {}
  /// The smallest idle buffer that holds `bytes`, else a new zeroed one (in 64 KiB steps, so
  /// that buffers get reused).
  AlignedBuffer take(size_t bytes);
  /// Keeps up to 256 MiB of buffers for reuse, frees the rest.
  void give_back(AlignedBuffer&& b);
  /// A buffer reads given up on may still land in: never reused, no longer counted.
  void leak(AlignedBuffer& b);
  size_t busy_bytes() const { return busy_bytes_.load(); }

 private:
  std::function<void()> returned_;
  std::mutex mu_;
  std::vector<AlignedBuffer> free_;
  size_t idle_bytes_ = 0;
  std::atomic<size_t> busy_bytes_{0};
};

/// Makes `reply` an error or message reply (no records): `message` in a pooled buffer.
void set_message(Reply& reply, ReplyBuffers& buffers, ReplyStatus status, std::string_view message);

}  // namespace sluice::net
