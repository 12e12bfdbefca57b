// device: pinned and cuda:N. Without a GPU (CI): cuda:N fails clearly and pinned falls back to
// ordinary memory with the same bytes; the GPU tests skip, saying why. With one (the GPU
// machine, scripts/gpu-check.sh): bytes on the device equal the bytes on disk, 1000+ batches
// without growth in device memory, and a batch outlives its loader.

#include <sluice/loader.h>

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
    for (size_t i = 0; i < b.size(); ++i) {
      const auto& expected = written_[b.indices()[i]];
      ASSERT_EQ(data.offsets[i + 1] - data.offsets[i], expected.size());
      ASSERT_TRUE(std::equal(expected.begin(), expected.end(), host.begin() + data.offsets[i]))
          << "sample " << b.indices()[i];
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

TEST_F(DeviceTest, ThousandsOfCudaBatchesDoNotGrowDeviceMemory) {
  if (devices_ == 0) GTEST_SKIP() << "no CUDA device: " << why_;
  auto loader = Loader::open(options(DeviceKind::kCuda));
  size_t batches = 0, baseline = 0;
  while (batches < 3000) {
    auto b = loader->next();
    if (!b) continue;  // the next call starts the next epoch
    b->use_on_stream(nullptr);
    if (++batches == 200) baseline = memory::device_memory_used(0);
  }
  // The pool is warm after 200 batches; allow one more batch buffer's worth of slack.
  EXPECT_LE(memory::device_memory_used(0), baseline + (2 << 20));
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
