#include "backup/backup_service.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "backup/replica_file.h"
#include "backup/replica_scanner.h"
#include "common/log.h"

namespace ramkv::backup {
namespace {

using wire::Opcode;

// Closes a file descriptor on every path out.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

constexpr size_t align_down(size_t n) { return n / kDirectAlignment * kDirectAlignment; }

Status errno_status(int err) { return err == ENOSPC ? Status::kNoSpace : Status::kIoError; }

uint8_t scan_status_code(Status s) {
  if (s == Status::kOk) return wire::kReplicaOk;
  return s == Status::kCorrupt ? wire::kReplicaCorrupt : wire::kReplicaTorn;
}

}  // namespace

Result<std::unique_ptr<BackupService>> BackupService::create(const Options& options) {
  if (options.data_dir.empty() || options.segment_bytes == 0 || options.max_buffers == 0 ||
      options.ring_depth < 2) {
    return Status::kInvalidArgument;
  }
  auto ring = Uring::create(options.ring_depth);
  if (!ring.ok()) return ring.status();
  std::unique_ptr<BackupService> service(new BackupService(options, std::move(*ring)));
  if (Status s = service->load_existing(); s != Status::kOk) return s;
  return service;
}

BackupService::BackupService(const Options& options, std::unique_ptr<Uring> ring)
    : options_(options), ring_(std::move(ring)) {}

Status BackupService::load_existing() {
  auto scanned = scan_replicas(options_.data_dir);
  if (!scanned.ok()) return scanned.status();
  for (const ScannedReplica& s : *scanned) {
    Replica r;
    r.epoch = s.header.epoch;
    r.held_bytes = r.file_bytes = s.header.certificate_bytes;
    r.certificate_bytes = s.header.certificate_bytes;
    r.certificate_checksum = s.header.certificate_checksum;
    // Found on disk: immutable whatever its header says (see the class comment).
    r.closed = s.header.closed;
    r.has_file = true;
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
      s = write(body);
      break;
    case Opcode::kBackupFree:
      s = free_replica(body);
      break;
    case Opcode::kBackupListReplicas:
      s = list_replicas(body, reply);
      break;
    default:
      break;
  }
  if (s != Status::kOk) {
    reply.clear();
    reply.set_status(s);
  }
}

Status BackupService::write(std::span<const std::byte> body) {
  wire::BodyReader in(body);
  wire::BackupWriteRequest req;
  std::string_view data;
  if (!in.get(&req) || !in.get_string(req.length, &data) || !in.at_end()) {
    return Status::kBadRequest;
  }
  if (req.open > 1 || req.close > 1) return Status::kBadRequest;
  if (fenced_.contains(req.master_id)) return Status::kFenced;
  uint64_t end = uint64_t{req.offset} + req.length;
  if (end > options_.segment_bytes || req.certificate_bytes > end) return Status::kBadRequest;

  Key key{req.master_id, req.segment_id};
  auto it = replicas_.find(key);
  bool created = false;
  if (it == replicas_.end()) {
    if (req.open == 0) return Status::kBadRequest;  // unknown replica
    auto buffer = acquire_buffer();
    if (!buffer.ok()) return buffer.status();
    Replica r;
    r.epoch = req.epoch;
    r.buffer = std::move(*buffer);
    it = replicas_.emplace(key, std::move(r)).first;
    created = true;
  }
  Replica& r = it->second;
  // A resent open of a replica already opened is accepted like any other append.
  if (r.closed || r.buffer.size() == 0 || req.offset != r.held_bytes ||
      req.certificate_bytes < r.certificate_bytes || req.epoch < r.epoch) {
    // Invariant 2: appends at the held length only; certificates and epochs never shrink.
    if (created) forget(it);
    return Status::kBadRequest;
  }

  // Stage the append; the replica's fields change only once the write has succeeded
  // (invariant 4), so a failure leaves the bytes beyond held_bytes unclaimed.
  if (!data.empty()) {
    std::memcpy(r.buffer.data() + kReplicaHeaderBlock + req.offset, data.data(), data.size());
  }
  const uint64_t old_epoch = r.epoch;
  const uint32_t old_held = r.held_bytes;
  const uint32_t old_certificate_bytes = r.certificate_bytes;
  const uint32_t old_certificate_checksum = r.certificate_checksum;
  r.epoch = req.epoch;
  r.held_bytes = static_cast<uint32_t>(end);
  r.certificate_bytes = req.certificate_bytes;
  r.certificate_checksum = req.certificate_checksum;
  bool to_disk = req.close == 1 || options_.durability == Durability::kDisk;
  if (to_disk) {
    if (Status s = write_file(key, r, req.close == 1, true); s != Status::kOk) {
      r.epoch = old_epoch;
      r.held_bytes = old_held;
      r.certificate_bytes = old_certificate_bytes;
      r.certificate_checksum = old_certificate_checksum;
      if (created) forget(it);  // the open itself failed: nothing remains
      return s;
    }
  }
  if (req.close == 1) {
    r.closed = true;
    release_buffer(std::move(r.buffer));
    r.buffer = AlignedBuffer();
  }
  return Status::kOk;
}

Status BackupService::write_file(const Key& key, Replica& r, bool closed, bool sync) {
  std::error_code ec;
  std::string dir = options_.data_dir + "/" + std::to_string(key.first);
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    LOG_ERROR("cannot create {}: {}", dir, ec.message());
    return ec == std::errc::no_space_on_device ? Status::kNoSpace : Status::kIoError;
  }
  std::string path = replica_path(options_.data_dir, key.first, key.second);
  int flags = O_WRONLY | O_CREAT | O_DIRECT | O_CLOEXEC | (r.has_file ? 0 : O_TRUNC);
  Fd f{::open(path.c_str(), flags, 0644)};
  if (f.fd < 0) {
    int err = errno;
    LOG_ERROR("cannot open replica file {}: {}", path, std::strerror(err));
    return errno_status(err);
  }
  encode_replica_header({.master_id = key.first,
                         .segment_id = key.second,
                         .epoch = r.epoch,
                         .capacity = options_.segment_bytes,
                         .certificate_bytes = r.certificate_bytes,
                         .certificate_checksum = r.certificate_checksum,
                         .closed = closed},
                        r.buffer.span());
  // O_DIRECT writes whole blocks: zero the tail of the last one so no stale bytes from
  // the buffer's previous replica reach the file.
  size_t end = align_up(kReplicaHeaderBlock + r.held_bytes);
  std::memset(r.buffer.data() + kReplicaHeaderBlock + r.held_bytes, 0,
              end - kReplicaHeaderBlock - r.held_bytes);
  // Only the blocks not yet on disk, plus the header block; both in flight together. A
  // crash between them can leave an open replica torn, which the restart scan flags.
  size_t start = r.has_file ? align_down(kReplicaHeaderBlock + r.file_bytes) : 0;
  std::vector<std::pair<size_t, size_t>> ranges;  // [from, to) of the buffer
  if (start < kReplicaHeaderBlock) {
    ranges.emplace_back(0, end);
  } else {
    ranges.emplace_back(0, kReplicaHeaderBlock);
    if (start < end) ranges.emplace_back(start, end);
  }
  bool created = !r.has_file;
  Status s = Status::kOk;
  uint32_t submitted = 0;
  for (auto [from, to] : ranges) {
    s = ring_->submit_write(f.fd, r.buffer.span().subspan(from, to - from), from, to - from);
    if (s != Status::kOk) break;
    ++submitted;
  }
  // Every submitted write must complete before the buffer can be touched again.
  Status done = run_batch(submitted, path);
  if (s == Status::kOk) s = done;
  if (s == Status::kOk && sync) {
    s = ring_->submit_datasync(f.fd, 0);  // after the writes completed: it covers them
    if (s == Status::kOk) s = run_batch(1, path);
  }
  if (s != Status::kOk) {
    if (created) ::unlink(path.c_str());  // invariant 4: no file existed before
    return s;
  }
  r.has_file = true;
  r.file_bytes = r.held_bytes;
  return Status::kOk;
}

