#include "master/seglet_pool.h"

#include <sys/mman.h>

#include <chrono>
#include <cstring>

#include "common/config.h"
#include "common/log.h"

namespace ramkv::master {

namespace {

// MAP_POPULATE fills the kernel's page tables, but on some virtual machines (shadow or
// paravirtual paging) the first store to each page still traps to the hypervisor: a
// first copy into populated memory measured 850 MB/s against 13 GB/s once every page
// had been written from user space (docs/recovery.md, "Where the time goes"). So every
// page also gets one store here, at start, instead of during a recovery's replay. The
// memory is fresh and zero, so storing a zero changes nothing.
void touch_pages(std::byte* base, size_t bytes) {
  constexpr size_t kPage = 4096;
  for (size_t off = 0; off < bytes; off += kPage) {
    *reinterpret_cast<volatile std::byte*>(base + off) = std::byte{0};
  }
}

}  // namespace

Result<std::unique_ptr<SegletPool>> SegletPool::create(const Options& options) {
  if (options.seglet_bytes < 512 || (options.seglet_bytes & (options.seglet_bytes - 1)) != 0) {
    LOG_ERROR("seglet size {} must be a power of two of at least 512 bytes", options.seglet_bytes);
    return Status::kInvalidArgument;
  }
  uint64_t count = options.memory_bytes / options.seglet_bytes;
  // Log references are 40-bit arena offsets (see hash_table.h).
  if (count == 0 || count >= UINT32_MAX || options.memory_bytes >= (1ULL << 40)) {
    LOG_ERROR("log memory of {} is out of range (one seglet to 1 TiB)",
              format_bytes(options.memory_bytes));
    return Status::kInvalidArgument;
  }
  if (options.reserve_seglets >= count) {
    LOG_ERROR("the cleaner's reserve ({} seglets) leaves no memory for the log",
              options.reserve_seglets);
    return Status::kInvalidArgument;
  }
  std::unique_ptr<SegletPool> pool(new SegletPool());
  pool->seglet_bytes_ = options.seglet_bytes;
  pool->seglet_count_ = static_cast<uint32_t>(count);
  pool->reserve_seglets_ = options.reserve_seglets;
  pool->mapped_bytes_ = count * options.seglet_bytes;
  int flags = MAP_PRIVATE | MAP_ANONYMOUS | (options.prefault ? MAP_POPULATE : 0);
  void* mem = ::mmap(nullptr, pool->mapped_bytes_, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (mem == MAP_FAILED) {
    LOG_ERROR("cannot map {} of log memory: {}", format_bytes(pool->mapped_bytes_),
              std::strerror(errno));
    return Status::kNoSpace;
  }
  pool->base_ = static_cast<std::byte*>(mem);
  if (options.prefault) {
    // Seconds per GiB on some VMs: say so when it is worth waiting for.
    const bool big = pool->mapped_bytes_ >= (uint64_t{1} << 30);
    const auto start = std::chrono::steady_clock::now();
    if (big) LOG_INFO("touching {} of log memory once per page", format_bytes(pool->mapped_bytes_));
    touch_pages(pool->base_, pool->mapped_bytes_);
    if (big) {
      LOG_INFO("log memory touched in {:.1f} s",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
  pool->owners_.resize(pool->seglet_count_);
  pool->free_.reserve(pool->seglet_count_);
  // Hand out low seglets first (pop from the back).
  for (uint32_t i = pool->seglet_count_; i-- > 0;) pool->free_.push_back(i);
  pool->free_count_ = pool->seglet_count_;
  return pool;
}

SegletPool::~SegletPool() {
  if (base_ != nullptr) ::munmap(base_, mapped_bytes_);
}

uint32_t SegletPool::allocate(Purpose purpose, Segment* owner, uint32_t index_in_segment) {
  RAMKV_CHECK_MSG(owner != nullptr, "every allocated seglet needs its owning segment");
  std::lock_guard lock(mutex_);
  size_t floor = purpose == Purpose::kHead ? reserve_seglets_ : 0;
  if (free_.size() <= floor) return kNoSeglet;
  uint32_t s = free_.back();
  free_.pop_back();
  free_count_.store(static_cast<uint32_t>(free_.size()), std::memory_order_relaxed);
  owners_[s] = {owner, index_in_segment};
  return s;
}

void SegletPool::free(uint32_t seglet) {
  RAMKV_CHECK(seglet < seglet_count_);
  std::lock_guard lock(mutex_);
  RAMKV_CHECK(owners_[seglet].segment != nullptr);
  owners_[seglet] = {};
  free_.push_back(seglet);
  free_count_.store(static_cast<uint32_t>(free_.size()), std::memory_order_relaxed);
}
}  // namespace ramkv::master
