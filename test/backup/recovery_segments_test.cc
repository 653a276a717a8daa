// A backup's part in recovering a crashed master: replicas from real files (io_uring,
// O_DIRECT) and from RAM, the start-reading answer, splitting by partition, serving.
#include "backup/recovery_segments.h"

#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "backup/buffer_pool.h"
#include "backup/replica_file.h"
#include "backup/uring.h"
#include "common/certificate.h"
#include "common/checksum.h"
#include "common/log_entry.h"
#include "common/segment_iterator.h"
#include "test/temp_dir.h"

using namespace ramkv;
using namespace ramkv::backup;

namespace {

// The body of a `backup get recovery data` reply, as its receiver sees it: the fixed
// part, then the pieces get_pieces() names, in order. *body is changed only on kOk.
Status get_data(const RecoverySegments& rs, uint64_t segment_id, uint32_t partition_id,
                std::vector<std::byte>* body) {
  wire::RecoveryDataResponse head;
  std::vector<std::span<const std::byte>> pieces;
  if (Status s = rs.get_pieces(segment_id, partition_id, &head, &pieces); s != Status::kOk) {
    return s;
  }
  body->clear();
  wire::BodyWriter w(body);
  w.put(head);
  for (const auto piece : pieces) w.put_bytes(piece);
  return Status::kOk;
}

constexpr uint64_t kMaster = 7;
constexpr uint64_t kRecovery = 3;

// One entry as the test wrote it.
struct Written {
  EntryType type = EntryType::kInvalid;
  uint64_t table_id = 0;
  std::string key;
  uint32_t offset = 0;
  uint32_t bytes = 0;
};

// Builds a segment's bytes entry by entry, and its certificate. Entries added after
// end_certificate() are a torn tail: in the bytes, past the certificate.
class SegmentBuilder {
 public:
  void add(EntryType type, std::span<const std::byte> payload, uint64_t table_id = 0,
           std::string key = {}) {
    auto entry = build_entry(type, payload);
    const auto header_bytes = entry_header_bytes(static_cast<uint32_t>(payload.size()));
    if (certifying_) cert_.add_header(std::span(entry).first(header_bytes));
    entries_.push_back({type, table_id, std::move(key), static_cast<uint32_t>(bytes_.size()),
                        static_cast<uint32_t>(entry.size())});
    bytes_.insert(bytes_.end(), entry.begin(), entry.end());
    if (certifying_) certified_bytes_ = static_cast<uint32_t>(bytes_.size());
  }
  // Segment header, digest, safe version and table stats: what a head starts with.
  void head(uint64_t segment_id, std::span<const uint64_t> digest, uint64_t safe_version,
            std::span<const TableStat> stats) {
    std::vector<std::byte> p;
    encode_segment_header(
        {.master_id = kMaster, .segment_id = segment_id, .segment_bytes = 1 << 23}, &p);
    add(EntryType::kSegmentHeader, p);
    p.clear();
    encode_log_digest(digest, &p);
    add(EntryType::kLogDigest, p);
    p.clear();
    encode_safe_version(safe_version, &p);
    add(EntryType::kSafeVersion, p);
    p.clear();
    encode_table_stats(stats, &p);
    add(EntryType::kTableStats, p);
  }
  void object(uint64_t table_id, const std::string& key, const std::string& value,
              uint64_t version = 1) {
    std::vector<std::byte> p(kMaxObjectPrefixBytes);
    p.resize(
        encode_object_prefix(table_id, version, 1000, static_cast<uint32_t>(key.size()), p.data()));
    append(&p, key);
    append(&p, value);
    add(EntryType::kObject, p, table_id, key);
  }
  void tombstone(uint64_t table_id, const std::string& key, uint64_t version = 1) {
    std::vector<std::byte> p(kMaxTombstonePrefixBytes);
    p.resize(encode_tombstone_prefix(table_id, version, 1, 1000, p.data()));
    append(&p, key);
    add(EntryType::kTombstone, p, table_id, key);
  }
  void end_certificate() { certifying_ = false; }

  const std::vector<std::byte>& bytes() const { return bytes_; }
  const std::vector<Written>& entries() const { return entries_; }
  Certificate certificate() const { return cert_.finish(certified_bytes_); }

