// ramkv/client.h: public. The ramkv client library: what an application links (as
// ramkv::client) to talk to a ramkv cluster.
//
// A Client holds one connection set to the coordinator and the masters, a cached copy of
// the tablet map, and the operations in flight. Every operation is routed by the key's
// hash to the master that owns the covering tablet. When a master answers "not mine"
// (kUnknownTablet, or kFenced from a master declared crashed whose tablets are being
// recovered), is unreachable (kUnavailable), does not answer in time (kTimeout) or asks to
// come back later (kRetry), the client refreshes its map from the coordinator and resends
// with exponential back-off until the operation's deadline (ClientOptions::timeout). Every
// other status reaches the caller unchanged (docs/rpc.md).
// Every operation carries the client's id (random at connect) and its own sequence number,
// kept across resends, and acknowledges the sequences it has finished: a write, remove or
// increment is applied at most once even when resent to the master that recovered the
// crashed one's data (docs/rpc.md, "Exactly once"). Multi-writes and multi-removes are not
// covered.
//
// Threads: a Client is NOT thread-safe. Use one Client per thread (RAMCloud does the
// same); completions of asynchronous operations run on the thread that calls poll(),
// wait_all(), Pending::get() or any synchronous operation, never on a hidden thread.
// A synchronous call therefore also runs the completions of earlier asynchronous ones.
// A callback may start new operations; it must not destroy the Client.
//
// Ownership: keys and values passed in are copied before the call returns; results are
// owned by the caller. A Pending<T> must not outlive the Client that made it.
//
// Invariants:
//   1. Every operation completes exactly once, at the latest shortly after its deadline.
//   2. Versions returned for one key only grow.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ramkv/result.h"
#include "ramkv/status.h"

namespace ramkv {

struct ClientOptions {
  // The coordinator's "host:port".
  std::string coordinator = "127.0.0.1:12246";
  // How long one operation may take, retries included; then it fails with the last
  // transient status seen (kTimeout, kUnavailable or kRetry).
  uint64_t timeout_ms = 5'000;
  // The longest one attempt waits for its answer before the client presumes the server
  // gone, refreshes its map and resends (within timeout_ms).
  uint64_t rpc_timeout_ms = 2'000;
  // Spin on the sockets instead of sleeping in the kernel (lowest latency, one core busy).
  bool busy_poll = false;
  // The transport the RPCs go on; it must be the cluster's (a cluster uses one throughout,
  // docs/rdma.md):
  //   "rdma": RPCs over RDMA verbs (reliable-connected queue pairs) on rdma_device and
  //           rdma_port, in a build of this library with the RDMA transport
  //           (transport_available("rdma")).
  //   "tcp":  TCP.
  //   "":     this process's default: TCP, unless the program chose another for all its
  //           RPCs at start (ramkv's own programs do, with `--transport`).
  // "tcp" and "rdma" are this Client's own choice: they never change the transport of
  // the rest of the process. connect() fails with kInvalidArgument for another name, for
  // "rdma" where it is not available, an RDMA device name not found or a port outside
  // 1-255, and with kUnavailable when there is no RDMA device or it cannot be opened
  // (the reason is logged, one line).
  std::string transport = {};
  // "rdma": the device, as `ibv_devices` names it; "" uses the first one listed.
  std::string rdma_device = {};
  // "rdma": the device's port.
  uint32_t rdma_port = 1;
};

// Conditions under which an operation is rejected (compare-and-swap). Checked by the
// master against the object's current state before anything is changed.
struct RejectRules {
  bool doesnt_exist = false;      // kObjectNotFound if there is no object
  bool exists = false;            // kObjectExists if there is one
  bool version_le_given = false;  // kWrongVersion if version <= given_version
  bool version_ne_given = false;  // kWrongVersion if version != given_version
  uint64_t given_version = 0;
};

struct ReadResult {
  std::string value;
  uint64_t version = 0;
};

struct IncrementResult {
  int64_t value = 0;  // the value after the increment
  uint64_t version = 0;
};

// One object of a table, as enumerate() returns it.
struct Object {
  std::string key;
  std::string value;
  uint64_t version = 0;
};

// Items of the multi-operations. The rules pointer, when set, must stay valid until the
// call returns (synchronous) or the callback is called (asynchronous).
struct MultiReadItem {
  uint64_t table_id = 0;
  std::string key;
  const RejectRules* rules = nullptr;
};
struct MultiWriteItem {
  uint64_t table_id = 0;
  std::string key;
  std::string value;
  const RejectRules* rules = nullptr;
};
struct MultiRemoveItem {
  uint64_t table_id = 0;
  std::string key;
  const RejectRules* rules = nullptr;
};

enum class ServerStatus : uint8_t { kUp = 0, kCrashed = 1, kRemoved = 2 };

struct ServerInfo {
  uint64_t server_id = 0;  // index in the low 32 bits, generation in the high 32
  bool master = false;
  bool backup = false;
  ServerStatus status = ServerStatus::kUp;
  std::string locator;
};

struct TabletInfo {
  uint64_t table_id = 0;
  uint64_t start_hash = 0;  // inclusive
  uint64_t end_hash = 0;    // inclusive
  uint64_t server_id = 0;
  std::string locator;  // the owner's, "" if the coordinator did not name it
};

class Client;

// The future form of an asynchronous operation. get() polls the Client until the
// operation is done, then returns its result (once; later calls return it again).
template <typename T>
class Pending {
 public:
  struct State {
    std::optional<Result<T>> result;
  };
  Pending(Client* client, std::shared_ptr<State> state)
      : client_(client), state_(std::move(state)) {}
  bool ready() const { return state_->result.has_value(); }
  Result<T> get();

