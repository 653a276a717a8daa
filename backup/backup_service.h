// BackupService: the backup half of `ramkv-server --backup`. It holds replicas of
// segments for many masters: an open replica lives in a RAM buffer from a bounded pool and
// is appended to as its master replicates; closing it writes it to its replica file
// (backup/replica_file.h) through io_uring with O_DIRECT, and the buffer goes back to the
// pool. Opcodes and their replies: docs/rpc.md, Backup.
//
// Durability (Options::durability):
//   kBuffered  a write is acknowledged once its bytes are in the buffer (RAMCloud's
//              default: the buffers are assumed to survive power loss), a close too: it
//              then writes and fdatasyncs the file in the background, and the buffer goes
//              back to the pool once that is done. A close whose write fails (a full
//              disk) keeps its buffer, so its bytes stay as durable as every other
//              buffered write's, and is tried again (after 1 s, doubling to 32 s) until it
//              succeeds or the replica is freed; meanwhile its buffer counts against max_buffers,
//              so a backup whose disk stays full ends up refusing opens (kRetry) and its masters
//              make their replicas elsewhere. A close used to wait for its fdatasync, and on a disk
//              shared by busy backups that could take seconds, close to a master's RPC timeout
//              (which loses the replica).
//   kDisk      every write is written to the replica file and fdatasync'ed before it is
//              acknowledged.
//
// Writing to disk is a state machine advanced by the dispatch loop; handle() never waits
// for the disk. Nor does it create files: a replica's file is created through the ring
// (begin_open) when its first flush needs it, and the flush's chain starts on the open's
// completion, since creating a file can wait behind the filesystem's journal (other
// replicas' fdatasyncs), and a dispatch thread that waits there stops serving every RPC
// meanwhile (it did, 12% of the time, while recovery masters closed their replicas). A write that
// must reach it (every write in kDisk, a close in both modes) is checked and staged in the
// replica's buffer at once, so the writes after it are checked against it, and its reply is
// deferred (Reply::defer). The service is one of the loop's tasks (attach(), LoopTask): after each
// batch of requests, run() starts one flush per replica with staged writes, covering all of them
// (group commit: a batch's writes to a replica share one fdatasync), as one linked io_uring chain:
// the new blocks, then the header block, then an fdatasync (IORING_FSYNC_DATASYNC). Each link
// starts only once the one before it completed in full, so the header is rewritten only once the
// blocks it certifies are in (a full disk leaves the old header true), and the fdatasync covers
// both. Completions wake the loop through the ring's eventfd (wait_fd()); once a chain's
// last one is in, run() answers every write the flush covered. A short write resumes
// where it stopped with a new chain, so that the error which stopped it decides the
// status (ENOSPC: kNoSpace).
//
// Closes wait while a recovery is read (kBuffered): a backup that serves a crashed
// master's replicas (start_reading) starts no new flush for Options::recovery_flush_hold_ns
// from then, or until the recovery is over (free_master), or until fewer than a quarter of
// max_buffers are free. The disk then goes to the recovery's reads, and the CPUs to its
// replay and replication: writing a recovery's re-replicated segments while it ran cost
// about a sixth of its speed here (docs/recovery.md). Buffered closes are acknowledged
// from RAM, so no master waits for them.
//
// One flush per replica is in flight at a time (flushes of different replicas overlap):
// writes that arrive meanwhile are staged behind it and go in the next flush once it has
// succeeded. If it fails, its writes and every write staged behind it (they built on it)
// are answered with its status (kNoSpace, kIoError), and the replica's staged state goes
// back to its durable one. A resent write is answered at once only if what it asks for
// is durable; if it is only staged, its reply waits for the flush that makes it durable
// (and fails with it). A free of a replica with writes staged or in flight waits for them
// (writes to it meanwhile get kRetry), then forgets it; its file is deleted by the
// remover thread (an unlink takes milliseconds here, and a cleaner's frees would stall
// every request behind them). A file left by a crash before its unlink is found at
// restart and collected like any replica found on disk. Operations in flight are
// bounded by Options::ring_depth (a flush that finds no room waits for completions),
// deferred replies by Options::max_deferred_replies (beyond it, writes and frees get
// kRetry).
//
// On create() the service scans its data directory (scan_replicas) and keeps every
// replica it finds as known: list replicas reports them, torn and corrupt ones flagged.
// Replicas found on disk are read-only: a write to one is kBadRequest (their master has
// already re-replicated elsewhere); free deletes them.
//
// Resent writes: a master resends a write after a timeout or a reconnect, so a write that
// asks for nothing new is acknowledged again without change. That is a write whose bytes
// lie within the bytes already held and match them (checked while the replica still has
// its buffer; a closed one has none once written), whose epoch and certificate are no
// newer than those held (an equal certificate length with the same checksum), and whose
// close flag, if set, names a replica already closed at exactly this length. A resent open
// (open = 1, offset 0) of an existing replica is such a write. A write that starts within
// the held bytes and runs past them appends only the new tail, once the overlap has
// matched. docs/rpc.md, Backup.
//
// Zombie fencing: fence_master() marks a master the coordinator declared crashed; its
// later writes and frees are refused with kFenced, so a zombie cannot change the replicas
// recovery is about to read.
//
// One-sided mirroring (RDMA; docs/rdma.md): an open with remote = 1, in kBuffered, on a
// transport that can expose memory, gets its replica's buffer exposed for RDMA WRITEs
// (wire::BackupWriteResponse says where). The master then appends without this process
// taking part: the bytes at data offset, then a wire::RemoteCertificate in the slot at the
// start of the header block (the header is written there only at close, once the region
// is withdrawn). A WRITE's completion at the master means the bytes are in this buffer:
// acknowledged, as a kBuffered write is. The service takes the slot in (absorb()) before
// it looks at the replica: any write or free of it, list(), start_reading. Bytes within
// one WRITE may land in any order, and a slot may be read torn while the next one lands,
// so a slot counts only when its own check matches and the certificate it carries proves
// the bytes (every entry's checksum and the chained header checksum); otherwise the
// replica stays as it was (and a later RPC that builds on the unproven bytes is refused
// as a gap: the master makes the replica elsewhere). The region is withdrawn before the
// replica is closed (a close is an RPC), freed, or its master fenced (fence_master: from
// then on the zombie's WRITEs fail at its adapter, so what recovery reads is final), then
// absorbed one last time.
//
// Writes received in place (attach(), ServerTransport::set_placer): the body of a large
// write that appends at exactly the length a replica holds is received by the transport
// straight into the replica's buffer, past the held bytes, instead of into a receive
// buffer it would be copied out of (for a recovery's re-replication, 2 GiB of copies per
// GiB recovered). The write is checked when it has all arrived, as any other; bytes past
// the held length are never trusted (invariant 2 holds: nothing held changes). While one
// is being received, other writes to that replica get kRetry (a master sends a replica's
// writes on one connection, in order: only a resend on a new connection meets this), no
// flush of it starts (a flush zeroes the block the new bytes start in), and a buffer
// released meanwhile (the replica freed) is parked, not reused, until the transport is
// done with it.
//
// Owner: the server's dispatch thread, which calls handle() and run(). Not thread-safe.
// Invariants:
//   1. At most max_buffers replicas hold a buffer (open ones, and kBuffered closed ones
//      until their file is written); beyond that, opens get kRetry.
//   2. A replica's held bytes only grow and never change: a write may overlap them only
//      with the same bytes, and appends only what lies past them (no gap). Its epoch and
//      certificate never go down, and the certificate never claims more than the held
//      bytes. This is true of its durable state (what has been acknowledged) and of its
//      staged state (what new writes are checked against), which extends the durable one
//      and equals it when nothing is staged or in flight; only a failed flush takes the
//      staged state back, to the durable one.
//   3. A closed replica is never written again, in memory or on disk.
//   4. A failed write (kNoSpace, kIoError) leaves the replica as it was before it: its
//      durable state (and file bytes) advance only when a flush succeeds. A write never
//      acknowledged (an open whose flush failed) leaves nothing, its file included.
//   5. A write is acknowledged only once everything it asks for is durable (in the buffer
//      for kBuffered writes, fdatasync'ed for kDisk): resends included. A kBuffered close
//      is durable once staged, and its flush failing changes nothing of that: the flush is
//      tried again later.
//   6. A replica with a flush in flight keeps its buffer, its file and its map node (the
//      ring's user_data points at the node) until the flush's last completion is in.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "backup/buffer_pool.h"
#include "backup/file_remover.h"
#include "backup/recovery_segments.h"
#include "backup/uring.h"
#include "common/clock.h"
#include "common/log.h"
#include "common/result.h"
#include "common/transport.h"
#include "common/wire_format.h"

