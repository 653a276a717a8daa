// MasterConfig: the sizes and policies of one master's storage engine. Defaults are for
// production (8 MiB segments, 64 KiB seglets); tests shrink them. validate() says what is
// wrong in one line (logged) and returns kInvalidArgument.
#pragma once

#include <cstdint>

#include "common/result.h"

namespace ramkv::master {

struct MasterConfig {
  uint64_t master_id = 1;
  // All log memory, allocated at start (--memory).
  uint64_t memory_bytes = 1ULL << 30;
  uint32_t segment_bytes = 8u << 20;
  uint32_t seglet_bytes = 64u << 10;
  // Hash-table memory; 0 picks memory_bytes / 16. Size it for the expected object count:
  // 8 bytes a slot, 64 a bucket; at 75% of slots used about 15% of buckets chain one
  // overflow bucket (see hash_table.h). Overflow chains absorb any excess.
  uint64_t hash_table_bytes = 0;
  uint32_t max_key_bytes = 64u << 10;
  uint32_t max_value_bytes = 1u << 20;
  // The log may hold up to this many times memory_bytes in segments (the backups' disk
  // budget); past 90% of it the cleaner merges segments (combined cleaning) instead of
  // compacting them in memory.
  double disk_expansion_factor = 2.0;
  // Cleaning starts when fewer free bytes than this remain for new writes, and runs until
  // twice as many are free. 0 picks min(2 segments, 1% of memory), at least 4 seglets.
  uint64_t cleaner_low_free_bytes = 0;
  // Seglets held back for the cleaner's survivor segments; 0 picks one segment's worth
  // (capped at 1/8 of memory).
  uint32_t cleaner_reserve_seglets = 0;
  // Run the cleaner thread. Tests turn it off to drive cleaning by hand.
  bool cleaner_thread = true;
  // How long a write waits for the cleaner to free memory before answering kRetry.
  uint64_t write_wait_for_cleaner_ns = 200'000'000;
  // Touch all log memory at start (RSS is the whole budget from the start).
  bool prefault_memory = true;
  // A client not heard from for this long has its completion records dropped
  // (rpc_results.h, invariant 3).
  uint64_t rpc_result_ttl_ns = 3600'000'000'000;
  // Lock stripes over the hash table.
  uint32_t lock_stripes = 1024;

  // Fills the 0 ("pick for me") fields and checks the combination.
  Status finalize();
  uint32_t seglets_per_segment() const { return segment_bytes / seglet_bytes; }
  uint64_t max_log_segments() const;
};

}  // namespace ramkv::master
