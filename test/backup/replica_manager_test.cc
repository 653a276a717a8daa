// Tests for master/replica_manager.h against real backups in this process: each a
// BackupService behind a TCP transport on 127.0.0.1, on a thread of its own, with a hook
// that can answer a write in the backup's place (kRetry, as a backup whose buffers are
// all in use would). Here rather than in test/master because it needs the backup. The
// whole-cluster behaviour (processes killed, recovery) is in test/cluster.
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "backup/backup_service.h"
#include "common/certificate.h"
#include "common/clock.h"
#include "common/transport.h"
#include "master/log.h"
#include "master/master_config.h"
#include "master/replica_manager.h"
#include "test/temp_dir.h"

namespace ramkv {
namespace {

constexpr uint64_t kMasterId = 7;
constexpr uint32_t kSegmentBytes = 64u << 10;

// One backup server. `hook` sees every backup write first (on the backup's thread) and
// may answer it instead of the service.
class TestBackup {
 public:
  using Hook = std::function<std::optional<Status>(const wire::BackupWriteRequest&)>;

  explicit TestBackup(uint64_t id, std::string locator = "127.0.0.1:0") : id_(id) {
    backup::BackupService::Options o;
    o.data_dir = dir_.path;
    o.segment_bytes = kSegmentBytes;
    o.max_buffers = 16;
    auto service = backup::BackupService::create(o);
    REQUIRE(service.ok());
    service_ = std::move(service).value();
    transport_ = make_tcp_server_transport({});
    REQUIRE(transport_->listen(locator) == Status::kOk);
    locator_ = transport_->locator();
    service_->attach(*transport_);
    thread_ = std::thread([this] {
      transport_->run(
          [this](const wire::MessageHeader& h, std::span<const std::byte> body, Reply& reply) {
            if (h.opcode == static_cast<uint16_t>(wire::Opcode::kBackupWrite) &&
                body.size() >= sizeof(wire::BackupWriteRequest)) {
              wire::BackupWriteRequest req;
              std::memcpy(&req, body.data(), sizeof(req));
              std::optional<Status> answer;
              {
                std::lock_guard lock(mu_);
                if (hook_) answer = hook_(req);
              }
              if (answer) {
                ++refused_;
                reply.set_status(*answer);
                return;
              }
            }
            if (h.opcode == static_cast<uint16_t>(wire::Opcode::kBackupFree)) ++frees_;
            service_->handle(h, body, reply);
          });
    });
  }
  ~TestBackup() { stop(); }

  // Stops serving and closes every connection, as a backup that died would.
  void stop() {
    if (!thread_.joinable()) return;
    transport_->stop();
    thread_.join();
    transport_.reset();
  }
  void set_hook(Hook hook) {
    std::lock_guard lock(mu_);
    hook_ = std::move(hook);
  }
  // The replicas held, once stopped (the service is the dispatch thread's).
  std::vector<wire::ReplicaEntry> replicas() {
    REQUIRE(!thread_.joinable());
    return service_->list();
  }
  wire::ServerListItem item() const {
    return {.server_id = id_, .services = wire::kServiceBackup, .status = 0, .locator = locator_};
  }
  uint64_t refused() const { return refused_; }
  uint64_t frees() const { return frees_; }

 private:
  uint64_t id_;
  std::string locator_;
  test::TempDir dir_{"/var/tmp"};  // O_DIRECT: not tmpfs
  std::unique_ptr<backup::BackupService> service_;
  std::unique_ptr<ServerTransport> transport_;
  std::thread thread_;
  std::mutex mu_;
  Hook hook_;
  std::atomic<uint64_t> refused_{0};
  std::atomic<uint64_t> frees_{0};
};

// Stands in for the coordinator: records the replication epochs a master raises (rule 4
// of master/replica_manager.h: a head whose replica was lost is durable again only once
// its new epoch is recorded).
class TestCoordinator {
 public:
  TestCoordinator() {
    transport_ = make_tcp_server_transport({});
    REQUIRE(transport_->listen("127.0.0.1:0") == Status::kOk);
    thread_ = std::thread([this] {
      transport_->run(
          [this](const wire::MessageHeader& h, std::span<const std::byte>, Reply& reply) {
            if (h.opcode == static_cast<uint16_t>(wire::Opcode::kSetReplicationEpoch)) {
              ++epochs_;
              reply.set_status(Status::kOk);
            } else {
              reply.set_status(Status::kBadRequest);
            }
          });
    });
  }
  ~TestCoordinator() {
    transport_->stop();
    thread_.join();
  }
  std::string locator() const { return transport_->locator(); }
  uint64_t epochs() const { return epochs_; }

