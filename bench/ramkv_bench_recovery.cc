#include "bench/ramkv_bench_recovery.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <thread>
#include <vector>

#include "bench/bench_keys.h"
#include "common/clock.h"
#include "common/config.h"
#include "common/local_port.h"
#include "common/transport.h"
#include "common/wire_format.h"
#include "ramkv/client.h"

namespace ramkv::bench {
namespace {

const Clock& steady() { return SystemClock::instance(); }

uint64_t unix_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

template <typename... Args>
int fail(fmt::format_string<Args...> format, Args&&... args) {
  fmt::print(stderr, "ramkv-bench recovery: {}\n",
             fmt::format(format, std::forward<Args>(args)...));
  return 1;
}

std::string key_of(uint64_t i) { return fmt::format("obj{:012}", i); }

// A value that says which object it belongs to, so a read-back proves it.
std::string value_of(uint64_t i, uint32_t bytes) {
  std::string v(bytes, '\0');
  for (size_t at = 0; at < v.size(); at += sizeof(uint64_t)) {
    uint64_t word = i * 0x9E3779B97F4A7C15ull + at;
    std::memcpy(v.data() + at, &word, std::min(sizeof(word), v.size() - at));
  }
  return v;
}

// ---- Local cluster ----------------------------------------------------------------------

struct LocalServer {
  pid_t pid = -1;
  std::string locator;
};

class LocalCluster {
 public:
  ~LocalCluster() { stop(); }
  Status start(const RecoveryBenchOptions& o, uint64_t bytes) {
    dir_ = o.dir;
    if (dir_.empty()) {
      char tmpl[] = "/var/tmp/ramkv-bench-recovery-XXXXXX";
      if (::mkdtemp(tmpl) == nullptr) return Status::kIoError;
      dir_ = tmpl;
      owned_dir_ = true;
    }
    std::error_code ec;
    std::filesystem::create_directories(dir_, ec);
    std::string bin = o.bin;
    if (bin.empty()) bin = std::filesystem::read_symlink("/proc/self/exe", ec).parent_path();
    // Each server holds its own share plus what it recovers: room for the whole master.
    std::string memory = o.memory;
    if (memory.empty()) {
      memory = fmt::format("{}M", std::max<uint64_t>(256, (bytes * 3 / 2 >> 20) + 128));
    }
    coordinator_ = fmt::format("127.0.0.1:{}", free_port());
    std::vector<std::string> argv = {bin + "/ramkv-coordinator", "--listen", coordinator_,
                                     "--data-dir", dir_ + "/coordinator"};
    // The cluster speaks what this process speaks (ramkv-bench --transport).
    const std::string transport(client_transport_name());
    argv.push_back("--transport");
    argv.push_back(transport);
    // And its sockets use this process's congestion control (ramkv-bench --tcp-congestion),
    // which the network floor's streams use too. Named only when it is not the programs'
    // own (cubic), so that --bin can still name a build from before the flag.
    const std::string congestion =
        tcp_congestion().empty() ? std::string("default") : std::string(tcp_congestion());
    std::vector<std::string> congestion_args;
    if (congestion != "cubic") congestion_args = {"--tcp-congestion", congestion};
    argv.insert(argv.end(), congestion_args.begin(), congestion_args.end());
    if (!o.partition_bytes.empty()) {
      argv.push_back("--recovery-partition-bytes");
      argv.push_back(o.partition_bytes);
    }
    coordinator_pid_ = spawn(argv, dir_ + "/coordinator.log");
    // Each backup reads its share of the crashed master (as primaries, in 8 MiB
    // segments) into buffers touched at start (buffer_pool.h: fresh memory is slow on
    // virtual machines), with room for the replicas written meanwhile: each backup gets
    // about twice its share from the recovery masters' re-replication (R = 3), and keeps
    // the closed ones in RAM while the recovery runs as long as a quarter of its buffers
    // is free (backup_service.h, "Closes wait while a recovery is read"): three times its
    // share, at least 96.
    const uint32_t share =
        static_cast<uint32_t>(bytes / std::max<uint32_t>(o.servers - 1, 1) / (8u << 20) + 1);
    const uint32_t open_replicas = std::max<uint32_t>(96, 3 * share);
    const std::string buffers = std::to_string(share + open_replicas);
    // Hash tables sized for the objects the bench writes, as the replay ceiling's is
    // (bench_keys.h): any server may be the one filled with all of them.
    std::string table = o.hash_table_bytes;
    if (table.empty()) {
      table = std::to_string(hash_table_bytes_for(std::max<uint64_t>(1, bytes / o.object_bytes)));
    }
    for (uint32_t i = 0; i < o.servers; ++i) {
      LocalServer s;
      s.locator = fmt::format("127.0.0.1:{}", free_port());
      std::vector<std::string> args = {bin + "/ramkv-server",
                                       "--coordinator",
                                       coordinator_,
                                       "--listen",
                                       s.locator,
                                       "--memory",
                                       memory,
                                       "--replicas",
                                       std::to_string(o.replicas),
                                       "--backup",
                                       "--durability",
                                       o.durability,
                                       "--backup-buffers-at-start",
                                       buffers,
                                       "--backup-buffers",
                                       std::to_string(open_replicas),
                                       "--data-dir",
                                       fmt::format("{}/backup-{}", dir_, i + 1),
                                       "--transport",
                                       transport};
      args.insert(args.end(), congestion_args.begin(), congestion_args.end());
      if (table != "default") {
        args.push_back("--hash-table-bytes");
        args.push_back(table);
      }
      s.pid = spawn(args, fmt::format("{}/server-{}.log", dir_, i + 1));
      servers_.push_back(s);
    }
    return Status::kOk;
  }
  const std::string& coordinator() const { return coordinator_; }
  const std::string& dir() const { return dir_; }
  pid_t pid_of(const std::string& locator) const {
    for (const auto& s : servers_) {
      if (s.locator == locator) return s.pid;
    }
    return -1;
  }
  void stop() {
    const size_t servers = servers_.size();
    for (auto& s : servers_) reap(s.pid);
    reap(coordinator_pid_);
    servers_.clear();
    if (std::getenv("RAMKV_KEEP_BENCH_DIRS") != nullptr) return;
    std::error_code ec;
    if (owned_dir_) {
      std::filesystem::remove_all(dir_, ec);
      owned_dir_ = false;
    } else {
      // A --dir the user named keeps its logs; the backups' replica files (gigabytes for a
      // 1 GiB fill, useless once the cluster is gone) go.
      for (size_t i = 0; i < servers; ++i) {
        std::filesystem::remove_all(fmt::format("{}/backup-{}", dir_, i + 1), ec);
      }
    }
  }