 private:
  static void append(std::vector<std::byte>* out, const std::string& s) {
    auto b = as_bytes(s);
    out->insert(out->end(), b.begin(), b.end());
  }
  std::vector<std::byte> bytes_;
  std::vector<Written> entries_;
  CertificateBuilder cert_;
  uint32_t certified_bytes_ = 0;
  bool certifying_ = true;
};

// `count` objects (every third one a tombstone) over tables 1, 2 and 3.
void fill(SegmentBuilder* b, uint64_t segment_id, int count) {
  for (int i = 0; i < count; ++i) {
    uint64_t table = 1 + static_cast<uint64_t>(i % 3);
    std::string key = "key-" + std::to_string(segment_id) + "-" + std::to_string(i);
    if (i % 3 == 2) {
      b->tombstone(table, key, static_cast<uint64_t>(i));
    } else {
      b->object(table, key, std::string(static_cast<size_t>(20 + i % 50), 'v'),
                static_cast<uint64_t>(i));
    }
  }
}

wire::ReplicaEntry entry_of(uint64_t segment_id, const SegmentBuilder& b, bool closed = true,
                            uint64_t epoch = 0) {
  return {.master_id = kMaster,
          .segment_id = segment_id,
          .epoch = epoch,
          .certificate_bytes = b.certificate().segment_bytes,
          .closed = static_cast<uint8_t>(closed ? 1 : 0)};
}

// A replica file holding `bytes` (which may differ from what `b` certifies: corruption).
RecoverySource file_source(Uring& ring, const std::string& dir, uint64_t segment_id,
                           const SegmentBuilder& b, std::vector<std::byte> bytes = {}) {
  if (bytes.empty()) bytes = b.bytes();
  Certificate c = b.certificate();
  ReplicaHeader h{.master_id = kMaster,
                  .segment_id = segment_id,
                  .capacity = static_cast<uint32_t>(align_up(bytes.size())),
                  .certificate_bytes = c.segment_bytes,
                  .certificate_checksum = c.checksum,
                  .closed = true};
  REQUIRE(write_replica(ring, dir, h, bytes, /*sync=*/false) == Status::kOk);
  return {.entry = entry_of(segment_id, b),
          .certificate_checksum = c.checksum,
          .path = replica_path(dir, kMaster, segment_id)};
}

RecoverySource ram_source(uint64_t segment_id, const SegmentBuilder& b, bool closed = false) {
  return {.entry = entry_of(segment_id, b, closed, 5),
          .certificate_checksum = b.certificate().checksum,
          .bytes = b.bytes()};
}

struct Response {
  wire::StartReadingDataResponse header;
  std::vector<wire::ReplicaEntry> replicas;
  std::vector<uint64_t> digest;
  std::vector<wire::TableStatWire> stats;
};

Response decode(std::span<const std::byte> body) {
  Response r;
  wire::BodyReader in(body);
  REQUIRE(in.get(&r.header));
  r.replicas.resize(r.header.replica_count);
  for (auto& e : r.replicas) REQUIRE(in.get(&e));
  r.digest.resize(r.header.digest_count);
  for (auto& d : r.digest) REQUIRE(in.get(&d));
  r.stats.resize(r.header.table_stat_count);
  for (auto& s : r.stats) REQUIRE(in.get(&s));
  REQUIRE(in.at_end());
  return r;
}

const wire::ReplicaEntry& listed(const Response& r, uint64_t segment_id) {
  for (const auto& e : r.replicas) {
    if (e.segment_id == segment_id) return e;
  }
  FAIL("segment " << segment_id << " is not listed");
  return r.replicas.front();
}

// Every replica settled (read, checked, and split once the map is known): a bounded wait.
void wait_settled(const RecoverySegments& rs) {
  for (int i = 0; i < 20000 && rs.replicas_pending() > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  REQUIRE(rs.replicas_pending() == 0);
}

// get_data until it is not kRetry (bounded).
Status get_data_eventually(const RecoverySegments& rs, uint64_t segment_id, uint32_t partition,
                           std::vector<std::byte>* body) {
  Status s = Status::kRetry;
  for (int i = 0; i < 20000 && s == Status::kRetry; ++i) {
    s = get_data(rs, segment_id, partition, body);
    if (s == Status::kRetry) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return s;
}

// Table 1 in two halves (partitions 10 and 11), table 2 whole (partition 12, with the
// first half of table 1 in partition 10 as well); table 3 is in no partition.
std::vector<wire::PartitionTablet> sample_map() {
  constexpr uint64_t kHalf = uint64_t{1} << 63;
  return {{.table_id = 1, .start_hash = 0, .end_hash = kHalf - 1, .partition_id = 10},
          {.table_id = 1, .start_hash = kHalf, .end_hash = UINT64_MAX, .partition_id = 11},
          {.table_id = 2, .start_hash = 0, .end_hash = UINT64_MAX, .partition_id = 12}};
}

// Which partition of `map` holds the entry, if any (the test's own lookup).
std::optional<uint32_t> partition_of(const std::vector<wire::PartitionTablet>& map,
                                     const Written& w) {
  uint64_t hash = key_hash(w.table_id, w.key);
  for (const auto& t : map) {
    if (t.table_id == w.table_id && t.start_hash <= hash && hash <= t.end_hash) {
      return uint32_t{t.partition_id};
    }
  }
  return std::nullopt;
}

// Checks what the replica built by `b` serves for every partition of `map`: each object and
// tombstone within the certificate in exactly the partition that holds its key hash, in log
// order, byte for byte; nothing else.
void check_served(const RecoverySegments& rs, uint64_t segment_id, const SegmentBuilder& b,
                  const std::vector<wire::PartitionTablet>& map, uint64_t epoch, bool closed) {
  std::map<uint32_t, std::vector<std::byte>> expected;
  std::map<uint32_t, uint32_t> expected_count;
  size_t in_some_partition = 0;
  for (const auto& t : map) expected[t.partition_id];
  const uint32_t certified = b.certificate().segment_bytes;
  for (const auto& w : b.entries()) {
    if (w.type != EntryType::kObject && w.type != EntryType::kTombstone) continue;
    if (w.offset + w.bytes > certified) continue;  // the torn tail
    auto p = partition_of(map, w);
    if (!p) continue;
    ++in_some_partition;
    auto raw = std::span(b.bytes()).subspan(w.offset, w.bytes);
    expected[*p].insert(expected[*p].end(), raw.begin(), raw.end());
    ++expected_count[*p];
  }
  CHECK(in_some_partition > 0);
  size_t served = 0;
  for (const auto& [partition, bytes] : expected) {
    INFO("segment " << segment_id << " partition " << partition);
    std::vector<std::byte> body;
    REQUIRE(get_data_eventually(rs, segment_id, partition, &body) == Status::kOk);
    wire::BodyReader in(body);
    wire::RecoveryDataResponse resp;
    REQUIRE(in.get(&resp));
    CHECK(resp.epoch == epoch);
    CHECK(resp.closed == (closed ? 1 : 0));
    CHECK(resp.entry_count == expected_count[partition]);
    REQUIRE(resp.entry_bytes == in.remaining());
    auto entries = std::span(body).subspan(sizeof(resp));
    CHECK(std::equal(entries.begin(), entries.end(), bytes.begin(), bytes.end()));
    // What the recovery master gets is a valid run of whole entries.
    SegmentIterator it(entries);
    CHECK(it.validate() == Status::kOk);
    uint32_t n = 0;
    for (; it.valid(); it.next()) ++n;
    CHECK(it.valid_bytes() == entries.size());
    CHECK(n == resp.entry_count);
    served += n;
  }
  CHECK(served == in_some_partition);
}

}  // namespace

TEST_CASE("recovery segments: the start answer lists every replica with the newest digest",
          "[backup][recovery_segments]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  std::vector<TableStat> old_stats = {{.table_id = 1, .object_count = 5, .object_bytes = 500}};
  std::vector<TableStat> stats = {{.table_id = 1, .object_count = 50, .object_bytes = 5000},
                                  {.table_id = 2, .object_count = 7, .object_bytes = 700}};
  std::vector<uint64_t> old_digest = {1, 2};
  std::vector<uint64_t> digest = {1, 2, 4, 5};

  SegmentBuilder s1, s2, s4, s5;
  s1.head(1, std::vector<uint64_t>{1}, 10, {});
  fill(&s1, 1, 30);
  s2.head(2, old_digest, 20, old_stats);
  fill(&s2, 2, 30);
  s4.head(4, digest, 77, stats);  // the newest head
  fill(&s4, 4, 30);
  fill(&s5, 5, 30);  // a survivor segment of the cleaner: no digest, yet the highest id

  std::vector<RecoverySource> sources;
  sources.push_back(ram_source(5, s5, /*closed=*/true));
  sources.push_back(file_source(**ring, dir.path, 1, s1));
  sources.push_back(file_source(**ring, dir.path, 4, s4));
  sources.push_back(ram_source(2, s2));
  RecoverySegments rs(kMaster, kRecovery, std::move(sources));
  CHECK(rs.master_id() == kMaster);
  CHECK(rs.recovery_id() == kRecovery);

  // At once, before the bulk read is done.
  Response r = decode(rs.start_response());
  CHECK(r.header.digest_segment_id == 4);
  CHECK(r.header.digest_epoch == 0);
  CHECK(r.header.digest_closed == 1);
  CHECK(r.header.safe_version == 77);
  CHECK(r.digest == digest);
  REQUIRE(r.stats.size() == 2);
  CHECK(r.stats[0].table_id == 1);
  CHECK(r.stats[0].object_count == 50);
  CHECK(r.stats[0].object_bytes == 5000);
  CHECK(r.stats[1].table_id == 2);
  CHECK(r.stats[1].object_count == 7);
  CHECK(r.stats[1].object_bytes == 700);
  REQUIRE(r.replicas.size() == 4);
  std::vector<uint64_t> ids;
  for (const auto& e : r.replicas) {
    ids.push_back(e.segment_id);
    CHECK(e.master_id == kMaster);
    CHECK(e.status == wire::kReplicaOk);
  }
  CHECK(ids == std::vector<uint64_t>{1, 2, 4, 5});
  CHECK(listed(r, 2).epoch == 5);
  CHECK(listed(r, 2).closed == 0);
  CHECK(listed(r, 2).certificate_bytes == s2.certificate().segment_bytes);
  CHECK(listed(r, 4).certificate_bytes == s4.certificate().segment_bytes);
  CHECK(listed(r, 5).closed == 1);

  // Resent: the same answer once everything is read.
  wait_settled(rs);
  CHECK(rs.start_response() == rs.start_response());
  Response again = decode(rs.start_response());
  CHECK(again.digest == digest);
  for (const auto& e : again.replicas) CHECK(e.status == wire::kReplicaOk);
  uint64_t certified = 0;
  for (const auto* b : {&s1, &s2, &s4, &s5}) certified += b->certificate().segment_bytes;
  CHECK(rs.bytes_read() >= certified);
}

TEST_CASE("recovery segments: without any digest the answer has none",
          "[backup][recovery_segments]") {
  SegmentBuilder s3;
  fill(&s3, 3, 10);
  std::vector<RecoverySource> sources;
  sources.push_back(ram_source(3, s3));
  RecoverySegments rs(kMaster, kRecovery, std::move(sources));
  Response r = decode(rs.start_response());
  CHECK(r.header.digest_count == 0);
  CHECK(r.header.digest_segment_id == 0);
  CHECK(r.header.safe_version == 0);
  CHECK(r.header.table_stat_count == 0);
  CHECK(r.replicas.size() == 1);

  RecoverySegments none(kMaster, kRecovery, {});
  Response empty = decode(none.start_response());
  CHECK(empty.header.replica_count == 0);
  CHECK(empty.header.digest_count == 0);
}

TEST_CASE("recovery segments: a digest longer than the first read window is still found",
          "[backup][recovery_segments]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  std::vector<uint64_t> digest;
  for (uint64_t i = 1; i <= 30000; ++i) digest.push_back(i);  // 240 KB of segment ids
  std::vector<TableStat> stats = {{.table_id = 9, .object_count = 1, .object_bytes = 2}};
  SegmentBuilder s;
  s.head(30000, digest, 1234, stats);
  fill(&s, 30000, 20);
  std::vector<RecoverySource> sources;
  sources.push_back(file_source(**ring, dir.path, 30000, s));
  RecoverySegments rs(kMaster, kRecovery, std::move(sources));
  Response r = decode(rs.start_response());
  CHECK(r.header.digest_segment_id == 30000);
  CHECK(r.digest == digest);
  CHECK(r.header.safe_version == 1234);
  REQUIRE(r.stats.size() == 1);
  CHECK(r.stats[0].table_id == 9);
}

TEST_CASE("recovery segments: data is retry until partitioned, then split exactly by partition",
          "[backup][recovery_segments]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  SegmentBuilder s1, s2, s3;
  s1.head(1, std::vector<uint64_t>{1, 2, 3}, 99, {});
  fill(&s1, 1, 400);
  fill(&s2, 2, 3000);  // several read chunks of its file
  for (int i = 0; i < 3000; ++i) {
    s2.object(1, "big-" + std::to_string(i), std::string(400, 'b'), static_cast<uint64_t>(i));
  }
  fill(&s3, 3, 300);
  // An open replica in RAM whose buffer runs past its certificate: the torn tail.
  s3.end_certificate();
  s3.object(1, "past the certificate", "never served");
  s3.tombstone(2, "past the certificate too");
  REQUIRE(s3.bytes().size() > s3.certificate().segment_bytes);

  std::vector<RecoverySource> sources;
  sources.push_back(file_source(**ring, dir.path, 1, s1));
  sources.push_back(file_source(**ring, dir.path, 2, s2));
  sources.push_back(ram_source(3, s3));
  RecoverySegments rs(kMaster, kRecovery, std::move(sources));

  std::vector<std::byte> body = {std::byte{42}};
  CHECK(get_data(rs, 1, 10, &body) == Status::kRetry);
  CHECK(get_data(rs, 3, 12, &body) == Status::kRetry);
  CHECK(get_data(rs, 9, 10, &body) == Status::kBadRequest);  // not held here
  // Read and checked, but still no map: retry, and the body is untouched.
  wait_settled(rs);
  CHECK(get_data(rs, 2, 11, &body) == Status::kRetry);
  CHECK(body == std::vector<std::byte>{std::byte{42}});

  auto map = sample_map();
  REQUIRE(rs.start_partitioning(map) == Status::kOk);
  check_served(rs, 1, s1, map, 0, true);
  check_served(rs, 2, s2, map, 0, true);
  check_served(rs, 3, s3, map, 5, false);
  CHECK(get_data(rs, 1, 13, &body) == Status::kBadRequest);  // no such partition
  CHECK(get_data(rs, 9, 10, &body) == Status::kBadRequest);
  // The same map again (in another order) changes nothing.
  std::vector<wire::PartitionTablet> reordered(map.rbegin(), map.rend());
  CHECK(rs.start_partitioning(reordered) == Status::kOk);
  check_served(rs, 2, s2, map, 0, true);
}

TEST_CASE("recovery segments: file reads use the backup's pooled buffers and give them back",
          "[backup][recovery_segments]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  SegmentBuilder s1, s2, s3;
  s1.head(1, std::vector<uint64_t>{1, 2, 3}, 99, {});
  fill(&s1, 1, 400);
  fill(&s2, 2, 3000);
  fill(&s3, 3, 300);
  // Two pooled buffers, both full of what an earlier user left: the reads must neither
  // depend on zeros nor serve the leftovers.
  auto pool = std::make_shared<BufferPool>(kReplicaHeaderBlock + (size_t{1} << 23), 4);
  pool->fill(2);
  {
    AlignedBuffer a = pool->take(), b = pool->take();
    std::memset(a.data(), 0x5a, a.size());
    std::memset(b.data(), 0xff, b.size());
    pool->give(std::move(a));
    pool->give(std::move(b));
  }
  std::vector<RecoverySource> sources;
  sources.push_back(file_source(**ring, dir.path, 1, s1));
  sources.push_back(file_source(**ring, dir.path, 2, s2));
  sources.push_back(file_source(**ring, dir.path, 3, s3));
  {
    RecoverySegments rs(kMaster, kRecovery, std::move(sources), /*defer_reads=*/false, pool);
    wait_settled(rs);
    CHECK(pool->free_count() == 0);  // two reads took the pool's, the third a new one
    CHECK(pool->allocated_late() == 1);
    auto map = sample_map();
    REQUIRE(rs.start_partitioning(map) == Status::kOk);
    check_served(rs, 1, s1, map, 0, true);
    check_served(rs, 2, s2, map, 0, true);
    check_served(rs, 3, s3, map, 0, true);
    auto listed_all = decode(rs.start_response());
    for (uint64_t id : {uint64_t{1}, uint64_t{2}, uint64_t{3}})
      CHECK(listed(listed_all, id).status == wire::kReplicaOk);
  }
  // Destroyed: the buffers are back, the new one too (kept for the next user).
  CHECK(pool->free_count() == 3);
}

TEST_CASE(
    "recovery segments: a reply's keep holds its replica's bytes past the object, then "
    "gives the buffer back",
    "[backup][recovery_segments]") {
  // A reply of recovery data that a socket did not take whole waits in the connection's
  // queue, holding the replica's bytes (the transport sends them from where they lie),
  // while the backup may drop the recovery meanwhile.
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  SegmentBuilder s1, s2;
  s1.head(1, std::vector<uint64_t>{1, 2}, 9, {});
  fill(&s1, 1, 400);
  fill(&s2, 2, 3000);
  auto pool = std::make_shared<BufferPool>(kReplicaHeaderBlock + (size_t{1} << 23), 4);
  pool->fill(2);
  std::vector<RecoverySource> sources;
  sources.push_back(file_source(**ring, dir.path, 1, s1));
  sources.push_back(file_source(**ring, dir.path, 2, s2));
  auto rs = std::make_unique<RecoverySegments>(kMaster, kRecovery, std::move(sources),
                                               /*defer_reads=*/false, pool);
  REQUIRE(rs->start_partitioning(sample_map()) == Status::kOk);
  wire::RecoveryDataResponse head;
  std::vector<std::span<const std::byte>> pieces;
  std::shared_ptr<const void> keep;
  Status s = Status::kRetry;
  for (int i = 0; i < 20000 && s == Status::kRetry; ++i) {
    s = rs->get_pieces(2, 10, &head, &pieces, &keep);
    if (s == Status::kRetry) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  REQUIRE(s == Status::kOk);
  REQUIRE(keep != nullptr);
  REQUIRE(head.entry_bytes > 0);
  std::vector<std::byte> sent;
  for (const auto piece : pieces) sent.insert(sent.end(), piece.begin(), piece.end());
  wait_settled(*rs);
  CHECK(pool->free_count() == 0);  // both replicas read into the pool's buffers
  rs.reset();
  // Segment 1's buffer is back; segment 2's waits with the reply, its bytes unchanged.
  CHECK(pool->free_count() == 1);
  std::vector<std::byte> still;
  for (const auto piece : pieces) still.insert(still.end(), piece.begin(), piece.end());
  CHECK(still.size() == head.entry_bytes);
  CHECK(still == sent);
  keep.reset();
  CHECK(pool->free_count() == 2);
}

TEST_CASE("recovery segments: a map that arrives before the reads splits as they complete",
          "[backup][recovery_segments]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  std::vector<SegmentBuilder> builders(12);
  std::vector<RecoverySource> sources;
  for (size_t i = 0; i < builders.size(); ++i) {
    uint64_t id = 100 + i;
    fill(&builders[i], id, 2000);
    if (i % 2 == 0) {
      sources.push_back(file_source(**ring, dir.path, id, builders[i]));
    } else {
      sources.push_back(ram_source(id, builders[i]));
    }
  }
  RecoverySegments rs(kMaster, kRecovery, std::move(sources));
  auto map = sample_map();
  REQUIRE(rs.start_partitioning(map) == Status::kOk);
  for (size_t i = 0; i < builders.size(); ++i) {
    bool file = i % 2 == 0;
    check_served(rs, 100 + i, builders[i], map, file ? 0 : 5, file);
  }
  wait_settled(rs);
}

TEST_CASE(
    "recovery segments: RAM replicas handed over in pooled buffers are served, then given back",
    "[backup][recovery_segments]") {
  // An open replica in buffered mode: the backup copies its bytes into one of its pool's
  // buffers (touched long ago), bytes past the certificate left as an earlier user had them.
  SegmentBuilder s1, s2;
  s1.head(1, std::vector<uint64_t>{1, 2}, 7, {});
  fill(&s1, 1, 400);
  fill(&s2, 2, 900);
  auto pool = std::make_shared<BufferPool>(kReplicaHeaderBlock + (size_t{1} << 23), 4);
  std::vector<RecoverySource> sources;
  for (const SegmentBuilder* b : {&s1, &s2}) {
    RecoverySource src = ram_source(b == &s1 ? 1 : 2, *b);
    src.buffer = pool->take_or_allocate();
    std::memset(src.buffer.data(), 0xee, src.buffer.size());
    std::memcpy(src.buffer.data(), src.bytes.data(), src.bytes.size());
    src.bytes.clear();
    sources.push_back(std::move(src));
  }
  {
    RecoverySegments rs(kMaster, kRecovery, std::move(sources), /*defer_reads=*/false, pool);
    wait_settled(rs);
    CHECK(pool->free_count() == 0);
    auto map = sample_map();
    REQUIRE(rs.start_partitioning(map) == Status::kOk);
    check_served(rs, 1, s1, map, 5, false);
    check_served(rs, 2, s2, map, 5, false);
    Response r = decode(rs.start_response());
    CHECK(r.header.digest_segment_id == 1);
  }
  CHECK(pool->free_count() == 2);
}

TEST_CASE("recovery segments: one partition takes a replica's entries as one run",
          "[backup][recovery_segments]") {
  SegmentBuilder s;
  s.head(1, std::vector<uint64_t>{1}, 1, {});
  fill(&s, 1, 500);
  std::vector<RecoverySource> sources;
  sources.push_back(ram_source(1, s));
  RecoverySegments rs(kMaster, kRecovery, std::move(sources));
  std::vector<wire::PartitionTablet> map = {
      {.table_id = 1, .start_hash = 0, .end_hash = UINT64_MAX, .partition_id = 0},
      {.table_id = 2, .start_hash = 0, .end_hash = UINT64_MAX, .partition_id = 0},
      {.table_id = 3, .start_hash = 0, .end_hash = UINT64_MAX, .partition_id = 0}};
  REQUIRE(rs.start_partitioning(map) == Status::kOk);
  check_served(rs, 1, s, map, 5, false);
  // Everything but the head's metadata.
  std::vector<std::byte> body;
  REQUIRE(get_data_eventually(rs, 1, 0, &body) == Status::kOk);
  uint32_t metadata = 0;
  for (const auto& w : s.entries()) {
    if (w.type != EntryType::kObject && w.type != EntryType::kTombstone) metadata += w.bytes;
  }
  CHECK(body.size() - sizeof(wire::RecoveryDataResponse) == s.bytes().size() - metadata);
}

TEST_CASE("recovery segments: a corrupt or torn replica is listed so and never served",
          "[backup][recovery_segments]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  SegmentBuilder good, bad_file, bad_ram, torn_file, bad_head, scanned;
  good.head(1, std::vector<uint64_t>{1, 2, 3, 4, 5, 6}, 1, {});
  fill(&good, 1, 100);
  fill(&bad_file, 2, 100);
  fill(&bad_ram, 3, 100);
  fill(&torn_file, 4, 100);
  bad_head.head(5, std::vector<uint64_t>{1, 2, 3, 4, 5}, 55, {});  // the newest digest, but bad
  fill(&bad_head, 5, 100);
  fill(&scanned, 6, 10);

  std::vector<RecoverySource> sources;
  sources.push_back(file_source(**ring, dir.path, 1, good));
  // A byte flipped inside the certificate, in the middle of an entry, on disk.
  auto flipped = bad_file.bytes();
  flipped[flipped.size() / 2] ^= std::byte{0x01};
  sources.push_back(file_source(**ring, dir.path, 2, bad_file, flipped));
  // ... and in RAM, in the last certified entry.
  RecoverySource ram = ram_source(3, bad_ram);
  ram.bytes[bad_ram.certificate().segment_bytes - 2] ^= std::byte{0x80};
  sources.push_back(std::move(ram));
  // A file cut short: the certificate claims bytes that never reached the disk.
  sources.push_back(file_source(**ring, dir.path, 4, torn_file));
  REQUIRE(::truncate(sources.back().path.c_str(), static_cast<off_t>(kReplicaHeaderBlock + 4096)) ==
          0);
  // The digest's own entry corrupted: the answer falls back to the next newest digest.
  auto bad_digest = bad_head.bytes();
  bad_digest[bad_head.entries()[1].offset + 8] ^= std::byte{0x04};
  sources.push_back(file_source(**ring, dir.path, 5, bad_head, bad_digest));
  // One the scan at start already found corrupt.
  RecoverySource listed_corrupt = ram_source(6, scanned);
  listed_corrupt.entry.status = wire::kReplicaCorrupt;
  sources.push_back(std::move(listed_corrupt));

  RecoverySegments rs(kMaster, kRecovery, std::move(sources));
  Response first = decode(rs.start_response());
  CHECK(first.header.digest_segment_id == 1);
  CHECK(first.digest == std::vector<uint64_t>{1, 2, 3, 4, 5, 6});
  CHECK(listed(first, 5).status == wire::kReplicaCorrupt);
  CHECK(listed(first, 6).status == wire::kReplicaCorrupt);

  auto map = sample_map();
  REQUIRE(rs.start_partitioning(map) == Status::kOk);
  wait_settled(rs);
  std::vector<std::byte> body;
  for (uint64_t segment : {uint64_t{2}, uint64_t{3}, uint64_t{4}, uint64_t{5}, uint64_t{6}}) {
    INFO("segment " << segment);
    for (uint32_t partition : {10u, 11u, 12u, 99u}) {
      CHECK(get_data(rs, segment, partition, &body) == Status::kCorrupt);
    }
  }
  CHECK(body.empty());
  Response r = decode(rs.start_response());
  CHECK(listed(r, 1).status == wire::kReplicaOk);
  CHECK(listed(r, 2).status == wire::kReplicaCorrupt);
  CHECK(listed(r, 3).status == wire::kReplicaCorrupt);
  CHECK(listed(r, 4).status == wire::kReplicaTorn);
  CHECK(listed(r, 5).status == wire::kReplicaCorrupt);
  CHECK(listed(r, 6).status == wire::kReplicaCorrupt);
  check_served(rs, 1, good, map, 0, true);
}

TEST_CASE("recovery segments: a file that is missing or holds another segment is not served",
          "[backup][recovery_segments]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  SegmentBuilder a, b;
  fill(&a, 1, 50);
  fill(&b, 2, 50);
  std::vector<RecoverySource> sources;
  sources.push_back(file_source(**ring, dir.path, 1, a));
  // Segment 2's entry pointing at segment 1's file (same bytes, so the certificate holds).
  RecoverySource wrong = file_source(**ring, dir.path, 2, b);
  wrong.path = replica_path(dir.path, kMaster, 1);
  wrong.entry.certificate_bytes = a.certificate().segment_bytes;
  wrong.certificate_checksum = a.certificate().checksum;
  sources.push_back(std::move(wrong));
  RecoverySource missing = ram_source(3, b);
  missing.bytes.clear();
  missing.path = dir.path + "/no/such/file";
  sources.push_back(std::move(missing));
  RecoverySegments rs(kMaster, kRecovery, std::move(sources));
  REQUIRE(rs.start_partitioning(sample_map()) == Status::kOk);
  wait_settled(rs);
  std::vector<std::byte> body;
  CHECK(get_data(rs, 1, 10, &body) == Status::kOk);
  CHECK(get_data(rs, 2, 10, &body) == Status::kCorrupt);
  CHECK(get_data(rs, 3, 10, &body) == Status::kIoError);
  Response r = decode(rs.start_response());
  CHECK(listed(r, 2).status == wire::kReplicaCorrupt);
  CHECK(listed(r, 3).status != wire::kReplicaOk);
}

TEST_CASE("recovery segments: a malformed or different map is a bad request",
          "[backup][recovery_segments]") {
  SegmentBuilder s;
  fill(&s, 1, 20);
  std::vector<RecoverySource> sources;
  sources.push_back(ram_source(1, s));
  RecoverySegments rs(kMaster, kRecovery, std::move(sources));
  using T = wire::PartitionTablet;
  std::vector<T> reversed = {{.table_id = 1, .start_hash = 10, .end_hash = 9, .partition_id = 0}};
  CHECK(rs.start_partitioning(reversed) == Status::kBadRequest);
  std::vector<T> overlap = {{.table_id = 1, .start_hash = 0, .end_hash = 100, .partition_id = 0},
                            {.table_id = 1, .start_hash = 100, .end_hash = 200, .partition_id = 1}};
  CHECK(rs.start_partitioning(overlap) == Status::kBadRequest);
  std::vector<T> twice = {{.table_id = 1, .start_hash = 5, .end_hash = 5, .partition_id = 0},
                          {.table_id = 1, .start_hash = 5, .end_hash = 5, .partition_id = 0}};
  CHECK(rs.start_partitioning(twice) == Status::kBadRequest);
  // Nothing was accepted: still no map.
  std::vector<std::byte> body;
  wait_settled(rs);
  CHECK(get_data(rs, 1, 0, &body) == Status::kRetry);

  // The same ranges in different tables do not overlap; a one-hash range is fine.
  std::vector<T> good = {
      {.table_id = 1, .start_hash = 0, .end_hash = UINT64_MAX, .partition_id = 0},
      {.table_id = 2, .start_hash = 0, .end_hash = UINT64_MAX, .partition_id = 1},
      {.table_id = 3, .start_hash = 7, .end_hash = 7, .partition_id = 1}};
  CHECK(rs.start_partitioning(good) == Status::kOk);
  CHECK(rs.start_partitioning(good) == Status::kOk);
  auto other = good;
  other[2].partition_id = 2;
  CHECK(rs.start_partitioning(other) == Status::kBadRequest);
  CHECK(rs.start_partitioning(sample_map()) == Status::kBadRequest);
  CHECK(get_data_eventually(rs, 1, 0, &body) == Status::kOk);
  CHECK(get_data(rs, 1, 2, &body) == Status::kBadRequest);
}

TEST_CASE("recovery segments: an empty map is accepted and serves nothing",
          "[backup][recovery_segments]") {
  SegmentBuilder s;
  fill(&s, 1, 20);
  std::vector<RecoverySource> sources;
  sources.push_back(ram_source(1, s));
  RecoverySegments rs(kMaster, kRecovery, std::move(sources));
  CHECK(rs.start_partitioning({}) == Status::kOk);
  wait_settled(rs);
  std::vector<std::byte> body;
  CHECK(get_data(rs, 1, 0, &body) == Status::kBadRequest);
}

TEST_CASE(
    "recovery segments: with deferred reads only the named primaries are read, and a secondary "
    "is read when first asked for",
    "[backup][recovery_segments]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  SegmentBuilder s1, s2, s3, s4;
  s1.head(1, std::vector<uint64_t>{1, 2, 3, 4}, 9, {});
  fill(&s1, 1, 300);
  fill(&s2, 2, 300);
  fill(&s3, 3, 300);
  fill(&s4, 4, 300);
  std::vector<RecoverySource> sources;
  sources.push_back(file_source(**ring, dir.path, 1, s1));
  sources.push_back(file_source(**ring, dir.path, 2, s2));
  sources.push_back(ram_source(3, s3));
  sources.push_back(file_source(**ring, dir.path, 4, s4));
  RecoverySegments rs(kMaster, kRecovery, std::move(sources), /*defer_reads=*/true);
  // The answer is there at once (the digest is read synchronously); nothing else is read.
  CHECK(decode(rs.start_response()).digest == std::vector<uint64_t>{1, 2, 3, 4});
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(rs.replicas_admitted() == 0);
  CHECK(rs.bytes_read() == 0);
  std::vector<std::byte> body;
  CHECK(get_data(rs, 2, 10, &body) == Status::kRetry);  // no map yet: not admitted either
  CHECK(rs.replicas_admitted() == 0);

  // Primaries 1 and 3 (and an id it does not hold, ignored).
  const std::vector<uint64_t> primaries = {3, 1, 77};
  auto map = sample_map();
  REQUIRE(rs.start_partitioning(map, std::span<const uint64_t>(primaries)) == Status::kOk);
  wait_settled(rs);
  CHECK(rs.replicas_admitted() == 2);
  const uint64_t primary_bytes =
      kReplicaHeaderBlock + s1.certificate().segment_bytes + s3.certificate().segment_bytes;
  CHECK(rs.bytes_read() >= primary_bytes);
  CHECK(rs.bytes_read() < primary_bytes + s2.certificate().segment_bytes);
  check_served(rs, 1, s1, map, 0, true);
  check_served(rs, 3, s3, map, 5, false);

  // A recovery master whose primary for segment 2 failed asks here: retry, then the data.
  CHECK(get_data(rs, 2, 11, &body) == Status::kRetry);
  CHECK(rs.replicas_admitted() == 3);
  check_served(rs, 2, s2, map, 0, true);
  wait_settled(rs);
  // Segment 4 was never asked for: never read.
  CHECK(rs.replicas_admitted() == 3);
  CHECK(rs.bytes_read() < primary_bytes + 2 * kReplicaHeaderBlock + s2.certificate().segment_bytes +
                              s4.certificate().segment_bytes);
  // The same map again with more primaries admits them (a coordinator may resend).
  const std::vector<uint64_t> more = {4};
  REQUIRE(rs.start_partitioning(map, std::span<const uint64_t>(more)) == Status::kOk);
  check_served(rs, 4, s4, map, 0, true);
  CHECK(rs.replicas_admitted() == 4);
}

TEST_CASE("recovery segments: with deferred reads and no primaries named, every replica is read",
          "[backup][recovery_segments]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  SegmentBuilder s1, s2;
  s1.head(1, std::vector<uint64_t>{1, 2}, 9, {});
  fill(&s1, 1, 100);
  fill(&s2, 2, 100);
  std::vector<RecoverySource> sources;
  sources.push_back(file_source(**ring, dir.path, 1, s1));
  sources.push_back(ram_source(2, s2));
  RecoverySegments rs(kMaster, kRecovery, std::move(sources), /*defer_reads=*/true);
  auto map = sample_map();
  REQUIRE(rs.start_partitioning(map) == Status::kOk);
  wait_settled(rs);
  CHECK(rs.replicas_admitted() == 2);
  check_served(rs, 1, s1, map, 0, true);
  check_served(rs, 2, s2, map, 5, false);
}

TEST_CASE("recovery segments: destroying it while it reads is safe",
          "[backup][recovery_segments]") {
  test::TempDir dir("/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  std::vector<SegmentBuilder> builders(24);
  for (size_t i = 0; i < builders.size(); ++i) fill(&builders[i], i + 1, 8000);  // ~1 MiB each
  auto make_sources = [&] {
    std::vector<RecoverySource> sources;
    for (size_t i = 0; i < builders.size(); ++i) {
      if (i % 4 == 3) {
        sources.push_back(ram_source(i + 1, builders[i]));
      } else {
        sources.push_back({.entry = entry_of(i + 1, builders[i]),
                           .certificate_checksum = builders[i].certificate().checksum,
                           .path = replica_path(dir.path, kMaster, i + 1)});
      }
    }
    return sources;
  };
  for (size_t i = 0; i < builders.size(); ++i) {
    if (i % 4 != 3) (void)file_source(**ring, dir.path, i + 1, builders[i]);
  }
  // At once, before the thread got anywhere.
  { RecoverySegments rs(kMaster, kRecovery, make_sources()); }
  // While reads are in flight, with and without a map.
  const int delays_us[] = {0, 0, 200, 200, 1000, 1000, 5000, 5000};
  for (size_t round = 0; round < std::size(delays_us); ++round) {
    const int delay_us = delays_us[round];
    RecoverySegments rs(kMaster, kRecovery, make_sources());
    if (round % 2 == 1) REQUIRE(rs.start_partitioning(sample_map()) == Status::kOk);
    std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    std::vector<std::byte> body;
    Status s = get_data(rs, 1, 10, &body);
    CHECK((s == Status::kOk || s == Status::kRetry));
  }
  // Once done, nothing is left running: a last full run still serves everything.
  RecoverySegments rs(kMaster, kRecovery, make_sources());
  auto map = sample_map();
  REQUIRE(rs.start_partitioning(map) == Status::kOk);
  check_served(rs, 1, builders[0], map, 0, true);
  check_served(rs, 4, builders[3], map, 5, false);
}

// Not a test: the throughput of reading and splitting replica files (hidden; run it by
// name in a Release build). RAMKV_RECOVERY_BENCH_DIR picks the disk (default /var/tmp),
// RAMKV_RECOVERY_BENCH_SEGMENTS the number of 8 MiB replicas (default 64).
TEST_CASE("recovery segments: read and split throughput", "[.][recovery_bench]") {
  const char* base = std::getenv("RAMKV_RECOVERY_BENCH_DIR");
  const char* count_text = std::getenv("RAMKV_RECOVERY_BENCH_SEGMENTS");
  const int segments = count_text != nullptr ? std::atoi(count_text) : 64;
  test::TempDir dir(base != nullptr ? base : "/var/tmp");
  auto ring = Uring::create(8);
  REQUIRE(ring.ok());
  // 100-byte values and 16-byte keys: the 132-byte entries of docs/log-format.md.
  std::vector<RecoverySource> sources;
  std::vector<RecoverySource> in_ram;  // the same replicas in RAM: the CPU's part alone
  uint64_t total = 0;
  for (int s = 1; s <= segments; ++s) {
    SegmentBuilder b;
    b.head(static_cast<uint64_t>(s), std::vector<uint64_t>{1}, 1, {});
    char key[32];
    for (int i = 0; b.bytes().size() + 200 < (8u << 20); ++i) {
      std::snprintf(key, sizeof(key), "k%07d-%08d", s, i);
      b.object(1 + static_cast<uint64_t>(i % 2), key, std::string(100, 'v'),
               uint64_t{1} << 22 | static_cast<uint64_t>(i));
    }
    total += b.bytes().size();
    sources.push_back(file_source(**ring, dir.path, static_cast<uint64_t>(s), b));
    in_ram.push_back(ram_source(static_cast<uint64_t>(s), b));
  }
  ::sync();
  // Cold reads need the page cache dropped (root only); O_DIRECT bypasses it anyway.
  if (FILE* f = std::fopen("/proc/sys/vm/drop_caches", "w")) {
    std::fputs("3\n", f);
    std::fclose(f);
  }
  std::vector<wire::PartitionTablet> map;
  for (uint32_t p = 0; p < 8; ++p) {
    uint64_t width = UINT64_MAX / 4;
    map.push_back({.table_id = 1 + p / 4,
                   .start_hash = (p % 4) * width + (p % 4 == 0 ? 0 : 1),
                   .end_hash = p % 4 == 3 ? UINT64_MAX : (p % 4 + 1) * width,
                   .partition_id = p});
  }
  auto start = std::chrono::steady_clock::now();
  RecoverySegments rs(kMaster, kRecovery, std::move(sources));
  REQUIRE(rs.start_partitioning(map) == Status::kOk);
  wait_settled(rs);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::vector<std::byte> body;
  uint64_t served = 0;
  for (int s = 1; s <= segments; ++s) {
    for (uint32_t p = 0; p < 8; ++p) {
      REQUIRE(get_data(rs, static_cast<uint64_t>(s), p, &body) == Status::kOk);
      served += body.size() - sizeof(wire::RecoveryDataResponse);
    }
  }
  std::printf(
      "recovery segments: %d replicas, %.1f MiB: read+check+split %.3f s = %.0f MB/s; "
      "reads alone %.3f s = %.0f MB/s; %.1f MiB served\n",
      segments, static_cast<double>(total) / (1 << 20), seconds,
      static_cast<double>(total) / seconds / 1e6, static_cast<double>(rs.read_ns()) / 1e9,
      static_cast<double>(rs.bytes_read()) / (static_cast<double>(rs.read_ns()) / 1e9) / 1e6,
      static_cast<double>(served) / (1 << 20));

  start = std::chrono::steady_clock::now();
  {
    RecoverySegments from_ram(kMaster, kRecovery, std::move(in_ram));
    REQUIRE(from_ram.start_partitioning(map) == Status::kOk);
    wait_settled(from_ram);
  }
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("check+split alone (the same replicas from RAM): %.3f s = %.0f MB/s\n", seconds,
              static_cast<double>(total) / seconds / 1e6);

  // The same files as `dd if=FILE of=/dev/null bs=1M iflag=direct`, one after another.
  AlignedBuffer block(1 << 20);
  uint64_t read = 0;
  start = std::chrono::steady_clock::now();
  for (int s = 1; s <= segments; ++s) {
    std::string path = replica_path(dir.path, kMaster, static_cast<uint64_t>(s));
    int fd = ::open(path.c_str(), O_RDONLY | O_DIRECT);
    if (fd < 0) fd = ::open(path.c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    uint64_t offset = 0;
    for (;;) {
      ssize_t n = ::pread(fd, block.data(), block.size(), static_cast<off_t>(offset));
      REQUIRE(n >= 0);
      if (n == 0) break;
      offset += static_cast<uint64_t>(n);
    }
    read += offset;
    ::close(fd);
  }
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("dd-style sequential read (1 MiB blocks, O_DIRECT): %.1f MiB in %.3f s = %.0f MB/s\n",
              static_cast<double>(read) / (1 << 20), seconds,
              static_cast<double>(read) / seconds / 1e6);
}
