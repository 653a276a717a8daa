// The backup service: replicas opened, appended, closed and freed over the wire format,
// both durability modes, resent writes, the bounded buffer pool, zombie fencing, I/O
// failures, a disk that fills up, and a restart over the same directory; replies deferred
// until the disk has the bytes, several writes in flight, and a real server loop.
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
#include "test/backup/segment_image.h"
#include "test/backup/small_filesystem.h"
#include "test/temp_dir.h"

using namespace ramkv;
using namespace ramkv::backup;

namespace {

constexpr uint32_t kSegmentBytes = 64 * 1024;

using test::SegmentImage;

SegmentImage make_segment(uint64_t segment_id, int objects) {
  return test::make_segment(segment_id, objects, kSegmentBytes);
}

struct WriteArgs {
  uint64_t master_id = 1;
  uint64_t segment_id = 10;
  uint64_t epoch = 1;
  uint32_t offset = 0;
  std::span<const std::byte> data{};
  Certificate certificate{};
  bool open = false;
  bool close = false;
};

// Stands in for the server's transport: keeps the deferred replies the service sends, by
// the serial of the request's token.
class FakeTransport final : public ServerTransport {
 public:
  Status listen(const std::string&) override { return Status::kOk; }
  std::string locator() const override { return "fake:0"; }
  void run(const Handler&) override {}
  void add_loop_task(LoopTask*) override {}  // the tests run the service themselves
  bool send_deferred(const ReplyToken& token, const Reply& reply) override {
    REQUIRE(replies.emplace(token.serial, reply.status()).second);  // one reply per request
    order.push_back(token.serial);
    return true;
  }
  void stop() override {}

  std::map<uint64_t, Status> replies;  // serial -> status
  std::vector<uint64_t> order;         // serials in the order answered
};

// One for the whole binary: serials never repeat, so services need not share anything else.
FakeTransport& transport() {
  static FakeTransport t;
  return t;
}
uint64_t next_serial = 0;

// Hands a request to the service. Returns its serial; *now is its status when it was
// answered at once, nullopt when deferred (transport().replies gets it later).
uint64_t send(BackupService& service, wire::Opcode op, const std::vector<std::byte>& body,
              std::optional<Status>* now, Reply* reply_out = nullptr) {
  wire::MessageHeader header;
  header.opcode = static_cast<uint16_t>(op);
  header.body_bytes = static_cast<uint32_t>(body.size());
  Reply reply;
  const uint64_t serial = ++next_serial;
  reply.set_token({.connection = 1, .serial = serial, .request = header});
  service.handle(header, body, reply);
  if (reply.deferred()) {
    *now = std::nullopt;
  } else {
    *now = reply.status();
  }
  if (reply_out != nullptr) *reply_out = reply;
  return serial;
}

// Runs the service's loop task once, after sleeping on its descriptor (as the server's
// loop does) for up to `timeout_ms` when something is in flight.
void pump(BackupService& service, int timeout_ms = 100) {
  if (service.operations_in_flight() > 0) {
    pollfd p{.fd = service.wait_fd(), .events = POLLIN, .revents = 0};
    ::poll(&p, 1, timeout_ms);
  }
  service.run();
}

// The reply to `serial`, running the loop until it comes (or 10 s pass: a failure).
Status await(BackupService& service, uint64_t serial) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!transport().replies.contains(serial)) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    pump(service);
  }
  return transport().replies.at(serial);
}

std::optional<Status> replied(uint64_t serial) {
  auto it = transport().replies.find(serial);
  if (it == transport().replies.end()) return std::nullopt;
  return it->second;
}

// A request and its reply, waiting for a deferred one.
Status call(BackupService& service, wire::Opcode op, const std::vector<std::byte>& body,
            Reply* reply_out = nullptr) {
  std::optional<Status> now;
  uint64_t serial = send(service, op, body, &now, reply_out);
  return now.has_value() ? *now : await(service, serial);
}