 private:
  static uint16_t free_port() { return unused_local_port().value_or(0); }
  static pid_t spawn(const std::vector<std::string>& argv, const std::string& log) {
    pid_t pid = ::fork();
    if (pid == 0) {
      FILE* f = std::fopen(log.c_str(), "a");
      if (f != nullptr) {
        ::dup2(fileno(f), STDOUT_FILENO);
        ::dup2(fileno(f), STDERR_FILENO);
      }
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      _exit(127);
    }
    return pid;
  }
  // SIGTERM, then SIGKILL after 5 s.
  static void reap(pid_t& pid) {
    if (pid <= 0) return;
    ::kill(pid, SIGTERM);
    int status = 0;
    for (int i = 0; i < 500; ++i) {
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    pid = -1;
  }

  std::string dir_;
  bool owned_dir_ = false;
  std::string coordinator_;
  pid_t coordinator_pid_ = -1;
  std::vector<LocalServer> servers_;
};

// ---- Coordinator and server queries -------------------------------------------------

struct Recovery {
  wire::RecoveryInfo info;
  std::vector<wire::PartitionInfo> partitions;
  std::string error;
};

std::optional<Recovery> recovery_of(ClientTransport& t, const std::string& coordinator,
                                    uint64_t master_id) {
  auto r = call(t, coordinator,
                {.opcode = wire::Opcode::kGetRecoveries, .timeout_ns = 2'000'000'000}, {});
  if (r.status != Status::kOk) return std::nullopt;
  wire::BodyReader in(r.body);
  wire::RecoveriesHeader header;
  if (!in.get(&header)) return std::nullopt;
  std::vector<Recovery> all(header.count);
  for (auto& a : all) {
    if (!in.get(&a.info)) return std::nullopt;
  }
  for (auto& a : all) {
    a.partitions.resize(a.info.partitions);
    for (auto& p : a.partitions) {
      if (!in.get(&p)) return std::nullopt;
    }
  }
  for (auto& a : all) {
    std::string_view e;
    if (!in.get_string(a.info.error_bytes, &e)) return std::nullopt;
    a.error = std::string(e);
  }
  std::optional<Recovery> newest;
  for (auto& a : all) {
    if (a.info.crashed_master_id == master_id) newest = std::move(a);
  }
  return newest;
}

// "name value" lines -> value of `name`, or 0.
uint64_t stat_of(const std::string& text, const std::string& name) {
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find('\n', at);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + at, end - at);
    if (line.starts_with(name) && line.size() > name.size() && line[name.size()] == ' ') {
      return std::strtoull(std::string(line.substr(name.size() + 1)).c_str(), nullptr, 10);
    }
    at = end + 1;
  }
  return 0;
}

// Waits (at most `timeout_s`) until no live backup has a flush queued or in flight: the
// replicas a recovery's masters closed are kept in RAM while it runs
// (backup/backup_service.h, "Closes wait while a recovery is read") and written after it,
// and the ceiling and the floor must not be measured on CPUs those writes share. Returns
// the seconds waited, or nullopt if they were not done in time.
std::optional<double> wait_for_backup_writes(Client& client, double timeout_s) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    bool busy = false;
    if (auto servers = client.servers(); servers.ok()) {
      for (const auto& srv : *servers) {
        if (!srv.backup || srv.status != ServerStatus::kUp) continue;
        auto stats = client.server_stats(srv.locator);
        if (stats.ok() && (stat_of(*stats, "backup_flushes_queued") > 0 ||
                           stat_of(*stats, "backup_flush_operations_in_flight") > 0)) {
          busy = true;
        }
      }
    }
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!busy) return waited;
    if (waited > timeout_s) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// The single-process replay ceiling: `ramkv-bench replay` run as a child of this binary,
// on as many bytes as the recovery replays (the "replay of the same segments"): a
// smaller run is faster per byte, its hash table staying in the caches (256 MiB replayed
// at 1,534-1,896 MB/s where 1 GiB did at 1,126-1,349, alternating on one machine). The
// best of three runs: this machine's speed wanders by a third from minute to minute, and
// a ceiling caught in a slow moment would flatter the recovery.
std::string ceiling_bytes(const RecoveryBenchOptions& o) {
  return o.ceiling_bytes.empty() ? o.bytes : o.ceiling_bytes;
}

// *runs: each run's MB/s, comma-separated (the spread says how much the machine wandered).
std::optional<double> replay_ceiling(const RecoveryBenchOptions& o, std::string* runs) {
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return std::nullopt;
  std::string cmd =
      fmt::format("'{}' replay --bytes {} --object-bytes {} --runs 3 --json 2>/dev/null",
                  self.string(), ceiling_bytes(o), o.object_bytes);
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return std::nullopt;
  std::string out;
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  if (::pclose(p) != 0) return std::nullopt;
  const std::string key = "\"replay_mb_per_sec\":";
  size_t at = out.find(key);
  if (at == std::string::npos) return std::nullopt;
  const std::string runs_key = "\"replay_mb_per_sec_runs\": [";
  if (size_t r = out.find(runs_key); r != std::string::npos) {
    const size_t from = r + runs_key.size();
    if (size_t end = out.find(']', from); end != std::string::npos) {
      *runs = out.substr(from, end - from);
    }
  }
  return std::strtod(out.c_str() + at + key.size(), nullptr);
}

// The network floor: what moving a recovery's bytes over loopback TCP alone costs on this
// machine, now. `streams` pairs of processes forked from this one (one per recovery
// master) each move bytes / streams: the sender writes 1 MiB at a time, the receiver
// reads 1 MiB at a time, each cycling through a buffer of its own larger than the caches
// (a recovery's bytes do not sit in a cache either), on huge pages where the kernel gives
// them (as the servers' buffers are) and touched before the clock starts. Nothing else is
// done with the bytes, so no recovery over TCP can move them for less.
struct NetworkFloor {
  double seconds = 0;      // wall clock, all streams at once
  double cpu_seconds = 0;  // the machine's busy time over that wall clock (see busy_seconds)
};

// The CPU time every CPU of the machine has been busy (user, system, interrupts and
// softirqs), from /proc/stat; nullopt where it cannot be read. Softirqs are where
// loopback TCP does much of a receiver's work, and a process's rusage leaves them out.
std::optional<double> busy_seconds() {
  FILE* f = std::fopen("/proc/stat", "r");
  if (f == nullptr) return std::nullopt;
  unsigned long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0;
  const int n = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu", &user, &nice, &system,
                            &idle, &iowait, &irq, &softirq);
  std::fclose(f);
  if (n != 7) return std::nullopt;
  const long tick = ::sysconf(_SC_CLK_TCK);
  return static_cast<double>(user + nice + system + irq + softirq) /
         static_cast<double>(tick > 0 ? tick : 100);
}

double cpu_of_children() {
  rusage u{};
  ::getrusage(RUSAGE_CHILDREN, &u);
  auto sec = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
  };
  return sec(u.ru_utime) + sec(u.ru_stime);
}

