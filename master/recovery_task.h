// RecoveryTask: the recovery-master side of crash recovery (docs/recovery.md, step 5).
// The coordinator's `recover` names a partition of a crashed master's tablets and, for
// every segment of its log, the backups holding a usable replica, the segment's primary
// first (docs/recovery.md, "Primary and secondary replicas"). The task pulls each
// segment's share of the partition (`backup get recovery data`) from the first backup
// listed, several in flight, and replays it into this master's objects
// (ObjectManager::replay: the newest version wins, tombstones respected). A backup that
// fails or sends a damaged stream is replaced by the next one listed; `kRetry` (not read
// yet) is asked again shortly. When every segment is replayed, it ends the replay
// (ObjectManager::finish_replay), waits until what it appended is durable on this
// master's backups (ReplicaManager), and reports `recovery master finished` to the
// coordinator. If a segment cannot be had from any backup, it drops what it replayed for
// the partition and reports the failure, so the coordinator can try elsewhere.
//
// It runs on the server's dispatch thread as a LoopTask, with its own ClientTransport.
// Several partitions (of one or several recoveries) may run at once.
// Owner: server/main.cc. Threads: dispatch thread only.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/transport.h"
#include "common/wire_format.h"
#include "master/object_manager.h"
#include "master/tablet_set.h"

namespace ramkv::master {

class ReplicaManager;
class TabletDropper;

struct RecoveryTaskStats {
  uint64_t partitions_started = 0;
  uint64_t partitions_finished = 0;
  uint64_t partitions_failed = 0;
  uint64_t bytes_pulled = 0;
  uint64_t segments_local = 0;       // had from our own backup (set_local_backup)
  uint64_t segments_remote = 0;      // had from other servers' backups
  uint64_t bytes_pulled_remote = 0;  // of bytes_pulled: from other servers (over the network)
  uint64_t objects_replayed = 0;
};

class RecoveryTask final : public LoopTask {
 public:
  struct Options {
    std::string coordinator;
    uint32_t max_in_flight = 4;  // data requests in flight, over all partitions
    uint64_t rpc_timeout_ns = 10'000'000'000;
    uint64_t retry_ns = 20'000'000;  // after kRetry (a replica not read yet)
    // Fault injection for tests: wait this long before pulling each segment, so that a
    // test can act while a recovery is under way. 0 in production.
    uint64_t pull_delay_ns = 0;
  };

  // `replicas` may be null (no replication): replayed data is then durable at once.
  RecoveryTask(const Options& options, ObjectManager& objects, ReplicaManager* replicas,
               const Clock& clock = SystemClock::instance());
  ~RecoveryTask() override;
  RecoveryTask(const RecoveryTask&) = delete;
  RecoveryTask& operator=(const RecoveryTask&) = delete;

  void set_server_id(uint64_t id) { server_id_ = id; }
  // The backup of this same server (master and backup in one process), if any: segments
  // it holds for a partition come by this call instead of an RPC over loopback (with n
  // servers, about 1/n of a recovery's data). It answers like `backup get recovery data`
  // (the reply's status, and its fixed part and entries: the runs of entries where they
  // lie in the backup's memory, replayed from there without a copy; they must stay valid
  // until the next call). Dispatch thread, like the task.
  using LocalData =
      std::function<Status(const wire::GetRecoveryDataRequest&, wire::RecoveryDataResponse* head,
                           std::vector<std::span<const std::byte>>* pieces)>;
  void set_local_backup(LocalData get) { local_ = std::move(get); }
  // A range this master dropped and has not emptied yet is emptied before it is
  // recovered into (tablet_dropper.h).
  void set_dropper(TabletDropper* dropper) { dropper_ = dropper; }
  // The tablets this master owns (MasterService::tablets()): what a partition dropped here
  // covers of them is never removed. Only a partition the coordinator moved here can
  // overlap them, and its keys are this master's to serve whatever a report's answer said.
  void set_owned(const TabletSet* owned) { owned_ = owned; }
  // kRecover. kBadRequest for a malformed body or a partition already running here.
  Status start(std::span<const std::byte> body);
  const RecoveryTaskStats& stats() const { return stats_; }
  size_t running() const { return jobs_.size(); }