Status BackupService::run_batch(uint32_t ops, const std::string& path) {
  std::vector<Uring::Completion> done;
  Status result = Status::kOk;
  while (done.size() < ops) {
    if (Status s = ring_->wait(1, &done); s != Status::kOk) return s;
  }
  for (const auto& c : done) {
    if (c.result < 0) {
      LOG_ERROR("writing replica {}: {}", path, std::strerror(-c.result));
      if (result == Status::kOk) result = errno_status(-c.result);
    } else if (static_cast<uint64_t>(c.result) != c.user_data) {
      LOG_ERROR("short write of replica {}: {} of {} bytes", path, c.result, c.user_data);
      if (result == Status::kOk) result = Status::kNoSpace;
    }
  }
  return result;
}

Status BackupService::free_replica(std::span<const std::byte> body) {
  wire::BodyReader in(body);
  wire::BackupFreeRequest req;
  if (!in.get(&req) || !in.at_end()) return Status::kBadRequest;
  if (fenced_.contains(req.master_id)) return Status::kFenced;  // recovery needs them
  auto it = replicas_.find({req.master_id, req.segment_id});
  if (it == replicas_.end()) return Status::kOk;  // already freed: a resent free is fine
  if (it->second.has_file) {
    std::string path = replica_path(options_.data_dir, req.master_id, req.segment_id);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      LOG_ERROR("cannot remove replica file {}: {}", path, std::strerror(errno));
      return Status::kIoError;
    }
  }
  forget(it);
  return Status::kOk;
}

void BackupService::forget(std::map<Key, Replica>::iterator it) {
  if (it->second.buffer.size() != 0) release_buffer(std::move(it->second.buffer));
  replicas_.erase(it);
}

Status BackupService::list_replicas(std::span<const std::byte> body, Reply& reply) {
  if (!body.empty()) return Status::kBadRequest;
  auto out = reply.writer();
  out.put(wire::BackupListHeader{.count = static_cast<uint32_t>(replicas_.size())});
  for (const auto& [key, r] : replicas_) {
    out.put(wire::ReplicaEntry{.master_id = key.first,
                               .segment_id = key.second,
                               .epoch = r.epoch,
                               .certificate_bytes = r.certificate_bytes,
                               .closed = static_cast<uint8_t>(r.closed ? 1 : 0),
                               .status = r.scan_status});
  }
  return Status::kOk;
}

Result<AlignedBuffer> BackupService::acquire_buffer() {
  if (!free_buffers_.empty()) {
    AlignedBuffer b = std::move(free_buffers_.back());
    free_buffers_.pop_back();
    return b;
  }
  if (buffers_allocated_ >= options_.max_buffers) return Status::kRetry;  // invariant 1
  ++buffers_allocated_;
  return AlignedBuffer(kReplicaHeaderBlock + options_.segment_bytes);
}

void BackupService::release_buffer(AlignedBuffer buffer) {
  RAMKV_CHECK(buffer.size() != 0);
  free_buffers_.push_back(std::move(buffer));
}

}  // namespace ramkv::backup
