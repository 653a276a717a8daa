#include "bench/ramkv_bench_memory.h"

#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>

#include "bench/bench_keys.h"
#include "common/checksum.h"
#include "common/clock.h"
#include "common/config.h"
#include "common/log.h"
#include "master/object_manager.h"

namespace ramkv::bench {
namespace {

struct RunResult {
  int target_utilization = 0;
  double writes_per_sec = 0;
  double reads_per_sec = 0;
  double utilization = 0;
  uint64_t rss_bytes = 0;
  uint64_t live_bytes = 0;
  uint64_t tombstone_bytes = 0;  // still needed, at the end of the writes
  double cleaner_copied_per_written = 0;
  uint64_t objects = 0;
  uint64_t memory_bytes = 0;
  uint64_t hash_table_bytes = 0;
  uint64_t compactions = 0;
  uint64_t combined_passes = 0;
  uint64_t write_retries = 0;
  uint64_t read_errors = 0;
  double memcpy_gib_per_sec = 0;
};

uint64_t rss_bytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

// memcpy bandwidth of this machine, now: the reference the engine's figures sit next to.
double measure_memcpy_gib_per_sec() {
  constexpr size_t kBytes = 256u << 20;
  std::unique_ptr<char[]> a(new char[kBytes]), b(new char[kBytes]);
  std::memset(a.get(), 1, kBytes);
  std::memset(b.get(), 2, kBytes);
  const auto& clock = SystemClock::instance();
  uint64_t start = clock.now_ns();
  for (int i = 0; i < 4; ++i) std::memcpy(b.get(), a.get(), kBytes);
  double secs = static_cast<double>(clock.now_ns() - start) / 1e9;
  return 4.0 * static_cast<double>(kBytes) / secs / static_cast<double>(1u << 30);
}

// Zipfian ranks over [0, n) (Gray et al., as YCSB), scrambled so hot keys are spread.
class Zipf {
 public:
  Zipf(uint64_t n, double theta) : n_(n), theta_(theta) {
    for (uint64_t i = 1; i <= n; ++i) zeta_n_ += 1.0 / std::pow(static_cast<double>(i), theta);
    double zeta2 = 1.0 + 1.0 / std::pow(2.0, theta);
    alpha_ = 1.0 / (1.0 - theta);
    eta_ = (1.0 - std::pow(2.0 / static_cast<double>(n), 1.0 - theta)) / (1.0 - zeta2 / zeta_n_);
  }
  uint64_t next(Random& rng) const {
    double u = rng.uniform_double();
    double uz = u * zeta_n_;
    uint64_t rank;
    if (uz < 1.0) {
      rank = 0;
    } else if (uz < 1.0 + std::pow(0.5, theta_)) {
      rank = 1;
    } else {
      rank =
          static_cast<uint64_t>(static_cast<double>(n_) * std::pow(eta_ * u - eta_ + 1.0, alpha_));
    }
    rank = std::min(rank, n_ - 1);
    // Scramble: a fixed permutation-like spread of ranks over the key space.
    return (rank * 0x9E3779B97F4A7C15ULL) % n_;
  }

