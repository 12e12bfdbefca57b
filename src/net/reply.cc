#include "net/reply.h"

#include "format/layout.h"

#include <algorithm>
#include <cstring>

namespace sluice::net {

AlignedBuffer ReplyBuffers::take(size_t bytes) {
  {
    std::lock_guard lock(mu_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->capacity() >= bytes && (best == free_.end() || it->capacity() < best->capacity()))
        best = it;
    if (best != free_.end()) {
      AlignedBuffer b = std::move(*best);
      idle_bytes_ -= b.capacity();
      busy_bytes_ += b.capacity();
      free_.erase(best);
      return b;
    }
  }
  AlignedBuffer b;
  b.reserve(format::align_up(std::max<size_t>(bytes, 1), 64 << 10));
  std::memset(b.data(), 0, b.capacity());
  busy_bytes_ += b.capacity();
  return b;
}

void ReplyBuffers::give_back(AlignedBuffer&& b) {
  constexpr size_t kMaxIdleBytes = 256ull << 20;
  {
    std::lock_guard lock(mu_);
    busy_bytes_ -= b.capacity();
    if (b.data() && idle_bytes_ + b.capacity() <= kMaxIdleBytes) {
      idle_bytes_ += b.capacity();
      free_.push_back(std::move(b));
    }
  }
  returned_();
}

void ReplyBuffers::leak(AlignedBuffer& b) {
  busy_bytes_ -= b.capacity();
  b.leak();
}

void set_message(Reply& reply, ReplyBuffers& buffers, ReplyStatus status,
                 std::string_view message) {
  reply.header.status = status;
  reply.header.count = 0;
  reply.header.separate = 0;
  reply.parts.clear();
  if (!reply.buffer.data()) reply.buffer = buffers.take(message.size());
  reply.size = std::min(message.size(), reply.buffer.capacity());
  std::memcpy(reply.buffer.data(), message.data(), reply.size);
  reply.header.data_bytes = reply.size;
}

}  // namespace sluice::net
