// ReplicaManager: keeps R replicas of every segment of a master's log on backups of other
// servers, and holds back the replies to writes until what they wrote is on all R
// (DESIGN.md, Master and Backup; docs/rpc.md, Backup).
//
// It runs on the server's dispatch thread as the loop's task (transport.h, LoopTask):
// after each batch of requests it sends everything the batch appended to the head as
// one backup write per replica (group commit), with several writes in flight per
// replica (a connection delivers them in order, and the backup appends only at the
// length it holds). Replies come back through the same loop.
//
// Order, so that the backups always hold a log that recovery can prove complete:
//   1. Segments open on their backups in id order: one opens once every lower segment
//      other than the head is whole; the head (a new one) once every other segment is
//      whole, so its digest names only segments that are all there.
//   2. A former head is closed on its backups only once a newer head is durably open on
//      all of its backups (and its epoch recorded, see 4): recovery takes a closed
//      newest segment as proof that a newer head existed. A survivor of the cleaner (no
//      digest; named by no durable digest until the head after it is) closes once whole.
//      Together, 1 and 2 keep only a few replicas per master open on a backup even when
//      many segments wait to be replicated at once.
//   3. A write is acknowledged when its bytes are on all R replicas of the head and
//      every other segment of the log is wholly on its R replicas.
//   4. When a replica is lost (its backup crashed, filled up, or refused), a new one is
//      made on another backup from the master's memory. If the segment was still open,
//      its epoch goes up: the surviving replicas are told, and the new epoch is recorded
//      at the coordinator before anything more is acknowledged, so a stale open replica
//      is never used by recovery.
//   5. Replicas of segments that left the log (cleaned) are freed once the head whose
//      digest no longer names them is durable.
//   6. A backup that answers kFenced means the coordinator declared this master crashed:
//      the manager stops, and every held and later write is answered kFenced.
//   7. While fewer than R other servers run a backup (a small cluster after a crash), a
//      segment is replicated on all of them (at least one) and counts as durable there;
//      it gets back to R replicas as backups enlist. Said in the log both ways.
//   8. One-sided mirroring (RDMA, after use_log_memory()): a replica's open asks its backup
//      to expose the replica's buffer; where it does, later appends at the current epoch
//      go as RDMA WRITEs straight from the log's memory (the bytes, then a
//      wire::RemoteCertificate in the slot, after them on the same queue pair), and their
//      completion acknowledges them as a write RPC's reply would. Opens, epoch raises,
//      closes and frees stay RPCs, sent on the same connection after the WRITEs (so the
//      backup sees the bytes first); a backup that does not expose (TCP, kDisk) gets RPCs.
//      Log bytes a WRITE reads do not change before it completes: only segments marked
//      replicated (closed on every replica, acked after the WRITEs) are cleaned.
//   9. Write RPCs carry a segment's bytes from where they lie in the log (its seglets),
//      not from a copy, for as long as the segment is not marked replicated: the log
//      appends only past what it holds, and moves or frees a segment's bytes only once it
//      is marked (the cleaner). The transport holds the segment's pin while any of its
//      bytes wait in a connection's queue, and the segment is marked only once no pin is
//      held, so a write to a replica lost meanwhile never reads memory the cleaner took.
//      A marked segment that needs a new replica is copied out under the log's lock.
//  10. A backup that answers kRetry (no buffer free for an open, too many replies
//      waiting, a write racing another) to a write RPC has not lost the replica (one
//      exposed for one-sided appends, rule 8, is lost as before): its writes are sent
//      again from what it acknowledged, after a backoff that doubles (writes in flight
//      behind the refused one fail as a gap and are not counted), and the replica is
//      lost only after Options::max_retries refusals in a row. A backup that fails
//      (unreachable, timed out, full disk, I/O error) gets no new replicas for a backoff
//      that doubles while it keeps failing, so a dead backup the coordinator has not
//      declared yet is not tried again and again (one log line per backoff, not one per
//      replica).
//  11. A pass looks only at the segments with something left to do (active_). A segment
//      settles once it is closed, not the head, marked (rule 9), and on as many replicas
//      as it needs, each holding all of it at its epoch, closed, with nothing in flight.
//      It is active again when it loses a replica, leaves the log or changes there, or
//      when the number of replicas a segment needs changes. A settled segment is whole
//      and durably open, which is all that rules 1-3 and 5 ask of it, and nothing is due
//      for it. So a pass costs what is under way, not the log's size (a 10 GiB master has
//      about 1,300 segments, and every batch of writes makes a pass); a pass reads the
//      whole log's view only when more than the head's length changed.
//
// Owner: the server (server/main.cc). Threads: every method runs on the dispatch thread.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "common/transport.h"
#include "common/wire_format.h"
#include "master/log.h"

