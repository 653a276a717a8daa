#include "common/checksum.h"

#include <catch2/catch.hpp>

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "common/clock.h"

namespace ramkv {
namespace {

std::vector<std::byte> random_bytes(Random& rng, size_t n) {
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(rng.next() & 0xff);
  return out;
}

TEST_CASE("checksum: pinned XXH3 values stay the same across releases", "[common][checksum]") {
  // The first two are from xxHash's own sanity table; the rest were computed once with
  // xxHash 0.8 and must never change (they are on disk and on the wire).
  CHECK(checksum64({}) == 0x2D06800538D394C2ULL);
  CHECK(checksum64({}, 0x9E3779B185EBCA8DULL) == 0xA8A6B918B2F0364AULL);
  CHECK(checksum64(as_bytes("ramkv")) == 0xcbf7df7daaa7c1c4ULL);
  CHECK(checksum64(as_bytes("ramkv"), 7) == 0x1d236eeb1b054d7cULL);
  CHECK(checksum64(as_bytes("The quick brown fox jumps over the lazy dog")) ==
        0xce7d19a5418fb365ULL);
  CHECK(key_hash(7, "ramkv") == 0x1d236eeb1b054d7cULL);
  CHECK(checksum32(as_bytes("ramkv")) == 0xaaa7c1c4u);
}

TEST_CASE("checksum: the streaming form equals the one-shot form for any split",
          "[common][checksum]") {
  Random rng(7);
  // Lengths around XXH3's internal thresholds (16, 128, 240, stripes, 1 KiB blocks).
  for (size_t n :
       {size_t{0}, size_t{1}, size_t{3}, size_t{16}, size_t{17}, size_t{128}, size_t{129},
        size_t{240}, size_t{241}, size_t{1024}, size_t{1025}, size_t{5000}}) {
    auto data = random_bytes(rng, n);
    std::span<const std::byte> all(data);
    for (uint64_t seed : {uint64_t{0}, uint64_t{1}, uint64_t{0x123456789abcdefULL}}) {
      uint64_t expected = checksum64(all, seed);
      // Every single split point.
      for (size_t cut = 0; cut <= n; ++cut) {
        Checksum c(seed);
        c.update(all.first(cut));
        c.update(all.subspan(cut));
        INFO("length " << n << " seed " << seed << " cut " << cut);
        REQUIRE(c.digest() == expected);
      }
      // Random many-piece splits, including empty pieces.
      for (int trial = 0; trial < 20; ++trial) {
        Checksum c(seed);
        size_t at = 0;
        while (at < n) {
          size_t piece = static_cast<size_t>(rng.uniform(uint64_t{n - at} + 1));
          c.update(all.subspan(at, piece));
          at += piece;
        }
        INFO("length " << n << " seed " << seed << " trial " << trial);
        REQUIRE(c.digest() == expected);
      }
    }
  }
}

TEST_CASE("checksum: digest can be taken repeatedly and after more updates", "[common][checksum]") {
  Checksum c;
  c.update(as_bytes("abc"));
  CHECK(c.digest() == checksum64(as_bytes("abc")));
  CHECK(c.digest() == checksum64(as_bytes("abc")));
  c.update(as_bytes("def"));
  CHECK(c.digest() == checksum64(as_bytes("abcdef")));
}

TEST_CASE("checksum: a single flipped bit changes the checksum", "[common][checksum]") {
  Random rng(11);
  auto data = random_bytes(rng, 300);
  uint64_t original = checksum64(data);
  for (size_t i = 0; i < data.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      auto copy = data;
      copy[i] ^= static_cast<std::byte>(1 << bit);
      INFO("byte " << i << " bit " << bit);
      REQUIRE(checksum64(copy) != original);
    }
  }
}

TEST_CASE("checksum: the seed changes the checksum", "[common][checksum]") {
  auto data = as_bytes("same bytes");
  CHECK(checksum64(data, 0) != checksum64(data, 1));
  CHECK(checksum32(data, 0) != checksum32(data, 1));
}

TEST_CASE("checksum: key_hash differs by table id for the same key", "[common][checksum]") {
  std::set<uint64_t> hashes;
  for (uint64_t table = 0; table < 1000; ++table) hashes.insert(key_hash(table, "user:1"));
  CHECK(hashes.size() == 1000);
  CHECK(key_hash(1, "a") != key_hash(1, "b"));
  CHECK(key_hash(1, "a") == key_hash(1, "a"));
  CHECK(key_hash(0, "") == checksum64({}));
}

TEST_CASE("checksum: as_bytes and as_chars are inverse views", "[common][checksum]") {
  std::string s("hello\0world", 11);
  auto b = as_bytes(s);
  CHECK(b.size() == 11);
  CHECK(static_cast<const void*>(b.data()) == static_cast<const void*>(s.data()));
  CHECK(as_chars(b) == std::string_view(s));
}

}  // namespace
}  // namespace ramkv
