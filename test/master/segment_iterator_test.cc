#include "common/segment_iterator.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <memory>
#include <optional>
#include <vector>

#include "common/clock.h"
#include "master/segment.h"

namespace ramkv::master {
namespace {

constexpr uint32_t kSegletBytes = 512;
constexpr uint32_t kCapacity = 8 * 1024;

// A segment's bytes as a backup would receive them, with the offsets of its entries.
struct Replica {
  std::vector<std::byte> bytes;
  Certificate certificate;
  std::vector<uint32_t> offsets;
  std::vector<std::vector<std::byte>> payloads;
  std::vector<EntryType> types;
};

Replica make_replica(uint64_t seed, size_t entry_count) {
  auto pool = SegletPool::create(
      {.memory_bytes = 32 * kSegletBytes, .seglet_bytes = kSegletBytes, .prefault = false});
  REQUIRE(pool.ok());
  Segment s(**pool, {.id = 1, .capacity = kCapacity});
  Random rng(seed);
  Replica r;
  for (size_t i = 0; i < entry_count; ++i) {
    std::vector<std::byte> payload(static_cast<size_t>(1 + rng.uniform(400)));
    for (auto& b : payload) b = static_cast<std::byte>(rng.next() & 0xff);
    auto type = static_cast<EntryType>(1 + rng.uniform(kMaxEntryType));
    std::span<const std::byte> pieces[] = {payload};
    auto off = s.append(type, pieces);
    REQUIRE(off.ok());
    r.offsets.push_back(*off);
    r.payloads.push_back(std::move(payload));
    r.types.push_back(type);
  }
  r.bytes = s.copy_out();
  r.certificate = s.certificate();
  return r;
}

// Walks the iterator to its end; returns the number of entries visited.
size_t walk(SegmentIterator& it, std::span<const std::byte> bytes) {
  size_t count = 0;
  uint32_t expected_offset = 0;
  for (; it.valid(); it.next()) {
    CHECK(it.offset() == expected_offset);
    CHECK(it.valid_bytes() == it.offset());
    auto raw = it.raw();
    // Every view lies inside the bytes.
    REQUIRE(raw.data() >= bytes.data());
    REQUIRE(raw.data() + raw.size() <= bytes.data() + bytes.size());
    CHECK(it.payload().data() == raw.data() + it.header().header_bytes);
    CHECK(it.payload().size() == it.header().payload_bytes);
    expected_offset += it.header().total_bytes();
    ++count;
  }
  CHECK(it.valid_bytes() == expected_offset);
  return count;
}

TEST_CASE("segment_iterator: a good segment iterates entry by entry with its certificate",
          "[master][segment_iterator]") {
  auto r = make_replica(1, 30);
  SegmentIterator it(r.bytes, r.certificate);
  CHECK(it.validate() == Status::kOk);
  size_t i = 0;
  for (; it.valid(); it.next(), ++i) {
    REQUIRE(i < r.offsets.size());
    CHECK(it.offset() == r.offsets[i]);
    CHECK(it.type() == r.types[i]);
    CHECK(std::vector<std::byte>(it.payload().begin(), it.payload().end()) == r.payloads[i]);
    auto raw = it.raw();
    CHECK(std::vector<std::byte>(raw.begin(), raw.end()) == build_entry(r.types[i], r.payloads[i]));
  }
  CHECK(i == r.offsets.size());
  CHECK(it.status() == Status::kOk);
  CHECK(it.valid_bytes() == r.bytes.size());
  // next() past the end is harmless.
  it.next();
  CHECK_FALSE(it.valid());
  CHECK(it.status() == Status::kOk);
}

TEST_CASE("segment_iterator: without a certificate a good segment scans to the end",
          "[master][segment_iterator]") {
  auto r = make_replica(2, 30);
  SegmentIterator it(r.bytes);
  CHECK(it.validate() == Status::kOk);
  CHECK(walk(it, r.bytes) == 30);
  CHECK(it.status() == Status::kOk);
  CHECK(it.valid_bytes() == r.bytes.size());
}

TEST_CASE("segment_iterator: empty bytes are an empty, valid segment",
          "[master][segment_iterator]") {
  SegmentIterator scan({});
  CHECK_FALSE(scan.valid());
  CHECK(scan.status() == Status::kOk);
  CHECK(scan.valid_bytes() == 0);
  CHECK(scan.validate() == Status::kOk);
}

TEST_CASE("segment_iterator: a flipped payload byte fails validation as corrupt",
          "[master][segment_iterator]") {
  auto r = make_replica(3, 20);
  for (size_t e = 0; e < r.offsets.size(); ++e) {
    uint32_t header_bytes = entry_header_bytes(static_cast<uint32_t>(r.payloads[e].size()));
    for (size_t where : {size_t{0}, r.payloads[e].size() / 2, r.payloads[e].size() - 1}) {
      auto bytes = r.bytes;
      bytes[r.offsets[e] + header_bytes + where] ^= std::byte{0x01};
      SegmentIterator it(bytes, r.certificate);
      INFO("entry " << e << " payload byte " << where);
      CHECK(it.validate() == Status::kCorrupt);
      CHECK(walk(it, bytes) == e);
      CHECK(it.status() == Status::kCorrupt);
      CHECK(it.valid_bytes() == r.offsets[e]);
    }
  }
}

TEST_CASE("segment_iterator: a flipped checksum or type in a header fails as corrupt",
          "[master][segment_iterator]") {
  auto r = make_replica(4, 20);
  for (size_t e = 0; e < r.offsets.size(); ++e) {
    uint32_t payload_bytes = static_cast<uint32_t>(r.payloads[e].size());
    uint32_t checksum_at = r.offsets[e] + 1 + length_field_bytes(payload_bytes);
    for (uint32_t k = 0; k < 4; ++k) {
      auto bytes = r.bytes;
      bytes[checksum_at + k] ^= std::byte{0x80};
      INFO("entry " << e << " checksum byte " << k);
      CHECK(SegmentIterator(bytes, r.certificate).validate() == Status::kCorrupt);
    }
    // Another valid type: the header decodes, but the checksum is seeded by the type.
    auto bytes = r.bytes;
    auto tag = static_cast<uint8_t>(bytes[r.offsets[e]]);
    uint8_t type = tag & 0x3f;
    uint8_t other = static_cast<uint8_t>(type % kMaxEntryType + 1);
    bytes[r.offsets[e]] = static_cast<std::byte>((tag & 0xc0) | other);
    INFO("entry " << e << " type " << int{type} << " -> " << int{other});
    CHECK(SegmentIterator(bytes, r.certificate).validate() == Status::kCorrupt);
  }
}

TEST_CASE("segment_iterator: a certificate that does not match the entries is corrupt",
          "[master][segment_iterator]") {
  auto r = make_replica(5, 10);
  SECTION("a wrong checksum in the certificate") {
    auto cert = r.certificate;
    cert.checksum ^= 1;
    CHECK(SegmentIterator(r.bytes, cert).validate() == Status::kCorrupt);
  }
  SECTION("a shorter length at an entry boundary with the full checksum") {
    auto cert = r.certificate;
    cert.segment_bytes = r.offsets[5];
    CHECK(SegmentIterator(r.bytes, cert).validate() == Status::kCorrupt);
  }
  SECTION("two whole entries swapped: each checks, the chain does not") {
    auto a = build_entry(r.types[0], r.payloads[0]);
    auto b = build_entry(r.types[1], r.payloads[1]);
    std::vector<std::byte> swapped(b);
    swapped.insert(swapped.end(), a.begin(), a.end());
    swapped.insert(swapped.end(), r.bytes.begin() + r.offsets[2], r.bytes.end());
    REQUIRE(swapped.size() == r.bytes.size());
    CHECK(SegmentIterator(swapped).validate() == Status::kOk);
    CHECK(SegmentIterator(swapped, r.certificate).validate() == Status::kCorrupt);
  }
}

TEST_CASE("segment_iterator: bytes shorter than the certificate are a format error",
          "[master][segment_iterator]") {
  auto r = make_replica(6, 10);
  for (size_t keep :
       {size_t{0}, size_t{1}, size_t{r.offsets[4]}, size_t{r.offsets[4] + 3}, r.bytes.size() - 1}) {
    std::span<const std::byte> truncated = std::span<const std::byte>(r.bytes).first(keep);
    SegmentIterator it(truncated, r.certificate);
    INFO("kept " << keep << " of " << r.bytes.size());
    CHECK(it.validate() == Status::kFormatError);
    walk(it, truncated);
    CHECK(it.status() == Status::kFormatError);
    CHECK(it.valid_bytes() <= keep);
  }
}

TEST_CASE("segment_iterator: an older certificate certifies a prefix of newer bytes",
          "[master][segment_iterator]") {
  auto r = make_replica(7, 12);
  // The certificate of the first 5 entries, computed by a segment that stopped there.
  auto pool = SegletPool::create(
      {.memory_bytes = 32 * kSegletBytes, .seglet_bytes = kSegletBytes, .prefault = false});
  REQUIRE(pool.ok());
  Segment s(**pool, {.id = 1, .capacity = kCapacity});
  for (size_t i = 0; i < 5; ++i) {
    std::span<const std::byte> pieces[] = {r.payloads[i]};
    REQUIRE(s.append(r.types[i], pieces).ok());
  }
  auto old_cert = s.certificate();
  REQUIRE(old_cert.segment_bytes == r.offsets[5]);

  SegmentIterator it(r.bytes, old_cert);
  CHECK(it.validate() == Status::kOk);
  CHECK(walk(it, r.bytes) == 5);
  CHECK(it.status() == Status::kOk);
  CHECK(it.valid_bytes() == r.offsets[5]);
}

TEST_CASE("segment_iterator: a certificate ending inside an entry is a format error",
          "[master][segment_iterator]") {
  auto r = make_replica(8, 10);
  Certificate cert{.segment_bytes = r.offsets[3] + 4, .checksum = 0};
  SegmentIterator it(r.bytes, cert);
  CHECK(it.validate() == Status::kFormatError);
  CHECK(walk(it, r.bytes) == 3);
  CHECK(it.status() == Status::kFormatError);
  CHECK(it.valid_bytes() == r.offsets[3]);
}

TEST_CASE("segment_iterator: zeroed bytes inside a certified prefix are a format error",
          "[master][segment_iterator]") {
  auto r = make_replica(9, 10);
  auto bytes = r.bytes;
  std::fill(bytes.begin() + r.offsets[6], bytes.end(), std::byte{0});
  SegmentIterator it(bytes, r.certificate);
  CHECK(it.validate() == Status::kFormatError);
  CHECK(walk(it, bytes) == 6);
  CHECK(it.status() == Status::kFormatError);
  CHECK(it.valid_bytes() == r.offsets[6]);
}

TEST_CASE("segment_iterator: a scan stops at a torn tail with a format error",
          "[master][segment_iterator]") {
  auto r = make_replica(10, 10);
  uint32_t last = r.offsets.back();
  uint32_t last_header = entry_header_bytes(static_cast<uint32_t>(r.payloads.back().size()));
  // Cut inside the last entry's header and inside its payload.
  for (size_t keep : {size_t{last} + 1, size_t{last} + last_header - 1, size_t{last} + last_header,
                      size_t{last} + last_header + 1, r.bytes.size() - 1}) {
    std::span<const std::byte> torn = std::span<const std::byte>(r.bytes).first(keep);
    SegmentIterator it(torn);
    INFO("kept " << keep << ", last entry at " << last);
    CHECK(walk(it, torn) == r.offsets.size() - 1);
    CHECK(it.status() == Status::kFormatError);
    CHECK(it.valid_bytes() == last);
    // Without a certificate, validate() vouches only for the valid prefix.
    CHECK(it.validate() == Status::kOk);
  }
}

TEST_CASE("segment_iterator: a scan stops cleanly at zero-filled unwritten space",
          "[master][segment_iterator]") {
  auto r = make_replica(11, 10);
  for (size_t zeros : {size_t{1}, size_t{5}, size_t{9}, size_t{4096}}) {
    auto bytes = r.bytes;
    bytes.resize(bytes.size() + zeros, std::byte{0});
    SegmentIterator it(bytes);
    INFO("zero bytes " << zeros);
    CHECK(walk(it, bytes) == r.offsets.size());
    CHECK(it.status() == Status::kOk);
    CHECK(it.valid_bytes() == r.bytes.size());
    CHECK(it.validate() == Status::kOk);
  }
}

TEST_CASE("segment_iterator: a scan stops at a corrupt entry before reading past it",
          "[master][segment_iterator]") {
  auto r = make_replica(12, 10);
  auto bytes = r.bytes;
  uint32_t bad = r.offsets[4];
  bytes[bad + entry_header_bytes(static_cast<uint32_t>(r.payloads[4].size()))] ^= std::byte{4};
  SegmentIterator it(bytes);
  CHECK(walk(it, bytes) == 4);
  CHECK(it.status() == Status::kCorrupt);
  CHECK(it.valid_bytes() == bad);
}

TEST_CASE("segment_iterator: a scan stops at an unknown entry type with a format error",
          "[master][segment_iterator]") {
  auto r = make_replica(13, 10);
  auto bytes = r.bytes;
  bytes[r.offsets[2]] =
      static_cast<std::byte>((static_cast<uint8_t>(bytes[r.offsets[2]]) & 0xc0) | 0x3f);
  SegmentIterator it(bytes);
  CHECK(walk(it, bytes) == 2);
  CHECK(it.status() == Status::kFormatError);
  CHECK(it.valid_bytes() == r.offsets[2]);
  CHECK(SegmentIterator(bytes, r.certificate).validate() == Status::kFormatError);
}

TEST_CASE("segment_iterator: random garbage never crashes the iterator",
          "[master][segment_iterator]") {
  Random rng(2024);
  for (int round = 0; round < 3000; ++round) {
    std::vector<std::byte> bytes(static_cast<size_t>(rng.uniform(300)));
    for (auto& b : bytes) b = static_cast<std::byte>(rng.next() & 0xff);
    // Some rounds make small, plausible headers more likely.
    if (!bytes.empty() && rng.uniform(2) == 0) {
      bytes[0] = static_cast<std::byte>(1 + rng.uniform(kMaxEntryType));
    }
    std::optional<Certificate> cert;
    if (rng.uniform(2) == 0) {
      cert = Certificate{.segment_bytes = static_cast<uint32_t>(rng.uniform(bytes.size() + 20)),
                         .checksum = static_cast<uint32_t>(rng.next())};
    }
    SegmentIterator it(bytes, cert);
    Status v = it.validate();
    walk(it, bytes);
    CHECK(it.valid_bytes() <= bytes.size());
    if (cert && cert->segment_bytes > 0) CHECK(v != Status::kOk);
  }
}

TEST_CASE("segment_iterator: mutated and truncated real segments never crash the iterator",
          "[master][segment_iterator]") {
  auto r = make_replica(14, 25);
  Random rng(77);
  for (int round = 0; round < 3000; ++round) {
    auto bytes = r.bytes;
    auto flips = rng.uniform(4);
    for (uint64_t f = 0; f < flips; ++f) {
      bytes[static_cast<size_t>(rng.uniform(bytes.size()))] ^=
          static_cast<std::byte>(1 + rng.uniform(255));
    }
    if (rng.uniform(2) == 0) bytes.resize(static_cast<size_t>(rng.uniform(bytes.size() + 1)));
    bool cert_mode = rng.uniform(2) == 0;
    SegmentIterator it(bytes, cert_mode ? std::optional(r.certificate) : std::nullopt);
    Status v = it.validate();
    walk(it, bytes);
    CHECK(it.valid_bytes() <= bytes.size());
    bool unchanged = bytes == r.bytes;
    if (cert_mode) {
      CHECK((v == Status::kOk) == unchanged);
      CHECK((it.status() == Status::kOk) == (v == Status::kOk));
    }
  }
}

}  // namespace
}  // namespace ramkv::master