std::vector<std::byte> write_body(const WriteArgs& a) {
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  w.put(wire::BackupWriteRequest{.master_id = a.master_id,
                                 .segment_id = a.segment_id,
                                 .epoch = a.epoch,
                                 .offset = a.offset,
                                 .length = static_cast<uint32_t>(a.data.size()),
                                 .certificate_bytes = a.certificate.segment_bytes,
                                 .certificate_checksum = a.certificate.checksum,
                                 .open = static_cast<uint8_t>(a.open ? 1 : 0),
                                 .close = static_cast<uint8_t>(a.close ? 1 : 0)});
  w.put_bytes(a.data);
  return body;
}

Status write(BackupService& service, const WriteArgs& a) {
  return call(service, wire::Opcode::kBackupWrite, write_body(a));
}

// A write whose reply may be deferred: its serial, with *now as in send().
uint64_t start_write(BackupService& service, const WriteArgs& a, std::optional<Status>* now) {
  return send(service, wire::Opcode::kBackupWrite, write_body(a), now);
}

std::vector<std::byte> free_body(uint64_t master_id, uint64_t segment_id) {
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(
      wire::BackupFreeRequest{.master_id = master_id, .segment_id = segment_id});
  return body;
}

Status free_replica(BackupService& service, uint64_t master_id, uint64_t segment_id) {
  return call(service, wire::Opcode::kBackupFree, free_body(master_id, segment_id));
}

std::vector<wire::ReplicaEntry> list(BackupService& service) {
  Reply reply;
  REQUIRE(call(service, wire::Opcode::kBackupListReplicas, {}, &reply) == Status::kOk);
  wire::BodyReader in(reply.body());
  wire::BackupListHeader h;
  REQUIRE(in.get(&h));
  std::vector<wire::ReplicaEntry> out(h.count);
  for (auto& e : out) REQUIRE(in.get(&e));
  REQUIRE(in.at_end());
  return out;
}

std::unique_ptr<BackupService> attached(Result<std::unique_ptr<BackupService>> created) {
  REQUIRE(created.ok());
  (*created)->attach(transport());
  return std::move(*created);
}

std::unique_ptr<BackupService> make_service(const std::string& dir,
                                            Durability durability = Durability::kBuffered,
                                            uint32_t max_buffers = 4) {
  return attached(BackupService::create({.data_dir = dir,
                                         .segment_bytes = kSegmentBytes,
                                         .max_buffers = max_buffers,
                                         .durability = durability}));
}

// Writes a whole segment as a master would: open with the first half, then the rest
// with the final certificate and close.
void replicate(BackupService& service, uint64_t master_id, uint64_t segment_id,
               const SegmentImage& image) {
  std::span<const std::byte> all(image.bytes);
  size_t half = all.size() / 2;
  REQUIRE(write(service, {.master_id = master_id,
                          .segment_id = segment_id,
                          .data = all.first(half),
                          .open = true}) == Status::kOk);
  REQUIRE(write(service, {.master_id = master_id,
                          .segment_id = segment_id,
                          .offset = static_cast<uint32_t>(half),
                          .data = all.subspan(half),
                          .certificate = image.certificate,
                          .close = true}) == Status::kOk);
}

void check_file_valid(const std::string& dir, uint64_t master_id, uint64_t segment_id,
                      const SegmentImage& image) {
  auto loaded = load_replica(replica_path(dir, master_id, segment_id));
  REQUIRE(loaded.ok());
  CHECK(loaded->header.closed);
  CHECK(loaded->header.master_id == master_id);
  CHECK(loaded->header.segment_id == segment_id);
  CHECK(loaded->header.certificate_bytes == image.certificate.segment_bytes);
  auto bytes = loaded->data.span().first(loaded->header.certificate_bytes);
  SegmentIterator it(
      bytes, Certificate{loaded->header.certificate_bytes, loaded->header.certificate_checksum});
  CHECK(it.validate() == Status::kOk);
  CHECK(std::equal(bytes.begin(), bytes.end(), image.bytes.begin(),
                   image.bytes.begin() + static_cast<ptrdiff_t>(bytes.size())));
}