 private:
  std::unique_ptr<ServerTransport> transport_;
  std::thread thread_;
  std::atomic<uint64_t> epochs_{0};
};

// The master's transport: the manager only sends held replies through it (none here).
class NoReplies final : public ServerTransport {
 public:
  Status listen(const std::string&) override { return Status::kOk; }
  std::string locator() const override { return "none:0"; }
  void run(const Handler&) override {}
  void add_loop_task(LoopTask*) override {}
  bool send_deferred(const ReplyToken&, const Reply&) override { return true; }
  void stop() override {}
};

struct Master {
  explicit Master(master::ReplicaManager::Options options) {
    config.memory_bytes = 4u << 20;
    config.segment_bytes = kSegmentBytes;
    config.seglet_bytes = 4u << 10;
    config.max_key_bytes = 1024;
    config.max_value_bytes = 8192;
    config.cleaner_thread = false;
    config.prefault_memory = false;
    REQUIRE(config.finalize() == Status::kOk);
    auto created = master::Log::create(config, clock, nullptr);
    REQUIRE(created.ok());
    log = std::move(created).value();
    REQUIRE(log->set_master_id(kMasterId) == Status::kOk);
    options.seed = 1;
    options.coordinator = coordinator.locator();
    replicas = std::make_unique<master::ReplicaManager>(options, *log, transport);
    replicas->set_server_id(kMasterId);
  }

  // Appends `n` entries of about 1 KiB.
  void append(int n) {
    std::vector<std::byte> payload(1000, std::byte{0x5a});
    const std::span<const std::byte> pieces[] = {payload};
    for (int i = 0; i < n; ++i) {
      payload[0] = static_cast<std::byte>(++appended);
      REQUIRE(log->append(EntryType::kObject, pieces, /*live=*/true).ok());
    }
  }

  // Runs the manager as a dispatch loop would, until `done` or `seconds` have passed.
  bool pump(double seconds, const std::function<bool()>& done) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < end) {
      ++passes;
      const uint64_t wake = replicas->run();
      if (done()) return true;
      pollfd p{.fd = replicas->wait_fd(), .events = POLLIN, .revents = 0};
      if (::poll(&p, 1, static_cast<int>(std::min<uint64_t>(wake / 1'000'000, 5))) > 0) {
        ++wakes;
        replicas->on_wait_fd_ready();  // as the server's loop does
      }
    }
    return done();
  }
  bool durable() const {
    auto [segment, offset] = replicas->log_position();
    return replicas->durable_through(segment, offset);
  }

  TestCoordinator coordinator;
  master::MasterConfig config;
  SystemClock clock;
  std::unique_ptr<master::Log> log;
  NoReplies transport;
  std::unique_ptr<master::ReplicaManager> replicas;
  int appended = 0;
  uint64_t wakes = 0;   // pump() found the manager's descriptor readable
  uint64_t passes = 0;  // runs of the manager by pump()
};

// Every segment of the master's log, by id, with the bytes its certificate covers.
std::map<uint64_t, uint32_t> log_segments(const master::Log& log) {
  uint64_t head = 0;
  std::map<uint64_t, uint32_t> out;
  for (const auto& v : log.replication_view(&head)) {
    uint32_t length = 0;
    Certificate certificate;
    bool closed = false;
    REQUIRE(log.replication_state(v.id, &length, &certificate, &closed));
    out[v.id] = certificate.segment_bytes;
  }
  return out;
}

// What a backup holds of the master: segment -> bytes its certificate covers.
std::map<uint64_t, uint32_t> held(TestBackup& b) {
  std::map<uint64_t, uint32_t> out;
  for (const auto& r : b.replicas()) {
    if (r.master_id == kMasterId) out[r.segment_id] = r.certificate_bytes;
  }
  return out;
}

