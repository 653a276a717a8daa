// scan_replicas: what a restarted backup does first. It walks <data-dir>/<master-id>/
// <segment-id>, checks every replica file (header checksum, sizes, then every entry
// against the certificate) and reports each one, so the backup can tell the coordinator
// what it holds and never serve bytes it cannot prove.
//
// A replica is one of:
//   kOk          the certified prefix is whole;
//   kFormatError torn: the file is shorter than its certificate says, or its header or
//                sizes are impossible (a write cut short by a crash);
//   kCorrupt     the header checksum or the certificate does not match the bytes.
// Torn and corrupt replicas report valid_bytes, the prefix of whole entries with good
// checksums, as a scan without the certificate finds it.
// Names that are not <number>/<number> are skipped and logged, never deleted.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backup/replica_file.h"
#include "common/result.h"

namespace ramkv::backup {

struct ScannedReplica {
  uint64_t master_id = 0;
  uint64_t segment_id = 0;
  std::string path;
  Status status = Status::kOk;
  ReplicaHeader header;      // as decoded; zero when the header itself is unreadable
  uint32_t valid_bytes = 0;  // whole, checksummed entries at the start of the segment
};

// kIoError if the directory cannot be read; a missing directory is an empty backup.
Result<std::vector<ScannedReplica>> scan_replicas(const std::string& data_dir);

// Checks one replica file as scan_replicas does.
ScannedReplica check_replica(const std::string& path, uint64_t master_id, uint64_t segment_id);

}  // namespace ramkv::backup
