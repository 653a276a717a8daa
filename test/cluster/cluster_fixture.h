// LocalCluster: real ramkv processes (one coordinator, N servers) on 127.0.0.1, started
// from the build's bin/ directory, with their data and logs in a fresh temp directory.
// Every process is stopped by PID (SIGTERM, then SIGKILL after 5 s) when the cluster
// goes away; nothing else is touched.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/local_port.h"
#include "common/transport.h"
#include "ramkv/client.h"
#ifdef RAMKV_HAVE_RDMA
#include "rdma/rdma_transport.h"
#endif

#ifndef RAMKV_BIN_DIR
#error "RAMKV_BIN_DIR must name the directory with ramkv-coordinator and ramkv-server"
#endif

namespace ramkv::test {

// The transport every process of a test cluster uses, and this test process too:
// RAMKV_TEST_TRANSPORT=rdma runs the same cluster tests over RDMA (in CI over the
// emulated verbs provider, rdma/emu), unset or "tcp" over TCP.
inline std::string test_transport() {
  const char* t = std::getenv("RAMKV_TEST_TRANSPORT");
  return t != nullptr && std::string(t) == "rdma" ? "rdma" : "tcp";
}
// Small RDMA receive pools: a test cluster has many processes on one machine.
constexpr uint32_t kTestRdmaRecvBuffers = 4;
inline std::vector<std::string> transport_args() {
  if (test_transport() != "rdma") return {};
  return {"--transport", "rdma"};
}
// Makes this process's client transports (the Client's and the tests' own) use the test
// transport. Idempotent.
inline void use_test_transport() {
  if (test_transport() != "rdma") return;
#ifdef RAMKV_HAVE_RDMA
  rdma::RdmaOptions o;
  o.client_recv_buffers = kTestRdmaRecvBuffers;
  rdma::use_rdma(o);
#else
  FAIL("RAMKV_TEST_TRANSPORT=rdma, but this build has no RDMA transport");
#endif
}

class Process {
 public:
  Process() = default;
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;
  ~Process() { stop(); }

  void start(const std::vector<std::string>& argv, const std::string& log_path) {
    log_path_ = log_path;
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      FILE* log = std::fopen(log_path.c_str(), "a");
      if (log != nullptr) {
        ::dup2(fileno(log), STDOUT_FILENO);
        ::dup2(fileno(log), STDERR_FILENO);
      }
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      _exit(127);
    }
  }
  // SIGTERM and wait (up to 5 s), then SIGKILL. Returns the exit status, -1 if killed.
  int stop() { return signal_and_wait(SIGTERM); }
  void kill9() { signal_and_wait(SIGKILL); }
  bool running() const {
    if (pid_ <= 0) return false;
    int status = 0;
    return ::waitpid(pid_, &status, WNOHANG) == 0;
  }
  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }

  // For a test's failure message: whether the process still runs (and how it ended if
  // not), then the last lines of its log.
  std::string describe(size_t lines = 6) {
    std::string out = log_path_ + ": ";
    if (pid_ <= 0) {
      out += "not running";
    } else {
      int status = 0;
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == 0) {
        out += "running (pid " + std::to_string(pid_) + ")";
      } else if (r == pid_) {
        pid_ = -1;
        out += WIFEXITED(status) ? "exited with " + std::to_string(WEXITSTATUS(status))
                                 : "killed by signal " + std::to_string(WTERMSIG(status));
      } else {
        out += "gone";
      }
    }
    std::ifstream in(log_path_);
    std::vector<std::string> tail;
    for (std::string line; std::getline(in, line);) {
      tail.push_back(line);
      if (tail.size() > lines) tail.erase(tail.begin());
    }
    for (const auto& line : tail) out += "\n    " + line;
    return out;
  }

 private:
  int signal_and_wait(int sig) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    int status = 0;
    for (int i = 0; i < 500; ++i) {
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return -1;
  }
  pid_t pid_ = -1;
  std::string log_path_;
};

// A port for a process of a test cluster (common/local_port.h says how it is chosen).
inline uint16_t free_port() {
  auto port = unused_local_port();
  if (!port) FAIL("no free TCP port on 127.0.0.1 below the ephemeral range");
  return *port;
}

