// Tests for master/log.h driven directly (no object manager): append_all's all-or-nothing
// batches in one segment, and the memory rules every append follows (the cleaner's
// reserve, the remove margin). The log with its object manager and cleaner is tested in
// object_manager_test.cc and log_cleaner_test.cc.
#include "master/log.h"

#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "common/segment_iterator.h"

namespace ramkv::master {
namespace {

// 1 MiB of log in 64 KiB segments of 4 KiB seglets.
MasterConfig log_config() {
  MasterConfig c;
  c.memory_bytes = 1u << 20;
  c.segment_bytes = 64u << 10;
  c.seglet_bytes = 4u << 10;
  c.max_key_bytes = 1024;
  c.max_value_bytes = 8192;
  c.cleaner_thread = false;
  c.prefault_memory = false;
  REQUIRE(c.finalize() == Status::kOk);
  return c;
}

std::unique_ptr<Log> make_log(const MasterConfig& config, const Clock& clock) {
  auto log = Log::create(config, clock, nullptr);
  REQUIRE(log.ok());
  return std::move(log).value();
}

// The payload size that makes an entry of `bytes` in all (header included).
uint32_t payload_for(uint32_t bytes) {
  for (uint32_t p = bytes; p > 0; --p) {
    if (entry_bytes(p) == bytes) return p;
  }
  FAIL("no entry is exactly " << bytes << " bytes");
  return 0;
}

// Payloads for a batch of entries of given types and whole-entry sizes.
struct Batch {
  std::vector<std::vector<std::byte>> payloads;
  std::vector<std::span<const std::byte>> pieces;  // one piece per entry
  std::vector<Log::EntryToAppend> entries;
  std::vector<Log::Appended> out;