 private:
  uint64_t n_;
  double theta_;
  double zeta_n_ = 0, alpha_ = 0, eta_ = 0;
};

int run_one(const MemoryBenchOptions& o, int utilization, RunResult* out) {
  master::MasterConfig cfg;
  auto memory = parse_bytes(o.memory);
  auto segment = parse_bytes(o.segment_bytes);
  auto seglet = parse_bytes(o.seglet_bytes);
  if (!memory.ok() || !segment.ok() || !seglet.ok()) {
    fmt::print(stderr,
               "ramkv-bench memory: bad size in --memory, --segment-bytes or --seglet-bytes\n");
    return 2;
  }
  cfg.memory_bytes = *memory;
  cfg.segment_bytes = static_cast<uint32_t>(*segment);
  cfg.seglet_bytes = static_cast<uint32_t>(*seglet);
  cfg.max_value_bytes = std::max<uint32_t>(o.object_bytes, 1024);
  cfg.max_key_bytes = std::max<uint32_t>(o.key_bytes, 64);
  // Entry size for this workload (versions take 4 varint bytes for most of the run).
  std::byte prefix[ramkv::kMaxObjectPrefixBytes];
  uint32_t prefix_bytes = ramkv::encode_object_prefix(1, 1u << 22, 0, o.key_bytes, prefix);
  uint64_t entry = ramkv::entry_bytes(prefix_bytes + o.key_bytes + o.object_bytes);
  uint64_t objects = static_cast<uint64_t>(utilization) * cfg.memory_bytes / 100 / entry;
  // The hash table is sized for the object count at 75% slot load, as an operator would.
  cfg.hash_table_bytes = hash_table_bytes_for(objects);
  auto om_result = master::ObjectManager::create(cfg);
  if (!om_result.ok()) {
    fmt::print(stderr, "ramkv-bench memory: cannot create the storage engine: {}\n",
               status_name(om_result.status()));
    return 1;
  }
  auto om = std::move(om_result).value();
  const auto& clock = SystemClock::instance();
  std::string key, value(o.object_bytes, 'v');

  for (uint64_t i = 0; i < objects; ++i) {
    make_key(i, o.key_bytes, &key);
    make_value(i, 0, &value);
    auto r = om->write(1, key, value);
    if (!r.ok()) {
      fmt::print(stderr, "ramkv-bench memory: fill stopped at object {} of {}: {}\n", i, objects,
                 status_name(r.status()));
      return 1;
    }
  }
  auto after_fill = om->stats();

  Random rng(o.seed);
  std::unique_ptr<Zipf> zipf;
  if (o.distribution == "zipf") zipf = std::make_unique<Zipf>(objects, o.zipf_theta);
  auto pick = [&] { return zipf ? zipf->next(rng) : rng.uniform(objects); };

  uint64_t writes = 0, retries = 0;
  uint64_t start = clock.now_ns();
  uint64_t deadline = start + static_cast<uint64_t>(o.seconds * 1e9);
  uint64_t now = start;
  while (now < deadline) {
    for (int i = 0; i < 256; ++i) {
      uint64_t k = pick();
      make_key(k, o.key_bytes, &key);
      make_value(k, writes + 1, &value);
      auto r = om->write(1, key, value);
      if (r.ok()) {
        ++writes;
      } else if (r.status() == Status::kRetry) {
        ++retries;
      } else {
        fmt::print(stderr, "ramkv-bench memory: write failed: {}\n", status_name(r.status()));
        return 1;
      }
    }
    now = clock.now_ns();
  }
  double write_secs = static_cast<double>(now - start) / 1e9;
  auto after_writes = om->stats();
  out->rss_bytes = rss_bytes();

  uint64_t reads = 0, read_errors = 0;
  std::string got;
  start = clock.now_ns();
  deadline = start + static_cast<uint64_t>(o.read_seconds * 1e9);
  now = start;
  while (now < deadline) {
    for (int i = 0; i < 256; ++i) {
      uint64_t k = pick();
      make_key(k, o.key_bytes, &key);
      auto r = om->read(1, key, &got);
      uint64_t named = 0;
      if (r.ok() && got.size() >= 8) std::memcpy(&named, got.data(), 8);
      if (!r.ok() || got.size() != o.object_bytes || (got.size() >= 8 && named != k)) {
        ++read_errors;
      }
      ++reads;
    }
    now = clock.now_ns();
  }
  double read_secs = static_cast<double>(now - start) / 1e9;

  out->target_utilization = utilization;
  out->writes_per_sec = static_cast<double>(writes) / write_secs;
  out->reads_per_sec = static_cast<double>(reads) / read_secs;
  out->utilization = static_cast<double>(after_writes.log.live_bytes) /
                     static_cast<double>(after_writes.log.memory_bytes);
  out->live_bytes = after_writes.user_bytes;
  out->tombstone_bytes = after_writes.tombstone_bytes;
  uint64_t written = after_writes.log.appended_bytes - after_fill.log.appended_bytes;
  uint64_t copied = after_writes.cleaner.bytes_copied - after_fill.cleaner.bytes_copied;
  out->cleaner_copied_per_written =
      written == 0 ? 0 : static_cast<double>(copied) / static_cast<double>(written);
  out->objects = after_writes.object_count;
  out->memory_bytes = after_writes.log.memory_bytes;
  out->hash_table_bytes = after_writes.hash_table_bytes;
  out->compactions = after_writes.cleaner.compactions;
  out->combined_passes = after_writes.cleaner.combined_passes;
  out->write_retries = retries;
  out->read_errors = read_errors;
  out->memcpy_gib_per_sec = measure_memcpy_gib_per_sec();
  return read_errors == 0 ? 0 : 1;
}

std::string to_json(const RunResult& r, const MemoryBenchOptions& o) {
  return fmt::format(
      "{{\"target_utilization\": {}, \"utilization\": {:.4f}, \"writes_per_sec\": {:.0f}, "
      "\"reads_per_sec\": {:.0f}, \"rss_bytes\": {}, \"live_bytes\": {}, "
      "\"tombstone_bytes\": {}, "
      "\"rss_over_live\": {:.4f}, \"cleaner_bytes_copied_per_byte_written\": {:.4f}, "
      "\"objects\": {}, \"object_bytes\": {}, \"key_bytes\": {}, \"distribution\": \"{}\", "
      "\"memory_bytes\": {}, \"hash_table_bytes\": {}, \"compactions\": {}, "
      "\"combined_passes\": {}, \"write_retries\": {}, \"read_errors\": {}, "
      "\"seconds\": {}, \"memcpy_gib_per_sec\": {:.2f}}}",
      r.target_utilization, r.utilization, r.writes_per_sec, r.reads_per_sec, r.rss_bytes,
      r.live_bytes, r.tombstone_bytes,
      static_cast<double>(r.rss_bytes) / static_cast<double>(std::max<uint64_t>(r.live_bytes, 1)),
      r.cleaner_copied_per_written, r.objects, o.object_bytes, o.key_bytes, o.distribution,
      r.memory_bytes, r.hash_table_bytes, r.compactions, r.combined_passes, r.write_retries,
      r.read_errors, o.seconds, r.memcpy_gib_per_sec);
}

// Runs one utilisation in a child process; the result comes back through a pipe.
int run_in_child(const MemoryBenchOptions& o, int utilization, RunResult* out) {
  int fds[2];
  if (pipe(fds) != 0) return 1;
  pid_t pid = fork();
  if (pid < 0) return 1;
  if (pid == 0) {
    close(fds[0]);
    RunResult r;
    int rc = run_one(o, utilization, &r);
    ssize_t n = write(fds[1], &r, sizeof(r));
    _exit(n == static_cast<ssize_t>(sizeof(r)) ? rc : 1);
  }
  close(fds[1]);
  ssize_t n = read(fds[0], out, sizeof(*out));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (n != static_cast<ssize_t>(sizeof(*out))) return 1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

}  // namespace

void add_memory_command(CLI::App& app, MemoryBenchOptions& o) {
  auto* cmd = app.add_subcommand(
      "memory", "Storage engine in one process: fill to a utilisation, overwrite at random, read");
  cmd->add_option("--utilization", o.utilization_percent,
                  "Target memory utilisation in percent (live log bytes / log memory); "
                  "a list runs each in turn, e.g. --utilization 50 90")
      ->check(CLI::Range(10, 98))
      ->capture_default_str();
  cmd->add_option("--object-bytes", o.object_bytes, "Value size in bytes")
      ->check(CLI::Range(8, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--key-bytes", o.key_bytes, "Key size in bytes")
      ->check(CLI::Range(8, 1024))
      ->capture_default_str();
  cmd->add_option("--seconds", o.seconds, "Seconds of overwrites")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  cmd->add_option("--read-seconds", o.read_seconds, "Seconds of reads after the overwrites")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  cmd->add_option("--distribution", o.distribution, "Key choice: uniform or zipf")
      ->check(CLI::IsMember({"uniform", "zipf"}))
      ->capture_default_str();
  cmd->add_option("--zipf-theta", o.zipf_theta, "Skew of the zipf distribution")
      ->check(CLI::Range(0.01, 0.999))
      ->capture_default_str();
  cmd->add_option("--memory", o.memory, "Log memory, e.g. 512M, 4G")->capture_default_str();
  cmd->add_option("--segment-bytes", o.segment_bytes, "Segment size")->capture_default_str();
  cmd->add_option("--seglet-bytes", o.seglet_bytes, "Seglet size")->capture_default_str();
  cmd->add_option("--seed", o.seed, "Random seed")->capture_default_str();
  cmd->add_flag("--json", o.json, "Print one JSON object instead of the table");
}

int run_memory_bench(const MemoryBenchOptions& o) {
  std::vector<RunResult> results;
  int rc = 0;
  if (!o.json) {
    fmt::print(
        "ramkv-bench memory: {} B values, {} B keys, {} keys, {} log memory, {} s of writes\n",
        o.object_bytes, o.key_bytes, o.distribution, o.memory, o.seconds);
    fmt::print("{:>6} {:>8} {:>12} {:>12} {:>10} {:>10} {:>9} {:>9}\n", "target", "util",
               "writes/s", "reads/s", "rss/live", "copied/w", "compact", "combined");
  }
  for (int u : o.utilization_percent) {
    RunResult r;
    int one = run_in_child(o, u, &r);
    if (one != 0) {
      fmt::print(stderr, "ramkv-bench memory: the run at {}% utilisation failed\n", u);
      rc = 1;
      continue;
    }
    results.push_back(r);
    if (!o.json) {
      fmt::print("{:>5}% {:>7.1f}% {:>12.0f} {:>12.0f} {:>10.3f} {:>10.3f} {:>9} {:>9}\n", u,
                 100 * r.utilization, r.writes_per_sec, r.reads_per_sec,
                 static_cast<double>(r.rss_bytes) / static_cast<double>(r.live_bytes),
                 r.cleaner_copied_per_written, r.compactions, r.combined_passes);
    }
  }
  if (results.empty()) return 1;
  const RunResult& first = results.front();
  if (o.json) {
    if (results.size() == 1) {
      fmt::print("{}\n", to_json(first, o));
    } else {
      std::string runs;
      for (const auto& r : results) runs += (runs.empty() ? "" : ", ") + to_json(r, o);
      const RunResult& last = results.back();
      fmt::print("{{\"runs\": [{}], \"writes_per_sec_last_over_first\": {:.4f}}}\n", runs,
                 last.writes_per_sec / first.writes_per_sec);
    }
  } else {
    fmt::print("memcpy reference in the same run: {:.1f} GiB/s\n", first.memcpy_gib_per_sec);
    if (results.size() > 1) {
      const RunResult& last = results.back();
      fmt::print("write throughput at {}% over {}%: {:.2f}\n", last.target_utilization,
                 first.target_utilization, last.writes_per_sec / first.writes_per_sec);
    }
  }
  return rc;
}

}  // namespace ramkv::bench
