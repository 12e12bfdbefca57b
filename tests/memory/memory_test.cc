// src/memory: aligned host buffers (O_DIRECT destinations, batch storage), pinning without a
// device.

#include "memory/aligned_buffer.h"
#include "memory/cuda.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>

namespace sluice::memory {
namespace {

uintptr_t address(const AlignedBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); }

TEST(AlignedBufferTest, PageAlignedAndHugeAlignedFromTwoMebibytes) {
  AlignedBuffer b;
  EXPECT_EQ(b.capacity(), 0u);
  ASSERT_TRUE(b.reserve(100));
  EXPECT_EQ(address(b) % AlignedBuffer::kAlignment, 0u);
  EXPECT_EQ(b.capacity(), AlignedBuffer::kAlignment) << "rounded up to whole pages";
  std::memset(b.data(), 0xAB, b.capacity());  // all of it is ours (ASan checks)
  ASSERT_TRUE(b.reserve(3 << 20));
  EXPECT_EQ(address(b) % (2 << 20), 0u);
  EXPECT_EQ(b.capacity() % (2 << 20), 0u);
  EXPECT_GE(b.capacity(), size_t{3} << 20);
  std::memset(b.data(), 0xCD, b.capacity());
}

TEST(AlignedBufferTest, GrowsGeometricallyAndKeepsWhatFits) {
  AlignedBuffer b;
  ASSERT_TRUE(b.reserve(10000));
  const size_t first = b.capacity();
  const std::byte* data = b.data();
  EXPECT_FALSE(b.reserve(first)) << "what fits reallocates nothing";
  EXPECT_FALSE(b.reserve(1));
  EXPECT_EQ(b.data(), data);
  ASSERT_TRUE(b.reserve(first + 1));
  EXPECT_GE(b.capacity(), first + first / 2) << "not geometric: reallocations would be frequent";
}

TEST(AlignedBufferTest, LeakGivesTheMemoryUpForGood) {
  AlignedBuffer b;
  ASSERT_TRUE(b.reserve(4096));
  b.leak();  // a late read may still land in it: never freed (and no leak report: keep_forever)
  EXPECT_EQ(b.capacity(), 0u);
  EXPECT_EQ(b.data(), nullptr);
  EXPECT_TRUE(b.reserve(1)) << "an empty buffer allocates again";
}

TEST(AlignedBufferTest, PinningWithoutADeviceLeavesOrdinaryMemory) {
  if (cuda_devices().ok()) GTEST_SKIP() << "a CUDA device is present (tests/pipeline/device_test)";
  AlignedBuffer b;
  b.set_pin(true);
  ASSERT_TRUE(b.reserve(1 << 20));
  EXPECT_FALSE(b.pinned());
  EXPECT_EQ(pinned_bytes(), 0u);
  std::memset(b.data(), 1, b.capacity());
}

}  // namespace
}  // namespace sluice::memory
