#include "backup/backup_service.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "backup/replica_file.h"
#include "backup/replica_scanner.h"
#include "common/checksum.h"
#include "common/log.h"
#include "common/segment_iterator.h"

namespace ramkv::backup {
namespace {

using wire::Opcode;

constexpr size_t align_down(size_t n) { return n / kDirectAlignment * kDirectAlignment; }

// Out of blocks or inodes, or over a disk quota: full, as far as the master is concerned.
Status errno_status(int err) {
  return err == ENOSPC || err == EDQUOT ? Status::kNoSpace : Status::kIoError;
}

uint8_t scan_status_code(Status s) {
  if (s == Status::kOk) return wire::kReplicaOk;
  return s == Status::kCorrupt ? wire::kReplicaCorrupt : wire::kReplicaTorn;
}

}  // namespace

Result<std::unique_ptr<BackupService>> BackupService::create(const Options& options) {
  if (options.data_dir.empty() || options.segment_bytes == 0 || options.max_buffers == 0 ||
      options.ring_depth < 3 || options.max_deferred_replies == 0) {
    return Status::kInvalidArgument;
  }
  auto ring = Uring::create(options.ring_depth);
  if (!ring.ok()) return ring.status();
  std::unique_ptr<BackupService> service(new BackupService(options, std::move(*ring)));
  if (Status s = service->load_existing(); s != Status::kOk) return s;
  return service;
}

BackupService::BackupService(const Options& options, std::unique_ptr<Uring> ring)
    : options_(options),
      pool_(std::make_shared<BufferPool>(
          kReplicaHeaderBlock + size_t{options.segment_bytes},
          std::max<size_t>(options.max_buffers, options.buffers_at_start))),
      ring_(std::move(ring)) {
  to_flush_.reserve(options_.max_buffers);
  pool_->fill(options_.buffers_at_start);
}

BackupService::~BackupService() = default;

BackupService::File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

BackupService::File& BackupService::File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

// Writes smaller than this are copied as before: placing them would cost a read more.
constexpr size_t kMinPlacedBytes = 64 * 1024;

void BackupService::attach(ServerTransport& transport) {
  transport_ = &transport;
  transport.add_loop_task(this);
  transport.set_placer(sizeof(wire::BackupWriteRequest),
                       sizeof(wire::BackupWriteRequest) + kMinPlacedBytes,
                       [this](const wire::MessageHeader& h, std::span<const std::byte> prefix) {
                         return place(h, prefix);
                       });
}

Placement BackupService::place(const wire::MessageHeader& h, std::span<const std::byte> prefix) {
  if (static_cast<Opcode>(h.opcode) != Opcode::kBackupWrite) return {};
  wire::BodyReader in(prefix);
  wire::BackupWriteRequest req;
  if (!in.get(&req) || uint64_t{req.length} + sizeof(req) != h.body_bytes) return {};
  if (req.open > 1 || req.close > 1 || req.remote != 0 || is_fenced(req.master_id)) return {};
  if (uint64_t{req.offset} + req.length > options_.segment_bytes) return {};
  const Key key{req.master_id, req.segment_id};
  auto it = replicas_.find(key);
  std::weak_ptr<bool> alive = alive_;
  if (it == replicas_.end()) {
    // An open: into a buffer taken now, which the write takes over if it succeeds.
    if (req.open != 1 || req.offset != 0) return {};
    auto buffer = acquire_buffer();
    if (!buffer.ok()) return {};  // write() answers kRetry
    std::byte* base = buffer->data();
    placements_.emplace(base, Placed{.buffer = std::move(*buffer), .counted = true});
    bytes_placed_ += req.length;
    std::shared_ptr<void> keep(nullptr, [this, alive, key, base](void*) {
      if (alive.lock()) end_placement(key, base);
    });
    return {.rest = {base + kReplicaHeaderBlock, req.length}, .keep = std::move(keep)};
  }
  Replica& r = it->second;
  // Only an append at exactly the held length of a replica that can take it: anything
  // else is decided by write(), on bytes received as usual.
  if (r.found_on_disk || r.free_pending || r.remote || r.placing || r.buffer.size() == 0 ||
      r.staged.closed || req.offset != r.staged.held_bytes) {
    return {};
  }
  std::byte* base = r.buffer.data();
  r.placing = true;
  placements_.emplace(base, Placed{});
  bytes_placed_ += req.length;
  std::shared_ptr<void> keep(nullptr, [this, alive, key, base](void*) {
    if (alive.lock()) end_placement(key, base);
  });
  return {.rest = {base + kReplicaHeaderBlock + req.offset, req.length}, .keep = std::move(keep)};
}

void BackupService::end_placement(const Key& key, const std::byte* base) {
  auto node = placements_.extract(base);
  RAMKV_CHECK(!node.empty());
  Placed& placed = node.mapped();
  if (placed.buffer.size() != 0) {
    // Taken for an open whose write did not succeed, or its replica freed meanwhile.
    if (placed.counted) {
      release_buffer(std::move(placed.buffer));
    } else {
      pool_->give(std::move(placed.buffer));
    }
  }
  auto it = replicas_.find(key);
  if (it != replicas_.end() && it->second.buffer.data() == base) {
    it->second.placing = false;  // a flush it held back starts with the loop's next run()
  }
}

Status BackupService::load_existing() {
  auto scanned = scan_replicas(options_.data_dir);
  if (!scanned.ok()) return scanned.status();
  for (const ScannedReplica& s : *scanned) {
    Replica r;
    r.durable = {.epoch = s.header.epoch,
                 .held_bytes = s.header.certificate_bytes,
                 .certificate_bytes = s.header.certificate_bytes,
                 .certificate_checksum = s.header.certificate_checksum,
                 // Found on disk: immutable whatever its header says (see the class comment).
                 .closed = s.header.closed};
    r.staged = r.durable;
    r.staged_seq = r.durable_seq = 1;  // what the file holds counts as acknowledged
    r.file_bytes = s.header.certificate_bytes;
    r.has_file = true;
    r.found_on_disk = true;
    r.scan_status = scan_status_code(s.status);  // the scan has logged the bad ones
    replicas_[{s.master_id, s.segment_id}] = std::move(r);
  }
  LOG_INFO("backup found {} replicas in {}", replicas_.size(), options_.data_dir);
  return Status::kOk;
}

void BackupService::handle(const wire::MessageHeader& request, std::span<const std::byte> body,
                           Reply& reply) {
  Status s = Status::kBadRequest;  // reserved and foreign opcodes
  switch (static_cast<Opcode>(request.opcode)) {
    case Opcode::kBackupWrite:
      s = write(body, reply);
      break;
    case Opcode::kBackupFree:
      s = free_replica(body, reply);
      break;
    case Opcode::kBackupListReplicas:
      s = list_replicas(body, reply);
      break;
    case Opcode::kBackupStartReadingData:
      s = start_reading(body, reply);
      break;
    case Opcode::kBackupStartPartitioning:
      s = start_partitioning(body);
      break;
    case Opcode::kBackupGetRecoveryData:
      s = get_recovery_data(body, reply);
      break;
    default:
      break;
  }
  if (s != Status::kOk) {
    reply.clear();
    reply.set_status(s);
  }
}

Status BackupService::write(std::span<const std::byte> body, Reply& reply) {
  wire::BodyReader in(body);
  wire::BackupWriteRequest req;
  std::string_view data;
  if (!in.get(&req)) return Status::kBadRequest;
  // A placed body (place()) arrived where reply.placed() says; usually past the held
  // bytes of the replica it is for, where append() then has nothing to copy.
  const std::span<const std::byte> placed = reply.placed();
  if (!placed.empty()) {
    if (!in.at_end() || placed.size() != req.length) return Status::kBadRequest;
    data = {reinterpret_cast<const char*>(placed.data()), placed.size()};
  } else if (!in.get_string(req.length, &data) || !in.at_end()) {
    return Status::kBadRequest;
  }
  if (req.open > 1 || req.close > 1 || req.remote > 1) return Status::kBadRequest;
  if (is_fenced(req.master_id)) return Status::kFenced;
  uint64_t end = uint64_t{req.offset} + req.length;
  if (end > options_.segment_bytes || req.certificate_bytes > end) return Status::kBadRequest;
  // Before anything changes: the reply may have to wait (nothing was applied).
  if (deferred_replies_ >= options_.max_deferred_replies) return Status::kRetry;
  auto bytes = std::as_bytes(std::span(data));

  Key key{req.master_id, req.segment_id};
  auto it = replicas_.find(key);
  if (it == replicas_.end()) {
    if (req.open == 0) return Status::kBadRequest;  // unknown replica
    auto buffer = take_placed(bytes, req.offset);
    if (buffer.size() == 0) {
      auto acquired = acquire_buffer();
      if (!acquired.ok()) return acquired.status();
      buffer = std::move(*acquired);
    }
    Replica r;
    r.buffer = std::move(buffer);
    it = replicas_.emplace(key, std::move(r)).first;
    Status s = append(it, req, bytes, /*created=*/true, reply);
    if (s == Status::kOk && req.remote == 1) {
      if (auto made = replicas_.find(key); made != replicas_.end()) expose(made->second, reply);
    }
    return s;
  }
  Replica& r = it->second;
  if (r.found_on_disk) return Status::kBadRequest;  // see the class comment
  if (r.free_pending) return Status::kRetry;        // gone once the free is done
  // Another write's body is being received into this replica's buffer.
  if (r.placing && bytes.data() != r.buffer.data() + kReplicaHeaderBlock + req.offset) {
    return Status::kRetry;
  }
  if (r.remote) {
    // What the master appended one-sided comes first; a close ends the exposure.
    if (req.close == 1) {
      withdraw(key, r);
    } else {
      absorb(key, r);
    }
  }
  // A resent open that asks for the region again (its first answer may have been lost).
  auto put_region = [&] {
    if (req.open == 1 && req.remote == 1 && r.remote) {
      reply.writer().put(wire::BackupWriteResponse{.address = r.remote->address,
                                                   .bytes = r.remote->bytes,
                                                   .key = r.remote->key,
                                                   .slot_offset = 0,
                                                   .data_offset = kReplicaHeaderBlock,
                                                   .capacity = options_.segment_bytes});
    }
  };
  // Invariant 2: the bytes held never change, and appends leave no gap.
  if (req.offset > r.staged.held_bytes || !matches_held(r, req.offset, bytes)) {
    return Status::kBadRequest;
  }
  // A resend is answered once what it asks for is durable (invariant 5): now, or when
  // the flush of the staged writes it repeats succeeds.
  if (r.durable_seq > 0 && is_resend(r.durable, req, end)) {
    put_region();
    return Status::kOk;
  }
  if (is_resend(r.staged, req, end)) {
    defer(r, r.staged_seq, reply);
    return Status::kOk;
  }
  return append(it, req, bytes, /*created=*/false, reply);
}

bool BackupService::matches_held(const Replica& r, uint32_t offset,
                                 std::span<const std::byte> data) {
  if (r.buffer.size() == 0 || offset >= r.staged.held_bytes) return true;
  size_t overlap = std::min<size_t>(data.size(), r.staged.held_bytes - offset);
  return std::memcmp(r.buffer.span().data() + kReplicaHeaderBlock + offset, data.data(), overlap) ==
         0;
}

bool BackupService::is_resend(const State& held, const wire::BackupWriteRequest& req,
                              uint64_t end) {
  // An older certificate cannot be checked (only the latest is kept); an equal length
  // must come with the same checksum.
  bool certificate_held = req.certificate_bytes < held.certificate_bytes ||
                          (req.certificate_bytes == held.certificate_bytes &&
                           req.certificate_checksum == held.certificate_checksum);
  bool close_held = req.close == 0 || (held.closed && end == held.held_bytes);
  return end <= held.held_bytes && req.epoch <= held.epoch && certificate_held && close_held;
}

Status BackupService::append(std::map<Key, Replica>::iterator it,
                             const wire::BackupWriteRequest& req, std::span<const std::byte> data,
                             bool created, Reply& reply) {
  Replica& r = it->second;
  State& staged = r.staged;
  const uint64_t end = uint64_t{req.offset} + req.length;
  if (staged.closed || r.buffer.size() == 0 || req.offset > staged.held_bytes ||
      end < staged.held_bytes || req.certificate_bytes < staged.certificate_bytes ||
      req.epoch < staged.epoch) {
    // Invariant 2: held bytes, certificates and epochs never shrink; invariant 3: a
    // closed replica is never written again.
    if (created) forget(it);
    return Status::kBadRequest;
  }

  // Stage the new tail past the staged bytes (the overlap has matched: invariant 2). A
  // flush in flight may be writing the block these bytes start in: it writes either them
  // or the zeros it put there, past the length its header certifies, and the next flush
  // rewrites that block.
  auto tail = data.subspan(staged.held_bytes - req.offset);
  std::byte* to = r.buffer.data() + kReplicaHeaderBlock + staged.held_bytes;
  if (!tail.empty() && tail.data() != to) {  // else received there (place())
    std::memcpy(to, tail.data(), tail.size());
  }
  staged = {.epoch = req.epoch,
            .held_bytes = static_cast<uint32_t>(end),
            .certificate_bytes = req.certificate_bytes,
            .certificate_checksum = req.certificate_checksum,
            .closed = req.close == 1};
  ++r.staged_seq;
  if (options_.durability == Durability::kBuffered) {
    // Acknowledged from RAM, a close too (see "Durability"). No flush can be under way:
    // only a close starts one, and a closed replica takes no more writes.
    r.durable = staged;
    r.durable_seq = r.staged_seq;
    if (staged.closed) queue_flush(*it);  // to the disk, then the buffer goes back
    return Status::kOk;
  }
  defer(r, r.staged_seq, reply);
  queue_flush(*it);
  return Status::kOk;
}

void BackupService::defer(Replica& r, uint64_t seq, Reply& reply) {
  RAMKV_CHECK_MSG(transport_ != nullptr, "a backup that defers replies needs attach()");
  r.waiters.push_back({.token = reply.token(), .seq = seq});
  ++deferred_replies_;
  reply.defer();
}

void BackupService::answer_writes(Replica& r, uint64_t up_to, Status status) {
  size_t n = 0;
  while (n < r.waiters.size() && r.waiters[n].seq != kFreeSeq && r.waiters[n].seq <= up_to) {
    answer(r.waiters[n].token, status);
    ++n;
  }
  r.waiters.erase(r.waiters.begin(), r.waiters.begin() + static_cast<ptrdiff_t>(n));
}

void BackupService::answer(const ReplyToken& token, Status status) {
  Reply reply;
  reply.set_status(status);
  --deferred_replies_;
  // false when the connection has closed meanwhile: a master that reconnects resends.
  transport_->send_deferred(token, reply);
}

void BackupService::queue_flush(Entry& entry) {
  Replica& r = entry.second;
  // A flush in flight takes up what was staged behind it once it is done.
  if (r.queued || (r.flushing && r.flush.ops_in_flight > 0)) return;
  r.queued = true;
  to_flush_.push_back(&entry);
}

bool BackupService::holding_flushes() const { return holding_flushes_at(options_.clock->now_ns()); }

bool BackupService::recovery_hold_at(uint64_t now) const {
  if (options_.durability != Durability::kBuffered) return false;
  return std::any_of(hold_started_ns_.begin(), hold_started_ns_.end(), [&](const auto& m) {
    return now - m.second < options_.recovery_flush_hold_ns;
  });
}

bool BackupService::holding_flushes_at(uint64_t now) const {
  // Only while a recovery is read, for a while, and while a quarter of the buffers is
  // free for opens (see "Closes wait while a recovery is read").
  return buffers_in_use_ * 4 < uint64_t{options_.max_buffers} * 3 && recovery_hold_at(now);
}

size_t BackupService::write_held(uint64_t timeout_ns) {
  hold_started_ns_.clear();  // no recovery is read any more
  const size_t queued = to_flush_.size();
  const uint64_t deadline = options_.clock->now_ns() + timeout_ns;
  for (;;) {
    run();
    // Nothing under way: what is left waits for a retry (its last try failed).
    if (ring_->in_flight() == 0 || options_.clock->now_ns() >= deadline) break;
    pollfd p{.fd = ring_->event_fd(), .events = POLLIN, .revents = 0};
    ::poll(&p, 1, 100);
  }
  if (queued > 0 || !to_flush_.empty()) {
    LOG_INFO("wrote {} closed replicas held in RAM to disk before stopping; {} left unwritten",
             queued - std::min(queued, to_flush_.size()), to_flush_.size());
  }
  return to_flush_.size();
}

void BackupService::drop_queued_flush(Replica& r) {
  if (!r.queued || r.flushing || r.staged_seq != r.durable_seq) return;
  auto it = std::find_if(to_flush_.begin(), to_flush_.end(),
                         [&](const Entry* e) { return &e->second == &r; });
  RAMKV_CHECK(it != to_flush_.end());
  to_flush_.erase(it);
  r.queued = false;
}

uint64_t BackupService::run() {
  if (to_flush_.empty() && ring_->in_flight() == 0 && !event_may_be_set_) return UINT64_MAX;
  // Flushes that wait for a recovery or for a retry: looked at again within 100 ms (a
  // recovery's end, or buffers running short, comes with a request, which runs us too).
  constexpr uint64_t kLookAgainNs = 100'000'000;
  const uint64_t now = options_.clock->now_ns();
  // Logged once per recovery, not each time buffers running short let some go.
  if (recovery_hold_at(now)) {
    if (!logged_hold_) {
      logged_hold_ = true;
      LOG_INFO(
          "closed replicas stay in RAM while a recovery is read, as long as a quarter of "
          "the {} buffers is free ({} wait, {} in use)",
          options_.max_buffers, to_flush_.size(), buffers_in_use_);
    }
  } else if (logged_hold_) {
    logged_hold_ = false;
    LOG_INFO("writing the {} closed replicas that waited for a recovery ({} buffers in use)",
             to_flush_.size(), buffers_in_use_);
  }
  if (ring_->in_flight() == 0 && !event_may_be_set_ && holding_flushes_at(now)) {
    return kLookAgainNs;
  }
  // Cleared before collecting: a completion posted after this leaves the eventfd readable.
  ring_->clear_event();
  event_may_be_set_ = false;
  // Each round submits what was queued and collects what is ready; completions can let
  // more flushes start (the next one of a replica, or one that found no room).
  for (;;) {
    start_flushes();
    done_.clear();
    if (Status s = ring_->wait(0, &done_); s != Status::kOk) {
      // Nothing was submitted; what is queued stays in the ring. Try again soon.
      return 1'000'000;
    }
    if (done_.empty()) break;
    event_may_be_set_ = true;
    for (const Uring::Completion& c : done_) complete(c);
  }
  return to_flush_.empty() || ring_->in_flight() > 0 ? UINT64_MAX : kLookAgainNs;
}

void BackupService::start_flushes() {
  // finish_flush() below queues only on success, or an acknowledged close whose flush
  // failed, which waits for its retry time: the loop sees every entry once; those without
  // room yet keep their place.
  const uint64_t now = options_.clock->now_ns();
  const bool hold = holding_flushes_at(now);
  size_t kept = 0;
  for (size_t i = 0; i < to_flush_.size(); ++i) {
    Entry* e = to_flush_[i];
    Status s = start_chain(*e, now, hold);
    if (s == Status::kRetry) {
      to_flush_[kept++] = e;
      continue;
    }
    e->second.queued = false;
    if (s != Status::kOk) finish_flush(*e, s);
  }
  to_flush_.resize(kept);
}

Status BackupService::start_chain(Entry& entry, uint64_t now, bool hold) {
  const Key& key = entry.first;
  Replica& r = entry.second;
  Flush& f = r.flush;
  // The blocks to write: a new file gets its header block and everything in one write;
  // an existing one its blocks from the one the durable bytes end in. A flush under way
  // resumes where its last chain stopped.
  bool created = !r.has_file;
  size_t next = created ? 0 : align_down(kReplicaHeaderBlock + r.file_bytes);
  size_t end = align_up(kReplicaHeaderBlock + r.staged.held_bytes);
  if (r.flushing) {
    created = f.created;
    next = f.next_offset;
    end = f.end_offset;
  }
  uint32_t ops = (next < end ? 1u : 0u) + (created ? 0u : 1u) + 1u;
  if (ring_->room() < ops) return Status::kRetry;  // a completion makes room

  if (!r.flushing) {
    // A write's body is being received past the held bytes (place()), and a new flush
    // zeroes the block they start in: it waits (start_flushes keeps it queued).
    if (r.placing) return Status::kRetry;
    // A recovery is read, or the last try failed not long ago (kBuffered closes only).
    if (hold || r.flush_retry_ns > now) return Status::kRetry;
    // Bytes on their way to the disk are bounded (Options::max_flush_bytes): behind a long
    // queue of them every other synchronous write on the device waits.
    const uint64_t bytes = end > next ? end - next : 0;
    if (flush_bytes_ > 0 && flush_bytes_ + bytes > options_.max_flush_bytes) {
      return Status::kRetry;
    }
    if (r.file.get() < 0) {
      // Created through the ring (begin_open); this chain starts once it is open.
      if (r.open_failure != Status::kOk) return std::exchange(r.open_failure, Status::kOk);
      if (!r.opening) begin_open(entry);
      if (r.opening) return Status::kRetry;  // its completion comes through run()
      // The ring had no room for the open, or the directory could not be made: here.
      if (Status s = open_file(key, r); s != Status::kOk) return s;
    }
    r.flushing = true;
    ++flushes_;
    flush_bytes_ += bytes;
    f = Flush{.seq = r.staged_seq,
              .state = r.staged,
              .created = created,
              .next_offset = next,
              .end_offset = end,
              .counted_bytes = bytes};
    encode_replica_header({.master_id = key.first,
                           .segment_id = key.second,
                           .epoch = f.state.epoch,
                           .capacity = options_.segment_bytes,
                           .certificate_bytes = f.state.certificate_bytes,
                           .certificate_checksum = f.state.certificate_checksum,
                           .closed = f.state.closed},
                          r.buffer.span());
    // O_DIRECT writes whole blocks: zero the tail of the last one so no stale bytes from
    // the buffer's previous replica reach the file.
    size_t held_end = kReplicaHeaderBlock + f.state.held_bytes;
    std::memset(r.buffer.data() + held_end, 0, end - held_end);
  }

  // One chain, each operation starting once the one before completed in full: the new
  // blocks, then (an existing file) the header that certifies them, then the fdatasync
  // that covers both. A failure or a short write cancels the rest (-ECANCELED), so a
  // full disk leaves the old header true (invariant 4).
  const auto tag = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(&entry));
  RAMKV_CHECK((tag & 3) == 0);
  const int fd = r.file.get();
  f.data_bytes = end - next;
  f.header = !created;
  f.ops_in_flight = ops;
  std::fill(std::begin(f.results), std::end(f.results), 0);
  if (f.data_bytes > 0) {
    RAMKV_CHECK(ring_->submit_write(fd, r.buffer.span().subspan(next, f.data_bytes), next,
                                    tag | kData, /*link_next=*/true) == Status::kOk);
  }
  if (f.header) {
    RAMKV_CHECK(ring_->submit_write(fd, r.buffer.span().first(kReplicaHeaderBlock), 0,
                                    tag | kHeader, /*link_next=*/true) == Status::kOk);
  }
  RAMKV_CHECK(ring_->submit_datasync(fd, tag | kSync) == Status::kOk);
  return Status::kOk;
}