TEST_CASE("replica manager: a backup's kRetry is not a lost replica: the writes go again",
          "[replica_manager]") {
  TestBackup a(101), b(102);
  master::ReplicaManager::Options o;
  o.replicas = 2;
  o.retry_backoff_ns = 1'000'000;
  Master m(o);
  // Backup a refuses the first open of each segment (its buffers all in use) and, once,
  // a write in the middle of a segment: the writes sent behind that one meet a gap.
  std::set<uint64_t> opened;
  int appends_seen = 0;
  a.set_hook([&](const wire::BackupWriteRequest& req) -> std::optional<Status> {
    if (req.open == 1 && opened.insert(req.segment_id).second) return Status::kRetry;
    if (req.open == 0 && req.offset > 0 && ++appends_seen == 3) return Status::kRetry;
    return std::nullopt;
  });
  m.replicas->update_servers({a.item(), b.item()});
  // Small batches, each sent while the ones before are in flight.
  for (int batch = 0; batch < 40; ++batch) {
    m.append(5);
    m.replicas->run();
  }
  REQUIRE(m.pump(20, [&] { return m.durable(); }));
  const auto stats = m.replicas->stats();
  CHECK(stats.replicas_lost == 0);
  CHECK(stats.retries >= 2);
  CHECK(a.refused() >= 2);
  // Idle, with a backup gone: its connection's hangup is taken in once, and the loop
  // sleeps (left in, it kept every server's loop spinning until the backup was declared).
  REQUIRE(m.pump(20, [&] { return m.replicas->writes_in_flight() == 0; }));
  b.stop();
  const uint64_t wakes = m.wakes;
  m.pump(0.3, [] { return false; });
  CHECK(m.wakes - wakes < 50);
  a.stop();
  // Both backups hold every segment, each wholly (the head as far as it goes).
  const auto segments = log_segments(*m.log);
  REQUIRE(segments.size() >= 3);
  CHECK(held(a) == segments);
  CHECK(held(b) == segments);
}

TEST_CASE("replica manager: a backup that keeps refusing loses the replica, made elsewhere",
          "[replica_manager]") {
  TestBackup a(101), b(102), c(103);
  master::ReplicaManager::Options o;
  o.replicas = 2;
  o.max_retries = 3;
  o.retry_backoff_ns = 1'000'000;
  o.backup_backoff_ns = 10'000'000;
  Master m(o);
  a.set_hook([](const wire::BackupWriteRequest&) { return Status::kRetry; });
  m.replicas->update_servers({a.item(), b.item()});
  m.append(100);
  // Only a and b: the segments cannot be on two backups.
  CHECK_FALSE(m.pump(0.5, [&] { return m.durable(); }));
  const uint64_t refused = a.refused();
  CHECK(refused > 3);
  CHECK(m.replicas->stats().replicas_lost >= 1);
  // Refused over and over, but not in a tight loop: each loss rests the backup, longer
  // each time (10 ms doubling up to 2 s here; a tight loop makes thousands of tries).
  CHECK(refused < 200);
  m.replicas->update_servers({a.item(), b.item(), c.item()});
  REQUIRE(m.pump(20, [&] { return m.durable(); }));
  CHECK(m.coordinator.epochs() >= 1);  // the head's epoch went up with its lost replica
  // Each lost replica was freed on a, resting or not (a backup that is up, only refusing,
  // would otherwise keep its buffer).
  const uint64_t lost = m.replicas->stats().replicas_lost;
  m.pump(0.3, [&] { return a.frees() >= lost; });
  CHECK(a.frees() >= lost);
  a.stop();
  b.stop();
  c.stop();
  const auto segments = log_segments(*m.log);
  CHECK(held(a).empty());
  CHECK(held(b) == segments);
  CHECK(held(c) == segments);
}

