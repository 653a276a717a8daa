#include "coordinator/recovery_manager.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <utility>

#include "common/config.h"
#include "common/log.h"

namespace ramkv::coordinator {

namespace {

constexpr uint64_t kInFlightWakeNs = 20'000'000;

// Whether every hash of each of `tablets` lies in a tablet of `master_id` in `state`.
bool owned_by(const CoordinatorState& state, const std::vector<wire::TabletWire>& tablets,
              uint64_t master_id) {
  for (const auto& t : tablets) {
    if (t.table_id == 0) return false;  // tablets(0) would be every table's
    uint64_t next = t.start_hash;       // the first hash not yet seen owned
    bool covered = false;
    for (const Tablet& s : state.tablets(t.table_id)) {  // by start_hash, disjoint
      if (s.end_hash < next) continue;
      if (s.start_hash > next || s.server_id != master_id) break;
      if (s.end_hash >= t.end_hash) {
        covered = true;
        break;
      }
      next = s.end_hash + 1;
    }
    if (!covered) return false;
  }
  return true;
}

}  // namespace

RecoveryManager::RecoveryManager(const RecoveryOptions& options, RecoveryHost& host,
                                 const Clock& clock)
    : options_(options),
      host_(host),
      clock_(clock),
      client_(make_client_transport({})),
      // Ids differ across coordinator restarts: a recovery master's late report for a
      // recovery the previous coordinator ran is recognised as unknown.
      next_recovery_id_(unix_ns()) {}

RecoveryManager::~RecoveryManager() = default;

uint64_t RecoveryManager::unix_ns() const {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

RecoveryManager::Recovery* RecoveryManager::find(uint64_t recovery_id) {
  for (auto& r : recoveries_) {
    if (r.id == recovery_id) return &r;
  }
  return nullptr;
}

size_t RecoveryManager::running() const {
  return static_cast<size_t>(std::count_if(
      recoveries_.begin(), recoveries_.end(),
      [](const auto& r) { return r.phase != Phase::kDone && r.phase != Phase::kFailed; }));
}

void RecoveryManager::check() {
  const CoordinatorState& state = host_.state();
  // Masters that own tablets and are not up.
  std::set<uint64_t> owners;
  for (const auto& t : state.tablets(0)) owners.insert(t.server_id);
  for (uint64_t owner : owners) {
    const ServerInfo* s = state.find_server(owner);
    if (s != nullptr && s->status == ServerStatus::kUp) continue;
    bool active = std::any_of(recoveries_.begin(), recoveries_.end(), [&](const Recovery& r) {
      return r.master_id == owner && r.phase != Phase::kDone &&
             (r.phase != Phase::kFailed || r.retry_at_ns > clock_.now_ns());
    });
    if (!active) start(owner);
  }
  // Crashed masters with nothing to recover (no tablets, or all moved): finished.
  for (const auto& s : state.servers()) {
    if (s.status == ServerStatus::kCrashed && (s.services & wire::kServiceMaster) != 0 &&
        !owners.contains(s.id)) {
      bool active = std::any_of(recoveries_.begin(), recoveries_.end(), [&](const Recovery& r) {
        return r.master_id == s.id && r.phase != Phase::kDone && r.phase != Phase::kFailed;
      });
      if (!active) host_.finish_master(s.id);
    }
  }
  // Recovery masters that went down lose their partitions.
  for (auto& r : recoveries_) {
    if (r.phase != Phase::kReplaying) continue;
    for (auto& p : r.partitions) {
      if (p.done || p.master_id == 0) continue;
      const ServerInfo* m = state.find_server(p.master_id);
      if (m == nullptr || m->status != ServerStatus::kUp) {
        partition_failed(r, p, Status::kUnavailable);
      }
    }
  }
  dirty_ = true;
}

void RecoveryManager::start(uint64_t master_id) {
  // Forget old reports of this master beyond the last one.
  Recovery r;
  r.id = ++next_recovery_id_;
  r.master_id = master_id;
  r.declared_unix_ns = unix_ns();
  for (const auto& old : recoveries_) {
    if (old.master_id != master_id) continue;
    r.declared_unix_ns = old.declared_unix_ns;
    r.error = old.error;  // said once in the log, not at every retry
  }
  std::erase_if(recoveries_, [&](const Recovery& old) { return old.master_id == master_id; });
  recoveries_.push_back(std::move(r));
  Recovery& added = recoveries_.back();
  if (added.error.empty()) {
    LOG_INFO("recovery {} of master {} starts: asking every backup for its replicas", added.id,
             wire::server_id_text(master_id));
  }
  send_start_reading(added);
  // Keep the last 64 finished recoveries for reports.
  while (recoveries_.size() > 64 && (recoveries_.front().phase == Phase::kDone)) {
    recoveries_.pop_front();
  }
}

void RecoveryManager::send_start_reading(Recovery& r) {
  r.phase = Phase::kReading;
  r.answers.clear();
  r.pending = 0;
  std::vector<std::byte> body;
  // Backups read nothing until the partition map names their primary replicas: reading
  // every replica would read the log R times (docs/recovery.md, step 4).
  wire::BodyWriter(&body).put(wire::StartReadingDataRequest{
      .master_id = r.master_id, .recovery_id = r.id, .flags = wire::kDeferReads});
  for (const auto& server : host_.state().servers()) {
    if (server.status != ServerStatus::kUp || (server.services & wire::kServiceBackup) == 0) {
      continue;
    }
    const uint64_t recovery_id = r.id;
    const uint64_t backup_id = server.id;
    const std::string locator = server.locator;
    ++r.pending;
    client_->send(
        server.locator,
        {.opcode = wire::Opcode::kBackupStartReadingData, .timeout_ns = options_.rpc_timeout_ns},
        body,
        [this, recovery_id, backup_id, locator](Status transport, const wire::MessageHeader& h,
                                                std::span<const std::byte> reply) {
          dirty_ = true;
          Recovery* rec = find(recovery_id);
          if (rec == nullptr || rec->phase != Phase::kReading) return;
          --rec->pending;
          Status s = transport != Status::kOk ? transport : static_cast<Status>(h.status);
          if (s == Status::kOk) {
            auto a = decode_backup_answer(backup_id, locator, reply);
            if (a.ok()) {
              rec->answers.push_back(std::move(*a));
            } else {
              LOG_WARNING("recovery {}: backup {} sent a malformed answer", recovery_id,
                          wire::server_id_text(backup_id));
            }
          } else {
            LOG_WARNING("recovery {}: backup {} did not answer: {}", recovery_id,
                        wire::server_id_text(backup_id), status_name(s));
          }
          if (rec->pending == 0) on_answers(*rec);
        });
  }
  if (r.pending == 0) fail(r, "no backup is up");
}

void RecoveryManager::on_answers(Recovery& r) {
  const CoordinatorState& state = host_.state();
  std::vector<Tablet> tablets = state.tablets_of(r.master_id);
  if (tablets.empty()) {
    r.phase = Phase::kDone;
    r.finished_unix_ns = unix_ns();
    host_.finish_master(r.master_id);
    return;
  }
  PlanOptions o{.partition_bytes = options_.partition_bytes,
                .min_partition_bytes = options_.min_partition_bytes,
                .recovery_masters = static_cast<uint32_t>(state.up_masters().size())};
  std::string error;
  auto plan = plan_recovery(r.master_id, tablets, r.answers, state.replication_epoch(r.master_id),
                            o, &error);
  if (!plan.ok()) return fail(r, error.empty() ? std::string(status_name(plan.status())) : error);
  r.plan = std::move(*plan);
  r.partitions.clear();
  for (const auto& p : r.plan.partitions) {
    Partition part;
    part.plan = p;
    r.partitions.push_back(std::move(part));
  }
  size_t replicas = 0;
  for (const auto& [segment, where] : r.plan.locations) replicas += where.size();
  std::string spread;
  for (const auto& [backup_id, segments] : r.plan.primaries) {
    spread += fmt::format("{}{}", spread.empty() ? "" : "/", segments.size());
  }
  LOG_INFO(
      "recovery {} of master {}: log complete ({} segments, {} usable replicas on {} backups, "
      "primaries {}, head {}); about {} in {} partitions",
      r.id, wire::server_id_text(r.master_id), r.plan.locations.size(), replicas, r.answers.size(),
      spread, r.plan.digest_segment_id, format_bytes(r.plan.estimated_bytes), r.partitions.size());
  send_partitioning(r);
}

void RecoveryManager::send_partitioning(Recovery& r) {
  // The recovery masters start at once, without waiting for the backups' answers: a
  // backup that has not taken the map yet answers their data requests kRetry, and one
  // that cannot take it is dead or restarted, which they notice themselves (the next
  // replica of a segment is asked). Waiting would add a round trip, and more: the
  // coordinator's loop can stall for hundreds of milliseconds here, behind commits whose
  // fsync queues up after the backups' recovery reads (docs/recovery.md).
  r.phase = Phase::kReplaying;
  r.pending = 0;
  if (std::none_of(r.answers.begin(), r.answers.end(),
                   [](const BackupAnswer& a) { return !a.replicas.empty(); })) {
    return fail(r, "no backup holds a replica");
  }
  uint32_t count = 0;
  for (const auto& p : r.partitions) count += static_cast<uint32_t>(p.plan.tablets.size());
  for (const auto& a : r.answers) {
    if (a.replicas.empty()) continue;
    // The same map to every backup, each with its own primaries (possibly none).
    static const std::vector<uint64_t> kNone;
    auto named = r.plan.primaries.find(a.backup_id);
    const auto& primaries = named == r.plan.primaries.end() ? kNone : named->second;
    std::vector<std::byte> body;
    wire::BodyWriter w(&body);
    w.put(wire::StartPartitioningRequest{.master_id = r.master_id,
                                         .recovery_id = r.id,
                                         .count = count,
                                         .primary_count = static_cast<uint32_t>(primaries.size()),
                                         .flags = wire::kPrimariesNamed});
    for (const auto& p : r.partitions) {
      for (const auto& t : p.plan.tablets) {
        w.put(wire::PartitionTablet{.table_id = t.table_id,
                                    .start_hash = t.start_hash,
                                    .end_hash = t.end_hash,
                                    .partition_id = p.plan.id});
      }
    }
    for (uint64_t segment_id : primaries) w.put(segment_id);
    const uint64_t recovery_id = r.id;
    const uint64_t backup_id = a.backup_id;
    ++r.pending;
    client_->send(
        a.locator,
        {.opcode = wire::Opcode::kBackupStartPartitioning, .timeout_ns = options_.rpc_timeout_ns},
        body,
        [this, recovery_id, backup_id](Status transport, const wire::MessageHeader& h,
                                       std::span<const std::byte>) {
          dirty_ = true;
          Recovery* rec = find(recovery_id);
          if (rec == nullptr || rec->phase != Phase::kReplaying) return;
          --rec->pending;
          Status s = transport != Status::kOk ? transport : static_cast<Status>(h.status);
          if (s != Status::kOk) {
            // Its replicas are not split: recovery masters given a partition from now on
            // must not ask it (those already running find out themselves). Where it was
            // the primary, the next replica listed becomes the first a recovery master
            // asks; that backup reads it when asked (a secondary read on demand).
            LOG_WARNING("recovery {}: backup {} cannot partition: {}; using other replicas",
                        recovery_id, wire::server_id_text(backup_id), status_name(s));
            for (auto& [segment, where] : rec->plan.locations) {
              std::erase_if(where, [&](const auto& l) { return l.first == backup_id; });
            }
          }
          for (const auto& [segment, where] : rec->plan.locations) {
            if (where.empty()) {
              return fail(*rec, fmt::format("segment {} lost its last usable replica while "
                                            "backups were partitioning",
                                            segment));
            }
          }
        });
  }
  for (auto& p : r.partitions) {
    if (r.phase != Phase::kReplaying) return;  // assign() failed the recovery
    assign(r, p);
  }
}

void RecoveryManager::assign(Recovery& r, Partition& p) {
  std::vector<uint64_t> masters;
  for (uint64_t m : host_.state().up_masters()) {
    if (m != r.master_id && !p.failed_masters.contains(m)) masters.push_back(m);
  }
  if (masters.empty() && !p.failed_masters.empty()) {
    p.failed_masters.clear();  // every master failed it once: try them again
    for (uint64_t m : host_.state().up_masters()) {
      if (m != r.master_id) masters.push_back(m);
    }
  }
  if (masters.empty()) return fail(r, "no master is up to recover onto");
  if (++p.attempts > options_.max_partition_attempts) {
    return fail(r, fmt::format("partition {} failed on {} masters", p.plan.id, p.attempts - 1));
  }
  // Spread: partition i prefers the i-th master, so different partitions go to different
  // masters while there are enough.
  p.master_id = masters[(p.plan.id + p.attempts - 1) % masters.size()];
  send_recover(r, p);
}

void RecoveryManager::send_recover(Recovery& r, Partition& p) {
  const ServerInfo* m = host_.state().find_server(p.master_id);
  if (m == nullptr) return partition_failed(r, p, Status::kUnavailable);
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  uint32_t locations = 0;
  for (const auto& [segment, where] : r.plan.locations)
    locations += static_cast<uint32_t>(where.size());
  w.put(wire::RecoverRequest{.recovery_id = r.id,
                             .crashed_master_id = r.master_id,
                             .safe_version = r.plan.safe_version,
                             .partition_id = p.plan.id,
                             .tablet_count = static_cast<uint32_t>(p.plan.tablets.size()),
                             .location_count = locations});
  for (const auto& t : p.plan.tablets) {
    w.put(wire::TabletWire{.table_id = t.table_id,
                           .start_hash = t.start_hash,
                           .end_hash = t.end_hash,
                           .server_id = r.master_id});
  }
  for (const auto& [segment, where] : r.plan.locations) {
    // The primary first: it is the one that read the segment. The secondaries after it,
    // rotated by partition, so that after a primary fails the recovery masters' reads of
    // its segments spread over the other backups.
    for (size_t k = 0; k < where.size(); ++k) {
      const size_t secondaries = where.size() - 1;
      const size_t at = k == 0 ? 0 : 1 + (k - 1 + p.plan.id) % secondaries;
      const auto& [backup_id, locator] = where[at];
      w.put(wire::RecoveryLocation{.segment_id = segment,
                                   .backup_id = backup_id,
                                   .locator_bytes = static_cast<uint32_t>(locator.size())});
      w.put_bytes(locator);
    }
  }
  const uint64_t recovery_id = r.id;
  const uint32_t partition_id = p.plan.id;
  const uint64_t serial = p.serial = ++next_serial_;
  LOG_INFO("recovery {}: partition {} ({} tablets, about {}) to master {}", r.id, p.plan.id,
           p.plan.tablets.size(), format_bytes(p.plan.estimated_bytes),
           wire::server_id_text(p.master_id));
  client_->send(m->locator,
                {.opcode = wire::Opcode::kRecover, .timeout_ns = options_.rpc_timeout_ns}, body,
                [this, recovery_id, partition_id, serial](
                    Status transport, const wire::MessageHeader& h, std::span<const std::byte>) {
                  dirty_ = true;
                  Status s = transport != Status::kOk ? transport : static_cast<Status>(h.status);
                  if (s == Status::kOk) return;  // started; the result comes as finished
                  Recovery* rec = find(recovery_id);
                  if (rec == nullptr || rec->phase != Phase::kReplaying) return;
                  Partition& part = rec->partitions.at(partition_id);
                  if (part.serial != serial || part.done) return;
                  partition_failed(*rec, part, s);
                });
}

void RecoveryManager::partition_failed(Recovery& r, Partition& p, Status why) {
  LOG_WARNING("recovery {}: partition {} failed on master {} ({}); giving it to another", r.id,
              p.plan.id, wire::server_id_text(p.master_id), status_name(why));
  p.failed_masters.insert(p.master_id);
  p.master_id = 0;
  assign(r, p);
}

Status RecoveryManager::master_finished(std::span<const std::byte> body, Reply& reply) {
  wire::BodyReader in(body);
  wire::RecoveryMasterFinishedRequest req;
  if (!in.get(&req)) return Status::kBadRequest;
  std::vector<wire::TabletWire> tablets;
  if (!in.at_end()) {
    wire::TabletListHeader h;
    if (!in.get(&h) || in.remaining() != uint64_t{h.count} * sizeof(wire::TabletWire)) {
      return Status::kBadRequest;
    }
    tablets.resize(h.count);
    for (auto& t : tablets) {
      if (!in.get(&t) || t.start_hash > t.end_hash) return Status::kBadRequest;
    }
  }
  dirty_ = true;
  Recovery* r = find(req.recovery_id);
  // A resent report of a partition whose tablets already moved to that master: kOk in any
  // phase. Once the last partition moved the recovery is done, and an answer of
  // kUnknownTablet would make the master drop keys it owns and serves.
  if (r != nullptr && req.partition_id < r->partitions.size() &&
      r->partitions[req.partition_id].done &&
      r->partitions[req.partition_id].master_id == req.recovery_master_id) {
    return Status::kOk;
  }
  // The same once the recovery is forgotten (a restart, or a retry of a recovery that
  // failed): the persisted map says whether the tablets are that master's.
  if (static_cast<Status>(req.status) == Status::kOk && !tablets.empty() &&
      owned_by(host_.state(), tablets, req.recovery_master_id)) {
    return Status::kOk;
  }
  if (r == nullptr || r->phase != Phase::kReplaying || req.partition_id >= r->partitions.size()) {
    // A recovery this coordinator does not run (a previous incarnation's, or one that
    // failed since): the master must drop what it replayed, those tablets are not its.
    LOG_WARNING("master {} finished partition {} of recovery {}, which is not running here",
                wire::server_id_text(req.recovery_master_id), req.partition_id, req.recovery_id);
    return Status::kUnknownTablet;
  }
  Partition& p = r->partitions[req.partition_id];
  if (p.done || p.master_id != req.recovery_master_id) return Status::kUnknownTablet;
  const auto status = static_cast<Status>(req.status);
  if (status == Status::kIncomplete) {
    // Every backup listed for a segment failed to give it: no other master would do
    // better. Start again later from the backups' answers (a replica may come back).
    fail(*r, fmt::format("no backup could give segment {} (its replicas are unreadable or "
                         "gone); asked by master {}",
                         req.missing_segment_id, wire::server_id_text(req.recovery_master_id)));
    return Status::kOk;
  }
  if (status != Status::kOk) {
    partition_failed(*r, p, status);
    return Status::kOk;
  }
  for (const Finished& f : finished_) {
    if (f.recovery_id == req.recovery_id && f.partition_id == req.partition_id) {
      // A resend of a report still waiting for its commit: the first one's answer says.
      return Status::kOk;
    }
  }
  finished_.push_back({.recovery_id = req.recovery_id,
                       .partition_id = req.partition_id,
                       .master_id = req.recovery_master_id,
                       .objects = req.objects,
                       .bytes = req.bytes,
                       .replay_ns = req.replay_ns,
                       .token = reply.token()});
  reply.defer();
  return Status::kOk;
}

void RecoveryManager::commit_finished() {
  // Still as reported? (A master may have been declared crashed meanwhile: its partition
  // went to another master, and its report no longer counts.)
  std::vector<Finished> batch = std::move(finished_);
  finished_.clear();
  std::vector<RecoveryHost::Move> moves;
  std::vector<const Finished*> moving;
  for (const Finished& f : batch) {
    Recovery* r = find(f.recovery_id);
    if (r == nullptr || r->phase != Phase::kReplaying || f.partition_id >= r->partitions.size() ||
        r->partitions[f.partition_id].done ||
        r->partitions[f.partition_id].master_id != f.master_id) {
      host_.answer(f.token, Status::kUnknownTablet);
      continue;
    }
    const Partition& p = r->partitions[f.partition_id];
    auto move = std::find_if(moves.begin(), moves.end(),
                             [&](const RecoveryHost::Move& m) { return m.from == r->master_id; });
    if (move == moves.end())
      move = moves.insert(moves.end(), {.from = r->master_id, .tablets = {}});
    for (Tablet t : p.plan.tablets) {
      t.server_id = p.master_id;
      move->tablets.push_back(t);
    }
    moving.push_back(&f);
  }
  if (moving.empty()) return;
  const Status committed = host_.move_tablets(moves);
  for (const Finished* f : moving) {
    Recovery* r = find(f->recovery_id);
    Partition& p = r->partitions[f->partition_id];
    if (committed != Status::kOk) {
      partition_failed(*r, p, committed);
      // Nothing moved: what the master replayed is not its own.
      host_.answer(f->token, Status::kUnknownTablet);
      continue;
    } else {
      p.done = true;
      p.bytes = f->bytes;
      p.replay_ns = f->replay_ns;
      LOG_INFO("recovery {}: partition {} is served by master {} ({} objects, {} in {:.3f} s)",
               r->id, p.plan.id, wire::server_id_text(p.master_id), f->objects,
               format_bytes(f->bytes), static_cast<double>(f->replay_ns) / 1e9);
    }
    host_.answer(f->token, Status::kOk);
  }
  if (committed != Status::kOk) return;
  for (const Finished* f : moving) {
    if (Recovery* r = find(f->recovery_id); r != nullptr && r->phase == Phase::kReplaying) {
      maybe_finish(*r);
    }
  }
}

void RecoveryManager::maybe_finish(Recovery& r) {
  if (!std::all_of(r.partitions.begin(), r.partitions.end(),
                   [](const Partition& p) { return p.done; })) {
    return;
  }
  r.phase = Phase::kDone;
  r.finished_unix_ns = unix_ns();
  uint64_t bytes = 0;
  for (const auto& p : r.partitions) bytes += p.bytes;
  LOG_INFO("recovery {} of master {} done: {} recovered in {:.3f} s since it was declared crashed",
           r.id, wire::server_id_text(r.master_id), format_bytes(bytes),
           static_cast<double>(r.finished_unix_ns - r.declared_unix_ns) / 1e9);
  host_.finish_master(r.master_id);
}

void RecoveryManager::fail(Recovery& r, std::string error) {
  if (error != r.error) {
    LOG_ERROR(
        "recovery {} of master {} cannot go on: {}; its tablets stay unavailable, trying "
        "again in {} s",
        r.id, wire::server_id_text(r.master_id), error, options_.retry_delay_ns / 1'000'000'000);
  }
  r.phase = Phase::kFailed;
  r.error = std::move(error);
  r.retry_at_ns = clock_.now_ns() + options_.retry_delay_ns;
  r.pending = 0;
}

uint64_t RecoveryManager::run() {
  if (std::exchange(wait_fd_ready_, false) || client_->outstanding() > 0) client_->poll(0);
  if (!finished_.empty()) commit_finished();
  const uint64_t now = clock_.now_ns();
  bool retry_due = false;
  uint64_t next_retry = UINT64_MAX;
  for (const auto& r : recoveries_) {
    if (r.phase != Phase::kFailed) continue;
    if (r.retry_at_ns <= now) retry_due = true;
    next_retry = std::min(next_retry, r.retry_at_ns);
  }
  if (retry_due || dirty_) {
    dirty_ = false;
    if (retry_due) check();
    dirty_ = false;
  }
  if (client_->outstanding() > 0) return kInFlightWakeNs;
  if (next_retry != UINT64_MAX) return next_retry > now ? next_retry - now : 0;
  return UINT64_MAX;
}

void RecoveryManager::encode(std::vector<std::byte>* body) const {
  wire::BodyWriter w(body);
  uint32_t partitions = 0;
  for (const auto& r : recoveries_) partitions += static_cast<uint32_t>(r.partitions.size());
  w.put(wire::RecoveriesHeader{.count = static_cast<uint32_t>(recoveries_.size()),
                               .partition_count = partitions});
  for (const auto& r : recoveries_) {
    uint64_t bytes = 0;
    for (const auto& p : r.partitions) bytes += p.bytes;
    uint8_t state = r.phase == Phase::kDone     ? wire::kRecoveryDone
                    : r.phase == Phase::kFailed ? wire::kRecoveryFailed
                                                : wire::kRecoveryRunning;
    w.put(wire::RecoveryInfo{
        .recovery_id = r.id,
        .crashed_master_id = r.master_id,
        .declared_unix_ns = r.declared_unix_ns,
        .finished_unix_ns = r.finished_unix_ns,
        .bytes = bytes,
        .partitions = static_cast<uint32_t>(r.partitions.size()),
        .error_bytes = static_cast<uint32_t>(r.phase == Phase::kFailed ? r.error.size() : 0),
        .state = state});
  }
  for (const auto& r : recoveries_) {
    for (const auto& p : r.partitions) {
      w.put(wire::PartitionInfo{.recovery_master_id = p.master_id,
                                .bytes = p.bytes,
                                .replay_ns = p.replay_ns,
                                .partition_id = p.plan.id,
                                .done = static_cast<uint8_t>(p.done)});
    }
  }
  for (const auto& r : recoveries_) {
    if (r.phase == Phase::kFailed) w.put_bytes(r.error);
  }
}

}  // namespace ramkv::coordinator
