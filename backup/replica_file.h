// Replica files: how a backup stores one replica of one master's segment on disk.
//
//   <data-dir>/<master-id>/<segment-id>
//
//   0                                        4096                        4096 + capacity
//   +----------------------------------------+----------------------------+
//   | header block: ReplicaHeader, zero pad  | segment bytes (log format) |
//   +----------------------------------------+----------------------------+
//
//   ReplicaHeader (64 bytes, little-endian):
//   0      4     6     8            16           24       32       36       40       44
//   +------+-----+-----+------------+------------+--------+--------+--------+--------+---
//   |magic |vers |flags| master id  | segment id | epoch  |capacity|cert len|cert sum| ...
//   +------+-----+-----+------------+------------+--------+--------+--------+--------+---
//   44 u32 reserved, 48 u64 reserved, 56 u32 header checksum (XXH3 of bytes 0-55), 60 pad
//   magic "RKVB", flags bit 0 = closed. The certificate (length, checksum) proves which
//   prefix of the segment bytes is whole (docs/log-format.md, Certificates).
//
// Everything is aligned to 4096 bytes so the files can be written with O_DIRECT. A closed
// replica's file is never rewritten; an open one's header is rewritten as it grows.
// Reading never trusts the file: a bad magic, version or size is kFormatError, a header
// checksum mismatch kCorrupt, a certificate longer than the bytes on disk (a torn write)
// kFormatError.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "backup/uring.h"
#include "common/result.h"

namespace ramkv::backup {

constexpr uint32_t kReplicaMagic = 0x42564b52;  // "RKVB"
constexpr uint16_t kReplicaVersion = 1;
constexpr size_t kReplicaHeaderBlock = 4096;

struct ReplicaHeader {
  uint64_t master_id = 0;
  uint64_t segment_id = 0;
  uint64_t epoch = 0;
  uint32_t capacity = 0;           // segment bytes the file has room for
  uint32_t certificate_bytes = 0;  // the certified prefix of the segment
  uint32_t certificate_checksum = 0;
  bool closed = false;
  friend bool operator==(const ReplicaHeader&, const ReplicaHeader&) = default;
};

std::string replica_path(const std::string& data_dir, uint64_t master_id, uint64_t segment_id);

// Fills the first kReplicaHeaderBlock bytes of `block` (zero padding included).
void encode_replica_header(const ReplicaHeader& h, std::span<std::byte> block);
Result<ReplicaHeader> decode_replica_header(std::span<const std::byte> block);

// A replica read back from disk: its header and the certified segment bytes.
struct LoadedReplica {
  ReplicaHeader header;
  AlignedBuffer data;  // certificate_bytes valid bytes (rounded up with zeros)
};
// Reads and checks a replica file (header, sizes). It does not parse the entries:
// callers check the segment bytes against the certificate (SegmentIterator::validate).
Result<LoadedReplica> load_replica(const std::string& path);

// Writes a whole replica (header block, then the segment bytes) with O_DIRECT through
// `ring`, and fdatasyncs it when `sync`. Creates the master's directory if needed. Used
// by tools, tests and the benchmark; the backup service streams through the same format.
Status write_replica(Uring& ring, const std::string& data_dir, const ReplicaHeader& header,
                     std::span<const std::byte> segment_bytes, bool sync);

}  // namespace ramkv::backup
