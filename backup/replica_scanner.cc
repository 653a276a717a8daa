#include "backup/replica_scanner.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <tuple>

#include "common/log.h"
#include "common/segment_iterator.h"

namespace ramkv::backup {
namespace {

bool parse_id(const std::string& name, uint64_t* id) {
  auto [ptr, ec] = std::from_chars(name.data(), name.data() + name.size(), *id);
  return ec == std::errc() && ptr == name.data() + name.size() && !name.empty();
}

// The whole-entry prefix of whatever segment bytes the file holds, certificate or not.
uint32_t salvage_prefix(const std::string& path) {
  std::error_code ec;
  uint64_t size = std::filesystem::file_size(path, ec);
  if (ec || size <= kReplicaHeaderBlock) return 0;
  size_t n = static_cast<size_t>(std::min<uint64_t>(size - kReplicaHeaderBlock, 1u << 30));
  std::vector<std::byte> bytes(n);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t got = ::pread(fd, bytes.data(), n, static_cast<off_t>(kReplicaHeaderBlock));
  ::close(fd);
  if (got <= 0) return 0;
  SegmentIterator it(std::span<const std::byte>(bytes.data(), static_cast<size_t>(got)));
  while (it.valid()) it.next();
  return it.valid_bytes();
}

}  // namespace

ScannedReplica check_replica(const std::string& path, uint64_t master_id, uint64_t segment_id) {
  ScannedReplica r;
  r.master_id = master_id;
  r.segment_id = segment_id;
  r.path = path;
  auto loaded = load_replica(path);
  if (!loaded.ok()) {
    r.status = loaded.status() == Status::kIoError ? Status::kIoError : loaded.status();
    r.valid_bytes = salvage_prefix(path);
    // A torn file may still have a good header (epoch, what it certified): keep it.
    std::vector<std::byte> block(kReplicaHeaderBlock);
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      ssize_t got = ::pread(fd, block.data(), block.size(), 0);
      ::close(fd);
      if (got == static_cast<ssize_t>(block.size())) {
        auto header = decode_replica_header(block);
        if (header.ok() && header->master_id == master_id && header->segment_id == segment_id) {
          r.header = *header;
        }
      }
    }
    return r;
  }
  r.header = loaded->header;
  auto bytes = loaded->data.span().first(loaded->header.certificate_bytes);
  SegmentIterator it(
      bytes, Certificate{loaded->header.certificate_bytes, loaded->header.certificate_checksum});
  r.status = it.validate();
  if (r.status == Status::kOk) {
    r.valid_bytes = loaded->header.certificate_bytes;
  } else {
    SegmentIterator scan(bytes);
    while (scan.valid()) scan.next();
    r.valid_bytes = scan.valid_bytes();
  }
  if (r.header.master_id != master_id || r.header.segment_id != segment_id) {
    r.status = Status::kCorrupt;  // a file that says it is another replica
  }
  return r;
}

Result<std::vector<ScannedReplica>> scan_replicas(const std::string& data_dir) {
  std::vector<ScannedReplica> out;
  std::error_code ec;
  if (!std::filesystem::exists(data_dir, ec)) return out;
  std::filesystem::directory_iterator masters(data_dir, ec);
  if (ec) {
    LOG_ERROR("cannot read backup directory {}: {}", data_dir, ec.message());
    return Status::kIoError;
  }
  for (const auto& m : masters) {
    uint64_t master_id = 0;
    if (!m.is_directory() || !parse_id(m.path().filename().string(), &master_id)) {
      LOG_WARNING("backup scan: skipping {}: not a master directory", m.path().string());
      continue;
    }
    for (const auto& f : std::filesystem::directory_iterator(m.path(), ec)) {
      uint64_t segment_id = 0;
      if (!f.is_regular_file() || !parse_id(f.path().filename().string(), &segment_id)) {
        LOG_WARNING("backup scan: skipping {}: not a replica file", f.path().string());
        continue;
      }
      out.push_back(check_replica(f.path().string(), master_id, segment_id));
      const auto& r = out.back();
      if (r.status != Status::kOk) {
        LOG_WARNING("backup scan: replica {}/{} is {} ({} valid bytes)", master_id, segment_id,
                    r.status == Status::kFormatError ? "torn" : status_name(r.status),
                    r.valid_bytes);
      }
    }
  }
  std::sort(out.begin(), out.end(), [](const ScannedReplica& a, const ScannedReplica& b) {
    return std::tie(a.master_id, a.segment_id) < std::tie(b.master_id, b.segment_id);
  });
  return out;
}

}  // namespace ramkv::backup