namespace ramkv::master {

struct ReplicationStats {
  uint64_t write_rpcs = 0;
  uint64_t bytes_sent = 0;
  uint64_t replicas_lost = 0;
  uint64_t replies_held = 0;  // held at any time
  uint64_t replies_released = 0;
  uint64_t segments_freed = 0;
  uint64_t remote_writes = 0;  // one-sided appends (rule 8)
  uint64_t remote_bytes = 0;
  uint64_t retries = 0;  // writes sent again after a kRetry (rule 10)
  uint32_t backups = 0;  // usable now
};

class ReplicaManager final : public LoopTask {
 public:
  struct Options {
    uint32_t replicas = 3;
    std::string coordinator;  // where epochs are recorded
    uint64_t rpc_timeout_ns = 5'000'000'000;
    uint32_t max_in_flight = 4;  // writes in flight per replica
    uint64_t seed = 0;           // backup choice; 0: from the clock
    bool one_sided = true;       // rule 8, where the transport and backups can
    // Rule 10: kRetry answers before a replica counts as lost, and the first backoff.
    uint32_t max_retries = 8;
    uint64_t retry_backoff_ns = 2'000'000;
    // Rule 10: how long a failed backup gets no new replicas, doubling up to the most.
    uint64_t backup_backoff_ns = 100'000'000;
    uint64_t max_backup_backoff_ns = 2'000'000'000;
  };

  ReplicaManager(const Options& options, Log& log, ServerTransport& server);
  ~ReplicaManager() override;
  ReplicaManager(const ReplicaManager&) = delete;
  ReplicaManager& operator=(const ReplicaManager&) = delete;

  // The log's memory (SegletPool::arena), registered with the replication transport so
  // that one-sided appends go from it without a copy (rule 8). Without this call, or on
  // a transport without one-sided writes (TCP), or with Options::one_sided off, every
  // append is an RPC. kOk, or the adapter's refusal (then RPCs too).
  Status use_log_memory(std::span<const std::byte> arena);
  bool one_sided() const { return one_sided_; }
  // Our own server id (never a backup for ourselves); set once enlisted.
  void set_server_id(uint64_t id) { server_id_ = id; }
  // The coordinator's newest server list: the backups to use. Replicas on a server that
  // is gone, crashed or replaced are lost and made again elsewhere.
  void update_servers(const std::vector<wire::ServerListItem>& servers);
  // Takes over a reply the handler just produced (and marks it deferred): it is sent when
  // everything written so far is durable, or answered kFenced.
  void hold(Reply& reply);
  bool fenced() const { return fenced_; }
  // Whether the replica of `segment_id` that backup `backup_id` found on its disk after a
  // restart must be kept: until this master knows of that backup's current id (so it has
  // given up the replicas it had there) and holds the segment wholly on R other replicas,
  // at its current epoch. A segment no longer in the log is not needed.
  bool replica_needed(uint64_t backup_id, uint64_t segment_id) const;
  // The end of the log now: (head segment id, its length).
  std::pair<uint64_t, uint32_t> log_position() const;
  // Whether everything in the log up to `position` is on R replicas (rule 3).
  bool durable_through(uint64_t segment_id, uint32_t offset) const;
  const ReplicationStats& stats() const { return stats_; }
  size_t held_replies() const { return held_.size(); }
  // Segments a pass looks at (rule 11): those not settled.
  size_t active_segments() const { return active_.size(); }
  // Replication writes sent and not yet answered (closes included): 0 once every backup
  // has what it was sent, and every close is in its file.
  size_t writes_in_flight() const;

