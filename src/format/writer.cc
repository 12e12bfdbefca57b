#include "common/errors.h"
#include "common/file.h"
#include "format/layout.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <deque>
#include <future>
#include <random>
#include <set>
#include <system_error>

namespace sluice {

using detail::fail;
namespace fs = std::filesystem;

namespace {

void validate_options(const WriterOptions& o) {
  if (o.fields.empty()) fail(ErrorCode::kInvalidArgument, "dataset schema has no fields");
  std::set<std::string> names;
  for (const auto& f : o.fields) {
    if (f.name.empty() || f.name.size() > 255 || !names.insert(f.name).second)
      fail(ErrorCode::kInvalidArgument, "field name \"{}\" is empty, too long or repeated", f.name);
    if (dtype_size(f.dtype) == 0)
      fail(ErrorCode::kInvalidArgument, "field \"{}\": invalid dtype", f.name);
    if (f.shape.size() > 32)
      fail(ErrorCode::kInvalidArgument, "field \"{}\": rank over 32", f.name);
    for (int64_t d : f.shape)
      if (d < -1) fail(ErrorCode::kInvalidArgument, "field \"{}\": bad dimension {}", f.name, d);
  }
  if (o.alignment < format::kMinAlignment || o.alignment > format::kMaxAlignment ||
      !std::has_single_bit(o.alignment))
    fail(ErrorCode::kInvalidArgument, "alignment {} is not a power of two in [{}, {}]", o.alignment,
         format::kMinAlignment, format::kMaxAlignment);
  if (o.shard_bytes == 0 || o.shard_samples == 0)
    fail(ErrorCode::kInvalidArgument, "shard size limits must be positive");
  for (const auto& c : o.classes)
    if (c.size() > UINT16_MAX) fail(ErrorCode::kInvalidArgument, "class name over 64 KiB");
}

class Writer final : public DatasetWriter {
 public:
  Writer(const fs::path& dir, const WriterOptions& options)
      : options_(options), layout_(options.fields), dest_(fs::absolute(dir)) {
    validate_options(options_);
    std::error_code ec;
    if (fs::exists(dest_, ec) && !options_.overwrite && !fs::is_empty(dest_, ec))
      fail(ErrorCode::kInvalidArgument, "{}: already exists (remove it or pass --force)",
           dest_.string());
    fs::path parent = dest_.parent_path();
    if (!fs::is_directory(parent, ec))
      fail(ErrorCode::kNotFound, "{}: parent directory does not exist", dest_.string());
    std::random_device rd;
    dataset_id_ = (uint64_t{rd()} << 32) ^ rd();
    staging_ = parent / fmt::format(".{}.partial-{}-{:08x}", dest_.filename().string(), getpid(),
                                    static_cast<uint32_t>(dataset_id_));
    if (!fs::create_directory(staging_, ec) || ec)
      detail::fail_errno(ec.value() ? ec.value() : EEXIST, "mkdir " + staging_.string());
    buffer_.reserve(kBufferBytes);
  }

  ~Writer() override {
    if (!finished_) {
      fd_.reset();
      syncing_.clear();  // waits for the shards' fsyncs
      std::error_code ec;
      fs::remove_all(staging_, ec);  // best effort; a killed process leaves a hidden .partial dir
    }
  }

