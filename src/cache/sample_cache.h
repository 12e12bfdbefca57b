#pragma once

// The node cache of a dataset read from a source (an object store, a slow shared file system).
//
// Samples live in the mirror (cache/mirror.h) at their own offsets, so a batch reads cached
// samples exactly as it reads a local dataset. The processes of a node that share a cache.dir
// share one mirror (cache/shared_state.h): a sample fetched for one rank is there for the
// others. One of them, the leader (whoever holds leader.lock; another takes over when it ends),
// fetches and evicts for all: its fetch thread walks the union of the processes' future orders
// (each publishes its own: the rest of this epoch, then the next; the sampler knows both),
// aligned step by step, from the oldest batch not yet built, and fetches what is missing, many
// coalesced ranged reads at a time. When the cache is full it drops the cached sample needed
// furthest in that future (policy clairvoyant, Belady's rule), and stops prefetching where
// everything cached is needed sooner than what comes next; policy lru drops the least recently
// used instead. Every fetched sample is checked before it is marked present: against its
// stored checksum (packed datasets), else the checksum computed now is kept, and a cached
// sample found again after a restart is checked again before use.

#include <sluice/dataset.h>
#include <sluice/options.h>
#include <sluice/sampler.h>

#include "cache/mirror.h"
#include "cache/node_future.h"
#include "cache/shared_state.h"
#include "io/engine.h"
#include "source/source.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <unordered_map>
#include <vector>

namespace sluice::cache {

struct CacheStats {
  uint64_t source_bytes = 0;     // fetched from the source, coalescing gaps included
  uint64_t source_requests = 0;  // ranged reads sent (retries included)
  uint64_t hits = 0;             // samples of built batches present when asked for
  uint64_t misses = 0;           // ... waited for
  uint64_t evictions = 0;
  uint64_t cached_bytes = 0;
};

class SampleCache {
 public:
  /// `dataset` is opened on mirror.dir; `capacity` bytes of samples are kept (the leader's
  /// capacity is the node's). Maps the shared state, releases the mirror's open lock, takes a
  /// process slot and starts the fetch thread, which leads when it can take leader.lock.
  SampleCache(std::shared_ptr<const Dataset> dataset, std::unique_ptr<source::Source> source,
              Mirror mirror, CachePolicy policy, uint64_t capacity, uint64_t fetch_size,
              uint32_t timeout_ms);
  /// Stops fetching (handing the lead to another process) and leaves the shared state.
  ~SampleCache();
  SampleCache(const SampleCache&) = delete;
  SampleCache& operator=(const SampleCache&) = delete;

  /// The rank's order from now on: `current`'s batches, then `next`'s (the following epoch).
  /// Call with no batch being built (the loader's threads stopped).
  void set_future(const RankPlan& current, const RankPlan& next);

  /// Blocks until every sample of a batch (`refs`) is in the mirror (asking the leader for the
  /// missing ones), and keeps them there until release(step). Throws the fetch's error (naming
  /// object and sample), or kIo when the source has not delivered within the timeout. Also returns
  /// (throwing) when `*cancel` is set and wake() called.
  void acquire(std::span<const SampleRef> refs, const std::atomic<bool>* cancel);
  /// Wakes the batches waiting in acquire() to look at their cancel flag.
  void wake();
  void release(uint64_t step, std::span<const SampleRef> refs);

  CacheStats stats() const;
  uint64_t capacity() const { return capacity_; }

  /// The loader's engines read the mirror through this layer (`files`: the engine's file
  /// table). Once the cache has given up its disk, reads go to the source instead; a read of
  /// the mirror that fails with an IO error is answered from the source and gives it up.
  std::unique_ptr<io::Engine> layer(std::unique_ptr<io::Engine> engine, std::vector<int> files);

  /// A write to or read from the cache disk failed (full, read-only, failing): from now on
  /// nothing is cached and every read goes to the source. Logs one line, the first time.
  void give_up_disk(const std::string& why);
  bool disk_given_up() const;

