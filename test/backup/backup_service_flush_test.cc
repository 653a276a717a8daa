// The backup service's asynchronous disk path: replies deferred until io_uring reports
// the write and fdatasync done, several writes in flight and grouped, failures and frees
// during a flush, teardown, a disk that fills up under async writes, and a real server
// loop answering as writes complete.
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

TEST_CASE("backup service: a disk-mode write is acknowledged only once its flush completes",
          "[backup][service][async]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, Durability::kDisk);
  auto image = make_segment(10, 50);
  std::span<const std::byte> all(image.bytes);
  const std::string path = replica_path(dir.path, 1, 10);

  // handle() only stages the write and defers its reply: nothing has reached the disk,
  // and the replica is not listed until its open is durable.
  std::optional<Status> now;
  uint64_t open = start_write(*service, {.data = all.first(100), .open = true}, &now);
  CHECK_FALSE(now.has_value());
  CHECK(service->deferred_replies() == 1);
  CHECK_FALSE(std::filesystem::exists(path));
  CHECK(list(*service).empty());
  // The loop task answers once the write and its fdatasync have completed.
  CHECK(await(*service, open) == Status::kOk);
  CHECK(service->deferred_replies() == 0);
  CHECK(service->operations_in_flight() == 0);
  auto loaded = load_replica(path);
  REQUIRE(loaded.ok());
  CHECK_FALSE(loaded->header.closed);
  REQUIRE(list(*service).size() == 1);

  // A resend of what is durable is answered at once.
  CHECK(write(*service, {.data = all.first(100), .open = true}) == Status::kOk);
  uint64_t resend = start_write(*service, {.data = all.first(100), .open = true}, &now);
  CHECK(now == Status::kOk);
  CHECK_FALSE(replied(resend).has_value());

  // The close too: the buffer stays in use until the file is closed on disk.
  uint64_t close = start_write(
      *service,
      {.offset = 100, .data = all.subspan(100), .certificate = image.certificate, .close = true},
      &now);
  CHECK_FALSE(now.has_value());
  CHECK(service->buffers_in_use() == 1);
  CHECK(list(*service)[0].closed == 0);
  CHECK(await(*service, close) == Status::kOk);
  CHECK(service->buffers_in_use() == 0);
  CHECK(list(*service)[0].closed == 1);
  check_file_valid(dir.path, 1, 10, image);
}

