#include "backup/found_replica_collector.h"

#include <fmt/format.h>

#include <chrono>

#include "common/log.h"

namespace ramkv::backup {

namespace {

size_t count(const std::map<uint64_t, std::vector<wire::ReplicaEntry>>& found) {
  size_t n = 0;
  for (const auto& [master, replicas] : found) n += replicas.size();
  return n;
}

}  // namespace

FoundReplicaCollector::FoundReplicaCollector(const Options& options,
                                             std::vector<wire::ReplicaEntry> found)
    : options_(options), client_(make_client_transport({})) {
  for (const auto& r : found) found_[r.master_id].push_back(r);
}

FoundReplicaCollector::~FoundReplicaCollector() { stop(); }

void FoundReplicaCollector::start() {
  report();
  thread_ = std::thread([this] {
    size_t left = count(found_);
    std::unique_lock lock(mutex_);
    while (!stopping_ && left > 0) {
      wake_.wait_for(lock, std::chrono::nanoseconds(options_.interval_ns),
                     [this] { return stopping_; });
      if (stopping_) break;
      lock.unlock();
      left = pass();
      lock.lock();
    }
    if (left == 0) {
      LOG_INFO("every replica found on disk is accounted for ({} freed)", freed_);
    }
  });
}

void FoundReplicaCollector::stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void FoundReplicaCollector::report() {
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  w.put(wire::BackupReportHeader{.backup_id = options_.backup_id,
                                 .count = static_cast<uint32_t>(count(found_))});
  for (const auto& [master, replicas] : found_) {
    for (const auto& r : replicas) w.put(r);
  }
  auto r = call(*client_, options_.coordinator,
                {.opcode = wire::Opcode::kReportBackupReplicas,
                 .client_id = options_.backup_id,
                 .timeout_ns = options_.rpc_timeout_ns},
                body);
  if (r.status != Status::kOk) {
    LOG_WARNING("cannot tell the coordinator about the {} replicas found on disk: {}",
                count(found_), status_name(r.status));
  }
}

size_t FoundReplicaCollector::pass() {
  auto list =
      call(*client_, options_.coordinator,
           {.opcode = wire::Opcode::kGetServerList, .timeout_ns = options_.rpc_timeout_ns}, {});
  std::vector<wire::ServerListItem> servers;
  uint64_t version = 0;
  if (list.status != Status::kOk ||
      wire::decode_server_list(list.body, &version, &servers) != Status::kOk) {
    return count(found_);  // the coordinator is away: next time
  }
  std::map<uint32_t, const wire::ServerListItem*> by_index;
  for (const auto& s : servers) by_index[static_cast<uint32_t>(s.server_id)] = &s;
  size_t freed_now = 0;
  for (auto it = found_.begin(); it != found_.end();) {
    const uint64_t master_id = it->first;
    auto& replicas = it->second;
    auto listed = by_index.find(static_cast<uint32_t>(master_id));
    std::vector<bool> needed(replicas.size(), true);
    if (listed != by_index.end() && listed->second->server_id == master_id) {
      const wire::ServerListItem& m = *listed->second;
      if (m.status == 2) {
        needed.assign(replicas.size(), false);  // recovered and removed
      } else if (m.status == 0 && (m.services & wire::kServiceMaster) != 0) {
        std::vector<uint64_t> segments;
        for (const auto& r : replicas) segments.push_back(r.segment_id);
        auto answer = ask_master(master_id, m.locator, segments);
        if (!answer.empty()) needed = std::move(answer);
      }
      // Crashed: its recovery will read these.
    }
    // Not listed under this id: replaced by a newer generation, whose recovery is due.
    std::vector<wire::ReplicaEntry> kept;
    for (size_t i = 0; i < replicas.size(); ++i) {
      if (!needed[i] && free_replica(master_id, replicas[i].segment_id)) {
        ++freed_now;
      } else {
        kept.push_back(replicas[i]);
      }
    }
    replicas = std::move(kept);
    it = replicas.empty() ? found_.erase(it) : std::next(it);
  }
  freed_ += freed_now;
  const size_t left = count(found_);
  if (freed_now > 0) {
    LOG_INFO("freed {} replicas found on disk that their masters no longer need; {} kept",
             freed_now, left);
  }
  return left;
}

std::vector<bool> FoundReplicaCollector::ask_master(uint64_t master_id, const std::string& locator,
                                                    const std::vector<uint64_t>& segments) {
  std::vector<bool> needed;
  for (size_t start = 0; start < segments.size(); start += wire::kMaxReplicaNeededCount) {
    const size_t n = std::min<size_t>(segments.size() - start, wire::kMaxReplicaNeededCount);
    std::vector<std::byte> body;
    wire::BodyWriter w(&body);
    w.put(wire::ReplicaNeededHeader{.backup_id = options_.backup_id,
                                    .count = static_cast<uint32_t>(n)});
    for (size_t i = start; i < start + n; ++i) w.put(segments[i]);
    auto r = call(*client_, locator,
                  {.opcode = wire::Opcode::kIsReplicaNeeded,
                   .client_id = options_.backup_id,
                   .timeout_ns = options_.rpc_timeout_ns},
                  body);
    if (r.status != Status::kOk || r.body.size() != n) {
      LOG_DEBUG("master {} did not say which replicas it needs: {}",
                wire::server_id_text(master_id),
                r.status == Status::kOk ? "malformed reply" : status_name(r.status));
      return {};
    }
    for (std::byte b : r.body) needed.push_back(b != std::byte{0});
  }
  return needed;
}

bool FoundReplicaCollector::free_replica(uint64_t master_id, uint64_t segment_id) {
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(
      wire::BackupFreeRequest{.master_id = master_id, .segment_id = segment_id});
  auto r = call(*client_, options_.self_locator,
                {.opcode = wire::Opcode::kBackupFree,
                 .client_id = options_.backup_id,
                 .timeout_ns = options_.rpc_timeout_ns},
                body);
  if (r.status != Status::kOk) {
    LOG_WARNING("cannot free the replica of segment {} of master {} found on disk: {}", segment_id,
                wire::server_id_text(master_id), status_name(r.status));
  }
  return r.status == Status::kOk;
}

}  // namespace ramkv::backup