  /// Reads what `reads` ask of the mirror's files from the source instead.
  struct SourceRead {
    int fd;  // a mirror file's descriptor
    uint64_t offset;
    uint32_t length;
    std::byte* dest;
    int32_t result = 0;  // bytes read (fewer past the object's end), or -errno
  };
  void read_source(std::span<SourceRead> reads);

 private:
  void fetch_loop();
  // The leader's, under the shared lock: takes over (after another leader or none); follows the
  // processes' futures and progress and takes their demand (true: the future moved); starts
  // the walk over when the node's future was built again.
  void lead();
  bool refresh();
  void replan();
  // Picks the next samples to fetch (`recheck`: cached from an earlier run, to read back and
  // check); nothing when there is nothing to do now.
  void plan_fetch(std::vector<uint64_t>& fetch, std::vector<uint64_t>& recheck);
  // Makes room for `bytes` (under the lock); `force`: for a batch waiting now, whatever the
  // policy.
  bool make_room(uint64_t bytes, uint64_t key, bool force);
  void evict(uint64_t sample);
  void fetch(const std::vector<uint64_t>& picked);
  // Marks for fetching the absent samples of `sample`'s shard lying in [begin, end) that the
  // policy would keep, appending them to `out`.
  void take_neighbours(uint64_t sample, uint64_t begin, uint64_t end, std::vector<uint64_t>& out);
  // Reads a restored sample back from the mirror and checks it; false when it is not intact.
  bool check_cached(uint64_t sample, uint32_t checksum);
  uint64_t priority(uint64_t sample) const;  // larger: dropped first
  void push(uint64_t sample);
  void fail_all(const std::exception_ptr& error);  // under the lock: every process sees it
  void rethrow() const;                            // ... and throws it
  uint32_t object_of(uint64_t sample) const;
  std::string name(uint64_t sample, uint64_t offset, uint64_t length) const;
  int fd_of(uint64_t sample) const;

  std::shared_ptr<const Dataset> dataset_;
  std::unique_ptr<source::Source> source_;
  Mirror mirror_;
  CachePolicy policy_;
  uint64_t capacity_;
  uint64_t fetch_size_;  // the aligned block whose kept samples share a read; 0: the record
  std::chrono::milliseconds timeout_;
  bool packed_;
  std::vector<int> object_fds_;         // per source object, the mirror's file (read-write)
  std::vector<uint32_t> shard_object_;  // per shard, its source object
  std::vector<detail::UniqueFd> owned_fds_;

  std::unique_ptr<SharedState> shared_;  // its lock guards what follows
  detail::UniqueFd slot_lock_;           // futures/N.lock: this process's slot, held
  detail::UniqueFd leader_lock_;         // leader.lock, held while leading
  detail::UniqueFd open_lock_;           // the mirror's open.lock, taken shared to evict
  uint32_t slot_ = 0;
  bool stop_ = false;
  std::atomic<bool> told_bypass_{false};
  CacheStats stats_;  // this process's (the source's counters: its own fetches)
  uint64_t base_bytes_ = 0, base_requests_ = 0;

  // This process's future: its current plan's batches (release() marks them built).
  std::vector<uint8_t> released_;
  uint64_t first_unbuilt_ = 0;

  // The leader's, under the lock.
  bool leader_ = false;
  NodeFuture future_;
  std::chrono::steady_clock::time_point checked_alive_;
  std::vector<uint64_t> last_used_;  // per sample (lru): tick of its last use
  uint64_t cursor_ = 0;              // where the fetch walk stands (a position of future_)
  uint64_t window_ = 0;              // positions the walk may run ahead of future_.now()
  std::vector<uint64_t> demand_;     // samples a batch waits for, fetched first
  uint64_t tick_ = 0;
  uint64_t used_ = 0, in_flight_ = 0;
  // Eviction candidates: (priority, sample), max first; stale entries are skipped.
  std::vector<std::pair<uint64_t, uint64_t>> heap_;
  bool degraded_ = false;
  std::thread thread_;
};

}  // namespace sluice::cache
