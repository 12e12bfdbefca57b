#pragma once

// Page-aligned host buffers: O_DIRECT destinations, batch storage, shard-server replies.

#include "common/keep.h"

#include <cstddef>
#include <memory>

namespace sluice::memory {

/// Frees an AlignedBuffer's memory, unpinning it first when it was pinned.
struct FreeAligned {
  bool pinned = false;
  size_t bytes = 0;  // what was pinned
  void operator()(std::byte* p) const;
};

/// A growable, 4096-byte-aligned byte buffer (usable as an O_DIRECT destination); from 2 MiB
/// on, 2 MiB-aligned with transparent huge pages where the kernel offers them. Move-only.
class AlignedBuffer {
 public:
  static constexpr size_t kAlignment = 4096;
  std::byte* data() const { return data_.get(); }
  size_t capacity() const { return capacity_; }
  /// Makes room for `bytes`; existing contents are not kept. Returns whether it reallocated.
  /// Throws std::bad_alloc.
  bool reserve(size_t bytes);
  /// Page-lock every allocation from now on (device: pinned / cuda:N), best effort.
  void set_pin(bool pin) { pin_ = pin; }
  /// Whether the current allocation is page-locked.
  bool pinned() const { return data_.get_deleter().pinned; }
  /// Gives up the memory without freeing it: reads that may still land in it (an IO engine
  /// past its deadline) must never find it reused. The buffer is empty afterwards.
  void leak() {
    detail::keep_forever(data_.release());
    capacity_ = 0;
  }

 private:
  std::unique_ptr<std::byte, FreeAligned> data_;
  size_t capacity_ = 0;
  bool pin_ = false;
};

}  // namespace sluice::memory