// What a LocalCluster runs besides its coordinator.
struct ClusterShape {
  int masters = 0;   // master-only servers
  int servers = 0;   // master and backup on each
  int backups = 0;   // backup-only servers
  int replicas = 0;  // per segment, on every master
  std::string durability = "buffered";
  std::string segment_bytes = {};  // --segment-bytes of every server, when not empty
  std::string memory = "64M";      // --memory of every server
  // Server index (as for server(n)) -> its backup data dir, instead of backup_dir's
  // default under dir(): e.g. a small filesystem that the test mounted. The test owns it
  // and must keep it until the cluster is gone.
  std::map<size_t, std::string> backup_dirs = {};
  // Failure detection (docs/recovery.md): --ping-interval-ms and --ping-timeout-ms of
  // every server, --verify-timeout-ms and --verify-attempts of the coordinator. Unset:
  // the kTest* values below, generous enough that a loaded 2-core machine never gets a
  // live server declared crashed.
  std::optional<uint32_t> ping_interval_ms = {};
  std::optional<uint32_t> ping_timeout_ms = {};
  std::optional<uint32_t> verify_timeout_ms = {};
  std::optional<uint32_t> verify_attempts = {};
  // More flags for every server (e.g. fault injection such as --recovery-pull-delay-ms).
  std::vector<std::string> server_args = {};
};
// The failure detection settings of a test cluster, unless its ClusterShape says.
constexpr uint32_t kTestPingIntervalMs = 100;
constexpr uint32_t kTestPingTimeoutMs = 1000;
constexpr uint32_t kTestVerifyTimeoutMs = 1000;
constexpr uint32_t kTestVerifyAttempts = 3;

class LocalCluster {
 public:
  // `masters` master-only servers without replication.
  explicit LocalCluster(int masters) : LocalCluster(ClusterShape{.masters = masters}) {}
  explicit LocalCluster(const ClusterShape& shape) : shape_(shape) {
    use_test_transport();
    // Under /var/tmp: backups write with O_DIRECT, which tmpfs may refuse.
    char tmpl[] = "/var/tmp/ramkv-cluster-test-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    dir_ = tmpl;
    coordinator_locator_ = "127.0.0.1:" + std::to_string(free_port());
    start_coordinator();
    for (int i = 0; i < shape.servers; ++i) add_server(true, true);
    for (int i = 0; i < shape.masters; ++i) add_server(true, false);
    for (int i = 0; i < shape.backups; ++i) add_server(false, true);
    wait_for_servers(shape.servers + shape.masters + shape.backups);
  }
  ~LocalCluster() {
    for (auto& s : servers_) s->stop();
    coordinator_.stop();
    std::error_code ec;
    if (std::getenv("RAMKV_KEEP_TEST_DIRS") == nullptr) std::filesystem::remove_all(dir_, ec);
  }

  const std::string& coordinator() const { return coordinator_locator_; }
  const std::string& dir() const { return dir_; }
  Process& server(size_t i) { return *servers_.at(i); }
  Process& coordinator_process() { return coordinator_; }

