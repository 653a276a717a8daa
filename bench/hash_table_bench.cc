// Micro-benchmarks for master/hash_table.h: insert, lookup hit and lookup miss at a table
// size that fits the cache (2^16 entries) and one that does not (2^22), both at 75% slot
// load (6 entries per 8-slot bucket on average), as the ObjectManager sizes it. Items/s.
//
// Keys are stood in for by their hashes (splitmix64 of the key number, uniform like
// XXH3) and entry i points at log reference i, so the key comparison the ObjectManager
// does in the log is emulated by comparing the reference with the expected one.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <map>
#include <memory>

#include "master/hash_table.h"

namespace {

using ramkv::master::HashTable;
using ramkv::master::LogRef;

uint64_t mix(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Buckets for `entries` at 75% slot load.
uint64_t buckets_for(uint64_t entries) { return entries / (HashTable::kSlotsPerBucket * 3 / 4); }

// Tables preloaded with entries 0..n-1, shared by the lookup benchmarks of one size.
HashTable& preloaded(uint64_t n) {
  static std::map<uint64_t, std::unique_ptr<HashTable>> tables;
  auto& t = tables[n];
  if (!t) {
    t = std::make_unique<HashTable>(buckets_for(n));
    for (uint64_t i = 0; i < n; ++i) t->insert(mix(i), i);
  }
  return *t;
}

// Fills a table from empty to 75% load, again and again (the refill is not timed): the
// average insert cost over the fill, overflow-bucket allocations included.
void BM_HashTableInsert(benchmark::State& state) {
  const auto n = static_cast<uint64_t>(state.range(0));
  auto table = std::make_unique<HashTable>(buckets_for(n));
  uint64_t i = 0;
  for (auto _ : state) {
    if (i == n) {
      state.PauseTiming();
      table = std::make_unique<HashTable>(buckets_for(n));
      i = 0;
      state.ResumeTiming();
    }
    table->insert(mix(i), i);
    ++i;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_HashTableInsert)->Arg(1 << 16)->Arg(1 << 22);

// Share of buckets with an overflow chain at 75% load, as a counter.
void report_overflow(benchmark::State& state, const HashTable& table) {
  state.counters["overflow_frac"] = static_cast<double>(table.overflow_bucket_count()) /
                                    static_cast<double>(table.bucket_count());
}

// Looks up present entries, in hash (random bucket) order. Successive lookups are
// independent, so the CPU overlaps their cache misses: this is throughput.
void BM_HashTableLookupHit(benchmark::State& state) {
  const auto n = static_cast<uint64_t>(state.range(0));
  HashTable& table = preloaded(n);
  report_overflow(state, table);
  uint64_t i = 0;
  uint64_t missing = 0;
  for (auto _ : state) {
    const uint64_t key = i & (n - 1);
    auto slot = table.find(mix(key), [key](LogRef ref) { return ref == key; });
    benchmark::DoNotOptimize(slot.slot);
    if (!slot) ++missing;
    ++i;
  }
  if (missing != 0) state.SkipWithError("a present entry was not found");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_HashTableLookupHit)->Arg(1 << 16)->Arg(1 << 22);

// As LookupHit, but each key depends on the previous result, so cache misses do not
// overlap: the latency of one lookup, as a request sees it.
void BM_HashTableLookupHitDependent(benchmark::State& state) {
  const auto n = static_cast<uint64_t>(state.range(0));
  HashTable& table = preloaded(n);
  uint64_t key = 0;
  for (auto _ : state) {
    auto slot = table.find(mix(key), [key](LogRef ref) { return ref == key; });
    if (!slot) {
      state.SkipWithError("a present entry was not found");
      break;
    }
    // An odd step: visits every key before repeating.
    key = (slot.ref() + 0x9e3779b97f4a7c15ULL) & (n - 1);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_HashTableLookupHitDependent)->Arg(1 << 16)->Arg(1 << 22);

// Looks up absent keys: the whole chain is scanned; tag collisions call the comparison,
// which fails.
void BM_HashTableLookupMiss(benchmark::State& state) {
  const auto n = static_cast<uint64_t>(state.range(0));
  HashTable& table = preloaded(n);
  report_overflow(state, table);
  uint64_t i = 0;
  uint64_t found = 0;
  for (auto _ : state) {
    const uint64_t key = n + (i & (n - 1));  // never inserted
    auto slot = table.find(mix(key), [key](LogRef ref) { return ref == key; });
    benchmark::DoNotOptimize(slot.slot);
    if (slot) ++found;
    ++i;
  }
  if (found != 0) state.SkipWithError("an absent entry was found");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_HashTableLookupMiss)->Arg(1 << 16)->Arg(1 << 22);

}  // namespace

BENCHMARK_MAIN();