Status BackupService::make_master_dir(uint64_t master_id, LogLevel level) {
  if (master_dirs_.contains(master_id)) return Status::kOk;
  std::error_code ec;
  std::string dir = options_.data_dir + "/" + std::to_string(master_id);
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    RAMKV_LOG_AT(level, "cannot create {}: {}", dir, ec.message());
    return ec == std::errc::no_space_on_device ? Status::kNoSpace : Status::kIoError;
  }
  master_dirs_.insert(master_id);
  return Status::kOk;
}

void BackupService::begin_open(Entry& entry) {
  const Key& key = entry.first;
  Replica& r = entry.second;
  if (r.opening || r.has_file || r.file.get() >= 0 || r.found_on_disk) return;
  if (make_master_dir(key.first, error_level(r)) != Status::kOk) return;  // start_chain says why
  r.open_path = replica_path(options_.data_dir, key.first, key.second);
  remover_.claim(r.open_path);  // an earlier replica's file may wait to be unlinked
  const auto tag = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(&entry));
  RAMKV_CHECK((tag & 3) == 0);
  if (ring_->submit_open(r.open_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC,
                         0644, tag | kOpen) != Status::kOk) {
    return;  // no room in the ring: the flush opens the file itself
  }
  r.opening = true;
}

void BackupService::complete_open(Entry& entry, int32_t result) {
  Replica& r = entry.second;
  RAMKV_CHECK(r.opening);
  r.opening = false;
  if (result >= 0) {
    r.file = File(result);
  } else {
    RAMKV_LOG_AT(error_level(r), "cannot open replica file {}: {}", r.open_path,
                 std::strerror(-result));
    r.open_failure = errno_status(-result);
  }
  r.open_path.clear();
  r.open_path.shrink_to_fit();
  auto it = replicas_.find(entry.first);
  if (r.free_pending && removable(r)) complete_free(it);
}

