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

}  // namespace ramkv::bench
