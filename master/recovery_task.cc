#include "master/recovery_task.h"

#include <fmt/format.h>

#include <utility>

#include "common/config.h"
#include "common/log.h"
#include "master/replica_manager.h"
#include "master/tablet_dropper.h"

namespace ramkv::master {

namespace {

constexpr uint64_t kInFlightWakeNs = 10'000'000;
constexpr uint32_t kMaxReportAttempts = 20;
constexpr uint64_t kReportRetryNs = 500'000'000;

}  // namespace

RecoveryTask::RecoveryTask(const Options& options, ObjectManager& objects, ReplicaManager* replicas,
                           const Clock& clock)
    : options_(options),
      objects_(objects),
      replicas_(replicas),
      clock_(clock),
      client_(make_client_transport({})) {}

RecoveryTask::~RecoveryTask() = default;

Status RecoveryTask::start(std::span<const std::byte> body) {
  wire::BodyReader in(body);
  Job job;
  if (!in.get(&job.request)) return Status::kBadRequest;
  const wire::RecoverRequest& req = job.request;
  if (req.tablet_count == 0 || req.location_count == 0 ||
      req.tablet_count > in.remaining() / sizeof(wire::TabletWire)) {
    return Status::kBadRequest;
  }
  job.tablets.resize(req.tablet_count);
  for (auto& t : job.tablets) {
    if (!in.get(&t) || t.end_hash < t.start_hash) return Status::kBadRequest;
  }
  for (uint32_t i = 0; i < req.location_count; ++i) {
    wire::RecoveryLocation l;
    std::string_view locator;
    if (!in.get(&l) || !in.get_string(l.locator_bytes, &locator) || locator.empty()) {
      return Status::kBadRequest;
    }
    job.segments[l.segment_id].locations.emplace_back(l.backup_id, std::string(locator));
  }
  if (!in.at_end()) return Status::kBadRequest;
  const Key key{req.recovery_id, req.partition_id};
  if (jobs_.contains(key)) return Status::kOk;  // a resent recover: already running
  if (dropper_ != nullptr && dropper_->finish_overlapping(job.tablets) != Status::kOk) {
    return Status::kRetry;
  }
  // A job of an older recovery of the same master over the same keys (the coordinator
  // restarted and began again) is superseded: what it replayed stays (replay is
  // idempotent, and the new job replays it all), and it reports nothing, so that nothing
  // here drops keys this master is about to own.
  for (auto it = jobs_.begin(); it != jobs_.end();) {
    const Job& old = it->second;
    bool overlaps = false;
    for (const auto& a : old.tablets) {
      for (const auto& b : job.tablets) {
        overlaps |=
            a.table_id == b.table_id && a.start_hash <= b.end_hash && b.start_hash <= a.end_hash;
      }
    }
    if (old.request.crashed_master_id == req.crashed_master_id && overlaps) {
      LOG_INFO("recovery {} partition {} is superseded by recovery {}", it->first.first,
               it->first.second, req.recovery_id);
      it = jobs_.erase(it);
    } else {
      ++it;
    }
  }
  job.started_ns = clock_.now_ns();
  job.started_cpu_ns = thread_cpu_ns();
  if (replicas_ != nullptr) job.replica_bytes_at_start = replicas_->stats().bytes_sent;
  LOG_INFO("recovering partition {} of master {} (recovery {}): {} tablets from {} segments",
           req.partition_id, wire::server_id_text(req.crashed_master_id), req.recovery_id,
           req.tablet_count, job.segments.size());
  jobs_.emplace(key, std::move(job));
  ++stats_.partitions_started;
  return Status::kOk;
}

void RecoveryTask::drop(Job& job) {
  objects_.finish_replay(ranges(job), job.request.safe_version);
  std::vector<wire::TabletWire> gone;
  for (const auto& t : job.tablets) {
    if (owned_ == nullptr || !owned_->overlaps(t.table_id, {t.start_hash, t.end_hash})) {
      gone.push_back(t);
    }
  }
  if (gone.size() != job.tablets.size()) {
    LOG_ERROR(
        "recovery {} partition {}: not dropping {} of its tablets: this master owns them (the "
        "coordinator moved them here)",
        job.request.recovery_id, job.request.partition_id, job.tablets.size() - gone.size());
  }
  // A partition's worth (hundreds of megabytes) removed in one go would hold the loop for
  // a large part of a second; nothing owns these keys here, and a take or recovery of
  // them finishes the removal first.
  if (dropper_ != nullptr) return dropper_->add(gone);
  for (const auto& t : gone) {
    auto removed = objects_.remove_range(t.table_id, t.start_hash, t.end_hash);
    (void)removed;
  }
}

std::vector<TabletRange> RecoveryTask::ranges(const Job& job) {
  std::vector<TabletRange> out;
  for (const auto& t : job.tablets) {
    out.push_back({.table_id = t.table_id, .start_hash = t.start_hash, .end_hash = t.end_hash});
  }
  return out;
}

bool RecoveryTask::is_local(const SegmentPull& seg) const {
  return local_ && seg.next < seg.locations.size() && seg.locations[seg.next].first == server_id_;
}

bool RecoveryTask::accepts(const Job& job, uint64_t table_id, uint64_t key_hash) const {
  for (const auto& t : job.tablets) {
    if (t.table_id == table_id && key_hash >= t.start_hash && key_hash <= t.end_hash) return true;
  }
  return false;
}

uint64_t RecoveryTask::run() {
  if (std::exchange(wait_fd_ready_, false) || client_->outstanding() > 0) client_->poll(0);
  const uint64_t now = clock_.now_ns();
  uint64_t wake = UINT64_MAX;
  pulled_locally_ = false;
  for (auto it = jobs_.begin(); it != jobs_.end();) {
    const Key key = it->first;
    Job& job = it->second;
    if (job.failed == Status::kOk && !job.replayed) {
      bool all_done = true;
      for (auto& [segment_id, seg] : job.segments) {
        if (seg.done) continue;
        all_done = false;
        if (seg.in_flight || in_flight_ >= options_.max_in_flight) continue;
        if (seg.retry_at_ns > now) {
          wake = std::min(wake, seg.retry_at_ns - now);
          continue;
        }
        if (pulled_locally_ && is_local(seg)) {
          // One local pull (a copy and a replay, some milliseconds) per pass of the loop,
          // so that the loop serves its requests in between.
          wake = 0;
          continue;
        }
        pull(key, job, segment_id, seg);
        // A local pull is answered at once: come back soon for what it made due.
        if (pulled_locally_) wake = 0;
        if (job.failed != Status::kOk) break;
      }
      if (all_done && job.failed == Status::kOk) finish(job);
    }
    if ((job.replayed || job.failed != Status::kOk) && !job.reported && !job.report_in_flight) {
      bool ready = job.failed != Status::kOk || replicas_ == nullptr ||
                   replicas_->durable_through(job.durable_segment, job.durable_offset);
      if (!ready && replicas_->fenced()) {
        job.failed = Status::kFenced;  // declared crashed ourselves: nothing is durable
        ready = true;
      }
      if (!ready) {
        wake = std::min(wake, kInFlightWakeNs);
      } else if (job.report_at_ns > now) {
        wake = std::min(wake, job.report_at_ns - now);
      } else {
        report(key, job);
      }
    }
    if (job.reported) {
      it = jobs_.erase(it);
    } else {
      ++it;
    }
  }
  if (client_->outstanding() > 0) wake = std::min(wake, kInFlightWakeNs);
  return wake;
}

void RecoveryTask::pull(const Key& key, Job& job, uint64_t segment_id, SegmentPull& seg) {
  if (seg.next >= seg.locations.size()) {
    LOG_ERROR("recovery {} partition {}: no backup could give segment {} of master {}", key.first,
              key.second, segment_id, wire::server_id_text(job.request.crashed_master_id));
    job.failed = Status::kIncomplete;
    job.missing_segment = segment_id;
    return;
  }
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(
      wire::GetRecoveryDataRequest{.master_id = job.request.crashed_master_id,
                                   .recovery_id = job.request.recovery_id,
                                   .segment_id = segment_id,
                                   .partition_id = job.request.partition_id});
  if (options_.pull_delay_ns > 0) {
    // Fault injection (Options::pull_delay_ns): one pull per delay.
    const uint64_t now = clock_.now_ns();
    if (now < job.next_pull_ns) {
      seg.retry_at_ns = job.next_pull_ns;
      return;
    }
    job.next_pull_ns = now + options_.pull_delay_ns;
  }
  seg.in_flight = true;
  ++in_flight_;
  if (is_local(seg)) {
    pulled_locally_ = true;
    wire::RecoveryDataResponse head;
    const Status s = local_(wire::GetRecoveryDataRequest{.master_id = job.request.crashed_master_id,
                                                         .recovery_id = job.request.recovery_id,
                                                         .segment_id = segment_id,
                                                         .partition_id = job.request.partition_id},
                            &head, &local_pieces_);
    on_entries(key, segment_id, s, head, local_pieces_);
    return;
  }
  client_->send(seg.locations[seg.next].second,
                {.opcode = wire::Opcode::kBackupGetRecoveryData,
                 .client_id = server_id_,
                 .timeout_ns = options_.rpc_timeout_ns},
                body,
                [this, key, segment_id](Status transport, const wire::MessageHeader& h,
                                        std::span<const std::byte> reply) {
                  Status s = transport != Status::kOk ? transport : static_cast<Status>(h.status);
                  on_data(key, segment_id, s, reply);
                });
}

void RecoveryTask::on_data(const Key& key, uint64_t segment_id, Status status,
                           std::span<const std::byte> body) {
  wire::RecoveryDataResponse head;
  std::span<const std::byte> entries;
  if (status == Status::kOk) {
    wire::BodyReader in(body);
    std::string_view bytes;
    if (in.get(&head) && in.get_string(head.entry_bytes, &bytes) && in.at_end()) {
      entries = std::as_bytes(std::span(bytes.data(), bytes.size()));
    } else {
      status = Status::kBadRequest;
    }
  }
  const std::span<const std::byte> one[] = {entries};
  on_entries(key, segment_id, status, head, one);
}

void RecoveryTask::on_entries(const Key& key, uint64_t segment_id, Status status,
                              const wire::RecoveryDataResponse& head,
                              std::span<const std::span<const std::byte>> pieces) {
  --in_flight_;
  auto it = jobs_.find(key);
  if (it == jobs_.end()) return;
  Job& job = it->second;
  SegmentPull& seg = job.segments.at(segment_id);
  seg.in_flight = false;
  if (job.failed != Status::kOk) return;
  if (status == Status::kRetry) {
    ++job.retries;
    seg.retry_at_ns = clock_.now_ns() + options_.retry_ns;
    return;
  }
  const uint64_t backup_id = seg.locations[seg.next].first;
  if (status == Status::kOk) {
    uint64_t entry_bytes = 0;
    for (const auto piece : pieces) entry_bytes += piece.size();
    if (entry_bytes == head.entry_bytes) {
      if (job.first_data_ns == 0) job.first_data_ns = clock_.now_ns();
      ReplayStats stats;
      const uint64_t replay_start = clock_.now_ns();
      const uint64_t replay_start_cpu = thread_cpu_ns();
      status = objects_.replay(
          pieces, [&job, this](uint64_t table, uint64_t hash) { return accepts(job, table, hash); },
          &stats);
      job.replay_ns += clock_.now_ns() - replay_start;
      job.replay_cpu_ns += thread_cpu_ns() - replay_start_cpu;
      job.replay.entries += stats.entries;
      job.replay.objects += stats.objects;
      job.replay.tombstones += stats.tombstones;
      job.replay.skipped += stats.skipped;
      job.bytes += entry_bytes;
      stats_.bytes_pulled += entry_bytes;
      stats_.objects_replayed += stats.objects;
      if (status == Status::kOk) {
        seg.done = true;
        if (is_local(seg)) {
          ++job.local_segments;
          ++stats_.segments_local;
        } else {
          ++stats_.segments_remote;
          stats_.bytes_pulled_remote += entry_bytes;
        }
        return;
      }
      // What was applied stays (replay is idempotent: the newest version wins); the rest
      // comes from another replica.
    } else {
      status = Status::kBadRequest;
    }
  }
  LOG_WARNING("recovery {} partition {}: segment {} from backup {} failed ({}); trying the next",
              key.first, key.second, segment_id, wire::server_id_text(backup_id),
              status_name(status));
  ++seg.next;
  seg.retry_at_ns = 0;
}

void RecoveryTask::finish(Job& job) {
  objects_.finish_replay(ranges(job), job.request.safe_version);
  job.replayed = true;
  job.replayed_ns = clock_.now_ns();
  if (replicas_ != nullptr) {
    auto position = replicas_->log_position();
    job.durable_segment = position.first;
    job.durable_offset = position.second;
    job.replica_bytes_at_replayed = replicas_->stats().bytes_sent;
  }
}

void RecoveryTask::report(const Key& key, Job& job) {
  const uint64_t elapsed = clock_.now_ns() - job.started_ns;
  if (job.failed != Status::kOk && job.report_attempts == 0) {
    drop(job);  // the partition goes to another master
    ++stats_.partitions_failed;
  }
  if (job.report_attempts == 0 && job.failed == Status::kOk) {
    ++stats_.partitions_finished;
    // Where the time went: waiting for the first data (backups reading), pulling and
    // replaying, then waiting until what was replayed is durable on our backups.
    auto seconds = [](uint64_t from, uint64_t to) {
      return to > from ? static_cast<double>(to - from) / 1e9 : 0.0;
    };
    const uint64_t first = job.first_data_ns == 0 ? job.started_ns : job.first_data_ns;
    const uint64_t replica_bytes = replicas_ != nullptr ? replicas_->stats().bytes_sent : 0;
    LOG_INFO(
        "recovered partition {} of recovery {}: {} objects, {} tombstones, {} in {:.3f} s "
        "(first data after {:.3f} s, replayed after {:.3f} s of which {:.3f} s replaying "
        "({:.3f} s of CPU), "
        "{} early asks answered retry, {} of {} segments from our own backup; durable {:.3f} s "
        "later, with {} of replica writes sent after replay and {} before; {:.3f} s of CPU in "
        "this thread, replication and backup work included)",
        key.second, key.first, job.replay.objects, job.replay.tombstones, format_bytes(job.bytes),
        static_cast<double>(elapsed) / 1e9, seconds(job.started_ns, first),
        seconds(job.started_ns, job.replayed_ns), static_cast<double>(job.replay_ns) / 1e9,
        static_cast<double>(job.replay_cpu_ns) / 1e9, job.retries, job.local_segments,
        job.segments.size(), seconds(job.replayed_ns, clock_.now_ns()),
        format_bytes(replica_bytes - job.replica_bytes_at_replayed),
        format_bytes(job.replica_bytes_at_replayed - job.replica_bytes_at_start),
        static_cast<double>(thread_cpu_ns() - job.started_cpu_ns) / 1e9);
  }
  if (++job.report_attempts > kMaxReportAttempts) {
    LOG_ERROR("recovery {} partition {}: the coordinator did not take our report; giving up",
              key.first, key.second);
    job.reported = true;
    return;
  }
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(
      wire::RecoveryMasterFinishedRequest{.recovery_id = key.first,
                                          .recovery_master_id = server_id_,
                                          .partition_id = key.second,
                                          .status = static_cast<uint16_t>(job.failed),
                                          .objects = job.replay.objects,
                                          .bytes = job.bytes,
                                          .replay_ns = elapsed,
                                          .missing_segment_id = job.missing_segment});
  {
    wire::BodyWriter w(&body);
    w.put(wire::TabletListHeader{.count = static_cast<uint32_t>(job.tablets.size())});
    for (const auto& t : job.tablets) w.put(t);
  }
  job.report_in_flight = true;
  client_->send(
      options_.coordinator,
      {.opcode = wire::Opcode::kRecoveryMasterFinished,
       .client_id = server_id_,
       .timeout_ns = options_.rpc_timeout_ns},
      body,
      [this, key](Status transport, const wire::MessageHeader& h, std::span<const std::byte>) {
        auto it = jobs_.find(key);
        if (it == jobs_.end()) return;
        it->second.report_in_flight = false;
        Status s = transport != Status::kOk ? transport : static_cast<Status>(h.status);
        if (s == Status::kOk) {
          it->second.reported = true;
        } else if (s == Status::kUnknownTablet) {
          // The coordinator gave the partition to someone else (or restarted and runs a
          // new recovery): what we replayed of it must go.
          LOG_WARNING("recovery {} partition {} is not ours any more: dropping it", key.first,
                      key.second);
          drop(it->second);
          it->second.reported = true;
        } else {
          it->second.report_at_ns = clock_.now_ns() + kReportRetryNs;
          LOG_WARNING("cannot report recovery {} partition {} to the coordinator: {}", key.first,
                      key.second, status_name(s));
        }
      });
}

}  // namespace ramkv::master
