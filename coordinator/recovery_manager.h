// RecoveryManager: runs the recoveries of crashed masters at the coordinator
// (docs/recovery.md, "Master recovery"). A master needs recovery when it owns tablets and
// is not up: declared crashed, or replaced by a restarted process. That is derived from
// the persisted state alone, so a restarted coordinator carries on: check() starts a
// recovery for every such master (the tablets already moved to recovery masters are not
// recovered again).
//
// One recovery goes through:
//   kReading       `backup start reading data` to every backup that is up; answers are
//                  collected (a backup that fails is left out).
//   (plan)         coordinator/recovery_plan.h: proves the log complete and partitions
//                  the tablets; an incomplete log fails the recovery (retried later, as a
//                  backup holding the missing replica may come back).
//   kReplaying     `backup start partitioning` to every backup that holds a replica
//                  (the map, and the segments it is primary for), and at once, without
//                  waiting for those answers, `recover` to one recovery master per
//                  partition; each reports with `recovery master finished`. Success moves
//                  the partition's tablets to it (RecoveryHost::move_tablets); failure, or
//                  the master going down, gives the partition to another master.
//                  Successes are moved together: the reports that came in one batch of
//                  the loop's events are answered (deferred) after one commit for all of
//                  them, from run(). A commit waits for the disk, which during a recovery
//                  is busy with the backups' writes (hundreds of milliseconds here); one
//                  per report kept partitions that were done waiting for the ones before.
//   kDone          every partition moved: the crashed master is removed
//                  (RecoveryHost::finish_master).
//
// It runs on the coordinator's dispatch thread as a LoopTask, with its own
// ClientTransport for the RPCs above (never blocking the loop).
// Owner: the CoordinatorService. Threads: dispatch thread only.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/transport.h"
#include "coordinator/coordinator_state.h"
#include "coordinator/recovery_plan.h"

namespace ramkv::coordinator {

// What the recovery manager needs from the coordinator service.
class RecoveryHost {
 public:
  virtual ~RecoveryHost() = default;
  virtual const CoordinatorState& state() const = 0;
  // Gives each of `tablets` (a range of one of `from`'s tablets; server_id = the new
  // owner) to its new owner, for every `from` in `moves`: persisted in one commit, take
  // tablets sent. kIoError if not persisted (then nothing moved).
  struct Move {
    uint64_t from = 0;
    std::vector<Tablet> tablets;
  };
  virtual Status move_tablets(const std::vector<Move>& moves) = 0;
  // Answers a request whose reply was deferred (a report waiting for its commit).
  virtual void answer(const ReplyToken& token, Status status) = 0;
  // `master_id` has nothing left to recover: mark it removed, tell the servers (backups
  // free its replicas).
  virtual Status finish_master(uint64_t master_id) = 0;
};

struct RecoveryOptions {
  uint64_t partition_bytes = 512ull << 20;
  uint64_t min_partition_bytes = 8ull << 20;
  uint64_t rpc_timeout_ns = 5'000'000'000;
  uint64_t retry_delay_ns = 2'000'000'000;  // before a failed recovery starts again
  uint32_t max_partition_attempts = 8;      // masters tried per partition per recovery
};

class RecoveryManager final : public LoopTask {
 public:
  RecoveryManager(const RecoveryOptions& options, RecoveryHost& host, const Clock& clock);
  ~RecoveryManager() override;
  RecoveryManager(const RecoveryManager&) = delete;
  RecoveryManager& operator=(const RecoveryManager&) = delete;

  // Starts a recovery for every master that needs one and has none running; notices
  // recovery masters that went down. Call after every change to the server list.
  void check();
  // kRecoveryMasterFinished. kBadRequest for a malformed body; an unknown recovery or a
  // partition given to someone else since is answered kOk and ignored. A success defers
  // `reply`: run() answers it once the partition's move is committed.
  Status master_finished(std::span<const std::byte> body, Reply& reply);
  // kGetRecoveries response body.
  void encode(std::vector<std::byte>* body) const;
  size_t running() const;

  // LoopTask
  int wait_fd() const override { return client_->wait_fd(); }
  uint64_t run() override;
  void on_wait_fd_ready() override { wait_fd_ready_ = true; }

 private:
  enum class Phase : uint8_t { kReading, kReplaying, kDone, kFailed };
  struct Partition {
    PlannedPartition plan;
    uint64_t master_id = 0;  // recovery master; 0 while unassigned
    uint64_t serial = 0;     // which `recover` RPC an answer belongs to
    bool done = false;
    uint32_t attempts = 0;
    std::set<uint64_t> failed_masters;
    uint64_t bytes = 0;
    uint64_t replay_ns = 0;
  };
  struct Recovery {
    uint64_t id = 0;
    uint64_t master_id = 0;
    Phase phase = Phase::kReading;
    uint64_t declared_unix_ns = 0;
    uint64_t finished_unix_ns = 0;
    uint64_t retry_at_ns = 0;  // kFailed: when to start again
    std::string error;
    uint32_t pending = 0;  // RPCs of the current phase not yet answered
    std::vector<BackupAnswer> answers;
    RecoveryPlan plan;
    std::vector<Partition> partitions;
  };

  void start(uint64_t master_id);
  void send_start_reading(Recovery& r);
  void on_answers(Recovery& r);
  void send_partitioning(Recovery& r);
  void assign(Recovery& r, Partition& p);
  void send_recover(Recovery& r, Partition& p);
  void partition_failed(Recovery& r, Partition& p, Status why);
  void fail(Recovery& r, std::string error);
  void maybe_finish(Recovery& r);
  // Moves the partitions of the successful reports waiting in finished_, in one commit.
  void commit_finished();
  Recovery* find(uint64_t recovery_id);
  uint64_t unix_ns() const;

  RecoveryOptions options_;
  RecoveryHost& host_;
  const Clock& clock_;
  std::unique_ptr<ClientTransport> client_;
  bool wait_fd_ready_ = false;  // on_wait_fd_ready(): run() polls even with nothing outstanding
  std::deque<Recovery> recoveries_;  // running first-come; finished ones kept for reports
  uint64_t next_recovery_id_;
  uint64_t next_serial_ = 0;
  bool dirty_ = false;
  struct Finished {
    uint64_t recovery_id = 0;
    uint32_t partition_id = 0;
    uint64_t master_id = 0;
    uint64_t objects = 0;
    uint64_t bytes = 0;
    uint64_t replay_ns = 0;
    ReplyToken token;
  };
  std::vector<Finished> finished_;  // successful reports waiting for commit_finished()
};

}  // namespace ramkv::coordinator
