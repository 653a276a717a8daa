#include "bench/ramkv_bench_backup.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "backup/replica_file.h"
#include "backup/uring.h"
#include "common/clock.h"
#include "common/config.h"

namespace ramkv::bench {
namespace {

using backup::AlignedBuffer;
using backup::Uring;

double now_s() { return static_cast<double>(SystemClock::instance().now_ns()) / 1e9; }

// The plain reference: one file, sequential O_DIRECT pwrite of `chunk` at a time, then
// fdatasync; and the same read back with pread.
struct Plain {
  double write_mb_s = 0, read_mb_s = 0;
};
Result<Plain> plain(const std::string& path, uint64_t total, AlignedBuffer& chunk) {
  Plain p;
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0644);
  if (fd < 0) return Status::kIoError;
  double t0 = now_s();
  for (uint64_t off = 0; off < total; off += chunk.size()) {
    if (::pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)) !=
        static_cast<ssize_t>(chunk.size())) {
      ::close(fd);
      return Status::kIoError;
    }
  }
  ::fdatasync(fd);
  p.write_mb_s = static_cast<double>(total) / 1e6 / (now_s() - t0);
  t0 = now_s();
  for (uint64_t off = 0; off < total; off += chunk.size()) {
    if (::pread(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)) <= 0) break;
  }
  p.read_mb_s = static_cast<double>(total) / 1e6 / (now_s() - t0);
  ::close(fd);
  ::unlink(path.c_str());
  return p;
}

// The backup's way: `files` replica files (header block + segment), `depth` in flight,
// each fdatasync'ed; then read back with the same depth.
struct Replicas {
  double write_mb_s = 0, read_mb_s = 0;
};
Result<Replicas> replicas(const std::string& dir, uint64_t files, uint32_t segment,
                          uint32_t depth) {
  auto ring = Uring::create(depth * 2);
  if (!ring.ok()) return ring.status();
  std::vector<AlignedBuffer> buffers;
  for (uint32_t i = 0; i < depth; ++i) {
    buffers.emplace_back(backup::kReplicaHeaderBlock + segment);
    std::memset(buffers.back().data(), static_cast<int>(i + 1), buffers.back().size());
    backup::encode_replica_header({.master_id = 1,
                                   .segment_id = i,
                                   .capacity = segment,
                                   .certificate_bytes = segment,
                                   .closed = true},
                                  buffers.back().span());
  }
  std::filesystem::create_directories(dir + "/1");
  std::vector<int> fds(files, -1);
  for (uint64_t f = 0; f < files; ++f) {
    fds[f] = ::open(backup::replica_path(dir, 1, f).c_str(),
                    O_RDWR | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0644);
    if (fds[f] < 0) return Status::kIoError;
  }
  // Each file takes two operations (write, then an ordered datasync); user_data = file*2+op.
  auto run = [&](bool write) -> Status {
    std::vector<Uring::Completion> done;
    std::vector<uint32_t> free_slots;
    for (uint32_t i = 0; i < depth; ++i) free_slots.push_back(i);
    std::vector<uint32_t> slot_of(files);
    uint64_t next = 0, finished = 0;
    while (finished < files) {
      while (next < files && !free_slots.empty()) {
        uint32_t slot = free_slots.back();
        free_slots.pop_back();
        slot_of[next] = slot;
        int fd = fds[next];
        Status s = write ? (*ring)->submit_write(fd, buffers[slot].span(), 0, next)
                         : (*ring)->submit_read(fd, buffers[slot].span(), 0, next);
        if (s != Status::kOk) return s;
        ++next;
      }
      done.clear();
      if (Status s = (*ring)->wait(1, &done); s != Status::kOk) return s;
      for (const auto& c : done) {
        if (c.result < 0) return Status::kIoError;
        if (c.user_data & (1ULL << 63)) {  // a datasync finished: the file is durable
          ++finished;
          free_slots.push_back(slot_of[c.user_data & ~(1ULL << 63)]);
        } else if (write) {
          if (Status s = (*ring)->submit_datasync(fds[c.user_data], c.user_data | (1ULL << 63));
              s != Status::kOk) {
            return s;
          }
        } else {
          ++finished;
          free_slots.push_back(slot_of[c.user_data]);
        }
      }
    }
    return Status::kOk;
  };
  Replicas r;
  uint64_t total = files * (backup::kReplicaHeaderBlock + segment);
  double t0 = now_s();
  if (Status s = run(true); s != Status::kOk) return s;
  r.write_mb_s = static_cast<double>(total) / 1e6 / (now_s() - t0);
  t0 = now_s();
  if (Status s = run(false); s != Status::kOk) return s;
  r.read_mb_s = static_cast<double>(total) / 1e6 / (now_s() - t0);
  for (int fd : fds) ::close(fd);
  std::filesystem::remove_all(dir + "/1");
  return r;
}

}  // namespace

