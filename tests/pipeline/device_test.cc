// device: pinned and cuda:N. Without a GPU (CI): cuda:N fails clearly and pinned falls back to
// ordinary memory with the same bytes; the GPU tests skip, saying why. With one (the GPU
// machine, scripts/gpu-check.sh): bytes on the device equal the bytes on disk, a copy queued on
// the consumer's own stream sees complete data, 1000+ batches without growth in device or
// pinned memory (none left once the batches are gone), and a batch outlives its loader.

#include <sluice/loader.h>

#include "memory/aligned_buffer.h"
#include "memory/cuda.h"
#include "test_util.h"

#include <cstring>

namespace sluice {
namespace {

class DeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    written_ = testing::write_dataset(tmp_ / "ds", kSamples, 5000, 32 << 10);
    auto found = memory::cuda_devices();
    devices_ = found ? *found : 0;
    if (!found) why_ = found.error();
  }

  LoaderOptions options(DeviceKind kind) const {
    LoaderOptions o;
    o.dataset.path = tmp_ / "ds";
    o.batch_size = 20;  // divides kSamples: every sample in every epoch
    o.io.queue_depth = 8;
    o.io.timeout_ms = 5000;
    o.distributed.rank = 0;
    o.distributed.world_size = 1;
    o.device.kind = kind;
    return o;
  }

  // The batch's bytes, wherever they live, against what was written.
  void check(const Batch& b) {
    FieldView data = b.field("data");
    std::vector<std::byte> host(data.data.size());
    if (data.device == DeviceKind::kCuda) {
      b.use_on_stream(nullptr);
      memory::copy_to_host(host.data(), data.data.data(), host.size(), data.device_index);
    } else if (!host.empty()) {
      std::memcpy(host.data(), data.data.data(), host.size());
    }
    check_bytes(b, host.data(), written_);
  }

  static void check_bytes(const Batch& b, const std::byte* host,
                          const std::vector<std::vector<std::byte>>& written) {
    FieldView data = b.field("data");
    for (size_t i = 0; i < b.size(); ++i) {
      const auto& expected = written[b.indices()[i]];
      ASSERT_EQ(data.offsets[i + 1] - data.offsets[i], expected.size());
      ASSERT_TRUE(std::equal(expected.begin(), expected.end(), host + data.offsets[i]))
          << "sample " << b.indices()[i] << " of batch " << b.step();
    }
  }

  static constexpr uint64_t kSamples = 500;
  testing::TempDir tmp_;
  std::vector<std::vector<std::byte>> written_;
  int devices_ = 0;
  std::string why_;
};

TEST_F(DeviceTest, CudaWithoutADeviceFailsNamingIt) {
  if (devices_ > 0) GTEST_SKIP() << "this machine has a CUDA device";
  try {
    Loader::open(options(DeviceKind::kCuda));
    FAIL() << "device: cuda:0 opened without a device";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_NE(std::string(e.what()).find("device: cuda:0: "), std::string::npos) << e.what();
  }
}

TEST_F(DeviceTest, ADeviceNumberPastTheLastFails) {
  if (devices_ == 0) GTEST_SKIP() << "no CUDA device: " << why_;
  LoaderOptions o = options(DeviceKind::kCuda);
  o.device.index = devices_;
  EXPECT_THROW(Loader::open(o), Error);
}

TEST_F(DeviceTest, PinnedDeliversTheSameBytesWithOrWithoutADevice) {
  auto loader = Loader::open(options(DeviceKind::kPinned));
  size_t samples = 0;
  while (auto b = loader->next()) {
    check(*b);
    samples += b->size();
  }
  EXPECT_EQ(samples, kSamples);
  EXPECT_EQ(loader->stats().pinned, devices_ > 0);
}

TEST_F(DeviceTest, CudaBytesEqualTheBytesOnDisk) {
  if (devices_ == 0) GTEST_SKIP() << "no CUDA device: " << why_;
  auto loader = Loader::open(options(DeviceKind::kCuda));
  EXPECT_TRUE(loader->stats().pinned);
  for (int epoch = 0; epoch < 2; ++epoch)
    while (auto b = loader->next()) {
      EXPECT_EQ(b->field("data").device, DeviceKind::kCuda);
      check(*b);
    }
}

