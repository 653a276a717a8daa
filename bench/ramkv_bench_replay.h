// `ramkv-bench replay`: the single-process replay ceiling of crash recovery. Fills a
// source master's log in memory (writes, with some overwrites and removes), takes its
// segments' bytes as backups would hold them, and times replaying all of them, in shuffled
// segment order, into a fresh master on one thread (ObjectManager::replay, as one
// recovery master does: docs/recovery.md, step 5). No network and no disk: this is the
// CPU ceiling a recovery master cannot beat. Reported next to a memcpy of the same bytes
// measured in the same run (the best of --runs for both: a ceiling, on a shared machine).
// Every result is checked (object count, table statistics, a sample of keys against the
// source).
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

namespace ramkv::bench {

struct ReplayBenchOptions {
  std::string bytes = "256M";    // log bytes to fill (and replay)
  uint32_t object_bytes = 1000;  // value bytes
  uint32_t key_bytes = 16;
  uint32_t overwrite_percent = 10;  // of the writes, to an existing key
  uint32_t remove_percent = 2;      // of the operations
  std::string segment_bytes = "8M";
  bool log_order = false;  // replay segments in log order instead of shuffled
  uint32_t runs = 3;       // replays (each into a fresh master); the best is reported
  uint64_t seed = 1;
  bool json = false;
};

void add_replay_command(CLI::App& app, ReplayBenchOptions& options);
int run_replay_bench(const ReplayBenchOptions& options);

}  // namespace ramkv::bench