// The cluster's congestion control (tcp_congestion()) on a floor stream's socket, without
// allocating or logging (a forked child); the parent checked at start that it is usable.
// Set before connect() or listen(): an established socket switched away from BBR stays
// paced (the kernel never clears the pacing BBR asked for), and accepted sockets inherit
// the listener's choice.
void set_congestion(int fd) {
  const std::string_view name = tcp_congestion();
  if (fd >= 0 && !name.empty()) {
    ::setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name.data(), static_cast<socklen_t>(name.size()));
  }
}

// Runs in a forked child: no allocation, no logging, _exit only. Writes a byte to `ready`
// once its buffer is touched.

[[noreturn]] void floor_child(bool sender, int listen_fd, uint16_t port, int barrier, int ready,
                              uint64_t bytes) {
  constexpr size_t kChunk = 1u << 20;
  constexpr size_t kBuffer = 64u << 20;
  constexpr size_t kHuge = 2u << 20;
  void* mem =
      ::mmap(nullptr, kBuffer + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) ::_exit(2);
  auto* buf =
      reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(mem) + kHuge - 1) & ~(kHuge - 1));
  ::madvise(buf, kBuffer, MADV_HUGEPAGE);
  std::memset(buf, 0x5a, kBuffer);
  if (::write(ready, "r", 1) != 1) ::_exit(6);
  size_t at = 0;
  auto next = [&] {
    char* p = buf + at;
    at = (at + kChunk) % kBuffer;
    return p;
  };
  if (!sender) {
    int fd = ::accept(listen_fd, nullptr, nullptr);
    if (fd < 0) ::_exit(3);
    while (::read(fd, next(), kChunk) > 0) {
    }
    ::_exit(0);
  }
  char c;
  while (::read(barrier, &c, 1) > 0) {
  }
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  set_congestion(fd);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) ::_exit(4);
  for (uint64_t left = bytes; left > 0;) {
    // A short send leaves the rest of this chunk unsent: the next one starts a new chunk,
    // which moves as many bytes.
    ssize_t n = ::send(fd, next(), std::min<uint64_t>(left, kChunk), MSG_NOSIGNAL);
    if (n <= 0) ::_exit(5);
    left -= static_cast<uint64_t>(n);
  }
  ::_exit(0);
}

