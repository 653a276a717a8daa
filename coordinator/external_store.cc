#include "coordinator/external_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "common/buffer.h"
#include "common/checksum.h"
#include "common/log.h"

namespace ramkv::coordinator {

namespace {

constexpr uint32_t kFileMagic = 0x43564b52;  // "RKVC" little-endian
constexpr uint32_t kFileVersion = 1;
constexpr size_t kHeaderBytes = 24;
constexpr size_t kChecksummedHeaderBytes = 16;

uint64_t state_checksum(std::span<const std::byte> header16, std::span<const std::byte> payload) {
  Checksum sum;
  sum.update(header16);
  sum.update(payload);
  return sum.digest();
}

// Writes all of `bytes` to fd; false on error (errno set).
bool write_all(int fd, std::span<const std::byte> bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
  return true;
}

Status fsync_path(const std::string& path, int flags) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return Status::kIoError;
  int rc = ::fsync(fd);
  ::close(fd);
  return rc == 0 ? Status::kOk : Status::kIoError;
}

Result<std::vector<std::byte>> read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return Status::kObjectNotFound;
    LOG_ERROR("cannot open {}: {}", path, std::strerror(errno));
    return Status::kIoError;
  }
  std::vector<std::byte> bytes;
  std::byte chunk[64 * 1024];
  while (true) {
    ssize_t n = ::read(fd, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      LOG_ERROR("cannot read {}: {}", path, std::strerror(errno));
      ::close(fd);
      return Status::kIoError;
    }
    if (n == 0) break;
    bytes.insert(bytes.end(), chunk, chunk + n);
  }
  ::close(fd);
  return bytes;
}

}  // namespace

Result<std::unique_ptr<FileStore>> FileStore::open(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir, ec)) {
    LOG_ERROR("cannot use data directory {}: {}", dir, ec ? ec.message() : "not a directory");
    return Status::kIoError;
  }
  return std::unique_ptr<FileStore>(new FileStore(dir));
}

Result<std::vector<std::byte>> FileStore::get() {
  auto file = read_file(path());
  if (!file.ok()) return file.status();
  std::span<const std::byte> bytes = *file;
  ByteReader r(bytes);
  auto magic = r.get<uint32_t>();
  auto version = r.get<uint32_t>();
  auto payload_bytes = r.get<uint64_t>();
  auto checksum = r.get<uint64_t>();
  if (!r.ok() || magic != kFileMagic || version != kFileVersion || payload_bytes != r.remaining()) {
    LOG_ERROR("{}: bad header or length ({} bytes): the state file is corrupt", path(),
              bytes.size());
    return Status::kCorrupt;
  }
  auto payload = bytes.subspan(kHeaderBytes);
  if (state_checksum(bytes.first(kChecksummedHeaderBytes), payload) != checksum) {
    LOG_ERROR("{}: checksum mismatch: the state file is corrupt", path());
    return Status::kCorrupt;
  }
  return std::vector<std::byte>(payload.begin(), payload.end());
}

Status FileStore::put(std::span<const std::byte> state) {
  std::byte header[kHeaderBytes];
  ByteWriter w(header);
  w.put(kFileMagic);
  w.put(kFileVersion);
  w.put(uint64_t{state.size()});
  w.put(state_checksum(std::span<const std::byte>(header).first(kChecksummedHeaderBytes), state));
  RAMKV_CHECK(w.ok());

  std::string tmp = path() + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    LOG_ERROR("cannot create {}: {}", tmp, std::strerror(errno));
    return Status::kIoError;
  }
  bool ok = write_all(fd, header) && write_all(fd, state) && ::fsync(fd) == 0;
  int saved_errno = errno;
  ::close(fd);
  if (!ok || ::rename(tmp.c_str(), path().c_str()) != 0) {
    LOG_ERROR("cannot write {}: {}", path(), std::strerror(ok ? errno : saved_errno));
    ::unlink(tmp.c_str());
    return Status::kIoError;
  }
  // The rename is durable only once the directory entry is.
  if (fsync_path(dir_, O_RDONLY | O_DIRECTORY) != Status::kOk) {
    LOG_ERROR("cannot fsync directory {}: {}", dir_, std::strerror(errno));
    return Status::kIoError;
  }
  return Status::kOk;
}

}  // namespace ramkv::coordinator
