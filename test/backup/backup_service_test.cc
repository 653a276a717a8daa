// The backup service: replicas opened, appended, closed and freed over the wire format,
// both durability modes, resent writes, the bounded buffer pool, zombie fencing, I/O
// failures, a disk that fills up, and a restart over the same directory. The asynchronous
// disk path is in backup_service_flush_test.cc.
#include "backup/backup_service.h"

#include <poll.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <thread>

#include "backup/replica_file.h"
#include "backup/replica_scanner.h"
#include "common/certificate.h"
#include "common/checksum.h"
#include "common/segment_iterator.h"
#include "test/backup/backup_service_helpers.h"
#include "test/backup/segment_image.h"
#include "test/backup/small_filesystem.h"
#include "test/temp_dir.h"

using namespace ramkv;
using namespace ramkv::backup;

namespace {
using namespace ramkv::backup::testing;
}  // namespace

TEST_CASE("backup service: a replica opened, written and closed loads and validates",
          "[backup][service]") {
  auto durability = GENERATE(Durability::kBuffered, Durability::kDisk);
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, durability);
  auto image = make_segment(10, 50);
  std::span<const std::byte> all(image.bytes);
  size_t half = all.size() / 2;
  REQUIRE(write(*service, {.data = all.first(half), .open = true}) == Status::kOk);
  // Buffered: only in RAM until the close. Disk: on disk before the reply.
  bool on_disk = std::filesystem::exists(replica_path(dir.path, 1, 10));
  CHECK(on_disk == (durability == Durability::kDisk));
  CHECK(service->buffers_in_use() == 1);
  REQUIRE(write(*service, {.offset = static_cast<uint32_t>(half),
                           .data = all.subspan(half),
                           .certificate = image.certificate,
                           .close = true}) == Status::kOk);
  CHECK(service->buffers_in_use() == 0);
  check_file_valid(dir.path, 1, 10, image);
  auto replicas = list(*service);
  REQUIRE(replicas.size() == 1);
  CHECK(replicas[0].closed == 1);
  CHECK(replicas[0].status == wire::kReplicaOk);
  CHECK(replicas[0].certificate_bytes == image.certificate.segment_bytes);
}

TEST_CASE(
    "backup service: wrong offsets, closed or unknown replicas and bad bodies are bad requests",
    "[backup][service]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path);
  auto image = make_segment(10, 10);
  std::span<const std::byte> all(image.bytes);
  REQUIRE(write(*service, {.data = all.first(100), .open = true}) == Status::kOk);
  // The bytes held never change, and appends leave no gap.
  std::vector<std::byte> other(all.begin() + 50, all.begin() + 60);
  other[3] ^= std::byte{1};
  CHECK(write(*service, {.offset = 50, .data = other}) == Status::kBadRequest);
  CHECK(write(*service, {.offset = 200, .data = all.subspan(200, 10)}) == Status::kBadRequest);
  // A certificate claiming bytes that were never sent.
  CHECK(write(*service, {.offset = 100, .data = all.subspan(100, 10), .certificate = {500, 1}}) ==
        Status::kBadRequest);
  // Past the segment's size.
  std::vector<std::byte> big(kSegmentBytes);
  CHECK(write(*service, {.offset = 100, .data = big}) == Status::kBadRequest);
  // Unknown replica without open.
  CHECK(write(*service, {.segment_id = 99, .data = all.first(10)}) == Status::kBadRequest);
  CHECK(service->replica_count() == 1);
  // Closed replicas are immutable.
  REQUIRE(write(*service, {.offset = 100,
                           .data = all.subspan(100),
                           .certificate = image.certificate,
                           .close = true}) == Status::kOk);
  CHECK(write(*service, {.offset = static_cast<uint32_t>(all.size()), .data = all.first(8)}) ==
        Status::kBadRequest);
  CHECK(write(*service, {.epoch = 2, .data = all.first(8), .open = true}) == Status::kBadRequest);
  check_file_valid(dir.path, 1, 10, image);

  // Malformed bodies: short, lying length, trailing bytes, bad flags, and reserved opcodes.
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  w.put(wire::BackupWriteRequest{.master_id = 2, .segment_id = 1, .length = 64, .open = 1});
  w.put_bytes(all.first(32));
  CHECK(call(*service, wire::Opcode::kBackupWrite, body) == Status::kBadRequest);
  CHECK(call(*service, wire::Opcode::kBackupWrite,
             std::vector<std::byte>(body.begin(), body.begin() + 20)) == Status::kBadRequest);
  w.put_bytes(all.first(40));  // 8 bytes too many
  CHECK(call(*service, wire::Opcode::kBackupWrite, body) == Status::kBadRequest);
  CHECK(
      write(
          *service,
          {.master_id = 2, .segment_id = 1, .data = all.first(8), .open = true, .close = false}) ==
      Status::kOk);
  std::vector<std::byte> flags;
  wire::BodyWriter(&flags).put(
      wire::BackupWriteRequest{.master_id = 2, .segment_id = 1, .offset = 8, .close = 7});
  CHECK(call(*service, wire::Opcode::kBackupWrite, flags) == Status::kBadRequest);
  CHECK(call(*service, wire::Opcode::kBackupFree, std::vector<std::byte>(5)) ==
        Status::kBadRequest);
  CHECK(call(*service, wire::Opcode::kBackupListReplicas, std::vector<std::byte>(1)) ==
        Status::kBadRequest);
  CHECK(call(*service, wire::Opcode::kBackupOpen, {}) == Status::kBadRequest);
  CHECK(call(*service, wire::Opcode::kBackupClose, {}) == Status::kBadRequest);
  CHECK(call(*service, wire::Opcode::kRead, {}) == Status::kBadRequest);
  CHECK(service->replica_count() == 2);
}

