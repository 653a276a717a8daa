// The backup service's side of one-sided mirroring (docs/rdma.md): an open that asks for it
// gets its buffer exposed, a master's RDMA WRITEs (here: the test writing into the exposed
// memory, as the adapter would) count once their certificate slot is whole and proves the
// bytes, and the region is withdrawn before a close, a free or a fence takes the replica.
#include <catch2/catch.hpp>
#include <cstring>
#include <set>

#include "backup/backup_service.h"
#include "common/checksum.h"
#include "test/backup/backup_service_helpers.h"

using namespace ramkv;
using namespace ramkv::backup;
using namespace ramkv::backup::testing;

namespace {

// A transport that exposes memory as an adapter would (the region is the memory itself)
// and records withdrawals; deferred replies go to the shared fake's record.
class ExposingTransport final : public ServerTransport {
 public:
  Status listen(const std::string&) override { return Status::kOk; }
  std::string locator() const override { return "exposing:0"; }
  void run(const Handler&) override {}
  void add_loop_task(LoopTask*) override {}
  bool send_deferred(const ReplyToken& token, const Reply& reply) override {
    return transport().send_deferred(token, reply);
  }
  void stop() override {}
  Result<RemoteRegion> expose_memory(std::span<std::byte> memory) override {
    if (refuse) return Status::kNoSpace;
    RemoteRegion r{.address = reinterpret_cast<uint64_t>(memory.data()),
                   .bytes = memory.size(),
                   .key = ++next_key};
    exposed.insert(r.key);
    return r;
  }
  void withdraw_memory(const RemoteRegion& region) override {
    REQUIRE(exposed.erase(region.key) == 1);
    withdrawn.insert(region.key);
  }

  bool refuse = false;
  uint32_t next_key = 0;
  std::set<uint32_t> exposed;
  std::set<uint32_t> withdrawn;
};

std::unique_ptr<BackupService> make_exposing(const std::string& dir, ExposingTransport& t,
                                             Durability durability = Durability::kBuffered) {
  auto created = BackupService::create({.data_dir = dir,
                                        .segment_bytes = kSegmentBytes,
                                        .max_buffers = 4,
                                        .durability = durability});
  REQUIRE(created.ok());
  (*created)->attach(t);
  return std::move(*created);
}

// An open asking for one-sided appends; the region the backup granted, if any.
std::optional<wire::BackupWriteResponse> open_remote(BackupService& service, uint64_t master_id,
                                                     uint64_t segment_id,
                                                     std::span<const std::byte> data,
                                                     Status* status = nullptr) {
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  w.put(wire::BackupWriteRequest{.master_id = master_id,
                                 .segment_id = segment_id,
                                 .epoch = 1,
                                 .length = static_cast<uint32_t>(data.size()),
                                 .open = 1,
                                 .remote = 1});
  w.put_bytes(data);
  Reply reply;
  Status s = call(service, wire::Opcode::kBackupWrite, body, &reply);
  if (status != nullptr) *status = s;
  if (s != Status::kOk || reply.body().size() != sizeof(wire::BackupWriteResponse)) {
    return std::nullopt;
  }
  wire::BackupWriteResponse region;
  std::memcpy(&region, reply.body().data(), sizeof(region));
  return region;
}

// What a master's RDMA WRITEs would leave: segment bytes [from, to), then the slot.
void land(const wire::BackupWriteResponse& region, std::span<const std::byte> segment,
          uint32_t from, uint32_t to) {
  auto* base = reinterpret_cast<std::byte*>(region.address);
  std::memcpy(base + region.data_offset + from, segment.data() + from, to - from);
}

wire::RemoteCertificate make_slot(uint32_t held, const Certificate& cert, uint64_t sequence) {
  wire::RemoteCertificate slot{.held_bytes = held,
                               .certificate_bytes = cert.segment_bytes,
                               .certificate_checksum = cert.checksum,
                               .sequence = sequence};
  slot.check = checksum64(
      std::as_bytes(std::span(&slot, 1)).first(offsetof(wire::RemoteCertificate, check)));
  return slot;
}

void land_slot(const wire::BackupWriteResponse& region, const wire::RemoteCertificate& slot) {
  std::memcpy(reinterpret_cast<std::byte*>(region.address) + region.slot_offset, &slot,
              sizeof(slot));
}

uint32_t listed_bytes(BackupService& service, uint64_t master_id, uint64_t segment_id) {
  for (const auto& e : list(service)) {
    if (e.master_id == master_id && e.segment_id == segment_id) return e.certificate_bytes;
  }
  FAIL("replica not listed");
  return 0;
}

// Two images of one segment, the first a prefix of the second, each with its certificate.
struct Prefixes {
  SegmentImage small = make_segment(10, 20);
  SegmentImage big = make_segment(10, 60);
  Prefixes() {
    REQUIRE(small.certificate.segment_bytes < big.certificate.segment_bytes);
    REQUIRE(std::equal(small.bytes.begin(), small.bytes.begin() + small.certificate.segment_bytes,
                       big.bytes.begin()));
  }
};

}  // namespace

