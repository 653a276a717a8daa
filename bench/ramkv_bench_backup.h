// `ramkv-bench backup-disk`: the backup's segment-file bandwidth (io_uring, O_DIRECT, one
// file per replica with its header block, several writes in flight) next to a plain
// sequential O_DIRECT write and read of the same bytes on the same filesystem, measured
// in the same run.
#pragma once

#include <CLI/CLI.hpp>

#include <string>

namespace ramkv::bench {

struct BackupDiskOptions {
  std::string dir = "/var/tmp";
  std::string bytes = "1G";
  std::string segment_bytes = "8M";
  uint32_t depth = 8;
  bool json = false;
};

void add_backup_disk_command(CLI::App& app, BackupDiskOptions& options);
int run_backup_disk_bench(const BackupDiskOptions& options);

}  // namespace ramkv::bench