TEST_CASE("backup service: a resent write that matches the bytes held is acknowledged again",
          "[backup][service]") {
  auto durability = GENERATE(Durability::kBuffered, Durability::kDisk);
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, durability);
  auto image = make_segment(10, 50);
  std::span<const std::byte> all(image.bytes);
  const std::string path = replica_path(dir.path, 1, 10);
  WriteArgs open{.data = all.first(100), .open = true};
  WriteArgs append{.offset = 100, .data = all.subspan(100, 100), .certificate = {100, 7}};
  REQUIRE(write(*service, open) == Status::kOk);
  REQUIRE(write(*service, append) == Status::kOk);
  std::string file_before = slurp(path);  // empty when buffered: nothing on disk yet

  // Resent open, resent append, and any piece within the bytes held: acknowledged, and
  // nothing changes, on disk included.
  CHECK(write(*service, open) == Status::kOk);
  CHECK(write(*service, append) == Status::kOk);
  CHECK(write(*service, {.offset = 50, .data = all.subspan(50, 10)}) == Status::kOk);
  CHECK(write(*service, {.offset = 200, .certificate = {100, 7}}) == Status::kOk);
  CHECK(slurp(path) == file_before);
  CHECK(service->replica_count() == 1);
  CHECK(service->buffers_in_use() == 1);
  auto replicas = list(*service);
  REQUIRE(replicas.size() == 1);
  CHECK(replicas[0].epoch == 1);
  CHECK(replicas[0].certificate_bytes == 100);
  CHECK(replicas[0].closed == 0);

  // The master goes on where it was.
  WriteArgs close{
      .offset = 200, .data = all.subspan(200), .certificate = image.certificate, .close = true};
  REQUIRE(write(*service, close) == Status::kOk);
  check_file_valid(dir.path, 1, 10, image);
  std::string file_closed = slurp(path);

  // A resent close, and resends of earlier writes, to the closed replica: acknowledged.
  CHECK(write(*service, close) == Status::kOk);
  CHECK(write(*service, append) == Status::kOk);
  CHECK(write(*service, open) == Status::kOk);
  CHECK(slurp(path) == file_closed);
  CHECK(service->buffers_in_use() == 0);
  // But not a close at another length, a newer epoch, or another certificate.
  CHECK(write(*service, {.offset = 100, .data = all.subspan(100, 100), .close = true}) ==
        Status::kBadRequest);
  CHECK(write(*service, {.epoch = 2, .data = all.first(100)}) == Status::kBadRequest);
  Certificate other = image.certificate;
  other.checksum ^= 1;
  CHECK(write(*service, {.offset = 200, .data = all.subspan(200), .certificate = other}) ==
        Status::kBadRequest);
  CHECK(slurp(path) == file_closed);
  replicas = list(*service);
  REQUIRE(replicas.size() == 1);
  CHECK(replicas[0].closed == 1);
  CHECK(replicas[0].certificate_bytes == image.certificate.segment_bytes);
}