namespace ramkv::backup {

enum class Durability : uint8_t { kBuffered, kDisk };

class BackupService final : public LoopTask {
 public:
  struct Options {
    std::string data_dir;
    uint32_t segment_bytes = 8u << 20;  // largest replica; the size of each pool buffer
    uint32_t max_buffers = 64;          // open replicas held in RAM at once
    // Buffers allocated (and their pages touched) at start and kept for reuse, for open
    // replicas and recovery reads (backup/buffer_pool.h). At least max_buffers are kept.
    uint32_t buffers_at_start = 0;
    Durability durability = Durability::kBuffered;
    uint32_t ring_depth = 64;  // io_uring operations in flight (at least 3: one flush)
    // Bytes of flushes started and not finished, beyond one flush: more wait their turn.
    // The device's queue stays short, so that other synchronous writes on it (the
    // coordinator's commits, another process's fsync) do not wait behind hundreds of
    // megabytes: with no bound, a recovery's re-replication left 0.2-0.5 s between a
    // recovery master's report and the commit that served its tablets.
    uint64_t max_flush_bytes = 16u << 20;
    uint32_t max_deferred_replies = 4096;  // writes and frees waiting for the disk
    // kBuffered: how long after a recovery's start_reading no new flush starts (see
    // "Closes wait while a recovery is read"); 0: flushes never wait for recoveries.
    uint64_t recovery_flush_hold_ns = 10'000'000'000;
    const Clock* clock = &SystemClock::instance();  // for the hold and flush retries
  };

