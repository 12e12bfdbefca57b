#pragma once

// What the processes of one node that share a cache directory share: a file mapped by each of
// them (`state` in the cache's directory) holding, per sample, whether the mirror holds it and
// how many batches being built read it, and, per process, where it stands in its future. One
// robust process-shared mutex guards all of it; waiters sleep on a futex word that every change
// bumps. A process killed while holding the mutex leaves it to the next (EOWNERDEAD).
//
// The file outlives the processes: it is the record of what the mirror holds that the next run
// starts from. The first process to map it when no other has it (see Mirror::first_user) marks
// every sample it lists as unchecked, to be read back and checked before first use.

#include <pthread.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <mutex>
#include <string>

#include "common/file.h"

namespace sluice::cache {

enum SampleState : uint8_t { kAbsent, kFetching, kPresent, kUnchecked };

struct SampleRecord {
  uint8_t state;  // SampleState; only the process that fetches (the leader) changes it
  uint8_t unused;
  uint16_t pins;      // batches being built that read it: never evicted while > 0
  uint32_t checksum;  // what the sample hashes to (formats without stored checksums)
};

// One process sharing the cache. `pid` 0: the slot is free.
struct ProcessRecord {
  int32_t pid;
  uint32_t gen;            // bumped by each set_future (its future file was replaced)
  uint64_t first_unbuilt;  // its oldest batch not yet built, in its future's steps
};

class SharedState {
 public:
  static constexpr uint32_t kMaxProcesses = 64;
  static constexpr uint32_t kDemand = 4096;  // samples waited for, not yet seen by the leader

  struct Header {
    char magic[8];
    uint32_t version;
    uint32_t error_code;  // the leader's fetch failed: ErrorCode, and the message
    uint64_t samples;
    uint64_t identity;  // the source's objects and versions (Mirror::identity)
    pthread_mutex_t mutex;
    uint32_t seq;     // futex word: bumped by every change
    uint32_t bypass;  // the cache disk was given up: reads go to the source
    uint32_t demand_count;
    uint32_t unused;
    uint64_t cached_bytes;  // the leader's count of what the mirror holds
    uint64_t demand[kDemand];
    ProcessRecord processes[kMaxProcesses];
    char error[1024];
  };

  /// Maps `dir`/state for `samples` samples. `first_user`: no other process has the cache open,
  /// so the file is (re)initialized: made anew when it describes other data (`identity`,
  /// `samples`), else every present sample becomes unchecked, fetches in progress absent, pins
  /// none. Otherwise the file must describe this data. Returns with the lock not held.
  SharedState(const std::filesystem::path& dir, uint64_t samples, uint64_t identity,
              bool first_user);
  ~SharedState();
  SharedState(const SharedState&) = delete;
  SharedState& operator=(const SharedState&) = delete;

  // BasicLockable, for std::unique_lock / std::lock_guard.
  void lock();
  void unlock();

  /// Under the lock: releases it, sleeps until notify() or `timeout`, takes it again.
  void wait(std::unique_lock<SharedState>& lock, std::chrono::milliseconds timeout);
  /// Under the lock: wakes every waiter of every process.
  void notify();

  Header& header() { return *header_; }
  SampleRecord& operator[](uint64_t sample) { return records_[sample]; }
  const SampleRecord& operator[](uint64_t sample) const { return records_[sample]; }
  uint64_t samples() const { return samples_; }
  /// Samples listed as held when the file was taken over from an earlier run.
  uint64_t restored() const { return restored_; }

 private:
  std::filesystem::path path_;
  detail::UniqueFd fd_;
  void* map_ = nullptr;
  size_t size_ = 0;
  Header* header_ = nullptr;
  SampleRecord* records_ = nullptr;
  uint64_t samples_ = 0;
  uint64_t restored_ = 0;
};

}  // namespace sluice::cache