TEST_CASE(
    "backup one-sided: appends written into the exposed buffer count once their slot proves them",
    "[backup][one-sided]") {
  test::TempDir dir("/var/tmp");
  ExposingTransport t;
  auto service = make_exposing(dir.path, t);
  Prefixes p;
  std::span<const std::byte> all(p.big.bytes);
  const uint32_t first = 100;
  auto region = open_remote(*service, 1, 10, all.first(first));
  REQUIRE(region.has_value());
  CHECK(service->regions_exposed() == 1);
  CHECK(region->capacity == kSegmentBytes);
  CHECK(region->slot_offset + sizeof(wire::RemoteCertificate) <= region->data_offset);
  CHECK(uint64_t{region->data_offset} + region->capacity <= region->bytes);

  // The first append: the bytes, then the slot.
  const uint32_t small_end = p.small.certificate.segment_bytes;
  land(*region, all, first, small_end);
  CHECK(listed_bytes(*service, 1, 10) == 0);  // no slot yet
  land_slot(*region, make_slot(small_end, p.small.certificate, 1));
  CHECK(listed_bytes(*service, 1, 10) == small_end);
  CHECK(service->remote_appends() == 1);

  // The second, then the close as an RPC at the end of what was written one-sided.
  const uint32_t big_end = p.big.certificate.segment_bytes;
  land(*region, all, small_end, big_end);
  land_slot(*region, make_slot(big_end, p.big.certificate, 2));
  REQUIRE(write(*service, {.offset = big_end, .certificate = p.big.certificate, .close = true}) ==
          Status::kOk);
  CHECK(service->regions_exposed() == 0);
  CHECK(t.withdrawn.size() == 1);
  CHECK(t.exposed.empty());
  check_file_valid(dir.path, 1, 10, p.big);
}

TEST_CASE("backup one-sided: a torn slot or bytes that do not prove out change nothing",
          "[backup][one-sided]") {
  test::TempDir dir("/var/tmp");
  ExposingTransport t;
  auto service = make_exposing(dir.path, t);
  Prefixes p;
  std::span<const std::byte> all(p.big.bytes);
  auto region = open_remote(*service, 1, 10, all.first(64));
  REQUIRE(region.has_value());
  const uint32_t end = p.small.certificate.segment_bytes;

  // A slot whose own check fails (torn while the next one landed).
  auto torn = make_slot(end, p.small.certificate, 1);
  torn.held_bytes ^= 1;
  land(*region, all, 64, end);
  land_slot(*region, torn);
  CHECK(listed_bytes(*service, 1, 10) == 0);

  // A whole slot over bytes that have not all landed: the certificate does not prove them.
  auto* base = reinterpret_cast<std::byte*>(region->address) + region->data_offset;
  std::byte saved = base[end - 1];
  base[end - 1] ^= std::byte{0x5a};
  land_slot(*region, make_slot(end, p.small.certificate, 1));
  CHECK(listed_bytes(*service, 1, 10) == 0);
  // Once they have, the same slot counts.
  base[end - 1] = saved;
  CHECK(listed_bytes(*service, 1, 10) == end);

  // A slot that goes back (an older sequence or fewer bytes) is not what a master writes.
  land_slot(*region, make_slot(64, Certificate{}, 5));
  CHECK(listed_bytes(*service, 1, 10) == end);

  // An RPC that builds on unproven bytes is a gap: refused, so the master re-replicates.
  CHECK(write(*service, {.offset = end + 100, .data = all.subspan(end + 100, 10)}) ==
        Status::kBadRequest);
}