  // LoopTask
  int wait_fd() const override { return client_->wait_fd(); }
  uint64_t run() override;
  void on_wait_fd_ready() override { wait_fd_ready_ = true; }

 private:
  struct SegmentPull {
    std::vector<std::pair<uint64_t, std::string>> locations;  // backup id, locator
    size_t next = 0;                                          // the location to ask
    bool done = false;
    bool in_flight = false;
    uint64_t retry_at_ns = 0;
  };
  struct Job {
    wire::RecoverRequest request;
    std::vector<wire::TabletWire> tablets;
    std::map<uint64_t, SegmentPull> segments;
    uint64_t started_ns = 0;
    uint64_t started_cpu_ns = 0;  // thread_cpu_ns() then (for the log)
    uint64_t next_pull_ns = 0;    // Options::pull_delay_ns: no pull before
    uint64_t bytes = 0;
    ReplayStats replay;
    Status failed = Status::kOk;
    uint64_t missing_segment = 0;  // kIncomplete: the segment no backup could give
    bool replayed = false;         // finish_replay done; waiting for durability
    uint64_t replayed_ns = 0;      // when every segment was replayed (for the log)
    uint64_t first_data_ns = 0;    // when the first data arrived (for the log)
    uint64_t replay_ns = 0;        // time spent in ObjectManager::replay (for the log)
    uint64_t replay_cpu_ns = 0;    // and this thread's CPU time in it
    // Replica bytes this master had sent (ReplicationStats::bytes_sent) when the job
    // started and when replay ended: how much of the replication waits until after replay
    // (for the log).
    uint64_t replica_bytes_at_start = 0;
    uint64_t replica_bytes_at_replayed = 0;
    uint32_t retries = 0;          // kRetry answers: data asked for before it was ready
    uint32_t local_segments = 0;   // segments had from our own backup (set_local_backup)
    uint64_t durable_segment = 0;  // the log position that must be durable
    uint32_t durable_offset = 0;
    bool report_in_flight = false;
    uint64_t report_at_ns = 0;  // after a failed report: not before
    uint32_t report_attempts = 0;
    bool reported = false;
  };
  using Key = std::pair<uint64_t, uint32_t>;  // recovery id, partition id

  void pull(const Key& key, Job& job, uint64_t segment_id, SegmentPull& seg);
  // A reply's body (remote), checked, then on_entries().
  void on_data(const Key& key, uint64_t segment_id, Status status, std::span<const std::byte> body);
  // `head` and its entries (in pieces) for one segment, or the failure to get them.
  void on_entries(const Key& key, uint64_t segment_id, Status status,
                  const wire::RecoveryDataResponse& head,
                  std::span<const std::span<const std::byte>> pieces);
  void finish(Job& job);
  void report(const Key& key, Job& job);
  bool accepts(const Job& job, uint64_t table_id, uint64_t key_hash) const;
  bool is_local(const SegmentPull& seg) const;
  static std::vector<TabletRange> ranges(const Job& job);
  // Forgets what the job replayed (its tablets' objects here): the partition is not ours.
  void drop(Job& job);

  Options options_;
  ObjectManager& objects_;
  ReplicaManager* replicas_;
  TabletDropper* dropper_ = nullptr;
  const TabletSet* owned_ = nullptr;
  const Clock& clock_;
  std::unique_ptr<ClientTransport> client_;
  bool wait_fd_ready_ = false;  // on_wait_fd_ready(): run() polls even with nothing outstanding
  uint64_t server_id_ = 0;
  std::map<Key, Job> jobs_;
  uint32_t in_flight_ = 0;
  LocalData local_;
  std::vector<std::span<const std::byte>> local_pieces_;  // reused by local pulls
  bool pulled_locally_ = false;  // in this run(): one local pull per loop pass
  RecoveryTaskStats stats_;
};

}  // namespace ramkv::master