  // How long an acknowledged close whose flush failed waits before it is tried again.
  static constexpr uint64_t kFlushRetryNs = 1'000'000'000;
  static constexpr uint64_t kMaxFlushRetryNs = 32'000'000'000;

  // kInvalidArgument for an empty data_dir or a zero size; kUnavailable without
  // io_uring; kIoError when the data directory cannot be scanned.
  static Result<std::unique_ptr<BackupService>> create(const Options& options);
  ~BackupService() override;
  BackupService(const BackupService&) = delete;
  BackupService& operator=(const BackupService&) = delete;

  // Answers deferred replies through `transport` and adds the service as its loop task.
  // Before the first handle() that must defer; `transport` must outlive the service's use.
  void attach(ServerTransport& transport);

  // Serves one backup opcode; other opcodes get kBadRequest. A write that must reach the
  // disk, or a free that must wait for one, defers `reply`: run() answers it.
  void handle(const wire::MessageHeader& request, std::span<const std::byte> body, Reply& reply);

  // LoopTask: the ring's eventfd. run() starts the flushes staged writes wait for,
  // collects completions and sends the replies they release; it never blocks.
  int wait_fd() const override { return ring_->event_fd(); }
  uint64_t run() override;

  // At a server's stop, after its loop has ended: writes the closed replicas held in RAM
  // (kBuffered closes waiting for a recovery or behind the reply) to disk, for at most
  // `timeout_ns`; those whose last try failed are not tried again. Returns how many are
  // left unwritten.
  size_t write_held(uint64_t timeout_ns);

