// SegmentImage: a closed segment's bytes and certificate, built by the master's own
// Segment, as a master would replicate it to backups. Shared by the backup tests.
#pragma once

#include <catch2/catch.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "backup/replica_file.h"
#include "common/certificate.h"
#include "common/checksum.h"
#include "master/segment.h"

namespace ramkv::test {

struct SegmentImage {
  uint64_t segment_id = 0;
  uint32_t capacity = 0;
  std::vector<std::byte> bytes;
  Certificate certificate{};
};

// A segment of `objects` small object entries.
inline SegmentImage make_segment(uint64_t segment_id, int objects, uint32_t capacity = 64 * 1024) {
  auto pool = master::SegletPool::create(
      {.memory_bytes = 1 << 20, .seglet_bytes = 4096, .prefault = false});
  REQUIRE(pool.ok());
  master::Segment seg(**pool, {.id = segment_id, .capacity = capacity});
  for (int i = 0; i < objects; ++i) {
    std::string payload =
        "object " + std::to_string(i) + " in segment " + std::to_string(segment_id);
    std::span<const std::byte> piece[] = {as_bytes(std::string_view(payload))};
    REQUIRE(seg.append(EntryType::kObject, piece).ok());
  }
  return {segment_id, capacity, seg.copy_out(), seg.certificate()};
}

// The header of a closed replica of `image` held for `master_id`.
inline backup::ReplicaHeader closed_header(const SegmentImage& image, uint64_t master_id,
                                           uint64_t epoch = 0) {
  return {.master_id = master_id,
          .segment_id = image.segment_id,
          .epoch = epoch,
          .capacity = image.capacity,
          .certificate_bytes = image.certificate.segment_bytes,
          .certificate_checksum = image.certificate.checksum,
          .closed = true};
}

}  // namespace ramkv::test
