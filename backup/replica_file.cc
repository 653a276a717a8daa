#include "backup/replica_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "common/buffer.h"
#include "common/checksum.h"
#include "common/log.h"

namespace ramkv::backup {
namespace {

constexpr size_t kHeaderBytes = 64;
constexpr size_t kChecksumOffset = 56;

// Closes a file descriptor on every path out.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

std::string replica_path(const std::string& data_dir, uint64_t master_id, uint64_t segment_id) {
  return data_dir + "/" + std::to_string(master_id) + "/" + std::to_string(segment_id);
}

void encode_replica_header(const ReplicaHeader& h, std::span<std::byte> block) {
  RAMKV_CHECK(block.size() >= kReplicaHeaderBlock);
  std::memset(block.data(), 0, kReplicaHeaderBlock);
  ByteWriter w(block.first(kHeaderBytes));
  w.put<uint32_t>(kReplicaMagic);
  w.put<uint16_t>(kReplicaVersion);
  w.put<uint16_t>(h.closed ? 1 : 0);
  w.put<uint64_t>(h.master_id);
  w.put<uint64_t>(h.segment_id);
  w.put<uint64_t>(h.epoch);
  w.put<uint32_t>(h.capacity);
  w.put<uint32_t>(h.certificate_bytes);
  w.put<uint32_t>(h.certificate_checksum);
  w.put<uint32_t>(0);
  w.put<uint64_t>(0);
  w.put<uint32_t>(checksum32(block.first(kChecksumOffset)));
  RAMKV_CHECK(w.ok() && w.size() == kChecksumOffset + 4);
}

Result<ReplicaHeader> decode_replica_header(std::span<const std::byte> block) {
  if (block.size() < kHeaderBytes) return Status::kFormatError;
  ByteReader r(block.first(kHeaderBytes));
  ReplicaHeader h;
  uint32_t magic = r.get<uint32_t>();
  uint16_t version = r.get<uint16_t>();
  uint16_t flags = r.get<uint16_t>();
  h.master_id = r.get<uint64_t>();
  h.segment_id = r.get<uint64_t>();
  h.epoch = r.get<uint64_t>();
  h.capacity = r.get<uint32_t>();
  h.certificate_bytes = r.get<uint32_t>();
  h.certificate_checksum = r.get<uint32_t>();
  r.get<uint32_t>();
  r.get<uint64_t>();
  uint32_t stored = r.get<uint32_t>();
  if (!r.ok() || magic != kReplicaMagic || version != kReplicaVersion) return Status::kFormatError;
  if (checksum32(block.first(kChecksumOffset)) != stored) return Status::kCorrupt;
  if ((flags & ~1u) != 0 || h.certificate_bytes > h.capacity) return Status::kFormatError;
  h.closed = (flags & 1u) != 0;
  return h;
}

Result<LoadedReplica> load_replica(const std::string& path) {
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) {
    return errno == ENOENT ? Status::kObjectNotFound : Status::kIoError;
  }
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) return Status::kIoError;
  auto file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < kReplicaHeaderBlock) return Status::kFormatError;  // torn at birth
  AlignedBuffer block(kReplicaHeaderBlock);
  if (::pread(f.fd, block.data(), kReplicaHeaderBlock, 0) !=
      static_cast<ssize_t>(kReplicaHeaderBlock)) {
    return Status::kIoError;
  }
  auto header = decode_replica_header(block.span());
  if (!header.ok()) return header.status();
  if (kReplicaHeaderBlock + uint64_t{header->certificate_bytes} > file_bytes) {
    return Status::kFormatError;  // the certificate claims bytes that never reached disk
  }
  LoadedReplica loaded{*header, AlignedBuffer(header->certificate_bytes)};
  size_t want = header->certificate_bytes;
  size_t done = 0;
  while (done < want) {
    ssize_t n = ::pread(f.fd, loaded.data.data() + done, want - done,
                        static_cast<off_t>(kReplicaHeaderBlock + done));
    if (n <= 0) return n == 0 ? Status::kFormatError : Status::kIoError;
    done += static_cast<size_t>(n);
  }
  return loaded;
}

Status write_replica(Uring& ring, const std::string& data_dir, const ReplicaHeader& header,
                     std::span<const std::byte> segment_bytes, bool sync) {
  if (segment_bytes.size() > header.capacity) return Status::kInvalidArgument;
  std::error_code ec;
  std::string dir = data_dir + "/" + std::to_string(header.master_id);
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    LOG_ERROR("cannot create {}: {}", dir, ec.message());
    return Status::kIoError;
  }
  std::string path = replica_path(data_dir, header.master_id, header.segment_id);
  Fd f{::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0644)};
  if (f.fd < 0) {
    LOG_ERROR("cannot create replica file {}: {}", path, std::strerror(errno));
    return Status::kIoError;
  }
  AlignedBuffer block(kReplicaHeaderBlock + segment_bytes.size());
  encode_replica_header(header, block.span());
  if (!segment_bytes.empty()) {
    std::memcpy(block.data() + kReplicaHeaderBlock, segment_bytes.data(), segment_bytes.size());
  }
  if (Status s = ring.submit_write(f.fd, block.span(), 0, 1); s != Status::kOk) return s;
  std::vector<Uring::Completion> done;
  while (done.empty()) {
    if (Status s = ring.wait(1, &done); s != Status::kOk) return s;
  }
  if (sync && done[0].result >= 0) {
    // Only now: a datasync covers writes that have completed.
    if (Status s = ring.submit_datasync(f.fd, 2); s != Status::kOk) return s;
    while (done.size() < 2) {
      if (Status s = ring.wait(1, &done); s != Status::kOk) return s;
    }
  }
  for (const auto& c : done) {
    if (c.result < 0) {
      LOG_ERROR("writing replica {}: {}", path, std::strerror(-c.result));
      return c.result == -ENOSPC ? Status::kNoSpace : Status::kIoError;
    }
    if (c.user_data == 1 && static_cast<size_t>(c.result) != block.size()) {
      LOG_ERROR("short write of replica {}: {} of {} bytes", path, c.result, block.size());
      return Status::kNoSpace;
    }
  }
  return Status::kOk;
}

}  // namespace ramkv::backup