TEST_CASE("backup service: a resent write whose bytes differ from those held is a bad request",
          "[backup][service]") {
  auto durability = GENERATE(Durability::kBuffered, Durability::kDisk);
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, durability);
  auto image = make_segment(10, 50);
  std::span<const std::byte> all(image.bytes);
  REQUIRE(write(*service, {.data = all.first(200), .open = true}) == Status::kOk);
  std::vector<std::byte> changed(all.begin(), all.begin() + 300);
  changed[150] ^= std::byte{0x80};
  std::span<const std::byte> bad(changed);

  CHECK(write(*service, {.data = bad.first(200), .open = true}) == Status::kBadRequest);
  CHECK(write(*service, {.offset = 100, .data = bad.subspan(100, 100)}) == Status::kBadRequest);
  CHECK(write(*service, {.offset = 150, .data = bad.subspan(150, 1)}) == Status::kBadRequest);
  // Overlapping the held bytes with a difference there: the new tail is not taken either.
  CHECK(write(*service, {.offset = 100, .data = bad.subspan(100, 200)}) == Status::kBadRequest);
  // Matching bytes, but the same certificate length with another checksum, or a newer
  // epoch, inside the bytes held: not a resend, and not an append.
  REQUIRE(write(*service, {.offset = 200, .certificate = {100, 5}}) == Status::kOk);
  CHECK(write(*service, {.offset = 100, .data = all.subspan(100, 50), .certificate = {100, 6}}) ==
        Status::kBadRequest);
  CHECK(write(*service, {.epoch = 2, .offset = 100, .data = all.subspan(100, 50)}) ==
        Status::kBadRequest);
  // A certificate older than the one held is a resend's (its checksum cannot be checked).
  CHECK(write(*service, {.offset = 100, .data = all.subspan(100, 50), .certificate = {50, 1}}) ==
        Status::kOk);

  // Nothing changed: the rest of the segment follows at 200.
  REQUIRE(write(*service, {.offset = 200,
                           .data = all.subspan(200),
                           .certificate = image.certificate,
                           .close = true}) == Status::kOk);
  check_file_valid(dir.path, 1, 10, image);
}

TEST_CASE("backup service: a write overlapping the bytes held appends only its new tail",
          "[backup][service]") {
  auto durability = GENERATE(Durability::kBuffered, Durability::kDisk);
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, durability);
  auto image = make_segment(10, 200);
  std::span<const std::byte> all(image.bytes);
  REQUIRE(all.size() > 5000);
  REQUIRE(write(*service, {.data = all.first(100), .open = true}) == Status::kOk);
  // A resent open that now carries more bytes.
  CHECK(write(*service, {.data = all.first(300), .open = true}) == Status::kOk);
  // Across a 4 KiB block of the file.
  CHECK(write(*service, {.offset = 200, .data = all.subspan(200, 4000)}) == Status::kOk);
  CHECK(write(*service, {.offset = 4100, .data = all.subspan(4100, 100)}) == Status::kOk);
  // The held length moved: appends follow at 4200, and 300 is inside.
  CHECK(write(*service, {.offset = 4300, .data = all.subspan(4300, 10)}) == Status::kBadRequest);
  CHECK(write(*service, {.offset = 300, .data = all.subspan(300, 10)}) == Status::kOk);
  // The close itself overlapping.
  REQUIRE(write(*service, {.offset = 4000,
                           .data = all.subspan(4000),
                           .certificate = image.certificate,
                           .close = true}) == Status::kOk);
  check_file_valid(dir.path, 1, 10, image);
  CHECK(service->buffers_in_use() == 0);
}

