// The RDMA transport (rdma/rdma_transport.h) over whatever verbs provider this build
// links: in CI the emulated one (rdma/emu, named as such in every test), on a machine
// with an adapter the real one (scripts/rdma-real-device.sh). A server dispatch loop on
// its own thread, clients driving their own polls, as the TCP transport's tests.
#include <catch2/catch.hpp>

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "common/transport.h"
#include "rdma/rdma_transport.h"

namespace ramkv {
namespace {

using rdma::RdmaOptions;

std::string provider_tag() { return std::string(rdma::rdma_provider()); }

// Small buffers keep the tests light; messages above them are refused by the sender.
RdmaOptions test_options() {
  RdmaOptions o;
  o.recv_buffers = 8;
  o.max_message_bytes = 4u << 20;
  o.send_buffers = 4;
  return o;
}

std::vector<std::byte> bytes_of(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()),
          reinterpret_cast<const std::byte*>(s.data()) + s.size()};
}

// An echo server on a free port. kRead answers kObjectNotFound; kWrite defers its reply
// to the loop task; kEnumerate answers with `zero_copy_region` by reference and then
// overwrites it (the transport must have sent it before the handler's caller returned).
class Server {
 public:
  explicit Server(bool busy_poll = false) : region_(64u << 10) {
    std::string why;
    auto t = rdma::make_rdma_server_transport({.busy_poll = busy_poll}, test_options(), &why);
    INFO(why);
    REQUIRE(t.ok());
    server_ = std::move(t).value();
    REQUIRE(server_->listen("127.0.0.1:0") == Status::kOk);
    for (size_t i = 0; i < region_.size(); ++i) region_[i] = static_cast<std::byte>(i % 251);
    REQUIRE(server_->register_memory(region_) == Status::kOk);
    server_->add_loop_task(&deferred_);
    deferred_.server = server_.get();
    deferred_.region = &region_;
    deferred_.zero_copy_sent = &zero_copy_pending_;
    thread_ = std::thread([this] {
      server_->run(
          [this](const wire::MessageHeader& h, std::span<const std::byte> body, Reply& reply) {
            ++served_;
            switch (static_cast<wire::Opcode>(h.opcode)) {
              case wire::Opcode::kRead:
                reply.set_status(Status::kObjectNotFound);
                return;
              case wire::Opcode::kWrite:
                reply.body().assign(body.begin(), body.end());
                reply.defer();
                deferred_.waiting.push_back({reply.token(), reply.body()});
                return;
              case wire::Opcode::kEnumerate:
                reply.add_external(region_);
                zero_copy_pending_ = true;
                return;
              default:
                reply.body().assign(body.begin(), body.end());
            }
          });
    });
  }
  ~Server() {
    server_->stop();
    thread_.join();
  }
  std::string locator() const { return server_->locator(); }
  uint64_t served() const { return served_.load(); }

 private:
  // Answers deferred requests from the loop, as a master's replication does.
  struct Deferred final : LoopTask {
    ServerTransport* server = nullptr;
    std::vector<std::pair<ReplyToken, std::vector<std::byte>>> waiting;
    int wait_fd() const override { return -1; }
    std::vector<std::byte>* region = nullptr;
    bool* zero_copy_sent = nullptr;
    uint64_t run() override {
      if (*zero_copy_sent) {
        // The reply went by reference: scribbling over it now must not change what the
        // client received.
        std::fill(region->begin(), region->end(), std::byte{0xee});
        *zero_copy_sent = false;
      }
      for (auto& [token, body] : waiting) {
        Reply r;
        r.body() = body;
        server->send_deferred(token, r);
      }
      waiting.clear();
      return UINT64_MAX;
    }
  };

  std::vector<std::byte> region_;
  bool zero_copy_pending_ = false;  // dispatch thread only
  std::unique_ptr<ServerTransport> server_;
  Deferred deferred_;
  std::atomic<uint64_t> served_{0};
  std::thread thread_;
};

std::unique_ptr<ClientTransport> client(bool busy_poll = false) {
  std::string why;
  auto t = rdma::make_rdma_client_transport({.busy_poll = busy_poll}, test_options(), &why);
  INFO(why);
  REQUIRE(t.ok());
  return std::move(t).value();
}

