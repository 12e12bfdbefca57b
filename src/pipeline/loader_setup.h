#pragma once

// What a Loader is made of, set up once from its options: the dataset (or a cached dataset's
// mirror and its node cache), the files its threads read, the fields as batches carry them
// (after transforms), what every BatchBuilder is given, the batch memory's kind, and the shard
// server when this node serves others. The Loader (loader.cc) keeps only stepping and state.

#include <sluice/loader.h>
#include <sluice/server.h>

#include "cache/sample_cache.h"
#include "pipeline/batch_builder.h"
#include "read/dataset_files.h"

#include <memory>
#include <string>
#include <vector>

namespace sluice::pipeline {

struct LoaderParts {
  LoaderOptions options;  // resolved: distributed.peers, io.threads
  std::shared_ptr<Dataset> dataset;
  std::unique_ptr<read::DatasetFiles> files;
  std::shared_ptr<const std::vector<FieldSpec>> fields;  // as batches carry them
  BuildOptions build;                         // its transform_skipped is the Loader's to set
  bool pin = false;                           // batch buffers page-locked (device: pinned / cuda:N)
  std::string token;                          // the cluster's shared token
  std::unique_ptr<cache::SampleCache> cache;  // s3:// or cache.dir: the node cache
  std::unique_ptr<ShardServer> server;        // distributed.listen: this node's shards
};

/// Opens everything `options` names, in order (dataset, files, io.threads: auto, transforms,
/// cache, server), logging each choice once. Throws sluice::Error naming the key or file.
LoaderParts set_up_loader(const LoaderOptions& options);

}  // namespace sluice::pipeline