 private:
  Client* client_;
  std::shared_ptr<State> state_;
};

class Client {
 public:
  template <typename T>
  using Callback = std::function<void(Result<T>)>;

  // Contacts the coordinator (fetching the tablet map) before returning: a coordinator
  // that cannot be reached gives kUnavailable or kTimeout within options.timeout_ms; a
  // malformed locator gives kInvalidArgument, and so does a transport this build cannot
  // make (see ClientOptions::transport).
  static Result<std::unique_ptr<Client>> connect(const ClientOptions& options);
  // Whether this build of the library can use `transport` as ClientOptions::transport:
  // "" and "tcp" always; "rdma" where it was built with the RDMA transport.
  static bool transport_available(std::string_view transport);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  uint64_t client_id() const;

  // ---- Tables (coordinator) ----
  // Returns the table's id; an existing name returns its id. tablet_count 0: one tablet
  // per master. kRetry (after the deadline) when no master is up.
  Result<uint64_t> create_table(std::string_view name, uint32_t tablet_count = 0);
  // kUnknownTable if there is none; not for a drop of ours retried after an attempt that
  // went unanswered (the coordinator may have dropped it then).
  Result<void> drop_table(std::string_view name);
  Result<uint64_t> get_table_id(std::string_view name);

  // ---- Objects (synchronous) ----
  Result<ReadResult> read(uint64_t table_id, std::string_view key,
                          const RejectRules* rules = nullptr);
  // Returns the new version.
  Result<uint64_t> write(uint64_t table_id, std::string_view key, std::string_view value,
                         const RejectRules* rules = nullptr);
  // Returns the removed object's version, 0 if there was none.
  Result<uint64_t> remove(uint64_t table_id, std::string_view key,
                          const RejectRules* rules = nullptr);
  // Adds delta to an 8-byte little-endian integer value (created as delta if absent).
  Result<IncrementResult> increment(uint64_t table_id, std::string_view key, int64_t delta,
                                    const RejectRules* rules = nullptr);

  // Many keys at once: split by master, one RPC per master (or more when large), all in
  // flight together. The result vector matches the items, one Result each.
  std::vector<Result<ReadResult>> multi_read(const std::vector<MultiReadItem>& items);
  std::vector<Result<uint64_t>> multi_write(const std::vector<MultiWriteItem>& items);
  std::vector<Result<uint64_t>> multi_remove(const std::vector<MultiRemoveItem>& items);

  // Every object of a table, tablet by tablet, in key-hash order within a tablet. Not a
  // snapshot: objects written meanwhile may or may not appear.
  Result<std::vector<Object>> enumerate(uint64_t table_id);

  // ---- Cluster (for tools) ----
  Result<std::vector<ServerInfo>> servers();
  // Tablets of one table, or of all tables (table_id 0), from the coordinator.
  Result<std::vector<TabletInfo>> tablets(uint64_t table_id = 0);
  // One server's statistics: text, one "name value" per line.
  Result<std::string> server_stats(const std::string& locator);

  // ---- Asynchronous forms ----
  // The callback runs once, from poll() (or anything that polls) on this thread.
  void read_async(uint64_t table_id, std::string_view key, Callback<ReadResult> done,
                  const RejectRules* rules = nullptr);
  void write_async(uint64_t table_id, std::string_view key, std::string_view value,
                   Callback<uint64_t> done, const RejectRules* rules = nullptr);
  void remove_async(uint64_t table_id, std::string_view key, Callback<uint64_t> done,
                    const RejectRules* rules = nullptr);
  void increment_async(uint64_t table_id, std::string_view key, int64_t delta,
                       Callback<IncrementResult> done, const RejectRules* rules = nullptr);
  void multi_read_async(const std::vector<MultiReadItem>& items,
                        std::function<void(std::vector<Result<ReadResult>>)> done);
  void multi_write_async(const std::vector<MultiWriteItem>& items,
                         std::function<void(std::vector<Result<uint64_t>>)> done);
  void multi_remove_async(const std::vector<MultiRemoveItem>& items,
                          std::function<void(std::vector<Result<uint64_t>>)> done);
  // Future forms: the rules, when given, must stay valid until the result is ready.
  Pending<ReadResult> read_async(uint64_t table_id, std::string_view key,
                                 const RejectRules* rules = nullptr);
  Pending<uint64_t> write_async(uint64_t table_id, std::string_view key, std::string_view value,
                                const RejectRules* rules = nullptr);
  Pending<uint64_t> remove_async(uint64_t table_id, std::string_view key,
                                 const RejectRules* rules = nullptr);
  Pending<IncrementResult> increment_async(uint64_t table_id, std::string_view key, int64_t delta,
                                           const RejectRules* rules = nullptr);

  // Makes progress for up to timeout_ns (0: only what is ready now); returns how many
  // operations completed.
  int poll(uint64_t timeout_ns = 0);
  // Polls until no operation is in flight.
  void wait_all();
  size_t outstanding() const;

  class Impl;

 private:
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

template <typename T>
Result<T> Pending<T>::get() {
  while (!state_->result.has_value()) client_->poll(1'000'000);
  return *state_->result;
}

}  // namespace ramkv