  // The coordinator declared `master_id` crashed: refuse its writes and frees from now on
  // (and withdraw its replicas' one-sided regions, so none of its RDMA WRITEs lands).
  void fence_master(uint64_t master_id);
  // The server list shows `current_id` (index | generation << 32): every older generation
  // of that index was replaced, so it is fenced too.
  void fence_generations_below(uint64_t current_id);
  bool is_fenced(uint64_t master_id) const {
    if (fenced_.contains(master_id)) return true;
    auto it = newest_generation_.find(static_cast<uint32_t>(master_id));
    return it != newest_generation_.end() && static_cast<uint32_t>(master_id >> 32) < it->second;
  }

  // The replicas held, in (master, segment) order, with their durable state (a replica
  // whose open is not yet durable is left out); with `found_on_disk_only`, only those
  // the scan at start found (what a restarted backup reports to the coordinator).
  std::vector<wire::ReplicaEntry> list(bool found_on_disk_only = false);

  // The master's recovery is over (the server list shows it removed): its replicas and
  // any recovery state of it go.
  void free_master(uint64_t master_id);
  // `backup get recovery data` for a caller in this process (a recovery master on the
  // same server, master/recovery_task.h): the status and body the RPC would answer.
  // Its fixed part and its entries where they lie (RecoverySegments::get_pieces): valid
  // until the recovery is dropped, which only the dispatch thread does, or for as long
  // as *keep (when asked for) is held.
  Status recovery_data(const wire::GetRecoveryDataRequest& request,
                       wire::RecoveryDataResponse* head,
                       std::vector<std::span<const std::byte>>* pieces,
                       std::shared_ptr<const void>* keep = nullptr);
  // Crash recovery reads (docs/recovery.md): bytes read for recoveries since start, and
  // the time those reads took.
  uint64_t recovery_bytes_read() const;
  uint64_t recovery_read_ns() const;

  // For tests and stats.
  // Blocks until the files of replicas freed so far are deleted.
  void wait_for_removals() { remover_.drain(); }
  size_t replica_count() const { return replicas_.size(); }
  size_t buffers_in_use() const { return buffers_in_use_; }
  // Buffers kept free for reuse (open replicas and recovery reads take them first).
  size_t buffers_free() const { return pool_->free_count(); }
  size_t buffers_allocated_late() const { return pool_->allocated_late(); }
  size_t deferred_replies() const { return deferred_replies_; }
  uint32_t operations_in_flight() const { return ring_->in_flight(); }
  uint64_t flushes() const { return flushes_; }                    // started so far
  uint64_t flush_bytes_in_flight() const { return flush_bytes_; }  // Options::max_flush_bytes
  size_t regions_exposed() const { return regions_exposed_; }      // one-sided, now
  uint64_t remote_appends() const { return remote_appends_; }      // slots absorbed so far
  uint64_t bytes_placed() const { return bytes_placed_; }          // received in place so far
  // Flushes that failed after their close was acknowledged from RAM (tried again later).
  uint64_t flush_failures() const { return flush_failures_; }
  // Whether new flushes wait for a recovery now (see "Closes wait while a recovery is read").
  bool holding_flushes() const;
  size_t flushes_queued() const { return to_flush_.size(); }

