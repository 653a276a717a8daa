#include "coordinator/recovery_plan.h"

#include <fmt/format.h>

#include <algorithm>
#include <optional>
#include <set>
#include <tuple>

#include "common/assert.h"

namespace ramkv::coordinator {

Result<BackupAnswer> decode_backup_answer(uint64_t backup_id, const std::string& locator,
                                          std::span<const std::byte> body) {
  BackupAnswer a;
  a.backup_id = backup_id;
  a.locator = locator;
  wire::BodyReader in(body);
  if (!in.get(&a.header)) return Status::kBadRequest;
  const uint64_t need = uint64_t{a.header.replica_count} * sizeof(wire::ReplicaEntry) +
                        uint64_t{a.header.digest_count} * sizeof(uint64_t) +
                        uint64_t{a.header.table_stat_count} * sizeof(wire::TableStatWire);
  if (need != in.remaining()) return Status::kBadRequest;
  a.replicas.resize(a.header.replica_count);
  for (auto& r : a.replicas) in.get(&r);
  a.digest.resize(a.header.digest_count);
  for (auto& d : a.digest) in.get(&d);
  a.table_stats.resize(a.header.table_stat_count);
  for (auto& t : a.table_stats) in.get(&t);
  if (!in.at_end()) return Status::kBadRequest;
  return a;
}

namespace {

struct Candidate {
  uint64_t backup_id = 0;
  const std::string* locator = nullptr;
  const wire::ReplicaEntry* replica = nullptr;
};

// The replicas of one segment recovery may read, best first. See docs/recovery.md, step 2:
// closed replicas are whole; an open one is stale below the recorded (segment, epoch).
// Below the recorded segment, open replicas count only when no closed one exists, and
// then only those with the highest epoch that were not found on a restarted backup's disk.
std::vector<Candidate> usable(uint64_t segment_id, const std::vector<Candidate>& all,
                              std::optional<ReplicationEpoch> recorded) {
  std::vector<Candidate> closed;
  std::vector<Candidate> open;
  for (const auto& c : all) {
    if (c.replica->status != wire::kReplicaOk) continue;
    (c.replica->closed != 0 ? closed : open).push_back(c);
  }
  // The longest open replicas first: open replicas of one segment at one epoch hold
  // prefixes of the same bytes, and a shorter one may be a copy its master gave up on
  // (its backup stopped answering) and replaced from memory without raising the epoch
  // (a segment closed in memory keeps its epoch; rule 4 of master/replica_manager.h). The
  // writes acknowledged from that segment are then only on the longer ones.
  std::stable_sort(open.begin(), open.end(), [](const Candidate& a, const Candidate& b) {
    return a.replica->certificate_bytes > b.replica->certificate_bytes;
  });
  std::vector<Candidate> out = closed;
  if (!recorded || segment_id > recorded->segment_id) {
    out.insert(out.end(), open.begin(), open.end());
  } else if (segment_id == recorded->segment_id) {
    for (const auto& c : open) {
      if (c.replica->epoch >= recorded->epoch) out.push_back(c);
    }
  } else if (closed.empty()) {
    uint64_t newest = 0;
    for (const auto& c : open) {
      if (c.replica->found_on_disk == 0) newest = std::max(newest, c.replica->epoch);
    }
    for (const auto& c : open) {
      if (c.replica->found_on_disk == 0 && c.replica->epoch == newest) out.push_back(c);
    }
  }
  return out;
}

// The bytes of one tablet, from its table's statistics: the table's bytes spread evenly
// over the master's share of that table's hash space.
uint64_t estimate_bytes(const Tablet& t, const std::vector<Tablet>& tablets,
                        const std::map<uint64_t, uint64_t>& table_bytes) {
  auto it = table_bytes.find(t.table_id);
  if (it == table_bytes.end() || it->second == 0) return 0;
  long double share = 0;
  for (const auto& o : tablets) {
    if (o.table_id == t.table_id) share += static_cast<long double>(o.end_hash - o.start_hash) + 1;
  }
  long double width = static_cast<long double>(t.end_hash - t.start_hash) + 1;
  return static_cast<uint64_t>(static_cast<long double>(it->second) * width / share);
}

// Names one primary replica per segment (RecoveryPlan::locations): segment by segment in
// log order, among its closed replicas if it has any (whole, and preferred as before; else
// among its longest open ones), the
// one on the backup with the fewest primary bytes so far (then the fewest primaries, then
// the lowest id). Every backup so reads about the same share of the log, spread over the
// whole log, which is the order recovery masters ask in. The primary goes first in the
// segment's list; the others keep their order.
void choose_primaries(RecoveryPlan* plan,
                      const std::map<uint64_t, std::vector<Candidate>>& by_segment) {
  struct Load {
    uint64_t bytes = 0;
    uint64_t count = 0;
  };
  std::map<uint64_t, Load> load;
  for (auto& [segment_id, where] : plan->locations) {
    const std::vector<Candidate>& all = by_segment.at(segment_id);
    auto replica_on = [&](uint64_t backup_id) -> const wire::ReplicaEntry& {
      auto it = std::find_if(all.begin(), all.end(),
                             [&](const Candidate& c) { return c.backup_id == backup_id; });
      RAMKV_CHECK(it != all.end());
      return *it->replica;
    };
    const bool any_closed = std::any_of(
        where.begin(), where.end(), [&](const auto& l) { return replica_on(l.first).closed != 0; });
    // Without a closed replica, only the longest open ones may be primary (see usable()).
    uint32_t longest = 0;
    for (const auto& l : where) longest = std::max(longest, replica_on(l.first).certificate_bytes);
    std::optional<size_t> best;
    for (size_t i = 0; i < where.size(); ++i) {
      if (any_closed && replica_on(where[i].first).closed == 0) continue;
      if (!any_closed && replica_on(where[i].first).certificate_bytes < longest) continue;
      if (!best) {
        best = i;
        continue;
      }
      const Load& a = load[where[i].first];
      const Load& b = load[where[*best].first];
      if (std::tie(a.bytes, a.count, where[i].first) <
          std::tie(b.bytes, b.count, where[*best].first)) {
        best = i;
      }
    }
    const auto at = static_cast<std::ptrdiff_t>(*best);
    std::rotate(where.begin(), where.begin() + at, where.begin() + at + 1);
    Load& chosen = load[where.front().first];
    chosen.bytes += std::max<uint64_t>(replica_on(where.front().first).certificate_bytes, 1);
    ++chosen.count;
    plan->primaries[where.front().first].push_back(segment_id);
  }
}

}  // namespace

Result<RecoveryPlan> plan_recovery(uint64_t master_id, const std::vector<Tablet>& tablets,
                                   const std::vector<BackupAnswer>& answers,
                                   std::optional<ReplicationEpoch> recorded,
                                   const PlanOptions& options, std::string* error) {
  if (tablets.empty()) return Status::kInvalidArgument;
  std::map<uint64_t, std::vector<Candidate>> by_segment;
  const BackupAnswer* digest_from = nullptr;
  for (const auto& a : answers) {
    for (const auto& r : a.replicas) {
      if (r.master_id != master_id) continue;
      by_segment[r.segment_id].push_back({a.backup_id, &a.locator, &r});
    }
    if (a.header.digest_count > 0 &&
        (digest_from == nullptr ||
         a.header.digest_segment_id > digest_from->header.digest_segment_id)) {
      digest_from = &a;
    }
  }
  if (digest_from == nullptr) {
    *error =
        by_segment.empty() ? "no backup holds a replica of it" : "no replica holds a log digest";
    return Status::kIncomplete;
  }
  RecoveryPlan plan;
  plan.digest_segment_id = digest_from->header.digest_segment_id;
  plan.safe_version = digest_from->header.safe_version;
  // The newest segment with a digest is the head: a newer one existed if it was closed.
  // Replicas of newer segments without a digest are the cleaner's survivors that no
  // durable digest names yet: not part of the log, ignored.
  {
    auto head = usable(plan.digest_segment_id, by_segment[plan.digest_segment_id], recorded);
    bool open_head = std::any_of(head.begin(), head.end(),
                                 [](const Candidate& c) { return c.replica->closed == 0; });
    if (!head.empty() && !open_head) {
      *error = fmt::format(
          "the newest segment found, {}, is closed on every backup: the head that followed it "
          "is missing",
          plan.digest_segment_id);
      return Status::kIncomplete;
    }
  }
  std::vector<uint64_t> missing;
  for (uint64_t segment_id : digest_from->digest) {
    auto found = usable(segment_id, by_segment[segment_id], recorded);
    if (found.empty()) {
      missing.push_back(segment_id);
      continue;
    }
    auto& list = plan.locations[segment_id];
    for (const auto& c : found) list.emplace_back(c.backup_id, *c.locator);
  }
  choose_primaries(&plan, by_segment);
  if (!missing.empty()) {
    std::string ids;
    for (size_t i = 0; i < missing.size() && i < 16; ++i) {
      ids += (i == 0 ? "" : ", ") + std::to_string(missing[i]);
    }
    if (missing.size() > 16) ids += fmt::format(" and {} more", missing.size() - 16);
    *error = fmt::format("no usable replica of segment{} {} (of {} in the log digest)",
                         missing.size() > 1 ? "s" : "", ids, digest_from->digest.size());
    return Status::kIncomplete;
  }

  // Partitions: cut each tablet into pieces of about partition_bytes, with enough pieces
  // in all that every recovery master gets work when there is enough data.
  // The head's table statistics are as of when it was opened, so they lag (a log of one
  // segment has none). The log's certified bytes bound what there is to replay: the
  // estimate is the larger of the two, spread as the statistics say (evenly over the
  // hash space without any).
  uint64_t log_bytes = 0;
  for (const auto& [segment_id, where] : plan.locations) {
    uint32_t longest = 0;
    for (const auto& c : usable(segment_id, by_segment[segment_id], recorded)) {
      longest = std::max(longest, c.replica->certificate_bytes);
    }
    log_bytes += longest;
  }
  std::map<uint64_t, uint64_t> table_bytes;
  uint64_t stats_total = 0;
  for (const auto& t : digest_from->table_stats) {
    table_bytes[t.table_id] += t.object_bytes;
    stats_total += t.object_bytes;
  }
  std::vector<uint64_t> bytes;
  uint64_t total = 0;
  long double all_width = 0;
  for (const auto& t : tablets)
    all_width += static_cast<long double>(t.end_hash - t.start_hash) + 1;
  for (const auto& t : tablets) {
    uint64_t b = 0;
    if (stats_total > 0) {
      b = estimate_bytes(t, tablets, table_bytes);
      if (log_bytes > stats_total) {
        b = static_cast<uint64_t>(static_cast<long double>(b) *
                                  static_cast<long double>(log_bytes) /
                                  static_cast<long double>(stats_total));
      }
    } else {
      b = static_cast<uint64_t>(static_cast<long double>(log_bytes) *
                                (static_cast<long double>(t.end_hash - t.start_hash) + 1) /
                                all_width);
    }
    bytes.push_back(b);
    total += b;
  }
  plan.estimated_bytes = total;
  const uint64_t partition_bytes = std::max<uint64_t>(options.partition_bytes, 1);
  uint64_t count = (total + partition_bytes - 1) / partition_bytes;
  const uint64_t spread = std::min<uint64_t>(
      options.recovery_masters, total / std::max<uint64_t>(options.min_partition_bytes, 1));
  count = std::max<uint64_t>({count, spread, 1});
  struct Piece {
    Tablet tablet;
    uint64_t bytes = 0;
  };
  std::vector<Piece> pieces;
  for (size_t i = 0; i < tablets.size(); ++i) {
    const Tablet& t = tablets[i];
    uint64_t n = total == 0 ? 1 : (bytes[i] * count + total - 1) / total;
    const uint64_t width_minus_one = t.end_hash - t.start_hash;
    n = std::clamp<uint64_t>(n, 1, std::min<uint64_t>(width_minus_one, 4095) + 1);
    // n equal hash ranges (the width may be 2^64: 128-bit arithmetic).
    const unsigned __int128 width = static_cast<unsigned __int128>(width_minus_one) + 1;
    auto offset = [&](uint64_t k) { return static_cast<uint64_t>(width * k / n); };
    for (uint64_t k = 0; k < n; ++k) {
      const uint64_t start = t.start_hash + offset(k);
      const uint64_t end = k + 1 == n ? t.end_hash : t.start_hash + offset(k + 1) - 1;
      pieces.push_back({Tablet{t.table_id, start, end, t.server_id}, bytes[i] / n});
    }
  }
  // Largest first into the smallest partition.
  std::stable_sort(pieces.begin(), pieces.end(),
                   [](const Piece& a, const Piece& b) { return a.bytes > b.bytes; });
  count = std::min<uint64_t>(count, pieces.size());
  plan.partitions.resize(count);
  for (uint32_t i = 0; i < count; ++i) plan.partitions[i].id = i;
  for (const auto& p : pieces) {
    auto smallest = std::min_element(
        plan.partitions.begin(), plan.partitions.end(),
        [](const PlannedPartition& a, const PlannedPartition& b) {
          return a.estimated_bytes < b.estimated_bytes ||
                 (a.estimated_bytes == b.estimated_bytes && a.tablets.size() < b.tablets.size());
        });
    smallest->tablets.push_back(p.tablet);
    smallest->estimated_bytes += p.bytes;
  }
  for (auto& p : plan.partitions) {
    std::sort(p.tablets.begin(), p.tablets.end(), [](const Tablet& a, const Tablet& b) {
      return std::tie(a.table_id, a.start_hash) < std::tie(b.table_id, b.start_hash);
    });
  }
  return plan;
}

}  // namespace ramkv::coordinator