TEST_CASE("backup service: a full buffer pool answers retry until a replica closes",
          "[backup][service]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, Durability::kBuffered, 2);
  auto image = make_segment(1, 5);
  std::span<const std::byte> all(image.bytes);
  REQUIRE(write(*service, {.segment_id = 1, .data = all, .open = true}) == Status::kOk);
  REQUIRE(write(*service, {.segment_id = 2, .data = all, .open = true}) == Status::kOk);
  CHECK(write(*service, {.segment_id = 3, .data = all, .open = true}) == Status::kRetry);
  CHECK(service->replica_count() == 2);
  REQUIRE(write(*service, {.segment_id = 1,
                           .offset = static_cast<uint32_t>(all.size()),
                           .certificate = image.certificate,
                           .close = true}) == Status::kOk);
  CHECK(write(*service, {.segment_id = 3, .data = all, .open = true}) == Status::kOk);
  CHECK(service->buffers_in_use() == 2);
}

TEST_CASE("backup service: free removes the replica and its file, and may be resent",
          "[backup][service]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path);
  auto image = make_segment(10, 5);
  replicate(*service, 1, 10, image);
  REQUIRE(write(*service, {.segment_id = 11, .data = image.bytes, .open = true}) == Status::kOk);
  REQUIRE(std::filesystem::exists(replica_path(dir.path, 1, 10)));
  CHECK(free_replica(*service, 1, 10) == Status::kOk);
  service->wait_for_removals();
  CHECK_FALSE(std::filesystem::exists(replica_path(dir.path, 1, 10)));
  CHECK(free_replica(*service, 1, 11) == Status::kOk);  // an open one: its buffer returns
  CHECK(service->buffers_in_use() == 0);
  CHECK(service->replica_count() == 0);
  CHECK(free_replica(*service, 1, 10) == Status::kOk);
  CHECK(list(*service).empty());
}

TEST_CASE("backup service: a freed replica's file goes in the background, never a newer one",
          "[backup][service]") {
  // The master frees a replica, then makes the same segment's replica here again (as it
  // may when this is the only backup it has left): the old file's deletion, queued on the
  // remover, must not take the new file with it.
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path);
  auto first = make_segment(10, 5);
  auto second = make_segment(10, 9);
  for (int round = 0; round < 20; ++round) {
    INFO("round " << round);
    replicate(*service, 1, 10, round % 2 == 0 ? first : second);
    REQUIRE(free_replica(*service, 1, 10) == Status::kOk);
    CHECK(service->replica_count() == 0);  // forgotten at once
    replicate(*service, 1, 10, round % 2 == 0 ? second : first);
    service->wait_for_removals();
    check_file_valid(dir.path, 1, 10, round % 2 == 0 ? second : first);
    REQUIRE(free_replica(*service, 1, 10) == Status::kOk);
  }
  service->wait_for_removals();
  CHECK_FALSE(std::filesystem::exists(replica_path(dir.path, 1, 10)));
}

TEST_CASE("backup service: a removed master's replicas go at once, their files soon after",
          "[backup][service]") {
  // free_master forgets the replicas on the spot; their files (and the master's
  // directory) are deleted off the dispatch thread, in the background.
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path);
  auto image = make_segment(10, 5);
  for (uint64_t segment = 10; segment < 14; ++segment) replicate(*service, 1, segment, image);
  REQUIRE(write(*service, {.segment_id = 14, .data = image.bytes, .open = true}) == Status::kOk);
  replicate(*service, 2, 10, image);  // another master's stays
  service->fence_master(1);
  service->free_master(1);
  CHECK(service->replica_count() == 1);
  CHECK(service->buffers_in_use() == 0);  // the open one's buffer is back
  const auto master_dir = std::filesystem::path(dir.path) / "1";
  for (int i = 0; i < 500 && std::filesystem::exists(master_dir); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK_FALSE(std::filesystem::exists(master_dir));
  check_file_valid(dir.path, 2, 10, image);
  service->free_master(1);  // again (each server list shows it removed): nothing left to do
  CHECK(service->replica_count() == 1);
}

TEST_CASE("backup service: a fenced master can neither write nor free", "[backup][service]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path);
  auto image = make_segment(10, 5);
  std::span<const std::byte> all(image.bytes);
  replicate(*service, 1, 10, image);
  REQUIRE(write(*service, {.segment_id = 11, .data = all.first(64), .open = true}) == Status::kOk);
  service->fence_master(1);
  CHECK(write(*service, {.segment_id = 11, .offset = 64, .data = all.subspan(64, 64)}) ==
        Status::kFenced);
  CHECK(write(*service, {.segment_id = 12, .data = all, .open = true}) == Status::kFenced);
  CHECK(free_replica(*service, 1, 10) == Status::kFenced);
  CHECK(std::filesystem::exists(replica_path(dir.path, 1, 10)));
  // Other masters carry on.
  replicate(*service, 2, 10, image);
  check_file_valid(dir.path, 2, 10, image);
}

