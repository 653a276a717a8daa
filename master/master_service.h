// MasterService: the RPC face of a master. It decodes every master request of
// docs/rpc.md ("Master"), checks that the key belongs to a tablet this master owns, runs
// the operation on the ObjectManager and encodes the reply.
//
// Owner: the server process (server/main.cc), which hands handle() to the transport's
// dispatch loop. Threads: handle() and the accessors run on the dispatch thread only;
// the ObjectManager underneath is thread-safe (its cleaner runs beside it).
// Decoding: a body is read only through wire::BodyReader. A body that is short, longer
// than its fixed part and announced lengths, or that announces lengths beyond its end is
// answered kBadRequest before anything is changed (multi-ops are decoded whole first).
// Invariants:
//   1. A key is read or changed only if (table, key_hash(table, key)) is in tablets().
//   2. A non-kOk reply has an empty body, except multi-ops, whose items carry their own
//      statuses (docs/rpc.md).
//   3. Every reply body fits in wire::kMaxBodyBytes: enumerate stops a batch early and a
//      multi read answers the items that no longer fit with kRetry (as RAMCloud does),
//      so the client resends just those.
//   4. With replication on (set_replication), a reply to a write, remove, increment or
//      multi write/remove that succeeded is held by the ReplicaManager until what it wrote
//      is on R backups; once the master is fenced, such requests get kFenced.
//   5. Once fence() was called, every request but echo is answered kFenced and changes
//      nothing (docs/recovery.md, "Failure detection"): the coordinator declared this
//      server crashed and its tablets belong to recovery.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/clock.h"
#include "common/transport.h"
#include "common/wire_format.h"
#include "master/master_config.h"
#include "master/object_manager.h"
#include "master/recovery_task.h"
#include "master/replica_manager.h"
#include "master/tablet_dropper.h"
#include "master/tablet_set.h"

namespace ramkv::master {

class MasterService {
 public:
  // Enumerate answers at most this many objects per call, whatever the client asks.
  static constexpr uint32_t kMaxEnumerateObjects = 1000;
  // Enumerate stops adding buckets to a batch once its body passes this; one bucket more
  // at most follows, which keeps the body under wire::kMaxBodyBytes.
  static constexpr size_t kEnumerateSoftBytes = 4u << 20;

  // Allocates the storage engine. kInvalidArgument for a bad config.
  static Result<std::unique_ptr<MasterService>> create(
      MasterConfig config, const Clock& clock = SystemClock::instance());
  explicit MasterService(std::unique_ptr<ObjectManager> objects);

  // Serves one request. Sets the reply's status and body; never throws, never asserts
  // on request bytes.
  void handle(const wire::MessageHeader& header, std::span<const std::byte> body, Reply& reply);

  ObjectManager& objects() { return *objects_; }
  // Replies to writes wait for `replicas` (owned by the server; outlives this).
  void set_replication(ReplicaManager* replicas) { replicas_ = replicas; }
  // Serves kRecover with `recovery` (docs/recovery.md, step 5); without one, kRecover is
  // a bad request.
  void set_recovery(RecoveryTask* recovery) { recovery_ = recovery; }
  // Dropped tablets are emptied by `dropper` a piece at a time (tablet_dropper.h); without
  // one, before drop_tablets answers.
  void set_dropper(TabletDropper* dropper) { dropper_ = dropper; }
  // A server list from the coordinator (pushed, or fetched at start); older versions than
  // the newest seen change nothing.
  void update_server_list(uint64_t version, const std::vector<wire::ServerListItem>& servers);
  const TabletSet& tablets() const { return tablets_; }
  // Stops serving for good: the coordinator declared this server crashed (invariant 5).
  // Thread-safe (the failure detector's thread may call it); idempotent.
  void fence() { fenced_.store(true, std::memory_order_relaxed); }
  bool fenced() const { return fenced_.load(std::memory_order_relaxed); }

 private:
  // A read, remove or multi-op item: the fixed part and the variable parts after it.
  // The views point into the request body, which outlives the handler.
  struct KeyedItem {
    uint64_t table_id = 0;
    std::string_view key;
    std::string_view value;  // write only
    int64_t delta = 0;       // increment only
    RejectRules rules;
  };

  // Each returns the reply status; on kOk it has filled the reply body.
  Status read(std::span<const std::byte> body, Reply& reply);
  // write, remove and increment are exactly-once for a client that sends an id (the
  // request's RpcId: ObjectManager, rpc_results.h); multi-ops are not.
  Status write(std::span<const std::byte> body, const RpcId& rpc, Reply& reply);
  Status remove(std::span<const std::byte> body, const RpcId& rpc, Reply& reply);
  Status increment(std::span<const std::byte> body, const RpcId& rpc, Reply& reply);
  Status multi_read(std::span<const std::byte> body, Reply& reply);
  Status multi_write(std::span<const std::byte> body, Reply& reply);
  Status multi_remove(std::span<const std::byte> body, Reply& reply);
  Status enumerate(std::span<const std::byte> body, Reply& reply);
  Status decode_own_tablets(wire::Opcode opcode, std::span<const std::byte> body,
                            std::vector<wire::TabletWire>* out) const;
  Status take_tablets(std::span<const std::byte> body);
  Status drop_tablets(std::span<const std::byte> body);
  Status server_stats(std::span<const std::byte> body, Reply& reply);
  // kIsReplicaNeeded: asks the ReplicaManager about each segment (wire_format.h).
  Status replica_needed(std::span<const std::byte> body, Reply& reply);
  Status server_list_update(std::span<const std::byte> body);

  // Item decoders shared by the single and multi forms: the fixed part, then the key
  // (and value) it announces. false when the body is shorter than announced.
  static bool decode_read_item(wire::BodyReader& in, KeyedItem* item);
  static bool decode_write_item(wire::BodyReader& in, KeyedItem* item);
  static bool decode_increment_item(wire::BodyReader& in, KeyedItem* item);

  // One read, write or remove on an owned key; the shared part of single and multi ops.
  Result<uint64_t> read_item(const KeyedItem& item, std::string* value);
  Result<uint64_t> write_item(const KeyedItem& item, const RpcId* rpc = nullptr);
  Result<uint64_t> remove_item(const KeyedItem& item, const RpcId* rpc = nullptr);
  bool owns(uint64_t table_id, std::string_view key) const;
  // Decodes a multi-op body into items_ with `decode_item` per item; false if malformed.
  template <typename DecodeItem>
  bool decode_multi(std::span<const std::byte> body, DecodeItem&& decode_item);
  // Enumerate's body after the EnumerateResponse; returns the next cursor (or error).
  Result<uint64_t> enumerate_batch(const wire::EnumerateRequest& request, Reply& reply,
                                   uint32_t* count);

  std::unique_ptr<ObjectManager> objects_;
  TabletSet tablets_;
  // Reused between requests so the steady state allocates nothing (dispatch thread only).
  std::string value_scratch_;
  std::vector<KeyedItem> items_;
  std::vector<ObjectManager::Object> objects_scratch_;
  uint64_t rpc_count_ = 0;
  // The newest server list the coordinator sent (failure detection will use it).
  uint64_t server_list_version_ = 0;
  uint32_t server_count_ = 0;
  uint64_t bad_request_count_ = 0;
  std::vector<wire::ServerListItem> servers_scratch_;
  ReplicaManager* replicas_ = nullptr;
  RecoveryTask* recovery_ = nullptr;
  TabletDropper* dropper_ = nullptr;
  std::atomic<bool> fenced_{false};
};

}  // namespace ramkv::master