  // LoopTask
  int wait_fd() const override { return client_->wait_fd(); }
  uint64_t run() override;
  void on_wait_fd_ready() override { wait_fd_ready_ = true; }

 private:
  struct Replica {
    uint64_t backup_id = 0;
    uint64_t serial = 0;  // tells this replica's RPC replies from an earlier one's
    std::string locator;
    uint32_t sent = 0;   // bytes sent (acknowledged or in flight)
    uint32_t acked = 0;  // bytes the backup has acknowledged
    // Rule 10: bumped when a kRetry takes `sent` back to `acked`; the answers to writes
    // sent before carry the old value, and their failures (gaps) are not losses.
    uint32_t generation = 0;
    uint32_t retries = 0;      // kRetry answers in a row
    uint64_t retry_at_ns = 0;  // no writes before then
    uint64_t epoch_sent = 0;
    uint64_t epoch_acked = 0;
    bool opened = false;  // the open has been sent
    bool open_acked = false;
    bool close_sent = false;
    bool close_acked = false;
    uint32_t in_flight = 0;
    // Where the backup exposed the replica's buffer (rule 8); none: RPCs only.
    std::optional<wire::BackupWriteResponse> region;
    uint64_t remote_sequence = 0;  // one-sided appends sent
    // Write RPCs in flight: while any is, appends stay RPCs too, so that the backup has
    // copied the bytes an RPC carries before a slot certifying them lands.
    uint32_t rpcs_in_flight = 0;
  };
  struct Seg {
    uint64_t id = 0;
    uint64_t epoch = 1;
    uint64_t epoch_recorded = 1;  // the coordinator knows this epoch (1: nothing to know)
    bool epoch_in_flight = false;
    uint32_t length = 0;
    bool closed = false;      // in the master's memory
    bool has_digest = false;  // opened as a head (a survivor has none)
    bool in_log = true;
    bool marked = false;  // told the log it is replicated
    // Rule 9: held by the transport while it may read this segment's bytes in the log.
    std::shared_ptr<const void> pin;
    std::vector<Replica> replicas;
    std::set<uint64_t> avoid;  // backups that failed this segment
    bool settled = false;      // rule 11: not in active_
  };
  struct Held {
    ReplyToken token;
    Reply reply;
    uint64_t segment_id = 0;  // the head and its length when the reply was taken
    uint32_t offset = 0;
    bool stamped = false;
  };

  // Replicas a segment needs to count as durable: R, or every other backup while fewer
  // than R are up (at least 1).
  size_t target() const;
  void refresh_view();
  void choose_backups(Seg& seg);
  void send_writes();
  void send_write(Seg& seg, Replica& r, bool close);
  // A segment changed under a write being made (cleaned or compacted since the view):
  // the next pass reads the whole view again.
  void view_stale();
  // Rule 8: appends [r.sent, length) with RDMA WRITEs, then the certificate slot.
  void send_remote(Seg& seg, Replica& r, uint32_t length, const Certificate& cert);
  // `rpc`: a write RPC's answer (else a one-sided append's completion).
  struct Sent {  // what a write carried, for its answer
    uint64_t segment_id = 0;
    uint64_t serial = 0;
    uint32_t generation = 0;
    uint32_t end = 0;
    uint64_t epoch = 0;
    bool close = false;
    bool rpc = true;
  };
  static Sent sent_of(const Seg& seg, const Replica& r, uint32_t end, bool close, bool rpc) {
    return {.segment_id = seg.id,
            .serial = r.serial,
            .generation = r.generation,
            .end = end,
            .epoch = seg.epoch,
            .close = close,
            .rpc = rpc};
  }
  void on_write_done(const Sent& sent, Status status, std::span<const std::byte> response = {});
  // Rule 10: a kRetry; false once the replica has been refused too often (then lost).
  bool retry_later(Replica& r);
  // Rule 10: a backup failed (`why`); a write it acknowledged: it answers again.
  void backup_failed(uint64_t backup_id, Status why);
  void backup_answered(uint64_t backup_id);
  bool backup_resting(uint64_t backup_id, uint64_t now) const;
  // `quiet`: the caller has said why in the log already.
  void lose_replica(Seg& seg, size_t index, Status why, bool quiet = false);
  // Tells the log the segment is replicated once every replica holds it closed and the
  // transport holds no pin of it (rules 8 and 9).
  void maybe_mark(Seg& seg);
  void record_epoch(Seg& seg);
  // Asks a backup to drop its replica of `segment_id`; the answer is not waited for.
  void send_free(const std::string& locator, uint64_t segment_id);
  void free_dead_segments();
  void release_durable();
  // Every non-head segment wholly on R replicas, and the head open on R with its epoch
  // recorded; *head_acked is then what the head's replicas all hold.
  bool log_durable(uint32_t* head_acked) const;
  bool head_open_durable() const;
  // On R replicas, all of them open at the segment's epoch (the head's also recorded).
  bool open_durable(const Seg& seg) const;
  // All R replicas hold every byte of the segment at its current epoch.
  bool segment_whole(const Seg& seg) const;
  void fail_held(Status s);
  // Rule 11.
  bool may_settle(const Seg& seg) const;
  void settle(Seg& seg);
  void unsettle(Seg& seg);
  void unsettle_all();

