// Remote reads through sluice's UCX client from a running shard server: random samples, many
// requests in flight; prints one line of JSON. Used by benchmarks/remote_bench.sh, which puts
// ucx_perftest's ucp_am_bw beside it on the same transport.
//
//   remote_bench ADDRESS SAMPLES [SECONDS] [PER_REQUEST] [IN_FLIGHT] [VERIFY] [PLACES]
//   (token from $SLUICE_TOKEN; VERIFY 1 (default) checks every record's checksum, 0 does not.
//   PLACES "distinct" (default): each large record lands in a place of its own, as in a
//   Loader's batch slots; "one": all land in one buffer that stays in cache, as ucp_am_bw's
//   receiver does. "one" is for comparing with ucx_perftest's memory pattern: it needs VERIFY 0,
//   and SAMPLES 4 gives the server a hot source too.)

#include <sluice/error.h>

#include "net/client.h"

#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 3) {
    fmt::print(stderr,
               "usage: remote_bench ADDRESS SAMPLES [SECONDS] [PER_REQUEST] [IN_FLIGHT] [VERIFY] "
               "[PLACES]\n");
    return 2;
  }
  const std::string address = argv[1];
  const uint64_t samples = std::stoull(argv[2]);
  const double seconds = argc > 3 ? std::stod(argv[3]) : 10;
  const size_t per_request = argc > 4 ? std::stoul(argv[4]) : 16;
  const size_t in_flight = argc > 5 ? std::stoul(argv[5]) : 8;
  const bool verify = argc > 6 ? std::string(argv[6]) != "0" : true;
  const std::string places_mode = argc > 7 ? argv[7] : "distinct";
  if (places_mode != "distinct" && places_mode != "one") {
    fmt::print(stderr, "remote_bench: PLACES is 'distinct' or 'one', not '{}'\n", places_mode);
    return 2;
  }
  const bool one_place = places_mode == "one";
  if (one_place && verify) {
    fmt::print(stderr, "remote_bench: PLACES 'one' overlaps records: it needs VERIFY 0\n");
    return 2;
  }
  const char* token = std::getenv("SLUICE_TOKEN");
  try {
    auto client = sluice::net::PeerClient::connect(address, {token ? token : "", 10000, verify});
    std::mt19937_64 rng(1);
    std::uniform_int_distribution<uint64_t> pick(0, samples - 1);
    std::vector<std::vector<uint64_t>> buffers(in_flight);
    // Large records come apart, each into a place of its own (as into a Loader's batch slots).
    std::vector<std::vector<std::vector<uint64_t>>> places(
        in_flight, std::vector<std::vector<uint64_t>>(per_request));
    // Never resized, as receives into it overlap; records larger than it get a place of their own.
    std::vector<std::byte> one(one_place ? 64u << 20 : 0);
    std::vector<sluice::net::ReadRequest> requests(in_flight);
    for (size_t k = 0; k < in_flight; ++k) {
      requests[k].destination = [&buffers, k](size_t bytes) {
        buffers[k].resize((bytes + 7) / 8);
        return std::span<std::byte>(reinterpret_cast<std::byte*>(buffers[k].data()), bytes);
      };
      requests[k].record_destination = [&, k](size_t record, size_t bytes) {
        if (one_place && bytes <= one.size()) return std::span<std::byte>(one.data(), bytes);
        auto& place = places[k][record];
        place.resize((bytes + 7) / 8);
        return std::span<std::byte>(reinterpret_cast<std::byte*>(place.data()), bytes);
      };
    }
    uint64_t bytes = 0, count = 0;
    auto t0 = std::chrono::steady_clock::now();
    auto end = t0 + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < end) {
      for (auto& r : requests) {
        r.indices.resize(per_request);
        for (auto& i : r.indices) i = pick(rng);
      }
      client->read(requests);
      for (const auto& r : requests)
        for (const auto& rec : r.records) bytes += rec.size;
      count += in_flight * per_request;
    }
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fmt::print(
        "{{\"bytes_per_s\": {:.0f}, \"samples_per_s\": {:.0f}, \"samples\": {}, \"seconds\": "
        "{:.3f}}}\n",
        static_cast<double>(bytes) / dt, static_cast<double>(count) / dt, count, dt);
  } catch (const sluice::Error& e) {
    fmt::print(stderr, "remote_bench: {}\n", e.what());
    return 1;
  }
  return 0;
}