Status BackupService::open_file(const Key& key, Replica& r) {
  if (Status s = make_master_dir(key.first, error_level(r)); s != Status::kOk) return s;
  std::string path = replica_path(options_.data_dir, key.first, key.second);
  if (!r.has_file) remover_.claim(path);  // an earlier replica's file may wait to be unlinked
  int flags = O_WRONLY | O_CREAT | O_DIRECT | O_CLOEXEC | (r.has_file ? 0 : O_TRUNC);
  int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) {
    int err = errno;
    RAMKV_LOG_AT(error_level(r), "cannot open replica file {}: {}", path, std::strerror(err));
    return errno_status(err);
  }
  r.file = File(fd);
  return Status::kOk;
}

void BackupService::complete(const Uring::Completion& c) {
  auto* entry = reinterpret_cast<Entry*>(static_cast<uintptr_t>(c.user_data & ~uint64_t{3}));
  if ((c.user_data & 3) == kOpen) return complete_open(*entry, c.result);
  Flush& f = entry->second.flush;
  RAMKV_CHECK(entry->second.flushing && f.ops_in_flight > 0);
  f.results[c.user_data & 3] = c.result;
  if (--f.ops_in_flight > 0) return;
  Status s = chain_status(*entry);
  if (s == Status::kRetry) {
    queue_flush(*entry);  // the rest of the blocks, from where the write stopped
  } else {
    finish_flush(*entry, s);
  }
}