std::optional<NetworkFloor> network_floor(uint64_t bytes, uint32_t streams) {
  streams = std::max<uint32_t>(streams, 1);
  int barrier[2];
  int ready[2];
  if (::pipe(barrier) != 0) return std::nullopt;
  if (::pipe(ready) != 0) {
    ::close(barrier[0]);
    ::close(barrier[1]);
    return std::nullopt;
  }
  std::vector<std::pair<pid_t, pid_t>> pairs;  // receiver, sender
  uint32_t children = 0;
  bool ok = true;
  for (uint32_t i = 0; i < streams && ok; ++i) {
    int listen_fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    set_congestion(listen_fd);  // accepted sockets inherit it
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    if (listen_fd < 0 || ::bind(listen_fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
        ::listen(listen_fd, 1) != 0 ||
        ::getsockname(listen_fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      if (listen_fd >= 0) ::close(listen_fd);
      ok = false;
      break;
    }
    const uint64_t share = bytes / streams + (i < bytes % streams ? 1 : 0);
    pid_t pids[2] = {-1, -1};
    for (int sender = 0; sender < 2 && ok; ++sender) {
      pids[sender] = ::fork();
      if (pids[sender] == 0) {
        ::close(barrier[1]);
        ::close(ready[0]);
        floor_child(sender == 1, listen_fd, ntohs(a.sin_port), barrier[0], ready[1], share);
      }
      if (pids[sender] < 0) ok = false;
      if (pids[sender] > 0) ++children;
    }
    ::close(listen_fd);
    if (pids[0] > 0 && pids[1] <= 0) ::kill(pids[0], SIGKILL);  // no sender to wait for
    if (pids[0] > 0) pairs.emplace_back(pids[0], pids[1]);
  }
  ::close(barrier[0]);
  ::close(ready[1]);
  // Every child has touched its buffer (or died: its end of the pipe closes) before the
  // clock starts.
  for (uint32_t got = 0; got < children;) {
    char c;
    if (::read(ready[0], &c, 1) != 1) break;
    ++got;
  }
  ::close(ready[0]);
  const double cpu_before = cpu_of_children();
  const std::optional<double> busy_before = busy_seconds();
  const uint64_t start = steady().now_ns();
  ::close(barrier[1]);  // the senders start
  auto exited_well = [](pid_t pid) {
    int status = 0;
    return pid > 0 && ::waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
           WEXITSTATUS(status) == 0;
  };
  for (auto [receiver, sender] : pairs) {
    // A sender that failed leaves its receiver waiting for a connection: stop it.
    if (sender > 0 && !exited_well(sender)) {
      ok = false;
      ::kill(receiver, SIGKILL);
    }
    if (!exited_well(receiver)) ok = false;
  }
  if (!ok) return std::nullopt;
  const double seconds = static_cast<double>(steady().now_ns() - start) / 1e9;
  const std::optional<double> busy_after = busy_seconds();
  // The machine's busy time when /proc/stat says it (softirqs included); else what the
  // children used, touching their buffers included.
  const double cpu =
      busy_before && busy_after ? *busy_after - *busy_before : cpu_of_children() - cpu_before;
  return NetworkFloor{.seconds = seconds, .cpu_seconds = cpu};
}

struct Sample {
  double seconds = 0;
  std::map<uint64_t, uint64_t> bytes;  // recovery master -> recovery bytes pulled so far
};

}  // namespace

void add_recovery_command(CLI::App& app, RecoveryBenchOptions& o) {
  auto* cmd = app.add_subcommand(
      "recovery", "Fill one master, kill it (SIGKILL), time detection and recovery, check data");
  cmd->add_option("--coordinator", o.coordinator, "Coordinator host:port of a running cluster");
  cmd->add_option("--kill-command", o.kill_command,
                  "With --coordinator: shell command that kills the master; {locator} "
                  "and {host} are replaced by its address, e.g. "
                  "\"ssh {host} pkill -9 -f 'ramkv-server.*{locator}'\"");
  cmd->add_flag("--local", o.local, "Start a local cluster (127.0.0.1) for the run, then stop it");
  cmd->add_option("--servers", o.servers, "--local: servers, each master and backup")
      ->check(CLI::Range(2u, 64u))
      ->capture_default_str();
  cmd->add_option("--replicas", o.replicas, "--local: replicas per segment")
      ->check(CLI::Range(1u, 16u))
      ->capture_default_str();
  cmd->add_option("--memory", o.memory, "--local: log memory per server (default: 1.5 x --bytes)");
  cmd->add_option("--hash-table-bytes", o.hash_table_bytes,
                  "--local: hash-table memory per server (default: sized for the objects "
                  "written, as the replay ceiling's is; 'default': the server's own, memory / 16)");
  cmd->add_option("--dir", o.dir,
                  "--local: data and logs (default: a fresh /var/tmp dir, removed after); a dir "
                  "named here keeps its logs, not the backups' replica files "
                  "(RAMKV_KEEP_BENCH_DIRS=1 keeps everything)");
  cmd->add_option("--bin", o.bin, "--local: directory of ramkv-coordinator and ramkv-server");
  cmd->add_option("--durability", o.durability, "--local: buffered or disk")
      ->check(CLI::IsMember({"buffered", "disk"}))
      ->capture_default_str();
  cmd->add_option("--partition-bytes", o.partition_bytes,
                  "--local: the coordinator's --recovery-partition-bytes");
  cmd->add_option("--bytes", o.bytes, "Object bytes to fill the master with")
      ->capture_default_str();
  cmd->add_option("--object-bytes", o.object_bytes, "Value bytes per object")
      ->check(CLI::Range(8u, 1u << 20))
      ->capture_default_str();
  cmd->add_option("--timeout", o.timeout_s, "Seconds to wait for the recovery")
      ->check(CLI::Range(1u, 86400u))
      ->capture_default_str();
  cmd->add_option(
      "--ceiling-bytes", o.ceiling_bytes,
      "Bytes for the single-process replay ceiling run (default: --bytes, the same amount "
      "the recovery replays; 0: skip it and the network floor)");
  cmd->add_option("--csv", o.csv, "Write the replay timeline (seconds, bytes per recovery master)");
  cmd->add_option("--plot", o.plot, "Draw the timeline as a PNG (needs gnuplot)");
  cmd->add_flag("--json", o.json, "Print one JSON object instead of the table");
}

int run_recovery_bench(const RecoveryBenchOptions& o) {
  auto bytes = parse_bytes(o.bytes);
  if (!bytes.ok() || *bytes == 0) return fail("bad --bytes '{}'", o.bytes);
  if (o.local == !o.coordinator.empty()) return fail("give either --local or --coordinator");
  if (!o.local && o.kill_command.empty()) return fail("--coordinator needs --kill-command");
  LocalCluster local;
  std::string coordinator = o.coordinator;
  if (o.local) {
    if (Status s = local.start(o, *bytes); s != Status::kOk) {
      return fail("cannot start a local cluster: {}", status_name(s));
    }
    coordinator = local.coordinator();
  }
  ClientOptions co;
  co.coordinator = coordinator;
  co.timeout_ms = 60'000;
  std::unique_ptr<Client> client;
  // Servers touch all their log memory before they enlist (about a second per GiB on a
  // virtual machine), so a local cluster of big servers takes a while to come up.
  for (int i = 0; i < 2400 && client == nullptr; ++i) {
    auto c = Client::connect(co);
    if (c.ok()) {
      auto servers = (*c)->servers();
      size_t up = 0;
      if (servers.ok()) {
        for (const auto& s : *servers) up += s.master && s.status == ServerStatus::kUp;
      }
      if (!o.local || up >= o.servers) client = std::move(*c);
    }
    if (client == nullptr) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (client == nullptr) return fail("no cluster at {}", coordinator);

  // One tablet, so one master holds all of it.
  const std::string table_name = fmt::format("recovery-bench-{}", unix_ns());
  auto table = client->create_table(table_name, 1);
  if (!table.ok()) return fail("create table: {}", status_name(table.status()));
  auto tablets = client->tablets(*table);
  if (!tablets.ok() || tablets->size() != 1) return fail("cannot find the table's master");
  const uint64_t victim = (*tablets)[0].server_id;
  const std::string victim_locator = (*tablets)[0].locator;

  // Fill.
  const uint64_t objects = std::max<uint64_t>(1, *bytes / o.object_bytes);
  const uint64_t batch = std::max<uint64_t>(1, (256u << 10) / o.object_bytes);
  const uint64_t fill_start = steady().now_ns();
  if (!o.json) {
    fmt::print("filling master {} at {} with {} objects of {} bytes\n",
               wire::server_id_text(victim), victim_locator, objects, o.object_bytes);
  }
  for (uint64_t i = 0; i < objects; i += batch) {
    std::vector<MultiWriteItem> items;
    for (uint64_t k = i; k < std::min(objects, i + batch); ++k) {
      items.push_back({.table_id = *table, .key = key_of(k), .value = value_of(k, o.object_bytes)});
    }
    for (const auto& r : client->multi_write(items)) {
      if (!r.ok()) return fail("fill: {}", status_name(r.status()));
    }
  }
  const double fill_seconds = static_cast<double>(steady().now_ns() - fill_start) / 1e9;
  const uint64_t filled_bytes = objects * (o.object_bytes + key_of(0).size());

  // What the survivors send over the network (replication, recovery data pulled from
  // other servers' backups), read before the kill and after the recovery: the bytes the
  // recovery moved, for its network floor.
  auto network_counter = [&] {
    uint64_t total = 0;
    if (auto servers = client->servers(); servers.ok()) {
      for (const auto& srv : *servers) {
        if (!srv.master || srv.status != ServerStatus::kUp || srv.server_id == victim) continue;
        auto stats = client->server_stats(srv.locator);
        if (!stats.ok()) continue;
        total += stat_of(*stats, "replication_bytes_sent") +
                 stat_of(*stats, "recovery_bytes_pulled_remote");
      }
    }
    return total;
  };
  const uint64_t network_before = network_counter();

  // Kill.
  const uint64_t killed_unix = unix_ns();
  const uint64_t killed_steady = steady().now_ns();
  if (o.local) {
    pid_t pid = local.pid_of(victim_locator);
    if (pid <= 0 || ::kill(pid, SIGKILL) != 0) return fail("cannot kill {}", victim_locator);
  } else {
    std::string cmd = o.kill_command;
    const std::string host = victim_locator.substr(0, victim_locator.rfind(':'));
    for (const auto& [name, value] :
         {std::pair<std::string, std::string>{"{locator}", victim_locator}, {"{host}", host}}) {
      for (size_t at = cmd.find(name); at != std::string::npos; at = cmd.find(name, at)) {
        cmd.replace(at, name.size(), value);
        at += value.size();
      }
    }
    if (std::system(cmd.c_str()) != 0) return fail("--kill-command failed: {}", cmd);
  }
  if (!o.json)
    fmt::print("killed master {} after {:.1f} s of filling\n", wire::server_id_text(victim),
               fill_seconds);

  // Watch the recovery, sampling each master's replay progress.
  auto transport = make_client_transport({});
  std::vector<Sample> timeline;
  std::optional<Recovery> done;
  std::string last_error;
  uint64_t next_sample = 0;
  const uint64_t deadline = killed_steady + uint64_t{o.timeout_s} * 1'000'000'000;
  while (steady().now_ns() < deadline) {
    auto r = recovery_of(*transport, coordinator, victim);
    if (r && r->info.state == wire::kRecoveryDone) {
      done = std::move(r);
      break;
    }
    if (r && r->info.state == wire::kRecoveryFailed && r->error != last_error) {
      last_error = r->error;
      fmt::print(stderr, "ramkv-bench recovery: the coordinator says: {} (it will try again)\n",
                 r->error);
    }
    if (steady().now_ns() >= next_sample) {
      next_sample = steady().now_ns() + 100'000'000;
      Sample s;
      s.seconds = static_cast<double>(steady().now_ns() - killed_steady) / 1e9;
      auto servers = client->servers();
      if (servers.ok()) {
        for (const auto& srv : *servers) {
          if (!srv.master || srv.status != ServerStatus::kUp || srv.server_id == victim) continue;
          // Short timeouts: the loop must not stall on a slow server.
          auto stats =
              call(*transport, srv.locator,
                   {.opcode = wire::Opcode::kGetServerStats, .timeout_ns = 200'000'000}, {});
          if (stats.status == Status::kOk) {
            s.bytes[srv.server_id] = stat_of(
                std::string(reinterpret_cast<const char*>(stats.body.data()), stats.body.size()),
                "recovery_bytes_pulled");
          }
        }
      }
      timeline.push_back(std::move(s));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!done)
    return fail("no recovery of master {} finished within {} s", wire::server_id_text(victim),
                o.timeout_s);
  // Served again: a read of the table answers.
  auto first = client->read(*table, key_of(0));
  const uint64_t served_unix = unix_ns();
  if (!first.ok()) return fail("read after recovery: {}", status_name(first.status()));
  const uint64_t network_after = network_counter();
  const uint64_t network_bytes =
      network_after > network_before ? network_after - network_before : 0;

  const double detection = static_cast<double>(done->info.declared_unix_ns - killed_unix) / 1e9;
  // Every tablet is the recovery masters' once the coordinator moved the last partition.
  const double recovery = static_cast<double>(done->info.finished_unix_ns - killed_unix) / 1e9;
  const double served = static_cast<double>(served_unix - killed_unix) / 1e9;
  const double replay_window =
      static_cast<double>(done->info.finished_unix_ns - done->info.declared_unix_ns) / 1e9;

  // Per recovery master and per backup figures.
  struct MasterRow {
    uint64_t bytes = 0;
    uint64_t ns = 0;
  };
  std::map<uint64_t, MasterRow> masters;
  for (const auto& p : done->partitions) {
    masters[p.recovery_master_id].bytes += p.bytes;
    masters[p.recovery_master_id].ns = std::max(masters[p.recovery_master_id].ns, p.replay_ns);
  }
  struct BackupRow {
    uint64_t id = 0;
    uint64_t bytes = 0;
    uint64_t ns = 0;
  };
  std::vector<BackupRow> backups;
  if (auto servers = client->servers(); servers.ok()) {
    for (const auto& srv : *servers) {
      if (!srv.backup || srv.status != ServerStatus::kUp) continue;
      auto stats = client->server_stats(srv.locator);
      if (!stats.ok()) continue;
      backups.push_back({srv.server_id, stat_of(*stats, "backup_recovery_read_bytes"),
                         stat_of(*stats, "backup_recovery_read_ns")});
    }
  }

  // Read everything back.
  uint64_t checked = 0;
  uint64_t lost = 0;
  for (uint64_t i = 0; i < objects; i += batch) {
    std::vector<MultiReadItem> items;
    for (uint64_t k = i; k < std::min(objects, i + batch); ++k) {
      items.push_back({.table_id = *table, .key = key_of(k)});
    }
    auto results = client->multi_read(items);
    for (size_t k = 0; k < results.size(); ++k) {
      ++checked;
      if (!results[k].ok() || results[k]->value != value_of(i + k, o.object_bytes)) ++lost;
    }
  }
  std::optional<double> ceiling;
  std::string ceiling_runs;  // each run's MB/s
  std::optional<double> writes_waited;
  if (o.ceiling_bytes != "0") {
    writes_waited = wait_for_backup_writes(*client, 120);
    if (!writes_waited) {
      fmt::print(stderr,
                 "ramkv-bench recovery: the backups' disk writes went on for over 120 s "
                 "after the read-back; measuring the ceiling anyway\n");
    }
    ceiling = replay_ceiling(o, &ceiling_runs);
  }
  // The floor of this recovery over TCP on this machine: the CPU that moving its bytes
  // over loopback takes, plus the replay's at the ceiling, spread over every CPU (and no
  // less than the transfer's own wall clock).
  std::optional<NetworkFloor> network;
  std::optional<double> floor_seconds;
  const double cpus = std::max(1u, std::thread::hardware_concurrency());
  if (ceiling && *ceiling > 0 && network_bytes > 0) {
    network = network_floor(network_bytes, static_cast<uint32_t>(masters.size()));
    if (network) {
      const double replay_cpu = static_cast<double>(done->info.bytes) / 1e6 / *ceiling;
      floor_seconds = std::max(network->seconds, (network->cpu_seconds + replay_cpu) / cpus);
    }
  }

  if (!o.csv.empty() || !o.plot.empty()) {
    std::string csv = o.csv.empty() ? o.plot + ".csv" : o.csv;
    if (FILE* f = std::fopen(csv.c_str(), "w"); f != nullptr) {
      std::fprintf(f, "seconds");
      for (const auto& [id, row] : masters)
        std::fprintf(f, ",master_%s_bytes", wire::server_id_text(id).c_str());
      std::fprintf(f, "\n");
      for (const auto& s : timeline) {
        std::fprintf(f, "%.3f", s.seconds);
        for (const auto& [id, row] : masters) {
          auto it = s.bytes.find(id);
          std::fprintf(f, ",%llu",
                       static_cast<unsigned long long>(it == s.bytes.end() ? 0 : it->second));
        }
        std::fprintf(f, "\n");
      }
      std::fclose(f);
    }
    if (!o.plot.empty()) {
      std::string script = fmt::format(
          "set terminal png size 900,500 noenhanced; set output '{}';"
          "set datafile separator ',';"
          "set key autotitle columnhead left top; set xlabel 'seconds since the kill';"
          "set ylabel 'MB replayed'; set title 'ramkv recovery of {} ({} recovery masters)';"
          "plot for [i=2:{}] '{}' using 1:(column(i)/1e6) with lines lw 2",
          o.plot, format_bytes(filled_bytes), masters.size(), masters.size() + 1, csv);
      std::string cmd = "gnuplot -e \"" + script + "\" 2>&1";
      if (std::system(cmd.c_str()) != 0) {
        fmt::print(stderr,
                   "ramkv-bench recovery: gnuplot failed or is not installed; the "
                   "timeline is in {}\n",
                   csv);
      }
    }
  }

  const double mb = static_cast<double>(done->info.bytes) / 1e6;
  std::optional<double> ratio;  // the recovery's rate over the ceiling
  if (ceiling && *ceiling > 0 && replay_window > 0) ratio = mb / replay_window / *ceiling;
  if (o.json) {
    std::string m;
    for (const auto& [id, row] : masters) {
      m += fmt::format(
          "{}{{\"id\":\"{}\",\"bytes\":{},\"seconds\":{:.3f},\"mb_per_sec\":{:.1f}}}",
          m.empty() ? "" : ",", wire::server_id_text(id), row.bytes,
          static_cast<double>(row.ns) / 1e9,
          row.ns == 0 ? 0.0
                      : static_cast<double>(row.bytes) / 1e6 / (static_cast<double>(row.ns) / 1e9));
    }
    std::string b;
    for (const auto& row : backups) {
      b += fmt::format(
          "{}{{\"id\":\"{}\",\"read_bytes\":{},\"read_seconds\":{:.3f},\"mb_per_sec\":{:.1f}}}",
          b.empty() ? "" : ",", wire::server_id_text(row.id), row.bytes,
          static_cast<double>(row.ns) / 1e9,
          row.ns == 0 ? 0.0
                      : static_cast<double>(row.bytes) / 1e6 / (static_cast<double>(row.ns) / 1e9));
    }
    fmt::print(
        "{{\"filled_bytes\":{},\"objects\":{},\"object_bytes\":{},\"fill_seconds\":{:.3f},"
        "\"detection_seconds\":{:.3f},\"recovery_seconds\":{:.3f},\"served_seconds\":{:.3f},"
        "\"recovered_bytes\":{},\"recovery_mb_per_sec\":{:.1f},\"partitions\":{},"
        "\"recovery_masters\":[{}],\"backups\":[{}],\"replay_ceiling_mb_per_sec\":{},"
        "\"replay_ceiling_runs_mb_per_sec\":[{}],"
        "\"network_bytes\":{},\"network_floor_seconds\":{},\"network_floor_cpu_seconds\":{},"
        "\"floor_seconds\":{},\"floor_mb_per_sec\":{},\"cpus\":{},"
        "\"ratio_to_ceiling\":{},\"backup_writes_waited_seconds\":{},"
        "\"objects_checked\":{},\"objects_lost\":{}}}\n",
        filled_bytes, objects, o.object_bytes, fill_seconds, detection, recovery, served,
        done->info.bytes, replay_window > 0 ? mb / replay_window : 0.0, done->partitions.size(), m,
        b, ceiling ? fmt::format("{:.1f}", *ceiling) : "null", ceiling_runs, network_bytes,
        network ? fmt::format("{:.3f}", network->seconds) : "null",
        network ? fmt::format("{:.3f}", network->cpu_seconds) : "null",
        floor_seconds ? fmt::format("{:.3f}", *floor_seconds) : "null",
        floor_seconds ? fmt::format("{:.1f}", mb / *floor_seconds) : "null", cpus,
        ratio ? fmt::format("{:.3f}", *ratio) : "null",
        writes_waited ? fmt::format("{:.3f}", *writes_waited) : "null", checked, lost);
  } else {
    fmt::print("detection   {:8.3f} s (kill -> declared crashed)\n", detection);
    fmt::print("recovery    {:8.3f} s (kill -> every tablet served)\n", recovery);
    fmt::print("recovered   {} in {} partitions, {:.1f} MB/s from declaration to done\n",
               format_bytes(done->info.bytes), done->partitions.size(),
               replay_window > 0 ? mb / replay_window : 0.0);
    for (const auto& [id, row] : masters) {
      const double rate =
          row.ns == 0 ? 0
                      : static_cast<double>(row.bytes) / 1e6 / (static_cast<double>(row.ns) / 1e9);
      fmt::print("  recovery master {:>6}: {} in {:.3f} s, {:.1f} MB/s{}\n",
                 wire::server_id_text(id), format_bytes(row.bytes),
                 static_cast<double>(row.ns) / 1e9, rate,
                 ceiling ? fmt::format(" ({:.2f}x the replay ceiling)", rate / *ceiling) : "");
    }
    for (const auto& row : backups) {
      fmt::print("  backup {:>6}: read {} in {:.3f} s\n", wire::server_id_text(row.id),
                 format_bytes(row.bytes), static_cast<double>(row.ns) / 1e9);
    }
    if (writes_waited) {
      fmt::print(
          "backups' disk writes of the replicas kept in RAM during the recovery: done "
          "{:.1f} s after the read-back\n",
          *writes_waited);
    }
    if (ceiling) {
      fmt::print("replay ceiling (one process, from memory, {}): {:.1f} MB/s (best of {})\n",
                 ceiling_bytes(o), *ceiling, ceiling_runs.empty() ? "3" : ceiling_runs);
      if (ratio)
        fmt::print("recovery rate / replay ceiling: {:.2f}x (declaration -> done)\n", *ratio);
    }
    if (network) {
      fmt::print(
          "network: the survivors sent {} during the recovery (replication, recovery data); "
          "loopback TCP alone moves that in {:.3f} s ({} streams, {:.2f} CPU-seconds of the "
          "machine, softirqs included)\n",
          format_bytes(network_bytes), network->seconds, masters.size(), network->cpu_seconds);
    }
    if (floor_seconds && ceiling) {
      fmt::print(
          "floor over TCP on {:.0f} CPUs (that CPU and the replay's at the ceiling, spread over "
          "them): {:.3f} s, {:.1f} MB/s = {:.2f}x the replay ceiling; this recovery ran at {:.2f} "
          "of the floor's rate\n",
          cpus, *floor_seconds, mb / *floor_seconds, mb / *floor_seconds / *ceiling,
          replay_window > 0 ? *floor_seconds / replay_window : 0.0);
    }
    fmt::print("objects checked {}, lost {}\n", checked, lost);
  }
  return lost == 0 ? 0 : 1;
}

}  // namespace ramkv::bench
