// Micro-benchmarks for master/object_manager.h: overwrites and read hits of random keys
// from a preloaded set (16-byte keys, 100-byte values), on one thread, with the cleaner
// thread running as in a master. MasterConfig: 256 MiB of log memory, defaults otherwise.
// Items/s. state.range(0) is the number of keys.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "master/master_config.h"
#include "master/object_manager.h"

namespace {

using ramkv::Status;
using ramkv::master::MasterConfig;
using ramkv::master::ObjectManager;

constexpr uint64_t kTableId = 1;
constexpr size_t kValueBytes = 100;

// An ObjectManager preloaded with `key_count` keys, shared by the benchmarks of one key
// count and kept for the whole run.
struct Env {
  std::unique_ptr<ObjectManager> om;
  std::vector<std::string> keys;
  std::string value;
};

Env* env_for(int64_t key_count) {
  static std::map<int64_t, std::unique_ptr<Env>> envs;
  if (auto it = envs.find(key_count); it != envs.end()) return it->second.get();
  MasterConfig config;
  config.memory_bytes = 256ULL << 20;
  auto om = ObjectManager::create(config);
  if (!om.ok()) return nullptr;
  auto e = std::make_unique<Env>();
  e->om = std::move(om).value();
  e->value.assign(kValueBytes, 'v');
  e->keys.reserve(static_cast<size_t>(key_count));
  char buf[32];
  for (int64_t i = 0; i < key_count; ++i) {
    std::snprintf(buf, sizeof buf, "key-%012lld", static_cast<long long>(i));  // 16 bytes
    e->keys.emplace_back(buf);
    if (!e->om->write(kTableId, e->keys.back(), e->value).ok()) return nullptr;
  }
  return (envs[key_count] = std::move(e)).get();
}

// xorshift64: cheap key choice inside the timed loop.
uint64_t next_random(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

void BM_ObjectManagerWrite(benchmark::State& state) {
  Env* env = env_for(state.range(0));
  if (env == nullptr) {
    state.SkipWithError("cannot create or preload the ObjectManager");
    return;
  }
  const uint64_t n = env->keys.size();
  uint64_t rng = 0x9e3779b97f4a7c15ULL;
  uint64_t retries = 0;
  uint64_t failures = 0;
  for (auto _ : state) {
    const std::string& key = env->keys[next_random(rng) % n];
    auto version = env->om->write(kTableId, key, env->value);
    benchmark::DoNotOptimize(version);
    if (!version.ok()) {
      if (version.status() == Status::kRetry) {
        ++retries;
      } else {
        ++failures;
      }
    }
  }
  if (failures != 0) state.SkipWithError("a write failed");
  state.SetItemsProcessed(state.iterations());
  state.counters["retries"] = static_cast<double>(retries);
}
BENCHMARK(BM_ObjectManagerWrite)->Arg(10'000)->Arg(100'000);

void BM_ObjectManagerRead(benchmark::State& state) {
  Env* env = env_for(state.range(0));
  if (env == nullptr) {
    state.SkipWithError("cannot create or preload the ObjectManager");
    return;
  }
  const uint64_t n = env->keys.size();
  uint64_t rng = 0x2545f4914f6cdd1dULL;
  uint64_t failures = 0;
  std::string value;
  for (auto _ : state) {
    const std::string& key = env->keys[next_random(rng) % n];
    auto version = env->om->read(kTableId, key, &value);
    benchmark::DoNotOptimize(version);
    if (!version.ok()) ++failures;
  }
  if (failures != 0) state.SkipWithError("a read missed");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_ObjectManagerRead)->Arg(10'000)->Arg(100'000);

}  // namespace

BENCHMARK_MAIN();
