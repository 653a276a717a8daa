#include "master/segment.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/segment_iterator.h"

namespace ramkv::master {
namespace {

constexpr uint32_t kSegletBytes = 512;
constexpr uint32_t kCapacity = 8 * 1024;

std::unique_ptr<SegletPool> make_pool(uint32_t seglet_count, uint32_t reserve_seglets = 0) {
  auto pool = SegletPool::create({.memory_bytes = uint64_t{seglet_count} * kSegletBytes,
                                  .seglet_bytes = kSegletBytes,
                                  .reserve_seglets = reserve_seglets,
                                  .prefault = false});
  REQUIRE(pool.ok());
  return std::move(pool).value();
}

std::vector<std::byte> random_payload(Random& rng, size_t n) {
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(rng.next() & 0xff);
  return out;
}

Result<uint32_t> append_one(Segment& s, EntryType type, std::span<const std::byte> payload) {
  std::span<const std::byte> pieces[] = {payload};
  return s.append(type, pieces);
}

// Appends an entry of exactly `total` bytes (header included); total >= 6.
Result<uint32_t> append_total(Segment& s, uint32_t total) {
  uint32_t payload_bytes = total - 6;
  while (entry_bytes(payload_bytes) > total) --payload_bytes;
  REQUIRE(entry_bytes(payload_bytes) == total);
  std::vector<std::byte> payload(payload_bytes, std::byte{0x5a});
  return append_one(s, EntryType::kObject, payload);
}

struct Appended {
  uint32_t offset;
  EntryType type;
  std::vector<std::byte> payload;
};

// Fills `s` with entries of random sizes (some across seglets), each in 1..3 pieces.
std::vector<Appended> fill_randomly(Segment& s, Random& rng, uint32_t stop_at_bytes) {
  std::vector<Appended> out;
  while (s.length() < stop_at_bytes) {
    auto payload = random_payload(rng, static_cast<size_t>(rng.uniform(700)));
    auto type = static_cast<EntryType>(1 + rng.uniform(kMaxEntryType));
    std::span<const std::byte> all(payload);
    size_t cut1 = static_cast<size_t>(rng.uniform(payload.size() + 1));
    size_t cut2 = cut1 + static_cast<size_t>(rng.uniform(payload.size() - cut1 + 1));
    std::span<const std::byte> pieces[] = {all.first(cut1), all.subspan(cut1, cut2 - cut1),
                                           all.subspan(cut2)};
    auto r = s.append(type, pieces);
    if (r.status() == Status::kNoSpace) break;
    REQUIRE(r.ok());
    out.push_back({*r, type, std::move(payload)});
  }
  return out;
}

TEST_CASE("segment: a new segment is empty and takes no seglets", "[master][segment]") {
  auto pool = make_pool(32);
  Segment s(*pool, {.id = 7, .capacity = kCapacity, .created_ns = 99});
  CHECK(s.id() == 7);
  CHECK(s.length() == 0);
  CHECK(s.capacity() == kCapacity);
  CHECK(s.seglet_count() == 0);
  CHECK(s.memory_bytes() == 0);
  CHECK(s.created_ns() == 99);
  CHECK_FALSE(s.closed());
  CHECK(s.live_bytes() == 0);
  CHECK(pool->free_count() == 32);
  CHECK(s.copy_out().empty());
  CHECK(s.certificate().segment_bytes == 0);
  // An empty segment's certificate validates against no bytes.
  CHECK(SegmentIterator({}, s.certificate()).validate() == Status::kOk);
}

TEST_CASE("segment: entries that cross seglet boundaries read back intact", "[master][segment]") {
  auto pool = make_pool(32);
  Segment s(*pool, {.id = 1, .capacity = kCapacity});
  Random rng(3);
  auto entries = fill_randomly(s, rng, kCapacity);
  REQUIRE(entries.size() > 10);

  size_t crossing = 0;
  uint32_t expected_offset = 0;
  std::string scratch;
  for (const auto& e : entries) {
    CHECK(e.offset == expected_offset);
    uint32_t total = entry_bytes(static_cast<uint32_t>(e.payload.size()));
    expected_offset += total;
    if (e.offset / kSegletBytes != (e.offset + total - 1) / kSegletBytes) ++crossing;

    auto got = s.entry_at(e.offset, &scratch);
    CHECK(got.header.type == e.type);
    CHECK(got.header.payload_bytes == e.payload.size());
    CHECK(std::vector<std::byte>(got.payload.begin(), got.payload.end()) == e.payload);

    // The bytes in the segment are exactly the encoded entry.
    auto expected_raw = build_entry(e.type, e.payload);
    auto raw = s.raw_entry_at(e.offset, total, &scratch);
    CHECK(std::vector<std::byte>(raw.begin(), raw.end()) == expected_raw);
    std::vector<std::byte> read_back(total);
    s.read(e.offset, read_back);
    CHECK(read_back == expected_raw);
  }
  CHECK(crossing > 5);
  CHECK(s.length() == expected_offset);
  CHECK(s.seglet_count() == (s.length() + kSegletBytes - 1) / kSegletBytes);
  CHECK(pool->free_count() == 32 - s.seglet_count());

  size_t visited = 0;
  s.for_each_entry([&](uint32_t offset, const Segment::Entry& e) {
    REQUIRE(visited < entries.size());
    CHECK(offset == entries[visited].offset);
    CHECK(std::vector<std::byte>(e.payload.begin(), e.payload.end()) == entries[visited].payload);
    ++visited;
  });
  CHECK(visited == entries.size());
}

TEST_CASE("segment: copy_out and certificate validate with SegmentIterator", "[master][segment]") {
  auto pool = make_pool(32);
  Segment s(*pool, {.id = 1, .capacity = kCapacity});
  Random rng(4);
  auto entries = fill_randomly(s, rng, kCapacity);
  auto bytes = s.copy_out();
  REQUIRE(bytes.size() == s.length());
  auto cert = s.certificate();
  CHECK(cert.segment_bytes == s.length());

  SegmentIterator it(bytes, cert);
  CHECK(it.validate() == Status::kOk);
  size_t i = 0;
  for (; it.valid(); it.next(), ++i) {
    REQUIRE(i < entries.size());
    CHECK(it.offset() == entries[i].offset);
    CHECK(it.type() == entries[i].type);
    CHECK(std::vector<std::byte>(it.payload().begin(), it.payload().end()) == entries[i].payload);
  }
  CHECK(i == entries.size());
  CHECK(it.status() == Status::kOk);
  CHECK(it.valid_bytes() == s.length());
}

TEST_CASE("segment: the certificate changes with every append", "[master][segment]") {
  auto pool = make_pool(32);
  Segment s(*pool, {.id = 1, .capacity = kCapacity});
  std::vector<Certificate> seen{s.certificate()};
  std::vector<std::byte> payload(10, std::byte{1});
  for (int i = 0; i < 5; ++i) {
    REQUIRE(append_one(s, EntryType::kObject, payload).ok());
    auto c = s.certificate();
    for (const auto& old : seen) CHECK(c != old);
    seen.push_back(c);
  }
}

TEST_CASE("segment: append fails with no space once the capacity is full", "[master][segment]") {
  auto pool = make_pool(32);
  Segment s(*pool, {.id = 1, .capacity = kCapacity});
  // One byte too many for an empty segment.
  std::vector<std::byte> too_big(kCapacity - 6, std::byte{1});
  CHECK_FALSE(s.fits(static_cast<uint32_t>(too_big.size())));
  CHECK(append_one(s, EntryType::kObject, too_big).status() == Status::kNoSpace);
  CHECK(s.length() == 0);
  CHECK(s.seglet_count() == 0);

  // Exactly the capacity fits.
  auto r = append_total(s, kCapacity);
  REQUIRE(r.ok());
  CHECK(*r == 0);
  CHECK(s.length() == kCapacity);
  CHECK(s.seglet_count() == kCapacity / kSegletBytes);

  auto before = s.certificate();
  CHECK_FALSE(s.fits(0));
  CHECK(append_one(s, EntryType::kSafeVersion, {}).status() == Status::kNoSpace);
  std::vector<std::byte> one(1, std::byte{1});
  CHECK(append_one(s, EntryType::kSafeVersion, one).status() == Status::kNoSpace);
  CHECK(s.length() == kCapacity);
  CHECK(s.certificate() == before);
  CHECK(pool->free_count() == 32 - kCapacity / kSegletBytes);
}

TEST_CASE("segment: an entry that would overrun the capacity by one byte is refused",
          "[master][segment]") {
  auto pool = make_pool(32);
  Segment s(*pool, {.id = 1, .capacity = kCapacity});
  REQUIRE(append_total(s, 1000).ok());
  uint32_t left = kCapacity - 1000;
  std::vector<std::byte> payload(left - 7 + 1, std::byte{2});  // 2-byte length field
  CHECK(entry_bytes(static_cast<uint32_t>(payload.size())) == left + 1);
  CHECK(append_one(s, EntryType::kObject, payload).status() == Status::kNoSpace);
  CHECK(s.length() == 1000);
  payload.pop_back();
  CHECK(append_one(s, EntryType::kObject, payload).ok());
  CHECK(s.length() == kCapacity);
}

TEST_CASE("segment: append asks to retry when the pool is empty and leaves no trace",
          "[master][segment]") {
  auto pool = make_pool(4);
  Segment other(*pool, {.id = 1, .capacity = kCapacity});
  REQUIRE(append_total(other, 100).ok());  // takes one seglet
  REQUIRE(pool->free_count() == 3);

  Segment s(*pool, {.id = 2, .capacity = kCapacity});
  REQUIRE(append_total(s, 100).ok());
  REQUIRE(pool->free_count() == 2);
  auto cert = s.certificate();

  // Needs three more seglets; two are free: both are taken and given back.
  std::vector<std::byte> payload(3 * kSegletBytes, std::byte{3});
  CHECK(append_one(s, EntryType::kObject, payload).status() == Status::kRetry);
  CHECK(pool->free_count() == 2);
  CHECK(s.length() == 100);
  CHECK(s.seglet_count() == 1);
  CHECK(s.certificate() == cert);

  // What was there is untouched and a smaller append still works.
  auto bytes = s.copy_out();
  CHECK(SegmentIterator(bytes, cert).validate() == Status::kOk);
  std::vector<std::byte> small(kSegletBytes, std::byte{4});
  auto r = append_one(s, EntryType::kObject, small);
  REQUIRE(r.ok());
  CHECK(*r == 100);
  CHECK(pool->free_count() == 1);
}

TEST_CASE("segment: a head segment cannot dip into the reserve but a cleaner segment can",
          "[master][segment]") {
  auto pool = make_pool(4, 2);
  Segment head(*pool, {.id = 1, .capacity = kCapacity});
  std::vector<std::byte> payload(2 * kSegletBytes, std::byte{5});  // needs 3 seglets
  CHECK(append_one(head, EntryType::kObject, payload).status() == Status::kRetry);
  CHECK(pool->free_count() == 4);
  CHECK(head.seglet_count() == 0);

  Segment survivor(*pool,
                   {.id = 2, .capacity = kCapacity, .purpose = SegletPool::Purpose::kCleaner});
  CHECK(append_one(survivor, EntryType::kObject, payload).ok());
  CHECK(pool->free_count() == 1);

  // set_purpose switches the floor a segment draws from.
  std::vector<std::byte> small(100, std::byte{6});
  CHECK(append_one(head, EntryType::kObject, small).status() == Status::kRetry);
  head.set_purpose(SegletPool::Purpose::kCleaner);
  CHECK(append_one(head, EntryType::kObject, small).ok());
  CHECK(pool->free_count() == 0);
}

TEST_CASE("segment: destroying a segment gives its seglets back", "[master][segment]") {
  auto pool = make_pool(32);
  {
    Segment s(*pool, {.id = 1, .capacity = kCapacity});
    Random rng(5);
    fill_randomly(s, rng, kCapacity);
    CHECK(s.seglet_count() > 8);
    CHECK(pool->free_count() == 32 - s.seglet_count());
  }
  CHECK(pool->free_count() == 32);
}

TEST_CASE("segment: append_raw copies entries verbatim with the same certificate",
          "[master][segment]") {
  auto pool = make_pool(64);
  Segment original(*pool, {.id = 1, .capacity = kCapacity});
  Random rng(6);
  auto entries = fill_randomly(original, rng, kCapacity - 1000);

  Segment copy(*pool, {.id = 2, .capacity = kCapacity, .purpose = SegletPool::Purpose::kCleaner});
  std::string scratch;
  for (const auto& e : entries) {
    auto header = original.entry_at(e.offset, &scratch).header;
    auto raw = original.raw_entry_at(e.offset, header.total_bytes(), &scratch);
    std::vector<std::byte> raw_copy(raw.begin(), raw.end());
    auto r = copy.append_raw(raw_copy, header.header_bytes);
    REQUIRE(r.ok());
    CHECK(*r == e.offset);
  }
  CHECK(copy.length() == original.length());
  CHECK(copy.copy_out() == original.copy_out());
  CHECK(copy.certificate() == original.certificate());
}

TEST_CASE("segment: entries moved by append_raw to a new offset keep valid checksums",
          "[master][segment]") {
  auto pool = make_pool(64);
  Segment original(*pool, {.id = 1, .capacity = kCapacity});
  Random rng(8);
  auto entries = fill_randomly(original, rng, 4000);

  Segment survivor(*pool, {.id = 2, .capacity = kCapacity});
  std::vector<std::byte> filler(333, std::byte{9});
  REQUIRE(append_one(survivor, EntryType::kSafeVersion, filler).ok());
  std::string scratch;
  for (size_t i = 0; i < entries.size(); i += 2) {  // every other entry survives
    auto header = original.entry_at(entries[i].offset, &scratch).header;
    std::string raw_scratch;
    auto raw = original.raw_entry_at(entries[i].offset, header.total_bytes(), &raw_scratch);
    REQUIRE(survivor.append_raw(raw, header.header_bytes).ok());
  }
  auto bytes = survivor.copy_out();
  SegmentIterator it(bytes, survivor.certificate());
  CHECK(it.validate() == Status::kOk);
  size_t count = 0;
  for (; it.valid(); it.next()) ++count;
  CHECK(count == 1 + (entries.size() + 1) / 2);
  CHECK(it.status() == Status::kOk);
}

TEST_CASE("segment: append_raw fails with no space or retry and appends nothing",
          "[master][segment]") {
  auto pool = make_pool(3);
  Segment s(*pool, {.id = 1, .capacity = 2 * kSegletBytes});
  std::vector<std::byte> payload(500, std::byte{7});
  auto entry = build_entry(EntryType::kObject, payload);
  uint32_t header_bytes = entry_header_bytes(500);
  REQUIRE(s.append_raw(entry, header_bytes).ok());
  REQUIRE(s.append_raw(entry, header_bytes).ok());
  auto cert = s.certificate();
  CHECK(s.append_raw(entry, header_bytes).status() == Status::kNoSpace);
  CHECK(s.length() == 2 * entry.size());
  CHECK(s.certificate() == cert);

  Segment other(*pool, {.id = 2, .capacity = 4 * kSegletBytes});
  REQUIRE(pool->free_count() == 1);
  auto big = build_entry(EntryType::kObject, std::vector<std::byte>(600, std::byte{8}));
  CHECK(other.append_raw(big, entry_header_bytes(600)).status() == Status::kRetry);
  CHECK(other.length() == 0);
  CHECK(other.seglet_count() == 0);
  CHECK(pool->free_count() == 1);
}

TEST_CASE("segment: an empty payload right at a seglet boundary reads back", "[master][segment]") {
  auto pool = make_pool(4);
  // One seglet of capacity: the empty entry ends exactly at the end of the segment.
  Segment s(*pool, {.id = 1, .capacity = kSegletBytes});
  REQUIRE(append_total(s, kSegletBytes - 6).ok());
  auto r = append_one(s, EntryType::kSafeVersion, {});
  REQUIRE(r.ok());
  CHECK(*r == kSegletBytes - 6);
  CHECK(s.length() == kSegletBytes);
  std::string scratch;
  auto e = s.entry_at(*r, &scratch);
  CHECK(e.header.type == EntryType::kSafeVersion);
  CHECK(e.header.payload_bytes == 0);
  CHECK(e.payload.empty());
  auto bytes = s.copy_out();
  SegmentIterator it(bytes, s.certificate());
  CHECK(it.validate() == Status::kOk);
}

TEST_CASE("segment: peek gives a view only within one seglet", "[master][segment]") {
  auto pool = make_pool(32);
  Segment s(*pool, {.id = 1, .capacity = kCapacity});
  REQUIRE(append_total(s, 2000).ok());
  auto inside = s.peek(10, 100);
  CHECK(inside.size() == 100);
  CHECK(s.peek(kSegletBytes - 10, 10).size() == 10);
  CHECK(s.peek(kSegletBytes - 10, 11).empty());
  CHECK(s.peek(kSegletBytes, kSegletBytes).size() == kSegletBytes);
  std::vector<std::byte> read_back(100);
  s.read(10, read_back);
  CHECK(std::equal(read_back.begin(), read_back.end(), inside.begin()));
}

TEST_CASE("segment: arena offsets map back to the segment and the logical offset",
          "[master][segment]") {
  auto pool = make_pool(64);
  Segment a(*pool, {.id = 1, .capacity = kCapacity});
  Segment b(*pool, {.id = 2, .capacity = kCapacity});
  // Interleave the two so their seglets are not contiguous in the arena.
  for (int i = 0; i < 6; ++i) {
    REQUIRE(append_total(a, 700).ok());
    REQUIRE(append_total(b, 900).ok());
  }
  for (Segment* s : {&a, &b}) {
    for (uint32_t off = 0; off < s->length(); off += 37) {
      uint64_t arena = s->arena_offset(off);
      auto owner = pool->owner_of(arena);
      REQUIRE(owner.segment == s);
      CHECK(s->logical_offset(owner.index_in_segment, arena) == off);
      CHECK(pool->seglet_memory(0) + arena == s->peek(off, 1).data());
    }
  }
}

TEST_CASE("segment: live bytes and close are bookkeeping only", "[master][segment]") {
  auto pool = make_pool(32);
  Segment s(*pool, {.id = 1, .capacity = kCapacity});
  REQUIRE(append_total(s, 300).ok());
  s.add_live_bytes(300);
  s.add_live_bytes(50);
  s.sub_live_bytes(100);
  CHECK(s.live_bytes() == 250);
  s.set_created_ns(1234);
  CHECK(s.created_ns() == 1234);
  s.close();
  CHECK(s.closed());
  // Reads still work after close.
  std::string scratch;
  CHECK(s.entry_at(0, &scratch).header.total_bytes() == 300);
  CHECK(s.length() == 300);
}

}  // namespace
}  // namespace ramkv::master