Status BackupService::chain_status(Entry& entry) {
  Flush& f = entry.second.flush;
  auto failed = [&](const char* what, int32_t result) {
    std::string path = replica_path(options_.data_dir, entry.first.first, entry.first.second);
    RAMKV_LOG_AT(error_level(entry.second), "{} replica {}: {}", what, path,
                 std::strerror(-result));
    return errno_status(-result);
  };
  // The first operation that did not complete in full decides; those after it in the
  // chain were cancelled.
  if (f.data_bytes > 0) {
    int32_t result = f.results[kData];
    if (result < 0) return failed("writing", result);
    auto written = static_cast<size_t>(result);
    if (written < f.data_bytes) {
      // A short write is resumed where it stopped, so that the error which stopped it
      // decides the status (ENOSPC: kNoSpace) rather than a guess; Linux also cuts single
      // writes at 2 GiB - 4 KiB. O_DIRECT can resume only at a block boundary. No
      // progress, or none that O_DIRECT can resume from: a regular file takes fewer bytes
      // than asked only when it runs out of room (or past the file-size limit).
      if (written == 0 || written % kDirectAlignment != 0) {
        std::string path = replica_path(options_.data_dir, entry.first.first, entry.first.second);
        RAMKV_LOG_AT(error_level(entry.second), "short write of replica {}: {} of {} bytes", path,
                     written, f.data_bytes);
        return Status::kNoSpace;
      }
      f.next_offset += written;
      return Status::kRetry;
    }
  }
  if (f.header) {
    int32_t result = f.results[kHeader];
    if (result < 0) return failed("writing the header of", result);
    if (static_cast<size_t>(result) != kReplicaHeaderBlock) return Status::kNoSpace;
  }
  if (f.results[kSync] < 0) return failed("syncing", f.results[kSync]);
  return Status::kOk;
}

