// BackupService, its part in crash recovery (backup_service.h; docs/recovery.md): reading a
// crashed master's replicas when the coordinator asks, splitting them by partition,
// serving each partition's data to its recovery master, and dropping it all once the
// master is removed. The replicas' own life (writes, flushes, frees) is in
// backup_service.cc.
#include <cstring>
#include <string>
#include <vector>

#include "backup/backup_service.h"
#include "backup/replica_file.h"
#include "common/log.h"

namespace ramkv::backup {

Status BackupService::start_reading(std::span<const std::byte> body, Reply& reply) {
  wire::BodyReader in(body);
  wire::StartReadingDataRequest req;
  if (!in.get(&req) || !in.at_end()) return Status::kBadRequest;
  // Only the coordinator asks, once it declared the master crashed (the server list saying
  // so may still be on its way): from now on nothing of that master changes here.
  if (!is_fenced(req.master_id)) fence_master(req.master_id);
  auto& recovery = recoveries_[req.master_id];
  if (recovery == nullptr || recovery->recovery_id() != req.recovery_id) {
    std::vector<RecoverySource> sources;
    for (auto it = replicas_.lower_bound({req.master_id, 0});
         it != replicas_.end() && it->first.first == req.master_id; ++it) {
      const Replica& r = it->second;
      if (r.durable_seq == 0) continue;  // never acknowledged: the master did not count it
      RecoverySource src;
      src.entry = wire::ReplicaEntry{.master_id = req.master_id,
                                     .segment_id = it->first.second,
                                     .epoch = r.durable.epoch,
                                     .certificate_bytes = r.durable.certificate_bytes,
                                     .closed = static_cast<uint8_t>(r.durable.closed ? 1 : 0),
                                     .status = r.scan_status,
                                     .found_on_disk = static_cast<uint8_t>(r.found_on_disk)};
      src.certificate_checksum = r.durable.certificate_checksum;
      if (r.has_file && r.file_bytes >= r.durable.certificate_bytes) {
        src.path = replica_path(options_.data_dir, req.master_id, it->first.second);
      } else if (r.buffer.size() != 0) {
        // Open in buffered mode: its bytes are only in RAM.
        auto held = r.buffer.span().subspan(kReplicaHeaderBlock, r.durable.certificate_bytes);
        if (pool_->buffer_bytes() >= held.size()) {
          src.buffer = pool_->take_or_allocate();
          std::memcpy(src.buffer.data(), held.data(), held.size());
        } else {
          src.bytes.assign(held.begin(), held.end());
        }
      } else {
        continue;  // nothing to read it from (cannot happen: a replica has one or the other)
      }
      sources.push_back(std::move(src));
    }
    LOG_INFO("recovery {} of master {}: reading our {} replicas of it", req.recovery_id,
             wire::server_id_text(req.master_id), sources.size());
    if (recovery != nullptr) {
      // An older recovery of the same master: its reads stop first.
      past_recovery_bytes_ += recovery->bytes_read();
      past_recovery_ns_ += recovery->read_ns();
      recovery.reset();
    }
    // Flushes wait while it is read (see "Closes wait while a recovery is read"), from
    // this master's first recovery here: a retried one does not start the time again.
    hold_started_ns_.emplace(req.master_id, options_.clock->now_ns());
    recovery =
        std::make_unique<RecoverySegments>(req.master_id, req.recovery_id, std::move(sources),
                                           (req.flags & wire::kDeferReads) != 0, pool_);
  }
  reply.writer().put_bytes(std::span<const std::byte>(recovery->start_response()));
  return Status::kOk;
}

BackupService::RecoveryLookup BackupService::find_recovery(uint64_t master_id,
                                                           uint64_t recovery_id) const {
  auto it = recoveries_.find(master_id);
  if (it == recoveries_.end() || it->second->recovery_id() != recovery_id) return nullptr;
  return it->second.get();
}

Status BackupService::start_partitioning(std::span<const std::byte> body) {
  wire::BodyReader in(body);
  wire::StartPartitioningRequest req;
  if (!in.get(&req) || uint64_t{req.count} * sizeof(wire::PartitionTablet) +
                               uint64_t{req.primary_count} * sizeof(uint64_t) !=
                           in.remaining()) {
    return Status::kBadRequest;
  }
  std::vector<wire::PartitionTablet> map(req.count);
  for (auto& t : map) in.get(&t);
  std::vector<uint64_t> primaries(req.primary_count);
  for (auto& id : primaries) in.get(&id);
  if (!in.at_end()) return Status::kBadRequest;
  RecoverySegments* recovery = find_recovery(req.master_id, req.recovery_id);
  if (recovery == nullptr) return Status::kBadRequest;
  if ((req.flags & wire::kPrimariesNamed) == 0) return recovery->start_partitioning(map);
  return recovery->start_partitioning(map, std::span<const uint64_t>(primaries));
}

Status BackupService::get_recovery_data(std::span<const std::byte> body, Reply& reply) {
  wire::BodyReader in(body);
  wire::GetRecoveryDataRequest req;
  if (!in.get(&req) || !in.at_end()) return Status::kBadRequest;
  // The entries go from where they lie in the replica's bytes, and what the socket does
  // not take at once waits there too, the reply holding the replica's bytes: copied into
  // the reply first, they cost a copy of bytes long out of the cache, 4% of a recovery's
  // CPU; copied when the socket is full (most of them, while a recovery master pulls from
  // every backup), another 3.6%, and 2.3% in page faults of the fresh copies.
  wire::RecoveryDataResponse head;
  std::shared_ptr<const void> keep;
  if (Status s = recovery_data(req, &head, &pieces_, &keep); s != Status::kOk) return s;
  reply.writer().put(head);
  for (const auto piece : pieces_) reply.add_external(piece);
  reply.set_keep(std::move(keep));
  return Status::kOk;
}

Status BackupService::recovery_data(const wire::GetRecoveryDataRequest& req,
                                    wire::RecoveryDataResponse* head,
                                    std::vector<std::span<const std::byte>>* pieces,
                                    std::shared_ptr<const void>* keep) {
  RecoverySegments* recovery = find_recovery(req.master_id, req.recovery_id);
  if (recovery == nullptr) return Status::kBadRequest;
  return recovery->get_pieces(req.segment_id, req.partition_id, head, pieces, keep);
}

void BackupService::free_master(uint64_t master_id) {
  if (auto it = recoveries_.find(master_id); it != recoveries_.end()) {
    past_recovery_bytes_ += it->second->bytes_read();
    past_recovery_ns_ += it->second->read_ns();
    recoveries_.erase(it);
  }
  hold_started_ns_.erase(master_id);
  size_t freed = 0;
  std::vector<std::string> files;
  for (auto it = replicas_.lower_bound({master_id, 0});
       it != replicas_.end() && it->first.first == master_id;) {
    auto next = std::next(it);
    drop_queued_flush(it->second);
    if (!removable(it->second)) {
      it->second.free_pending = true;  // removed once its flush (or open) is done
    } else {
      // Its file goes on the remover's thread (file_remover.h): this master's id never
      // comes back, so no replica of ours will be made at its path again.
      if (it->second.has_file || it->second.file.get() >= 0) {
        files.push_back(replica_path(options_.data_dir, master_id, it->first.second));
      }
      forget(it);
      ++freed;
    }
    it = next;
  }
  if (freed > 0) {
    LOG_INFO(
        "freed {} replicas of master {}: its recovery is over ({} buffers in use, at most {} so "
        "far, {} free, {} allocated since start because none was free, {} opens refused "
        "for want of one)",
        freed, wire::server_id_text(master_id), buffers_in_use_, peak_buffers_in_use_,
        pool_->free_count(), pool_->allocated_late(), opens_refused_for_buffers_);
    // The directory after its files (it stays while a replica waits for a flush).
    const auto left = replicas_.lower_bound({master_id, 0});
    const bool all_gone = left == replicas_.end() || left->first.first != master_id;
    remover_.remove(std::move(files),
                    all_gone ? options_.data_dir + "/" + std::to_string(master_id) : std::string());
  }
}

uint64_t BackupService::recovery_bytes_read() const {
  uint64_t n = past_recovery_bytes_;
  for (const auto& [master, r] : recoveries_) n += r->bytes_read();
  return n;
}

uint64_t BackupService::recovery_read_ns() const {
  uint64_t n = past_recovery_ns_;
  for (const auto& [master, r] : recoveries_) n += r->read_ns();
  return n;
}

}  // namespace ramkv::backup
