// Client::Impl: the engine behind ramkv::Client. It owns the transport, the cached tablet
// map and every operation in flight, and implements the retry contract of docs/rpc.md:
// on kUnknownTablet, kUnavailable, kTimeout or kRetry it marks the table's map stale,
// backs off, refreshes the table from the coordinator and resends, until the operation's
// deadline; every other status is final.
//
// Owner: one Client. Thread: the Client's caller only; completions run from poll().
//
// Invariants:
//   1. An Op completes exactly once (finish() moves its callback out before calling it).
//   2. At most one tablet-map refresh per table is in flight; ops that need it wait in
//      the table's waiter list and are re-dispatched when it ends.
//   3. An Op keeps its rpc_seq across resends (at-most-once on the server side).
//   4. Every waiting op has a timer or an RPC in flight, so poll() always moves it on.
//   5. open_seqs_ holds the rpc_seq of every op made and not finished; every request
//      acknowledges (ack_seq) the sequences below the smallest of them: the client has
//      their replies, or gave up on them, and will never resend them (docs/rpc.md,
//      "Exactly once").
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "client/backoff.h"
#include "client/tablet_map.h"
#include "common/transport.h"
#include "ramkv/client.h"

namespace ramkv::client {

// Where an Op goes.
enum class Target : uint8_t {
  kCoordinator,
  kLocator,  // a fixed server (stats)
  kRouted,   // the master owning (table_id, key_hash)
};

// True for the statuses the client handles by refreshing and resending.
constexpr bool should_resend(Status s) {
  return s == Status::kUnknownTablet || s == Status::kUnavailable || s == Status::kTimeout ||
         s == Status::kRetry;
}

struct Op {
  using Done = std::function<void(Status, std::span<const std::byte> body, const Tablet* tablet)>;

  wire::Opcode opcode = wire::Opcode::kEcho;
  Target target = Target::kCoordinator;
  uint64_t table_id = 0;  // kRouted
  uint64_t key_hash = 0;  // kRouted
  std::string locator;    // kLocator
  std::vector<std::byte> body;
  // kRouted ops whose body depends on the tablet (enumerate) rebuild it before each send;
  // `attempt` counts sends, from 1.
  std::function<void(const Tablet&, uint32_t attempt, std::vector<std::byte>*)> make_body;
  Done done;
  bool resend = true;  // false: a transient status is final (the caller retries)
  bool user = false;   // counted in outstanding()
  uint64_t deadline_ns = 0;
  uint64_t rpc_seq = 0;
  uint32_t attempts = 0;
  uint64_t map_epoch = 0;  // the table's map epoch when it was routed
  Tablet tablet;           // the tablet of the last send (kRouted)
  Status last_transient = Status::kTimeout;
  // An attempt went unanswered (timed out, or its connection failed after the send): the
  // server may have applied it. An operation that is not idempotent reads its final
  // status in that light (drop_table: kUnknownTable after such an attempt is its own
  // drop, applied).
  bool maybe_applied = false;
  Backoff backoff;
};
using OpPtr = std::shared_ptr<Op>;

}  // namespace ramkv::client

namespace ramkv {

class Client::Impl {
 public:
  static Result<std::unique_ptr<Impl>> create(const ClientOptions& options);
  ~Impl();

  // A new Op with a fresh rpc_seq and the default deadline.
  client::OpPtr make_op(wire::Opcode opcode, client::Target target);
  void start(client::OpPtr op);
  // Runs `then(status)` once the table's map is fresh (kOk) or the refresh failed.
  void refresh_table(uint64_t table_id, std::function<void(Status)> then);
  void mark_stale(uint64_t table_id);
  bool table_stale(uint64_t table_id) const;
  // Calls `fn` after `delay_ns`, from poll().
  void schedule(uint64_t delay_ns, std::function<void()> fn);
  // Makes a whole-map fetch now (connect): kOk or the final status.
  Status load_map();

  int poll(uint64_t timeout_ns);
  void begin_user_op() { ++user_ops_; }
  void end_user_op() {
    --user_ops_;
    ++completed_;
  }
  size_t outstanding() const { return user_ops_; }
  uint64_t now_ns() const;
  // now_ns() + ms, saturating at UINT64_MAX.
  uint64_t deadline_after_ms(uint64_t ms) const;
  uint64_t next_rpc_seq() { return ++rpc_seq_; }
  // Every sequence up to this one is finished (invariant 5).
  uint64_t ack_seq() const { return open_seqs_.empty() ? rpc_seq_ : *open_seqs_.begin() - 1; }
  uint64_t client_id() const { return client_id_; }
  const ClientOptions& options() const { return options_; }
  client::TabletMap& map() { return map_; }
  ClientTransport& transport() { return *transport_; }

 private:
  struct TableState {
    bool stale = false;
    bool refreshing = false;
    uint64_t epoch = 0;  // bumped on every refresh
    std::vector<std::function<void(Status)>> waiters;
  };

  Impl(const ClientOptions& options, std::unique_ptr<ClientTransport> transport);
  void dispatch(const client::OpPtr& op);
  void dispatch_routed(const client::OpPtr& op);
  void send_routed(const client::OpPtr& op, const client::Tablet& tablet);
  void send(const client::OpPtr& op, const std::string& locator);
  void on_reply(const client::OpPtr& op, Status status, std::span<const std::byte> body);
  void retry_later(const client::OpPtr& op, Status why);
  void finish(const client::OpPtr& op, Status status, std::span<const std::byte> body);
  void end_refresh(uint64_t table_id, Status status, std::span<const std::byte> body);
  int fire_timers();

  ClientOptions options_;
  uint64_t client_id_ = 0;
  uint64_t rpc_seq_ = 0;
  std::set<uint64_t> open_seqs_;  // invariant 5
  uint64_t jitter_seed_ = 0;
  size_t user_ops_ = 0;
  uint64_t completed_ = 0;
  client::TabletMap map_;
  std::unordered_map<uint64_t, TableState> tables_;
  std::multimap<uint64_t, std::function<void()>> timers_;  // by due time (ns)
  // Last member: destroyed first, dropping the callbacks it holds before the state above.
  std::unique_ptr<ClientTransport> transport_;
};

}  // namespace ramkv
