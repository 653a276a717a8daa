// `ramkv-bench latency` and `ramkv-bench throughput`: a running cluster measured through
// the client library, next to the bare round trip of the same transport (an echo RPC to
// the same master) measured in the same run.
#pragma once

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

namespace ramkv::bench {

struct ClusterBenchOptions {
  std::string coordinator = "127.0.0.1:12246";
  std::vector<uint32_t> value_bytes = {100, 1000};
  uint32_t key_bytes = 16;
  uint32_t keys = 10000;
  uint32_t count = 20000;  // latency: samples per operation and size
  double seconds = 5;      // throughput: per workload
  uint32_t clients = 8;    // throughput: client threads
  uint32_t window = 16;    // throughput: requests in flight per client
  std::vector<std::string> workloads = {"read", "write", "mixed", "multiread"};
  bool busy_poll = false;
  bool json = false;
  // The cluster's transport, as ClientOptions::transport ("tcp" or "rdma"), and the RDMA
  // device and port. Every client of the benchmark and its bare round trips use it.
  std::string transport = "tcp";
  std::string rdma_device;
  uint32_t rdma_port = 1;
};

void add_cluster_commands(CLI::App& app, ClusterBenchOptions& options);
int run_latency_bench(const ClusterBenchOptions& options);
int run_throughput_bench(const ClusterBenchOptions& options);

}  // namespace ramkv::bench