CallResult echo(ClientTransport& c, const std::string& locator, std::span<const std::byte> body,
                wire::Opcode op = wire::Opcode::kEcho) {
  return call(c, locator, {.opcode = op, .timeout_ns = 10'000'000'000}, body);
}

std::byte pattern(size_t i, unsigned seed) { return static_cast<std::byte>((i * 131 + seed) >> 1); }

std::vector<std::byte> patterned(size_t bytes, unsigned seed) {
  std::vector<std::byte> v(bytes);
  for (size_t i = 0; i < bytes; ++i) v[i] = pattern(i, seed);
  return v;
}

// A server with one region exposed for remote writes, zeroed. kEcho with a body of two
// u64 (offset, bytes) answers with those bytes of the region as they are when the request
// is served; kRemove withdraws the region (on the dispatch thread, as it must); kRead
// answers kOk with its body echoed.
class RegionServer {
 public:
  explicit RegionServer(size_t region_bytes) : region_(region_bytes) {
    std::string why;
    auto t = rdma::make_rdma_server_transport({}, test_options(), &why);
    INFO(why);
    REQUIRE(t.ok());
    server_ = std::move(t).value();
    REQUIRE(server_->listen("127.0.0.1:0") == Status::kOk);
    locator_ = server_->locator();
    // Exposed before the loop starts; afterwards only from its thread.
    auto r = server_->expose_memory(region_);
    REQUIRE(r.ok());
    exposed_ = *r;
    thread_ = std::thread([this] {
      server_->run(
          [this](const wire::MessageHeader& h, std::span<const std::byte> body, Reply& reply) {
            switch (static_cast<wire::Opcode>(h.opcode)) {
              case wire::Opcode::kEcho: {
                uint64_t range[2] = {0, 0};
                if (body.size() != sizeof(range)) {
                  reply.set_status(Status::kBadRequest);
                  return;
                }
                std::memcpy(range, body.data(), sizeof(range));
                if (range[0] > region_.size() || range[1] > region_.size() - range[0]) {
                  reply.set_status(Status::kBadRequest);
                  return;
                }
                auto from = region_.begin() + static_cast<ptrdiff_t>(range[0]);
                reply.body().assign(from, from + static_cast<ptrdiff_t>(range[1]));
                return;
              }
              case wire::Opcode::kRemove:
                server_->withdraw_memory(exposed_);
                return;
              default:
                reply.body().assign(body.begin(), body.end());
            }
          });
    });
  }
  ~RegionServer() { shut_down(); }
  // Stops the dispatch loop and destroys the transport: its queue pairs and regions go.
  void shut_down() {
    if (server_ == nullptr) return;
    server_->stop();
    thread_.join();
    server_.reset();
  }
  std::string locator() const { return locator_; }
  const RemoteRegion& exposed() const { return exposed_; }
  // Only while nothing writes into it (or once the loop has stopped).
  const std::vector<std::byte>& region() const { return region_; }

 private:
  std::vector<std::byte> region_;
  RemoteRegion exposed_;
  std::string locator_;
  std::unique_ptr<ServerTransport> server_;
  std::thread thread_;
};

// The region's bytes [offset, offset + bytes) as the server sees them when it serves the
// request; the request goes after whatever was written before on the same connection.
void send_read_region(ClientTransport& c, const std::string& locator, uint64_t offset,
                      uint64_t bytes, CallResult* out, bool* done) {
  uint64_t range[2] = {offset, bytes};
  c.send(locator, {.opcode = wire::Opcode::kEcho, .timeout_ns = 10'000'000'000},
         {reinterpret_cast<const std::byte*>(range), sizeof(range)},
         [out, done](Status s, const wire::MessageHeader& h, std::span<const std::byte> body) {
           out->status = s == Status::kOk ? static_cast<Status>(h.status) : s;
           out->body.assign(body.begin(), body.end());
           *done = true;
         });
}

// Polls until `*flag` or `timeout_ns` passes; whether it became true.
bool poll_until(ClientTransport& c, const bool* flag, uint64_t timeout_ns) {
  const uint64_t deadline = SystemClock::instance().now_ns() + timeout_ns;
  while (!*flag && SystemClock::instance().now_ns() < deadline) c.poll(50'000'000);
  return *flag;
}

struct WriteOutcome {
  bool done = false;
  Status status = Status::kOk;
  int calls = 0;
};

ClientTransport::WriteCallback record(WriteOutcome* out) {
  return [out](Status s) {
    out->status = s;
    out->done = true;
    ++out->calls;
  };
}

}  // namespace

TEST_CASE("rdma transport (emulated verbs in CI): requests and replies, small and large",
          "[rdma]") {
  INFO("verbs provider: " << provider_tag());
  Server server;
  auto c = client();
  auto small = echo(*c, server.locator(), bytes_of("hello over rdma"));
  REQUIRE(small.status == Status::kOk);
  CHECK(small.body == bytes_of("hello over rdma"));
  // Empty, inline-sized, send-buffer-sized and larger-than-a-send-buffer bodies.
  for (size_t size : {size_t{0}, size_t{100}, size_t{5000}, size_t{200'000}, size_t{3u << 20}}) {
    std::vector<std::byte> body(size);
    for (size_t i = 0; i < size; ++i) body[i] = static_cast<std::byte>((i * 7) % 256);
    auto r = echo(*c, server.locator(), body);
    INFO("size " << size);
    REQUIRE(r.status == Status::kOk);
    CHECK(r.body == body);
  }
  CHECK(echo(*c, server.locator(), {}, wire::Opcode::kRead).status == Status::kObjectNotFound);
}

TEST_CASE("rdma transport (emulated verbs in CI): a message above the peer's buffers fails cleanly",
          "[rdma]") {
  Server server;
  auto c = client();
  std::vector<std::byte> too_big(5u << 20);
  auto r = echo(*c, server.locator(), too_big);
  CHECK(r.status == Status::kUnavailable);
  // The transport goes on: a new session serves the next request.
  CHECK(echo(*c, server.locator(), bytes_of("after")).status == Status::kOk);
}

TEST_CASE("rdma transport (emulated verbs in CI): many requests in flight, more than a send queue",
          "[rdma]") {
  Server server;
  auto c = client();
  constexpr int kRequests = 700;  // above the send queue's 256 entries
  int done = 0;
  int ok = 0;
  std::vector<std::vector<std::byte>> bodies(kRequests);
  for (int i = 0; i < kRequests; ++i) {
    bodies[static_cast<size_t>(i)] = bytes_of("request-" + std::to_string(i));
    c->send(server.locator(), {.opcode = wire::Opcode::kEcho, .timeout_ns = 30'000'000'000},
            bodies[static_cast<size_t>(i)],
            [&, i](Status s, const wire::MessageHeader&, std::span<const std::byte> b) {
              ++done;
              if (s == Status::kOk &&
                  std::vector<std::byte>(b.begin(), b.end()) == bodies[static_cast<size_t>(i)]) {
                ++ok;
              }
            });
  }
  const uint64_t deadline = SystemClock::instance().now_ns() + 60'000'000'000;
  while (done < kRequests && SystemClock::instance().now_ns() < deadline) c->poll(100'000'000);
  CHECK(done == kRequests);
  CHECK(ok == kRequests);
  CHECK(server.served() == kRequests);
}

TEST_CASE("rdma transport (emulated verbs in CI): deferred and zero-copy replies", "[rdma]") {
  Server server;
  auto c = client();
  auto deferred = echo(*c, server.locator(), bytes_of("later"), wire::Opcode::kWrite);
  REQUIRE(deferred.status == Status::kOk);
  CHECK(deferred.body == bytes_of("later"));
  auto zc = echo(*c, server.locator(), {}, wire::Opcode::kEnumerate);
  REQUIRE(zc.status == Status::kOk);
  REQUIRE(zc.body.size() == 64u << 10);
  bool same = true;
  for (size_t i = 0; i < zc.body.size(); ++i) {
    same = same && zc.body[i] == static_cast<std::byte>(i % 251);
  }
  CHECK(same);
}

TEST_CASE("rdma transport (emulated verbs in CI): a server that goes away fails its requests",
          "[rdma]") {
  auto c = client();
  std::string locator;
  {
    Server server;
    locator = server.locator();
    REQUIRE(echo(*c, locator, bytes_of("before")).status == Status::kOk);
  }
  auto r = call(*c, locator, {.opcode = wire::Opcode::kEcho, .timeout_ns = 20'000'000'000},
                bytes_of("after"));
  CHECK((r.status == Status::kUnavailable || r.status == Status::kTimeout));
  // Nobody listens there any more: connecting fails at once.
  auto again = call(*c, locator, {.opcode = wire::Opcode::kEcho, .timeout_ns = 5'000'000'000},
                    bytes_of("again"));
  CHECK(again.status == Status::kUnavailable);
}

TEST_CASE("rdma transport (emulated verbs in CI): busy-polling server and client", "[rdma]") {
  Server server(/*busy_poll=*/true);
  auto c = client(/*busy_poll=*/true);
  for (int i = 0; i < 50; ++i) {
    auto r = echo(*c, server.locator(), bytes_of("spin " + std::to_string(i)));
    REQUIRE(r.status == Status::kOk);
  }
}

TEST_CASE(
    "rdma transport (emulated verbs in CI): remote writes land in an exposed region before a later "
    "request is served",
    "[rdma][one_sided]") {
  INFO("verbs provider: " << provider_tag());
  RegionServer server(1u << 20);
  const RemoteRegion& region = server.exposed();
  REQUIRE(region.bytes == 1u << 20);
  auto c = client();
  REQUIRE(c->one_sided());

  // Client memory registered once (a master's log): its pieces go by reference.
  std::vector<std::byte> log = patterned(256u << 10, 1);
  REQUIRE(c->register_memory(log) == Status::kOk);
  const std::vector<std::byte> small = patterned(100, 2);      // inline
  const std::vector<std::byte> pooled = patterned(10'000, 3);  // a pooled send buffer
  const std::vector<std::byte> large = patterned(100'000, 4);  // a send buffer of its own
  const std::span<const std::byte> from_log =
      std::span<const std::byte>(log).subspan(4096, 200'000);

  auto check_region = [&](const CallResult& seen) {
    REQUIRE(seen.status == Status::kOk);
    REQUIRE(seen.body.size() == 400'000);
    auto at = [&](size_t offset) { return seen.body.begin() + static_cast<ptrdiff_t>(offset); };
    CHECK(std::equal(small.begin(), small.end(), at(0)));
    CHECK(std::equal(pooled.begin(), pooled.end(), at(1000)));
    CHECK(std::equal(large.begin(), large.end(), at(20'000)));
    CHECK(std::equal(from_log.begin(), from_log.end(), at(150'000)));
  };
  auto writes_at = [&](uint64_t base) {
    return std::vector<ClientTransport::RemoteWrite>{
        {.address = base + 0, .key = region.key, .bytes = small},
        {.address = base + 1000, .key = region.key, .bytes = pooled},
        {.address = base + 20'000, .key = region.key, .bytes = {}},  // empty: nothing moves
        {.address = base + 20'000, .key = region.key, .bytes = large},
        {.address = base + 150'000, .key = region.key, .bytes = from_log},
    };
  };

  SECTION("on a connection that is up") {
    // An RPC first, so the writes are posted at once.
    REQUIRE(echo(*c, server.locator(), bytes_of("up"), wire::Opcode::kRead).status == Status::kOk);
    const uint64_t base = region.address + 4096;
    auto writes = writes_at(base);
    WriteOutcome w;
    c->write_remote(server.locator(), writes, 10'000'000'000, record(&w));
    CHECK_FALSE(w.done);  // never from write_remote() itself
    CHECK(c->outstanding() == 1);
    // Sent right after the writes, without polling in between: served after they landed.
    CallResult seen;
    bool served = false;
    send_read_region(*c, server.locator(), 4096, 400'000, &seen, &served);
    REQUIRE(poll_until(*c, &served, 20'000'000'000));
    REQUIRE(poll_until(*c, &w.done, 20'000'000'000));
    CHECK(w.status == Status::kOk);
    CHECK(w.calls == 1);
    check_region(seen);
    CHECK(c->outstanding() == 0);
  }

  SECTION("on a connection being set up: the writes wait, in order with the request") {
    const uint64_t base = region.address + 500'000;
    auto writes = writes_at(base);
    WriteOutcome w;
    c->write_remote(server.locator(), writes, 10'000'000'000, record(&w));
    CallResult seen;
    bool served = false;
    send_read_region(*c, server.locator(), 500'000, 400'000, &seen, &served);
    CHECK(c->outstanding() == 2);
    REQUIRE(poll_until(*c, &served, 20'000'000'000));
    REQUIRE(poll_until(*c, &w.done, 20'000'000'000));
    CHECK(w.status == Status::kOk);
    check_region(seen);
  }

  SECTION("more writes than a send queue holds, interleaved with requests") {
    REQUIRE(echo(*c, server.locator(), bytes_of("up"), wire::Opcode::kRead).status == Status::kOk);
    // 600 inline writes of 100 bytes each, in three calls with a request after each.
    constexpr int kCalls = 3;
    constexpr int kPerCall = 200;
    std::vector<std::vector<std::byte>> pieces;
    for (int i = 0; i < kCalls * kPerCall; ++i)
      pieces.push_back(patterned(100, static_cast<unsigned>(i)));
    WriteOutcome outcomes[kCalls];
    CallResult seen[kCalls];
    bool served[kCalls] = {};
    for (int call_index = 0; call_index < kCalls; ++call_index) {
      std::vector<ClientTransport::RemoteWrite> writes;
      for (int j = 0; j < kPerCall; ++j) {
        const int i = call_index * kPerCall + j;
        writes.push_back({.address = region.address + static_cast<uint64_t>(i) * 100,
                          .key = region.key,
                          .bytes = pieces[static_cast<size_t>(i)]});
      }
      c->write_remote(server.locator(), writes, 20'000'000'000, record(&outcomes[call_index]));
      send_read_region(*c, server.locator(), 0, static_cast<uint64_t>(kCalls * kPerCall) * 100,
                       &seen[call_index], &served[call_index]);
    }
    for (int call_index = 0; call_index < kCalls; ++call_index) {
      REQUIRE(poll_until(*c, &outcomes[call_index].done, 30'000'000'000));
      CHECK(outcomes[call_index].status == Status::kOk);
      REQUIRE(poll_until(*c, &served[call_index], 30'000'000'000));
      REQUIRE(seen[call_index].status == Status::kOk);
      // Every write of this call and of the calls before it is there.
      const int upto = (call_index + 1) * kPerCall;
      bool same = true;
      for (int i = 0; i < upto; ++i) {
        same = same && std::equal(pieces[static_cast<size_t>(i)].begin(),
                                  pieces[static_cast<size_t>(i)].end(),
                                  seen[call_index].body.begin() + i * 100);
      }
      CHECK(same);
    }
    CHECK(c->outstanding() == 0);
  }

  SECTION("many copied writes in one call: send buffers come back as they complete") {
    REQUIRE(echo(*c, server.locator(), bytes_of("up"), wire::Opcode::kRead).status == Status::kOk);
    constexpr int kRounds = 3;
    constexpr int kWrites = 150;  // each round above the pooled buffers, and 450 in all
    constexpr size_t kBytes = 5000;
    for (int round = 0; round < kRounds; ++round) {
      std::vector<std::vector<std::byte>> pieces;
      std::vector<ClientTransport::RemoteWrite> writes;
      for (int i = 0; i < kWrites; ++i) {
        pieces.push_back(patterned(kBytes, static_cast<unsigned>(round * 1000 + i)));
      }
      for (int i = 0; i < kWrites; ++i) {
        writes.push_back({.address = region.address + static_cast<uint64_t>(i) * kBytes,
                          .key = region.key,
                          .bytes = pieces[static_cast<size_t>(i)]});
      }
      WriteOutcome w;
      c->write_remote(server.locator(), writes, 20'000'000'000, record(&w));
      pieces.clear();  // copied before write_remote() returned
      REQUIRE(poll_until(*c, &w.done, 30'000'000'000));
      CHECK(w.status == Status::kOk);
      CallResult seen;
      bool served = false;
      send_read_region(*c, server.locator(), 0, kWrites * kBytes, &seen, &served);
      REQUIRE(poll_until(*c, &served, 30'000'000'000));
      REQUIRE(seen.status == Status::kOk);
      bool same = true;
      for (size_t i = 0; i < seen.body.size(); ++i) {
        same = same && seen.body[i] == pattern(i % kBytes, static_cast<unsigned>(round * 1000) +
                                                               static_cast<unsigned>(i / kBytes));
      }
      CHECK(same);
    }
    CHECK(c->outstanding() == 0);
  }
}

TEST_CASE(
    "rdma transport (emulated verbs in CI): a request body in memory registered for remote writes "
    "is copied by send",
    "[rdma][one_sided]") {
  Server server;
  auto c = client();
  std::vector<std::byte> log = patterned(64u << 10, 3);
  REQUIRE(c->register_memory(log) == Status::kOk);
  REQUIRE(echo(*c, server.locator(), bytes_of("up")).status == Status::kOk);
  const std::vector<std::byte> original(log.begin(), log.begin() + 20'000);
  bool answered = false;
  std::vector<std::byte> echoed;
  c->send(server.locator(), {.opcode = wire::Opcode::kEcho, .timeout_ns = 10'000'000'000},
          std::span<const std::byte>(log).subspan(0, 20'000),
          [&](Status s, const wire::MessageHeader& h, std::span<const std::byte> body) {
            answered = s == Status::kOk && h.status == 0;
            echoed.assign(body.begin(), body.end());
          });
  // The body need not outlive send(): changing it now must not change what is sent.
  std::fill(log.begin(), log.end(), std::byte{0xee});
  REQUIRE(poll_until(*c, &answered, 20'000'000'000));
  CHECK(echoed == original);
}

TEST_CASE(
    "rdma transport (emulated verbs in CI): a remote write with a bad key or out of bounds fails "
    "the connection",
    "[rdma][one_sided]") {
  RegionServer server(64u << 10);
  const RemoteRegion& region = server.exposed();
  auto c = client();
  REQUIRE(echo(*c, server.locator(), bytes_of("up"), wire::Opcode::kRead).status == Status::kOk);
  const std::vector<std::byte> piece = patterned(2000, 7);
  ClientTransport::RemoteWrite bad;
  SECTION("a key nobody exposed") {
    bad = {.address = region.address, .key = region.key + 1000, .bytes = piece};
  }
  SECTION("past the end of the region") {
    bad = {.address = region.address + region.bytes - 1000, .key = region.key, .bytes = piece};
  }
  SECTION("before the start of the region") {
    bad = {.address = region.address - 1, .key = region.key, .bytes = piece};
  }
  WriteOutcome w;
  c->write_remote(server.locator(), std::span(&bad, 1), 10'000'000'000, record(&w));
  // A request behind it on the same connection fails with it.
  CallResult seen;
  bool served = false;
  send_read_region(*c, server.locator(), 0, 16, &seen, &served);
  REQUIRE(poll_until(*c, &w.done, 20'000'000'000));
  CHECK(w.status == Status::kUnavailable);
  REQUIRE(poll_until(*c, &served, 20'000'000'000));
  CHECK(seen.status == Status::kUnavailable);
  CHECK(w.calls == 1);
  CHECK(c->outstanding() == 0);
  // The next request connects anew and is served; so is a good write.
  auto again = echo(*c, server.locator(), bytes_of("again"), wire::Opcode::kRead);
  CHECK(again.status == Status::kOk);
  ClientTransport::RemoteWrite good{.address = region.address, .key = region.key, .bytes = piece};
  WriteOutcome ok;
  c->write_remote(server.locator(), std::span(&good, 1), 10'000'000'000, record(&ok));
  REQUIRE(poll_until(*c, &ok.done, 20'000'000'000));
  CHECK(ok.status == Status::kOk);
  served = false;
  send_read_region(*c, server.locator(), 0, piece.size(), &seen, &served);
  REQUIRE(poll_until(*c, &served, 20'000'000'000));
  CHECK(seen.body == piece);
}

TEST_CASE(
    "rdma transport (emulated verbs in CI): a write into a withdrawn region fails and lands "
    "nothing",
    "[rdma][one_sided]") {
  RegionServer server(64u << 10);
  const RemoteRegion region = server.exposed();
  auto c = client();
  // Withdrawn on the server's dispatch thread, as a handler would.
  REQUIRE(echo(*c, server.locator(), {}, wire::Opcode::kRemove).status == Status::kOk);
  const std::vector<std::byte> piece = patterned(5000, 9);
  ClientTransport::RemoteWrite w{
      .address = region.address + 100, .key = region.key, .bytes = piece};
  WriteOutcome out;
  c->write_remote(server.locator(), std::span(&w, 1), 10'000'000'000, record(&out));
  REQUIRE(poll_until(*c, &out.done, 20'000'000'000));
  CHECK(out.status == Status::kUnavailable);
  // Withdrawing twice, or a key never exposed, is harmless; the server still serves.
  REQUIRE(echo(*c, server.locator(), {}, wire::Opcode::kRemove).status == Status::kOk);
  CHECK(echo(*c, server.locator(), bytes_of("still here"), wire::Opcode::kRead).status ==
        Status::kOk);
  server.shut_down();
  CHECK(std::all_of(server.region().begin(), server.region().end(),
                    [](std::byte b) { return b == std::byte{0}; }));
}

TEST_CASE(
    "rdma transport (emulated verbs in CI): a server transport destroyed during large remote "
    "writes: done runs, bounded",
    "[rdma][one_sided]") {
  auto c = client();
  constexpr size_t kPieceBytes = 4u << 20;
  constexpr size_t kPieces = 8;
  std::vector<std::byte> log = patterned(kPieces * kPieceBytes, 5);
  REQUIRE(c->register_memory(log) == Status::kOk);
  RegionServer server(kPieces * kPieceBytes);
  const RemoteRegion region = server.exposed();
  const std::string locator = server.locator();
  REQUIRE(echo(*c, locator, bytes_of("up"), wire::Opcode::kRead).status == Status::kOk);
  std::vector<ClientTransport::RemoteWrite> writes;
  for (size_t i = 0; i < kPieces; ++i) {
    writes.push_back(
        {.address = region.address + i * kPieceBytes,
         .key = region.key,
         .bytes = std::span<const std::byte>(log).subspan(i * kPieceBytes, kPieceBytes)});
  }
  WriteOutcome out;
  c->write_remote(locator, writes, 10'000'000'000, record(&out));
  // A copied piece (a send buffer) in flight too, after the others.
  const std::vector<std::byte> copied = patterned(300'000, 6);
  ClientTransport::RemoteWrite more{.address = region.address, .key = region.key, .bytes = copied};
  WriteOutcome out_copied;
  c->write_remote(locator, std::span(&more, 1), 10'000'000'000, record(&out_copied));
  CallResult behind;
  bool answered = false;
  send_read_region(*c, locator, 0, 16, &behind, &answered);
  // Its queue pairs and the region go while the writes are outstanding, or, when the
  // emulated adapter in this process was quicker, after they landed (the next test has a
  // peer that cannot be quicker).
  server.shut_down();
  const uint64_t start = SystemClock::instance().now_ns();
  REQUIRE(poll_until(*c, &out.done, 30'000'000'000));
  REQUIRE(poll_until(*c, &out_copied.done, 30'000'000'000));
  REQUIRE(poll_until(*c, &answered, 30'000'000'000));
  const uint64_t waited_ms = (SystemClock::instance().now_ns() - start) / 1'000'000;
  INFO("waited " << waited_ms << " ms; status " << static_cast<int>(out.status) << ", "
                 << static_cast<int>(out_copied.status));
  CHECK(out.calls == 1);
  CHECK(out_copied.calls == 1);
  CHECK(waited_ms < 15'000);
  CHECK(c->outstanding() == 0);
  for (const WriteOutcome* o : {&out, &out_copied}) {
    CHECK((o->status == Status::kOk || o->status == Status::kUnavailable ||
           o->status == Status::kTimeout));
  }
  // kOk is only ever said of bytes that are there.
  if (out.status == Status::kOk) {
    const auto& r = server.region();
    CHECK(std::equal(log.begin() + static_cast<ptrdiff_t>(copied.size()), log.end(),
                     r.begin() + static_cast<ptrdiff_t>(copied.size())));
  }
  if (out_copied.status == Status::kOk) {
    CHECK(std::equal(copied.begin(), copied.end(), server.region().begin()));
  }
  // Nobody listens there any more: the next write fails at once.
  WriteOutcome after;
  c->write_remote(locator, std::span(&more, 1), 10'000'000'000, record(&after));
  REQUIRE(poll_until(*c, &after.done, 20'000'000'000));
  CHECK(after.status == Status::kUnavailable);
}

namespace {

// A server in a process of its own (a forked child, with its own emulated adapter) that
// exposes `region_bytes`, tells the parent where over `out_fd` (ChildHello) and echoes
// requests until killed. Returns an exit code when it cannot start.
struct ChildHello {
  RemoteRegion region;
  uint16_t port = 0;
};

int run_child_server(int out_fd, size_t region_bytes) {
  std::vector<std::byte> region(region_bytes);
  auto t = rdma::make_rdma_server_transport({}, test_options(), nullptr);
  if (!t.ok()) return 2;
  std::unique_ptr<ServerTransport> server = std::move(t).value();
  if (server->listen("127.0.0.1:0") != Status::kOk) return 3;
  auto exposed = server->expose_memory(region);
  auto locator = parse_locator(server->locator());
  if (!exposed.ok() || !locator.ok()) return 4;
  ChildHello hello{.region = *exposed, .port = locator->port};
  if (::write(out_fd, &hello, sizeof(hello)) != static_cast<ssize_t>(sizeof(hello))) return 5;
  server->run([](const wire::MessageHeader&, std::span<const std::byte> body, Reply& reply) {
    reply.body().assign(body.begin(), body.end());
  });
  return 0;
}

// Kills and reaps the child however the test ends.
struct Child {
  pid_t pid = -1;
  ~Child() { kill_and_reap(); }
  void kill_and_reap() {
    if (pid <= 0) return;
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid = -1;
  }
};

}  // namespace

TEST_CASE(
    "rdma transport (emulated verbs in CI): a server process killed during large remote writes "
    "fails them, bounded",
    "[rdma][one_sided]") {
  constexpr size_t kPieceBytes = 4u << 20;
  constexpr size_t kPieces = 8;
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  Child child;
  child.pid = ::fork();
  REQUIRE(child.pid >= 0);
  if (child.pid == 0) {
    ::alarm(60);  // never outlives a test run that lost track of it
    ::close(pipe_fds[0]);
    ::_exit(run_child_server(pipe_fds[1], kPieces * kPieceBytes));
  }
  ::close(pipe_fds[1]);
  ChildHello hello;
  pollfd pfd{.fd = pipe_fds[0], .events = POLLIN, .revents = 0};
  const bool readable = ::poll(&pfd, 1, 20'000) == 1;
  const bool got =
      readable && ::read(pipe_fds[0], &hello, sizeof(hello)) == static_cast<ssize_t>(sizeof(hello));
  ::close(pipe_fds[0]);
  REQUIRE(got);
  const std::string locator = "127.0.0.1:" + std::to_string(hello.port);

  auto c = client();
  std::vector<std::byte> log = patterned(kPieces * kPieceBytes, 5);
  REQUIRE(c->register_memory(log) == Status::kOk);
  REQUIRE(echo(*c, locator, bytes_of("up"), wire::Opcode::kRead).status == Status::kOk);
  // Stopped first, so that none of the writes can be acknowledged before it dies.
  REQUIRE(::kill(child.pid, SIGSTOP) == 0);
  int stop_status = 0;
  REQUIRE(::waitpid(child.pid, &stop_status, WUNTRACED) == child.pid);
  REQUIRE(WIFSTOPPED(stop_status));
  std::vector<ClientTransport::RemoteWrite> writes;
  for (size_t i = 0; i < kPieces; ++i) {
    writes.push_back(
        {.address = hello.region.address + i * kPieceBytes,
         .key = hello.region.key,
         .bytes = std::span<const std::byte>(log).subspan(i * kPieceBytes, kPieceBytes)});
  }
  WriteOutcome out;
  c->write_remote(locator, writes, 10'000'000'000, record(&out));
  const std::vector<std::byte> copied = patterned(300'000, 6);
  ClientTransport::RemoteWrite more{
      .address = hello.region.address, .key = hello.region.key, .bytes = copied};
  WriteOutcome out_copied;
  c->write_remote(locator, std::span(&more, 1), 10'000'000'000, record(&out_copied));
  bool answered = false;
  Status behind = Status::kOk;
  c->send(locator, {.opcode = wire::Opcode::kRead, .timeout_ns = 10'000'000'000},
          bytes_of("behind"),
          [&](Status s, const wire::MessageHeader&, std::span<const std::byte>) {
            behind = s;
            answered = true;
          });
  // Nothing completes from the calls themselves; then a poll lets the adapter start the
  // transfers to a peer that does not answer (if it takes long enough here for the
  // adapter to give up on the peer, that is the same failure, found sooner).
  CHECK_FALSE(out.done);
  CHECK(c->outstanding() == 3);
  c->poll(0);
  child.kill_and_reap();
  const uint64_t start = SystemClock::instance().now_ns();
  REQUIRE(poll_until(*c, &out.done, 30'000'000'000));
  REQUIRE(poll_until(*c, &out_copied.done, 30'000'000'000));
  REQUIRE(poll_until(*c, &answered, 30'000'000'000));
  const uint64_t waited_ms = (SystemClock::instance().now_ns() - start) / 1'000'000;
  INFO("waited " << waited_ms << " ms");
  CHECK(waited_ms < 15'000);
  CHECK((out.status == Status::kUnavailable || out.status == Status::kTimeout));
  CHECK((out_copied.status == Status::kUnavailable || out_copied.status == Status::kTimeout));
  CHECK((behind == Status::kUnavailable || behind == Status::kTimeout));
  CHECK(out.calls == 1);
  CHECK(out_copied.calls == 1);
  CHECK(c->outstanding() == 0);
}

TEST_CASE(
    "rdma transport (emulated verbs in CI): a remote write past its timeout gets kTimeout and "
    "closes the connection",
    "[rdma][one_sided]") {
  RegionServer server(64u << 10);
  const RemoteRegion region = server.exposed();
  auto c = client();
  const std::vector<std::byte> piece = patterned(3000, 4);
  ClientTransport::RemoteWrite w{.address = region.address, .key = region.key, .bytes = piece};
  // No time at all, on a connection still being set up: it cannot have completed when
  // the first poll looks at its deadline.
  WriteOutcome out;
  c->write_remote(server.locator(), std::span(&w, 1), 0, record(&out));
  CallResult seen;
  bool served = false;
  send_read_region(*c, server.locator(), 0, 16, &seen, &served);
  REQUIRE(poll_until(*c, &out.done, 20'000'000'000));
  CHECK(out.status == Status::kTimeout);
  // The session is closed with it, failing the request behind it.
  REQUIRE(poll_until(*c, &served, 20'000'000'000));
  CHECK(seen.status == Status::kUnavailable);
  CHECK(c->outstanding() == 0);
  // A fresh session writes and serves.
  WriteOutcome ok;
  c->write_remote(server.locator(), std::span(&w, 1), 10'000'000'000, record(&ok));
  REQUIRE(poll_until(*c, &ok.done, 20'000'000'000));
  CHECK(ok.status == Status::kOk);
  served = false;
  send_read_region(*c, server.locator(), 0, piece.size(), &seen, &served);
  REQUIRE(poll_until(*c, &served, 20'000'000'000));
  CHECK(seen.body == piece);
}

TEST_CASE(
    "rdma transport (emulated verbs in CI): a remote write to a server nobody listens on fails",
    "[rdma][one_sided]") {
  std::string locator;
  {
    RegionServer server(4096);
    locator = server.locator();
  }
  auto c = client();
  const std::vector<std::byte> piece = patterned(10, 1);
  ClientTransport::RemoteWrite w{.address = 4096, .key = 1, .bytes = piece};
  WriteOutcome out;
  c->write_remote(locator, std::span(&w, 1), 5'000'000'000, record(&out));
  CHECK_FALSE(out.done);
  REQUIRE(poll_until(*c, &out.done, 20'000'000'000));
  CHECK(out.status == Status::kUnavailable);
  // Nothing to write is done at once (from the next poll), without a connection.
  WriteOutcome empty;
  c->write_remote(locator, {}, 5'000'000'000, record(&empty));
  REQUIRE(poll_until(*c, &empty.done, 1'000'000'000));
  CHECK(empty.status == Status::kOk);
}

TEST_CASE("tcp transport: no one-sided writes (expose_memory and write_remote say kUnavailable)",
          "[rdma][one_sided][tcp]") {
  auto server = make_tcp_server_transport({});
  REQUIRE(server->listen("127.0.0.1:0") == Status::kOk);
  std::vector<std::byte> region(4096);
  auto exposed = server->expose_memory(region);
  CHECK(exposed.status() == Status::kUnavailable);
  server->withdraw_memory(RemoteRegion{.address = 1, .bytes = 1, .key = 1});  // a no-op
  auto c = make_tcp_client_transport({});
  CHECK_FALSE(c->one_sided());
  CHECK(c->register_memory(region) == Status::kOk);
  const std::vector<std::byte> piece = patterned(10, 1);
  ClientTransport::RemoteWrite w{.address = 0, .key = 0, .bytes = piece};
  WriteOutcome out;
  c->write_remote(server->locator(), std::span(&w, 1), 1'000'000'000, record(&out));
  REQUIRE(poll_until(*c, &out.done, 1'000'000'000));
  CHECK(out.status == Status::kUnavailable);
  CHECK(out.calls == 1);
}

TEST_CASE("rdma transport: a device that does not exist is a clear error", "[rdma]") {
  RdmaOptions o = test_options();
  o.device = "no-such-device";
  std::string why;
  auto t = rdma::make_rdma_client_transport({}, o, &why);
  CHECK(t.status() == Status::kInvalidArgument);
  CHECK(why.find("no-such-device") != std::string::npos);
  o.device.clear();
  o.port = 9;
  auto p = rdma::make_rdma_client_transport({}, o, &why);
  CHECK_FALSE(p.ok());
  CHECK(why.find("port 9") != std::string::npos);
}

}  // namespace ramkv