 private:
  // What a replica holds (or will, once its staged writes are durable).
  struct State {
    uint64_t epoch = 0;
    uint32_t held_bytes = 0;  // segment bytes
    uint32_t certificate_bytes = 0;
    uint32_t certificate_checksum = 0;
    bool closed = false;
  };
  // A deferred reply: a write's, sent once durable_seq reaches `seq`; a free's (kFreeSeq),
  // once the replica is idle.
  struct Waiter {
    ReplyToken token;
    uint64_t seq = 0;
  };
  // The operations of one io_uring chain: [data write] -> [header write] -> fdatasync.
  enum Op : uint64_t { kData = 0, kHeader = 1, kSync = 2, kOpen = 3 };
  // One flush: makes the staged state of `seq` durable, in one or more chains (a short
  // write resumes from next_offset).
  struct Flush {
    uint64_t seq = 0;
    State state;
    bool created = false;        // the file did not exist before: its first chain has the header
    size_t next_offset = 0;      // file offset of the blocks still to write
    size_t end_offset = 0;       // file offset where they end (block-aligned)
    uint64_t counted_bytes = 0;  // end - next at the start: in flush_bytes_ until it ends
    size_t data_bytes = 0;       // the chain in flight: its data write (0: none)
    bool header = false;         // ... whether it has a header write
    uint32_t ops_in_flight = 0;
    int32_t results[3] = {};  // per Op: bytes, or -errno
  };
  // An open file descriptor, closed when dropped.
  class File {
   public:
    File() = default;
    explicit File(int fd) : fd_(fd) {}
    ~File();
    File(File&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
    File& operator=(File&& other) noexcept;
    int get() const { return fd_; }

   private:
    int fd_ = -1;
  };
  struct Replica {
    State staged;   // with the writes staged or in flight: what new writes are checked against
    State durable;  // acknowledged: in the buffer (kBuffered) or fdatasync'ed
    uint64_t staged_seq = 0;   // counts the writes that changed the staged state
    uint64_t durable_seq = 0;  // the staged_seq the durable state is; 0: nothing acknowledged
    uint32_t file_bytes = 0;   // segment bytes durable in the file
    bool has_file = false;
    bool found_on_disk = false;  // by the scan in create(): never written again
    uint8_t scan_status = wire::kReplicaOk;
    bool flushing = false;      // a flush has started and not finished
    bool queued = false;        // in to_flush_: a flush (or its next chain) waits to start
    bool free_pending = false;  // a free waits for the flush; writes get kRetry
    Flush flush;
    std::vector<Waiter> waiters;  // in seq order, frees last
    File file;                    // open from the first flush until closed or freed
    // The file is being created through the ring (begin_open), off the dispatch thread.
    // `open_path` lives until the completion; a failure waits in `open_failure` for the
    // flush that asked for the file, which fails with it.
    bool opening = false;
    std::string open_path;
    Status open_failure = Status::kOk;
    // Header block, then segment bytes; empty once closed or for replicas found on disk.
    AlignedBuffer buffer;
    // One-sided appends (see "One-sided mirroring" above): the buffer is exposed to the
    // master's RDMA WRITEs while this is set; the slot is the header block's first bytes.
    std::optional<RemoteRegion> remote;
    uint64_t remote_sequence = 0;  // of the last RemoteCertificate absorbed
    bool placing = false;          // a write's body is being received into the buffer
    // kBuffered: its acknowledged close's flush failed; the next starts no sooner
    // (kFlushRetryNs after the first failure, doubling up to kMaxFlushRetryNs). Errors of
    // the tries after the first are logged at debug level.
    uint64_t flush_retry_ns = 0;
    uint32_t flush_failures = 0;  // in a row
  };
  using Key = std::pair<uint64_t, uint64_t>;  // master id, segment id
  using Entry = std::map<Key, Replica>::value_type;
  static constexpr uint64_t kFreeSeq = UINT64_MAX;

  BackupService(const Options& options, std::unique_ptr<Uring> ring);
  Status load_existing();
  Status write(std::span<const std::byte> body, Reply& reply);
  // Stages a write that asks for something new (more bytes, a newer certificate or epoch,
  // the close) in the replica at `it`; `created` when this write's open made it.
  Status append(std::map<Key, Replica>::iterator it, const wire::BackupWriteRequest& req,
                std::span<const std::byte> data, bool created, Reply& reply);
  // Whether `data`, to be written at `offset`, equals the bytes the replica has staged
  // where the two overlap (true when it has no buffer to compare with).
  static bool matches_held(const Replica& replica, uint32_t offset,
                           std::span<const std::byte> data);
  // Whether `req` (ending at `end`) is a resend that asks for nothing beyond `held`; see
  // the class comment. Its overlap with the held bytes must already have matched.
  static bool is_resend(const State& held, const wire::BackupWriteRequest& req, uint64_t end);
  Status free_replica(std::span<const std::byte> body, Reply& reply);
  // Forgets the replica and queues its file for the remover.
  void remove(std::map<Key, Replica>::iterator it);
  Status list_replicas(std::span<const std::byte> body, Reply& reply);
  // Recovery (docs/recovery.md): `backup start reading data` reads the crashed master's
  // replicas into a RecoverySegments; partitioning and data requests are answered by it.
  Status start_reading(std::span<const std::byte> body, Reply& reply);
  Status start_partitioning(std::span<const std::byte> body);
  Status get_recovery_data(std::span<const std::byte> body, Reply& reply);
  using RecoveryLookup = RecoverySegments*;
  RecoveryLookup find_recovery(uint64_t master_id, uint64_t recovery_id) const;

