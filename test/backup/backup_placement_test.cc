// Writes received in place (backup_service.h, "Writes received in place"): the service's
// placer, driven here as the TCP transport drives it (tcp_transport_test.cc covers the
// transport's side): ask with the header and the prefix, receive the rest into the memory
// it names, hand the request over with the rest as Reply::placed(), then let go.
#include "test/backup/backup_service_helpers.h"

namespace ramkv::backup::testing {
namespace {

constexpr uint32_t kBigSegment = 512 * 1024;

// The fake transport, plus the placer the service installs.
class PlacingTransport final : public ServerTransport {
 public:
  Status listen(const std::string&) override { return Status::kOk; }
  std::string locator() const override { return "fake:0"; }
  void run(const Handler&) override {}
  void add_loop_task(LoopTask*) override {}
  bool send_deferred(const ReplyToken& token, const Reply& reply) override {
    replies[token.serial] = reply.status();
    return true;
  }
  void stop() override {}
  void set_placer(size_t prefix_bytes, size_t min_body_bytes, Placer placer) override {
    prefix = prefix_bytes;
    min_body = min_body_bytes;
    placer_ = std::move(placer);
  }
  Placement ask(const wire::MessageHeader& h, std::span<const std::byte> body) {
    REQUIRE(placer_);
    return placer_(h, body.first(prefix));
  }

  size_t prefix = 0;
  size_t min_body = 0;
  std::map<uint64_t, Status> replies;

 private:
  Placer placer_;
};

struct Placed {
  wire::MessageHeader header;
  std::vector<std::byte> body;
  Placement placement;
};

std::unique_ptr<BackupService> make(PlacingTransport& t, const std::string& dir,
                                    Durability durability = Durability::kBuffered) {
  auto created = BackupService::create(
      {.data_dir = dir, .segment_bytes = kBigSegment, .max_buffers = 4, .durability = durability});
  REQUIRE(created.ok());
  (*created)->attach(t);
  return std::move(*created);
}

// Asks the placer about a write; the rest of its body is not "received" yet.
Placed begin(PlacingTransport& t, const WriteArgs& a) {
  Placed p;
  p.body = write_body(a);
  p.header.opcode = static_cast<uint16_t>(wire::Opcode::kBackupWrite);
  p.header.body_bytes = static_cast<uint32_t>(p.body.size());
  REQUIRE(p.body.size() >= t.min_body);
  p.placement = t.ask(p.header, p.body);
  return p;
}

// The deferred reply to `serial`, running the service's loop until it comes (10 s at most).
Status await_reply(PlacingTransport& t, BackupService& service, uint64_t serial) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!t.replies.contains(serial)) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    pump(service);
  }
  return t.replies.at(serial);
}

// The transport's receive: the rest of the body into the placed memory.
void receive(Placed& p, size_t prefix) {
  REQUIRE(p.placement.rest.size() == p.body.size() - prefix);
  std::memcpy(p.placement.rest.data(), p.body.data() + prefix, p.placement.rest.size());
}

// Hands the placed request to the service, then lets go as the transport does. Returns
// the status, waiting for a deferred reply.
Status finish(PlacingTransport& t, BackupService& service, Placed& p, size_t prefix) {
  Reply reply;
  const uint64_t serial = ++next_serial;
  reply.set_token({.connection = 7, .serial = serial, .request = p.header});
  reply.set_placed(p.placement.rest);
  service.handle(p.header, std::span<const std::byte>(p.body).first(prefix), reply);
  p.placement = {};  // released: the transport is done with the memory
  if (!reply.deferred()) return reply.status();
  return await_reply(t, service, serial);
}

Status plain(PlacingTransport& t, BackupService& service, const WriteArgs& a) {
  const auto body = write_body(a);
  wire::MessageHeader h;
  h.opcode = static_cast<uint16_t>(wire::Opcode::kBackupWrite);
  h.body_bytes = static_cast<uint32_t>(body.size());
  Reply reply;
  const uint64_t serial = ++next_serial;
  reply.set_token({.connection = 8, .serial = serial, .request = h});
  service.handle(h, body, reply);
  const Status status = reply.deferred() ? await_reply(t, service, serial) : reply.status();
  settle(service);  // a close's write to disk, behind its reply
  return status;
}

}  // namespace

