// A randomized model test of master/object_manager.h: tens of thousands of mixed
// operations (writes, conditional writes, removes, increments, reads) on a few hundred
// keys in three tables, in a memory small enough that the cleaner thread runs all the
// time, each checked against a std::map. Deterministic per seed (the cleaner's timing is
// not, which is the point); set RAMKV_MODEL_SEED to replay or explore another seed. At
// the end the master "crashes": its log, replayed into a fresh master as a recovery
// would, must give the model again (no removed or overwritten version comes back).
#include <catch2/catch.hpp>

#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/segment_iterator.h"
#include "master/object_manager.h"

namespace ramkv::master {
namespace {

struct ModelObject {
  std::string value;
  uint64_t version = 0;
};
using Model = std::map<std::pair<uint64_t, std::string>, ModelObject>;

uint64_t model_seed() {
  if (const char* env = std::getenv("RAMKV_MODEL_SEED"); env != nullptr && *env != '\0') {
    return std::strtoull(env, nullptr, 0);
  }
  return 0x5eed'2024'0601ULL;
}

std::string status_text(Status s) { return std::string(status_name(s)); }

// The outcome the reject rules give against the model's object (nullptr = none).
Status expected_by_rules(const RejectRules* rules, const ModelObject* current) {
  return check_reject_rules(rules, current != nullptr ? current->version : 0);
}

struct ModelParams {
  int ops = 40'000;
  uint64_t tables = 3;
  uint64_t keys_per_table = 100;
  uint64_t max_value = 600;
  uint64_t memory_bytes = 2u << 20;
  // Near-full memory: writes may be refused (kRetry, kNoSpace), and must then change
  // nothing; otherwise a refusal fails the test.
  bool may_run_out = false;
};

// The master crashes now: every segment of its log, as its backups hold them, replayed
// into a fresh master (in reverse order, as a recovery may get them) gives the model.
void check_recovery(ObjectManager& om, MasterConfig config, const Model& model) {
  om.cleaner().stop();  // the log stands still while it is read
  std::vector<std::vector<std::byte>> segments;
  for (uint64_t id : om.log().segment_ids()) {
    auto copy = om.log().copy_segment(id);
    REQUIRE(copy.has_value());
    REQUIRE(SegmentIterator(copy->bytes, copy->certificate).validate() == Status::kOk);
    segments.push_back(std::move(copy->bytes));
  }
  config.memory_bytes *= 4;  // room for every version replayed, newest or not
  config.cleaner_thread = false;
  auto created = ObjectManager::create(config);
  REQUIRE(created.ok());
  ObjectManager& recovered = **created;
  const auto accept_all = [](uint64_t, uint64_t) { return true; };
  for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
    REQUIRE(recovered.replay(*it, accept_all, nullptr) == Status::kOk);
  }
  std::vector<TabletRange> tablets;
  for (uint64_t table = 1; table <= 4; ++table) tablets.push_back({.table_id = table});
  recovered.finish_replay(tablets, 0);
  CHECK(recovered.stats().object_count == model.size());
  std::string out;
  for (const auto& [id, obj] : model) {
    INFO("recovered table " << id.first << " key " << id.second);
    auto read = recovered.read(id.first, id.second, &out);
    REQUIRE(read.ok());
    CHECK(*read == obj.version);
    CHECK(out == obj.value);
  }
  // Nothing else: each table holds exactly the model's keys.
  for (uint64_t table = 1; table <= 4; ++table) {
    std::vector<ObjectManager::Object> all;
    uint64_t cursor = 0;
    for (uint64_t calls = 0; cursor != recovered.end_cursor() && calls <= recovered.end_cursor();
         ++calls) {
      auto next = recovered.enumerate(table, cursor, 64, &all);
      REQUIRE(next.ok());
      cursor = *next;
    }
    for (const auto& o : all) {
      INFO("recovered table " << table << " key " << o.key << " version " << o.version);
      CHECK(model.count({table, o.key}) == 1);
    }
  }
}

void run_model(uint64_t seed, const ModelParams& p) {
  INFO("seed " << seed << " (replay with RAMKV_MODEL_SEED=" << seed << ")");
  const uint64_t kTables = p.tables;
  const uint64_t kKeysPerTable = p.keys_per_table;
  const uint64_t kMaxValue = p.max_value;
  int kOps = p.ops;
  if (const char* env = std::getenv("RAMKV_MODEL_OPS"); env != nullptr && *env != '\0') {
    kOps = std::atoi(env);
  }

  MasterConfig config;
  config.memory_bytes = p.memory_bytes;
  config.segment_bytes = 64u << 10;
  config.seglet_bytes = 4u << 10;
  config.max_key_bytes = 1024;
  config.max_value_bytes = 8192;
  config.prefault_memory = false;
  config.lock_stripes = 64;
  if (p.may_run_out) config.write_wait_for_cleaner_ns = 20'000'000;
  auto created = ObjectManager::create(config);
  REQUIRE(created.ok());
  ObjectManager& om = **created;

  Random rng(seed);
  Model model;
  uint64_t last_version = 0;
  uint64_t retries = 0;
  uint64_t refused = 0;  // mutations refused for want of memory
  std::string out;
  int op = 0;

  auto fail = [&](const std::string& what) {
    FAIL("seed " << seed << ", operation " << op << ": " << what);
  };
  // A new version must be above every version issued before (one thread here).
  auto check_new_version = [&](uint64_t version) {
    if (version <= last_version) {
      fail("version " + std::to_string(version) + " not above " + std::to_string(last_version));
    }
    last_version = version;
  };
  // Runs a mutation, retrying while the cleaner makes room; nothing happens on kRetry.
  // Returns nullopt when memory stayed full (allowed only if p.may_run_out).
  auto with_retries = [&](auto&& mutation) -> std::optional<decltype(mutation())> {
    auto r = mutation();
    for (int i = 0; i < (p.may_run_out ? 3 : 200) && r.status() == Status::kRetry; ++i) {
      ++retries;
      r = mutation();
    }
    if (r.status() == Status::kRetry || r.status() == Status::kNoSpace) {
      if (!p.may_run_out) fail("out of memory with little live data: " + status_text(r.status()));
      ++refused;
      return std::nullopt;
    }
    return r;
  };
  // Random reject rules that pass or fail against the current object about half the time.
  auto random_rules = [&](const ModelObject* current) {
    RejectRules rules;
    uint64_t v = current != nullptr ? current->version : 0;
    switch (rng.uniform(5)) {
      case 0:
        rules.doesnt_exist = true;
        break;
      case 1:
        rules.exists = true;
        break;
      case 2:
        rules.version_le_given = true;
        rules.given_version = v == 0 ? rng.uniform(2) : v - 1 + rng.uniform(3);
        break;
      case 3:
        rules.version_ne_given = true;
        rules.given_version = rng.uniform(2) == 0 ? v : v + 1;
        break;
      default:
        rules.doesnt_exist = true;
        rules.version_ne_given = true;
        rules.given_version = rng.uniform(2) == 0 ? v : v + 1;
        break;
    }
    return rules;
  };

  for (op = 0; op < kOps; ++op) {
    uint64_t table = 1 + rng.uniform(kTables);
    // Keys of varied length; the same names in every table.
    uint64_t k = rng.uniform(kKeysPerTable);
    std::string key = "key" + std::to_string(k) + std::string(k % 13, '_');
    auto id = std::make_pair(table, key);
    auto it = model.find(id);
    const ModelObject* current = it != model.end() ? &it->second : nullptr;
    uint64_t kind = rng.uniform(100);

    if (kind < 30 || (kind < 40 && current == nullptr)) {
      // Unconditional write.
      std::string value(static_cast<size_t>(rng.uniform(kMaxValue + 1)),
                        static_cast<char>('a' + op % 26));
      if (value.size() >= 8) std::memcpy(value.data(), &op, sizeof(op));
      auto maybe = with_retries([&] { return om.write(table, key, value); });
      if (!maybe) continue;
      auto& w = *maybe;
      if (!w.ok()) fail("write: " + status_text(w.status()));
      check_new_version(*w);
      model[id] = {value, *w};
    } else if (kind < 40) {
      // Conditional write.
      RejectRules rules = random_rules(current);
      Status expected = expected_by_rules(&rules, current);
      std::string value(static_cast<size_t>(rng.uniform(kMaxValue + 1)), 'c');
      auto maybe = with_retries([&] { return om.write(table, key, value, &rules); });
      if (!maybe) continue;
      auto& w = *maybe;
      if (w.status() != expected) {
        fail("conditional write gave " + status_text(w.status()) + ", expected " +
             status_text(expected));
      }
      if (w.ok()) {
        check_new_version(*w);
        model[id] = {value, *w};
      }
    } else if (kind < 50) {
      // Remove, conditional half the time.
      std::optional<RejectRules> rules;
      if (rng.uniform(2) == 0) rules = random_rules(current);
      const RejectRules* r = rules ? &*rules : nullptr;
      Status expected = expected_by_rules(r, current);
      auto maybe = with_retries([&] { return om.remove(table, key, r); });
      if (!maybe) continue;
      auto& removed = *maybe;
      if (removed.status() != expected) {
        fail("remove gave " + status_text(removed.status()) + ", expected " +
             status_text(expected));
      }
      if (removed.ok()) {
        uint64_t want = current != nullptr ? current->version : 0;
        if (*removed != want) fail("remove returned the wrong version");
        model.erase(id);
      }
    } else if (kind < 60) {
      // Increment; on a value that is not 8 bytes it must fail and change nothing.
      auto delta = static_cast<int64_t>(rng.uniform(2001)) - 1000;
      std::optional<RejectRules> rules;
      if (rng.uniform(4) == 0) rules = random_rules(current);
      const RejectRules* r = rules ? &*rules : nullptr;
      Status expected = expected_by_rules(r, current);
      if (expected == Status::kOk && current != nullptr && current->value.size() != 8) {
        expected = Status::kInvalidObject;
      }
      auto maybe = with_retries([&] { return om.increment(table, key, delta, r); });
      if (!maybe) continue;
      auto& inc = *maybe;
      if (inc.status() != expected) {
        fail("increment gave " + status_text(inc.status()) + ", expected " + status_text(expected));
      }
      if (inc.ok()) {
        int64_t before = 0;
        if (current != nullptr) std::memcpy(&before, current->value.data(), 8);
        auto want =
            static_cast<int64_t>(static_cast<uint64_t>(before) + static_cast<uint64_t>(delta));
        if (inc->value != want) fail("increment computed the wrong value");
        check_new_version(inc->version);
        std::string value(8, '\0');
        std::memcpy(value.data(), &want, 8);
        model[id] = {value, inc->version};
      }
    } else {
      // Read, with rules now and then.
      std::optional<RejectRules> rules;
      if (rng.uniform(5) == 0) rules = random_rules(current);
      const RejectRules* r = rules ? &*rules : nullptr;
      Status expected = expected_by_rules(r, current);
      if (expected == Status::kOk && current == nullptr) expected = Status::kObjectNotFound;
      out.clear();
      auto read = om.read(table, key, &out, r);
      if (read.status() != expected) {
        fail("read of table " + std::to_string(table) + " key " + key + " gave " +
             status_text(read.status()) + ", expected " + status_text(expected));
      }
      if (read.ok()) {
        if (*read != current->version) fail("read the wrong version of " + key);
        if (out != current->value) fail("read the wrong value of " + key);
      }
    }
  }

  // Everything, compared at the end: reads, enumeration and statistics.
  uint64_t user_bytes = 0;
  for (const auto& [id, obj] : model) {
    INFO("table " << id.first << " key " << id.second);
    auto read = om.read(id.first, id.second, &out);
    REQUIRE(read.ok());
    CHECK(*read == obj.version);
    CHECK(out == obj.value);
    user_bytes += id.second.size() + obj.value.size();
  }
  for (uint64_t table = 1; table <= kTables + 1; ++table) {
    INFO("table " << table);
    std::map<std::string, ModelObject> listed;
    uint64_t cursor = 0;
    for (uint64_t calls = 0; cursor != om.end_cursor() && calls <= om.end_cursor(); ++calls) {
      std::vector<ObjectManager::Object> batch;
      auto next = om.enumerate(table, cursor, 17, &batch);
      REQUIRE(next.ok());
      cursor = *next;
      for (auto& o : batch) {
        CHECK(listed.count(o.key) == 0);
        listed[o.key] = {o.value, o.version};
      }
    }
    CHECK(cursor == om.end_cursor());
    size_t expected_count = 0;
    for (const auto& [id, obj] : model) {
      if (id.first != table) continue;
      ++expected_count;
      auto found = listed.find(id.second);
      INFO("key " << id.second);
      REQUIRE(found != listed.end());
      CHECK(found->second.value == obj.value);
      CHECK(found->second.version == obj.version);
    }
    CHECK(listed.size() == expected_count);
  }
  auto stats = om.stats();
  CHECK(stats.object_count == model.size());
  CHECK(stats.user_bytes == user_bytes);
  INFO("compactions " << stats.cleaner.compactions << ", combined passes "
                      << stats.cleaner.combined_passes << ", retries " << retries << ", refused "
                      << refused << ", appended " << stats.log.appended_bytes);
  CHECK(stats.cleaner.compactions + stats.cleaner.combined_passes > 0);
  if (p.may_run_out) {
    CHECK(refused > 0);  // the test did reach a full memory
  } else {
    CHECK(refused == 0);
    CHECK(stats.log.appended_bytes > 2 * stats.log.memory_bytes);  // memory was reused
  }
  check_recovery(om, config, model);
}

}  // namespace

TEST_CASE("model: random operations with the cleaner running agree with a map", "[master][model]") {
  // A few seeds: each run is well under a second in an optimised build.
  const uint64_t seed = model_seed();
  for (uint64_t i = 0; i < 3; ++i) run_model(seed + i, {});
}

TEST_CASE("model: near-full memory refuses writes cleanly and loses nothing", "[master][model]") {
  // About 7,000 objects of up to 600 bytes do not all fit 2 MiB.
  ModelParams p;
  p.ops = 60'000;
  p.keys_per_table = 2400;
  p.may_run_out = true;
  if (const char* env = std::getenv("RAMKV_MODEL_KEYS"); env != nullptr && *env != '\0') {
    p.keys_per_table = std::strtoull(env, nullptr, 0);
  }
  run_model(model_seed(), p);
}

}  // namespace ramkv::master