  Options options_;
  Log& log_;
  ServerTransport& server_;
  std::unique_ptr<ClientTransport> client_;
  uint64_t server_id_ = 0;
  std::map<uint64_t, std::string> backups_;  // usable backups: id -> locator
  std::map<uint64_t, Seg> segments_;
  std::set<uint64_t> active_;           // rule 11: the segments not settled
  std::set<uint64_t> settled_digests_;  // settled segments with a digest
  uint64_t seen_structure_ = UINT64_MAX;
  uint64_t head_id_ = 0;
  uint32_t head_length_ = 0;
  uint64_t seen_changes_ = UINT64_MAX;
  uint64_t next_replica_serial_ = 0;
  bool dirty_ = true;           // something may be due: run() looks at everything
  bool wait_fd_ready_ = false;  // the client transport has events to take in
  std::deque<Held> held_;
  bool fenced_ = false;
  bool warned_few_backups_ = false;
  bool warned_no_backups_ = false;
  bool one_sided_ = false;  // use_log_memory() succeeded on a one-sided transport
  std::vector<std::span<const std::byte>> views_;  // reused by send_remote(), send_write()
  std::vector<ClientTransport::RemoteWrite> remote_writes_;  // reused by send_remote()
  uint64_t rpc_seq_ = 0;
  // A marked segment's bytes for a new replica (rule 9), copied out of the log once for
  // every replica that needs the same range in one pass (send_writes()). The transport
  // holds a buffer until it has sent it (ClientTransport::send_pieces), so what a socket
  // does not take at once is not copied again; buffers come back to `spare_` and are
  // reused without zero-filling (memory touched before is cheaper, on virtual machines
  // much).
  struct Buffer {
    std::unique_ptr<std::byte[]> bytes;
    size_t capacity = 0;
  };
  struct WriteCopy {
    std::shared_ptr<Buffer> buffer;
    uint64_t segment_id = 0;  // 0: nothing valid
    uint32_t from = 0;
    uint32_t length = 0;
  };
  // A buffer of at least `bytes` that no transport holds any more.
  std::shared_ptr<Buffer> take_buffer(size_t bytes);
  WriteCopy copy_;
  std::vector<std::shared_ptr<Buffer>> spare_;
  // Segments every replica holds closed whose marking waits for their pin (rule 9).
  std::set<uint64_t> awaiting_pin_;
  // Rule 10: backups that failed, and until when they get no new replicas.
  struct Resting {
    uint64_t until_ns = 0;
    uint64_t backoff_ns = 0;
    uint64_t losses = 0;  // replicas lost there since it last answered
    uint64_t last_failure_ns = 0;
  };
  std::map<uint64_t, Resting> resting_;
  // The earliest retry_at_ns or Resting::until_ns that held something back (run() looks
  // at everything again then).
  uint64_t next_wake_ns_ = UINT64_MAX;
  std::mt19937_64 random_;
  ReplicationStats stats_;
  std::vector<std::byte> scratch_;
};

}  // namespace ramkv::master