TEST_CASE("backup one-sided: a fence withdraws the master's regions and keeps what landed before",
          "[backup][one-sided]") {
  test::TempDir dir("/var/tmp");
  ExposingTransport t;
  auto service = make_exposing(dir.path, t);
  Prefixes p;
  std::span<const std::byte> all(p.big.bytes);
  auto a = open_remote(*service, 1, 10, all.first(64));
  auto b = open_remote(*service, 2, 10, all.first(64));  // another master's
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  CHECK(service->regions_exposed() == 2);
  const uint32_t end = p.small.certificate.segment_bytes;
  land(*a, all, 64, end);
  land_slot(*a, make_slot(end, p.small.certificate, 1));

  service->fence_master(1);
  CHECK(service->regions_exposed() == 1);
  CHECK(t.withdrawn.contains(a->key));
  CHECK(t.exposed.contains(b->key));
  // What landed before the fence was taken in; nothing written after it counts (on an
  // adapter it would not land at all).
  const uint32_t big_end = p.big.certificate.segment_bytes;
  land(*a, all, end, big_end);
  land_slot(*a, make_slot(big_end, p.big.certificate, 2));
  CHECK(listed_bytes(*service, 1, 10) == end);
  CHECK(write(*service, {.master_id = 1, .offset = end, .data = all.subspan(end, 8)}) ==
        Status::kFenced);

  // A replaced generation is fenced the same way.
  service->fence_generations_below(2 | (uint64_t{1} << 32));
  CHECK(service->regions_exposed() == 0);
  CHECK(t.withdrawn.contains(b->key));
}

TEST_CASE("backup one-sided: a freed replica's region is withdrawn before its buffer is reused",
          "[backup][one-sided]") {
  test::TempDir dir("/var/tmp");
  ExposingTransport t;
  auto service = make_exposing(dir.path, t);
  auto image = make_segment(10, 20);
  std::span<const std::byte> all(image.bytes);
  auto region = open_remote(*service, 1, 10, all.first(64));
  REQUIRE(region.has_value());
  REQUIRE(free_replica(*service, 1, 10) == Status::kOk);
  CHECK(t.withdrawn.contains(region->key));
  CHECK(service->regions_exposed() == 0);
  // The buffer goes to the next replica with a new region and a clean slot.
  land_slot(*region, make_slot(64, Certificate{}, 9));
  auto again = open_remote(*service, 1, 11, all.first(64));
  REQUIRE(again.has_value());
  CHECK(again->key != region->key);
  CHECK(listed_bytes(*service, 1, 11) == 0);
  // A resent open gets the same region back (its first answer may have been lost).
  auto resent = open_remote(*service, 1, 11, all.first(64));
  REQUIRE(resent.has_value());
  CHECK(resent->key == again->key);
}

TEST_CASE(
    "backup one-sided: no region with disk durability or a transport without one-sided writes",
    "[backup][one-sided]") {
  test::TempDir dir("/var/tmp");
  auto image = make_segment(10, 20);
  std::span<const std::byte> all(image.bytes);
  SECTION("disk durability: every write must reach the disk, which a WRITE cannot say") {
    ExposingTransport t;
    auto service = make_exposing(dir.path, t, Durability::kDisk);
    Status s = Status::kInternal;
    CHECK_FALSE(open_remote(*service, 1, 10, all.first(64), &s).has_value());
    CHECK(s == Status::kOk);
    CHECK(t.exposed.empty());
  }
  SECTION("TCP (expose_memory unavailable) or an adapter that refuses: RPCs only") {
    auto service = make_service(dir.path);  // the shared fake: no one-sided writes
    Status s = Status::kInternal;
    CHECK_FALSE(open_remote(*service, 1, 10, all.first(64), &s).has_value());
    CHECK(s == Status::kOk);
    ExposingTransport refusing;
    refusing.refuse = true;
    test::TempDir other("/var/tmp");
    auto service2 = make_exposing(other.path, refusing);
    CHECK_FALSE(open_remote(*service2, 1, 10, all.first(64), &s).has_value());
    CHECK(s == Status::kOk);
    CHECK(write(*service2, {.offset = 64, .data = all.subspan(64, 64)}) == Status::kOk);
  }
}
