// plan_recovery: completeness of a crashed master's log from the backups' answers, the
// replicas recovery may read, and the partitions (docs/recovery.md, steps 2-4).
#include "coordinator/recovery_plan.h"

#include <catch2/catch.hpp>

#include <map>

namespace ramkv::coordinator {
namespace {

constexpr uint64_t kMaster = make_server_id(1, 1);

wire::ReplicaEntry replica(uint64_t segment, uint64_t epoch, bool closed,
                           uint8_t status = wire::kReplicaOk, bool found_on_disk = false) {
  return wire::ReplicaEntry{.master_id = kMaster,
                            .segment_id = segment,
                            .epoch = epoch,
                            .certificate_bytes = 100,
                            .closed = static_cast<uint8_t>(closed),
                            .status = status,
                            .found_on_disk = static_cast<uint8_t>(found_on_disk)};
}

// A backup's answer; the digest (of `head`) when `digest` is not empty.
BackupAnswer answer(uint64_t backup, std::vector<wire::ReplicaEntry> replicas,
                    std::vector<uint64_t> digest = {}, uint64_t head = 0,
                    std::vector<wire::TableStatWire> stats = {}) {
  BackupAnswer a;
  a.backup_id = backup;
  a.locator = "127.0.0.1:" + std::to_string(9000 + backup);
  a.replicas = std::move(replicas);
  a.header.replica_count = static_cast<uint32_t>(a.replicas.size());
  a.header.digest_count = static_cast<uint32_t>(digest.size());
  a.header.digest_segment_id = head;
  a.header.safe_version = 77;
  a.digest = std::move(digest);
  a.table_stats = std::move(stats);
  a.header.table_stat_count = static_cast<uint32_t>(a.table_stats.size());
  return a;
}

std::vector<Tablet> whole_table(uint64_t table) { return {Tablet{table, 0, UINT64_MAX, kMaster}}; }

// The pieces of every partition tile the given tablets exactly.
void check_tiles(const RecoveryPlan& plan, const std::vector<Tablet>& tablets) {
  std::vector<Tablet> all;
  for (const auto& p : plan.partitions) {
    CHECK_FALSE(p.tablets.empty());
    all.insert(all.end(), p.tablets.begin(), p.tablets.end());
  }
  std::sort(all.begin(), all.end(), [](const Tablet& a, const Tablet& b) {
    return std::tie(a.table_id, a.start_hash) < std::tie(b.table_id, b.start_hash);
  });
  size_t i = 0;
  for (const auto& t : tablets) {
    uint64_t next = t.start_hash;
    bool ended = false;
    while (i < all.size() && all[i].table_id == t.table_id && !ended) {
      if (all[i].start_hash < t.start_hash || all[i].start_hash > t.end_hash) break;
      CHECK(all[i].start_hash == next);
      CHECK(all[i].server_id == kMaster);
      ended = all[i].end_hash == t.end_hash;
      next = all[i].end_hash + 1;
      ++i;
    }
    CHECK(ended);
  }
  CHECK(i == all.size());
}

}  // namespace

TEST_CASE("recovery plan: a complete log gives every segment's replicas, closed first",
          "[coordinator][recovery]") {
  std::vector<BackupAnswer> answers = {
      answer(2, {replica(1, 1, true), replica(2, 1, false), replica(3, 1, false)}, {1, 2, 3}, 3),
      answer(3, {replica(1, 1, true), replica(2, 1, true), replica(3, 1, false)}, {1, 2, 3}, 3),
      answer(4, {}),
  };
  std::string error;
  auto plan = plan_recovery(kMaster, whole_table(5), answers, std::nullopt, {}, &error);
  REQUIRE(plan.ok());
  CHECK(plan->digest_segment_id == 3);
  CHECK(plan->safe_version == 77);
  REQUIRE(plan->locations.size() == 3);
  CHECK(plan->locations[1].size() == 2);
  // Segment 2: the closed replica on backup 3 comes first.
  REQUIRE(plan->locations[2].size() == 2);
  CHECK(plan->locations[2][0].first == 3);
  CHECK(plan->locations[2][0].second == "127.0.0.1:9003");
  CHECK(plan->locations[3].size() == 2);
  REQUIRE(plan->partitions.size() == 1);
  check_tiles(*plan, whole_table(5));
}

TEST_CASE("recovery plan: a segment without a usable replica stops recovery and is named",
          "[coordinator][recovery]") {
  std::string error;
  SECTION("a segment of the digest is nowhere") {
    std::vector<BackupAnswer> answers = {
        answer(2, {replica(1, 1, true), replica(3, 1, false)}, {1, 2, 3}, 3)};
    auto plan = plan_recovery(kMaster, whole_table(5), answers, std::nullopt, {}, &error);
    CHECK(plan.status() == Status::kIncomplete);
    CHECK(error.find("segment 2 ") != std::string::npos);
  }
  SECTION("its only replica is torn or corrupt") {
    std::vector<BackupAnswer> answers = {answer(
        2, {replica(1, 1, true, wire::kReplicaCorrupt), replica(3, 1, false, wire::kReplicaTorn)},
        {1, 3}, 3)};
    auto plan = plan_recovery(kMaster, whole_table(5), answers, std::nullopt, {}, &error);
    CHECK(plan.status() == Status::kIncomplete);
    CHECK(error.find("segments 1, 3") != std::string::npos);
  }
  SECTION("the newest segment is closed everywhere: its successor is missing") {
    std::vector<BackupAnswer> answers = {
        answer(2, {replica(1, 1, true), replica(2, 1, true)}, {1, 2}, 2)};
    auto plan = plan_recovery(kMaster, whole_table(5), answers, std::nullopt, {}, &error);
    CHECK(plan.status() == Status::kIncomplete);
    CHECK(error.find("closed on every backup") != std::string::npos);
  }
  SECTION("no backup has anything") {
    auto plan = plan_recovery(kMaster, whole_table(5), {answer(2, {})}, std::nullopt, {}, &error);
    CHECK(plan.status() == Status::kIncomplete);
    CHECK(error.find("no backup holds") != std::string::npos);
  }
}

TEST_CASE("recovery plan: open replicas below the recorded epoch are stale",
          "[coordinator][recovery]") {
  const ReplicationEpoch recorded{.segment_id = 3, .epoch = 2};
  std::string error;
  // The head's only open replica predates the epoch raise: recovery must not use it.
  std::vector<BackupAnswer> stale = {
      answer(2, {replica(1, 1, true), replica(3, 1, false)}, {1, 3}, 3)};
  CHECK(plan_recovery(kMaster, whole_table(5), stale, recorded, {}, &error).status() ==
        Status::kIncomplete);
  // With a replica at the new epoch it is used, and only it.
  auto fresh = stale;
  fresh.push_back(answer(4, {replica(3, 2, false)}, {1, 3}, 3));
  auto plan = plan_recovery(kMaster, whole_table(5), fresh, recorded, {}, &error);
  REQUIRE(plan.ok());
  REQUIRE(plan->locations[3].size() == 1);
  CHECK(plan->locations[3][0].first == 4);
  // Below the recorded segment an open replica counts only without a closed one, at the
  // highest epoch, and not if a restarted backup found it on disk.
  std::vector<BackupAnswer> older = {
      answer(2, {replica(1, 1, false), replica(3, 2, false)}, {1, 3}, 3),
      answer(4, {replica(1, 2, false), replica(3, 2, false)}, {1, 3}, 3),
      answer(5, {replica(1, 2, false, wire::kReplicaOk, true)}),
  };
  plan = plan_recovery(kMaster, whole_table(5), older, recorded, {}, &error);
  REQUIRE(plan.ok());
  REQUIRE(plan->locations[1].size() == 1);
  CHECK(plan->locations[1][0].first == 4);
}

TEST_CASE("recovery plan: without a closed replica, the longest open ones are read first",
          "[coordinator][recovery]") {
  // Segment 1 was closed in memory and whole on backups 3 and 4 when its writes were
  // acknowledged; backup 2 holds the shorter copy its master gave up on (backup 2 stopped
  // answering) without raising the epoch. None is closed yet: the master crashed first.
  auto with_bytes = [](wire::ReplicaEntry r, uint32_t bytes) {
    r.certificate_bytes = bytes;
    return r;
  };
  std::vector<BackupAnswer> answers = {
      answer(2, {with_bytes(replica(1, 1, false), 60)}),
      answer(3, {with_bytes(replica(1, 1, false), 100), replica(2, 1, false)}, {1, 2}, 2),
      answer(4, {with_bytes(replica(1, 1, false), 100), replica(2, 1, false)}, {1, 2}, 2),
  };
  std::string error;
  auto plan = plan_recovery(kMaster, whole_table(5), answers, std::nullopt, {}, &error);
  REQUIRE(plan.ok());
  const auto& where = plan->locations[1];
  REQUIRE(where.size() == 3);
  // The primary (first) is a whole copy, and so is the first fallback; the short copy
  // comes last, though backup 2 has the lowest id and no primaries.
  CHECK(where[0].first != 2);
  CHECK(where[1].first != 2);
  CHECK(where[2].first == 2);
  for (const auto& [backup, segments] : plan->primaries) {
    if (backup == 2) CHECK(segments.empty());
  }
}

TEST_CASE("recovery plan: partitions are sized from the table statistics and tile the tablets",
          "[coordinator][recovery]") {
  const uint64_t gib = 1ull << 30;
  auto with_stats = [&](std::vector<wire::TableStatWire> stats) {
    return std::vector<BackupAnswer>{answer(2, {replica(1, 1, false)}, {1}, 1, std::move(stats))};
  };
  std::string error;
  SECTION("one big table over three recovery masters") {
    PlanOptions o{.partition_bytes = 512ull << 20, .recovery_masters = 3};
    auto plan = plan_recovery(kMaster, whole_table(5), with_stats({{5, 1000000, gib}}),
                              std::nullopt, o, &error);
    REQUIRE(plan.ok());
    CHECK(plan->partitions.size() == 3);  // more than 2 (1 GiB / 512 MiB): spread
    check_tiles(*plan, whole_table(5));
    for (const auto& p : plan->partitions) {
      CHECK(p.estimated_bytes > gib / 4);
      CHECK(p.estimated_bytes < gib / 2);
    }
  }
  SECTION("big data needs more partitions than masters") {
    PlanOptions o{.partition_bytes = 100ull << 20, .recovery_masters = 2};
    auto plan =
        plan_recovery(kMaster, whole_table(5), with_stats({{5, 1, gib}}), std::nullopt, o, &error);
    REQUIRE(plan.ok());
    CHECK(plan->partitions.size() == 11);
    check_tiles(*plan, whole_table(5));
  }
  SECTION("little data is not split just to spread it") {
    PlanOptions o{.recovery_masters = 8};
    auto plan = plan_recovery(kMaster, whole_table(5), with_stats({{5, 10, 4096}}), std::nullopt, o,
                              &error);
    REQUIRE(plan.ok());
    CHECK(plan->partitions.size() == 1);
  }
  SECTION("several tablets of several tables, one without statistics") {
    std::vector<Tablet> tablets = {
        {5, 0, (1ull << 63) - 1, kMaster}, {6, 1000, 5000, kMaster}, {7, 0, UINT64_MAX, kMaster}};
    PlanOptions o{.partition_bytes = 256ull << 20, .recovery_masters = 4};
    auto plan = plan_recovery(kMaster, tablets, with_stats({{5, 1, gib}, {6, 1, gib / 2}}),
                              std::nullopt, o, &error);
    REQUIRE(plan.ok());
    CHECK(plan->partitions.size() == 6);
    check_tiles(*plan, tablets);
  }
}

// Every segment of the plan has exactly one primary: the first of its locations, and the
// one backup whose primaries list names it.
void check_one_primary_each(const RecoveryPlan& plan) {
  std::map<uint64_t, uint64_t> primary_of;
  for (const auto& [backup, segments] : plan.primaries) {
    CHECK(std::is_sorted(segments.begin(), segments.end()));
    for (uint64_t s : segments) CHECK(primary_of.emplace(s, backup).second);
  }
  REQUIRE(primary_of.size() == plan.locations.size());
  for (const auto& [segment, where] : plan.locations) {
    REQUIRE_FALSE(where.empty());
    CHECK(primary_of.at(segment) == where.front().first);
  }
}

TEST_CASE("recovery plan: each segment gets exactly one primary, spread evenly over backups",
          "[coordinator][recovery]") {
  std::string error;
  SECTION("R = 3 over three backups: a third each, and each share spans the log") {
    std::vector<uint64_t> digest;
    std::vector<wire::ReplicaEntry> all;
    for (uint64_t s = 1; s <= 99; ++s) {
      digest.push_back(s);
      all.push_back(replica(s, 1, s < 99));
    }
    std::vector<BackupAnswer> answers = {answer(2, all, digest, 99), answer(3, all, digest, 99),
                                         answer(4, all, digest, 99)};
    auto plan = plan_recovery(kMaster, whole_table(5), answers, std::nullopt, {}, &error);
    REQUIRE(plan.ok());
    check_one_primary_each(*plan);
    REQUIRE(plan->primaries.size() == 3);
    for (const auto& [backup, segments] : plan->primaries) {
      CHECK(segments.size() == 33);
      CHECK(segments.front() <= 3);  // round-robin over the log, not one block each
      CHECK(segments.back() >= 97);
    }
    // Every other replica is still listed, as a fallback.
    for (const auto& [segment, where] : plan->locations) CHECK(where.size() == 3);
  }
  SECTION("replicas scattered over more backups than R: loads differ by at most one") {
    std::map<uint64_t, std::vector<wire::ReplicaEntry>> held;  // backup -> replicas
    std::vector<uint64_t> digest;
    for (uint64_t s = 1; s <= 200; ++s) {
      digest.push_back(s);
      for (uint64_t k = 0; k < 3; ++k) held[2 + (s * 7 + k * 3) % 8].push_back(replica(s, 1, true));
    }
    std::vector<BackupAnswer> answers;
    for (auto& [backup, replicas] : held) answers.push_back(answer(backup, replicas, digest, 200));
    // The head must be open somewhere.
    answers.push_back(answer(20, {replica(200, 1, false)}, digest, 200));
    auto plan = plan_recovery(kMaster, whole_table(5), answers, std::nullopt, {}, &error);
    REQUIRE(plan.ok());
    check_one_primary_each(*plan);
    size_t least = SIZE_MAX, most = 0;
    for (uint64_t backup = 2; backup < 10; ++backup) {
      auto it = plan->primaries.find(backup);
      size_t n = it == plan->primaries.end() ? 0 : it->second.size();
      least = std::min(least, n);
      most = std::max(most, n);
    }
    CHECK(most - least <= 1);
    CHECK_FALSE(plan->primaries.contains(20));  // the head has closed replicas: they go first
  }
  SECTION("a primary is on a backup that holds the segment, closed replicas preferred") {
    std::vector<BackupAnswer> answers = {
        answer(2, {replica(1, 1, true), replica(2, 1, false)}, {1, 2}, 2),
        answer(3, {replica(2, 1, true)}, {1, 2}, 2),
        answer(4, {replica(2, 1, false)}, {1, 2}, 2),
    };
    auto plan = plan_recovery(kMaster, whole_table(5), answers, std::nullopt, {}, &error);
    REQUIRE(plan.ok());
    check_one_primary_each(*plan);
    CHECK(plan->locations[1].front().first == 2);
    CHECK(plan->locations[2].front().first == 3);
    CHECK(plan->locations[2].size() == 3);
  }
}

TEST_CASE("recovery plan: a malformed backup answer is refused", "[coordinator][recovery]") {
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  w.put(wire::StartReadingDataResponse{.replica_count = 2, .digest_count = 1});
  w.put(replica(1, 1, true));
  CHECK(decode_backup_answer(2, "x", body).status() == Status::kBadRequest);
  w.put(replica(2, 1, true));
  w.put(uint64_t{2});
  auto a = decode_backup_answer(2, "x", body);
  REQUIRE(a.ok());
  CHECK(a->replicas.size() == 2);
  CHECK(a->digest == std::vector<uint64_t>{2});
  body.push_back(std::byte{0});
  CHECK(decode_backup_answer(2, "x", body).status() == Status::kBadRequest);
}

}  // namespace ramkv::coordinator
