// BufferPool: a backup's segment-sized I/O buffers (AlignedBuffer), kept for reuse instead
// of going back to the operating system.
//
// Why: memory a process touches for the first time is slow on virtual machines (the host
// backs the page, and the guest's page tables fault it in). Measured here: reading,
// checking and splitting 352 MiB of replicas took a backup 2.4 s in fresh buffers and
// 0.6 s in buffers it had touched before (docs/recovery.md, "Where the time goes"). So a
// backup fills its pool at start (`--backup-buffers-at-start`), and both its open
// replicas and a recovery's reads take buffers from it and give them back.
//
// A buffer taken from the pool holds what its last user left in it: whoever takes one
// must not rely on zeros (new ones are zero-filled, which is what touches their pages).
// Threads: every method may be called from any thread.
#pragma once

#include <cstddef>
#include <mutex>
#include <vector>

#include "backup/uring.h"

namespace ramkv::backup {

class BufferPool {
 public:
  // Buffers of `buffer_bytes` (rounded up for O_DIRECT); at most `keep` free ones are
  // kept, further ones given back are freed.
  BufferPool(size_t buffer_bytes, size_t keep);
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  size_t buffer_bytes() const { return buffer_bytes_; }
  // Allocates buffers (zero-filled: every page touched) until `count` are free, at most
  // `keep`.
  void fill(size_t count);
  // A free buffer, or an empty one (size() == 0) when none is free.
  AlignedBuffer take();
  // A free buffer, or a new one.
  AlignedBuffer take_or_allocate();
  // Keeps the buffer for reuse when it has the pool's size and fewer than `keep` are
  // free; frees it otherwise.
  void give(AlignedBuffer buffer);
  size_t free_count() const;
  // Buffers allocated because none was free (after fill()): each one's pages were touched
  // for the first time on the spot, which on virtual machines costs about 10 ms per 8 MiB.
  // Not zero after a recovery: `--backup-buffers-at-start` was too small for it.
  size_t allocated_late() const;

 private:
  const size_t buffer_bytes_;
  const size_t keep_;
  mutable std::mutex mutex_;
  std::vector<AlignedBuffer> free_;
  size_t allocated_late_ = 0;
};

}  // namespace ramkv::backup
