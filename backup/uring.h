// Uring: a thin RAII wrapper over one io_uring (liburing) for the backup's segment files:
// reads, writes and fdatasyncs with several in flight, completions collected in batches.
//
// Buffers handed to an operation are owned by the caller and must stay valid, unmoved,
// until that operation's completion has been returned by wait() (the kernel reads or
// writes them asynchronously; see docs/backup-storage.md "Buffer ownership"). With
// O_DIRECT files, buffers, lengths and offsets must be multiples of kDirectAlignment.
//
// Completions also count up an eventfd (event_fd()), so that a dispatch loop can sleep on
// it with its sockets (transport.h, LoopTask) and collect them with wait(0).
//
// Owner: one thread (the backup's dispatch thread). Not thread-safe.
// Invariants:
//   1. At most depth() operations are in flight; submit_*() answers kRetry beyond that.
//   2. Every submitted operation completes exactly once through wait().
//   3. An operation queued with link_next set is followed by the next one queued: that one
//      starts only once this one has completed in full, and completes with -ECANCELED
//      if this one fails or is short (IOSQE_IO_LINK). The last of a chain has it unset.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/result.h"

struct io_uring;

namespace ramkv::backup {

constexpr size_t kDirectAlignment = 4096;

class Uring {
 public:
  // kUnavailable when io_uring cannot be set up (old kernel, seccomp): the caller says so.
  static Result<std::unique_ptr<Uring>> create(uint32_t depth);
  ~Uring();
  Uring(const Uring&) = delete;
  Uring& operator=(const Uring&) = delete;

  // Queue an operation; it is submitted by the next wait(). `link_next`: invariant 3.
  Status submit_write(int fd, std::span<const std::byte> buffer, uint64_t offset,
                      uint64_t user_data, bool link_next = false);
  Status submit_read(int fd, std::span<std::byte> buffer, uint64_t offset, uint64_t user_data);
  // fdatasync of the file. It covers only writes that have already completed: submit it
  // after their completions, or linked behind them (operations in flight together, and
  // not linked, run in any order).
  Status submit_datasync(int fd, uint64_t user_data);
  // openat(AT_FDCWD, path, flags, mode): the completion's result is the descriptor (the
  // caller owns it) or -errno. `path` must stay valid until the completion.
  Status submit_open(const char* path, int flags, uint32_t mode, uint64_t user_data);

  struct Completion {
    uint64_t user_data = 0;
    int32_t result = 0;  // bytes transferred, or -errno
  };
  // Submits what is queued and waits for at least `min_completions` (0: only collect what
  // is ready), appending them to *out.
  Status wait(uint32_t min_completions, std::vector<Completion>* out);

  uint32_t depth() const { return depth_; }
  uint32_t in_flight() const { return in_flight_; }
  // Operations that may still be queued (a chain is queued only where it fits whole).
  uint32_t room() const { return depth_ - in_flight_; }

  // Readable (level-triggered) once a completion has been posted since the last
  // clear_event(). Clear it before collecting with wait(0), so that a completion posted
  // meanwhile leaves it readable.
  int event_fd() const { return event_fd_; }
  void clear_event();

 private:
  Uring() = default;
  Status queue(int fd, void* buffer, size_t length, uint64_t offset, uint64_t user_data, int op,
               bool link_next);

  std::unique_ptr<io_uring> ring_;
  int event_fd_ = -1;  // registered with ring_; closed after it
  uint32_t depth_ = 0;
  uint32_t in_flight_ = 0;
  bool initialised_ = false;
};

// A buffer aligned for O_DIRECT, zero-filled, owned.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t bytes);
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  std::span<std::byte> span() { return {data_, size_}; }
  std::span<const std::byte> span() const { return {data_, size_}; }
  std::byte* data() { return data_; }
  size_t size() const { return size_; }

 private:
  std::byte* data_ = nullptr;
  size_t size_ = 0;
};

constexpr size_t align_up(size_t n) {
  return (n + kDirectAlignment - 1) / kDirectAlignment * kDirectAlignment;
}

}  // namespace ramkv::backup
