#include "net/record_replies.h"

#include "format/layout.h"
#include "read/record_reader.h"

#include <fmt/format.h>

#include <chrono>
#include <cstring>
#include <vector>

namespace sluice::net {

RecordReplies::RecordReplies(std::shared_ptr<const Dataset> dataset, const ServerOptions& options,
                             std::shared_ptr<const io::Faults> faults, ReplyBuffers& buffers)
    : dataset_(std::move(dataset)),
      options_(options),
      buffers_(buffers),
      files_(dataset_, options.io.direct, "server io.direct", /*may_warm=*/true) {
  // Through the page cache, a packed dataset's shards are also mapped: a large record is sent
  // straight from there (the kernel copies it into the socket, or the NIC reads it), never
  // touched here (its stored checksum is what the client checks it against).
  files_.map_shards();
  std::string engine;
  io::EngineOptions eo = read::engine_options(options_.io);
  eo.faults = std::move(faults);
  io_ = std::make_unique<io::Service>(eo, files_.fds(),
                                      [&](const std::string& line) { engine = line; });
  const std::string& why = files_.why();
  description_ = fmt::format(
      "{}; {}", engine,
      files_.direct() ? "direct I/O (O_DIRECT) on" + (why.empty() ? "" : ": " + why)
                      : "reading through the page cache" +
                            std::string(files_.any_mapped() ? ", large records sent from it" : "") +
                            (why.empty() ? "" : " (" + why + ")"));
  // The data fits in memory (io.direct: auto chose the page cache): read it in before clients
  // ask, so that their first epoch does not pay a random disk read per sample.
  files_.start_warming();
}

// Reads the job's records with the IO engine straight into a pooled reply buffer: each record
// inside its block-aligned cover under direct I/O (RecordInfo says where), back to back
// otherwise. Records of at least job.separate_bytes go in messages of their own: from the
// shard's mapping when reading through the page cache (no read, no copy here: the transport
// takes them from the page cache), else from where they were read, after the table. The
// stored checksums go along unchecked: the client checks every record end to end. Datasets
// without stored checksums (read in place) get them computed here, so transit is covered.
std::unique_ptr<Reply> RecordReplies::build(const Job& job, uint64_t& record_bytes) {
  auto reply = std::make_unique<Reply>();
  reply->conn = job.conn;
  reply->header.request_id = job.request_id;
  try {
    const size_t n = job.indices.size();
    std::vector<RecordInfo> infos(n);
    read::ReadPlan plan(*dataset_, files_.direct());
    std::vector<uint64_t> read_at(n);  // where a separate record that is read lands
    std::vector<SampleExtent> extents(n);
    for (size_t i = 0; i < n; ++i) extents[i] = dataset_->extent(job.indices[i]);
    auto separate = [&](size_t i) {
      return job.separate_bytes > 0 && extents[i].size >= job.separate_bytes;
    };
    auto mapped = [&](size_t i) -> const std::byte* {
      const SampleExtent& e = extents[i];
      std::span<const std::byte> m = files_.mapped(e.shard);
      return !m.empty() && e.offset <= m.size() && e.size <= m.size() - e.offset
                 ? m.data() + e.offset
                 : nullptr;
    };
    for (size_t i = 0; i < n; ++i) {
      infos[i] = {kSeparate, extents[i].size, extents[i].checksum};
      record_bytes += extents[i].size;
      if (separate(i)) {
        ++reply->header.separate;
        continue;
      }
      // Not merged: the client takes records laid out in request order, each after the last.
      infos[i].offset = plan.add(job.indices[i], extents[i], /*merge=*/false);
    }
    const uint64_t table = plan.reserve(n * sizeof(RecordInfo), 8);
    const uint64_t reply_bytes = plan.bytes();
    for (size_t i = 0; i < n; ++i)  // separate records not sent from a mapping: read them too
      if (separate(i) && !mapped(i)) read_at[i] = plan.add(job.indices[i], extents[i], false);
    if (plan.bytes() > options_.max_reply_bytes) {
      record_bytes = 0;
      set_message(*reply, buffers_, ReplyStatus::kTooLarge,
                  fmt::format("reply of {} bytes is over the server's limit of {}", plan.bytes(),
                              options_.max_reply_bytes));
      return reply;
    }
    reply->buffer = buffers_.take(plan.bytes());
    std::byte* out = reply->buffer.data();
    plan.bind(out);
    if (!plan.empty()) {
      auto deadline =
          std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.io.timeout_ms);
      io::ReadFailure f = io_->read_all(plan.ops(), deadline);
      // Reads given up on may still land in this buffer: it is never reused (the error text
      // goes out of a fresh one).
      if (f.in_flight) buffers_.leak(reply->buffer);
      if (f.error != 0) plan.fail(f, options_.io.timeout_ms);
    }
    for (size_t i = 0; i < n; ++i) {
      const std::byte* record = nullptr;
      if (!separate(i)) {
        record = out + infos[i].offset;
      } else {
        const std::byte* m = mapped(i);
        record = m ? m : out + read_at[i];
        Part part;
        part.header.request_id = job.request_id;
        part.header.record = static_cast<uint32_t>(i);
        part.header.size = extents[i].size;
        part.data = record;
        reply->parts.push_back(part);
      }
      if (!dataset_->packed())
        infos[i].checksum = format::record_checksum(record, infos[i].size, job.indices[i]);
    }
    std::memcpy(out + table, infos.data(), n * sizeof(RecordInfo));
    reply->size = reply_bytes;
    reply->header.data_bytes = reply_bytes;
    reply->header.count = static_cast<uint32_t>(n);
    return reply;
  } catch (const std::exception& e) {
    record_bytes = 0;
    set_message(*reply, buffers_, ReplyStatus::kReadError, e.what());
    return reply;
  }
}

}  // namespace sluice::net