  // Not copyable or movable: entries point into pieces, and pieces into payloads.
  Batch(std::initializer_list<std::pair<EntryType, uint32_t>> spec) {
    payloads.reserve(spec.size());
    pieces.reserve(spec.size());
    for (const auto& [type, bytes] : spec) {
      payloads.emplace_back(payload_for(bytes), std::byte{0x5a});
      pieces.push_back(payloads.back());
      entries.push_back({.type = type,
                         .pieces = std::span<const std::span<const std::byte>>(&pieces.back(), 1),
                         .live = true,
                         .checksum = {}});
    }
    out.resize(entries.size());
  }
  Batch(const Batch&) = delete;
  Batch& operator=(const Batch&) = delete;
  Status append(Log& log) { return log.append_all(entries, out); }
};

uint64_t head_id(Log& log) { return log.segment_ids().back(); }
uint32_t head_length(Log& log) {
  auto copy = log.copy_segment(head_id(log));
  REQUIRE(copy.has_value());
  return static_cast<uint32_t>(copy->bytes.size());
}
// Bytes left in the head's last seglet (seglets are taken only as bytes arrive).
uint32_t left_in_seglet(Log& log) {
  const uint32_t seglet = log.pool().seglet_bytes();
  return (seglet - head_length(log) % seglet) % seglet;
}

// The types of the object and tombstone entries of a segment, in order.
std::vector<EntryType> data_entries(Log& log, uint64_t segment_id) {
  auto copy = log.copy_segment(segment_id);
  REQUIRE(copy.has_value());
  SegmentIterator it(copy->bytes, copy->certificate);
  REQUIRE(it.validate() == Status::kOk);
  std::vector<EntryType> out;
  for (; it.valid(); it.next()) {
    if (it.type() == EntryType::kObject || it.type() == EntryType::kTombstone) {
      out.push_back(it.type());
    }
  }
  CHECK(it.status() == Status::kOk);
  return out;
}

}  // namespace

TEST_CASE("log: append_all puts its entries in one segment, in order, end to end",
          "[master][log]") {
  ManualClock clock;
  auto log = make_log(log_config(), clock);
  Batch pair({{EntryType::kObject, 100}, {EntryType::kTombstone, 30}});
  REQUIRE(pair.append(*log) == Status::kOk);
  CHECK(pair.out[0].segment == pair.out[1].segment);
  CHECK(pair.out[0].entry_bytes == 100);
  CHECK(pair.out[1].entry_bytes == 30);
  CHECK(pair.out[1].ref == pair.out[0].ref + 100);
  CHECK(pair.out[0].segment->live_bytes() == 130);
  CHECK(log->stats().appended_bytes == 130);

  // A head whose tail holds the first entry but not both: the batch goes to a new head.
  const uint64_t first_head = head_id(*log);
  Batch filler({{EntryType::kObject, (64u << 10) - 120 - head_length(*log)}});
  REQUIRE(filler.append(*log) == Status::kOk);
  REQUIRE(head_length(*log) == (64u << 10) - 120);
  Batch next({{EntryType::kObject, 100}, {EntryType::kTombstone, 30}});
  REQUIRE(next.append(*log) == Status::kOk);
  CHECK(next.out[0].segment->id() == first_head + 1);
  CHECK(next.out[1].segment->id() == first_head + 1);
  CHECK(log->copy_segment(first_head)->bytes.size() == (64u << 10) - 120);
  CHECK(data_entries(*log, first_head) ==
        std::vector<EntryType>{EntryType::kObject, EntryType::kTombstone, EntryType::kObject});
  CHECK(data_entries(*log, first_head + 1) ==
        std::vector<EntryType>{EntryType::kObject, EntryType::kTombstone});
}

TEST_CASE("log: a batch with new data needs room for all of it outside the remove margin",
          "[master][log]") {
  ManualClock clock;
  auto log = make_log(log_config(), clock);
  // Fill memory with objects until new data is refused, then top up the last seglet.
  for (uint32_t bytes : {1000u, 100u, 16u}) {
    while (true) {
      Batch one({{EntryType::kObject, bytes}});
      Status s = one.append(*log);
      if (s == Status::kRetry) break;
      REQUIRE(s == Status::kOk);
    }
  }
  REQUIRE(log->free_for_data() == 0);
  REQUIRE(log->pool().free_for_head() == Log::kRemoveMarginSeglets);
  if (left_in_seglet(*log) < 300) {
    // A tombstone may take a margin seglet: leave room in a fresh one to work with.
    Batch tombstone({{EntryType::kTombstone, left_in_seglet(*log) + 200}});
    REQUIRE(tombstone.append(*log) == Status::kOk);
  }
  const uint32_t left = left_in_seglet(*log);
  REQUIRE(left >= 300);
  const uint32_t free_before = log->pool().free_count();
  const uint32_t length_before = head_length(*log);
  const uint64_t appended_before = log->stats().appended_bytes;

  // An object that fits what is left, with a tombstone that does not: refused whole, as a
  // write would be, and without touching the margin.
  Batch overwrite({{EntryType::kObject, left - 20}, {EntryType::kTombstone, 40}});
  CHECK(overwrite.append(*log) == Status::kRetry);
  CHECK(log->pool().free_count() == free_before);
  CHECK(head_length(*log) == length_before);
  CHECK(log->stats().appended_bytes == appended_before);

  // The object alone fits.
  Batch object({{EntryType::kObject, left - 20}});
  REQUIRE(object.append(*log) == Status::kOk);
  CHECK(log->pool().free_count() == free_before);

  // Tombstones alone may take the margin, and stay together.
  Batch tombstones({{EntryType::kTombstone, 40}, {EntryType::kTombstone, 40}});
  REQUIRE(tombstones.append(*log) == Status::kOk);
  CHECK(tombstones.out[0].segment == tombstones.out[1].segment);
  CHECK(log->pool().free_count() == free_before - 1);
}

TEST_CASE("log: create refuses a largest object that cannot share a head with its tombstone",
          "[master][log]") {
  ManualClock clock;
  MasterConfig c = log_config();
  // Half a segment for the object, plus a tombstone for its 20 KiB key, is more than the
  // three quarters of a segment that a head's metadata leaves.
  c.max_key_bytes = 20u << 10;
  c.max_value_bytes = (12u << 10) - 100;
  REQUIRE(c.finalize() == Status::kOk);
  CHECK(Log::create(c, clock, nullptr).status() == Status::kInvalidArgument);
  c.max_key_bytes = 12u << 10;
  CHECK(Log::create(c, clock, nullptr).ok());
}

}  // namespace ramkv::master
