// Checksums and key hashing, all XXH3 (xxHash 0.8).
//
// - checksum32/checksum64: integrity of log entries, certificates and files.
// - key_hash: which tablet and hash-table bucket a key belongs to. XXH3 of the key with
//   the table id as seed, so equal keys in different tables spread independently.
// Both are stable across processes and releases: they are stored on disk and compared
// between machines.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace ramkv {

uint64_t checksum64(std::span<const std::byte> bytes, uint64_t seed = 0);
inline uint32_t checksum32(std::span<const std::byte> bytes, uint64_t seed = 0) {
  return static_cast<uint32_t>(checksum64(bytes, seed));
}
uint64_t key_hash(uint64_t table_id, std::string_view key);

// Streaming form of checksum64 for bytes that arrive in pieces.
class Checksum {
 public:
  explicit Checksum(uint64_t seed = 0);
  ~Checksum();
  Checksum(const Checksum&) = delete;
  Checksum& operator=(const Checksum&) = delete;

  void update(std::span<const std::byte> bytes);
  uint64_t digest() const;

 private:
  alignas(64) unsigned char state_[576];  // XXH3_state_t, opaque here (static_assert in .cc)
};

inline std::span<const std::byte> as_bytes(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}
inline std::string_view as_chars(std::span<const std::byte> b) {
  return {reinterpret_cast<const char*>(b.data()), b.size()};
}

}  // namespace ramkv
