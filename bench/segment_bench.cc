// Micro-benchmarks for master/segment.h and the object entry encoding: appending object
// entries (prefix, 16-byte key, value) to an 8 MiB segment of 64 KiB seglets, and
// encoding an object's prefix. Bytes/s count whole entries (header included).
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/checksum.h"
#include "common/log_entry.h"
#include "master/seglet_pool.h"
#include "master/segment.h"

namespace {

using ramkv::EntryType;
using ramkv::master::SegletPool;
using ramkv::master::Segment;

constexpr uint32_t kSegmentBytes = 8u << 20;
constexpr uint32_t kSegletBytes = 64u << 10;
constexpr uint32_t kKeyBytes = 16;

// One prefaulted pool for the whole run: two segments' worth of seglets, so a fresh
// segment never waits for the old one's seglets.
SegletPool& pool() {
  static std::unique_ptr<SegletPool> p = [] {
    auto r = SegletPool::create({.memory_bytes = 2ULL * kSegmentBytes,
                                 .seglet_bytes = kSegletBytes,
                                 .reserve_seglets = 0,
                                 .prefault = true});
    return std::move(r).value();
  }();
  return *p;
}

// Appends object entries with a state.range(0)-byte value until the segment is full,
// then starts a fresh one (untimed). The append checksums the payload and copies it.
void BM_SegmentAppend(benchmark::State& state) {
  const auto value_bytes = static_cast<size_t>(state.range(0));
  const std::string key(kKeyBytes, 'k');
  const std::string value(value_bytes, 'v');
  std::byte prefix[ramkv::kMaxObjectPrefixBytes];
  uint64_t version = 1;
  uint64_t segment_id = 1;
  auto segment = std::make_unique<Segment>(
      pool(), Segment::Options{.id = segment_id, .capacity = kSegmentBytes});
  uint64_t entry_bytes_total = 0;
  uint64_t failures = 0;
  for (auto _ : state) {
    uint32_t prefix_bytes = ramkv::encode_object_prefix(1, version++, 0, kKeyBytes, prefix);
    const std::span<const std::byte> pieces[] = {
        {prefix, prefix_bytes}, ramkv::as_bytes(key), ramkv::as_bytes(value)};
    const auto payload = static_cast<uint32_t>(prefix_bytes + kKeyBytes + value_bytes);
    if (!segment->fits(payload)) {
      state.PauseTiming();
      segment.reset();  // gives the seglets back first
      segment = std::make_unique<Segment>(
          pool(), Segment::Options{.id = ++segment_id, .capacity = kSegmentBytes});
      state.ResumeTiming();
    }
    auto offset = segment->append(EntryType::kObject, pieces);
    benchmark::DoNotOptimize(offset);
    if (!offset.ok()) ++failures;
    entry_bytes_total += ramkv::entry_bytes(payload);
  }
  if (failures != 0) state.SkipWithError("an append failed");
  state.SetItemsProcessed(state.iterations());
  state.SetBytesProcessed(static_cast<int64_t>(entry_bytes_total));
}
BENCHMARK(BM_SegmentAppend)->Arg(100)->Arg(1 << 10)->Arg(10 << 10);

// Encodes an object's metadata (table id, version, timestamp, key length) as varints.
void BM_EncodeObjectPrefix(benchmark::State& state) {
  std::byte out[ramkv::kMaxObjectPrefixBytes];
  uint64_t version = 1ULL << 20;  // a 3-byte varint, as after a million writes
  uint32_t timestamp = 1'700'000'000;
  for (auto _ : state) {
    uint32_t n = ramkv::encode_object_prefix(7, version++, timestamp, kKeyBytes, out);
    benchmark::DoNotOptimize(n);
    benchmark::DoNotOptimize(out);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_EncodeObjectPrefix);

}  // namespace

BENCHMARK_MAIN();