TEST_CASE("backup service: a buffered close whose write fails stays in RAM and is written later",
          "[backup][service]") {
  // Two ways the write can fail: a plain file where the master's directory should be (the
  // directory cannot be made), or a directory where the replica's file should go (the
  // ring's open fails).
  const bool file_in_the_way = GENERATE(true, false);
  test::TempDir dir("/var/tmp");
  ManualClock clock;
  auto service = make_service(dir.path, Durability::kBuffered, 4, &clock);
  auto image = make_segment(10, 5);
  std::span<const std::byte> all(image.bytes);
  REQUIRE(write(*service, {.master_id = 7, .data = all, .open = true}) == Status::kOk);
  const std::string in_the_way = file_in_the_way ? dir.path + "/7" : dir.path + "/7/10/x";
  if (file_in_the_way) {
    std::ofstream(in_the_way) << "in the way";
  } else {
    std::filesystem::create_directories(in_the_way);
  }
  WriteArgs close{.master_id = 7,
                  .offset = static_cast<uint32_t>(all.size()),
                  .certificate = image.certificate,
                  .close = true};
  // Acknowledged from the buffer; its write fails behind the reply (write() runs the loop).
  CHECK(write(*service, close) == Status::kOk);
  CHECK(service->flush_failures() == 1);
  CHECK(service->flushes_queued() == 1);  // tried again in a second
  CHECK(service->buffers_in_use() == 1);  // which keeps the bytes
  auto replicas = list(*service);
  REQUIRE(replicas.size() == 1);
  CHECK(replicas[0].closed == 1);
  CHECK(replicas[0].certificate_bytes == image.certificate.segment_bytes);
  CHECK(write(*service, close) == Status::kOk);  // a resend, acknowledged again

  // Not tried again before its time, even with the way clear.
  std::filesystem::remove_all(file_in_the_way ? in_the_way : dir.path + "/7/10");
  settle(*service);
  CHECK(service->flushes_queued() == 1);
  CHECK_FALSE(std::filesystem::exists(replica_path(dir.path, 7, 10)));
  clock.advance_ns(BackupService::kFlushRetryNs);
  settle(*service);
  CHECK(service->flushes_queued() == 0);
  CHECK(service->flush_failures() == 1);
  check_file_valid(dir.path, 7, 10, image);
  CHECK(service->buffers_in_use() == 0);
}

TEST_CASE("backup service: a free of a buffered close that waits to be written needs no disk",
          "[backup][service]") {
  test::TempDir dir("/var/tmp");
  ManualClock clock;
  auto service = make_service(dir.path, Durability::kBuffered, 4, &clock);
  auto image = make_segment(10, 5);
  std::span<const std::byte> all(image.bytes);
  std::ofstream(dir.path + "/7") << "in the way";
  REQUIRE(write(*service, {.master_id = 7, .data = all, .open = true}) == Status::kOk);
  REQUIRE(write(*service, {.master_id = 7,
                           .offset = static_cast<uint32_t>(all.size()),
                           .certificate = image.certificate,
                           .close = true}) == Status::kOk);
  REQUIRE(service->flushes_queued() == 1);
  // Answered at once: the queued write is dropped with the replica and its buffer.
  std::optional<Status> now;
  send(*service, wire::Opcode::kBackupFree, free_body(7, 10), &now);
  CHECK(now == Status::kOk);
  CHECK(service->flushes_queued() == 0);
  CHECK(service->buffers_in_use() == 0);
  CHECK(service->replica_count() == 0);
  clock.advance_ns(BackupService::kFlushRetryNs);
  settle(*service);
  CHECK(service->flush_failures() == 1);  // never tried again
}