TEST_CASE("backup service: large writes are received into the replica's buffer, open and append",
          "[backup][placement]") {
  test::TempDir dir("/var/tmp");
  PlacingTransport t;
  auto service = make(t, dir.path);
  REQUIRE(t.prefix == sizeof(wire::BackupWriteRequest));
  const SegmentImage image = test::make_segment(3, 12000, kBigSegment);
  const std::span<const std::byte> all(image.bytes);
  REQUIRE(all.size() > 300'000);
  const uint32_t first = 150'001;  // not on a block boundary
  const uint32_t second = static_cast<uint32_t>(all.size()) - first - 1000;

  Placed open = begin(t, {.segment_id = 3, .data = all.first(first), .open = true});
  REQUIRE(!open.placement.rest.empty());  // into a buffer taken for the new replica
  receive(open, t.prefix);
  CHECK(finish(t, *service, open, t.prefix) == Status::kOk);
  CHECK(service->buffers_in_use() == 1);

  Placed append = begin(t, {.segment_id = 3, .offset = first, .data = all.subspan(first, second)});
  REQUIRE(!append.placement.rest.empty());  // past the held bytes of the replica
  receive(append, t.prefix);
  CHECK(finish(t, *service, append, t.prefix) == Status::kOk);
  CHECK(service->bytes_placed() == uint64_t{first} + second);

  // A write that does not start at the held length is not placed: write() decides it (a
  // resend of bytes held, acknowledged again).
  Placed resend = begin(t, {.segment_id = 3, .data = all.first(first), .open = true});
  CHECK(resend.placement.rest.empty());
  // The small rest, with the certificate, and the close go as usual.
  CHECK(plain(t, *service,
              {.segment_id = 3,
               .offset = first + second,
               .data = all.subspan(first + second),
               .certificate = image.certificate,
               .close = true}) == Status::kOk);
  check_file_valid(dir.path, 1, 3, image);
  CHECK(service->buffers_in_use() == 0);
}

TEST_CASE("backup service: while a write is received in place, others to the replica wait",
          "[backup][placement]") {
  test::TempDir dir("/var/tmp");
  PlacingTransport t;
  auto service = make(t, dir.path);
  const SegmentImage image = test::make_segment(4, 8000, kBigSegment);
  const std::span<const std::byte> all(image.bytes);
  const uint32_t first = 1000;
  REQUIRE(plain(t, *service, {.segment_id = 4, .data = all.first(first), .open = true}) ==
          Status::kOk);
  Placed append = begin(t, {.segment_id = 4, .offset = first, .data = all.subspan(first, 200'000)});
  REQUIRE(!append.placement.rest.empty());
  // The same bytes on another connection (a resend after a reconnect): kRetry, nothing
  // changes; and no second placement into the same replica.
  CHECK(
      plain(t, *service, {.segment_id = 4, .offset = first, .data = all.subspan(first, 200'000)}) ==
      Status::kRetry);
  CHECK(begin(t, {.segment_id = 4, .offset = first, .data = all.subspan(first, 200'000)})
            .placement.rest.empty());
  receive(append, t.prefix);
  CHECK(finish(t, *service, append, t.prefix) == Status::kOk);
  // Once it is in, the resend is a resend: acknowledged again.
  CHECK(
      plain(t, *service, {.segment_id = 4, .offset = first, .data = all.subspan(first, 200'000)}) ==
      Status::kOk);
}

TEST_CASE("backup service: a replica freed while a write is received into it keeps the buffer away",
          "[backup][placement]") {
  test::TempDir dir("/var/tmp");
  PlacingTransport t;
  auto service = make(t, dir.path);
  const SegmentImage image = test::make_segment(5, 8000, kBigSegment);
  const std::span<const std::byte> all(image.bytes);
  REQUIRE(plain(t, *service, {.segment_id = 5, .data = all.first(1000), .open = true}) ==
          Status::kOk);
  Placed append = begin(t, {.segment_id = 5, .offset = 1000, .data = all.subspan(1000, 200'000)});
  REQUIRE(!append.placement.rest.empty());
  const size_t free_before = service->buffers_free();
  CHECK(free_replica(*service, 1, 5) == Status::kOk);
  CHECK(service->buffers_in_use() == 0);
  // The transport still writes into the freed replica's buffer: not back in the pool, so
  // no new replica can be given it.
  CHECK(service->buffers_free() == free_before);
  REQUIRE(plain(t, *service, {.segment_id = 6, .data = all.first(10), .open = true}) ==
          Status::kOk);
  receive(append, t.prefix);
  CHECK(finish(t, *service, append, t.prefix) == Status::kBadRequest);  // unknown replica now
  CHECK(service->buffers_free() == free_before + 1);                    // let go: back in the pool
  CHECK(service->buffers_in_use() == 1);                                // replica 6
}

TEST_CASE("backup service: an open placed but refused gives its buffer back",
          "[backup][placement]") {
  test::TempDir dir("/var/tmp");
  PlacingTransport t;
  auto service = make(t, dir.path);
  const SegmentImage image = test::make_segment(7, 8000, kBigSegment);
  const std::span<const std::byte> all(image.bytes);
  // An open whose certificate claims more than it holds is refused once it is in.
  Placed open = begin(t, {.segment_id = 7,
                          .data = all.first(100'000),
                          .certificate = {.segment_bytes = 200'000, .checksum = 1},
                          .open = true});
  REQUIRE(!open.placement.rest.empty());
  CHECK(service->buffers_in_use() == 1);  // taken for it while it is received
  receive(open, t.prefix);
  CHECK(finish(t, *service, open, t.prefix) == Status::kBadRequest);
  CHECK(service->buffers_in_use() == 0);
  CHECK(service->replica_count() == 0);
}

TEST_CASE("backup service: in disk mode a flush waits for a write being received in place",
          "[backup][placement]") {
  // A flush zeroes the tail of the block the held bytes end in; the bytes received in
  // place start in that block, so no flush may start under them.
  test::TempDir dir("/var/tmp");
  PlacingTransport t;
  auto service = make(t, dir.path, Durability::kDisk);
  const SegmentImage image = test::make_segment(8, 8000, kBigSegment);
  const std::span<const std::byte> all(image.bytes);
  const uint32_t first = 5000;  // ends inside a block
  Reply reply;
  const auto open_body = write_body({.segment_id = 8, .data = all.first(first), .open = true});
  wire::MessageHeader h;
  h.opcode = static_cast<uint16_t>(wire::Opcode::kBackupWrite);
  h.body_bytes = static_cast<uint32_t>(open_body.size());
  const uint64_t open_serial = ++next_serial;
  reply.set_token({.connection = 8, .serial = open_serial, .request = h});
  service->handle(h, open_body, reply);
  REQUIRE(reply.deferred());  // its flush is queued, not started

  const uint32_t second = static_cast<uint32_t>(all.size()) - first;
  Placed append = begin(t, {.segment_id = 8,
                            .offset = first,
                            .data = all.subspan(first, second),
                            .certificate = image.certificate,
                            .close = true});
  REQUIRE(!append.placement.rest.empty());
  receive(append, t.prefix);
  for (int i = 0; i < 5; ++i) pump(*service, 10);
  CHECK(service->flushes() == 0);  // held back while the bytes are being received
  CHECK(!t.replies.contains(open_serial));
  CHECK(finish(t, *service, append, t.prefix) == Status::kOk);
  CHECK(await_reply(t, *service, open_serial) == Status::kOk);
  check_file_valid(dir.path, 1, 8, image);
}

}  // namespace ramkv::backup::testing