void add_backup_disk_command(CLI::App& app, BackupDiskOptions& o) {
  auto* cmd =
      app.add_subcommand("backup-disk",
                         "Backup segment-file bandwidth (io_uring, O_DIRECT) vs a plain sequential "
                         "O_DIRECT write/read of the same bytes");
  cmd->add_option("--dir", o.dir, "A directory on the filesystem to measure (not tmpfs)")
      ->capture_default_str();
  cmd->add_option("--bytes", o.bytes, "Bytes to write, e.g. 1G")->capture_default_str();
  cmd->add_option("--segment-bytes", o.segment_bytes, "Segment size")->capture_default_str();
  cmd->add_option("--depth", o.depth, "Segment files in flight")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  cmd->add_flag("--json", o.json, "Print one JSON object instead of the table");
}

int run_backup_disk_bench(const BackupDiskOptions& o) {
  auto bytes = parse_bytes(o.bytes);
  auto segment = parse_bytes(o.segment_bytes);
  if (!bytes.ok() || !segment.ok() || *segment < 4096 || *segment % 4096 != 0 ||
      *segment > (1u << 30) || *bytes < *segment) {
    fmt::print(stderr,
               "ramkv-bench backup-disk: bad --bytes or --segment-bytes (segments are "
               "multiples of 4 KiB, at most 1 GiB, and --bytes holds at least one)\n");
    return 2;
  }
  std::string dir = o.dir + "/ramkv-backup-disk-" + std::to_string(::getpid());
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    fmt::print(stderr, "ramkv-bench backup-disk: cannot create {}: {}\n", dir, ec.message());
    return 1;
  }
  uint64_t files = *bytes / *segment;
  uint64_t total = files * *segment;
  AlignedBuffer chunk(*segment);
  std::memset(chunk.data(), 7, chunk.size());
  auto p = plain(dir + "/plain", total, chunk);
  auto r = p.ok() ? replicas(dir, files, static_cast<uint32_t>(*segment), o.depth)
                  : Result<Replicas>(p.status());
  std::filesystem::remove_all(dir, ec);
  if (!p.ok() || !r.ok()) {
    fmt::print(stderr,
               "ramkv-bench backup-disk: I/O failed ({}); is {} on a filesystem that "
               "supports O_DIRECT (not tmpfs)?\n",
               status_name(p.ok() ? r.status() : p.status()), o.dir);
    return 1;
  }
  double wr = r->write_mb_s / p->write_mb_s, rr = r->read_mb_s / p->read_mb_s;
  if (o.json) {
    fmt::print(
        "{{\"backup_write_mb_per_sec\": {:.0f}, \"backup_read_mb_per_sec\": {:.0f}, "
        "\"plain_write_mb_per_sec\": {:.0f}, \"plain_read_mb_per_sec\": {:.0f}, "
        "\"write_ratio\": {:.3f}, \"read_ratio\": {:.3f}, \"bytes\": {}, "
        "\"segment_bytes\": {}, \"depth\": {}}}\n",
        r->write_mb_s, r->read_mb_s, p->write_mb_s, p->read_mb_s, wr, rr, total, *segment, o.depth);
  } else {
    fmt::print("ramkv-bench backup-disk: {} in {} segment files of {}, {} in flight, {}\n",
               format_bytes(total), files, format_bytes(*segment), o.depth, o.dir);
    fmt::print("{:<44} {:>10} {:>10}\n", "", "write MB/s", "read MB/s");
    fmt::print("{:<44} {:>10.0f} {:>10.0f}\n", "backup replica files (io_uring, O_DIRECT)",
               r->write_mb_s, r->read_mb_s);
    fmt::print("{:<44} {:>10.0f} {:>10.0f}\n", "plain sequential O_DIRECT, one file", p->write_mb_s,
               p->read_mb_s);
    fmt::print("{:<44} {:>10.2f} {:>10.2f}\n", "ratio", wr, rr);
  }
  return 0;
}

}  // namespace ramkv::bench
