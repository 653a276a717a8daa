#include "backup/uring.h"

#include <fcntl.h>

#include <liburing.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/log.h"
#include "common/prefault.h"

namespace ramkv::backup {

Result<std::unique_ptr<Uring>> Uring::create(uint32_t depth) {
  std::unique_ptr<Uring> u(new Uring());
  u->ring_ = std::make_unique<io_uring>();
  int rc = io_uring_queue_init(depth, u->ring_.get(), 0);
  if (rc < 0) {
    LOG_ERROR("io_uring is not available here: {}", std::strerror(-rc));
    return Status::kUnavailable;
  }
  u->initialised_ = true;
  u->depth_ = depth;
  u->event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (u->event_fd_ < 0) {
    LOG_ERROR("cannot create an eventfd for io_uring: {}", std::strerror(errno));
    return Status::kUnavailable;
  }
  rc = io_uring_register_eventfd(u->ring_.get(), u->event_fd_);
  if (rc < 0) {
    LOG_ERROR("cannot register an eventfd with io_uring: {}", std::strerror(-rc));
    return Status::kUnavailable;
  }
  return u;
}

Uring::~Uring() {
  if (!initialised_) return;
  // Operations still in flight write into buffers the caller is about to free: wait.
  std::vector<Completion> done;
  while (in_flight_ > 0 && wait(1, &done) == Status::kOk) done.clear();
  io_uring_queue_exit(ring_.get());  // unregisters the eventfd
  if (event_fd_ >= 0) ::close(event_fd_);
}

void Uring::clear_event() {
  uint64_t count = 0;
  // EAGAIN when nothing was posted since the last clear: nothing to do.
  [[maybe_unused]] ssize_t n = ::read(event_fd_, &count, sizeof(count));
}

Status Uring::queue(int fd, void* buffer, size_t length, uint64_t offset, uint64_t user_data,
                    int op, bool link_next) {
  if (in_flight_ >= depth_) return Status::kRetry;
  io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
  if (sqe == nullptr) return Status::kRetry;
  switch (op) {
    case 0:
      io_uring_prep_write(sqe, fd, buffer, static_cast<unsigned>(length), offset);
      break;
    case 1:
      io_uring_prep_read(sqe, fd, buffer, static_cast<unsigned>(length), offset);
      break;
    default:
      // No IOSQE_IO_DRAIN: it would stall every other file's I/O on the ring. The caller
      // submits a datasync once the writes it must cover have completed, or links it
      // behind them.
      io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
      break;
  }
  io_uring_sqe_set_data64(sqe, user_data);
  if (link_next) sqe->flags |= IOSQE_IO_LINK;
  ++in_flight_;
  return Status::kOk;
}

Status Uring::submit_write(int fd, std::span<const std::byte> buffer, uint64_t offset,
                           uint64_t user_data, bool link_next) {
  return queue(fd, const_cast<std::byte*>(buffer.data()), buffer.size(), offset, user_data, 0,
               link_next);
}

Status Uring::submit_read(int fd, std::span<std::byte> buffer, uint64_t offset,
                          uint64_t user_data) {
  return queue(fd, buffer.data(), buffer.size(), offset, user_data, 1, false);
}

Status Uring::submit_datasync(int fd, uint64_t user_data) {
  return queue(fd, nullptr, 0, 0, user_data, 2, false);
}

Status Uring::submit_open(const char* path, int flags, uint32_t mode, uint64_t user_data) {
  if (in_flight_ >= depth_) return Status::kRetry;
  io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
  if (sqe == nullptr) return Status::kRetry;
  io_uring_prep_openat(sqe, AT_FDCWD, path, flags, mode);
  io_uring_sqe_set_data64(sqe, user_data);
  ++in_flight_;
  return Status::kOk;
}

Status Uring::wait(uint32_t min_completions, std::vector<Completion>* out) {
  int rc = io_uring_submit_and_wait(ring_.get(), std::min(min_completions, in_flight_));
  if (rc < 0 && rc != -EINTR) {
    LOG_ERROR("io_uring_submit_and_wait: {}", std::strerror(-rc));
    return Status::kIoError;
  }
  io_uring_cqe* cqe = nullptr;
  unsigned head = 0, seen = 0;
  io_uring_for_each_cqe(ring_.get(), head, cqe) {
    out->push_back({io_uring_cqe_get_data64(cqe), cqe->res});
    ++seen;
  }
  io_uring_cq_advance(ring_.get(), seen);
  in_flight_ -= seen;
  return Status::kOk;
}

AlignedBuffer::AlignedBuffer(size_t bytes) : size_(align_up(bytes)) {
  // Segment-sized buffers on huge pages where the kernel gives them: the kernel copies
  // replication writes into them and recovery data out of them, and reads and writes them
  // with O_DIRECT, each of which costs per 4 KiB page on the virtual machines we measure
  // on (a recovery on 4 KiB buffers ran at 539-679 MB/s, on huge pages at 623-776 in
  // alternating runs; docs/recovery.md). Smaller ones stay block-aligned.
  // posix_memalign, not aligned_alloc: the size need not be a multiple of the alignment
  // (a segment and its header block are not), which aligned_alloc may refuse.
  const bool large = size_ >= kHugePageBytes;
  void* mem = nullptr;
  const int rc = ::posix_memalign(&mem, large ? kHugePageBytes : kDirectAlignment,
                                  size_ == 0 ? kDirectAlignment : size_);
  RAMKV_CHECK_MSG(rc == 0 && mem != nullptr, "cannot allocate an aligned I/O buffer");
  data_ = static_cast<std::byte*>(mem);
  const bool huge = large && advise_huge_pages({data_, size_});
  std::memset(mem, 0, size_);
  // Without huge pages, the kernel's first copy into a page costs as much again as the
  // memset's (prefault.h): it touches every page once now.
  if (!huge) touch_from_kernel({data_, size_});
}

AlignedBuffer::~AlignedBuffer() { std::free(data_); }

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    std::free(data_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

}  // namespace ramkv::backup
