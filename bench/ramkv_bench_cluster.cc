#include "bench/ramkv_bench_cluster.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include "client/client_transport.h"
#include "common/checksum.h"
#include "common/clock.h"
#include "common/transport.h"
#include "ramkv/client.h"

namespace ramkv::bench {
namespace {

const Clock& clock() { return SystemClock::instance(); }

std::string key_of(uint64_t i, uint32_t key_bytes) {
  std::string k = fmt::format("key{:013}", i);
  k.resize(key_bytes, 'k');
  return k;
}

struct Percentiles {
  double p50 = 0, p90 = 0, p99 = 0, p999 = 0;
};
Percentiles percentiles(std::vector<uint64_t> ns) {
  std::sort(ns.begin(), ns.end());
  auto at = [&](double q) {
    size_t i = std::min(ns.size() - 1, static_cast<size_t>(q * static_cast<double>(ns.size())));
    return static_cast<double>(ns[i]) / 1000.0;
  };
  return {at(0.50), at(0.90), at(0.99), at(0.999)};
}

ClientOptions client_options(const ClusterBenchOptions& o) {
  ClientOptions co;
  co.coordinator = o.coordinator;
  co.busy_poll = o.busy_poll;
  co.transport = o.transport;
  co.rdma_device = o.rdma_device;
  co.rdma_port = o.rdma_port;
  return co;
}

Result<std::unique_ptr<Client>> connect(const ClusterBenchOptions& o) {
  return Client::connect(client_options(o));
}

// Creates the benchmark table and writes every key once with a value of `bytes`.
Result<uint64_t> prepare(Client& c, const ClusterBenchOptions& o, uint32_t bytes) {
  auto table = c.create_table("ramkv-bench");
  if (!table.ok()) return table.status();
  std::string value(bytes, 'v');
  std::vector<MultiWriteItem> batch;
  for (uint32_t i = 0; i < o.keys; ++i) {
    batch.push_back({*table, key_of(i, o.key_bytes), value});
    if (batch.size() == 500 || i + 1 == o.keys) {
      for (const auto& r : c.multi_write(batch)) {
        if (!r.ok()) return r.status();
      }
      batch.clear();
    }
  }
  return table;
}

void fail(const char* what, Status s) {
  fmt::print(stderr, "ramkv-bench: {}: {}\n", what, status_name(s));
}

struct LatencyRow {
  std::string op;
  uint32_t value_bytes = 0;
  Percentiles p;
};

}  // namespace

void add_cluster_commands(CLI::App& app, ClusterBenchOptions& o) {
  auto common = [&o](CLI::App* cmd) {
    cmd->add_option("--coordinator", o.coordinator, "Coordinator host:port")->capture_default_str();
    cmd->add_option("--value-bytes", o.value_bytes, "Value sizes")->capture_default_str();
    cmd->add_option("--keys", o.keys, "Keys written before measuring")
        ->check(CLI::Range(1, 10'000'000))
        ->capture_default_str();
    cmd->add_flag("--busy-poll", o.busy_poll, "Client spins instead of sleeping in the kernel");
    cmd->add_flag("--json", o.json, "Print one JSON object instead of the table");
  };
  auto* lat = app.add_subcommand(
      "latency", "One synchronous client: read and write latency percentiles vs. a bare RPC");
  common(lat);
  lat->add_option("--count", o.count, "Samples per operation and size")
      ->check(CLI::Range(10, 10'000'000))
      ->capture_default_str();
  auto* thr = app.add_subcommand("throughput",
                                 "Many clients with requests in flight: operations per second");
  common(thr);
  thr->add_option("--clients", o.clients, "Client threads, one Client each")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  thr->add_option("--window", o.window, "Requests in flight per client")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  thr->add_option("--seconds", o.seconds, "Seconds per workload")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  thr->add_option("--workload", o.workloads, "read, write, mixed (50/50), multiread")
      ->check(CLI::IsMember({"read", "write", "mixed", "multiread"}))
      ->capture_default_str();
}

int run_latency_bench(const ClusterBenchOptions& o) {
  auto c = connect(o);
  if (!c.ok()) return fail("connect", c.status()), 1;
  Client& client = **c;
  std::vector<LatencyRow> rows;
  Percentiles rtt;
  Random rng(1);
  // The bare round trip goes on a transport made exactly as the client's own.
  auto made = client::make_transport(client_options(o));
  if (!made.ok()) return fail("transport", made.status()), 1;
  auto transport = std::move(made).value();
  std::vector<std::byte> echo_body(100);
  std::vector<uint64_t> echoes;
  for (uint32_t bytes : o.value_bytes) {
    auto table = prepare(client, o, bytes);
    if (!table.ok()) return fail("prepare", table.status()), 1;
    auto tablets = client.tablets(*table);
    if (!tablets.ok()) return fail("tablets", tablets.status()), 1;
    auto owner = [&](const std::string& key) {
      uint64_t h = key_hash(*table, key);
      for (const auto& t : *tablets) {
        if (t.start_hash <= h && h <= t.end_hash) return t.locator;
      }
      return std::string();
    };
    // Each sample is an echo (the bare round trip, 100-byte body, same transport and
    // polling) to the master that owns the key, then a read and a write of that key:
    // interleaved so that all three see the same machine at the same moment.
    std::vector<uint64_t> reads, writes;
    std::string value(bytes, 'w');
    for (uint32_t i = 0; i < o.count + 100; ++i) {
      std::string key = key_of(rng.uniform(o.keys), o.key_bytes);
      uint64_t t0 = clock().now_ns();
      auto e = call(*transport, owner(key), {.opcode = wire::Opcode::kEcho}, echo_body);
      uint64_t t1 = clock().now_ns();
      if (e.status != Status::kOk) return fail("echo", e.status), 1;
      auto r = client.read(*table, key);
      uint64_t t2 = clock().now_ns();
      if (!r.ok()) return fail("read", r.status()), 1;
      auto w = client.write(*table, key, value);
      uint64_t t3 = clock().now_ns();
      if (!w.ok()) return fail("write", w.status()), 1;
      if (i >= 100) {
        echoes.push_back(t1 - t0);
        reads.push_back(t2 - t1);
        writes.push_back(t3 - t2);
      }
    }
    rows.push_back({"read", bytes, percentiles(reads)});
    rows.push_back({"write", bytes, percentiles(writes)});
    if (auto d = client.drop_table("ramkv-bench"); !d.ok()) return fail("drop", d.status()), 1;
  }
  rtt = percentiles(echoes);
  const LatencyRow& read0 = rows[0];
  const LatencyRow& write0 = rows[1];
  if (o.json) {
    std::string detail;
    for (const auto& r : rows) {
      detail += fmt::format(
          "{}{{\"op\": \"{}\", \"value_bytes\": {}, \"p50_us\": {:.1f}, \"p90_us\": {:.1f}, "
          "\"p99_us\": {:.1f}, \"p999_us\": {:.1f}}}",
          detail.empty() ? "" : ", ", r.op, r.value_bytes, r.p.p50, r.p.p90, r.p.p99, r.p.p999);
    }
    fmt::print(
        "{{\"rtt_p50_us\": {:.1f}, \"rtt_p99_us\": {:.1f}, \"read_p50_us\": {:.1f}, "
        "\"read_p99_us\": {:.1f}, \"write_p50_us\": {:.1f}, \"write_p99_us\": {:.1f}, "
        "\"read_p50_over_rtt\": {:.3f}, \"write_p50_over_rtt\": {:.3f}, \"value_bytes\": {}, "
        "\"samples\": {}, \"busy_poll\": {}, \"transport\": \"{}\", \"detail\": [{}]}}\n",
        rtt.p50, rtt.p99, read0.p.p50, read0.p.p99, write0.p.p50, write0.p.p99,
        read0.p.p50 / rtt.p50, write0.p.p50 / rtt.p50, read0.value_bytes, o.count, o.busy_poll,
        o.transport, detail);
    return 0;
  }
  fmt::print("ramkv-bench latency: {} samples each, {} keys, one synchronous client over {}{}\n",
             o.count, o.keys, o.transport, o.busy_poll ? " (busy polling)" : "");
  fmt::print("{:<8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}\n", "op", "value", "p50 us", "p90 us",
             "p99 us", "p99.9 us", "p50/rtt");
  fmt::print("{:<8} {:>8} {:>9.1f} {:>9.1f} {:>9.1f} {:>9.1f} {:>9}\n", "echo", "100 B", rtt.p50,
             rtt.p90, rtt.p99, rtt.p999, "1.00");
  for (const auto& r : rows) {
    fmt::print("{:<8} {:>6} B {:>9.1f} {:>9.1f} {:>9.1f} {:>9.1f} {:>9.2f}\n", r.op, r.value_bytes,
               r.p.p50, r.p.p90, r.p.p99, r.p.p999, r.p.p50 / rtt.p50);
  }
  return 0;
}

namespace {

// One client thread keeping `window` operations in flight until the deadline.
uint64_t drive(const ClusterBenchOptions& o, uint64_t table, const std::string& workload,
               uint64_t deadline_ns, uint64_t seed, std::atomic<uint64_t>* errors) {
  auto c = connect(o);
  if (!c.ok()) {
    ++*errors;
    return 0;
  }
  Client& client = **c;
  Random rng(seed);
  std::string value(o.value_bytes.front(), 't');
  uint64_t done = 0;
  uint32_t in_flight = 0;
  constexpr uint32_t kMultiKeys = 16;
  std::function<void()> issue = [&] {
    ++in_flight;
    bool write = workload == "write" || (workload == "mixed" && rng.uniform(2) == 0);
    if (workload == "multiread") {
      std::vector<MultiReadItem> items;
      for (uint32_t i = 0; i < kMultiKeys; ++i) {
        items.push_back({table, key_of(rng.uniform(o.keys), o.key_bytes)});
      }
      client.multi_read_async(items, [&](std::vector<Result<ReadResult>> rs) {
        --in_flight;
        for (const auto& r : rs) r.ok() ? ++done : ++*errors;
        if (clock().now_ns() < deadline_ns) issue();
      });
    } else if (write) {
      client.write_async(table, key_of(rng.uniform(o.keys), o.key_bytes), value,
                         [&](Result<uint64_t> r) {
                           --in_flight;
                           r.ok() ? ++done : ++*errors;
                           if (clock().now_ns() < deadline_ns) issue();
                         });
    } else {
      client.read_async(table, key_of(rng.uniform(o.keys), o.key_bytes), [&](Result<ReadResult> r) {
        --in_flight;
        r.ok() ? ++done : ++*errors;
        if (clock().now_ns() < deadline_ns) issue();
      });
    }
  };
  for (uint32_t i = 0; i < o.window; ++i) issue();
  while (in_flight > 0) client.poll(1'000'000);
  return done;
}

}  // namespace

int run_throughput_bench(const ClusterBenchOptions& o) {
  auto c = connect(o);
  if (!c.ok()) return fail("connect", c.status()), 1;
  auto table = prepare(**c, o, o.value_bytes.front());
  if (!table.ok()) return fail("prepare", table.status()), 1;
  std::vector<std::pair<std::string, double>> results;
  uint64_t total_errors = 0;
  for (const auto& workload : o.workloads) {
    std::atomic<uint64_t> ops{0}, errors{0};
    uint64_t start = clock().now_ns();
    uint64_t deadline = start + static_cast<uint64_t>(o.seconds * 1e9);
    std::vector<std::thread> threads;
    for (uint32_t i = 0; i < o.clients; ++i) {
      threads.emplace_back([&, i] { ops += drive(o, *table, workload, deadline, i + 1, &errors); });
    }
    for (auto& t : threads) t.join();
    double secs = static_cast<double>(clock().now_ns() - start) / 1e9;
    results.push_back({workload, static_cast<double>(ops.load()) / secs});
    total_errors += errors.load();
  }
  if (auto d = (*c)->drop_table("ramkv-bench"); !d.ok()) return fail("drop", d.status()), 1;
  if (o.json) {
    std::string fields;
    for (const auto& [w, r] : results) fields += fmt::format("\"{}_ops_per_sec\": {:.0f}, ", w, r);
    fmt::print(
        "{{{}\"clients\": {}, \"window\": {}, \"value_bytes\": {}, \"seconds\": {}, "
        "\"transport\": \"{}\", \"errors\": {}}}\n",
        fields, o.clients, o.window, o.value_bytes.front(), o.seconds, o.transport, total_errors);
  } else {
    fmt::print(
        "ramkv-bench throughput: {} clients x {} in flight, {} B values, {} s each, over {}\n",
        o.clients, o.window, o.value_bytes.front(), o.seconds, o.transport);
    for (const auto& [w, r] : results) fmt::print("{:<10} {:>12.0f} ops/s\n", w, r);
    if (total_errors > 0) fmt::print("errors: {}\n", total_errors);
  }
  return total_errors == 0 ? 0 : 1;
}

}  // namespace ramkv::bench