TEST_CASE("backup service: a restarted backup lists its replicas, torn ones flagged",
          "[backup][service]") {
  test::TempDir dir("/var/tmp");
  auto image = make_segment(10, 50);
  {
    auto service = make_service(dir.path, Durability::kDisk);
    replicate(*service, 1, 10, image);
    replicate(*service, 1, 11, image);
    replicate(*service, 3, 12, image);
  }
  // A crash part-way through writing replica 11.
  REQUIRE(::truncate(replica_path(dir.path, 1, 11).c_str(),
                     static_cast<off_t>(kReplicaHeaderBlock + image.bytes.size() / 2)) == 0);
  auto service = make_service(dir.path);
  auto replicas = list(*service);
  REQUIRE(replicas.size() == 3);
  CHECK(replicas[0].master_id == 1);
  CHECK(replicas[0].segment_id == 10);
  CHECK(replicas[0].closed == 1);
  CHECK(replicas[0].status == wire::kReplicaOk);
  CHECK(replicas[0].certificate_bytes == image.certificate.segment_bytes);
  CHECK(replicas[1].segment_id == 11);
  CHECK(replicas[1].status == wire::kReplicaTorn);
  CHECK(replicas[2].master_id == 3);
  CHECK(replicas[2].status == wire::kReplicaOk);
  // What was found on disk is never written again, and can be freed.
  CHECK(write(*service, {.segment_id = 10,
                         .offset = image.certificate.segment_bytes,
                         .data = std::span(image.bytes).first(8)}) == Status::kBadRequest);
  CHECK(free_replica(*service, 1, 11) == Status::kOk);
  service->wait_for_removals();
  CHECK_FALSE(std::filesystem::exists(replica_path(dir.path, 1, 11)));
  check_file_valid(dir.path, 1, 10, image);
}

TEST_CASE("backup service: a full disk answers no space and keeps every acknowledged replica",
          "[backup][service][disk]") {
  // In disk mode; a buffered close is answered from RAM (the test after this one).
  const auto durability = Durability::kDisk;
  std::string why;
  auto fs = test::SmallFilesystem::create(8 << 20, &why);  // about 6 MiB for files
  if (fs == nullptr) {
    WARN("SKIPPED: no small ext4 filesystem to fill: " << why);
    return;
  }
  constexpr uint32_t kBigSegmentBytes = 1 << 20;
  constexpr uint32_t kFirst = 8192;
  const Certificate kNothing = CertificateBuilder().finish(0);  // of an empty prefix
  const std::string dir = fs->path() + "/backup";               // apart from lost+found
  // Declared after fs: gone before the unmount.
  auto service = attached(BackupService::create({.data_dir = dir,
                                                 .segment_bytes = kBigSegmentBytes,
                                                 .max_buffers = 2,
                                                 .durability = durability}));

  // Whole segments of about 1 MiB, opened with their first 8 KiB and closed with the rest,
  // until the disk is full: in disk mode the open writes the file, and the close that
  // fails finds it there.
  std::vector<SegmentImage> acked;
  SegmentImage failed;
  Status status = Status::kOk;
  bool failed_at_open = false;
  for (uint64_t segment_id = 1; segment_id <= 16; ++segment_id) {
    auto image = test::make_segment(segment_id, 30000, kBigSegmentBytes);
    std::span<const std::byte> all(image.bytes);
    status = write(*service, {.segment_id = segment_id,
                              .data = all.first(kFirst),
                              .certificate = kNothing,
                              .open = true});
    failed_at_open = status != Status::kOk;
    if (status == Status::kOk) {
      status = write(*service, {.segment_id = segment_id,
                                .offset = kFirst,
                                .data = all.subspan(kFirst),
                                .certificate = image.certificate,
                                .close = true});
    }
    if (status != Status::kOk) {
      failed = std::move(image);
      break;
    }
    acked.push_back(std::move(image));
  }
  REQUIRE(status == Status::kNoSpace);
  REQUIRE(acked.size() >= 2);
  INFO(acked.size() << " replicas acknowledged, then no space at the "
                    << (failed_at_open ? "open" : "close"));

  // Every acknowledged replica is whole on disk, and listed closed.
  for (const auto& image : acked) check_file_valid(dir, 1, image.segment_id, image);
  auto scanned = scan_replicas(dir);
  REQUIRE(scanned.ok());
  // Invariant 4: the failed write left the replica as it was. An open that failed left
  // nothing; a close that failed left it open, with the file its open wrote.
  const std::string failed_path = replica_path(dir, 1, failed.segment_id);
  auto replicas = list(*service);
  if (failed_at_open) {
    CHECK_FALSE(std::filesystem::exists(failed_path));
    CHECK(scanned->size() == acked.size());
  } else {
    auto loaded = load_replica(failed_path);
    REQUIRE(loaded.ok());
    CHECK_FALSE(loaded->header.closed);
    CHECK(loaded->header.certificate_bytes == 0);
    CHECK(scanned->size() == acked.size() + 1);
  }
  for (const auto& s : *scanned) CHECK(s.status == Status::kOk);
  REQUIRE(replicas.size() == acked.size() + (failed_at_open ? 0 : 1));
  for (size_t i = 0; i < acked.size(); ++i) {
    CHECK(replicas[i].closed == 1);
    CHECK(replicas[i].certificate_bytes == acked[i].certificate.segment_bytes);
  }
  if (!failed_at_open) {
    CHECK(replicas.back().closed == 0);
    CHECK(replicas.back().certificate_bytes == 0);
  }

  // A resent close of an acknowledged replica needs no room: acknowledged again.
  std::span<const std::byte> last(acked.back().bytes);
  CHECK(write(*service, {.segment_id = acked.back().segment_id,
                         .offset = kFirst,
                         .data = last.subspan(kFirst),
                         .certificate = acked.back().certificate,
                         .close = true}) == Status::kOk);

  // The service carries on: a free makes room, and the failed replica is written again.
  CHECK(free_replica(*service, 1, acked.front().segment_id) == Status::kOk);
  service->wait_for_removals();
  CHECK_FALSE(std::filesystem::exists(replica_path(dir, 1, acked.front().segment_id)));
  std::span<const std::byte> all(failed.bytes);
  if (failed_at_open) {
    REQUIRE(write(*service, {.segment_id = failed.segment_id,
                             .data = all.first(kFirst),
                             .certificate = kNothing,
                             .open = true}) == Status::kOk);
  }
  REQUIRE(write(*service, {.segment_id = failed.segment_id,
                           .offset = kFirst,
                           .data = all.subspan(kFirst),
                           .certificate = failed.certificate,
                           .close = true}) == Status::kOk);
  check_file_valid(dir, 1, failed.segment_id, failed);
  CHECK(service->buffers_in_use() == 0);

  // And a restart finds exactly those replicas, all whole.
  service.reset();
  auto restarted = BackupService::create({.data_dir = dir, .segment_bytes = kBigSegmentBytes});
  REQUIRE(restarted.ok());
  replicas = list(**restarted);
  CHECK(replicas.size() == acked.size());
  for (const auto& r : replicas) CHECK(r.status == wire::kReplicaOk);
}