TEST_CASE("replica manager: settled segments leave the passes until a backup comes or goes",
          "[replica_manager]") {
  TestBackup a(101), b(102), c(103);
  master::ReplicaManager::Options o;
  o.replicas = 2;
  Master m(o);
  // One backup: every segment on it alone (rule 7).
  m.replicas->update_servers({a.item()});
  for (int batch = 0; batch < 20; ++batch) {
    m.append(60);
    m.replicas->run();
  }
  REQUIRE(m.pump(20, [&] { return m.durable() && m.replicas->writes_in_flight() == 0; }));
  m.pump(0.05, [] { return false; });  // the last closes' answers taken in
  const size_t in_log = log_segments(*m.log).size();
  REQUIRE(in_log >= 15);
  // Whole, closed, marked segments are settled: a pass looks at the head and the segment
  // before it at most.
  CHECK(m.replicas->active_segments() <= 2);
  // A second backup: a segment now needs two replicas, and every settled one gets its
  // second.
  m.replicas->update_servers({a.item(), b.item()});
  CHECK(m.replicas->active_segments() >= in_log);
  REQUIRE(m.pump(20, [&] {
    return m.durable() && m.replicas->writes_in_flight() == 0 && m.replicas->active_segments() <= 2;
  }));
  // Backup a leaves: its replicas are lost and made again on c.
  m.replicas->update_servers({b.item(), c.item()});
  CHECK(m.replicas->active_segments() >= in_log);
  REQUIRE(m.pump(20, [&] {
    return m.durable() && m.replicas->writes_in_flight() == 0 && m.replicas->active_segments() <= 2;
  }));
  m.append(10);  // settled segments do not keep appends from going out
  REQUIRE(m.pump(20, [&] { return m.durable(); }));
  a.stop();
  b.stop();
  c.stop();
  const auto segments = log_segments(*m.log);
  CHECK(held(b) == segments);
  CHECK(held(c) == segments);
}

// A port nothing listens on (yet).
std::string free_locator() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  socklen_t len = sizeof(addr);
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  ::close(fd);
  return "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
}

TEST_CASE("replica manager: a dead backup is tried again after a backoff, not in a loop",
          "[replica_manager]") {
  TestBackup a(101);
  const std::string dead = free_locator();
  master::ReplicaManager::Options o;
  o.replicas = 2;
  o.backup_backoff_ns = 20'000'000;
  o.max_backup_backoff_ns = 80'000'000;
  Master m(o);
  m.replicas->update_servers(
      {a.item(),
       {.server_id = 102, .services = wire::kServiceBackup, .status = 0, .locator = dead}});
  m.append(20);
  // The second backup refuses connections (as one that died and is not declared yet).
  CHECK_FALSE(m.pump(1.0, [&] { return m.durable(); }));
  const uint64_t lost = m.replicas->stats().replicas_lost;
  CHECK(lost >= 2);
  // Backoffs of 20, 40, 80, 80... ms: about 15 tries in a second. Without them, a try
  // per pass of the loop: thousands.
  CHECK(lost < 100);
  // It comes back on the same address: the next try after its backoff succeeds.
  TestBackup back(102, dead);
  REQUIRE(m.pump(20, [&] { return m.durable(); }));
  a.stop();
  back.stop();
  const auto segments = log_segments(*m.log);
  CHECK(held(a) == segments);
  CHECK(held(back) == segments);
}

TEST_CASE("replica manager: a fenced master sleeps, whatever backoff was pending",
          "[replica_manager]") {
  // Backup a says the coordinator declared this master crashed; the other one is dead,
  // and rests: its backoff must not leave the fenced manager's loop spinning.
  TestBackup a(101);
  a.set_hook([](const wire::BackupWriteRequest&) { return Status::kFenced; });
  master::ReplicaManager::Options o;
  o.replicas = 2;
  o.backup_backoff_ns = 20'000'000;
  Master m(o);
  m.replicas->update_servers({a.item(),
                              {.server_id = 102,
                               .services = wire::kServiceBackup,
                               .status = 0,
                               .locator = free_locator()}});
  m.append(5);
  REQUIRE(m.pump(5, [&] { return m.replicas->fenced(); }));
  const uint64_t passes = m.passes;
  m.pump(0.5, [] { return false; });
  // A pass per wake (5 ms at most in pump(), or the manager's own wake); a loop told to
  // come back at once makes tens of thousands.
  CHECK(m.passes - passes < 300);
}

}  // namespace
}  // namespace ramkv
