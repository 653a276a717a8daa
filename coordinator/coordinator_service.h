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
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/transport.h"
#include "coordinator/coordinator_state.h"
#include "coordinator/external_store.h"
#include "coordinator/master_notifier.h"

namespace ramkv::coordinator {

struct CoordinatorOptions {
  std::string listen_locator = "127.0.0.1:12246";
  bool busy_poll = false;
  // Per order sent to a master (take/drop tablets); create/drop table wait this long.
  uint64_t master_rpc_timeout_ns = 2'000'000'000;
};

class CoordinatorService {
 public:
  static constexpr size_t kMaxTableNameBytes = 1024;
  static constexpr size_t kMaxLocatorBytes = 1024;

  // Loads the state from `store` (none: an empty cluster), listens, and queues take
  // tablets to the masters that own tablets. kCorrupt / kFormatError if the stored state
  // is bad, kIoError if the store or the socket fails.
  static Result<std::unique_ptr<CoordinatorService>> create(const CoordinatorOptions& options,
                                                            std::unique_ptr<ExternalStore> store);
  ~CoordinatorService();
  CoordinatorService(const CoordinatorService&) = delete;
  CoordinatorService& operator=(const CoordinatorService&) = delete;

  // The bound "host:port" (the real port when asked for port 0).
  std::string locator() const { return transport_->locator(); }
  // Serves until stop().
  void run();
  // Async-signal-safe.
  void stop() { transport_->stop(); }

  const CoordinatorState& state() const { return state_; }
  MasterNotifier& notifier() { return *notifier_; }

 private:
  CoordinatorService(const CoordinatorOptions& options, std::unique_ptr<ExternalStore> store);

  void handle(const wire::MessageHeader& request, std::span<const std::byte> body, Reply& reply);
  Status enlist_server(wire::BodyReader& in, Reply& reply);
  Status get_server_list(wire::BodyReader& in, Reply& reply);
  Status create_table(wire::BodyReader& in, Reply& reply);
  Status drop_table(wire::BodyReader& in, Reply& reply);
  Status get_table_id(wire::BodyReader& in, Reply& reply);
  Status get_tablet_map(wire::BodyReader& in, Reply& reply);
  Status set_replication_epoch(wire::BodyReader& in, Reply& reply);
  Status get_replication_epochs(wire::BodyReader& in, Reply& reply);

  // Persists `next` and makes it current; kIoError (state unchanged) if it cannot.
  Status commit(CoordinatorState next);
  // Sends `opcode` with each owner's share of `tablets`; waits for the answers if `wait`.
  void send_tablets(wire::Opcode opcode, const std::vector<Tablet>& tablets, bool wait);
  // Tells every server that is up the whole server list (not waited for).
  void broadcast_server_list();
  void encode_server_list(std::vector<std::byte>* body) const;

  CoordinatorOptions options_;
  std::unique_ptr<ExternalStore> store_;
  CoordinatorState state_;
  // Declared before transport_ so that it is destroyed after: nothing the loop queued
  // outlives the notifier's thread.
  std::unique_ptr<MasterNotifier> notifier_;
  std::unique_ptr<ServerTransport> transport_;
};

// "index.generation", as servers are named in logs.
std::string server_id_string(uint64_t id);

}  // namespace ramkv::coordinator
