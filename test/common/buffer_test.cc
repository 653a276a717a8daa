#include "common/buffer.h"

#include <catch2/catch.hpp>

#include <array>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/clock.h"

namespace ramkv {
namespace {

std::vector<std::byte> bytes_of(std::initializer_list<int> values) {
  std::vector<std::byte> out;
  for (int v : values) out.push_back(static_cast<std::byte>(v));
  return out;
}

std::vector<std::byte> encode_varint(uint64_t v) {
  std::vector<std::byte> out(10);
  ByteWriter w(out);
  w.put_varint(v);
  REQUIRE(w.ok());
  out.resize(w.size());
  return out;
}

TEST_CASE("buffer: fixed-width integers, bytes and strings round trip", "[common][buffer]") {
  std::array<std::byte, 128> buf{};
  ByteWriter w(buf);
  w.put<uint8_t>(0xab);
  w.put<uint16_t>(0xbeef);
  w.put<uint32_t>(0xdeadbeef);
  w.put<uint64_t>(0x0123456789abcdefULL);
  w.put<int32_t>(-7);
  w.put<int64_t>(std::numeric_limits<int64_t>::min());
  w.put_bytes(std::string_view("key"));
  auto raw = bytes_of({1, 2, 3, 0, 255});
  w.put_bytes(std::span<const std::byte>(raw));
  w.put_bytes(std::string_view());
  REQUIRE(w.ok());
  CHECK(w.size() == 1 + 2 + 4 + 8 + 4 + 8 + 3 + 5);
  CHECK(w.written().size() == w.size());
  // Little-endian layout, as on disk.
  CHECK(buf[1] == std::byte{0xef});
  CHECK(buf[2] == std::byte{0xbe});

  ByteReader r(w.written());
  CHECK(r.get<uint8_t>() == 0xab);
  CHECK(r.get<uint16_t>() == 0xbeef);
  CHECK(r.get<uint32_t>() == 0xdeadbeef);
  CHECK(r.get<uint64_t>() == 0x0123456789abcdefULL);
  CHECK(r.get<int32_t>() == -7);
  CHECK(r.get<int64_t>() == std::numeric_limits<int64_t>::min());
  CHECK(r.get_string(3) == "key");
  auto got = r.get_bytes(5);
  CHECK(std::vector<std::byte>(got.begin(), got.end()) == raw);
  CHECK(r.ok());
  CHECK(r.remaining() == 0);
  CHECK(r.position() == w.size());
}

TEST_CASE("buffer: varints at the 1-byte and 10-byte edges have the LEB128 encoding",
          "[common][buffer]") {
  CHECK(encode_varint(0) == bytes_of({0x00}));
  CHECK(encode_varint(1) == bytes_of({0x01}));
  CHECK(encode_varint(127) == bytes_of({0x7f}));
  CHECK(encode_varint(128) == bytes_of({0x80, 0x01}));
  CHECK(encode_varint(300) == bytes_of({0xac, 0x02}));
  CHECK(encode_varint(16383) == bytes_of({0xff, 0x7f}));
  CHECK(encode_varint(16384) == bytes_of({0x80, 0x80, 0x01}));
  CHECK(encode_varint(UINT64_MAX) ==
        bytes_of({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}));

  CHECK(varint_bytes(0) == 1);
  CHECK(varint_bytes(127) == 1);
  CHECK(varint_bytes(128) == 2);
  CHECK(varint_bytes(UINT64_MAX) == 10);
  static_assert(varint_bytes(uint64_t{1} << 63) == 10);
  static_assert(varint_bytes((uint64_t{1} << 63) - 1) == 9);
}

TEST_CASE("buffer: varints round trip and varint_bytes matches the encoded size",
          "[common][buffer]") {
  std::vector<uint64_t> values = {0,
                                  1,
                                  127,
                                  128,
                                  255,
                                  256,
                                  16383,
                                  16384,
                                  UINT32_MAX,
                                  uint64_t{UINT32_MAX} + 1,
                                  (uint64_t{1} << 63) - 1,
                                  uint64_t{1} << 63,
                                  UINT64_MAX - 1,
                                  UINT64_MAX};
  Random rng(42);
  for (int i = 0; i < 1000; ++i) values.push_back(rng.next() >> rng.uniform(64));
  for (uint64_t v : values) {
    INFO("value " << v);
    auto enc = encode_varint(v);
    CHECK(enc.size() == varint_bytes(v));
    ByteReader r(enc);
    CHECK(r.get_varint() == v);
    CHECK(r.ok());
    CHECK(r.remaining() == 0);
  }
}

TEST_CASE("buffer: varints longer than 10 bytes or overflowing 64 bits are rejected",
          "[common][buffer]") {
  SECTION("eleven bytes") {
    auto b = bytes_of({0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00});
    ByteReader r(b);
    CHECK(r.get_varint() == 0);
    CHECK_FALSE(r.ok());
  }
  SECTION("tenth byte with a continuation bit") {
    auto b = bytes_of({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x81, 0x00});
    ByteReader r(b);
    r.get_varint();
    CHECK_FALSE(r.ok());
  }
  SECTION("tenth byte carrying bits above bit 63") {
    for (int last : {0x02, 0x03, 0x7f}) {
      auto b = bytes_of({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, last});
      ByteReader r(b);
      CHECK(r.get_varint() == 0);
      CHECK_FALSE(r.ok());
    }
  }
  SECTION("the largest value is still accepted") {
    auto b = bytes_of({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01});
    ByteReader r(b);
    CHECK(r.get_varint() == UINT64_MAX);
    CHECK(r.ok());
  }
}

TEST_CASE("buffer: a varint cut off by the end of the view fails without reading past it",
          "[common][buffer]") {
  // The byte after the view would complete the varint if it were read.
  auto backing = bytes_of({0x80, 0x80, 0x01});
  for (size_t n = 0; n < 2; ++n) {
    ByteReader r(std::span<const std::byte>(backing).first(n));
    CHECK(r.get_varint() == 0);
    CHECK_FALSE(r.ok());
    CHECK(r.remaining() == 0);
  }
  ByteReader whole(backing);
  CHECK(whole.get_varint() == 16384);
  CHECK(whole.ok());
}

TEST_CASE("buffer: a read past the end sets a sticky failure and returns zero values",
          "[common][buffer]") {
  auto backing = bytes_of({1, 2, 3, 4, 5, 6, 7, 8});
  ByteReader r(std::span<const std::byte>(backing).first(3));
  CHECK(r.get<uint32_t>() == 0);
  CHECK_FALSE(r.ok());
  CHECK(r.position() == 0);
  CHECK(r.remaining() == 0);
  // Sticky: three bytes are there, but nothing more is read after a failure.
  CHECK(r.get<uint8_t>() == 0);
  CHECK(r.get_varint() == 0);
  CHECK(r.get_bytes(1).empty());
  CHECK(r.get_string(1).empty());
  CHECK(r.rest().empty());
  CHECK_FALSE(r.ok());
}

TEST_CASE("buffer: get_bytes of more than remains fails, even for huge lengths",
          "[common][buffer]") {
  auto backing = bytes_of({1, 2, 3, 4});
  SECTION("one more than remains") {
    ByteReader r(backing);
    CHECK(r.get<uint8_t>() == 1);
    CHECK(r.get_bytes(4).empty());
    CHECK_FALSE(r.ok());
  }
  SECTION("SIZE_MAX") {
    ByteReader r(backing);
    CHECK(r.get<uint8_t>() == 1);
    CHECK(r.get_bytes(SIZE_MAX).empty());
    CHECK_FALSE(r.ok());
  }
  SECTION("exactly what remains") {
    ByteReader r(backing);
    CHECK(r.get<uint8_t>() == 1);
    CHECK(r.get_bytes(3).size() == 3);
    CHECK(r.ok());
    CHECK(r.remaining() == 0);
    CHECK(r.get_bytes(0).empty());
    CHECK(r.ok());
  }
}

TEST_CASE("buffer: rest returns the unread bytes and consumes them", "[common][buffer]") {
  auto backing = bytes_of({9, 8, 7, 6});
  ByteReader r(backing);
  r.get<uint8_t>();
  auto rest = r.rest();
  REQUIRE(rest.size() == 3);
  CHECK(rest[0] == std::byte{8});
  CHECK(r.remaining() == 0);
  CHECK(r.rest().empty());
  CHECK(r.ok());
}

TEST_CASE("buffer: a writer that runs out of room fails and writes nothing more",
          "[common][buffer]") {
  std::array<std::byte, 16> backing;
  backing.fill(std::byte{0xee});
  auto window = std::span<std::byte>(backing).first(5);

  SECTION("a fixed-width value that does not fit") {
    ByteWriter w(window);
    w.put<uint32_t>(0x01020304);
    CHECK(w.ok());
    w.put<uint16_t>(0xffff);
    CHECK_FALSE(w.ok());
    CHECK(w.size() == 4);
    // Sticky: one byte is free, but nothing is written after a failure.
    w.put<uint8_t>(0x11);
    CHECK_FALSE(w.ok());
    CHECK(w.size() == 4);
    CHECK(backing[4] == std::byte{0xee});
  }
  SECTION("a varint that does not fit is not written in part") {
    ByteWriter w(window);
    w.put<uint32_t>(0);
    w.put_varint(128);
    CHECK_FALSE(w.ok());
    CHECK(w.size() == 4);
    CHECK(backing[4] == std::byte{0xee});
  }
  SECTION("bytes that do not fit are not written in part") {
    ByteWriter w(window);
    w.put_bytes(std::string_view("abcdef"));
    CHECK_FALSE(w.ok());
    CHECK(w.size() == 0);
    CHECK(backing[0] == std::byte{0xee});
  }
  SECTION("filling exactly to the end is fine") {
    ByteWriter w(window);
    w.put_bytes(std::string_view("abcde"));
    CHECK(w.ok());
    CHECK(w.size() == 5);
    w.put_bytes(std::string_view());
    CHECK(w.ok());
  }
  for (size_t i = 5; i < backing.size(); ++i) CHECK(backing[i] == std::byte{0xee});
}

TEST_CASE("buffer: a writer over an empty span fails on the first put", "[common][buffer]") {
  ByteWriter w(std::span<std::byte>{});
  w.put_varint(0);
  CHECK_FALSE(w.ok());
  CHECK(w.size() == 0);
  CHECK(w.written().empty());
}

}  // namespace
}  // namespace ramkv
