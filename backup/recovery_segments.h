// RecoverySegments: a backup's part in recovering one crashed master (docs/recovery.md,
// steps 1, 4 and 5 as the backup sees them). BackupService makes one per (master,
// recovery id) when `backup start reading data` arrives, hands it every replica of that
// master it holds, and forwards `backup start partitioning` and `backup get recovery data`
// to it.
//
// What it does:
//   - The constructor reads the first entries of the newest replica that has a log digest
//     (synchronously: a few KiB), so that start_response() can answer at once with the
//     replicas, the digest, the safe version and the table statistics.
//   - A thread of its own then reads replicas into memory: files with io_uring (O_DIRECT
//     where the filesystem allows it, several reads in flight), replicas held in RAM by
//     taking over their bytes. Each is checked against its certificate (SegmentIterator): one
//     whose bytes do not check out is listed corrupt (or torn, when the file is shorter
//     than its certificate) and never served.
//   - Which replicas it reads, and when (docs/recovery.md, "Primary and secondary
//     replicas"): without `defer_reads`, every replica, at once. With it, nothing until
//     the partition map arrives; then the primaries the map names (all replicas when it
//     names none), in segment order; a secondary is read when a recovery master first asks
//     for it (get_pieces answers kRetry meanwhile), ahead of the primaries still queued.
//   - Once the partition map is known, the thread splits each replica's object and
//     tombstone entries by partition: an index of byte ranges into the replica's bytes, in
//     log order, per partition. When the map is there before a replica is read, checking
//     and splitting are one pass.
//   - get_pieces() names one (segment, partition)'s entries where they lie, for a reply
//     sent without a copy.
//
// Memory: a replica's bytes are held once (the file's blocks as read, in a buffer of the
// backup's pool when one is free, or the RAM source's
// vector moved in), plus 8 bytes per run of consecutive entries of one partition. Nothing
// is freed before the object is destroyed: a recovery master that fails is replaced by
// another that asks for the same data. A replica's bytes may outlive the object, held by
// a reply not sent yet (get_pieces' keep); its buffer goes back to the pool after.
//
// Owner: BackupService. Threads: every public method may be called from any one thread
// (the backup's dispatch thread) while the object's own thread reads and splits; the
// destructor stops that thread (waiting for reads in flight) and joins it.
// Invariants:
//   1. A replica is served only after all of its certified bytes checked out against the
//      certificate; bytes past the certificate (a torn tail) are never read or served.
//   2. A replica's bytes never change once read, and never move: the split's ranges and
//      get_pieces() read them without the thread's help.
//   3. The partition map, once accepted, never changes (another map is kBadRequest).
//   4. At most kRingDepth reads are in flight, each at most kReadChunkBytes.
//   5. A replica is read at most once; one not admitted (a secondary nobody asked for)
//      is never read.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "backup/buffer_pool.h"
#include "common/result.h"
#include "common/wire_format.h"

namespace ramkv::backup {

// One replica of the crashed master that this backup holds, as BackupService knows it.
// Exactly one of `path` and `bytes` holds its segment bytes.
struct RecoverySource {
  // master, segment, epoch, certificate bytes, closed, scan status, found_on_disk. A
  // replica whose status is not kReplicaOk is listed but never read or served.
  wire::ReplicaEntry entry{};
  // The checksum of the certificate whose length is entry.certificate_bytes (the entry
  // carries only the length). The bytes are checked against this certificate.
  uint32_t certificate_checksum = 0;
  // Its replica file (backup/replica_file.h format); the file may hold more than the
  // certificate covers.
  std::string path{};
  // Or, with an empty path, its bytes from RAM (an open replica in buffered mode is held
  // only in its buffer): at least entry.certificate_bytes of them, from the start of
  // `buffer` when it is not empty (one of the backup's pool, given back to it at the
  // end: its pages touched long ago, where fresh ones would fault during the recovery),
  // else of `bytes`. Moved in, not copied.
  AlignedBuffer buffer{};
  std::vector<std::byte> bytes{};
};

class RecoverySegments {
 public:
  static constexpr uint32_t kRingDepth = 32;
  static constexpr uint32_t kReadChunkBytes = 1u << 20;

  // Reads the digest replica's first entries, then starts the thread that reads, checks
  // and splits the sources (all at once, or with `defer_reads` as the partition map says:
  // see above). Every source must be of `master_id`, one per segment. `pool`: the
  // backup's buffers (buffer_pool.h), which reads of files take first and get back when
  // this object is destroyed; null, or none free: a read allocates its own.
  RecoverySegments(uint64_t master_id, uint64_t recovery_id, std::vector<RecoverySource> sources,
                   bool defer_reads = false, std::shared_ptr<BufferPool> pool = nullptr);
  ~RecoverySegments();  // stops the thread and joins it
  RecoverySegments(const RecoverySegments&) = delete;
  RecoverySegments& operator=(const RecoverySegments&) = delete;

  uint64_t master_id() const { return master_id_; }
  uint64_t recovery_id() const { return recovery_id_; }

