#include "master/replica_manager.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "common/checksum.h"
#include "common/clock.h"
#include "common/log.h"

namespace ramkv::master {

namespace {

// How long the loop may sleep while replication RPCs are in flight (their timeouts are
// checked when it wakes) or replies wait for a backup to appear.
constexpr uint64_t kInFlightWakeNs = 20'000'000;
constexpr uint64_t kWaitingWakeNs = 100'000'000;
// Rule 10: a backup that has not failed for this long starts again at the first backoff.
constexpr uint64_t kForgetFailuresNs = 10'000'000'000;

}  // namespace

ReplicaManager::ReplicaManager(const Options& options, Log& log, ServerTransport& server)
    : options_(options),
      log_(log),
      server_(server),
      client_(make_client_transport({})),
      random_(options.seed != 0 ? options.seed : SystemClock::instance().now_ns()) {
  log_.set_replication_required(options_.replicas > 0);
}

ReplicaManager::~ReplicaManager() = default;

Status ReplicaManager::use_log_memory(std::span<const std::byte> arena) {
  if (!options_.one_sided || !client_->one_sided()) return Status::kOk;
  if (Status s = client_->register_memory(arena); s != Status::kOk) {
    LOG_WARNING(
        "replication: cannot register the log memory for one-sided writes ({}); "
        "appends go as RPCs",
        status_name(s));
    return s;
  }
  one_sided_ = true;
  LOG_INFO("replication: appends go to backups as one-sided RDMA writes where they allow");
  return Status::kOk;
}

void ReplicaManager::update_servers(const std::vector<wire::ServerListItem>& servers) {
  const size_t target_before = target();
  std::map<uint64_t, std::string> backups;
  for (const auto& s : servers) {
    if (s.status == 0 && (s.services & wire::kServiceBackup) != 0 && s.server_id != server_id_) {
      backups.emplace(s.server_id, s.locator);
    }
  }
  backups_ = std::move(backups);
  stats_.backups = static_cast<uint32_t>(backups_.size());
  if (target() != target_before) unsettle_all();  // rule 11
  // Replicas on a server that is no longer a usable backup are lost: said once per backup.
  std::map<uint64_t, size_t> gone;
  for (auto& [id, seg] : segments_) {
    for (size_t i = seg.replicas.size(); i-- > 0;) {
      const uint64_t backup_id = seg.replicas[i].backup_id;
      if (!backups_.contains(backup_id)) {
        ++gone[backup_id];
        lose_replica(seg, i, Status::kUnavailable, /*quiet=*/true);
      }
    }
  }
  for (const auto& [backup_id, n] : gone) {
    LOG_WARNING("backup {} is no longer in the cluster: making our {} replicas there elsewhere",
                backup_id, n);
  }
  std::erase_if(resting_, [this](const auto& e) { return !backups_.contains(e.first); });
  if (backups_.size() >= options_.replicas) {
    if (warned_few_backups_) {
      LOG_INFO("{} backups are up: back to {} replicas per segment", backups_.size(),
               options_.replicas);
    }
    warned_few_backups_ = false;
  } else if (!backups_.empty() && !warned_few_backups_) {
    LOG_WARNING(
        "only {} other servers run a backup, fewer than --replicas {}: each segment is "
        "replicated on all {} of them until more enlist (a write is then acknowledged with "
        "fewer copies)",
        backups_.size(), options_.replicas, backups_.size());
    warned_few_backups_ = true;
  }
  dirty_ = true;
}

size_t ReplicaManager::target() const {
  return std::max<size_t>(1, std::min<size_t>(options_.replicas, backups_.size()));
}

void ReplicaManager::hold(Reply& reply) {
  if (fenced_) {
    reply.clear();
    reply.set_status(Status::kFenced);
    return;
  }
  Held h;
  h.token = reply.token();
  h.reply = reply;
  reply.defer();
  held_.push_back(std::move(h));
  ++stats_.replies_held;
  dirty_ = true;
}

bool ReplicaManager::replica_needed(uint64_t backup_id, uint64_t segment_id) const {
  // An older server list than the backup's restart: our replicas there may be its old
  // ones, not yet re-made.
  if (!backups_.contains(backup_id)) return true;
  auto it = segments_.find(segment_id);
  if (it == segments_.end() || !it->second.in_log) return false;
  const Seg& seg = it->second;
  const auto index = static_cast<uint32_t>(backup_id);
  if (std::any_of(seg.replicas.begin(), seg.replicas.end(), [index](const Replica& r) {
        return static_cast<uint32_t>(r.backup_id) == index;
      })) {
    return true;  // a replica of ours on that server, of any generation
  }
  if (seg.id != head_id_) return !segment_whole(seg);
  // The head grows: its replicas are never all whole for long. Open on R at the current
  // epoch, recorded at the coordinator, is what makes an older copy useless to recovery.
  return !head_open_durable();
}

std::pair<uint64_t, uint32_t> ReplicaManager::log_position() const {
  uint64_t head = 0;
  uint32_t length = 0;
  log_.head_state(&head, &length);
  return {head, length};
}

bool ReplicaManager::durable_through(uint64_t segment_id, uint32_t offset) const {
  uint32_t head_acked = 0;
  if (!log_durable(&head_acked)) return false;
  return segment_id < head_id_ || (segment_id == head_id_ && offset <= head_acked);
}

uint64_t ReplicaManager::run() {
  // Events with nothing outstanding too (a connection to a backup that died): left in,
  // they would keep the loop awake.
  if (std::exchange(wait_fd_ready_, false) || client_->outstanding() > 0 ||
      !awaiting_pin_.empty()) {
    client_->poll(0);
  }
  uint64_t now = SystemClock::instance().now_ns();
  if (now >= next_wake_ns_) dirty_ = true;  // a backoff (rule 10) is over
  // Segments whose marking waited for the transport to let go of their pins (rule 9): a
  // write that timed out leaves its bytes queued with no reply to come.
  for (auto it = awaiting_pin_.begin(); it != awaiting_pin_.end();) {
    auto seg = segments_.find(*it);
    ++it;
    if (seg == segments_.end()) {
      awaiting_pin_.erase(std::prev(it));
    } else {
      maybe_mark(seg->second);
    }
  }
  if (fenced_) {
    fail_held(Status::kFenced);
    next_wake_ns_ = UINT64_MAX;  // nothing is sent again: no backoff to wake for
  } else if (dirty_ || log_.change_count() != seen_changes_) {
    dirty_ = false;
    next_wake_ns_ = UINT64_MAX;  // the pass below sets it again for what it held back
    refresh_view();
    for (uint64_t id : active_) {
      Seg& seg = segments_.at(id);
      if (seg.in_log) choose_backups(seg);
    }
    send_writes();
    free_dead_segments();
    release_durable();
  }
  uint64_t wake = UINT64_MAX;
  if (client_->outstanding() > 0) {
    wake = kInFlightWakeNs;
  } else if (!held_.empty() || segments_.size() > 0) {
    // Something may be waiting for a backup to appear or a lost replica to be re-made.
    wake = held_.empty() ? kWaitingWakeNs * 10 : kWaitingWakeNs;
  }
  if (next_wake_ns_ != UINT64_MAX) {
    now = SystemClock::instance().now_ns();
    wake = std::min(wake, next_wake_ns_ > now ? next_wake_ns_ - now : 0);
  }
  return wake;
}

void ReplicaManager::refresh_view() {
  const uint64_t changes = log_.change_count();
  if (changes != seen_changes_) {
    // Read before the view: a change after this bumps the count again.
    seen_changes_ = changes;
    const uint64_t structure = log_.structure_change_count();
    bool whole_view = structure != seen_structure_;
    if (!whole_view) {
      // Only the head grew (rule 11): no need to read every segment.
      uint64_t head = 0;
      uint32_t length = 0;
      log_.head_state(&head, &length);
      auto it = segments_.find(head);
      if (head != head_id_ || it == segments_.end()) {
        whole_view = true;
      } else {
        it->second.length = length;
        head_length_ = length;
      }
    }
    if (whole_view) {
      seen_structure_ = structure;
      uint64_t head = 0;
      auto view = log_.replication_view(&head);
      for (auto& [id, seg] : segments_) seg.in_log = false;
      for (const auto& v : view) {
        auto [it, added] = segments_.try_emplace(v.id);
        Seg& seg = it->second;
        if (added) active_.insert(v.id);
        // A settled segment that changed (compacted) is looked at again.
        if (seg.length != v.length || seg.has_digest != v.has_digest || seg.closed != v.closed) {
          unsettle(seg);
        }
        seg.id = v.id;
        seg.in_log = true;
        seg.length = v.length;
        seg.closed = v.closed;
        seg.has_digest = v.has_digest;
        if (v.id == head) head_length_ = v.length;
      }
      head_id_ = head;
      for (auto& [id, seg] : segments_) {
        if (!seg.in_log) unsettle(seg);  // to be freed (rule 5)
      }
    }
  }
  // Everything the batch just handled wrote at most up to here.
  for (auto it = held_.rbegin(); it != held_.rend() && !it->stamped; ++it) {
    it->segment_id = head_id_;
    it->offset = head_length_;
    it->stamped = true;
  }
}

void ReplicaManager::choose_backups(Seg& seg) {
  const uint64_t now = SystemClock::instance().now_ns();
  while (seg.replicas.size() < options_.replicas) {
    std::vector<uint64_t> candidates;
    bool avoided = false;  // a backup left out only for having failed this segment
    for (const auto& backup : backups_) {
      const uint64_t id = backup.first;  // not a structured binding: clang 14 cannot capture one
      bool used = std::any_of(seg.replicas.begin(), seg.replicas.end(),
                              [id](const Replica& r) { return r.backup_id == id; });
      if (used) continue;
      if (backup_resting(id, now)) {  // rule 10: looked at again once its backoff is over
        next_wake_ns_ = std::min(next_wake_ns_, resting_.at(id).until_ns);
        continue;
      }
      if (seg.avoid.contains(id)) {
        avoided = true;
      } else {
        candidates.push_back(id);
      }
    }
    if (candidates.empty() && avoided) {
      // Every backup not resting failed this segment once: try them again.
      seg.avoid.clear();
      continue;
    }
    if (candidates.empty()) {
      if (backups_.empty() && !warned_no_backups_) {
        LOG_WARNING("no other server runs a backup: writes wait until one enlists");
        warned_no_backups_ = true;
      }
      return;
    }
    warned_no_backups_ = false;
    uint64_t id = candidates[random_() % candidates.size()];
    Replica r;
    r.backup_id = id;
    r.locator = backups_.at(id);
    r.serial = ++next_replica_serial_;
    seg.replicas.push_back(std::move(r));
  }
}

size_t ReplicaManager::writes_in_flight() const {
  size_t n = 0;
  for (uint64_t id : active_) {  // a settled segment has nothing in flight (rule 11)
    for (const auto& r : segments_.at(id).replicas) n += r.in_flight;
  }
  return n;
}

bool ReplicaManager::segment_whole(const Seg& seg) const {
  if (seg.replicas.size() < target()) return false;
  return std::all_of(seg.replicas.begin(), seg.replicas.end(), [&](const Replica& r) {
    return r.open_acked && r.acked >= seg.length && r.epoch_acked >= seg.epoch;
  });
}

bool ReplicaManager::head_open_durable() const {
  auto it = segments_.find(head_id_);
  return it != segments_.end() && open_durable(it->second);
}

bool ReplicaManager::log_durable(uint32_t* head_acked) const {
  for (uint64_t id : active_) {  // settled segments are whole (rule 11)
    const Seg& seg = segments_.at(id);
    if (!seg.in_log || id == head_id_) continue;
    if (!segment_whole(seg)) return false;
  }
  if (!head_open_durable()) return false;
  const Seg& head = segments_.at(head_id_);
  uint32_t acked = UINT32_MAX;
  for (const auto& r : head.replicas) acked = std::min(acked, r.acked);
  *head_acked = acked;
  return true;
}

bool ReplicaManager::open_durable(const Seg& seg) const {
  if (seg.replicas.size() < target()) return false;
  if (seg.id == head_id_ && seg.epoch_recorded < seg.epoch) return false;
  return std::all_of(seg.replicas.begin(), seg.replicas.end(),
                     [&](const Replica& r) { return r.open_acked && r.epoch_acked >= seg.epoch; });
}

void ReplicaManager::send_writes() {
  const uint64_t now = SystemClock::instance().now_ns();
  copy_.segment_id = 0;  // a segment may have been compacted since the last pass
  // Segments go to the backups in id order (rules 1 and 2): this bounds the replicas open
  // on a backup when many segments wait at once (a recovery master's replay fills dozens
  // in a moment), and keeps "a closed segment with a digest has a durable successor".
  // Settled segments (rule 11) are whole and durably open: only the active ones can make
  // either answer below no.
  bool others_whole = true;
  // The newest segment with a digest that is durably open (0: none); a segment has a newer
  // one durably open if this is newer than it.
  uint64_t newest_durable_digest = settled_digests_.empty() ? 0 : *settled_digests_.rbegin();
  for (uint64_t id : active_) {
    const Seg& seg = segments_.at(id);
    if (!seg.in_log) continue;
    if (id != head_id_ && !segment_whole(seg)) others_whole = false;
    if (seg.has_digest && open_durable(seg)) {
      newest_durable_digest = std::max(newest_durable_digest, id);
    }
  }
  bool lower_whole = true;  // every lower segment in the log but the head is whole
  for (auto it = active_.begin(); it != active_.end();) {
    const uint64_t id = *it;
    Seg& seg = segments_.at(id);
    if (!seg.in_log) {
      ++it;
      continue;
    }
    const bool is_head = id == head_id_;
    const bool may_open = is_head ? others_whole : lower_whole;
    // A former head closes once a newer head is durably open; a survivor (no digest,
    // named by no durable digest yet) once it is whole.
    const bool may_close = !is_head && seg.closed &&
                           (seg.has_digest ? newest_durable_digest > id : segment_whole(seg));
    // By index: send_write may lose the replica (erased from seg.replicas) on the spot.
    for (size_t i = 0; i < seg.replicas.size();) {
      Replica& r = seg.replicas[i];
      const size_t before = seg.replicas.size();
      const bool due = !r.close_sent && r.in_flight < options_.max_in_flight &&
                       (r.opened || may_open) &&
                       (r.sent < seg.length || !r.opened || r.epoch_sent < seg.epoch || may_close);
      if (due && r.retry_at_ns > now) {
        next_wake_ns_ = std::min(next_wake_ns_, r.retry_at_ns);  // rule 10
      } else if (due) {
        send_write(seg, r, may_close);
      }
      if (seg.replicas.size() == before) ++i;  // else the next one moved into place i
    }
    if (is_head) record_epoch(seg);
    if (!is_head && !segment_whole(seg)) lower_whole = false;
    if (may_settle(seg)) {
      settle(seg);
      it = active_.erase(it);
    } else {
      ++it;
    }
  }
}

bool ReplicaManager::may_settle(const Seg& seg) const {
  if (!seg.in_log || !seg.closed || seg.id == head_id_ || !seg.marked || seg.epoch_in_flight ||
      seg.replicas.size() < target()) {
    return false;
  }
  return std::all_of(seg.replicas.begin(), seg.replicas.end(), [&](const Replica& r) {
    return r.close_acked && r.in_flight == 0 && r.open_acked && r.acked >= seg.length &&
           r.epoch_acked >= seg.epoch;
  });
}

void ReplicaManager::settle(Seg& seg) {
  seg.settled = true;
  if (seg.has_digest) settled_digests_.insert(seg.id);
}

void ReplicaManager::unsettle(Seg& seg) {
  if (!seg.settled) return;
  seg.settled = false;
  settled_digests_.erase(seg.id);
  active_.insert(seg.id);
  dirty_ = true;
}

void ReplicaManager::unsettle_all() {
  for (auto& [id, seg] : segments_) unsettle(seg);
}

void ReplicaManager::view_stale() {
  // Not marked out of the log here: a segment cleaned away is named by the digest of every
  // head this manager knows of, so its replicas must stay until the head that drops it is
  // durable (rule 5), and a compacted one is still in the log. The next pass reads the
  // whole view again and finds out which.
  seen_structure_ = UINT64_MAX;
  seen_changes_ = UINT64_MAX;
  dirty_ = true;
}

void ReplicaManager::send_write(Seg& seg, Replica& r, bool close) {
  uint32_t length = 0;
  Certificate cert;
  bool closed = false;
  if (!log_.replication_state(seg.id, &length, &cert, &closed)) {
    return view_stale();  // cleaned since the view
  }
  if (length < r.sent) {
    // Only a compacted segment shrinks, and only replicated ones are compacted.
    LOG_ERROR("segment {} shrank below what backup {} holds; making a new replica", seg.id,
              r.backup_id);
    return lose_replica(seg, static_cast<size_t>(&r - seg.replicas.data()), Status::kInternal);
  }
  if (r.region && r.opened && r.rpcs_in_flight == 0 && r.epoch_sent == seg.epoch &&
      length > r.sent && !(close && closed) && length <= r.region->capacity) {
    return send_remote(seg, r, length, cert);
  }
  wire::BackupWriteRequest req{.master_id = server_id_,
                               .segment_id = seg.id,
                               .epoch = seg.epoch,
                               .offset = r.sent,
                               .length = length - r.sent,
                               .certificate_bytes = cert.segment_bytes,
                               .certificate_checksum = cert.checksum,
                               .open = static_cast<uint8_t>(r.opened ? 0 : 1),
                               .close = static_cast<uint8_t>(close && closed ? 1 : 0),
                               .remote = static_cast<uint8_t>(!r.opened && one_sided_ ? 1 : 0)};
  const bool closing = req.close == 1;
  const Sent sent = sent_of(seg, r, length, closing, /*rpc=*/true);
  auto done = [this, sent](Status transport, const wire::MessageHeader& h,
                           std::span<const std::byte> response) {
    Status s = transport != Status::kOk ? transport : static_cast<Status>(h.status);
    on_write_done(sent, s, response);
  };
  const ClientTransport::Request request{.opcode = wire::Opcode::kBackupWrite,
                                         .client_id = server_id_,
                                         .rpc_seq = ++rpc_seq_,
                                         .timeout_ns = options_.rpc_timeout_ns};
  if (!seg.marked) {
    // Sent from where the bytes lie in the log (rule 9): nothing moves them before the
    // segment is marked replicated, and it is not while the transport holds its pin.
    views_.clear();
    if (!log_.replication_views(seg.id, r.sent, req.length, &views_)) {
      return view_stale();  // cleaned (or compacted) since its state was read
    }
    if (seg.pin == nullptr) seg.pin = std::make_shared<char>();
    client_->send_pieces(r.locator, request, std::as_bytes(std::span(&req, 1)), views_, seg.pin,
                         std::move(done));
  } else {
    // Marked: the cleaner may compact or free it on its thread at any time, so the range
    // is copied out under the log's lock, once for every replica that needs the same one
    // in this pass.
    if (copy_.segment_id != seg.id || copy_.from != r.sent || copy_.length != length) {
      copy_.segment_id = 0;
      copy_.buffer = take_buffer(req.length);
      if (!log_.read_for_replication(seg.id, r.sent, {copy_.buffer->bytes.get(), req.length})) {
        return view_stale();  // cleaned (or compacted) since its state was read
      }
      copy_.segment_id = seg.id;
      copy_.from = r.sent;
      copy_.length = length;
    }
    const std::span<const std::byte> data[] = {{copy_.buffer->bytes.get(), req.length}};
    client_->send_pieces(r.locator, request, std::as_bytes(std::span(&req, 1)), data, copy_.buffer,
                         std::move(done));
  }
  r.sent = length;
  r.opened = true;
  r.epoch_sent = sent.epoch;
  if (closing) r.close_sent = true;
  ++r.in_flight;
  ++r.rpcs_in_flight;
  ++stats_.write_rpcs;
  stats_.bytes_sent += req.length;
}

std::shared_ptr<ReplicaManager::Buffer> ReplicaManager::take_buffer(size_t bytes) {
  // Reused: the current one once the transport let it go, else a spare one that is free.
  if (copy_.buffer != nullptr && copy_.buffer.use_count() == 1 && copy_.buffer->capacity >= bytes) {
    return std::move(copy_.buffer);
  }
  if (copy_.buffer != nullptr) spare_.push_back(std::move(copy_.buffer));
  std::shared_ptr<Buffer> found;
  for (auto it = spare_.begin(); it != spare_.end(); ++it) {
    if (it->use_count() == 1 && (*it)->capacity >= bytes) {
      found = std::move(*it);
      spare_.erase(it);
      break;
    }
  }
  // Spares the transport is done with are kept, a few at most, unless too small.
  constexpr size_t kMaxFreeSpares = 4;
  size_t free_kept = 0;
  std::erase_if(spare_, [&](const std::shared_ptr<Buffer>& b) {
    if (b.use_count() > 1) return false;
    return b->capacity < bytes || ++free_kept > kMaxFreeSpares;
  });
  if (found != nullptr) return found;
  auto b = std::make_shared<Buffer>();
  b->capacity = std::max<size_t>(bytes, 1u << 20);
  b->bytes.reset(new std::byte[b->capacity]);  // not zero-filled
  return b;
}

void ReplicaManager::send_remote(Seg& seg, Replica& r, uint32_t length, const Certificate& cert) {
  const wire::BackupWriteResponse& region = *r.region;
  views_.clear();
  if (!log_.replication_views(seg.id, r.sent, length - r.sent, &views_)) {
    return view_stale();  // cleaned (or compacted) since its state was read
  }
  remote_writes_.clear();
  uint64_t at = region.address + region.data_offset + r.sent;
  for (auto v : views_) {
    remote_writes_.push_back({.address = at, .key = region.key, .bytes = v});
    at += v.size();
  }
  // The slot goes after the bytes it certifies, on the same queue pair; it is copied by
  // write_remote() (not in registered memory), so a local will do.
  wire::RemoteCertificate slot{.held_bytes = length,
                               .certificate_bytes = cert.segment_bytes,
                               .certificate_checksum = cert.checksum,
                               .sequence = ++r.remote_sequence};
  slot.check = checksum64(
      std::as_bytes(std::span(&slot, 1)).first(offsetof(wire::RemoteCertificate, check)));
  remote_writes_.push_back({.address = region.address + region.slot_offset,
                            .key = region.key,
                            .bytes = std::as_bytes(std::span(&slot, 1))});
  const Sent sent = sent_of(seg, r, length, /*close=*/false, /*rpc=*/false);
  stats_.remote_bytes += length - r.sent;
  ++stats_.remote_writes;
  r.sent = length;
  ++r.in_flight;
  client_->write_remote(r.locator, remote_writes_, options_.rpc_timeout_ns,
                        [this, sent](Status s) { on_write_done(sent, s); });
}

void ReplicaManager::maybe_mark(Seg& seg) {
  if (seg.marked || seg.replicas.size() < target() ||
      !std::all_of(seg.replicas.begin(), seg.replicas.end(),
                   [](const Replica& x) { return x.close_acked; })) {
    return;
  }
  // Rule 9: not while a transport may still read the segment's bytes where they lie (a
  // write to a replica lost meanwhile can wait in a connection's queue). Each such write
  // ends in on_write_done, which looks again.
  if (seg.pin != nullptr && seg.pin.use_count() > 1) {
    awaiting_pin_.insert(seg.id);
    return;
  }
  awaiting_pin_.erase(seg.id);
  seg.pin.reset();
  log_.mark_replicated(seg.id);  // the cleaner may take it now
  seg.marked = true;
}

void ReplicaManager::on_write_done(const Sent& sent, Status status,
                                   std::span<const std::byte> response) {
  dirty_ = true;
  auto it = segments_.find(sent.segment_id);
  if (it == segments_.end()) return;
  Seg& seg = it->second;
  auto r = std::find_if(seg.replicas.begin(), seg.replicas.end(),
                        [&](const Replica& x) { return x.serial == sent.serial; });
  if (r == seg.replicas.end()) {  // lost meanwhile
    maybe_mark(seg);
    return;
  }
  --r->in_flight;
  if (sent.rpc) --r->rpcs_in_flight;
  if (status == Status::kOk) {
    if (response.size() == sizeof(wire::BackupWriteResponse) && !r->region) {
      // The backup exposed the replica's buffer (rule 8): if it holds a segment, the
      // next appends go one-sided.
      wire::BackupWriteResponse region;
      std::memcpy(&region, response.data(), sizeof(region));
      if (uint64_t{region.data_offset} + region.capacity <= region.bytes &&
          uint64_t{region.slot_offset} + sizeof(wire::RemoteCertificate) <= region.data_offset) {
        r->region = region;
      }
    }
    // An answer to a write sent before a kRetry took `sent` back (rule 10) counts as
    // well: the backup holds what it acknowledged.
    r->acked = std::max(r->acked, sent.end);
    r->sent = std::max(r->sent, r->acked);
    r->open_acked = true;
    r->epoch_acked = std::max(r->epoch_acked, sent.epoch);
    if (sent.close) r->close_acked = true;
    if (sent.generation == r->generation) {
      r->retries = 0;
      backup_answered(r->backup_id);
    }
    maybe_mark(seg);
    return;
  }
  if (status == Status::kFenced) {
    if (!fenced_) {
      LOG_ERROR(
          "backup {} refused our writes: the coordinator declared this master crashed; no "
          "more writes will be acknowledged",
          r->backup_id);
    }
    fenced_ = true;
    return;
  }
  // Rule 10: a write sent before a kRetry took `sent` back fails as a gap behind the
  // refused one; what it carried is sent again.
  if (sent.generation != r->generation) return;
  // A replica exposed for one-sided appends (rule 8) is lost on a kRetry, as before.
  bool refused_too_often = false;
  if (status == Status::kRetry && sent.rpc && !r->region) {
    if (retry_later(*r)) return;
    refused_too_often = true;
  }
  // The backup itself is failing (or refused too often): it rests (rule 10).
  if (status == Status::kUnavailable || status == Status::kTimeout || status == Status::kNoSpace ||
      status == Status::kIoError || refused_too_often) {
    backup_failed(r->backup_id, status);
  }
  const bool quiet = backup_resting(r->backup_id, SystemClock::instance().now_ns());
  if (quiet) ++resting_[r->backup_id].losses;
  lose_replica(seg, static_cast<size_t>(r - seg.replicas.begin()), status, quiet);
}

bool ReplicaManager::retry_later(Replica& r) {
  if (++r.retries > options_.max_retries) return false;
  ++stats_.retries;
  // Everything the backup has not acknowledged goes again, from there, once the backoff
  // is over; the answers to what is in flight now carry the old generation.
  ++r.generation;
  r.sent = r.acked;
  r.epoch_sent = r.epoch_acked;
  if (!r.open_acked) r.opened = false;
  if (!r.close_acked) r.close_sent = false;
  const uint64_t backoff =
      std::min(options_.retry_backoff_ns << std::min<uint32_t>(r.retries - 1, 20),
               options_.max_backup_backoff_ns);
  r.retry_at_ns = SystemClock::instance().now_ns() + backoff;
  next_wake_ns_ = std::min(next_wake_ns_, r.retry_at_ns);
  return true;
}

void ReplicaManager::backup_failed(uint64_t backup_id, Status why) {
  const uint64_t now = SystemClock::instance().now_ns();
  Resting& rest = resting_[backup_id];
  // Failures of writes sent before it began resting say nothing new.
  if (now < rest.until_ns) return;
  // The backoff doubles while the backup keeps failing, also when it answers some writes
  // in between (a full disk fails closes, not appends); it starts over once it has not
  // failed for a while.
  if (rest.last_failure_ns != 0 && now - rest.last_failure_ns > kForgetFailuresNs) {
    rest.backoff_ns = 0;
  }
  rest.backoff_ns = rest.backoff_ns == 0
                        ? options_.backup_backoff_ns
                        : std::min(rest.backoff_ns * 2, options_.max_backup_backoff_ns);
  rest.until_ns = now + rest.backoff_ns;
  rest.last_failure_ns = now;
  next_wake_ns_ = std::min(next_wake_ns_, rest.until_ns);
  LOG_WARNING(
      "backup {} failed ({}): making our replicas there elsewhere, and no new ones there for "
      "{} ms{}",
      backup_id, status_name(why), rest.backoff_ns / 1'000'000,
      rest.losses > 0 ? fmt::format(" ({} replicas lost there so far)", rest.losses) : "");
}

void ReplicaManager::backup_answered(uint64_t backup_id) {
  // Kept (its backoff doubles if it fails again soon); said once per failing spell.
  auto it = resting_.find(backup_id);
  if (it == resting_.end() || it->second.losses == 0) return;
  LOG_INFO("backup {} answers again ({} replicas lost there while it failed)", backup_id,
           it->second.losses);
  it->second.losses = 0;
}

bool ReplicaManager::backup_resting(uint64_t backup_id, uint64_t now) const {
  auto it = resting_.find(backup_id);
  return it != resting_.end() && now < it->second.until_ns;
}

void ReplicaManager::lose_replica(Seg& seg, size_t index, Status why, bool quiet) {
  Replica r = std::move(seg.replicas[index]);
  seg.replicas.erase(seg.replicas.begin() + static_cast<ptrdiff_t>(index));
  unsettle(seg);  // rule 11
  ++stats_.replicas_lost;
  dirty_ = true;
  if (!quiet) {
    LOG_WARNING("lost the replica of segment {} on backup {} ({}); making a new one elsewhere",
                seg.id, r.backup_id, status_name(why));
  }
  if (!r.close_acked && !seg.closed) {
    // The stale copy may be open while the segment still grows: raise the epoch so
    // recovery can tell it from the others (rule 4). The survivors get the new epoch with
    // their next write. A segment closed in memory is not raised: its survivors may be
    // closed on their backups already (never written again, so never at a new epoch),
    // and every copy of it ends closed, which recovery prefers to any open one.
    ++seg.epoch;
  }
  seg.avoid.insert(r.backup_id);
  if (auto b = backups_.find(r.backup_id); b != backups_.end()) {
    // Best effort, resting or not: a backup that is still up (slow, full disk, no buffer)
    // drops its copy and its buffer. Losses there are bounded by its backoff.
    send_free(b->second, seg.id);
  }
}

void ReplicaManager::send_free(const std::string& locator, uint64_t segment_id) {
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(
      wire::BackupFreeRequest{.master_id = server_id_, .segment_id = segment_id});
  client_->send(locator,
                {.opcode = wire::Opcode::kBackupFree,
                 .client_id = server_id_,
                 .rpc_seq = ++rpc_seq_,
                 .timeout_ns = options_.rpc_timeout_ns},
                body, [](Status, const wire::MessageHeader&, std::span<const std::byte>) {});
}

void ReplicaManager::record_epoch(Seg& seg) {
  if (seg.epoch <= seg.epoch_recorded || seg.epoch_in_flight || options_.coordinator.empty()) {
    return;
  }
  // Only once every replica holds the new epoch: recorded earlier, a crash now would
  // leave no replica of the head that recovery may use.
  if (seg.replicas.size() < target()) return;
  for (const auto& r : seg.replicas) {
    if (r.epoch_acked < seg.epoch) return;
  }
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(wire::ReplicationEpochEntry{
      .master_id = server_id_, .segment_id = seg.id, .epoch = seg.epoch});
  const uint64_t segment_id = seg.id;
  const uint64_t epoch = seg.epoch;
  seg.epoch_in_flight = true;
  client_->send(options_.coordinator,
                {.opcode = wire::Opcode::kSetReplicationEpoch,
                 .client_id = server_id_,
                 .rpc_seq = ++rpc_seq_,
                 .timeout_ns = options_.rpc_timeout_ns},
                body,
                [this, segment_id, epoch](Status transport, const wire::MessageHeader& h,
                                          std::span<const std::byte>) {
                  dirty_ = true;
                  Status s = transport != Status::kOk ? transport : static_cast<Status>(h.status);
                  auto it = segments_.find(segment_id);
                  if (it != segments_.end()) {
                    it->second.epoch_in_flight = false;
                    if (s == Status::kOk) {
                      it->second.epoch_recorded = std::max(it->second.epoch_recorded, epoch);
                    }
                  }
                  if (s == Status::kFenced) {
                    fenced_ = true;
                  } else if (s != Status::kOk) {
                    LOG_WARNING("cannot record epoch {} of segment {} at the coordinator: {}",
                                epoch, segment_id, status_name(s));
                  }
                });
}

void ReplicaManager::free_dead_segments() {
  uint32_t head_acked = 0;
  bool durable = log_durable(&head_acked);
  if (!durable) return;
  for (auto it = active_.begin(); it != active_.end();) {  // one out of the log is active
    auto seg_it = segments_.find(*it);
    Seg& seg = seg_it->second;
    bool busy = std::any_of(seg.replicas.begin(), seg.replicas.end(),
                            [](const Replica& r) { return r.in_flight > 0; });
    // Rule 5: only once the head whose digest drops it is durable.
    if (seg.in_log || busy || seg.epoch_in_flight) {
      ++it;
      continue;
    }
    for (const auto& r : seg.replicas) send_free(r.locator, seg.id);
    ++stats_.segments_freed;
    awaiting_pin_.erase(seg.id);
    segments_.erase(seg_it);
    it = active_.erase(it);
  }
}

void ReplicaManager::release_durable() {
  uint32_t head_acked = 0;
  if (held_.empty() || !log_durable(&head_acked)) return;
  while (!held_.empty()) {
    const Held& h = held_.front();
    if (!h.stamped || h.segment_id > head_id_ ||
        (h.segment_id == head_id_ && h.offset > head_acked)) {
      break;
    }
    server_.send_deferred(h.token, h.reply);
    held_.pop_front();
    ++stats_.replies_released;
  }
}

void ReplicaManager::fail_held(Status s) {
  while (!held_.empty()) {
    Held& h = held_.front();
    h.reply.clear();
    h.reply.set_status(s);
    server_.send_deferred(h.token, h.reply);
    held_.pop_front();
  }
}

}  // namespace ramkv::master
