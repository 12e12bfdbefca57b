// `sluice pack`: into a packed dataset, from a directory tree (one file per sample and the
// first directory under the root as the label: torchvision's ImageFolder layout), or from a source
// the loader also reads in place (a .npy array, a token file), sample by sample.

#include <sluice/sluice.h>

#include "cli/commands.h"
#include "cli/progress.h"
#include "common/errors.h"

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

// Whatever Dataset::open_source reads in place (a tree of files, a .npy array, a token file),
// written sample by sample with the same fields, dtypes, shapes and classes.
int pack_source(const PackArgs& args, DatasetFormat format) {
  if (args.sources.size() != 1)
    fail(ErrorCode::kInvalidArgument, "--format {} takes one source, got {}",
         format == DatasetFormat::kFiles ? "files" : args.format, args.sources.size());
  DatasetOptions source;
  source.path = args.sources[0];
  source.format = format;
  source.seq_len = args.seq_len;
  source.stride = args.stride;
  source.token_bytes = args.dtype == "uint32" ? 4 : 2;
  auto ds = Dataset::open_source(source);
  WriterOptions options;
  options.fields = ds->fields();
  options.classes = ds->classes();
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
                                {"classes", ds->classes().size()},
                                {"bytes", writer->bytes_written()},
                                {"path", fs::absolute(args.output).string()}}
              << "\n";
  else
    fmt::print("packed {} samples ({} bytes) into {}\n", ds->num_samples(), writer->bytes_written(),
               args.output.string());
  return 0;
}

}  // namespace

bool arrow_source(const fs::path& path) {
  auto arrow_file = [](const fs::path& p) {
    return p.extension() == ".parquet" || p.extension() == ".arrow";
  };
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return arrow_file(path);  // missing: pyarrow's error names it
  for (const auto& entry : fs::directory_iterator(path, ec))
    if (entry.is_regular_file(ec) && arrow_file(entry.path())) return true;
  return false;
}

int run_pack(const PackArgs& args, const ArrowPack& arrow) {
  if (args.format == "parquet" ||
      (args.format == "auto" && !args.sources.empty() &&
       std::all_of(args.sources.begin(), args.sources.end(), arrow_source))) {
    if (!arrow)
      fail(ErrorCode::kUnsupported,
           "{}: parquet and Arrow sources are read with pyarrow: use the `sluice` command that "
           "`pip install sluice pyarrow` installs, or sluice.pack() from Python",
           args.sources.empty() ? "" : args.sources[0].string());
    return arrow(args);
  }
  bool one_file = args.sources.size() == 1 && fs::is_regular_file(args.sources[0]);
  if (args.format == "npy" ||
      (args.format == "auto" && one_file && args.sources[0].extension() == ".npy"))
    return pack_source(args, DatasetFormat::kNpy);
  if (args.format == "tokens" || (args.format == "auto" && one_file && args.seq_len > 0))
    return pack_source(args, DatasetFormat::kTokens);
  if (args.format == "tar" ||
      (args.format == "auto" && args.sources.size() == 1 && args.sources[0].extension() == ".tar"))
    return pack_source(args, DatasetFormat::kTar);
  if (args.format == "auto" && args.sources.size() == 1 && fs::is_directory(args.sources[0]))
    return pack_source(args, DatasetFormat::kAuto);  // a directory of .tar shards, or a tree
  return pack_source(args, DatasetFormat::kFiles);
}

}  // namespace sluice::cli
