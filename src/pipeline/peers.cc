#include "pipeline/peers.h"

#include "common/errors.h"
#include "common/log.h"
#include "index/internals.h"

#include <fmt/format.h>

#include <algorithm>
#include <map>

namespace sluice::pipeline {

using detail::fail;
using detail::log_line;

PeerSet::PeerSet(std::shared_ptr<const Dataset> dataset, const DistributedOptions& options,
                 std::string token, bool verify, const std::atomic<bool>* cancel)
    : dataset_(std::move(dataset)),
      options_(options),
      token_(std::move(token)),
      verify_(verify),
      cancel_(cancel) {
  const auto& shards = dataset_->shards();
  shard_peers_.assign(shards.size(), {});
  for (size_t p = 0; p < options_.peers.size(); ++p)
    for (uint32_t shard : options_.peers[p].shards) {
      if (shard >= shards.size())
        fail(ErrorCode::kConfig, "distributed.peers[{}] ({}): shard {}: the dataset has {} shards",
             p, options_.peers[p].address, shard, shards.size());
      shard_peers_[shard].push_back(p);
    }
  for (uint32_t k = 0; k < shards.size(); ++k)
    if (!shards[k].local && shard_peers_[k].empty())
      fail(ErrorCode::kConfig,
           "{}: shard {} is not on this node and no peer in distributed.peers serves it",
           shards[k].path.string(), k);
  failure_.assign(options_.peers.size(), {});
  for (size_t p = 0; p < options_.peers.size(); ++p)
    connections_.push_back(std::make_unique<Connection>());
}

std::shared_ptr<net::PeerClient> PeerSet::client(size_t peer) {
  Connection& c = *connections_[peer];
  std::lock_guard lock(c.mu);
  if (!c.client) {
    std::shared_ptr<net::ClientWorker> worker;
    {
      std::lock_guard set_lock(mu_);  // made with the first connection: none without peers
      if (!worker_) worker_ = std::make_shared<net::ClientWorker>();
      worker = worker_;
    }
    c.client = net::PeerClient::connect(options_.peers[peer].address, client_options(), worker);
  }
  return c.client;
}

void PeerSet::drop(size_t peer, const std::shared_ptr<net::PeerClient>& client) {
  Connection& c = *connections_[peer];
  std::lock_guard lock(c.mu);
  if (c.client == client) c.client.reset();
}

bool PeerSet::remote(uint64_t index) const {
  return !options_.peers.empty() && !dataset_->shards()[index::shard_of(*dataset_, index)].local;
}

size_t PeerSet::choose(uint32_t shard, uint64_t index) const {
  std::lock_guard lock(mu_);
  std::string tried;
  for (size_t p : shard_peers_[shard]) {
    if (failure_[p].empty()) return p;
    tried += (tried.empty() ? "" : "; ") + failure_[p];
  }
  fail(ErrorCode::kIo, "{}: sample {} (shard {}): no peer left that serves it: {}",
       dataset_->shards()[shard].path.string(), index, shard, tried);
}

void PeerSet::mark_dead(size_t peer, const std::string& why) {
  std::lock_guard lock(mu_);
  if (failure_[peer].empty()) {
    failure_[peer] = why;
    log_line(fmt::format("{}; its shards go to their replicas", why));
  }
}

bool PeerSet::dead(size_t peer) const {
  std::lock_guard lock(mu_);
  return !failure_[peer].empty();
}

// Requests sent to one peer and not yet finished. In this order: the call goes first (it may
// wait for receives into the requests' destinations), and before its client.
struct PeerReads::Call {
  size_t peer = 0;
  std::vector<RemoteSample> samples;
  std::vector<net::ReadRequest> requests;
  std::shared_ptr<net::PeerClient> client;
  std::unique_ptr<net::PeerClient::Call> call;
};

PeerReads::PeerReads(PeerSet& peers) : peers_(peers) {}

PeerReads::~PeerReads() { abandon(); }

void PeerReads::start(std::span<const RemoteSample> samples, size_t batch_size, std::byte* slots,
                      uint64_t slot_bytes) {
  record_.assign(batch_size, {});
  buffers_used_ = 0;
  owned_.clear();
  slots_ = slots;
  slot_bytes_ = slot_bytes;
  for (auto left = send(samples); !left.empty();) left = send(left);
}

void PeerReads::finish() {
  // Failed peers' samples go to their replicas until none is left.
  for (auto todo = collect(); !todo.empty(); todo = collect())
    for (auto left = send(todo); !left.empty();) left = send(left);
}

void PeerReads::abandon() { calls_.clear(); }  // each call waits for its receives under way

// Sends each sample to the first live peer that serves its shard, in requests of at most
// kPerRequest samples and about kRequestBytes (estimated from the manifest's shard sizes: a
// server refuses replies over its limit). Returns the samples of peers that could not take
// them (now dead).
std::vector<RemoteSample> PeerReads::send(std::span<const RemoteSample> samples) {
  const Dataset& ds = peers_.dataset();
  std::map<size_t, std::vector<RemoteSample>> by_peer;
  for (const RemoteSample& s : samples)
    by_peer[peers_.choose(index::shard_of(ds, s.index), s.index)].push_back(s);
  std::map<size_t, std::vector<std::pair<size_t, size_t>>> ranges;
  size_t needed = buffers_used_;
  for (auto& [peer, list] : by_peer) {
    auto& r = ranges[peer];
    uint64_t bytes = 0;
    for (size_t j = 0; j < list.size(); ++j) {
      const uint64_t guess = sample_bytes_guess(list[j].index);
      if (r.empty() || r.back().second - r.back().first >= kPerRequest ||
          (bytes + guess > kRequestBytes && bytes > 0)) {
        r.push_back({j, j});
        bytes = 0;
      }
      r.back().second = j + 1;
      bytes += guess;
    }
    needed += r.size();
  }
  // Every request gets a reply buffer of its own; size the list before any destination refers
  // into it.
  if (reply_buffers_.size() < needed) reply_buffers_.resize(needed);
  std::vector<RemoteSample> left;
  for (auto& [peer, list] : by_peer) {
    Call c{peer, std::move(list), {}, nullptr, nullptr};
    const auto& r = ranges[peer];
    c.requests.resize(r.size());
    for (size_t k = 0; k < r.size(); ++k) {
      std::vector<size_t> positions;
      for (size_t j = r[k].first; j < r[k].second; ++j) {
        c.requests[k].indices.push_back(c.samples[j].index);
        positions.push_back(c.samples[j].position);
      }
      c.requests[k].destination = [&buffer = reply_buffers_[buffers_used_++]](size_t bytes) {
        buffer.resize((bytes + 7) / 8);
        return std::span<std::byte>(reinterpret_cast<std::byte*>(buffer.data()), bytes);
      };
      if (slots_)
        c.requests[k].record_destination = [slots = slots_, each = slot_bytes_,
                                            positions = std::move(positions)](size_t record,
                                                                              size_t bytes) {
          if (bytes != each || record >= positions.size()) return std::span<std::byte>();
          return std::span<std::byte>(slots + positions[record] * each, each);
        };
    }
    calls_.push_back(std::move(c));
    if (!call(calls_.back(), /*start=*/true)) {
      left.insert(left.end(), calls_.back().samples.begin(), calls_.back().samples.end());
      calls_.pop_back();
    }
  }
  return left;
}

// Waits for every call under way and points the samples at their records. Returns the samples
// of peers that failed meanwhile (they are marked dead), for their replicas.
std::vector<RemoteSample> PeerReads::collect() {
  std::vector<RemoteSample> failed;
  std::vector<Call> calls;
  calls.swap(calls_);
  for (size_t k = 0; k < calls.size(); ++k) {
    Call& c = calls[k];
    bool ok = false;
    try {
      ok = call(c, /*start=*/false);
    } catch (...) {
      // Not a failure a replica would fix: the calls still out are abandoned with this one.
      for (size_t d = k + 1; d < calls.size(); ++d) calls_.push_back(std::move(calls[d]));
      throw;
    }
    if (!ok) {
      failed.insert(failed.end(), c.samples.begin(), c.samples.end());
      continue;
    }
    size_t j = 0;
    for (net::ReadRequest& r : c.requests) {
      for (auto record : r.record_data) record_[c.samples[j++].position] = record;
      for (auto& owned : r.owned) owned_.push_back(std::move(owned));
    }
  }
  return failed;
}

// Starts (connecting first when needed) or finishes `c`. False when the peer failed: it is
// then marked dead and its connection dropped. Throws for what a replica would not fix.
bool PeerReads::call(Call& c, bool start) {
  try {
    if (start) {
      c.client = peers_.client(c.peer);
      c.call = c.client->start(c.requests);
    } else {
      c.client->finish(*c.call);
      c.call.reset();
    }
    return true;
  } catch (const Error& e) {
    // A peer that is gone, stops answering or sends bytes that fail their checks (garbage,
    // damage on its disk or in transit) is dropped for its replicas.
    c.call.reset();
    if (c.client) peers_.drop(c.peer, c.client);
    // The loader stopping cut the wait short: the peer is not to blame.
    if (peers_.cancelled()) throw;
    if (e.code() != ErrorCode::kIo && e.code() != ErrorCode::kCorruption) throw;
    peers_.mark_dead(c.peer, e.what());
    return false;
  }
}

// A remote sample's size as far as this node knows: its shard's bytes per sample.
uint64_t PeerReads::sample_bytes_guess(uint64_t index) const {
  const Dataset& ds = peers_.dataset();
  const ShardInfo& shard = ds.shards()[index::shard_of(ds, index)];
  return shard.file_bytes / std::max<uint64_t>(1, shard.num_samples) + 1;
}

}  // namespace sluice::pipeline