  // Defers `reply` until the replica's durable_seq reaches `seq` (kFreeSeq: until idle).
  void defer(Replica& replica, uint64_t seq, Reply& reply);
  // Sends the deferred replies of writes with seq <= `up_to` with `status`.
  void answer_writes(Replica& replica, uint64_t up_to, Status status);
  void answer(const ReplyToken& token, Status status);
  // Puts the replica in to_flush_ (if not already).
  void queue_flush(Entry& entry);
  // Takes a queued flush that has not started back out of to_flush_ when it only moves
  // acknowledged bytes to the disk (a kBuffered close): the replica is being freed.
  void drop_queued_flush(Replica& replica);
  // No flush started, queued or needed, so nothing refers to the replica but its node.
  static bool idle(const Replica& r) {
    return !r.flushing && !r.queued && r.staged_seq == r.durable_seq;
  }
  // Idle, and no operation of the ring names it: it may be removed.
  static bool removable(const Replica& r) { return idle(r) && !r.opening; }
  // Starts creating a replica's file through the ring, for its first flush (start_chain
  // opens it itself when this could not start: no room, no directory).
  void begin_open(Entry& entry);
  // Creates <data-dir>/<master id> the first time a replica of that master needs it; a
  // failure is logged at `level` (a retried flush's quietly).
  Status make_master_dir(uint64_t master_id, LogLevel level = LogLevel::kError);
  // A begin_open's completion.
  void complete_open(Entry& entry, int32_t result);
  // Starts the flushes (or next chains) in to_flush_ that the ring has room for.
  void start_flushes();
  // Queues the next chain of the replica's flush, starting the flush (and opening the
  // file) first if none is under way. kRetry: no room in the ring yet; nothing changed.
  // `hold`: new flushes wait (holding_flushes at `now`).
  Status start_chain(Entry& entry, uint64_t now, bool hold);
  // Whether a recovery read here started less than recovery_flush_hold_ns ago (kBuffered).
  bool recovery_hold_at(uint64_t now) const;
  // ... and a quarter of the buffers is free: new flushes wait.
  bool holding_flushes_at(uint64_t now) const;
  Status open_file(const Key& key, Replica& replica);
  // A replica whose flushes keep failing: its errors after the first are logged quietly.
  static bool quiet(const Replica& r) { return r.flush_failures > 0; }
  static LogLevel error_level(const Replica& r) {
    return quiet(r) ? LogLevel::kDebug : LogLevel::kError;
  }
  // One completion of the chain in flight; the last one decides the flush.
  void complete(const Uring::Completion& completion);
  // How the chain that just completed went: kOk (the flush is done), kRetry (a short
  // write: the next chain resumes it), or the failure.
  Status chain_status(Entry& entry);
  // Ends the replica's flush with `status`: acknowledges or fails the writes it covers
  // (and, on failure, those staged behind it), then a pending free or the next flush.
  void finish_flush(Entry& entry, Status status);
  // The replica with a free pending is idle: removes it and answers the frees.
  void complete_free(std::map<Key, Replica>::iterator it);
  // Drops a replica from memory, its buffer back to the pool (not its file).
  void forget(std::map<Key, Replica>::iterator it);
  // One-sided mirroring: exposes the buffer of a replica just opened (kBuffered only)
  // and puts where it lies in `reply`; false if the transport cannot (TCP) or refused.
  bool expose(Replica& replica, Reply& reply);
  // Takes in what the master's one-sided appends left in the slot: the held bytes and
  // certificate grow to what it says once it is whole and the certificate proves the
  // bytes (SegmentIterator); otherwise nothing changes (logged).
  void absorb(const Key& key, Replica& replica);
  // Ends the exposure, then absorbs what landed before it: final from then on.
  void withdraw(const Key& key, Replica& replica);
  Result<AlignedBuffer> acquire_buffer();
  void release_buffer(AlignedBuffer buffer);
  // The transport's placer: where the rest of a write's body goes (see "Writes received
  // in place"), or nowhere.
  Placement place(const wire::MessageHeader& request, std::span<const std::byte> prefix);
  // The transport is done with the placement into the buffer at `base`.
  void end_placement(const Key& key, const std::byte* base);
  // The buffer place() took for an open whose body `data` (at `offset`) was received into
  // it; empty if it was not.
  AlignedBuffer take_placed(std::span<const std::byte> data, uint32_t offset);