  uint64_t add(std::span<const std::span<const std::byte>> fields) override {
    if (finished_) fail(ErrorCode::kInvalidArgument, "{}: add() after finish()", dest_.string());
    lengths_.resize(fields.size());
    for (size_t i = 0; i < fields.size(); ++i) lengths_[i] = fields[i].size();
    if (auto checked = layout_.check_lengths(lengths_); !checked)
      fail(ErrorCode::kInvalidArgument, "sample {}: {}", num_samples_, checked.error());
    uint64_t size = layout_.record_bytes(lengths_);
    if (size > UINT32_MAX)
      fail(ErrorCode::kInvalidArgument, "sample {}: record of {} bytes exceeds 4 GiB", num_samples_,
           size);

    if (!fd_) open_shard();
    uint64_t offset = format::place_record(cursor_, size, options_.alignment);
    append_zeros(offset - cursor_);
    uint64_t start = buffer_.size();
    // Assemble the record in the write buffer (flushing first if it would not fit) so the
    // checksum is taken over contiguous bytes.
    if (start + size > kBufferBytes && start > 0) {
      flush();
      start = 0;
    }
    buffer_.resize(start + size);
    std::byte* out = buffer_.data() + start;
    uint64_t var_index = 0;
    std::byte* trailer = out + size - layout_.trailer_bytes();
    for (size_t i = 0; i < fields.size(); ++i) {
      if (!fields[i].empty()) std::memcpy(out, fields[i].data(), fields[i].size());
      out += fields[i].size();
      if (!options_.fields[i].fixed_size() && ++var_index < layout_.num_variable()) {
        auto len = static_cast<uint32_t>(fields[i].size());
        std::memcpy(trailer + 4 * (var_index - 1), &len, 4);
      }
    }
    uint64_t index = num_samples_++;
    index_.push_back({offset, static_cast<uint32_t>(size),
                      format::record_checksum(buffer_.data() + start, size, index)});
    cursor_ = offset + size;
    total_bytes_ += size;
    if (buffer_.size() >= kBufferBytes) flush();
    if (cursor_ - format::kShardHeaderBytes >= options_.shard_bytes ||
        index_.size() >= options_.shard_samples)
      close_shard();
    return index;
  }

  void finish() override {
    if (finished_) return;
    if (fd_) close_shard();
    while (!syncing_.empty()) wait_for_sync();
    format::Manifest m;
    m.alignment = options_.alignment;
    m.dataset_id = dataset_id_;
    m.num_samples = num_samples_;
    m.total_bytes = total_bytes_;
    m.fields = options_.fields;
    m.classes = options_.classes;
    m.shards = shards_;
    auto bytes = format::encode_manifest(m);
    fs::path manifest = staging_ / format::kManifestName;
    {
      auto fd = detail::open_file(manifest, O_WRONLY | O_CREAT | O_EXCL);
      detail::write_full(fd.get(), bytes, manifest.string());
      detail::fsync_or_throw(fd.get(), manifest.string());
    }
    detail::fsync_dir(staging_);
    std::error_code ec;
    fs::path old;
    if (fs::exists(dest_, ec)) {
      old = dest_.parent_path() / fmt::format(".{}.old-{}", dest_.filename().string(), getpid());
      fs::rename(dest_, old, ec);
      if (ec) detail::fail_errno(ec.value(), "rename " + dest_.string());
    }
    fs::rename(staging_, dest_, ec);
    if (ec) detail::fail_errno(ec.value(), "rename " + staging_.string() + " to " + dest_.string());
    detail::fsync_dir(dest_.parent_path());
    finished_ = true;
    if (!old.empty()) fs::remove_all(old, ec);
  }

  uint64_t num_samples() const override { return num_samples_; }
  uint64_t bytes_written() const override { return total_bytes_; }

 private:
  static constexpr size_t kBufferBytes = 4 << 20;
  static constexpr uint64_t kWritebackLag = 16ull << 20;
  static constexpr size_t kSyncsInFlight = 4;

  void open_shard() {
    shard_path_ = staging_ / format::shard_name(static_cast<uint32_t>(shards_.size()));
    fd_ = detail::open_file(shard_path_, O_WRONLY | O_CREAT | O_EXCL);
    first_sample_ = num_samples_;
    cursor_ = format::kShardHeaderBytes;
    file_pos_ = cursor_;
    written_back_ = 0;
    index_.clear();
    buffer_.clear();
  }

  void append_zeros(uint64_t n) {
    if (buffer_.size() + n > kBufferBytes) flush();
    buffer_.resize(buffer_.size() + n, std::byte{0});
  }