  void start_coordinator() {
    std::vector<std::string> argv = {
        std::string(RAMKV_BIN_DIR) + "/ramkv-coordinator",
        "--listen",
        coordinator_locator_,
        "--data-dir",
        dir_ + "/coordinator",
        "--verify-timeout-ms",
        std::to_string(shape_.verify_timeout_ms.value_or(kTestVerifyTimeoutMs)),
        "--verify-attempts",
        std::to_string(shape_.verify_attempts.value_or(kTestVerifyAttempts))};
    for (const auto& a : transport_args()) argv.push_back(a);
    coordinator_.start(argv, dir_ + "/coordinator.log");
    auto client = make_client_transport({});
    for (int i = 0; i < 300; ++i) {
      auto r = call(*client, coordinator_locator_,
                    {.opcode = wire::Opcode::kEcho, .timeout_ns = 200'000'000}, {});
      if (r.status == Status::kOk) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    FAIL("the coordinator did not answer within 6 s: " << coordinator_.describe());
  }

  void add_master() { add_server(true, false); }

  // Starts server number servers_.size() + 1; a backup keeps its replicas in
  // backup_dir(n). A server restarted with start_server(n) keeps its data dir.
  void add_server(bool master, bool backup) {
    servers_.push_back(std::make_unique<Process>());
    roles_.push_back({master, backup});
    start_server(servers_.size() - 1);
  }
  void start_server(size_t index) {
    auto [master, backup] = roles_.at(index);
    std::vector<std::string> argv = {std::string(RAMKV_BIN_DIR) + "/ramkv-server",
                                     "--coordinator",
                                     coordinator_locator_,
                                     "--listen",
                                     next_locator(index),
                                     "--memory",
                                     shape_.memory,
                                     "--replicas",
                                     std::to_string(shape_.replicas),
                                     master ? "--master" : "--no-master"};
    for (const auto& [flag, value] :
         {std::pair{"--ping-interval-ms", shape_.ping_interval_ms.value_or(kTestPingIntervalMs)},
          std::pair{"--ping-timeout-ms", shape_.ping_timeout_ms.value_or(kTestPingTimeoutMs)}}) {
      argv.push_back(flag);
      argv.push_back(std::to_string(value));
    }
    if (!shape_.segment_bytes.empty()) {
      argv.push_back("--segment-bytes");
      argv.push_back(shape_.segment_bytes);
    }
    for (const auto& a : shape_.server_args) argv.push_back(a);
    for (const auto& a : transport_args()) argv.push_back(a);
    if (test_transport() == "rdma") {
      argv.push_back("--rdma-recv-buffers");
      argv.push_back(std::to_string(kTestRdmaRecvBuffers));
    }
    if (backup) {
      for (const char* a : {"--backup", "--durability"}) argv.push_back(a);
      argv.push_back(shape_.durability);
      argv.push_back("--data-dir");
      argv.push_back(backup_dir(index));
    }
    servers_.at(index)->start(argv, dir_ + "/server-" + std::to_string(index + 1) + ".log");
  }
  // Where server `index` listens (since its last start).
  const std::string& locator_of(size_t index) const { return locators_.at(index); }
  std::string backup_dir(size_t index) const {
    if (auto it = shape_.backup_dirs.find(index); it != shape_.backup_dirs.end()) {
      return it->second;
    }
    return dir_ + "/backup-" + std::to_string(index + 1);
  }
  // The id backup `index` enlisted with last (kept in its data dir), 0 before it has.
  uint64_t backup_server_id(size_t index) const {
    std::ifstream in(backup_dir(index) + "/server-id");
    uint64_t id = 0;
    if (!(in >> id)) return 0;
    return id;
  }
  bool is_backup(size_t index) const { return roles_.at(index).second; }
  size_t server_count() const { return servers_.size(); }

  // Waits until `count` servers (masters only, with `masters_only`) are up at the
  // coordinator.
  void wait_for_servers(int count, bool masters_only = false) {
    ClientOptions o;
    o.coordinator = coordinator_locator_;
    o.timeout_ms = 2000;
    for (int i = 0; i < 300; ++i) {
      auto c = Client::connect(o);
      if (c.ok()) {
        auto list = (*c)->servers();
        if (list.ok()) {
          int up = 0;
          for (const auto& s : *list) {
            up += (s.master || !masters_only) && s.status == ServerStatus::kUp;
          }
          if (up >= count) return;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::string state;
    for (auto& s : servers_) state += "\n  " + s->describe();
    FAIL("servers did not enlist within a few seconds; logs in " << dir_ << state);
  }
  void wait_for_masters(int masters) { wait_for_servers(masters, true); }

  std::unique_ptr<Client> client(uint64_t timeout_ms = 5000) {
    ClientOptions o;
    o.coordinator = coordinator_locator_;
    o.timeout_ms = timeout_ms;
    o.rpc_timeout_ms = std::min<uint64_t>(timeout_ms, 1000);
    auto c = Client::connect(o);
    REQUIRE(c.ok());
    return std::move(c).value();
  }

 private:
  ClusterShape shape_;
  std::vector<std::pair<bool, bool>> roles_;  // master, backup per server
  std::string dir_;
  std::string coordinator_locator_;
  Process coordinator_;
  std::vector<std::unique_ptr<Process>> servers_;
  std::vector<std::string> locators_;  // per server, from its last start

  // A fresh port for server `index` at each start, remembered for locator_of().
  std::string next_locator(size_t index) {
    if (locators_.size() <= index) locators_.resize(index + 1);
    locators_[index] = "127.0.0.1:" + std::to_string(free_port());
    return locators_[index];
  }
};

// One stat of a server's `get server stats` text; -1 if it is missing.
inline int64_t server_stat(Client& client, const std::string& locator, const std::string& name) {
  auto stats = client.server_stats(locator);
  REQUIRE(stats.ok());
  auto at = stats->find(name + " ");
  if (at == std::string::npos) return -1;
  return std::stoll(stats->substr(at + name.size() + 1));
}

}  // namespace ramkv::test
