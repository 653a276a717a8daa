// Micro-benchmarks for common/checksum.h: XXH3 over log-entry-sized buffers (bytes/s) and
// key hashing for typical key sizes (items/s).
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/checksum.h"

namespace {

// checksum64 over one buffer of state.range(0) bytes: an entry's payload checksum.
void BM_Checksum64(benchmark::State& state) {
  const auto size = static_cast<size_t>(state.range(0));
  std::vector<std::byte> buf(size);
  for (size_t i = 0; i < size; ++i) buf[i] = static_cast<std::byte>(i * 131 + 7);
  uint64_t seed = 0;
  for (auto _ : state) {
    uint64_t h = ramkv::checksum64(buf, seed);
    benchmark::DoNotOptimize(h);
    ++seed;
  }
  state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_Checksum64)->Arg(16)->Arg(100)->Arg(1 << 10)->Arg(8 << 10)->Arg(1 << 20);

// key_hash of a key of state.range(0) bytes; the table id varies so nothing is hoisted.
void BM_KeyHash(benchmark::State& state) {
  const std::string key(static_cast<size_t>(state.range(0)), 'k');
  uint64_t table_id = 1;
  for (auto _ : state) {
    uint64_t h = ramkv::key_hash(table_id, key);
    benchmark::DoNotOptimize(h);
    ++table_id;
  }
  state.SetItemsProcessed(state.iterations());
  state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_KeyHash)->Arg(16)->Arg(30);

}  // namespace

BENCHMARK_MAIN();
