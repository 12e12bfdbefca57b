// `sluice pack`: into a packed dataset, from a directory tree (one file per sample and the
// parent directory's name as the label: torchvision's ImageFolder layout), or from a source the
// loader also reads in place (a .npy array, a token file), sample by sample.

#include <sluice/sluice.h>

#include "cli/commands.h"
#include "cli/progress.h"
#include "common/errors.h"
#include "common/file.h"

#include <fcntl.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <iostream>
#include <map>

namespace sluice::cli {

namespace fs = std::filesystem;
using detail::fail;

uint64_t parse_size(const std::string& text) {
  size_t pos = 0;
  while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) ++pos;
  std::string suffix = text.substr(pos);
  static const std::map<std::string, uint64_t> kUnits = {{"", 1},           {"B", 1},
                                                         {"K", 1ull << 10}, {"KiB", 1ull << 10},
                                                         {"M", 1ull << 20}, {"MiB", 1ull << 20},
                                                         {"G", 1ull << 30}, {"GiB", 1ull << 30},
                                                         {"T", 1ull << 40}, {"TiB", 1ull << 40}};
  auto unit = kUnits.find(suffix);
  if (pos == 0 || pos > 15 || unit == kUnits.end())
    fail(ErrorCode::kInvalidArgument, "size \"{}\": expected bytes, optionally with K, M, G or T",
         text);
  uint64_t value = std::stoull(text.substr(0, pos)) * unit->second;
  if (value == 0) fail(ErrorCode::kInvalidArgument, "size \"{}\" must be positive", text);
  return value;
}

namespace {

struct SourceFile {
  fs::path path;
  std::string label;
};

bool hidden(const fs::path& p) { return p.filename().string().starts_with("."); }

std::vector<SourceFile> scan_tree(const fs::path& root) {
  std::error_code ec;
  if (!fs::exists(root, ec))
    throw Error(ErrorCode::kNotFound, fmt::format("{}: no such directory", root.string()), ENOENT);
  if (!fs::is_directory(root, ec))
    fail(ErrorCode::kInvalidArgument,
         "{}: not a directory (pack --format files takes a tree "
         "of class directories)",
         root.string());
  std::vector<SourceFile> files;
  auto it = fs::recursive_directory_iterator(root, fs::directory_options::none, ec);
  if (ec) detail::fail_errno(ec.value(), "list " + root.string());
  for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) detail::fail_errno(ec.value(), "list " + it->path().string());
    if (hidden(it->path())) {
      if (it->is_directory()) it.disable_recursion_pending();
      continue;
    }
    if (!it->is_regular_file(ec)) continue;
    fs::path rel = it->path().lexically_relative(root);
    if (!rel.has_parent_path())
      fail(ErrorCode::kInvalidArgument,
           "{}: not inside a class directory (expected "
           "SRC/<label>/<file>)",
           it->path().string());
    files.push_back({it->path(), it->path().parent_path().filename().string()});
  }
  std::sort(files.begin(), files.end(),
            [](const SourceFile& a, const SourceFile& b) { return a.path < b.path; });
  return files;
}

}  // namespace

namespace {

// npy and tokens: whatever Dataset::open_source reads, written sample by sample with the
// same fields, dtype and shape.
int pack_in_place_source(const PackArgs& args, DatasetFormat format) {
  if (args.sources.size() != 1)
    fail(ErrorCode::kInvalidArgument, "--format {} takes one source file, got {}", args.format,
         args.sources.size());
  DatasetOptions source;
  source.path = args.sources[0];
  source.format = format;
  source.seq_len = args.seq_len;
  source.stride = args.stride;
  source.token_bytes = args.dtype == "uint32" ? 4 : 2;
  auto ds = Dataset::open_source(source);
  WriterOptions options;
  options.fields = ds->fields();
  options.shard_bytes = args.shard_bytes;
  options.alignment = args.alignment;
  options.overwrite = args.force;
  auto writer = DatasetWriter::create(args.output, options);
  Progress progress("pack", ds->num_samples(), "samples", !args.json);
  std::vector<std::byte> record;
  for (uint64_t i = 0; i < ds->num_samples(); ++i) {
    record.resize(ds->extent(i).size);
    ds->read_record_into(i, record);
    writer->add(ds->parse_record(i, record).fields);
    progress.update(i + 1);
  }
  writer->finish();
  progress.finish();
  if (args.json)
    std::cout << nlohmann::json{{"samples", ds->num_samples()},
                                {"bytes", writer->bytes_written()},
                                {"path", fs::absolute(args.output).string()}}
              << "\n";
  else
    fmt::print("packed {} samples ({} bytes) into {}\n", ds->num_samples(), writer->bytes_written(),
               args.output.string());
  return 0;
}

}  // namespace

int run_pack(const PackArgs& args) {
  bool one_file = args.sources.size() == 1 && fs::is_regular_file(args.sources[0]);
  if (args.format == "npy" ||
      (args.format == "auto" && one_file && args.sources[0].extension() == ".npy"))
    return pack_in_place_source(args, DatasetFormat::kNpy);
  if (args.format == "tokens" || (args.format == "auto" && one_file && args.seq_len > 0))
    return pack_in_place_source(args, DatasetFormat::kTokens);
  if (args.format != "auto" && args.format != "files")
    fail(ErrorCode::kUnsupported,
         "--format {}: this build packs directory trees, .npy arrays and token files "
         "(--format files, npy, tokens)",
         args.format);
  if (args.sources.size() != 1)
    fail(ErrorCode::kInvalidArgument, "--format files takes one source directory, got {}",
         args.sources.size());
  const fs::path& root = args.sources[0];
  std::vector<SourceFile> files = scan_tree(root);
  if (files.empty()) fail(ErrorCode::kInvalidArgument, "{}: no files to pack", root.string());

  std::vector<std::string> classes;
  for (const auto& f : files) classes.push_back(f.label);
  std::sort(classes.begin(), classes.end());
  classes.erase(std::unique(classes.begin(), classes.end()), classes.end());

  WriterOptions options;
  options.fields = {{"data", DType::kUInt8, {-1}}, {"label", DType::kInt64, {}}};
  options.shard_bytes = args.shard_bytes;
  options.alignment = args.alignment;
  options.classes = classes;
  options.overwrite = args.force;
  auto writer = DatasetWriter::create(args.output, options);

  Progress progress("pack", files.size(), "files", !args.json);
  std::vector<std::byte> data;
  for (size_t i = 0; i < files.size(); ++i) {
    const auto& f = files[i];
    auto fd = detail::open_file(f.path, O_RDONLY);
    uint64_t size = detail::file_size(fd.get(), f.path.string());
    data.resize(size);
    if (detail::pread_full(fd.get(), data, 0, f.path.string()) != size)
      fail(ErrorCode::kIo, "{}: file shrank while packing", f.path.string());
    auto label = static_cast<int64_t>(std::lower_bound(classes.begin(), classes.end(), f.label) -
                                      classes.begin());
    std::span<const std::byte> fields[] = {data, std::as_bytes(std::span(&label, 1))};
    writer->add(fields);
    progress.update(i + 1);
  }
  writer->finish();
  progress.finish();
  if (args.json) {
    std::cout << nlohmann::json{{"samples", files.size()},
                                {"classes", classes.size()},
                                {"bytes", writer->bytes_written()},
                                {"path", fs::absolute(args.output).string()}}
              << "\n";
  } else {
    fmt::print("packed {} samples ({} classes, {} bytes) into {}\n", files.size(), classes.size(),
               writer->bytes_written(), args.output.string());
  }
  return 0;
}

}  // namespace sluice::cli