void BackupService::finish_flush(Entry& entry, Status status) {
  const Key& key = entry.first;
  Replica& r = entry.second;
  Flush& f = r.flush;
  r.flushing = false;
  // Zero when the flush could not start (its file could not be opened).
  flush_bytes_ -= std::exchange(f.counted_bytes, 0);
  // kBuffered: every write was acknowledged from RAM, a close too; a flush only moves
  // acknowledged bytes to the disk.
  const bool acknowledged = options_.durability == Durability::kBuffered;
  if (status == Status::kOk) {
    if (r.flush_failures > 0) {
      LOG_INFO("replica {} is on disk after {} failed tries",
               replica_path(options_.data_dir, key.first, key.second), r.flush_failures);
      r.flush_failures = 0;
    }
    r.has_file = true;
    r.file_bytes = f.state.held_bytes;
    r.durable = f.state;
    r.durable_seq = f.seq;
    answer_writes(r, r.durable_seq, Status::kOk);
    if (r.durable.closed) {
      // Invariant 3: never written again. Nothing can be staged behind a close.
      release_buffer(std::move(r.buffer));
      r.buffer = AlignedBuffer();
      r.file = File();
    } else if (r.staged_seq > r.durable_seq) {
      queue_flush(entry);  // what was staged while this flush was in flight
    }
  } else if (!r.has_file) {
    // A file this flush created goes (invariant 4: a failed write leaves nothing). An
    // acknowledged close's, tried again later, on the remover's thread (an unlink takes
    // milliseconds here; the next try claims the path back before it creates the file).
    r.file = File();
    std::string path = replica_path(options_.data_dir, key.first, key.second);
    if (acknowledged) {
      remover_.remove({std::move(path)});
    } else {
      ::unlink(path.c_str());
    }
  }
  if (status != Status::kOk && acknowledged) {
    // Invariant 5: the close was acknowledged with its bytes in the buffer, which keeps
    // them; the flush is tried again in a while (start_chain), unless a free comes first.
    ++flush_failures_;
    if (r.flush_failures++ == 0) {
      LOG_WARNING(
          "cannot write closed replica {} to disk ({}): it stays in RAM and is tried again "
          "after 1 s, then less and less often ({} buffers in use)",
          replica_path(options_.data_dir, key.first, key.second), status_name(status),
          buffers_in_use_);
    }
    const uint32_t doublings = std::min<uint32_t>(r.flush_failures - 1, 5);
    r.flush_retry_ns =
        options_.clock->now_ns() + std::min(kFlushRetryNs << doublings, kMaxFlushRetryNs);
    if (!r.free_pending) queue_flush(entry);
  } else if (status != Status::kOk) {
    // Invariant 4: back to the durable state; the writes staged behind this flush built
    // on it, so they fail with it.
    r.staged = r.durable;
    r.staged_seq = r.durable_seq;
    answer_writes(r, kFreeSeq - 1, status);
  }
  auto it = replicas_.find(key);
  if (r.free_pending) {
    if (removable(r)) complete_free(it);
  } else if (status != Status::kOk && r.durable_seq == 0) {
    forget(it);  // an open never acknowledged: nothing remains (invariant 4)
  }
}

