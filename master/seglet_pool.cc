#include "master/seglet_pool.h"

#include <sys/mman.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>

#include "common/config.h"
#include "common/log.h"
#include "common/prefault.h"

namespace ramkv::master {

namespace {

// Every page gets one store at start, instead of during a recovery's replay. MAP_POPULATE
// (used before) fills the kernel's page tables, but on some virtual machines (shadow or
// paravirtual paging) the first store to each page still traps to the hypervisor: a
// first copy into populated memory measured 850 MB/s against 13 GB/s once every page
// had been written from user space (docs/recovery.md, "Where the time goes"); with huge
// pages (madvise'd before the stores) each store here faults in 2 MiB at once. The
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
  // Huge pages where the kernel gives them (madvise or always): at start, one fault per
  // 2 MiB instead of 512; and the kernel copies replication writes straight out of the
  // log (replica_manager.h, rule 9), which on the virtual machines we measure on costs
  // about 4 us per 4 KiB page the first time the kernel touches it, and nothing more on
  // a huge page (docs/recovery.md). The mapping is 2 MiB-aligned so that all of it can be.
  constexpr uint64_t kHuge = kHugePageBytes;
  const uint64_t slack = pool->mapped_bytes_ >= kHuge ? kHuge : 0;
  void* mem = ::mmap(nullptr, pool->mapped_bytes_ + slack, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    LOG_ERROR("cannot map {} of log memory: {}", format_bytes(pool->mapped_bytes_),
              std::strerror(errno));
    return Status::kNoSpace;
  }
  auto* raw = static_cast<std::byte*>(mem);
  auto* base = raw;
  if (slack > 0) {
    base =
        reinterpret_cast<std::byte*>((reinterpret_cast<uintptr_t>(raw) + kHuge - 1) & ~(kHuge - 1));
    const uint64_t head = static_cast<uint64_t>(base - raw);
    if (head > 0) ::munmap(raw, head);
    if (slack - head > 0) ::munmap(base + pool->mapped_bytes_, slack - head);
  }
  pool->base_ = base;
  pool->huge_pages_ = slack > 0 && advise_huge_pages({base, pool->mapped_bytes_});
  if (options.prefault) {
    // Seconds per GiB on some VMs: say so when it is worth waiting for.
    const bool big = pool->mapped_bytes_ >= (uint64_t{1} << 30);
    const auto start = std::chrono::steady_clock::now();
    if (big) {
      LOG_INFO("touching {} of log memory once per page ({})", format_bytes(pool->mapped_bytes_),
               pool->huge_pages_ ? "huge pages" : "4 KiB pages: no transparent huge pages here");
    }
    touch_pages(pool->base_, pool->mapped_bytes_);
    // Without huge pages the kernel's first copy out of each page is slow on some VMs
    // (above): it touches them all once now, not during a recovery's replication.
    if (!pool->huge_pages_) touch_from_kernel({pool->base_, pool->mapped_bytes_});
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