TEST_CASE("backup service: on a full disk, buffered closes stay in RAM until there is room",
          "[backup][service][disk]") {
  std::string why;
  auto fs = test::SmallFilesystem::create(8 << 20, &why);  // about 6 MiB for files
  if (fs == nullptr) {
    WARN("SKIPPED: no small ext4 filesystem to fill: " << why);
    return;
  }
  constexpr uint32_t kBigSegmentBytes = 1 << 20;
  const std::string dir = fs->path() + "/backup";
  ManualClock clock;
  // One flush at a time, in queue order: which waiting close gets the room freed below
  // must not depend on how two concurrent writes race for the blocks.
  auto service = attached(BackupService::create({.data_dir = dir,
                                                 .segment_bytes = kBigSegmentBytes,
                                                 .max_buffers = 2,
                                                 .durability = Durability::kBuffered,
                                                 .max_flush_bytes = 1,
                                                 .clock = &clock}));
  // Whole segments of about 1 MiB, each acknowledged from RAM, until the buffers of
  // closes that could not be written leave no room for an open.
  std::vector<SegmentImage> acked;
  Status status = Status::kOk;
  for (uint64_t segment_id = 1; segment_id <= 16 && status == Status::kOk; ++segment_id) {
    auto image = test::make_segment(segment_id, 30000, kBigSegmentBytes);
    status = write(*service, {.segment_id = segment_id, .data = image.bytes, .open = true});
    if (status != Status::kOk) break;
    REQUIRE(write(*service, {.segment_id = segment_id,
                             .offset = static_cast<uint32_t>(image.bytes.size()),
                             .certificate = image.certificate,
                             .close = true}) == Status::kOk);
    acked.push_back(std::move(image));
  }
  REQUIRE(status == Status::kRetry);  // invariant 1: the two buffers hold unwritten closes
  REQUIRE(acked.size() >= 4);
  CHECK(service->buffers_in_use() == 2);
  CHECK(service->flush_failures() >= 2);
  CHECK(service->flushes_queued() == 2);
  INFO(acked.size() << " replicas acknowledged");
  const auto& waiting1 = acked[acked.size() - 2];
  const auto& waiting2 = acked.back();
  // Every acknowledged replica is listed closed and whole; all but the two waiting ones
  // are on disk, and those two have no file.
  auto replicas = list(*service);
  REQUIRE(replicas.size() == acked.size());
  for (size_t i = 0; i < acked.size(); ++i) {
    CHECK(replicas[i].closed == 1);
    CHECK(replicas[i].certificate_bytes == acked[i].certificate.segment_bytes);
  }
  for (size_t i = 0; i + 2 < acked.size(); ++i)
    check_file_valid(dir, 1, acked[i].segment_id, acked[i]);
  service->wait_for_removals();  // what the failed tries created goes on the remover's thread
  CHECK_FALSE(std::filesystem::exists(replica_path(dir, 1, waiting1.segment_id)));
  CHECK_FALSE(std::filesystem::exists(replica_path(dir, 1, waiting2.segment_id)));

  // A free makes room; a second later the first waiting close is written, and its buffer
  // takes an open again.
  CHECK(free_replica(*service, 1, acked.front().segment_id) == Status::kOk);
  service->wait_for_removals();
  clock.advance_ns(BackupService::kFlushRetryNs);
  settle(*service);
  check_file_valid(dir, 1, waiting1.segment_id, waiting1);
  CHECK(service->buffers_in_use() == 1);
  // The other is freed while it waits: gone at once, with its buffer.
  CHECK(free_replica(*service, 1, waiting2.segment_id) == Status::kOk);
  CHECK(service->buffers_in_use() == 0);
  CHECK(service->flushes_queued() == 0);

  // A restart finds the replicas that were written, all whole.
  service.reset();
  auto restarted = BackupService::create({.data_dir = dir, .segment_bytes = kBigSegmentBytes});
  REQUIRE(restarted.ok());
  replicas = list(**restarted);
  CHECK(replicas.size() == acked.size() - 2);
  for (const auto& r : replicas) CHECK(r.status == wire::kReplicaOk);
}