// A file's bytes; empty when it does not exist.
std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

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
  CHECK_FALSE(std::filesystem::exists(replica_path(dir.path, 1, 10)));
  CHECK(free_replica(*service, 1, 11) == Status::kOk);  // an open one: its buffer returns
  CHECK(service->buffers_in_use() == 0);
  CHECK(service->replica_count() == 0);
  CHECK(free_replica(*service, 1, 10) == Status::kOk);
  CHECK(list(*service).empty());
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

TEST_CASE("backup service: an I/O error on close fails it and leaves the replica open",
          "[backup][service]") {
  test::TempDir dir("/var/tmp");
  auto service = make_service(dir.path);
  auto image = make_segment(10, 5);
  std::span<const std::byte> all(image.bytes);
  REQUIRE(write(*service, {.master_id = 7, .data = all, .open = true}) == Status::kOk);
  // A plain file where the master's directory should be.
  std::ofstream(dir.path + "/7") << "in the way";
  WriteArgs close{.master_id = 7,
                  .offset = static_cast<uint32_t>(all.size()),
                  .certificate = image.certificate,
                  .close = true};
  CHECK(write(*service, close) == Status::kIoError);
  auto replicas = list(*service);
  REQUIRE(replicas.size() == 1);
  CHECK(replicas[0].closed == 0);
  CHECK(replicas[0].certificate_bytes == 0);
  std::filesystem::remove(dir.path + "/7");
  CHECK(write(*service, close) == Status::kOk);
  check_file_valid(dir.path, 7, 10, image);
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
  CHECK_FALSE(std::filesystem::exists(replica_path(dir.path, 1, 11)));
  check_file_valid(dir.path, 1, 10, image);
}

TEST_CASE("backup service: a full disk answers no space and keeps every acknowledged replica",
          "[backup][service][disk]") {
  auto durability = GENERATE(Durability::kBuffered, Durability::kDisk);
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
  // nothing; a close that failed left it open, with a file only in disk mode, where the
  // open wrote one.
  const std::string failed_path = replica_path(dir, 1, failed.segment_id);
  auto replicas = list(*service);
  if (failed_at_open || durability == Durability::kBuffered) {
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

TEST_CASE("backup service: in buffered mode only the close waits for the disk",
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
  uint64_t close = start_write(
      *service,
      {.offset = 200, .data = all.subspan(200), .certificate = image.certificate, .close = true},
      &now);
  CHECK_FALSE(now.has_value());
  // While the close is in flight: a resend of a write held in RAM is answered at once, a
  // resent close waits with it, and an append is refused (the replica is closing).
  start_write(*service, {.offset = 100, .data = all.subspan(100, 100)}, &now);
  CHECK(now == Status::kOk);
  uint64_t resent_close = start_write(
      *service,
      {.offset = 200, .data = all.subspan(200), .certificate = image.certificate, .close = true},
      &now);
  CHECK_FALSE(now.has_value());
  start_write(*service, {.offset = static_cast<uint32_t>(all.size()), .data = all.first(8)}, &now);
  CHECK(now == Status::kBadRequest);
  CHECK(await(*service, close) == Status::kOk);
  CHECK(await(*service, resent_close) == Status::kOk);
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
  CHECK_FALSE(std::filesystem::exists(path));
  CHECK(service->replica_count() == 0);
  CHECK(service->buffers_in_use() == 0);

  // A free that arrives before the open is durable: the open is answered, then the free.
  uint64_t open = start_write(*service, {.segment_id = 11, .data = all, .open = true}, &now);
  free = send(*service, wire::Opcode::kBackupFree, free_body(1, 11), &now);
  CHECK_FALSE(now.has_value());
  CHECK(await(*service, open) == Status::kOk);
  CHECK(await(*service, free) == Status::kOk);
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