TEST_CASE("backup service: bytes on their way to the disk are bounded, beyond one flush",
          "[backup][service][async]") {
  // Four replicas' writes, each flush about 48 KiB: with a bound of 64 KiB they go one
  // at a time, and all are answered; with the default bound they go together.
  for (const uint64_t bound : {uint64_t{64} << 10, uint64_t{16} << 20}) {
    test::TempDir dir("/var/tmp");
    auto service = attached(BackupService::create({.data_dir = dir.path,
                                                   .segment_bytes = kSegmentBytes,
                                                   .max_buffers = 8,
                                                   .durability = Durability::kDisk,
                                                   .max_flush_bytes = bound}));
    std::vector<SegmentImage> images;
    std::vector<uint64_t> serials;
    for (uint64_t id = 1; id <= 4; ++id) {
      images.push_back(make_segment(id, 1600));
      REQUIRE(images.back().bytes.size() > 40'000);
      std::optional<Status> now;
      serials.push_back(start_write(
          *service, {.segment_id = id, .data = images.back().bytes, .open = true}, &now));
      REQUIRE_FALSE(now.has_value());
    }
    uint64_t most = 0;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::any_of(serials.begin(), serials.end(), [](uint64_t s) { return !replied(s); })) {
      REQUIRE(std::chrono::steady_clock::now() < deadline);
      pump(*service, 1);
      most = std::max(most, service->flush_bytes_in_flight());
    }
    for (uint64_t s : serials) CHECK(replied(s) == Status::kOk);
    if (bound < (uint64_t{1} << 20)) {
      CHECK(most > 40'000);
      CHECK(most <= bound);  // one flush at a time
    } else {
      CHECK(most > 4 * 40'000);  // all four at once
    }
    for (uint64_t id = 1; id <= 4; ++id) {
      auto loaded = load_replica(replica_path(dir.path, 1, id));
      CHECK(loaded.ok());
    }
  }
}

TEST_CASE("backup service: in buffered mode a close is answered from RAM, then written",
          "[backup][service][async]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, Durability::kBuffered);
  auto image = make_segment(10, 50);
  std::span<const std::byte> all(image.bytes);
  std::optional<Status> now;
  start_write(*service, {.data = all.first(100), .open = true}, &now);
  CHECK(now == Status::kOk);
  start_write(*service, {.offset = 100, .data = all.subspan(100, 100)}, &now);
  CHECK(now == Status::kOk);
  start_write(
      *service,
      {.offset = 200, .data = all.subspan(200), .certificate = image.certificate, .close = true},
      &now);
  CHECK(now == Status::kOk);  // in the buffer: as durable as any buffered write
  // Nothing is on disk yet: the flush starts when the loop runs.
  CHECK(service->flushes() == 0);
  CHECK(service->flushes_queued() == 1);
  CHECK(slurp(replica_path(dir.path, 1, 10)).empty());
  // A resent close is answered at once, an append is refused (the replica is closed).
  start_write(
      *service,
      {.offset = 200, .data = all.subspan(200), .certificate = image.certificate, .close = true},
      &now);
  CHECK(now == Status::kOk);
  start_write(*service, {.offset = static_cast<uint32_t>(all.size()), .data = all.first(8)}, &now);
  CHECK(now == Status::kBadRequest);
  CHECK(service->buffers_in_use() == 1);
  // The loop writes it (list() runs it, as the server's loop runs after each request),
  // then gives the buffer back.
  auto replicas = list(*service);
  REQUIRE(replicas.size() == 1);
  CHECK(replicas[0].closed == 1);
  CHECK(replicas[0].certificate_bytes == image.certificate.segment_bytes);
  CHECK(service->flushes() == 1);
  check_file_valid(dir.path, 1, 10, image);
  CHECK(service->buffers_in_use() == 0);
}

TEST_CASE("backup service: writes in flight to one replica are applied in order, grouped",
          "[backup][service][async]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, Durability::kDisk);
  auto image = make_segment(10, 1000);
  std::span<const std::byte> all(image.bytes);
  REQUIRE(all.size() > 22'000);
  auto other = make_segment(11, 20);

  // Ten writes of 1000 bytes (crossing 4 KiB blocks) in one batch, then ten more sent
  // while the loop runs, so they are staged behind a flush in flight; a resend of a
  // staged write among them; and writes to a second replica alongside.
  std::vector<uint64_t> serials;
  std::optional<Status> now;
  serials.push_back(start_write(*service, {.data = all.first(1000), .open = true}, &now));
  CHECK_FALSE(now.has_value());
  start_write(*service, {.segment_id = 11, .data = other.bytes, .open = true}, &now);
  for (uint32_t i = 1; i < 20; ++i) {
    if (i == 10) service->run();  // the first flush goes out
    serials.push_back(
        start_write(*service, {.offset = i * 1000, .data = all.subspan(i * 1000, 1000)}, &now));
    CHECK_FALSE(now.has_value());
    if (i == 15) {
      // A resend of write 12, not yet durable: it waits for the flush that makes it so.
      uint64_t resend =
          start_write(*service, {.offset = 12'000, .data = all.subspan(12'000, 1000)}, &now);
      CHECK_FALSE(now.has_value());
      serials.push_back(resend);
    }
  }
  // And one that would leave a gap past the staged bytes: refused at once.
  start_write(*service, {.offset = 21'000, .data = all.subspan(21'000, 10)}, &now);
  CHECK(now == Status::kBadRequest);
  for (uint64_t serial : serials) CHECK(await(*service, serial) == Status::kOk);
  // The loop may settle its bookkeeping in a later pass than the last reply (bounded).
  for (int i = 0; i < 100 && service->deferred_replies() != 0; ++i) pump(*service, 20);
  CHECK(service->deferred_replies() == 0);

  // The replies went out in the order the writes came in.
  std::vector<uint64_t> answered;
  for (uint64_t serial : transport().order) {
    if (std::find(serials.begin(), serials.end(), serial) != serials.end()) {
      answered.push_back(serial);
    }
  }
  CHECK(answered == serials);
  // Group commit: the first batch's writes shared a flush, those staged behind it the
  // next one (or two, if the first was still in flight when the second batch came).
  CHECK(service->flushes() <= 4);

  REQUIRE(write(*service, {.offset = 20'000,
                           .data = all.subspan(20'000),
                           .certificate = image.certificate,
                           .close = true}) == Status::kOk);
  check_file_valid(dir.path, 1, 10, image);
  auto replicas = list(*service);
  REQUIRE(replicas.size() == 2);
  CHECK(replicas[1].segment_id == 11);
  CHECK(replicas[1].closed == 0);
}

TEST_CASE("backup service: a failed flush fails the writes staged behind it and drops an open",
          "[backup][service][async]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, Durability::kDisk);
  auto image = make_segment(10, 50);
  std::span<const std::byte> all(image.bytes);
  // A plain file where master 7's directory should be: its first flush cannot open a file.
  std::ofstream(dir.path + "/7") << "in the way";
  std::optional<Status> now;
  uint64_t open =
      start_write(*service, {.master_id = 7, .data = all.first(100), .open = true}, &now);
  uint64_t append =
      start_write(*service, {.master_id = 7, .offset = 100, .data = all.subspan(100, 100)}, &now);
  uint64_t resend =
      start_write(*service, {.master_id = 7, .data = all.first(100), .open = true}, &now);
  CHECK(await(*service, open) == Status::kIoError);
  CHECK(await(*service, append) == Status::kIoError);
  CHECK(await(*service, resend) == Status::kIoError);
  // Invariant 4: an open never acknowledged leaves nothing.
  CHECK(service->replica_count() == 0);
  CHECK(service->buffers_in_use() == 0);
  CHECK(list(*service).empty());

  // Once the way is clear, the master's next try works.
  std::filesystem::remove(dir.path + "/7");
  REQUIRE(write(*service, {.master_id = 7, .data = all.first(100), .open = true}) == Status::kOk);
  REQUIRE(write(*service, {.master_id = 7,
                           .offset = 100,
                           .data = all.subspan(100),
                           .certificate = image.certificate,
                           .close = true}) == Status::kOk);
  check_file_valid(dir.path, 7, 10, image);
}

TEST_CASE("backup service: free of a replica with writes in flight waits for them",
          "[backup][service][async]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, Durability::kDisk);
  auto image = make_segment(10, 50);
  std::span<const std::byte> all(image.bytes);
  const std::string path = replica_path(dir.path, 1, 10);
  REQUIRE(write(*service, {.data = all.first(100), .open = true}) == Status::kOk);

  std::optional<Status> now;
  uint64_t append = start_write(*service, {.offset = 100, .data = all.subspan(100, 100)}, &now);
  REQUIRE_FALSE(now.has_value());
  uint64_t free = send(*service, wire::Opcode::kBackupFree, free_body(1, 10), &now);
  CHECK_FALSE(now.has_value());
  uint64_t resent_free = send(*service, wire::Opcode::kBackupFree, free_body(1, 10), &now);
  CHECK_FALSE(now.has_value());
  // Writes to a replica being freed are told to retry: once it is gone an open makes a
  // new one.
  start_write(*service, {.offset = 200, .data = all.subspan(200, 100)}, &now);
  CHECK(now == Status::kRetry);
  service->run();  // the append's flush goes out; the free waits for it
  if (!replied(free).has_value()) CHECK(std::filesystem::exists(path));
  CHECK(await(*service, append) == Status::kOk);
  CHECK(await(*service, free) == Status::kOk);
  CHECK(await(*service, resent_free) == Status::kOk);
  service->wait_for_removals();
  CHECK_FALSE(std::filesystem::exists(path));
  CHECK(service->replica_count() == 0);
  CHECK(service->buffers_in_use() == 0);

  // A free that arrives before the open is durable: the open is answered, then the free.
  uint64_t open = start_write(*service, {.segment_id = 11, .data = all, .open = true}, &now);
  free = send(*service, wire::Opcode::kBackupFree, free_body(1, 11), &now);
  CHECK_FALSE(now.has_value());
  CHECK(await(*service, open) == Status::kOk);
  CHECK(await(*service, free) == Status::kOk);
  service->wait_for_removals();
  CHECK_FALSE(std::filesystem::exists(replica_path(dir.path, 1, 11)));
  CHECK(service->replica_count() == 0);
}

TEST_CASE("backup service: the service's teardown waits for the writes in flight",
          "[backup][service][async]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, Durability::kDisk);
  auto image = make_segment(10, 400);
  std::optional<Status> now;
  for (uint64_t segment_id = 1; segment_id <= 4; ++segment_id) {
    start_write(*service, {.segment_id = segment_id, .data = image.bytes, .open = true}, &now);
  }
  service->run();
  service.reset();  // waits for the ring before the buffers and files go
  for (uint64_t segment_id = 1; segment_id <= 4; ++segment_id) {
    auto loaded = load_replica(replica_path(dir.path, 1, segment_id));
    if (loaded.ok()) CHECK(loaded->header.segment_id == segment_id);
  }
}

TEST_CASE("backup service: an async write that finds the disk full fails, the replica unchanged",
          "[backup][service][async][disk]") {
  std::string why;
  auto fs = test::SmallFilesystem::create(8 << 20, &why);
  if (fs == nullptr) {
    WARN("SKIPPED: no small ext4 filesystem to fill: " << why);
    return;
  }
  constexpr uint32_t kBigSegmentBytes = 1 << 20;
  const std::string dir = fs->path() + "/backup";
  auto service = attached(BackupService::create({.data_dir = dir,
                                                 .segment_bytes = kBigSegmentBytes,
                                                 .max_buffers = 2,
                                                 .durability = Durability::kDisk}));
  auto image = test::make_segment(10, 30000, kBigSegmentBytes);
  std::span<const std::byte> all(image.bytes);
  REQUIRE(all.size() > 600'000);
  const Certificate kNothing = CertificateBuilder().finish(0);
  REQUIRE(write(*service, {.data = all.first(8192), .certificate = kNothing, .open = true}) ==
          Status::kOk);
  const std::string path = replica_path(dir, 1, 10);
  const std::string file_before = slurp(path);

  // Fill the disk but for about 256 KiB.
  struct statvfs st {};
  REQUIRE(::statvfs(fs->path().c_str(), &st) == 0);
  uint64_t free_bytes = uint64_t{st.f_bfree} * st.f_frsize;  // root may use the reserve
  REQUIRE(free_bytes > (1u << 20));
  {
    std::ofstream filler(fs->path() + "/filler", std::ios::binary);
    std::vector<char> chunk(1 << 16, 'x');
    for (uint64_t left = free_bytes - (256u << 10); left > 0;) {
      auto n = std::min<uint64_t>(left, chunk.size());
      filler.write(chunk.data(), static_cast<std::streamsize>(n));
      left -= n;
    }
    REQUIRE(filler.good());
  }
  ::sync();

  // 600 KB more, in three writes of one batch, and one more staged behind them once
  // their flush is out: all fail with no space, and nothing changes.
  std::optional<Status> now;
  std::vector<uint64_t> serials;
  for (uint32_t offset = 8192; offset < 600'000; offset += 200'000) {
    serials.push_back(
        start_write(*service, {.offset = offset, .data = all.subspan(offset, 200'000)}, &now));
    REQUIRE_FALSE(now.has_value());
  }
  service->run();
  uint64_t behind =
      start_write(*service, {.offset = 608'192, .data = all.subspan(608'192, 1000)}, &now);
  // Staged behind the flush in flight, it fails with it; had the flush already failed,
  // it would be a gap.
  if (now.has_value()) {
    CHECK(now == Status::kBadRequest);
  } else {
    serials.push_back(behind);
  }
  for (uint64_t serial : serials) CHECK(await(*service, serial) == Status::kNoSpace);
  auto replicas = list(*service);
  REQUIRE(replicas.size() == 1);
  CHECK(replicas[0].closed == 0);
  CHECK(replicas[0].certificate_bytes == 0);
  auto loaded = load_replica(path);
  REQUIRE(loaded.ok());
  CHECK(loaded->header.certificate_bytes == 0);
  CHECK_FALSE(loaded->header.closed);
  // The header block is as before; blocks past it may have been written, not certified.
  CHECK(slurp(path).substr(0, kReplicaHeaderBlock) == file_before.substr(0, kReplicaHeaderBlock));
  // The staged bytes are gone: the next write continues from the durable end.
  start_write(*service, {.offset = 208'192, .data = all.subspan(208'192, 10)}, &now);
  CHECK(now == Status::kBadRequest);

  // With room again, the master writes the rest and closes.
  std::filesystem::remove(fs->path() + "/filler");
  REQUIRE(write(*service, {.offset = 8192,
                           .data = all.subspan(8192),
                           .certificate = image.certificate,
                           .close = true}) == Status::kOk);
  check_file_valid(dir, 1, 10, image);
}

TEST_CASE("backup service: on a real server loop, disk writes are answered as they complete",
          "[backup][service][async]") {
  test::TempDir dir("/var/tmp");
  auto created = BackupService::create(
      {.data_dir = dir.path, .segment_bytes = kSegmentBytes, .durability = Durability::kDisk});
  REQUIRE(created.ok());
  auto service = std::move(*created);
  auto server = make_tcp_server_transport({});
  REQUIRE(server->listen("127.0.0.1:0") == Status::kOk);
  // A second task on the same loop, as a combined master and backup has.
  struct Counter final : LoopTask {
    int wait_fd() const override { return -1; }
    uint64_t run() override {
      ++runs;
      return UINT64_MAX;
    }
    std::atomic<int> runs{0};
  } counter;
  server->add_loop_task(&counter);
  service->attach(*server);
  std::thread loop([&] {
    server->run([&](const wire::MessageHeader& h, std::span<const std::byte> body, Reply& reply) {
      service->handle(h, body, reply);
    });
  });

  auto client = make_tcp_client_transport({});
  auto image = make_segment(10, 400);
  std::span<const std::byte> all(image.bytes);
  const uint32_t kPiece = 2000;
  const auto pieces = static_cast<uint32_t>(all.size() / kPiece);
  REQUIRE(pieces > 4);
  std::vector<Status> statuses(pieces + 1, Status::kTimeout);
  // Pipelined, as a master sends them (one connection keeps them in order), and the
  // close last.
  for (uint32_t i = 0; i <= pieces; ++i) {
    bool last = i == pieces;
    WriteArgs a{.offset = i * kPiece,
                .data = last ? all.subspan(i * kPiece) : all.subspan(i * kPiece, kPiece),
                .open = i == 0};
    if (last) {
      a.certificate = image.certificate;
      a.close = true;
    }
    client->send(server->locator(), {.opcode = wire::Opcode::kBackupWrite}, write_body(a),
                 [&statuses, i](Status st, const wire::MessageHeader& h, auto) {
                   statuses[i] = st != Status::kOk ? st : static_cast<Status>(h.status);
                 });
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (client->outstanding() > 0 && std::chrono::steady_clock::now() < deadline) {
    client->poll(100'000'000);
  }
  server->stop();
  loop.join();
  for (Status s : statuses) CHECK(s == Status::kOk);
  CHECK(counter.runs > 0);
  CHECK(service->deferred_replies() == 0);
  check_file_valid(dir.path, 1, 10, image);
}

TEST_CASE("backup service: buffered closes wait while a recovery is read, within bounds",
          "[backup][service][async]") {
  test::TempDir dir("/var/tmp");
  ManualClock clock;
  auto service = make_service(dir.path, Durability::kBuffered, 8, &clock);
  auto start_recovery = [&](uint64_t master_id) {
    REQUIRE(start_reading(*service, master_id, master_id) == Status::kOk);
  };
  std::map<uint64_t, SegmentImage> images;
  auto close_one = [&](uint64_t segment_id) {
    images.emplace(segment_id, make_segment(segment_id, 5));
    replicate(*service, 1, segment_id, images.at(segment_id));
  };
  auto on_disk = [&](uint64_t segment_id) {
    return std::filesystem::exists(replica_path(dir.path, 1, segment_id));
  };
  CHECK_FALSE(service->holding_flushes());
  close_one(10);  // no recovery: written at once
  CHECK(on_disk(10));

  // While master 5's replicas are read, closes are answered and stay in RAM.
  start_recovery(5);
  CHECK(service->holding_flushes());
  close_one(11);
  close_one(12);
  CHECK(service->flushes_queued() == 2);
  CHECK_FALSE(on_disk(11));
  CHECK_FALSE(on_disk(12));
  CHECK(service->buffers_in_use() == 2);
  // The loop comes back to look within 100 ms, with nothing else to wake it.
  CHECK(service->run() <= 100'000'000);
  // Until fewer than a quarter of the buffers are free: then they are written.
  for (uint64_t id = 20; id < 24; ++id) {
    REQUIRE(write(*service, {.segment_id = id, .data = images.at(11).bytes, .open = true}) ==
            Status::kOk);
  }
  CHECK(service->flushes_queued() == 0);
  CHECK(service->buffers_in_use() == 4);  // their buffers went back
  check_file_valid(dir.path, 1, 11, images.at(11));
  check_file_valid(dir.path, 1, 12, images.at(12));
  for (uint64_t id = 20; id < 24; ++id) REQUIRE(free_replica(*service, 1, id) == Status::kOk);
  CHECK(service->buffers_in_use() == 0);

  // Held again with buffers to spare, until the hold's time is over.
  CHECK(service->holding_flushes());
  close_one(13);
  CHECK_FALSE(on_disk(13));
  clock.advance_ns(BackupService::Options{}.recovery_flush_hold_ns);
  CHECK_FALSE(service->holding_flushes());
  settle(*service);
  check_file_valid(dir.path, 1, 13, images.at(13));

  // A new recovery holds them again, and its end lets them go. A close that waits is
  // dropped with its master's replicas.
  service->free_master(5);
  start_recovery(6);
  close_one(14);
  CHECK_FALSE(on_disk(14));
  auto other = make_segment(3, 5);
  replicate(*service, 8, 3, other);
  CHECK(service->flushes_queued() == 2);
  service->free_master(8);
  CHECK(service->flushes_queued() == 1);
  CHECK(service->buffers_in_use() == 1);
  service->free_master(6);
  CHECK_FALSE(service->holding_flushes());
  settle(*service);
  check_file_valid(dir.path, 1, 14, images.at(14));
  CHECK(service->buffers_in_use() == 0);
}

TEST_CASE("backup service: in disk mode nothing waits for a recovery", "[backup][service][async]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, Durability::kDisk);
  REQUIRE(start_reading(*service, 5, 1) == Status::kOk);
  CHECK_FALSE(service->holding_flushes());
  auto image = make_segment(10, 5);
  replicate(*service, 1, 10, image);  // each write answered once it is on disk
  check_file_valid(dir.path, 1, 10, image);
}

TEST_CASE("backup service: a recovery retried with a new id does not hold closes longer",
          "[backup][service][async]") {
  test::TempDir dir("/var/tmp");
  ManualClock clock;
  auto service = make_service(dir.path, Durability::kBuffered, 8, &clock);
  const uint64_t hold = BackupService::Options{}.recovery_flush_hold_ns;
  REQUIRE(start_reading(*service, 5, 1) == Status::kOk);
  clock.advance_ns(hold / 2);
  // The coordinator tries again: same master, new recovery.
  REQUIRE(start_reading(*service, 5, 2) == Status::kOk);
  CHECK(service->holding_flushes());
  clock.advance_ns(hold / 2);
  CHECK_FALSE(service->holding_flushes());  // counted from the master's first recovery
}

TEST_CASE("backup service: a stopping backup writes the closes it holds in RAM",
          "[backup][service][async]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path, Durability::kBuffered, 8);
  REQUIRE(start_reading(*service, 5, 1) == Status::kOk);
  auto image = make_segment(10, 5);
  replicate(*service, 1, 10, image);
  REQUIRE(service->flushes_queued() == 1);  // held for the recovery
  CHECK(service->write_held(10'000'000'000) == 0);
  check_file_valid(dir.path, 1, 10, image);
  CHECK(service->buffers_in_use() == 0);
}