  // The body of the reply to `backup start reading data`: StartReadingDataResponse, then
  // every replica (ReplicaEntry, in segment order), the digest (u64 segment ids) and the
  // table statistics (TableStatWire). The digest, safe version and statistics come from
  // the replica with the highest segment id that has a digest, as read by the
  // constructor (entries whose own checksums it checked; if the full check later finds
  // that replica bad, it is listed so, and the digest stays). A replica's status is the
  // scan's, or kReplicaCorrupt/kReplicaTorn once this object found its bytes bad (or its
  // file unreadable): a later call may list more replicas as unusable, nothing else
  // changes.
  std::vector<std::byte> start_response() const;

  // `backup start partitioning`. kBadRequest for a malformed map (a range with end <
  // start, ranges of one table that overlap) or for a map other than the one already
  // accepted; kOk for the same map again. An empty map is accepted (nothing is served).
  // `primaries`: the segment ids of this backup's primary replicas (ids it holds no
  // replica of are ignored); nullopt: every replica is primary. Only with `defer_reads`
  // does it matter: the primaries are then queued for reading (again: nothing more).
  Status start_partitioning(std::span<const wire::PartitionTablet> map,
                            std::optional<std::span<const uint64_t>> primaries = std::nullopt);

  // `backup get recovery data`: *head is the response's fixed part (RecoveryDataResponse),
  // *pieces the segment's object and tombstone entries of the partition, whole and in log
  // order, as runs where they lie in the replica's bytes (head.entry_bytes in all), which
  // stay valid and unchanged while this object lives (invariant 2): a reply sends them
  // without a copy. Statuses:
  //   kBadRequest  no replica of that segment here, or a partition id not in the map;
  //   kCorrupt     the replica is torn or corrupt (listed so by the scan or found so here);
  //   kIoError     its file could not be read;
  //   kRetry       the map has not arrived, or the replica is not read and split yet (a
  //                secondary not read yet is queued for reading, first in line).
  // Changed only on kOk. *keep (when asked for) holds the replica's bytes, and so the
  // pieces, valid past this object's end: a reply a socket did not take whole waits in
  // its connection's queue holding it, and only that replica's buffer waits with it.
  Status get_pieces(uint64_t segment_id, uint32_t partition_id, wire::RecoveryDataResponse* head,
                    std::vector<std::span<const std::byte>>* pieces,
                    std::shared_ptr<const void>* keep = nullptr) const;

  // For stats: bytes read from disk (replica header blocks included) or taken from RAM so
  // far, and the time the reads took, from the first one's start to the last one's end
  // (a file's read ends when the thread collects its last completion).
  uint64_t bytes_read() const;
  uint64_t read_ns() const;
  // Replicas admitted for reading (see above) still to read, check or (once the map is
  // known) split; 0 when all of them are settled (usable or not). For tests and logs.
  size_t replicas_pending() const;
  // Replicas read (or being read) so far, whether primary or asked for. For tests.
  size_t replicas_admitted() const;

 private:
  struct Bytes;
  struct Replica;
  struct PartitionMap;
  class Reader;

  // The constructor's synchronous part: digest, safe version and table stats.
  void read_digest();
  // Records the outcome of reading or checking replica `index` (not kOk).
  void fail(size_t index, Status why, uint8_t listed_as);
  // Queues replica `index` for the thread, unless it is already (or failed). `urgent`: a
  // recovery master waits for it; it goes first. Caller holds mutex_ and notifies wake_.
  void admit_locked(size_t index, bool urgent) const;
  void note_read(uint64_t bytes, uint64_t start_ns, uint64_t end_ns);
  // The thread's body.
  void run();
  std::optional<size_t> find(uint64_t segment_id) const;

  const uint64_t master_id_;
  const uint64_t recovery_id_;

  const bool defer_reads_;
  const std::shared_ptr<BufferPool> pool_;  // read buffers come from it first; null: none

  mutable std::mutex mutex_;
  mutable std::condition_variable wake_;  // the map arrived, a replica was admitted, or stop
  // In segment order. The vector never changes size after the constructor; each
  // replica's fields say which thread may touch them (recovery_segments.cc, Replica).
  std::vector<std::unique_ptr<Replica>> replicas_;
  std::shared_ptr<const PartitionMap> map_;  // guarded by mutex_; immutable once set
  // Replicas admitted for reading that the thread has not taken yet: (index, urgent).
  mutable std::deque<std::pair<size_t, bool>> admitted_;  // guarded by mutex_
  bool stop_ = false;                                     // guarded by mutex_
  uint64_t bytes_read_ = 0;                               // guarded by mutex_
  uint64_t first_read_start_ns_ = 0;                      // guarded by mutex_; 0: none yet
  uint64_t last_read_end_ns_ = 0;                         // guarded by mutex_

  // From the digest replica (the constructor; constant afterwards).
  wire::StartReadingDataResponse digest_header_{};
  std::vector<uint64_t> digest_;
  std::vector<wire::TableStatWire> table_stats_;

  std::thread thread_;  // last: started once everything above exists, joined first
};

}  // namespace ramkv::backup
