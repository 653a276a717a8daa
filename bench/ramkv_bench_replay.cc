#include "bench/ramkv_bench_replay.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_keys.h"
#include "common/clock.h"
#include "common/config.h"
#include "common/log_entry.h"
#include "master/object_manager.h"

namespace ramkv::bench {
namespace {

using master::ObjectManager;

double now_s() { return static_cast<double>(SystemClock::instance().now_ns()) / 1e9; }

// The source: a master whose log holds about `bytes` of entries.
struct Source {
  std::unique_ptr<ObjectManager> om;
  uint64_t keys = 0;    // keys ever written: 0 .. keys - 1
  uint64_t writes = 0;  // including overwrites
  uint64_t removes = 0;
  std::vector<std::vector<std::byte>> segments;  // each segment's bytes, in log order
  uint64_t segment_bytes_total = 0;
};

Result<Source> fill_source(const ReplayBenchOptions& o, uint64_t bytes, uint32_t segment_bytes) {
  master::MasterConfig cfg;
  cfg.segment_bytes = segment_bytes;
  cfg.memory_bytes = bytes + bytes / 4 + 8ull * segment_bytes;
  cfg.max_value_bytes = std::max<uint32_t>(o.object_bytes, 1024);
  cfg.max_key_bytes = std::max<uint32_t>(o.key_bytes, 64);
  cfg.cleaner_thread = false;  // keep every entry: a crashed master's log holds dead ones too
  cfg.prefault_memory = false;
  uint64_t entry = entry_bytes(kMaxObjectPrefixBytes + o.key_bytes + o.object_bytes);
  cfg.hash_table_bytes = hash_table_bytes_for(bytes / entry);
  auto om = ObjectManager::create(cfg);
  if (!om.ok()) return om.status();
  Source s;
  s.om = std::move(om).value();
  Random rng(o.seed);
  std::string key, value(o.object_bytes, 'v');
  while (s.om->stats().log.appended_bytes < bytes) {
    for (int i = 0; i < 256; ++i) {
      uint64_t pick = rng.uniform(100);
      if (s.keys > 0 && pick < o.remove_percent) {
        make_key(rng.uniform(s.keys), o.key_bytes, &key);
        auto r = s.om->remove(1, key);
        if (!r.ok()) return r.status();
        if (*r != 0) ++s.removes;
        continue;
      }
      uint64_t index =
          s.keys > 0 && rng.uniform(100) < o.overwrite_percent ? rng.uniform(s.keys) : s.keys++;
      make_key(index, o.key_bytes, &key);
      make_value(index, ++s.writes, &value);
      auto r = s.om->write(1, key, value);
      if (!r.ok()) return r.status();
    }
  }
  for (uint64_t id : s.om->log().segment_ids()) {
    auto copy = s.om->log().copy_segment(id);
    if (!copy) return Status::kInternal;
    s.segment_bytes_total += copy->bytes.size();
    s.segments.push_back(std::move(copy->bytes));
  }
  return s;
}

// memcpy of the same segments into one buffer (already faulted in): best of `passes`.
double memcpy_mb_per_sec(const std::vector<const std::vector<std::byte>*>& order, uint64_t total,
                         int passes) {
  std::vector<std::byte> to(total);
  std::memset(to.data(), 1, to.size());
  double best = 0;
  for (int pass = 0; pass < passes; ++pass) {
    double t0 = now_s();
    size_t at = 0;
    for (const auto* seg : order) {
      std::memcpy(to.data() + at, seg->data(), seg->size());
      at += seg->size();
    }
    best = std::max(best, static_cast<double>(total) / 1e6 / (now_s() - t0));
  }
  return best;
}

// The replayed master agrees with the source: counts, table statistics, and a sample of
// keys (value and version; removed keys absent). Prints what differs.
bool verify(ObjectManager& source, ObjectManager& replayed, const Source& s, uint64_t seed,
            const ReplayBenchOptions& o) {
  bool ok = true;
  auto ss = source.stats(), rs = replayed.stats();
  if (ss.object_count != rs.object_count || ss.user_bytes != rs.user_bytes) {
    fmt::print(stderr,
               "ramkv-bench replay: {} objects ({} user bytes) replayed, source has {} ({})\n",
               rs.object_count, rs.user_bytes, ss.object_count, ss.user_bytes);
    ok = false;
  }
  auto table_map = [](std::vector<TableStat> v) {
    std::map<uint64_t, TableStat> m;
    for (const auto& t : v) m[t.table_id] = t;
    return m;
  };
  if (table_map(source.table_stats()) != table_map(replayed.table_stats())) {
    fmt::print(stderr, "ramkv-bench replay: table statistics differ from the source's\n");
    ok = false;
  }
  Random rng(seed ^ 0x5eed);
  std::string key, want, got;
  for (int i = 0; i < 10000 && s.keys > 0; ++i) {
    uint64_t index = rng.uniform(s.keys);
    make_key(index, o.key_bytes, &key);
    auto a = source.read(1, key, &want);
    auto b = replayed.read(1, key, &got);
    if (a.status() != b.status() || (a.ok() && (*a != *b || want != got))) {
      fmt::print(stderr, "ramkv-bench replay: key {} reads {} after replay, {} at the source\n",
                 index, status_name(b.status()), status_name(a.status()));
      ok = false;
      break;
    }
  }
  return ok;
}

struct Figures {
  double replay_seconds = 0;
  double replay_mb_s = 0;
  double replay_objects_s = 0;
  double memcpy_mb_s = 0;
  master::ReplayStats stats;
};

int print(const ReplayBenchOptions& o, const Source& s, const Figures& f, uint64_t live,
          const std::vector<double>& runs_mb_s) {
  double ratio = f.replay_mb_s / f.memcpy_mb_s;
  std::string runs;
  for (double r : runs_mb_s) runs += fmt::format("{}{:.0f}", runs.empty() ? "" : ", ", r);
  if (o.json) {
    fmt::print(
        "{{\"replay_mb_per_sec\": {:.0f}, \"replay_objects_per_sec\": {:.0f}, \"bytes\": {}, "
        "\"objects\": {}, \"memcpy_mb_per_sec\": {:.0f}, \"ratio_to_memcpy\": {:.4f}, "
        "\"replay_seconds\": {:.4f}, \"tombstones\": {}, \"obsolete\": {}, "
        "\"live_objects\": {}, \"segments\": {}, \"object_bytes\": {}, \"key_bytes\": {}, "
        "\"order\": \"{}\", \"runs\": {}, \"replay_mb_per_sec_runs\": [{}]}}\n",
        f.replay_mb_s, f.replay_objects_s, f.stats.bytes, f.stats.objects, f.memcpy_mb_s, ratio,
        f.replay_seconds, f.stats.tombstones, f.stats.obsolete, live, s.segments.size(),
        o.object_bytes, o.key_bytes, o.log_order ? "log" : "shuffled", o.runs, runs);
    return 0;
  }
  fmt::print(
      "ramkv-bench replay: {} in {} segments ({} objects, {} tombstones; {} keys live), "
      "{} B values, {} B keys, {} order, one thread, best of {} runs\n",
      format_bytes(f.stats.bytes), s.segments.size(), f.stats.objects, f.stats.tombstones, live,
      o.object_bytes, o.key_bytes, o.log_order ? "log" : "shuffled", o.runs);
  fmt::print("{:<36} {:>10} {:>14} {:>10}\n", "", "MB/s", "objects/s", "seconds");
  fmt::print("{:<36} {:>10.0f} {:>14.0f} {:>10.3f}\n", "replay (ObjectManager::replay)",
             f.replay_mb_s, f.replay_objects_s, f.replay_seconds);
  fmt::print("{:<36} {:>10.0f}\n", "memcpy of the same bytes", f.memcpy_mb_s);
  fmt::print("{:<36} {:>10.3f}\n", "ratio to memcpy", ratio);
  fmt::print("replay MB/s of each run: {}\n", runs);
  return 0;
}

// One timed replay of every segment, in `order`, into `replayed`.
Result<Figures> replay_once(ObjectManager& replayed,
                            const std::vector<const std::vector<std::byte>*>& order,
                            uint64_t safe_version) {
  Figures f;
  std::function<bool(uint64_t, uint64_t)> accept = [](uint64_t, uint64_t) { return true; };
  double t0 = now_s();
  for (const auto* seg : order) {
    if (Status st = replayed.replay(*seg, accept, &f.stats); st != Status::kOk) {
      fmt::print(stderr, "ramkv-bench replay: replay failed: {}\n", status_name(st));
      return st;
    }
  }
  replayed.finish_replay(std::vector<master::TabletRange>{{.table_id = 1}}, safe_version);
  f.replay_seconds = now_s() - t0;
  f.replay_mb_s = static_cast<double>(f.stats.bytes) / 1e6 / f.replay_seconds;
  f.replay_objects_s = static_cast<double>(f.stats.objects) / f.replay_seconds;
  return f;
}

}  // namespace

void add_replay_command(CLI::App& app, ReplayBenchOptions& o) {
  auto* cmd = app.add_subcommand(
      "replay",
      "Crash-recovery replay ceiling: one thread replays a master's whole log into a fresh "
      "master, vs memcpy of the same bytes");
  cmd->add_option("--bytes", o.bytes, "Log bytes to fill and replay, e.g. 256M")
      ->capture_default_str();
  cmd->add_option("--object-bytes", o.object_bytes, "Value size in bytes")
      ->check(CLI::Range(8, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--key-bytes", o.key_bytes, "Key size in bytes")
      ->check(CLI::Range(8, 1024))
      ->capture_default_str();
  cmd->add_option("--overwrite-percent", o.overwrite_percent,
                  "Writes that overwrite an existing key, in percent")
      ->check(CLI::Range(0, 100))
      ->capture_default_str();
  cmd->add_option("--remove-percent", o.remove_percent,
                  "Operations that remove an existing key, in percent")
      ->check(CLI::Range(0, 50))
      ->capture_default_str();
  cmd->add_option("--segment-bytes", o.segment_bytes, "Segment size")->capture_default_str();
  cmd->add_flag("--log-order", o.log_order,
                "Replay segments in log order (default: shuffled, as they arrive from backups)");
  cmd->add_option("--runs", o.runs, "Replays, each into a fresh master; the best is reported")
      ->check(CLI::Range(1, 100))
      ->capture_default_str();
  cmd->add_option("--seed", o.seed, "Random seed")->capture_default_str();
  cmd->add_flag("--json", o.json, "Print one JSON object instead of the table");
}

int run_replay_bench(const ReplayBenchOptions& o) {
  auto bytes = parse_bytes(o.bytes);
  auto segment = parse_bytes(o.segment_bytes);
  if (!bytes.ok() || !segment.ok() || *segment < (64u << 10) || *segment > (1u << 30) ||
      *bytes < *segment) {
    fmt::print(stderr,
               "ramkv-bench replay: bad --bytes or --segment-bytes (a segment is 64K to 1G, "
               "and --bytes holds at least one)\n");
    return 2;
  }
  auto source = fill_source(o, *bytes, static_cast<uint32_t>(*segment));
  if (!source.ok()) {
    fmt::print(stderr, "ramkv-bench replay: filling the source failed: {}\n",
               status_name(source.status()));
    return 1;
  }
  Source& s = *source;

  std::vector<const std::vector<std::byte>*> order;
  for (const auto& seg : s.segments) order.push_back(&seg);
  if (!o.log_order) {
    Random rng(o.seed + 1);
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.uniform(i)]);
  }
  // The recovery master: memory and hash table for everything, touched at start as a
  // server's are, so the replay does not pay for page faults.
  master::MasterConfig cfg = s.om->config();
  cfg.memory_bytes = s.segment_bytes_total + s.segment_bytes_total / 4 + 8ull * *segment;
  cfg.cleaner_thread = true;
  cfg.prefault_memory = true;

  Figures best;
  std::vector<double> runs_mb_s;
  uint64_t live = 0;
  for (uint32_t run = 0; run < o.runs; ++run) {
    auto created = ObjectManager::create(cfg);
    if (!created.ok()) {
      fmt::print(stderr, "ramkv-bench replay: cannot create the recovery master: {}\n",
                 status_name(created.status()));
      return 1;
    }
    auto replayed = std::move(created).value();
    auto f = replay_once(*replayed, order, s.om->safe_version());
    if (!f.ok()) return 1;
    f->memcpy_mb_s = memcpy_mb_per_sec(order, s.segment_bytes_total, 3);
    if (f->stats.bytes != s.segment_bytes_total || !verify(*s.om, *replayed, s, o.seed, o)) {
      fmt::print(stderr, "ramkv-bench replay: the replayed master differs from the source\n");
      return 1;
    }
    live = replayed->stats().object_count;
    runs_mb_s.push_back(f->replay_mb_s);
    double memcpy_best = std::max(best.memcpy_mb_s, f->memcpy_mb_s);
    if (run == 0 || f->replay_mb_s > best.replay_mb_s) best = *f;
    best.memcpy_mb_s = memcpy_best;
  }
  return print(o, s, best, live, runs_mb_s);
}

}  // namespace ramkv::bench