  void flush() {
    detail::write_full(fd_.get(), buffer_, shard_path_.string(), static_cast<int64_t>(file_pos_));
    // Writeback of these bytes starts now, so the device works while the next records are
    // assembled, and what was started kWritebackLag ago is waited for: the shard's fsync
    // finds little left to write (it was a stall of a whole shard's bytes: packing ran at
    // 0.46x of the disk's sequential write) and dirty memory stays bounded. Hints only:
    // a failed writeback is reported by that fsync.
    const uint64_t begin = file_pos_;
    file_pos_ += buffer_.size();
    ::sync_file_range(fd_.get(), static_cast<off_t>(begin), static_cast<off_t>(buffer_.size()),
                      SYNC_FILE_RANGE_WRITE);
    if (file_pos_ > written_back_ + kWritebackLag) {
      const uint64_t end = file_pos_ - kWritebackLag;
      ::sync_file_range(
          fd_.get(), static_cast<off_t>(written_back_), static_cast<off_t>(end - written_back_),
          SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
      written_back_ = end;
    }
    buffer_.clear();
  }

  void wait_for_sync() {
    auto sync = std::move(syncing_.front());
    syncing_.pop_front();
    sync.get();  // rethrows the fsync's error
  }

  void close_shard() {
    flush();
    format::ShardHeader h{};
    h.dataset_id = dataset_id_;
    h.shard_id = static_cast<uint32_t>(shards_.size());
    h.alignment = options_.alignment;
    h.first_sample = first_sample_;
    h.num_samples = index_.size();
    h.data_offset = format::kShardHeaderBytes;
    h.data_end = cursor_;
    h.index_offset = format::align_up(cursor_, format::kPageBytes);
    auto index_bytes = std::as_bytes(std::span(index_));
    h.file_bytes = h.index_offset + index_bytes.size();
    h.index_checksum = format::checksum64(index_bytes.data(), index_bytes.size());
    format::seal_shard_header(h);
    detail::write_full(fd_.get(), index_bytes, shard_path_.string(),
                       static_cast<int64_t>(h.index_offset));
    std::vector<std::byte> block(format::kShardHeaderBytes);
    std::memcpy(block.data(), &h, sizeof(h));
    detail::write_full(fd_.get(), block, shard_path_.string(), 0);
    // The index starts page-aligned, so a dataset of empty records still has a full-size file.
    if (::ftruncate(fd_.get(), static_cast<off_t>(h.file_bytes)) != 0)
      detail::fail_errno(errno, "truncate " + shard_path_.string());
    // The shard's fsync (mostly ext4's journal commit: a quarter of a 1 GB pack's time, spent
    // with the device idle) runs beside the next shard's writes; finish() waits for every one
    // before it writes the manifest, and a failure surfaces there.
    if (syncing_.size() >= kSyncsInFlight) wait_for_sync();
    syncing_.push_back(std::async(std::launch::async, [fd = std::move(fd_), path = shard_path_] {
      detail::fsync_or_throw(fd.get(), path.string());
    }));
    shards_.push_back({shard_path_.filename().string(), h.num_samples, h.file_bytes});
  }

  WriterOptions options_;
  format::RecordLayout layout_;
  fs::path dest_;
  fs::path staging_;
  uint64_t dataset_id_ = 0;
  bool finished_ = false;

  detail::UniqueFd fd_;
  std::deque<std::future<void>> syncing_;  // closed shards' fsyncs, oldest first
  fs::path shard_path_;
  uint64_t first_sample_ = 0;
  uint64_t cursor_ = 0;        // logical end of data in the current shard
  uint64_t file_pos_ = 0;      // file offset of buffer_[0]
  uint64_t written_back_ = 0;  // the shard's bytes before this are on the device
  std::vector<std::byte> buffer_;
  std::vector<format::IndexEntry> index_;
  std::vector<uint64_t> lengths_;
  std::vector<format::ShardEntry> shards_;
  uint64_t num_samples_ = 0;
  uint64_t total_bytes_ = 0;
};

}  // namespace

DatasetWriter::~DatasetWriter() = default;

std::unique_ptr<DatasetWriter> DatasetWriter::create(const fs::path& dir,
                                                     const WriterOptions& options) {
  return std::make_unique<Writer>(dir, options);
}

}  // namespace sluice
