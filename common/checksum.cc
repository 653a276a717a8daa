#include "common/checksum.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <new>

namespace ramkv {

static_assert(sizeof(XXH3_state_t) <= 576, "Checksum::state_ too small for XXH3_state_t");
static_assert(alignof(XXH3_state_t) <= 64, "Checksum::state_ under-aligned");

uint64_t checksum64(std::span<const std::byte> bytes, uint64_t seed) {
  return XXH3_64bits_withSeed(bytes.data(), bytes.size(), seed);
}

uint64_t key_hash(uint64_t table_id, std::string_view key) {
  return XXH3_64bits_withSeed(key.data(), key.size(), table_id);
}

Checksum::Checksum(uint64_t seed) {
  auto* state = new (state_) XXH3_state_t;
  XXH3_INITSTATE(state);
  XXH3_64bits_reset_withSeed(state, seed);
}

Checksum::~Checksum() = default;

void Checksum::update(std::span<const std::byte> bytes) {
  XXH3_64bits_update(reinterpret_cast<XXH3_state_t*>(state_), bytes.data(), bytes.size());
}

uint64_t Checksum::digest() const {
  return XXH3_64bits_digest(reinterpret_cast<const XXH3_state_t*>(state_));
}

}  // namespace ramkv