  // Teardown runs in reverse: ring_ (declared last) goes first, waiting for the operations
  // still in flight, while the buffers and files they use are still alive.
  Options options_;
  ServerTransport* transport_ = nullptr;  // attach(); sends the deferred replies
  std::map<Key, Replica> replicas_;       // a node stays put while a flush points at it
  std::vector<Entry*> to_flush_;          // at most one entry per replica with a buffer
  std::vector<Uring::Completion> done_;   // reused by run()
  size_t deferred_replies_ = 0;           // at most max_deferred_replies
  uint64_t flushes_ = 0;
  uint64_t flush_bytes_ = 0;  // of the flushes started and not finished (counted_bytes)
  size_t regions_exposed_ = 0;
  uint64_t remote_appends_ = 0;
  uint64_t bytes_placed_ = 0;
  uint64_t flush_failures_ = 0;
  // Crashed masters being recovered -> when their first recovery here started: new
  // flushes wait for recovery_flush_hold_ns from then (a recovery retried with a new id
  // does not start the time again), while the master is not freed.
  std::map<uint64_t, uint64_t> hold_started_ns_;
  bool logged_hold_ = false;  // "closes wait for the recovery" was logged for this hold
  std::vector<std::span<const std::byte>> pieces_;  // reused by get_recovery_data
  // Placements under way, by buffer: the buffer taken for an open (counted in
  // buffers_in_use_ until the write takes it over), or one released meanwhile (parked).
  struct Placed {
    AlignedBuffer buffer;
    bool counted = false;
  };
  std::map<const std::byte*, Placed> placements_;
  // Placements hold a weak reference: one ended after the service is gone does nothing.
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  bool event_may_be_set_ = false;  // completions were collected after the eventfd's clear
  std::set<uint64_t> fenced_;
  std::set<uint64_t> master_dirs_;                  // masters whose replica directory exists
  std::map<uint32_t, uint32_t> newest_generation_;  // server index -> newest generation
  // Shared with the recoveries' reading threads; outlives recoveries_ (declared first).
  std::shared_ptr<BufferPool> pool_;
  size_t buffers_in_use_ = 0;  // by replicas: at most max_buffers (invariant 1)
  size_t peak_buffers_in_use_ = 0;
  uint64_t opens_refused_for_buffers_ = 0;
  // Crashed masters being recovered: master id -> what we read of it. Its reads run on
  // its own thread, from copies and files (into buffers of pool_, given back when it is
  // destroyed), never from the replicas' buffers.
  std::map<uint64_t, std::unique_ptr<RecoverySegments>> recoveries_;
  uint64_t past_recovery_bytes_ = 0;  // of recoveries dropped since
  uint64_t past_recovery_ns_ = 0;
  std::unique_ptr<Uring> ring_;
  // Deletes freed replicas' files and a removed master's (free_master) off the dispatch
  // thread; a replica file is claimed from it before it is created. Last: destroyed
  // first, finishing its deletions.
  FileRemover remover_;
};

}  // namespace ramkv::backup
