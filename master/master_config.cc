#include "master/master_config.h"

#include <algorithm>

#include "common/config.h"
#include "common/log.h"
#include "common/log_entry.h"

namespace ramkv::master {

uint64_t MasterConfig::max_log_segments() const {
  return std::max<uint64_t>(
      4, static_cast<uint64_t>(disk_expansion_factor * static_cast<double>(memory_bytes) /
                               segment_bytes));
}

Status MasterConfig::finalize() {
  auto fail = [](const std::string& why) {
    LOG_ERROR("invalid master configuration: {}", why);
    return Status::kInvalidArgument;
  };
  if (seglet_bytes < 512 || (seglet_bytes & (seglet_bytes - 1)) != 0) {
    return fail(fmt::format("seglet size {} is not a power of two >= 512", seglet_bytes));
  }
  if (segment_bytes < seglet_bytes || segment_bytes % seglet_bytes != 0 ||
      segment_bytes > (1u << 30)) {
    return fail(fmt::format("segment size {} is not a multiple of the seglet size {} (max 1 GiB)",
                            segment_bytes, seglet_bytes));
  }
  if (memory_bytes < 4ULL * segment_bytes) {
    return fail(fmt::format("memory {} holds fewer than 4 segments of {}",
                            format_bytes(memory_bytes), format_bytes(segment_bytes)));
  }
  if (memory_bytes >= (1ULL << 40)) return fail("memory above 1 TiB per master");
  if (disk_expansion_factor < 1.0) return fail("disk expansion factor below 1");
  // The largest object entry must fit an empty head after its metadata (header, digest,
  // safe version, table stats), which is bounded to a quarter of a segment.
  uint64_t max_entry =
      entry_bytes(kMaxObjectPrefixBytes) + uint64_t{max_key_bytes} + max_value_bytes;
  if (max_entry > segment_bytes / 2) {
    return fail(fmt::format(
        "the largest object ({} key + {} value) does not fit half a segment of {}",
        format_bytes(max_key_bytes), format_bytes(max_value_bytes), format_bytes(segment_bytes)));
  }
  if (max_log_segments() * 8 + 1024 > segment_bytes / 4) {
    return fail(fmt::format("a log digest of up to {} segments does not fit a quarter segment",
                            max_log_segments()));
  }
  if (hash_table_bytes == 0) hash_table_bytes = std::max<uint64_t>(memory_bytes / 16, 64);
  if (cleaner_reserve_seglets == 0) {
    cleaner_reserve_seglets = std::max<uint32_t>(
        1, std::min<uint32_t>(seglets_per_segment(),
                              static_cast<uint32_t>(memory_bytes / seglet_bytes / 8)));
  }
  if (cleaner_low_free_bytes == 0) {
    cleaner_low_free_bytes = std::max<uint64_t>(
        std::min<uint64_t>(2ULL * segment_bytes, memory_bytes / 100), 4ULL * seglet_bytes);
  }
  if (lock_stripes == 0) lock_stripes = 1;
  return Status::kOk;
}

}  // namespace ramkv::master
