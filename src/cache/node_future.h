#pragma once

// What the processes sharing a node's cache will read next, as the leader sees it: each
// process's future (the rest of its epoch, then the next: what the sampler knows), which it
// writes to futures/N (N: its slot), merged step by step from where each stands (the ranks of
// a job move in step), and how far all of them have got. A sample's next use is its first
// position in that union: the key of Belady's rule for the whole node.

#include "cache/shared_state.h"
#include "common/file.h"

#include <cstdint>
#include <filesystem>
#include <functional>
#include <vector>

namespace sluice::cache {

class NodeFuture {
 public:
  static constexpr uint32_t kNever = UINT32_MAX;

  /// `dir`: the cache's directory (its futures/ holds the processes' futures).
  NodeFuture(std::filesystem::path dir, uint64_t samples);

  /// Takes the first free process slot: `slot` gets N, whose lock (futures/N.lock, returned)
  /// the process holds while it lives. `alone`: no other slot is held. Throws when all are.
  static detail::UniqueFd claim_slot(const std::filesystem::path& dir, uint32_t& slot, bool& alone);

  /// Writes a process's future: `steps` (each batch's first position in `order`, and one more
  /// at the end) over the samples `order`, as generation `gen` of slot `slot`. Throws.
  static void write(const std::filesystem::path& dir, uint32_t slot, uint32_t gen,
                    const std::vector<uint64_t>& steps, const std::vector<uint64_t>& order);

  /// Under the shared lock: reads the futures that changed and forgets those of processes that
  /// ended (with `check_alive`, each slot's lock is tested: -9 leaves the record behind; `self`
  /// is not). Returns true when the union was built again: positions start over from where
  /// each process stands. Throws naming a damaged future file.
  bool refresh(ProcessRecord* processes, uint32_t self, bool check_alive);

  /// Under the shared lock: moves past the union's steps that every process has built; their
  /// samples' next uses move on, and `moved` is called for each.
  void advance(const ProcessRecord* processes, const std::function<void(uint64_t)>& moved);

  const std::vector<uint64_t>& order() const { return order_; }  // positions -> samples
  uint32_t next_use(uint64_t sample) const { return next_[sample]; }
  uint64_t now() const { return now_; }  // the first position not built by every process
  uint64_t processes() const;            // those with a future

 private:
  struct Future {
    uint32_t gen = 0;
    std::vector<uint64_t> steps;  // step -> its first position in `order`; one more at the end
    std::vector<uint64_t> order;  // samples
    uint64_t base = 0;            // its first unbuilt step when the union was built
  };
  void read(uint32_t slot, const ProcessRecord& p);
  void build(const ProcessRecord* processes);

  std::filesystem::path dir_;
  uint64_t samples_;
  std::vector<Future> futures_;        // per process slot
  std::vector<uint64_t> order_;        // the union
  std::vector<uint32_t> succ_;         // position -> the same sample's next position, or kNever
  std::vector<uint64_t> union_steps_;  // union step -> its first position; one more at the end
  std::vector<uint32_t> next_;         // per sample: its next position, or kNever
  uint64_t done_ = 0;                  // union steps built by every process
  uint64_t now_ = 0;                   // ... the first position after them
};

}  // namespace sluice::cache
