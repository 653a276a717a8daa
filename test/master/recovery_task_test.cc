// Tests for RecoveryTask (master/recovery_task.h) on its own: a recovery master's pulls of
// a partition's segments. Here the backups are this server's own (set_local_backup), so
// no process is needed; the pulls over RPC, failovers between backups and the reports
// are covered with real processes in test/cluster/recovery_test.cc.
#include <catch2/catch.hpp>

#include <chrono>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "common/checksum.h"
#include "common/clock.h"
#include "common/log_entry.h"
#include "master/object_manager.h"
#include "master/recovery_task.h"
#include "master/tablet_dropper.h"
#include "test/master/object_manager_helpers.h"

namespace ramkv::master {
namespace {

using Bytes = std::vector<std::byte>;

constexpr uint64_t kSelf = 7;
constexpr uint64_t kOther = 8;
constexpr uint64_t kCrashed = 3;
constexpr uint64_t kTable = 1;
// Nobody listens there: an RPC to it fails at once (connection refused).
const std::string kNowhere = "127.0.0.1:1";

Bytes object_entry(std::string_view key, uint64_t version, std::string_view value) {
  std::byte prefix[kMaxObjectPrefixBytes];
  uint32_t n =
      encode_object_prefix(kTable, version, 1234, static_cast<uint32_t>(key.size()), prefix);
  Bytes payload(prefix, prefix + n);
  auto k = std::as_bytes(std::span(key.data(), key.size()));
  auto v = std::as_bytes(std::span(value.data(), value.size()));
  payload.insert(payload.end(), k.begin(), k.end());
  payload.insert(payload.end(), v.begin(), v.end());
  return build_entry(EntryType::kObject, payload);
}

Bytes concat_entries(std::initializer_list<Bytes> entries) {
  Bytes out;
  for (const auto& e : entries) out.insert(out.end(), e.begin(), e.end());
  return out;
}

// A `recover` body: one partition of the whole of kTable, and where each segment lies
// (backup id, in the order to ask).
Bytes recover_body(const std::map<uint64_t, std::vector<uint64_t>>& segments) {
  Bytes body;
  wire::BodyWriter w(&body);
  uint32_t locations = 0;
  for (const auto& [id, backups] : segments) locations += static_cast<uint32_t>(backups.size());
  w.put(wire::RecoverRequest{.recovery_id = 11,
                             .crashed_master_id = kCrashed,
                             .safe_version = 100,
                             .partition_id = 0,
                             .tablet_count = 1,
                             .location_count = locations});
  w.put(wire::TabletWire{.table_id = kTable, .start_hash = 0, .end_hash = UINT64_MAX});
  for (const auto& [id, backups] : segments) {
    for (uint64_t backup : backups) {
      w.put(wire::RecoveryLocation{.segment_id = id,
                                   .backup_id = backup,
                                   .locator_bytes = static_cast<uint32_t>(kNowhere.size())});
      w.put_bytes(kNowhere);
    }
  }
  return body;
}

// Runs the task's loop until `done` or about 5 s.
template <typename Done>
bool run_until(RecoveryTask& task, Done done) {
  for (int i = 0; i < 500 && !done(); ++i) {
    uint64_t wait = task.run();
    if (wait > 0 && !done()) {
      std::this_thread::sleep_for(std::chrono::nanoseconds(std::min<uint64_t>(wait, 10'000'000)));
    }
  }
  return done();
}

}  // namespace

TEST_CASE("recovery task: segments our own backup holds come by a call, not an RPC",
          "[master][recovery_task]") {
  auto objects = testing::make(testing::small_config(false));
  RecoveryTask task({.coordinator = kNowhere, .retry_ns = 1'000'000}, *objects, nullptr);
  task.set_server_id(kSelf);
  std::map<uint64_t, int> asked;  // segment -> local calls
  // Runs of entries where they lie in the backup's memory: segment 1's in two pieces.
  std::map<uint64_t, std::vector<Bytes>> held = {
      {1,
       {concat_entries({object_entry("a", 5, "apple")}),
        concat_entries({object_entry("b", 6, "bean")})}},
      {2, {concat_entries({object_entry("a", 9, "apricot")})}}};
  auto bytes_of = [&](uint64_t segment) {
    size_t n = 0;
    for (const auto& piece : held.at(segment)) n += piece.size();
    return n;
  };
  task.set_local_backup([&](const wire::GetRecoveryDataRequest& r, wire::RecoveryDataResponse* head,
                            std::vector<std::span<const std::byte>>* pieces) {
    CHECK(r.master_id == kCrashed);
    CHECK(r.recovery_id == 11);
    CHECK(r.partition_id == 0);
    if (++asked[r.segment_id] == 1 && r.segment_id == 2) return Status::kRetry;  // not read yet
    const auto& runs = held.at(r.segment_id);
    *head = {.epoch = 1,
             .entry_bytes = static_cast<uint32_t>(bytes_of(r.segment_id)),
             .entry_count = static_cast<uint32_t>(runs.size())};
    pieces->assign(runs.begin(), runs.end());
    return Status::kOk;
  });
  // Segment 1 on us alone; segment 2 on us first, another backup second.
  REQUIRE(task.start(recover_body({{1, {kSelf}}, {2, {kSelf, kOther}}})) == Status::kOk);
  REQUIRE(run_until(task, [&] { return task.stats().segments_local == 2; }));
  CHECK(asked[1] == 1);
  CHECK(asked[2] == 2);  // asked again after kRetry, from us again
  CHECK(task.stats().segments_remote == 0);
  CHECK(task.stats().bytes_pulled_remote == 0);
  CHECK(task.stats().bytes_pulled == bytes_of(1) + bytes_of(2));
  CHECK(task.stats().objects_replayed == 3);
  std::string value;
  auto version = objects->read(kTable, "a", &value);
  REQUIRE(version.ok());
  CHECK(*version == 9);  // the newest version wins, whichever segment came first
  CHECK(value == "apricot");
  REQUIRE(objects->read(kTable, "b", &value).ok());
  CHECK(value == "bean");
}

TEST_CASE("recovery task: a segment our own backup fails goes to the next backup listed",
          "[master][recovery_task]") {
  auto objects = testing::make(testing::small_config(false));
  RecoveryTask task({.coordinator = kNowhere}, *objects, nullptr);
  task.set_server_id(kSelf);
  int calls = 0;
  task.set_local_backup([&](const wire::GetRecoveryDataRequest&, wire::RecoveryDataResponse*,
                            std::vector<std::span<const std::byte>>*) {
    ++calls;
    return Status::kIoError;
  });
  // The other backup is unreachable too: the partition fails as incomplete, after one
  // local call and one RPC.
  REQUIRE(task.start(recover_body({{4, {kSelf, kOther}}})) == Status::kOk);
  REQUIRE(run_until(task, [&] { return task.stats().partitions_failed == 1; }));
  CHECK(calls == 1);
  CHECK(task.stats().segments_local == 0);
}

TEST_CASE("recovery task: a failed partition's objects go through the dropper",
          "[master][recovery_task]") {
  auto objects = testing::make(testing::small_config(false));
  TabletDropper dropper(*objects, {.objects_per_run = 1});
  RecoveryTask task({.coordinator = kNowhere}, *objects, nullptr);
  task.set_server_id(kSelf);
  task.set_dropper(&dropper);
  const Bytes first = concat_entries({object_entry("a", 5, "apple"), object_entry("b", 6, "bean")});
  task.set_local_backup([&](const wire::GetRecoveryDataRequest& r, wire::RecoveryDataResponse* head,
                            std::vector<std::span<const std::byte>>* pieces) {
    if (r.segment_id != 1) return Status::kIoError;
    *head = {.epoch = 1, .entry_bytes = static_cast<uint32_t>(first.size()), .entry_count = 2};
    pieces->assign({std::span<const std::byte>(first)});
    return Status::kOk;
  });
  // Segment 1 replays; segment 2 can be had from nobody: the partition fails.
  REQUIRE(task.start(recover_body({{1, {kSelf}}, {2, {kSelf}}})) == Status::kOk);
  REQUIRE(run_until(task, [&] { return task.stats().partitions_failed == 1; }));
  CHECK(task.stats().objects_replayed == 2);
  // What was replayed is queued, not removed inside the loop's pass; the dropper removes it.
  CHECK(dropper.pending() == 1);
  std::string value;
  int passes = 0;
  while (dropper.run() != UINT64_MAX && passes < 1000) ++passes;
  CHECK(passes >= 1);
  CHECK(dropper.objects_removed() == 2);
  CHECK(objects->read(kTable, "a", &value).status() == Status::kObjectNotFound);
  CHECK(objects->read(kTable, "b", &value).status() == Status::kObjectNotFound);
}

TEST_CASE("recovery task: a partition is never dropped over tablets this master owns",
          "[master][recovery_task]") {
  auto objects = testing::make(testing::small_config(false));
  TabletDropper dropper(*objects, {});
  TabletSet owned;
  RecoveryTask task({.coordinator = kNowhere}, *objects, nullptr);
  task.set_server_id(kSelf);
  task.set_dropper(&dropper);
  task.set_owned(&owned);
  const Bytes first = concat_entries({object_entry("a", 5, "apple")});
  task.set_local_backup([&](const wire::GetRecoveryDataRequest& r, wire::RecoveryDataResponse* head,
                            std::vector<std::span<const std::byte>>* pieces) {
    if (r.segment_id != 1) return Status::kIoError;
    *head = {.epoch = 1, .entry_bytes = static_cast<uint32_t>(first.size()), .entry_count = 1};
    pieces->assign({std::span<const std::byte>(first)});
    return Status::kOk;
  });
  // The keys are this master's (as after the coordinator moved the partition here and the
  // answer to the report was lost): a failure later must not remove them.
  owned.add(kTable, {0, UINT64_MAX});
  REQUIRE(task.start(recover_body({{1, {kSelf}}, {2, {kSelf}}})) == Status::kOk);
  REQUIRE(run_until(task, [&] { return task.stats().partitions_failed == 1; }));
  CHECK(dropper.pending() == 0);
  std::string value;
  CHECK(objects->read(kTable, "a", &value).ok());
}

TEST_CASE("recovery task: without a local backup, our own id is asked by RPC like any other",
          "[master][recovery_task]") {
  auto objects = testing::make(testing::small_config(false));
  RecoveryTask task({.coordinator = kNowhere}, *objects, nullptr);
  task.set_server_id(kSelf);
  REQUIRE(task.start(recover_body({{4, {kSelf}}})) == Status::kOk);
  // The RPC to kNowhere fails: no backup could give the segment.
  REQUIRE(run_until(task, [&] { return task.stats().partitions_failed == 1; }));
  CHECK(task.stats().segments_local == 0);
}

}  // namespace ramkv::master
