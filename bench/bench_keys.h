// Keys and values the storage-engine benchmarks write (`ramkv-bench memory` and
// `ramkv-bench replay`): fixed-width keys, and values that name their key so that a value
// read back can be checked against the one written.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

namespace ramkv::bench {

// Key number `index`, `key_bytes` wide: "k<index>" right-aligned in zeros.
inline void make_key(uint64_t index, uint32_t key_bytes, std::string* key) {
  key->assign(key_bytes, '0');
  std::string digits = fmt::format("k{}", index);
  size_t n = std::min<size_t>(digits.size(), key_bytes);
  key->replace(key_bytes - n, n, digits, digits.size() - n, n);
}

// The first 8 bytes of a value name its key; the rest follow from the write's sequence
// number. Fills the value's size as it is.
inline void make_value(uint64_t index, uint64_t sequence, std::string* value) {
  for (size_t i = 0; i + 8 <= value->size(); i += 8) {
    uint64_t word = i == 0 ? index : sequence * 0x9E3779B97F4A7C15ULL + i;
    std::memcpy(value->data() + i, &word, 8);
  }
}

// Hash-table bytes for `objects` keys, as an operator sizes a master's table for the data
// it will hold (--hash-table-bytes; master_config.h): 8-slot buckets of 64 bytes, three
// quarters of the slots used. The replay ceiling's master and the recovery bench's servers
// are sized alike, so that the ratio between them compares the same table. (A server's
// default, memory / 16, assumes objects of about 100 bytes: for 1000-byte objects it is
// ten times larger, and replay into it ran 15-25% slower here, its random bucket accesses
// missing the TLB.)
inline uint64_t hash_table_bytes_for(uint64_t objects) {
  return std::max<uint64_t>(64, (objects * 4 / 3 / 8 + 1) * 64);
}

}  // namespace ramkv::bench
