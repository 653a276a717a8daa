// The RDMA transport (rdma/rdma_transport.h) over whatever verbs provider this build
// links: in CI the emulated one (rdma/emu, named as such in every test), on a machine
// with an adapter the real one (scripts/rdma-real-device.sh). A server dispatch loop on
// its own thread, clients driving their own polls, as the TCP transport's tests.
#include <catch2/catch.hpp>

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