// The loader's copy runs on its own stream; a consumer that names its stream (use_on_stream)
// and queues a read of the batch there right away must see every byte. Big batches, one loader
// thread and prefetch 1, so that each batch's copy is queued just before next() returns it, and
// the checks wait for the epoch's end, so that the consumer is never the slower side: a missing
// wait would let the consumer's read overtake the copy (stale or partial bytes; checked on an
// H200 by removing the wait from Batch::use_on_stream).
TEST_F(DeviceTest, ACopyOnTheConsumersStreamSeesCompleteData) {
  if (devices_ == 0) GTEST_SKIP() << "no CUDA device: " << why_;
  constexpr uint64_t kBig = 96, kBatch = 16;
  auto big = testing::write_dataset(tmp_ / "big", kBig, 2 << 20, 32 << 20);
  LoaderOptions o = options(DeviceKind::kCuda);
  o.dataset.path = tmp_ / "big";
  o.batch_size = kBatch;
  o.prefetch = 1;
  o.io.threads = 1;
  auto loader = Loader::open(o);
  memory::Stream consumer(0);
  std::vector<memory::AlignedBuffer> hosts(kBig / kBatch);  // page-locked before the loop
  for (auto& h : hosts) {
    h.set_pin(true);
    h.reserve(kBatch * (2 << 20));
  }
  size_t batches = 0;
  for (int epoch = 0; epoch < 4; ++epoch) {
    std::vector<std::shared_ptr<const Batch>> held;
    while (auto b = loader->next()) {
      FieldView data = b->field("data");
      b->use_on_stream(consumer.handle());
      // Backwards, 1 MiB at a time: the first read is of the bytes the loader's copy writes
      // last (a read in the copy's own order would trail it and pass without the wait).
      for (size_t end = data.data.size(); end > 0;) {
        const size_t begin = end > (1 << 20) ? end - (1 << 20) : 0;
        consumer.copy_to_host(hosts[held.size()].data() + begin, data.data.data() + begin,
                              end - begin);
        end = begin;
      }
      held.push_back(std::move(b));
    }
    consumer.synchronize();
    for (size_t i = 0; i < held.size(); ++i) check_bytes(*held[i], hosts[i].data(), big);
    batches += held.size();
  }
  EXPECT_EQ(batches, 4 * kBig / kBatch);
}

// Thousands of batches: device memory (the driver's count and sluice's own), pinned host memory
// stay flat once the pool is warm, and nothing stays pinned or allocated after the loader and
// its batches are gone.
void expect_flat_memory(const LoaderOptions& o, bool cuda) {
  const size_t pinned_before = memory::pinned_bytes(), device_before = memory::device_bytes();
  {
    auto loader = Loader::open(o);
    size_t batches = 0, used = 0, pinned = 0, device = 0;
    while (batches < 3000) {
      auto b = loader->next();
      if (!b) continue;  // the next call starts the next epoch
      b->use_on_stream(nullptr);
      if (++batches == 200) {
        used = cuda ? memory::device_memory_used(0) : 0;
        pinned = memory::pinned_bytes();
        device = memory::device_bytes();
        EXPECT_GT(pinned, pinned_before) << "batch buffers were not page-locked";
      }
    }
    // The pool is warm after 200 batches; allow one more batch buffer's worth of slack.
    if (cuda) {
      EXPECT_LE(memory::device_memory_used(0), used + (2 << 20));
    }
    EXPECT_LE(memory::pinned_bytes(), pinned + (2 << 20));
    EXPECT_LE(memory::device_bytes(), device + (2 << 20));
    EXPECT_EQ(loader->stats().pinned_bytes, memory::pinned_bytes());
  }
  EXPECT_EQ(memory::pinned_bytes(), pinned_before) << "page-locked memory left behind";
  EXPECT_EQ(memory::device_bytes(), device_before) << "device memory left behind";
}

TEST_F(DeviceTest, ThousandsOfCudaBatchesDoNotGrowDeviceOrPinnedMemory) {
  if (devices_ == 0) GTEST_SKIP() << "no CUDA device: " << why_;
  expect_flat_memory(options(DeviceKind::kCuda), true);
}

TEST_F(DeviceTest, ThousandsOfPinnedBatchesDoNotGrowPinnedMemory) {
  if (devices_ == 0) GTEST_SKIP() << "no CUDA device: " << why_;
  expect_flat_memory(options(DeviceKind::kPinned), false);
}

TEST_F(DeviceTest, ACudaBatchOutlivesItsLoader) {
  if (devices_ == 0) GTEST_SKIP() << "no CUDA device: " << why_;
  auto loader = Loader::open(options(DeviceKind::kCuda));
  auto b = loader->next();
  ASSERT_TRUE(b);
  loader.reset();
  check(*b);
}

}  // namespace
}  // namespace sluice
