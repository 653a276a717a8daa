// BackupService: the backup half of `ramkv-server --backup`. It holds replicas of
// segments for many masters: an open replica lives in a RAM buffer from a bounded pool and
// is appended to as its master replicates; closing it writes it to its replica file
// (backup/replica_file.h) through io_uring with O_DIRECT, and the buffer goes back to the
// pool. Opcodes and their replies: docs/rpc.md, Backup.
//
// Durability (Options::durability):
//   kBuffered  a write is acknowledged once its bytes are in the buffer (RAMCloud's
//              default: the buffers are assumed to survive power loss). Close writes
//              and fdatasyncs the file before acknowledging, since the buffer is freed.
//   kDisk      every write is written to the replica file and fdatasync'ed before it is
//              acknowledged. For now this happens synchronously inside handle(): the
//              dispatch thread waits for the disk. (A later step makes it a state
//              machine advanced by the loop, with the reply sent on completion.)
//
// On create() the service scans its data directory (scan_replicas) and keeps every
// replica it finds as known: list replicas reports them, torn and corrupt ones flagged.
// Replicas found on disk are read-only: a write to one is kBadRequest (their master has
// already re-replicated elsewhere); free deletes them.
//
// Resent writes: a master resends a write after a timeout or a reconnect, so a write that
// asks for nothing new is acknowledged again without change. That is a write whose bytes
// lie within the bytes already held and match them (checked while the replica still has
// its buffer; a closed one has none), whose epoch and certificate are no newer than those
// held (an equal certificate length with the same checksum), and whose close flag, if
// set, names a replica already closed at exactly this length. A resent open (open = 1,
// offset 0) of an existing replica is such a write. A write that starts within the held
// bytes and runs past them appends only the new tail, once the overlap has matched.
// docs/rpc.md, Backup.
//
// Zombie fencing: fence_master() marks a master the coordinator declared crashed; its
// later writes and frees are refused with kFenced, so a zombie cannot change the replicas
// recovery is about to read.
//
// Owner: the server's dispatch thread. Not thread-safe.
// Invariants:
//   1. At most max_buffers open replicas hold a buffer; beyond that, opens get kRetry.
//   2. A replica's held bytes only grow and never change: a write may overlap them only
//      with the same bytes, and appends only what lies past them (no gap). Its epoch and
//      certificate never go down, and the certificate never claims more than the held
//      bytes.
//   3. A closed replica is never written again, in memory or on disk.
//   4. A failed write (kNoSpace, kIoError) leaves the replica as it was before it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "backup/uring.h"
#include "common/result.h"
#include "common/transport.h"
#include "common/wire_format.h"

namespace ramkv::backup {

enum class Durability : uint8_t { kBuffered, kDisk };

class BackupService {
 public:
  struct Options {
    std::string data_dir;
    uint32_t segment_bytes = 8u << 20;  // largest replica; the size of each pool buffer
    uint32_t max_buffers = 64;          // open replicas held in RAM at once
    Durability durability = Durability::kBuffered;
    uint32_t ring_depth = 16;  // io_uring operations in flight
  };

  // kInvalidArgument for an empty data_dir or a zero size; kUnavailable without
  // io_uring; kIoError when the data directory cannot be scanned.
  static Result<std::unique_ptr<BackupService>> create(const Options& options);
  BackupService(const BackupService&) = delete;
  BackupService& operator=(const BackupService&) = delete;

  // Serves one backup opcode; other opcodes get kBadRequest.
  void handle(const wire::MessageHeader& request, std::span<const std::byte> body, Reply& reply);

  // The coordinator declared `master_id` crashed: refuse its writes and frees from now on.
  void fence_master(uint64_t master_id) { fenced_.insert(master_id); }
  // The server list shows `current_id` (index | generation << 32): every older generation
  // of that index was replaced, so it is fenced too.
  void fence_generations_below(uint64_t current_id) {
    uint32_t& newest = newest_generation_[static_cast<uint32_t>(current_id)];
    newest = std::max(newest, static_cast<uint32_t>(current_id >> 32));
  }
  bool is_fenced(uint64_t master_id) const {
    if (fenced_.contains(master_id)) return true;
    auto it = newest_generation_.find(static_cast<uint32_t>(master_id));
    return it != newest_generation_.end() && static_cast<uint32_t>(master_id >> 32) < it->second;
  }

  // For tests and stats.
  size_t replica_count() const { return replicas_.size(); }
  size_t buffers_in_use() const { return buffers_allocated_ - free_buffers_.size(); }

 private:
  struct Replica {
    uint64_t epoch = 0;
    uint32_t held_bytes = 0;  // segment bytes received
    uint32_t file_bytes = 0;  // segment bytes already written to the file
    uint32_t certificate_bytes = 0;
    uint32_t certificate_checksum = 0;
    bool closed = false;
    bool has_file = false;
    bool found_on_disk = false;  // by the scan in create(): never written again
    uint8_t scan_status = wire::kReplicaOk;
    // Header block, then segment bytes; empty once closed or for replicas found on disk.
    AlignedBuffer buffer;
  };
  using Key = std::pair<uint64_t, uint64_t>;  // master id, segment id

  BackupService(const Options& options, std::unique_ptr<Uring> ring);
  Status load_existing();
  Status write(std::span<const std::byte> body);
  // Applies a write that asks for something new (more bytes, a newer certificate or epoch,
  // the close) to the replica at `it`; `created` when this write's open made it.
  Status append(std::map<Key, Replica>::iterator it, const wire::BackupWriteRequest& req,
                std::span<const std::byte> data, bool created);
  // Whether `data`, to be written at `offset`, equals the bytes the replica already holds
  // where the two overlap (true when it has no buffer to compare with).
  static bool matches_held(const Replica& replica, uint32_t offset,
                           std::span<const std::byte> data);
  // Whether `req` (ending at `end`) is a resend that asks for nothing new; see the class
  // comment. Its overlap with the held bytes must already have matched.
  static bool is_resend(const Replica& replica, const wire::BackupWriteRequest& req, uint64_t end);
  Status free_replica(std::span<const std::byte> body);
  Status list_replicas(std::span<const std::byte> body, Reply& reply);
  // Writes the replica's header block and unwritten bytes to its file, fdatasync'ed
  // when `sync`, with the header saying `closed`.
  Status write_file(const Key& key, Replica& replica, bool closed, bool sync);
  // Writes `blocks` (aligned) at `file_offset` of `fd` and waits until they are written,
  // a short write resumed. kNoSpace for a full disk, kIoError for other failures.
  Status write_blocks(int fd, std::span<const std::byte> blocks, size_t file_offset,
                      const std::string& path);
  // fdatasyncs `fd`: it covers the writes already completed.
  Status datasync(int fd, const std::string& path);
  // Waits for the operation tagged `op` (its user_data); its result (bytes, or -errno).
  Result<int32_t> wait_for(uint64_t op);
  // Drops a replica from memory, its buffer back to the pool (not its file).
  void forget(std::map<Key, Replica>::iterator it);
  Result<AlignedBuffer> acquire_buffer();
  void release_buffer(AlignedBuffer buffer);

  Options options_;
  std::unique_ptr<Uring> ring_;
  std::map<Key, Replica> replicas_;
  std::set<uint64_t> fenced_;
  std::map<uint32_t, uint32_t> newest_generation_;  // server index -> newest generation
  std::vector<AlignedBuffer> free_buffers_;
  size_t buffers_allocated_ = 0;
  uint64_t last_op_ = 0;  // tag of the latest io_uring operation
};

}  // namespace ramkv::backup
