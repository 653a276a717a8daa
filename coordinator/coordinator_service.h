// CoordinatorService: the coordinator's RPC server (docs/rpc.md, Coordinator). Owns the
// cluster state (CoordinatorState: servers, tables, tablets, replication epochs), its
// ExternalStore, the ServerTransport it serves on and the MasterNotifier that carries
// take/drop tablets orders to masters.
//
// Every change follows one path: copy the state, change the copy, persist the copy, make
// it current, reply, then tell the masters concerned. A change that cannot be persisted
// is answered kIoError and leaves the current state as it was.
//
// Owner: main() (or a test). Threads: create() and run() on one thread, which becomes
// the dispatch thread; handlers run to completion on it. stop() from any thread or a
// signal handler. state() only on the dispatch thread, or after run() returned.
// Invariants:
//   1. state_ always equals what the store holds (or would return after a restart).
//   2. On start, every master that owns tablets is sent take tablets again (idempotent),
//      so masters that missed an order catch up.
//   3. A malformed body is answered kBadRequest and changes nothing.
//   4. A replication epoch is accepted only from a master that is up; one that was
//      replaced or declared crashed gets kFenced (a zombie: it must stop serving).
//   5. A server is declared crashed only by declare_crashed(), which the FailureVerifier
//      calls once its own pings all failed (docs/recovery.md, "Failure detection"); a
//      hint alone never changes the state.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/transport.h"
#include "coordinator/coordinator_state.h"
#include "coordinator/external_store.h"
#include "coordinator/failure_verifier.h"
#include "coordinator/master_notifier.h"
#include "coordinator/recovery_manager.h"

namespace ramkv::coordinator {

struct CoordinatorOptions {
  std::string listen_locator = "127.0.0.1:12246";
  bool busy_poll = false;
  // Per order sent to a master (take/drop tablets); create/drop table wait this long.
  uint64_t master_rpc_timeout_ns = 2'000'000'000;
  // Verifying a server hinted to have crashed: this many pings (>= 1), each with this
  // timeout and sent at least this far apart; all must fail to declare it crashed.
  uint64_t verify_timeout_ns = 500'000'000;
  uint32_t verify_attempts = 3;
  // Crash recovery (docs/recovery.md): partition size, and the pause before a recovery
  // that could not go on (an incomplete log) is tried again.
  uint64_t recovery_partition_bytes = 512ull << 20;
  uint64_t recovery_retry_ns = 2'000'000'000;
};

class CoordinatorService final : private RecoveryHost {
 public:
  static constexpr size_t kMaxTableNameBytes = 1024;
  static constexpr size_t kMaxLocatorBytes = 1024;

  // Loads the state from `store` (none: an empty cluster), listens, and queues take
  // tablets to the masters that own tablets. kCorrupt / kFormatError if the stored state
  // is bad, kIoError if the store or the socket fails. It serves on `transport` (not yet
  // listening), or on TCP when that is null.
  static Result<std::unique_ptr<CoordinatorService>> create(
      const CoordinatorOptions& options, std::unique_ptr<ExternalStore> store,
      std::unique_ptr<ServerTransport> transport = nullptr);
  ~CoordinatorService();
  CoordinatorService(const CoordinatorService&) = delete;
  CoordinatorService& operator=(const CoordinatorService&) = delete;

  // The bound "host:port" (the real port when asked for port 0).
  std::string locator() const { return transport_->locator(); }
  // Serves until stop().
  void run();
  // Async-signal-safe.
  void stop() { transport_->stop(); }

  const CoordinatorState& state() const override { return state_; }
  MasterNotifier& notifier() { return *notifier_; }

  // Declares the server with exactly this id crashed: status crashed, persisted, and the
  // server list sent to every server that is up and to the crashed one itself (so that
  // a live but cut-off server learns to stop). kOk and nothing done if it is not listed
  // with this id or not up; kIoError (still up) if the state cannot be persisted.
  // Dispatch thread only (the FailureVerifier calls it), or before run().
  Status declare_crashed(uint64_t id);

 private:
  CoordinatorService(const CoordinatorOptions& options, std::unique_ptr<ExternalStore> store,
                     std::unique_ptr<ServerTransport> transport);

  void handle(const wire::MessageHeader& request, std::span<const std::byte> body, Reply& reply);
  Status enlist_server(wire::BodyReader& in, Reply& reply);
  Status get_server_list(wire::BodyReader& in, Reply& reply);
  Status create_table(wire::BodyReader& in, Reply& reply);
  Status drop_table(wire::BodyReader& in, Reply& reply);
  Status get_table_id(wire::BodyReader& in, Reply& reply);
  Status get_tablet_map(wire::BodyReader& in, Reply& reply);
  Status set_replication_epoch(wire::BodyReader& in, Reply& reply);
  Status get_replication_epochs(wire::BodyReader& in, Reply& reply);
  Status report_backup_replicas(wire::BodyReader& in, Reply& reply);
  Status get_backup_replicas(wire::BodyReader& in, Reply& reply);
  // kHintServerCrashed: starts the FailureVerifier on a server that is up.
  Status hint_server_crashed(wire::BodyReader& in, Reply& reply);
  Status get_recoveries(wire::BodyReader& in, Reply& reply);

  // RecoveryHost
  Status move_tablets(const std::vector<Move>& moves) override;
  void answer(const ReplyToken& token, Status status) override;
  Status finish_master(uint64_t master_id) override;

  // Persists `next` and makes it current; kIoError (state unchanged) if it cannot.
  Status commit(CoordinatorState next);
  // Sends `opcode` with each owner's share of `tablets`; waits for the answers if `wait`.
  void send_tablets(wire::Opcode opcode, const std::vector<Tablet>& tablets, bool wait);
  // Tells every server that is up, and `also_to` (0: none) whatever its status, the
  // whole server list (not waited for).
  void broadcast_server_list(uint64_t also_to = 0);
  void encode_server_list(std::vector<std::byte>* body) const;

  CoordinatorOptions options_;
  std::unique_ptr<ExternalStore> store_;
  CoordinatorState state_;
  // What each restarted backup reported finding on its disk (kReportBackupReplicas): a
  // hint for operators and recovery, not persisted (recovery asks the backups itself).
  std::map<uint64_t, std::vector<wire::ReplicaEntry>> backup_reports_;
  // Declared before transport_ so that it is destroyed after: nothing the loop queued
  // outlives the notifier's thread.
  std::unique_ptr<MasterNotifier> notifier_;
  // A task of transport_'s loop: declared before it, so it outlives the loop.
  std::unique_ptr<FailureVerifier> verifier_;
  std::unique_ptr<RecoveryManager> recovery_;
  std::unique_ptr<ServerTransport> transport_;
};

// "index.generation", as servers are named in logs.
std::string server_id_string(uint64_t id);

}  // namespace ramkv::coordinator
