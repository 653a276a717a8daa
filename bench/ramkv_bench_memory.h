// `ramkv-bench memory`: the storage engine in one process, no network. Fills a live set
// to a target memory utilisation, overwrites keys at random for a while (the cleaner
// running on its own thread), then reads; reports throughput, memory efficiency and the
// cleaner's cost. Each utilisation in a list runs in its own child process so that RSS
// figures do not mix.
#pragma once

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

namespace ramkv::bench {

struct MemoryBenchOptions {
  std::vector<int> utilization_percent = {90};
  uint32_t object_bytes = 100;  // value bytes
  uint32_t key_bytes = 16;
  double seconds = 10;
  double read_seconds = 2;
  std::string distribution = "uniform";  // or "zipf"
  double zipf_theta = 0.99;
  std::string memory = "1G";
  std::string segment_bytes = "8M";
  std::string seglet_bytes = "64K";
  uint64_t seed = 1;
  bool json = false;
};

void add_memory_command(CLI::App& app, MemoryBenchOptions& options);
int run_memory_bench(const MemoryBenchOptions& options);

}  // namespace ramkv::bench
