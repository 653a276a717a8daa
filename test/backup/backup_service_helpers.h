// Helpers shared by the backup service's tests (backup_service_test.cc and
// backup_service_flush_test.cc): request bodies, a fake transport that records deferred
// replies, and a loop that pumps the service until they come.
#pragma once

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

#include "backup/backup_service.h"

namespace ramkv::backup::testing {

constexpr uint32_t kSegmentBytes = 64 * 1024;

using test::SegmentImage;

inline SegmentImage make_segment(uint64_t segment_id, int objects) {
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
inline FakeTransport& transport() {
  static FakeTransport t;
  return t;
}
inline uint64_t next_serial = 0;

// Hands a request to the service. Returns its serial; *now is its status when it was
// answered at once, nullopt when deferred (transport().replies gets it later).
inline uint64_t send(BackupService& service, wire::Opcode op, const std::vector<std::byte>& body,
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
inline void pump(BackupService& service, int timeout_ms = 100) {
  if (service.operations_in_flight() > 0) {
    pollfd p{.fd = service.wait_fd(), .events = POLLIN, .revents = 0};
    ::poll(&p, 1, timeout_ms);
  }
  service.run();
}

// The reply to `serial`, running the loop until it comes (or 10 s pass: a failure).
inline Status await(BackupService& service, uint64_t serial) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!transport().replies.contains(serial)) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    pump(service);
  }
  return transport().replies.at(serial);
}

inline std::optional<Status> replied(uint64_t serial) {
  auto it = transport().replies.find(serial);
  if (it == transport().replies.end()) return std::nullopt;
  return it->second;
}

// Runs the loop task until the disk work the requests so far started is done: no
// operation in flight and no new flush started by the last run (a buffered close is
// answered at once and written behind its reply; one held for a recovery, or waiting to
// be tried again, stays queued).
inline void settle(BackupService& service) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (;;) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    const uint64_t started = service.flushes();
    pump(service);
    if (service.operations_in_flight() == 0 && service.flushes() == started) return;
  }
}

// A request and its reply, waiting for a deferred one; then the disk work it started, as
// the server's loop runs the service after each batch of requests.
inline Status call(BackupService& service, wire::Opcode op, const std::vector<std::byte>& body,
                   Reply* reply_out = nullptr) {
  std::optional<Status> now;
  uint64_t serial = send(service, op, body, &now, reply_out);
  Status status = now.has_value() ? *now : await(service, serial);
  settle(service);
  return status;
}

inline std::vector<std::byte> write_body(const WriteArgs& a) {
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

inline Status write(BackupService& service, const WriteArgs& a) {
  return call(service, wire::Opcode::kBackupWrite, write_body(a));
}

// A write whose reply may be deferred: its serial, with *now as in send().
inline uint64_t start_write(BackupService& service, const WriteArgs& a,
                            std::optional<Status>* now) {
  return send(service, wire::Opcode::kBackupWrite, write_body(a), now);
}

inline std::vector<std::byte> free_body(uint64_t master_id, uint64_t segment_id) {
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(
      wire::BackupFreeRequest{.master_id = master_id, .segment_id = segment_id});
  return body;
}

inline Status free_replica(BackupService& service, uint64_t master_id, uint64_t segment_id) {
  return call(service, wire::Opcode::kBackupFree, free_body(master_id, segment_id));
}

// `backup start reading data` for a crashed master: its recovery starts here.
inline Status start_reading(BackupService& service, uint64_t master_id, uint64_t recovery_id) {
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(
      wire::StartReadingDataRequest{.master_id = master_id, .recovery_id = recovery_id});
  return call(service, wire::Opcode::kBackupStartReadingData, body);
}

inline std::vector<wire::ReplicaEntry> list(BackupService& service) {
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

inline std::unique_ptr<BackupService> attached(Result<std::unique_ptr<BackupService>> created) {
  REQUIRE(created.ok());
  (*created)->attach(transport());
  return std::move(*created);
}

inline std::unique_ptr<BackupService> make_service(const std::string& dir,
                                                   Durability durability = Durability::kBuffered,
                                                   uint32_t max_buffers = 4,
                                                   const Clock* clock = &SystemClock::instance()) {
  return attached(BackupService::create({.data_dir = dir,
                                         .segment_bytes = kSegmentBytes,
                                         .max_buffers = max_buffers,
                                         .durability = durability,
                                         .clock = clock}));
}

// Writes a whole segment as a master would: open with the first half, then the rest
// with the final certificate and close.
inline void replicate(BackupService& service, uint64_t master_id, uint64_t segment_id,
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

inline void check_file_valid(const std::string& dir, uint64_t master_id, uint64_t segment_id,
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
inline std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace ramkv::backup::testing
