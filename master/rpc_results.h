// RpcResults: the results of a master's writes, removes and increments, kept by (client
// id, rpc sequence) until the client acknowledges them, so that a retried request is
// answered with its first result instead of being applied again (exactly-once, RIFL's
// "unacked RPC results"; docs/rpc.md, "Exactly once").
//
// Each result is also a kRpcResult entry in the log, appended in the same append as the
// object or tombstone the request made (ObjectManager): replicated with it, recovered with
// it on the recovery master that gets the key, moved by the cleaner while needed. This
// table knows where that entry is and tells its owner (`Release`) when it dies.
//
// A client acknowledges with every request: the header's ack sequence says it has the
// replies of all its requests up to it. Records at or below it are released; a request
// at or below it is a stale duplicate (the client has the reply already).
//
// Owner: ObjectManager. Threads: any; one mutex. Lock order: a key's stripe lock, then
// this table's mutex, then the log (the release callback and relocation run under the
// mutex).
// Invariants:
//   1. A client's records all have sequences above its acked sequence.
//   2. A record's entry is counted in its segment's live bytes exactly while the record is
//      in the table; `ref` always points at the entry's current copy (the cleaner moves
//      it only under the mutex).
//   3. A client not heard from for the expiry time is forgotten, records and all. Its
//      requests' deadlines (seconds) are far below that time (an hour by default), so no
//      retry of a forgotten request can still arrive from a working client.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>

#include "common/log_entry.h"
#include "common/result.h"
#include "master/hash_table.h"

namespace ramkv::master {

// Who sent a request, as its header says. client_id 0: no exactly-once bookkeeping.
struct RpcId {
  uint64_t client_id = 0;
  uint64_t seq = 0;
  uint64_t ack = 0;  // the client has the replies of all its requests up to this sequence
  bool tracked() const { return client_id != 0 && seq != 0; }
};

// What a request did: the status and the fields of its reply.
struct RpcOutcome {
  Status status = Status::kOk;
  uint64_t version = 0;
  uint64_t value = 0;  // an increment's new value
};

struct RpcResultsStats {
  uint64_t clients = 0;
  uint64_t records = 0;
  uint64_t duplicates = 0;  // retries answered from a record
  uint64_t stale = 0;       // requests at or below their client's ack
  uint64_t released = 0;    // records acknowledged
  uint64_t expired_clients = 0;
};

class RpcResults {
 public:
  // Called (under the mutex) for a record's entry when the record dies.
  using Release = std::function<void(LogRef ref, uint32_t entry_bytes)>;
  explicit RpcResults(Release release) : release_(std::move(release)) {}

  enum class Check { kNew, kDone, kStale };
  // Takes id.ack (releasing the client's records up to it), then: kDone with the recorded
  // outcome in *out; kStale if id.seq is at or below the client's ack; kNew otherwise.
  // Caller holds the stripe lock of the request's key, and keeps it until record().
  Check check(const RpcId& id, uint64_t now_ns, RpcOutcome* out);
  // Records the outcome of a request check() called new, whose kRpcResult entry is at
  // `ref` (already counted live). A record already there is kept (the new entry is
  // released).
  void record(const RpcId& id, const RpcOutcome& outcome, LogRef ref, uint32_t entry_bytes,
              uint64_t now_ns);
  // Replay of a crashed master's record (ObjectManager::replay): false if this table
  // does not need it (acknowledged since, or already here). Takes the record's ack.
  bool wanted(const RpcResultView& r, uint64_t now_ns);

  // The cleaner: if (client, seq)'s record is at `old_ref`, calls move() for its new
  // location and points the record there. kOk whether moved or dead; move()'s error.
  Status relocate(uint64_t client_id, uint64_t seq, LogRef old_ref,
                  const std::function<Result<LogRef>()>& move);

  // Forgets clients not heard from since now_ns - ttl_ns (invariant 3). Returns how many.
  uint64_t expire(uint64_t now_ns, uint64_t ttl_ns);

  RpcResultsStats stats() const;

 private:
  struct Record {
    RpcOutcome outcome;
    LogRef ref = 0;
    uint32_t entry_bytes = 0;
  };
  struct ClientState {
    uint64_t acked = 0;
    uint64_t last_seen_ns = 0;
    std::map<uint64_t, Record> records;  // by sequence
  };
  // Moves the client's ack up to `ack`, releasing the records it covers. Caller holds
  // the mutex.
  void take_ack(ClientState& c, uint64_t ack);

  const Release release_;
  mutable std::mutex mutex_;
  std::unordered_map<uint64_t, ClientState> clients_;
  RpcResultsStats stats_;
};

}  // namespace ramkv::master