void BackupService::complete_free(std::map<Key, Replica>::iterator it) {
  // Idle: every write's reply has gone, only the frees' wait.
  std::vector<Waiter> frees = std::move(it->second.waiters);
  it->second.waiters.clear();
  it->second.free_pending = false;
  remove(it);
  for (const Waiter& w : frees) {
    RAMKV_CHECK(w.seq == kFreeSeq);
    answer(w.token, Status::kOk);
  }
}

Status BackupService::free_replica(std::span<const std::byte> body, Reply& reply) {
  wire::BodyReader in(body);
  wire::BackupFreeRequest req;
  if (!in.get(&req) || !in.at_end()) return Status::kBadRequest;
  if (is_fenced(req.master_id)) return Status::kFenced;  // recovery needs them
  auto it = replicas_.find({req.master_id, req.segment_id});
  if (it == replicas_.end()) return Status::kOk;  // already freed: a resent free is fine
  if (it->second.remote) withdraw(it->first, it->second);
  Replica& r = it->second;
  // A close waiting to be written is no longer needed (dropped below); otherwise the free
  // waits for what is under way, and its reply counts as deferred.
  const bool droppable = r.queued && !r.flushing && r.staged_seq == r.durable_seq;
  const bool waits = droppable ? r.opening : !removable(r);
  if (waits && deferred_replies_ >= options_.max_deferred_replies) return Status::kRetry;
  drop_queued_flush(r);
  if (!removable(it->second)) {
    // Not under a write in flight (invariant 6): once the flushes are done.
    it->second.free_pending = true;
    defer(it->second, kFreeSeq, reply);
    return Status::kOk;
  }
  remove(it);
  return Status::kOk;
}

