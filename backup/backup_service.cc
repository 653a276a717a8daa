#include "backup/backup_service.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
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
  if (is_fenced(req.master_id)) return Status::kFenced;
  uint64_t end = uint64_t{req.offset} + req.length;
  if (end > options_.segment_bytes || req.certificate_bytes > end) return Status::kBadRequest;
  auto bytes = std::as_bytes(std::span(data));

  Key key{req.master_id, req.segment_id};
  auto it = replicas_.find(key);
  if (it == replicas_.end()) {
    if (req.open == 0) return Status::kBadRequest;  // unknown replica
    auto buffer = acquire_buffer();
    if (!buffer.ok()) return buffer.status();
    Replica r;
    r.epoch = req.epoch;
    r.buffer = std::move(*buffer);
    it = replicas_.emplace(key, std::move(r)).first;
    return append(it, req, bytes, /*created=*/true);
  }
  Replica& r = it->second;
  if (r.found_on_disk) return Status::kBadRequest;  // see the class comment
  // Invariant 2: the bytes held never change, and appends leave no gap.
  if (req.offset > r.held_bytes || !matches_held(r, req.offset, bytes)) {
    return Status::kBadRequest;
  }
  if (is_resend(r, req, end)) return Status::kOk;  // already done: nothing changes
  return append(it, req, bytes, /*created=*/false);
}

bool BackupService::matches_held(const Replica& r, uint32_t offset,
                                 std::span<const std::byte> data) {
  if (r.buffer.size() == 0 || offset >= r.held_bytes) return true;
  size_t overlap = std::min<size_t>(data.size(), r.held_bytes - offset);
  return std::memcmp(r.buffer.span().data() + kReplicaHeaderBlock + offset, data.data(), overlap) ==
         0;
}

bool BackupService::is_resend(const Replica& r, const wire::BackupWriteRequest& req, uint64_t end) {
  // An older certificate cannot be checked (only the latest is kept); an equal length
  // must come with the same checksum.
  bool certificate_held = req.certificate_bytes < r.certificate_bytes ||
                          (req.certificate_bytes == r.certificate_bytes &&
                           req.certificate_checksum == r.certificate_checksum);
  bool close_held = req.close == 0 || (r.closed && end == r.held_bytes);
  return end <= r.held_bytes && req.epoch <= r.epoch && certificate_held && close_held;
}

Status BackupService::append(std::map<Key, Replica>::iterator it,
                             const wire::BackupWriteRequest& req, std::span<const std::byte> data,
                             bool created) {
  const Key& key = it->first;
  Replica& r = it->second;
  const uint64_t end = uint64_t{req.offset} + req.length;
  if (r.closed || r.buffer.size() == 0 || req.offset > r.held_bytes || end < r.held_bytes ||
      req.certificate_bytes < r.certificate_bytes || req.epoch < r.epoch) {
    // Invariant 2: held bytes, certificates and epochs never shrink; invariant 3: a
    // closed replica is never written again.
    if (created) forget(it);
    return Status::kBadRequest;
  }

  // Stage the new tail (the overlap has matched: invariant 2); the replica's fields change
  // only once the write has succeeded (invariant 4), so a failure leaves the bytes beyond
  // held_bytes unclaimed.
  auto tail = data.subspan(r.held_bytes - req.offset);
  if (!tail.empty()) {
    std::memcpy(r.buffer.data() + kReplicaHeaderBlock + r.held_bytes, tail.data(), tail.size());
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
  // Only the blocks not yet on disk, and the header block. A new file goes in one write
  // (removed if it fails). An existing one gets its new blocks first and its header only
  // once they are in, so a write that fails (a full disk) leaves the header saying what
  // the file held before (invariant 4). Nothing orders them on the device before the
  // fdatasync, though: a crash in between can leave an open replica torn, which the
  // restart scan flags.
  bool created = !r.has_file;
  Status s = Status::kOk;
  if (created) {
    s = write_blocks(f.fd, r.buffer.span().first(end), 0, path);
  } else {
    size_t start = align_down(kReplicaHeaderBlock + r.file_bytes);
    if (start < end)
      s = write_blocks(f.fd, r.buffer.span().subspan(start, end - start), start, path);
    if (s == Status::kOk) {
      s = write_blocks(f.fd, r.buffer.span().first(kReplicaHeaderBlock), 0, path);
    }
  }
  // After the writes completed: it covers them.
  if (s == Status::kOk && sync) s = datasync(f.fd, path);
  if (s != Status::kOk) {
    if (created) ::unlink(path.c_str());  // invariant 4: no file existed before
    return s;
  }
  r.has_file = true;
  r.file_bytes = r.held_bytes;
  return Status::kOk;
}

Status BackupService::write_blocks(int fd, std::span<const std::byte> blocks, size_t file_offset,
                                   const std::string& path) {
  // A short write is resumed where it stopped, so that the error which stopped it decides
  // the status (ENOSPC: kNoSpace) rather than a guess; Linux also cuts single writes at
  // 2 GiB - 4 KiB. O_DIRECT can resume only at a block boundary.
  while (!blocks.empty()) {
    uint64_t op = ++last_op_;
    if (Status s = ring_->submit_write(fd, blocks, file_offset, op); s != Status::kOk) return s;
    auto result = wait_for(op);  // the buffer may be touched again only after this
    if (!result.ok()) return result.status();
    if (*result < 0) {
      LOG_ERROR("writing replica {}: {}", path, std::strerror(-*result));
      return errno_status(-*result);
    }
    auto written = static_cast<size_t>(*result);
    if (written == blocks.size()) break;
    if (written == 0 || written % kDirectAlignment != 0) {
      // No progress, or none that O_DIRECT can resume from. A regular file takes fewer
      // bytes than asked only when it runs out of room (or past the file-size limit).
      LOG_ERROR("short write of replica {}: {} of {} bytes", path, written, blocks.size());
      return Status::kNoSpace;
    }
    blocks = blocks.subspan(written);
    file_offset += written;
  }
  return Status::kOk;
}

Status BackupService::datasync(int fd, const std::string& path) {
  uint64_t op = ++last_op_;
  if (Status s = ring_->submit_datasync(fd, op); s != Status::kOk) return s;
  auto result = wait_for(op);
  if (!result.ok()) return result.status();
  if (*result < 0) {
    LOG_ERROR("syncing replica {}: {}", path, std::strerror(-*result));
    return errno_status(-*result);
  }
  return Status::kOk;
}

Result<int32_t> BackupService::wait_for(uint64_t op) {
  // Completions of operations whose wait failed earlier may come first: skip them.
  std::vector<Uring::Completion> done;
  for (;;) {
    if (Status s = ring_->wait(1, &done); s != Status::kOk) return s;
    for (const auto& c : done) {
      if (c.user_data == op) return c.result;
    }
    done.clear();
  }
}

Status BackupService::free_replica(std::span<const std::byte> body) {
  wire::BodyReader in(body);
  wire::BackupFreeRequest req;
  if (!in.get(&req) || !in.at_end()) return Status::kBadRequest;
  if (is_fenced(req.master_id)) return Status::kFenced;  // recovery needs them
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
