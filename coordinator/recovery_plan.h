// Recovery planning: the pure part of a crashed master's recovery (docs/recovery.md,
// steps 2-4). From what the backups answered to `backup start reading data`, it proves the
// log complete, picks the usable replicas of every segment, and splits the master's
// tablets into partitions for the recovery masters. No I/O: the RecoveryManager
// (coordinator/recovery_manager.h) does the talking.
//
// Threads: plain functions and values.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/result.h"
#include "common/wire_format.h"
#include "coordinator/coordinator_state.h"

namespace ramkv::coordinator {

// One backup's answer to `backup start reading data`.
struct BackupAnswer {
  uint64_t backup_id = 0;
  std::string locator;
  wire::StartReadingDataResponse header;
  std::vector<wire::ReplicaEntry> replicas;
  std::vector<uint64_t> digest;
  std::vector<wire::TableStatWire> table_stats;
};
// Decodes the response body; kBadRequest if it is malformed.
Result<BackupAnswer> decode_backup_answer(uint64_t backup_id, const std::string& locator,
                                          std::span<const std::byte> body);

struct PlannedPartition {
  uint32_t id = 0;
  std::vector<Tablet> tablets;  // server_id: the crashed master
  uint64_t estimated_bytes = 0;
};

struct RecoveryPlan {
  uint64_t digest_segment_id = 0;
  uint64_t safe_version = 0;
  // Every segment of the digest -> the backups with a usable replica. The first is the
  // segment's primary replica (docs/recovery.md, step 4): the one backup that reads and
  // splits it at once, chosen to spread the log's bytes evenly over the backups. The
  // others are its secondaries, read only if a recovery master asks them (after the
  // primary failed it), in the order to try them (closed replicas first).
  std::map<uint64_t, std::vector<std::pair<uint64_t, std::string>>> locations;
  // Backup id -> the segments it is primary for, ascending. Every segment of the digest
  // is in exactly one list; a backup with no primary has no entry.
  std::map<uint64_t, std::vector<uint64_t>> primaries;
  std::vector<PlannedPartition> partitions;
  uint64_t estimated_bytes = 0;
};

struct PlanOptions {
  uint64_t partition_bytes = 512ull << 20;    // aim: about a second of replay each
  uint64_t min_partition_bytes = 8ull << 20;  // not split further just to spread work
  uint32_t recovery_masters = 1;              // masters that can take a partition
};

// kIncomplete (with *error saying what is missing) when the log cannot be proven
// complete; kInvalidArgument when `tablets` is empty.
Result<RecoveryPlan> plan_recovery(uint64_t master_id, const std::vector<Tablet>& tablets,
                                   const std::vector<BackupAnswer>& answers,
                                   std::optional<ReplicationEpoch> recorded,
                                   const PlanOptions& options, std::string* error);

}  // namespace ramkv::coordinator