TEST_CASE("backup service: buffers touched at start are kept for reuse; the cap stays",
          "[backup][service]") {
  test::TempDir dir("/var/tmp");
  auto service = attached(BackupService::create({.data_dir = dir.path,
                                                 .segment_bytes = kSegmentBytes,
                                                 .max_buffers = 2,
                                                 .buffers_at_start = 3}));
  CHECK(service->buffers_free() == 3);
  CHECK(service->buffers_in_use() == 0);
  auto a = make_segment(10, 50), b = make_segment(11, 50), c = make_segment(12, 50);
  REQUIRE(write(*service, {.segment_id = 10, .data = a.bytes, .open = true}) == Status::kOk);
  REQUIRE(write(*service, {.segment_id = 11, .data = b.bytes, .open = true}) == Status::kOk);
  CHECK(service->buffers_in_use() == 2);
  CHECK(service->buffers_free() == 1);
  // Free buffers do not lift the cap on open replicas (invariant 1).
  CHECK(write(*service, {.segment_id = 12, .data = c.bytes, .open = true}) == Status::kRetry);
  REQUIRE(write(*service, {.segment_id = 10,
                           .offset = static_cast<uint32_t>(a.bytes.size()),
                           .certificate = a.certificate,
                           .close = true}) == Status::kOk);
  CHECK(service->buffers_in_use() == 1);
  CHECK(service->buffers_free() == 2);
  // A reused buffer holds the previous replica's bytes: the new one's file must not.
  REQUIRE(
      write(*service, {.segment_id = 12, .data = std::span(c.bytes).first(100), .open = true}) ==
      Status::kOk);
  REQUIRE(write(*service, {.segment_id = 12,
                           .offset = 100,
                           .data = std::span(c.bytes).subspan(100),
                           .certificate = c.certificate,
                           .close = true}) == Status::kOk);
  check_file_valid(dir.path, 1, 12, c);
}
