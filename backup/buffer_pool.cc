#include "backup/buffer_pool.h"

#include <algorithm>
#include <utility>

namespace ramkv::backup {

BufferPool::BufferPool(size_t buffer_bytes, size_t keep)
    : buffer_bytes_(align_up(buffer_bytes)), keep_(keep) {}

void BufferPool::fill(size_t count) {
  count = std::min(count, keep_);
  while (free_count() < count) give(AlignedBuffer(buffer_bytes_));
}

AlignedBuffer BufferPool::take() {
  std::lock_guard lock(mutex_);
  if (free_.empty()) return AlignedBuffer();
  AlignedBuffer b = std::move(free_.back());
  free_.pop_back();
  return b;
}

AlignedBuffer BufferPool::take_or_allocate() {
  AlignedBuffer b = take();
  if (b.size() != 0) return b;
  {
    std::lock_guard lock(mutex_);
    ++allocated_late_;
  }
  return AlignedBuffer(buffer_bytes_);
}

void BufferPool::give(AlignedBuffer buffer) {
  if (buffer.size() != buffer_bytes_) return;  // freed here
  std::lock_guard lock(mutex_);
  if (free_.size() < keep_) free_.push_back(std::move(buffer));
}

size_t BufferPool::free_count() const {
  std::lock_guard lock(mutex_);
  return free_.size();
}

size_t BufferPool::allocated_late() const {
  std::lock_guard lock(mutex_);
  return allocated_late_;
}

}  // namespace ramkv::backup
