// CoordinatorState: everything the coordinator must not forget: the server list, the
// tables, the tablet map and each master's replication epoch (DESIGN.md, Coordinator;
// docs/rpc.md, Coordinator and "Replication epochs"). A plain value: the
// service copies it, changes the copy, persists the copy through the ExternalStore and
// only then makes it current, so a failed write changes nothing.
//
// Serialized form (all integers little-endian; "v" is a LEB128 varint):
//
//   u32 format version (2) | u64 server list version | u64 tablet map version |
//   u64 next table id |
//   v server count,  each: u64 id | u32 services | u8 status | v locator bytes | locator
//   v table count,   each: u64 id | v name bytes | name
//   v tablet count,  each: u64 table id | u64 start hash | u64 end hash | u64 server id
//   v epoch count,   each: u64 master id | u64 segment id | u64 epoch     (version 2 only)
//
// Version 1 is the same without the epoch section; it still loads (no epochs recorded)
// and is rewritten as version 2 by the next serialize().
//
// Owner: the CoordinatorService. Threads: a plain value, not thread-safe.
// Invariants:
//   1. A server id is `index | generation << 32`; index and generation start at 1, and the
//      server with index i is servers()[i - 1], holding that index's newest generation.
//   2. Table ids start at 1 and are never reused (next_table_id only grows).
//   3. Every tablet names an existing table; the tablets of a table cover the whole
//      64-bit hash space exactly once.
//   4. Replication epochs are keyed by a master id that was issued (its index is listed and
//      its generation is at most that index's newest); serialized in increasing master id.
//      A replaced master keeps its entry: that master's recovery is what needs it.
//   5. deserialize() accepts only bytes that satisfy 1-4; anything else is kFormatError.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"

namespace ramkv::coordinator {

enum class ServerStatus : uint8_t { kUp = 0, kCrashed = 1, kRemoved = 2 };

struct ServerInfo {
  uint64_t id = 0;
  uint32_t services = 0;  // wire::kServiceMaster | wire::kServiceBackup
  ServerStatus status = ServerStatus::kUp;
  std::string locator;
  bool operator==(const ServerInfo&) const = default;
};

struct Tablet {
  uint64_t table_id = 0;
  uint64_t start_hash = 0;  // inclusive
  uint64_t end_hash = 0;    // inclusive
  uint64_t server_id = 0;
  bool operator==(const Tablet&) const = default;
};

// The newest (segment, epoch) a master reported with set replication epoch: an open replica
// of segment_id whose epoch is below `epoch` is stale. Ordered lexicographically.
struct ReplicationEpoch {
  uint64_t segment_id = 0;
  uint64_t epoch = 0;
  auto operator<=>(const ReplicationEpoch&) const = default;
};

constexpr uint64_t make_server_id(uint32_t index, uint32_t generation) {
  return uint64_t{index} | uint64_t{generation} << 32;
}
constexpr uint32_t server_index(uint64_t id) { return static_cast<uint32_t>(id); }
constexpr uint32_t server_generation(uint64_t id) { return static_cast<uint32_t>(id >> 32); }

class CoordinatorState {
 public:
  // The most tablets one table may be split into.
  static constexpr uint32_t kMaxTabletsPerTable = 4096;

  // ---- Server list ----
  struct EnlistResult {
    uint64_t server_id = 0;
    uint64_t replaced_id = 0;  // the entry this one replaced, or 0
  };
  // Adds a server. If `replaces_id` names a listed server, or `locator` is the locator of
  // a server that is up, that index gets a new generation and the old entry is gone
  // (its id resolves to "removed"). A replaced master keeps its tablets until its
  // recovery moves them.
  EnlistResult enlist(uint32_t services, std::string_view locator, uint64_t replaces_id);
  // The server with exactly this id, or nullptr (unknown or replaced).
  const ServerInfo* find_server(uint64_t id) const;
  // True if `id` was ever given out: the server with that id, or one it was replaced by,
  // is listed.
  bool issued(uint64_t id) const;
  const std::vector<ServerInfo>& servers() const { return servers_; }
  // Marks the server with exactly this id crashed (docs/recovery.md, "Failure
  // detection"); its tablets stay with it until its recovery moves them. false (nothing
  // changed) if it is not listed with this id or is not up.
  bool mark_crashed(uint64_t id);
  // Ids of the masters that are up, in index order.
  std::vector<uint64_t> up_masters() const;
  uint64_t server_list_version() const { return server_list_version_; }

  // ---- Tables and tablets ----
  std::optional<uint64_t> table_id(std::string_view name) const;
  bool has_table(uint64_t table_id) const;
  // Creates a table split into `tablet_count` equal hash ranges (0: one per master),
  // assigned round-robin to `masters` (must not be empty). Returns the new id.
  uint64_t create_table(std::string_view name, uint32_t tablet_count,
                        const std::vector<uint64_t>& masters);
  // Removes the table and returns its tablets; kUnknownTable if there is none.
  Result<std::vector<Tablet>> drop_table(std::string_view name);
  // The tablets of one table (table_id != 0) or of all tables, in (table, start) order.
  std::vector<Tablet> tablets(uint64_t table_id) const;
  // The tablets owned by one server.
  std::vector<Tablet> tablets_of(uint64_t server_id) const;
  uint64_t tablet_map_version() const { return tablet_map_version_; }
  size_t table_count() const { return tables_.size(); }
  // Recovery: gives the range `moved` (within one tablet of `from`; moved.server_id = the
  // new owner) to its new owner, splitting that tablet where the range does not cover
  // it. kInvalidArgument (nothing changed) if no tablet of `from` contains the range.
  Status move_tablet_range(uint64_t from, const Tablet& moved);

  // ---- Recovery ----
  // A crashed master whose recovery is over: its entry is marked removed. false if it is
  // not listed as crashed with this id.
  bool mark_removed(uint64_t id);

  // ---- Replication epochs ----
  // Records `e` for `master_id` if it is greater than the one recorded (or none is);
  // returns whether anything changed. Lower or equal: a resent or reordered call, ignored.
  // `master_id` must have been issued.
  bool set_replication_epoch(uint64_t master_id, ReplicationEpoch e);
  // The recorded epoch of one master, if any.
  std::optional<ReplicationEpoch> replication_epoch(uint64_t master_id) const;
  // Every recorded epoch, by master id.
  const std::map<uint64_t, ReplicationEpoch>& replication_epochs() const {
    return replication_epochs_;
  }

  // ---- Persistence ----
  std::vector<std::byte> serialize() const;
  static Result<CoordinatorState> deserialize(std::span<const std::byte> bytes);

  bool operator==(const CoordinatorState&) const;

 private:
  Status validate() const;

  uint64_t server_list_version_ = 0;
  uint64_t tablet_map_version_ = 0;
  uint64_t next_table_id_ = 1;
  std::vector<ServerInfo> servers_;
  std::map<std::string, uint64_t, std::less<>> tables_;      // name -> id
  std::vector<Tablet> tablets_;                              // sorted by (table_id, start_hash)
  std::map<uint64_t, ReplicationEpoch> replication_epochs_;  // master id -> newest
};

// Splits the hash space into `count` (>= 1) equal inclusive ranges [start, end].
std::vector<std::pair<uint64_t, uint64_t>> split_hash_space(uint32_t count);

}  // namespace ramkv::coordinator
