#include "net/checkpoint_replies.h"

#include <sluice/error.h>

#include <cstring>
#include <string>

namespace sluice::net {

std::unique_ptr<Reply> checkpoint_reply(ReplicaStore& store, ReplyBuffers& buffers,
                                        const Job& job) {
  auto reply = std::make_unique<Reply>();
  reply->conn = job.conn;
  reply->header.request_id = job.request_id;
  const CheckpointRequest& r = *job.checkpoint;
  try {
    std::string text;
    switch (r.header.op) {
      case CheckpointOp::kWrite:
        store.write(r);
        break;
      case CheckpointOp::kCommit:
        store.commit(r);
        break;
      case CheckpointOp::kPublish:
        store.publish(r);
        break;
      case CheckpointOp::kList:
        text = store.list(r.checkpoint);
        break;
      case CheckpointOp::kRead: {
        const size_t n = r.header.length;
        reply->buffer = buffers.take(n + sizeof(uint64_t));
        store.read(r, {reply->buffer.data(), n});
        const uint64_t sum = checkpoint_chunk_checksum({reply->buffer.data(), n}, r.header.offset);
        std::memcpy(reply->buffer.data() + n, &sum, sizeof sum);
        reply->size = n + sizeof sum;
        reply->header.data_bytes = reply->size;
        return reply;
      }
    }
    set_message(*reply, buffers, ReplyStatus::kOk, text);
  } catch (const Error& e) {
    set_message(*reply, buffers,
                e.code() == ErrorCode::kNotFound          ? ReplyStatus::kNotFound
                : e.code() == ErrorCode::kInvalidArgument ? ReplyStatus::kBadRequest
                                                          : ReplyStatus::kReadError,
                e.what());
  } catch (const std::exception& e) {
    set_message(*reply, buffers, ReplyStatus::kReadError, e.what());
  }
  return reply;
}

}  // namespace sluice::net