void BackupService::remove(std::map<Key, Replica>::iterator it) {
  // A file opened for a first flush that did not complete goes too. Closed first (forget
  // drops the descriptor), unlinked on the remover's thread.
  const bool has_file = it->second.has_file || it->second.file.get() >= 0;
  const Key key = it->first;
  forget(it);
  if (has_file) remover_.remove({replica_path(options_.data_dir, key.first, key.second)});
}

void BackupService::forget(std::map<Key, Replica>::iterator it) {
  Replica& r = it->second;
  RAMKV_CHECK(removable(r) && r.waiters.empty());  // invariant 6; no reply left behind
  if (r.remote) withdraw(it->first, r);            // before the buffer can go to another replica
  if (r.buffer.size() != 0) release_buffer(std::move(r.buffer));
  replicas_.erase(it);
}

Status BackupService::list_replicas(std::span<const std::byte> body, Reply& reply) {
  if (!body.empty()) return Status::kBadRequest;
  std::vector<wire::ReplicaEntry> entries = list();
  auto out = reply.writer();
  out.put(wire::BackupListHeader{.count = static_cast<uint32_t>(entries.size())});
  for (const wire::ReplicaEntry& e : entries) out.put(e);
  return Status::kOk;
}

std::vector<wire::ReplicaEntry> BackupService::list(bool found_on_disk_only) {
  for (auto& [key, r] : replicas_) {
    if (r.remote) absorb(key, r);
  }
  std::vector<wire::ReplicaEntry> entries;
  for (const auto& [key, r] : replicas_) {
    if (found_on_disk_only && !r.found_on_disk) continue;
    if (r.durable_seq == 0) continue;  // its open is not durable yet
    entries.push_back(wire::ReplicaEntry{.master_id = key.first,
                                         .segment_id = key.second,
                                         .epoch = r.durable.epoch,
                                         .certificate_bytes = r.durable.certificate_bytes,
                                         .closed = static_cast<uint8_t>(r.durable.closed ? 1 : 0),
                                         .status = r.scan_status,
                                         .found_on_disk = static_cast<uint8_t>(r.found_on_disk)});
  }
  return entries;
}

void BackupService::fence_master(uint64_t master_id) {
  fenced_.insert(master_id);
  for (auto it = replicas_.lower_bound({master_id, 0});
       it != replicas_.end() && it->first.first == master_id; ++it) {
    if (it->second.remote) withdraw(it->first, it->second);
  }
}

void BackupService::fence_generations_below(uint64_t current_id) {
  uint32_t& newest = newest_generation_[static_cast<uint32_t>(current_id)];
  newest = std::max(newest, static_cast<uint32_t>(current_id >> 32));
  for (auto& [key, r] : replicas_) {
    if (r.remote && is_fenced(key.first)) withdraw(key, r);
  }
}

