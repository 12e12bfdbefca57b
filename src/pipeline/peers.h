#pragma once

// Remote reads: the samples of shards that are not on this node, from the peers that serve
// them (distributed.peers), with failover to the next replica. A PeerSet is the loader's:
// which peer serves which shard, which peers are dead and why, and one connection per peer
// (an endpoint on one UCX worker) that every loader thread uses. Each thread reads through a
// PeerReads of its own, which holds its batch's calls.

#include "net/client.h"

#include <sluice/dataset.h>
#include <sluice/options.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

namespace sluice::pipeline {

class PeerSet {
 public:
  /// Throws Error(kConfig) for a peer's shard past the dataset's and for a shard that is
  /// neither on this node nor served by any peer.
  /// `cancel`: the loader's flag, set when it stops (waits for peers end then).
  PeerSet(std::shared_ptr<const Dataset> dataset, const DistributedOptions& options,
          std::string token, bool verify, const std::atomic<bool>* cancel = nullptr);

  /// Whether sample `index` is read from a peer (its shard is not on this node).
  bool remote(uint64_t index) const;
  /// The connection to `peer`, made on first use (one thread connects, others needing it wait).
  /// Throws what connecting throws.
  std::shared_ptr<net::PeerClient> client(size_t peer);
  /// Forgets `client` as `peer`'s connection (it failed); calls still on it finish or fail.
  void drop(size_t peer, const std::shared_ptr<net::PeerClient>& client);
  /// The first live peer that serves `shard`; throws Error(kIo) naming the shard, the sample
  /// and why each of its peers died when none is left.
  size_t choose(uint32_t shard, uint64_t index) const;
  /// Marks `peer` dead (the first reason sticks, and is logged once): its shards go to their
  /// replicas from now on, in every thread.
  void mark_dead(size_t peer, const std::string& why);
  /// The loader is stopping (its cancel flag is set).
  bool cancelled() const { return cancel_ && cancel_->load(); }
  bool dead(size_t peer) const;

  const Dataset& dataset() const { return *dataset_; }

 private:
  net::ClientOptions client_options() const {
    net::ClientOptions o{token_, options_.peer_timeout_ms, verify_};
    o.cancel = cancel_;
    return o;
  }

  std::shared_ptr<const Dataset> dataset_;
  DistributedOptions options_;
  std::string token_;
  bool verify_;
  const std::atomic<bool>* cancel_;               // the loader's: set when it stops
  std::vector<std::vector<size_t>> shard_peers_;  // per shard: peers serving it, replicas in order
  mutable std::mutex mu_;
  std::vector<std::string> failure_;           // per peer: why it is dead ("" = alive)
  std::shared_ptr<net::ClientWorker> worker_;  // every connection's, made with the first
  struct Connection {
    std::mutex mu;  // held while connecting
    std::shared_ptr<net::PeerClient> client;
  };
  std::vector<std::unique_ptr<Connection>> connections_;  // per peer
};

/// A sample to read from a peer: where it goes in the batch, and which it is.
struct RemoteSample {
  size_t position = 0;
  uint64_t index = 0;
};

/// One thread's remote reads (not thread-safe): the calls of its batch under way, on the
/// PeerSet's shared connections.
class PeerReads {
 public:
  explicit PeerReads(PeerSet& peers);
  ~PeerReads();
  PeerReads(const PeerReads&) = delete;
  PeerReads& operator=(const PeerReads&) = delete;

  /// Sends `samples` of a batch of `batch_size`, each to the first live peer that serves its
  /// shard, every peer's requests at once; a peer that cannot take them is marked dead and its
  /// samples go to the next replica. With `slots`, a record of exactly `slot_bytes` lands at
  /// slots + position * slot_bytes instead of in a reply buffer. Throws as PeerSet::choose.
  void start(std::span<const RemoteSample> samples, size_t batch_size, std::byte* slots = nullptr,
             uint64_t slot_bytes = 0);
  /// Waits for what start() sent, sending the samples of peers that failed meanwhile to their
  /// replicas until every sample is in or one has no peer left (Error(kIo), as above). Throws
  /// what a replica would not fix (the server refused: a wrong token, a sample it lacks) as the
  /// client does. Every record is checked against its checksum (unless verify is off).
  void finish();
  /// Sample `position`'s record (after finish()); valid until the next start().
  std::span<const std::byte> record(size_t position) const { return record_[position]; }
  /// A batch given up on midway: drops the connections that still have replies due.
  void abandon();

 private:
  struct Call;  // requests sent to one peer and not yet finished
  std::vector<RemoteSample> send(std::span<const RemoteSample> samples);
  std::vector<RemoteSample> collect();
  bool call(Call& c, bool start);
  uint64_t sample_bytes_guess(uint64_t index) const;

  static constexpr size_t kPerRequest = 1024;  // samples per request, at most
  static constexpr uint64_t kRequestBytes = 64 << 20;

  PeerSet& peers_;
  std::vector<Call> calls_;
  std::vector<std::span<const std::byte>> record_;  // per batch position
  // One per request this batch; a deque, so that growing it (a failover while other requests are
  // in flight) moves none that a destination names.
  std::deque<std::vector<uint64_t>> reply_buffers_;
  size_t buffers_used_ = 0;                    // reply buffers this batch
  std::vector<std::vector<std::byte>> owned_;  // separate records kept by the client
  std::byte* slots_ = nullptr;
  uint64_t slot_bytes_ = 0;
};

}  // namespace sluice::pipeline
