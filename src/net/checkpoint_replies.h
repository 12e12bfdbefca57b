#pragma once

// The shard server's replies to checkpoint ops (peers' checkpoint copies, net/replica_store.h).

#include "net/replica_store.h"
#include "net/reply.h"

#include <memory>

namespace sluice::net {

/// A reader thread: carries out `job`'s checkpoint op against `store`; its reply (the bytes
/// read and their checksum, the listing, or the error) goes out of a pooled buffer.
std::unique_ptr<Reply> checkpoint_reply(ReplicaStore& store, ReplyBuffers& buffers, const Job& job);

}  // namespace sluice::net
