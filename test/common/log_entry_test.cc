#include "common/log_entry.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "common/checksum.h"
#include "common/clock.h"

namespace ramkv::master {
namespace {

std::vector<std::byte> object_payload(uint64_t table_id, uint64_t version, uint32_t timestamp,
                                      std::string_view key, std::string_view value) {
  std::vector<std::byte> out(kMaxObjectPrefixBytes);
  uint32_t n = encode_object_prefix(table_id, version, timestamp, static_cast<uint32_t>(key.size()),
                                    out.data());
  out.resize(n);
  auto k = as_bytes(key);
  auto v = as_bytes(value);
  out.insert(out.end(), k.begin(), k.end());
  out.insert(out.end(), v.begin(), v.end());
  return out;
}

std::vector<std::byte> tombstone_payload(uint64_t table_id, uint64_t version, uint64_t segment_id,
                                         uint32_t timestamp, std::string_view key) {
  std::vector<std::byte> out(kMaxTombstonePrefixBytes);
  uint32_t n = encode_tombstone_prefix(table_id, version, segment_id, timestamp, out.data());
  out.resize(n);
  auto k = as_bytes(key);
  out.insert(out.end(), k.begin(), k.end());
  return out;
}

std::vector<std::byte> varint_then(uint64_t v, std::vector<std::byte> rest = {}) {
  std::vector<std::byte> out(10);
  ByteWriter w(out);
  w.put_varint(v);
  out.resize(w.size());
  out.insert(out.end(), rest.begin(), rest.end());
  return out;
}

std::span<const std::byte> first(const std::vector<std::byte>& v, size_t n) {
  return std::span<const std::byte>(v).first(n);
}

TEST_CASE("log_entry: each entry type has its own name", "[master][log_entry]") {
  std::set<std::string_view> names;
  for (uint8_t t = 0; t <= kMaxEntryType; ++t) {
    auto name = entry_type_name(static_cast<EntryType>(t));
    CHECK(name != "unknown");
    CHECK(names.insert(name).second);
  }
  CHECK(entry_type_name(static_cast<EntryType>(kMaxEntryType + 1)) == "unknown");
}

TEST_CASE("log_entry: header sizes follow the 1/2/3/4 length-byte boundaries",
          "[master][log_entry]") {
  struct Case {
    uint32_t payload_bytes;
    uint32_t length_bytes;
  };
  for (Case c : {Case{0, 1}, Case{1, 1}, Case{255, 1}, Case{256, 2}, Case{65535, 2}, Case{65536, 3},
                 Case{(1u << 24) - 1, 3}, Case{1u << 24, 4}, Case{kMaxPayloadBytes, 4}}) {
    INFO("payload bytes " << c.payload_bytes);
    CHECK(length_field_bytes(c.payload_bytes) == c.length_bytes);
    CHECK(entry_header_bytes(c.payload_bytes) == 1 + c.length_bytes + 4);
    CHECK(entry_bytes(c.payload_bytes) == entry_header_bytes(c.payload_bytes) + c.payload_bytes);

    std::array<std::byte, kMaxEntryHeaderBytes> buf{};
    uint32_t n = encode_entry_header(EntryType::kObject, c.payload_bytes, 0xdeadbeef, buf.data());
    CHECK(n == 1 + c.length_bytes + 4);
    CHECK(static_cast<uint8_t>(buf[0]) ==
          (static_cast<uint8_t>(EntryType::kObject) | ((c.length_bytes - 1) << 6)));
    // The header decodes from exactly its own bytes, without the payload.
    auto h = decode_entry_header(std::span<const std::byte>(buf).first(n));
    REQUIRE(h.ok());
    CHECK(h->type == EntryType::kObject);
    CHECK(h->header_bytes == n);
    CHECK(h->payload_bytes == c.payload_bytes);
    CHECK(h->checksum == 0xdeadbeef);
    CHECK(h->total_bytes() == entry_bytes(c.payload_bytes));
  }
}

TEST_CASE("log_entry: every entry type survives a header round trip", "[master][log_entry]") {
  for (uint8_t t = 1; t <= kMaxEntryType; ++t) {
    std::array<std::byte, kMaxEntryHeaderBytes> buf{};
    uint32_t n = encode_entry_header(static_cast<EntryType>(t), 1000, 42, buf.data());
    auto h = decode_entry_header(std::span<const std::byte>(buf).first(n));
    REQUIRE(h.ok());
    CHECK(h->type == static_cast<EntryType>(t));
    CHECK(h->payload_bytes == 1000);
  }
}

TEST_CASE("log_entry: a truncated header is a format error", "[master][log_entry]") {
  for (uint32_t payload_bytes : {10u, 300u, 70000u, 1u << 25}) {
    std::array<std::byte, kMaxEntryHeaderBytes> buf{};
    uint32_t n = encode_entry_header(EntryType::kTombstone, payload_bytes, 7, buf.data());
    for (uint32_t cut = 0; cut < n; ++cut) {
      INFO("payload bytes " << payload_bytes << " cut at " << cut);
      CHECK(decode_entry_header(std::span<const std::byte>(buf).first(cut)).status() ==
            Status::kFormatError);
    }
  }
}

TEST_CASE("log_entry: a length in more bytes than it needs is a format error",
          "[master][log_entry]") {
  // (length bytes, length): each length would fit in fewer bytes.
  struct Case {
    uint32_t length_bytes;
    uint32_t length;
  };
  for (Case c : {Case{2, 0}, Case{2, 255}, Case{3, 0}, Case{3, 65535}, Case{4, 0}, Case{4, 255},
                 Case{4, (1u << 24) - 1}}) {
    std::array<std::byte, kMaxEntryHeaderBytes> buf{};
    buf[0] = static_cast<std::byte>(static_cast<uint32_t>(EntryType::kObject) |
                                    ((c.length_bytes - 1) << 6));
    for (uint32_t i = 0; i < c.length_bytes; ++i) {
      buf[1 + i] = static_cast<std::byte>((c.length >> (8 * i)) & 0xff);
    }
    INFO("length " << c.length << " in " << c.length_bytes << " bytes");
    CHECK(decode_entry_header(buf).status() == Status::kFormatError);
  }
}

TEST_CASE("log_entry: a length above the payload limit is a format error", "[master][log_entry]") {
  for (uint32_t length : {kMaxPayloadBytes + 1, 0x7fffffffu, 0xffffffffu}) {
    std::array<std::byte, kMaxEntryHeaderBytes> buf{};
    buf[0] = static_cast<std::byte>(static_cast<uint32_t>(EntryType::kObject) | (3u << 6));
    std::memcpy(&buf[1], &length, 4);
    INFO("length " << length);
    CHECK(decode_entry_header(buf).status() == Status::kFormatError);
  }
}

TEST_CASE("log_entry: unknown entry types are a format error", "[master][log_entry]") {
  for (uint32_t type = kMaxEntryType + 1u; type < 64; ++type) {
    for (uint32_t len_code = 0; len_code < 4; ++len_code) {
      std::array<std::byte, kMaxEntryHeaderBytes> buf{};
      buf[0] = static_cast<std::byte>(type | (len_code << 6));
      buf[1 + len_code] = std::byte{1};  // a minimal length for any length code
      INFO("tag " << (type | (len_code << 6)));
      CHECK(decode_entry_header(buf).status() == Status::kFormatError);
    }
  }
  // Type 0 with length bits set is not unwritten space.
  for (uint32_t tag : {0x40u, 0x80u, 0xc0u}) {
    std::array<std::byte, kMaxEntryHeaderBytes> buf{};
    buf[0] = static_cast<std::byte>(tag);
    CHECK(decode_entry_header(buf).status() == Status::kFormatError);
  }
}

TEST_CASE("log_entry: an all-zero tag decodes as unwritten space", "[master][log_entry]") {
  std::array<std::byte, kMaxEntryHeaderBytes> buf{};
  auto h = decode_entry_header(buf);
  REQUIRE(h.ok());
  CHECK(h->type == EntryType::kInvalid);
  auto one = decode_entry_header(std::span<const std::byte>(buf).first(1));
  REQUIRE(one.ok());
  CHECK(one->type == EntryType::kInvalid);
  CHECK(decode_entry_header({}).status() == Status::kFormatError);
}

TEST_CASE("log_entry: build_entry writes a header whose checksum covers the payload",
          "[master][log_entry]") {
  auto payload = object_payload(3, 9, 100, "key", "value");
  auto entry = build_entry(EntryType::kObject, payload);
  REQUIRE(entry.size() == entry_bytes(static_cast<uint32_t>(payload.size())));
  auto h = decode_entry_header(entry);
  REQUIRE(h.ok());
  CHECK(h->type == EntryType::kObject);
  CHECK(h->payload_bytes == payload.size());
  CHECK(h->checksum == entry_checksum(EntryType::kObject, payload));
  CHECK(std::equal(payload.begin(), payload.end(), entry.begin() + h->header_bytes));

  auto empty = build_entry(EntryType::kSafeVersion, {});
  CHECK(empty.size() == entry_bytes(0));
}

TEST_CASE("log_entry: the checksum depends on the type, the length and every byte",
          "[master][log_entry]") {
  auto payload = object_payload(1, 1, 1, "k", "v");
  uint32_t base = entry_checksum(EntryType::kObject, payload);
  CHECK(entry_checksum(EntryType::kTombstone, payload) != base);
  // The same bytes with one more zero byte: only the length differs.
  auto longer = payload;
  longer.push_back(std::byte{0});
  CHECK(entry_checksum(EntryType::kObject, longer) != base);
  auto flipped = payload;
  flipped[2] ^= std::byte{0x10};
  CHECK(entry_checksum(EntryType::kObject, flipped) != base);
}

TEST_CASE("log_entry: the streaming checksum with entry_checksum_seed matches",
          "[master][log_entry]") {
  std::string value(3000, 'x');
  auto payload = object_payload(5, 6, 7, "a key", value);
  Checksum c(entry_checksum_seed(EntryType::kObject, static_cast<uint32_t>(payload.size())));
  std::span<const std::byte> p(payload);
  c.update(p.first(10));
  c.update(p.subspan(10, 1000));
  c.update(p.subspan(1010));
  CHECK(static_cast<uint32_t>(c.digest()) == entry_checksum(EntryType::kObject, payload));
}

TEST_CASE("log_entry: object payloads round trip", "[master][log_entry]") {
  std::string binary_value("a\0b\0c", 5);
  struct Case {
    uint64_t table_id, version;
    uint32_t timestamp;
    std::string key, value;
  };
  for (const Case& c :
       {Case{0, 0, 0, "", ""}, Case{1, 2, 3, "k", ""}, Case{1, 2, 3, "", "v"},
        Case{UINT64_MAX, UINT64_MAX, UINT32_MAX, std::string(300, 'k'), binary_value},
        Case{127, 128, 1'700'000'000, "user:42", std::string(70000, 'v')}}) {
    auto payload = object_payload(c.table_id, c.version, c.timestamp, c.key, c.value);
    auto o = decode_object(payload);
    REQUIRE(o.ok());
    CHECK(o->table_id == c.table_id);
    CHECK(o->version == c.version);
    CHECK(o->timestamp == c.timestamp);
    CHECK(o->key == c.key);
    CHECK(o->value == c.value);
    // Views into the payload, not copies.
    if (!c.key.empty()) {
      CHECK(static_cast<const void*>(o->key.data()) >= static_cast<const void*>(payload.data()));
    }
  }
}

TEST_CASE("log_entry: the object prefix fits kMaxObjectPrefixBytes at its largest",
          "[master][log_entry]") {
  std::array<std::byte, kMaxObjectPrefixBytes> obj{};
  CHECK(encode_object_prefix(UINT64_MAX, UINT64_MAX, UINT32_MAX, UINT32_MAX, obj.data()) ==
        10 + 10 + 4 + 5);
  std::array<std::byte, kMaxTombstonePrefixBytes> tomb{};
  CHECK(encode_tombstone_prefix(UINT64_MAX, UINT64_MAX, UINT64_MAX, UINT32_MAX, tomb.data()) ==
        kMaxTombstonePrefixBytes);
}

TEST_CASE("log_entry: a truncated object payload is a format error", "[master][log_entry]") {
  auto payload = object_payload(1000, 2000, 3000, "the key", "the value");
  size_t key_end = payload.size() - std::string_view("the value").size();
  for (size_t cut = 0; cut < key_end; ++cut) {
    INFO("cut at " << cut);
    CHECK(decode_object(first(payload, cut)).status() == Status::kFormatError);
  }
  // Cut right after the key: an object with an empty value, which is valid.
  auto o = decode_object(first(payload, key_end));
  REQUIRE(o.ok());
  CHECK(o->key == "the key");
  CHECK(o->value.empty());
}

TEST_CASE("log_entry: an object whose key length runs past the payload is a format error",
          "[master][log_entry]") {
  for (uint64_t claimed :
       {uint64_t{4}, uint64_t{100}, uint64_t{UINT32_MAX}, uint64_t{UINT64_MAX}}) {
    std::vector<std::byte> payload;
    for (uint64_t v : {uint64_t{1}, uint64_t{2}}) {
      auto enc = varint_then(v);
      payload.insert(payload.end(), enc.begin(), enc.end());
    }
    payload.insert(payload.end(), 4, std::byte{0});  // timestamp
    auto klen = varint_then(claimed);
    payload.insert(payload.end(), klen.begin(), klen.end());
    auto key = as_bytes("abc");
    payload.insert(payload.end(), key.begin(), key.end());
    INFO("claimed key bytes " << claimed);
    CHECK(decode_object(payload).status() == Status::kFormatError);
  }
}

TEST_CASE("log_entry: tombstone payloads round trip and truncation is a format error",
          "[master][log_entry]") {
  auto payload = tombstone_payload(UINT64_MAX, 77, 1234567, 99, "gone");
  auto t = decode_tombstone(payload);
  REQUIRE(t.ok());
  CHECK(t->table_id == UINT64_MAX);
  CHECK(t->version == 77);
  CHECK(t->segment_id == 1234567);
  CHECK(t->timestamp == 99);
  CHECK(t->key == "gone");

  size_t prefix = payload.size() - 4;
  for (size_t cut = 0; cut < prefix; ++cut) {
    INFO("cut at " << cut);
    CHECK(decode_tombstone(first(payload, cut)).status() == Status::kFormatError);
  }
  auto empty_key = decode_tombstone(first(payload, prefix));
  REQUIRE(empty_key.ok());
  CHECK(empty_key->key.empty());
}

TEST_CASE("log_entry: segment header payloads are exactly 20 bytes", "[master][log_entry]") {
  std::vector<std::byte> payload;
  encode_segment_header({.master_id = 5, .segment_id = UINT64_MAX, .segment_bytes = 8 << 20},
                        &payload);
  REQUIRE(payload.size() == 20);
  auto h = decode_segment_header(payload);
  REQUIRE(h.ok());
  CHECK(h->master_id == 5);
  CHECK(h->segment_id == UINT64_MAX);
  CHECK(h->segment_bytes == 8u << 20);

  for (size_t cut = 0; cut < 20; ++cut) {
    CHECK(decode_segment_header(first(payload, cut)).status() == Status::kFormatError);
  }
  payload.push_back(std::byte{0});
  CHECK(decode_segment_header(payload).status() == Status::kFormatError);
}

TEST_CASE("log_entry: encoders append to what is already in the vector", "[master][log_entry]") {
  std::vector<std::byte> out{std::byte{0xaa}};
  encode_safe_version(300, &out);
  REQUIRE(out.size() == 3);
  CHECK(out[0] == std::byte{0xaa});
  auto v = decode_safe_version(std::span<const std::byte>(out).subspan(1));
  REQUIRE(v.ok());
  CHECK(*v == 300);
}

TEST_CASE("log_entry: safe version payloads round trip and reject junk", "[master][log_entry]") {
  for (uint64_t v : {uint64_t{0}, uint64_t{1}, uint64_t{128}, UINT64_MAX}) {
    std::vector<std::byte> payload;
    encode_safe_version(v, &payload);
    auto got = decode_safe_version(payload);
    REQUIRE(got.ok());
    CHECK(*got == v);
    payload.push_back(std::byte{0});
    CHECK(decode_safe_version(payload).status() == Status::kFormatError);
  }
  CHECK(decode_safe_version({}).status() == Status::kFormatError);
  std::vector<std::byte> unterminated{std::byte{0x80}, std::byte{0x80}};
  CHECK(decode_safe_version(unterminated).status() == Status::kFormatError);
  std::vector<std::byte> overflow(10, std::byte{0xff});
  CHECK(decode_safe_version(overflow).status() == Status::kFormatError);
}

TEST_CASE("log_entry: log digest payloads round trip", "[master][log_entry]") {
  for (const std::vector<uint64_t>& ids : {std::vector<uint64_t>{}, std::vector<uint64_t>{7},
                                           std::vector<uint64_t>{1, 2, 3, UINT64_MAX, 0}}) {
    std::vector<std::byte> payload;
    encode_log_digest(ids, &payload);
    CHECK(payload.size() == varint_bytes(ids.size()) + 8 * ids.size());
    auto got = decode_log_digest(payload);
    REQUIRE(got.ok());
    CHECK(*got == ids);
  }
  std::vector<uint64_t> many(1000);
  for (size_t i = 0; i < many.size(); ++i) many[i] = i * 31;
  std::vector<std::byte> payload;
  encode_log_digest(many, &payload);
  auto got = decode_log_digest(payload);
  REQUIRE(got.ok());
  CHECK(*got == many);
}

TEST_CASE("log_entry: a log digest whose count disagrees with its bytes is a format error",
          "[master][log_entry]") {
  std::vector<uint64_t> ids{10, 20, 30};
  std::vector<std::byte> good;
  encode_log_digest(ids, &good);
  std::vector<std::byte> id_bytes(good.begin() + 1, good.end());

  SECTION("count larger than the ids present") {
    CHECK(decode_log_digest(varint_then(4, id_bytes)).status() == Status::kFormatError);
  }
  SECTION("count smaller than the ids present") {
    CHECK(decode_log_digest(varint_then(2, id_bytes)).status() == Status::kFormatError);
  }
  SECTION("a huge count with few bytes allocates nothing and fails") {
    CHECK(decode_log_digest(varint_then(UINT64_MAX, id_bytes)).status() == Status::kFormatError);
    CHECK(decode_log_digest(varint_then(uint64_t{1} << 61)).status() == Status::kFormatError);
  }
  SECTION("a partial id") {
    for (size_t cut = 1; cut < good.size(); ++cut) {
      if ((cut - 1) % 8 == 0) continue;  // whole ids: count mismatch, checked above
      INFO("cut at " << cut);
      CHECK(decode_log_digest(first(good, cut)).status() == Status::kFormatError);
    }
  }
  SECTION("no count at all") { CHECK(decode_log_digest({}).status() == Status::kFormatError); }
}

TEST_CASE("log_entry: table stats payloads round trip", "[master][log_entry]") {
  std::vector<TableStat> stats{
      {.table_id = 1, .object_count = 0, .object_bytes = 0},
      {.table_id = UINT64_MAX, .object_count = UINT64_MAX, .object_bytes = UINT64_MAX},
      {.table_id = 300, .object_count = 5, .object_bytes = 1234}};
  std::vector<std::byte> payload;
  encode_table_stats(stats, &payload);
  auto got = decode_table_stats(payload);
  REQUIRE(got.ok());
  CHECK(*got == stats);

  std::vector<std::byte> empty;
  encode_table_stats({}, &empty);
  auto none = decode_table_stats(empty);
  REQUIRE(none.ok());
  CHECK(none->empty());
}

TEST_CASE("log_entry: truncated or lying table stats are a format error", "[master][log_entry]") {
  std::vector<TableStat> stats{{.table_id = 1, .object_count = 2, .object_bytes = 300},
                               {.table_id = 4, .object_count = 500, .object_bytes = 60000}};
  std::vector<std::byte> good;
  encode_table_stats(stats, &good);

  for (size_t cut = 0; cut < good.size(); ++cut) {
    INFO("cut at " << cut);
    CHECK(decode_table_stats(first(good, cut)).status() == Status::kFormatError);
  }
  auto trailing = good;
  trailing.push_back(std::byte{0});
  CHECK(decode_table_stats(trailing).status() == Status::kFormatError);

  std::vector<std::byte> body(good.begin() + 1, good.end());
  CHECK(decode_table_stats(varint_then(3, body)).status() == Status::kFormatError);
  CHECK(decode_table_stats(varint_then(1, body)).status() == Status::kFormatError);
  CHECK(decode_table_stats(varint_then(UINT64_MAX, body)).status() == Status::kFormatError);
  CHECK(decode_table_stats(varint_then(uint64_t{1} << 62)).status() == Status::kFormatError);
}

TEST_CASE("log_entry: decoders survive random bytes", "[master][log_entry]") {
  Random rng(1);
  for (int i = 0; i < 5000; ++i) {
    std::vector<std::byte> bytes(static_cast<size_t>(rng.uniform(64)));
    for (auto& b : bytes) b = static_cast<std::byte>(rng.next() & 0xff);
    // Only that they return, without touching memory outside `bytes`; the sanitizer
    // build checks the latter.
    auto h = decode_entry_header(bytes);
    if (h.ok() && h->type != EntryType::kInvalid) {
      CHECK(h->header_bytes <= bytes.size());
      CHECK(h->payload_bytes <= kMaxPayloadBytes);
    }
    auto o = decode_object(bytes);
    if (o.ok()) CHECK(o->key.size() + o->value.size() <= bytes.size());
    auto t = decode_tombstone(bytes);
    if (t.ok()) CHECK(t->key.size() <= bytes.size());
    auto d = decode_log_digest(bytes);
    if (d.ok()) CHECK(d->size() * 8 < bytes.size());
    auto s = decode_table_stats(bytes);
    if (s.ok()) CHECK(s->size() * 3 < bytes.size());
    (void)decode_segment_header(bytes);
    (void)decode_safe_version(bytes);
  }
}

}  // namespace
}  // namespace ramkv::master