bool BackupService::expose(Replica& r, Reply& reply) {
  if (transport_ == nullptr || options_.durability != Durability::kBuffered ||
      r.buffer.size() == 0 || r.staged.closed || reply.deferred() || r.remote) {
    return false;
  }
  // The buffer's last replica may have left a slot there.
  std::memset(r.buffer.data(), 0, sizeof(wire::RemoteCertificate));
  auto region = transport_->expose_memory(r.buffer.span());
  if (!region.ok()) return false;  // TCP, or the adapter refused (logged): RPCs it is
  r.remote = *region;
  r.remote_sequence = 0;
  ++regions_exposed_;
  reply.writer().put(wire::BackupWriteResponse{.address = region->address,
                                               .bytes = region->bytes,
                                               .key = region->key,
                                               .slot_offset = 0,
                                               .data_offset = kReplicaHeaderBlock,
                                               .capacity = options_.segment_bytes});
  return true;
}

void BackupService::absorb(const Key& key, Replica& r) {
  if (r.buffer.size() == 0 || r.staged.closed) return;
  // The slot may be landing as we read it (a DMA, or the emulation's NIC thread): read
  // it word by word, then check it whole.
  uint64_t words[sizeof(wire::RemoteCertificate) / sizeof(uint64_t)];
  auto* slot_words = reinterpret_cast<uint64_t*>(r.buffer.data());
  for (size_t i = 0; i < std::size(words); ++i) {
    words[i] = std::atomic_ref<uint64_t>(slot_words[i]).load(std::memory_order_relaxed);
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  wire::RemoteCertificate slot;
  std::memcpy(&slot, words, sizeof(slot));
  if (slot.magic != wire::RemoteCertificate::kMagic || slot.sequence == 0 ||
      slot.sequence == r.remote_sequence) {
    return;  // nothing new
  }
  const auto checked =
      std::as_bytes(std::span(words)).first(offsetof(wire::RemoteCertificate, check));
  const bool whole = slot.check == checksum64(checked);
  const bool sane = slot.held_bytes <= options_.segment_bytes &&
                    slot.certificate_bytes <= slot.held_bytes &&
                    slot.sequence > r.remote_sequence && slot.held_bytes >= r.staged.held_bytes &&
                    slot.certificate_bytes >= r.staged.certificate_bytes;
  if (!whole || !sane || !idle(r)) {
    // Torn (the next slot landing), or not what a master writes: the next look decides.
    LOG_DEBUG("replica {}.{}: one-sided slot {} not taken ({})", wire::server_id_text(key.first),
              key.second, slot.sequence,
              !whole  ? "torn"
              : !sane ? "goes back"
                      : "busy");
    return;
  }
  SegmentIterator proof(r.buffer.span().subspan(kReplicaHeaderBlock, slot.held_bytes),
                        Certificate{slot.certificate_bytes, slot.certificate_checksum});
  if (Status s = proof.validate(); s != Status::kOk) {
    // Bytes not all landed yet, or damaged: the replica stays as it was.
    LOG_WARNING(
        "replica {}.{}: one-sided append {} ({} bytes) fails its certificate ({}); keeping "
        "the {} bytes held before",
        wire::server_id_text(key.first), key.second, slot.sequence, slot.held_bytes, status_name(s),
        r.staged.held_bytes);
    return;
  }
  r.staged.held_bytes = slot.held_bytes;
  r.staged.certificate_bytes = slot.certificate_bytes;
  r.staged.certificate_checksum = slot.certificate_checksum;
  ++r.staged_seq;
  r.durable = r.staged;
  r.durable_seq = r.staged_seq;
  r.remote_sequence = slot.sequence;
  ++remote_appends_;
}

void BackupService::withdraw(const Key& key, Replica& r) {
  if (!r.remote) return;
  transport_->withdraw_memory(*r.remote);
  r.remote.reset();
  --regions_exposed_;
  absorb(key, r);  // final: nothing lands after the withdrawal
}

Result<AlignedBuffer> BackupService::acquire_buffer() {
  if (buffers_in_use_ >= options_.max_buffers) {
    ++opens_refused_for_buffers_;
    return Status::kRetry;  // invariant 1
  }
  ++buffers_in_use_;
  peak_buffers_in_use_ = std::max(peak_buffers_in_use_, buffers_in_use_);
  return pool_->take_or_allocate();
}

void BackupService::release_buffer(AlignedBuffer buffer) {
  RAMKV_CHECK(buffer.size() != 0 && buffers_in_use_ > 0);
  --buffers_in_use_;
  if (auto parked = placements_.find(buffer.data()); parked != placements_.end()) {
    parked->second = {.buffer = std::move(buffer), .counted = false};  // still written into
    return;
  }
  pool_->give(std::move(buffer));
}

AlignedBuffer BackupService::take_placed(std::span<const std::byte> data, uint32_t offset) {
  if (data.empty()) return {};
  const auto* base = reinterpret_cast<const std::byte*>(reinterpret_cast<uintptr_t>(data.data()) -
                                                        kReplicaHeaderBlock - offset);
  auto it = placements_.find(base);
  if (it == placements_.end() || !it->second.counted || it->second.buffer.size() == 0) return {};
  it->second.counted = false;
  return std::move(it->second.buffer);
}

}  // namespace ramkv::backup
