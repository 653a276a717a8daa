// Tests for coordinator/failure_verifier.h, driven by hand: the test thread plays the
// coordinator's dispatch loop and calls run(), against real sockets on 127.0.0.1.
#include "coordinator/failure_verifier.h"

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

namespace ramkv::coordinator {
namespace {

using SteadyClock = std::chrono::steady_clock;

// A server that answers echo (and counts the pings) on its own thread.
class EchoServer {
 public:
  explicit EchoServer(const std::string& locator = "127.0.0.1:0")
      : transport_(make_tcp_server_transport({})) {
    REQUIRE(transport_->listen(locator) == Status::kOk);
    thread_ = std::thread([this] {
      transport_->run(
          [this](const wire::MessageHeader&, std::span<const std::byte>, Reply&) { ++pings; });
    });
  }
  ~EchoServer() {
    transport_->stop();
    thread_.join();
  }
  std::string locator() const { return transport_->locator(); }
  std::atomic<int> pings{0};

 private:
  std::unique_ptr<ServerTransport> transport_;
  std::thread thread_;
};

// A locator where nothing listens (bound once, then released).
std::string dead_locator() {
  auto t = make_tcp_server_transport({});
  REQUIRE(t->listen("127.0.0.1:0") == Status::kOk);
  return t->locator();
}

struct Harness {
  explicit Harness(FailureVerifier::Options options)
      : verifier(options, [this](uint64_t id) { declared.push_back(id); }) {}
  // Plays the dispatch loop until `done()` or `limit` passes; true if done() held.
  template <typename Done>
  bool run_until(Done done, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
    const auto deadline = SteadyClock::now() + limit;
    for (int i = 0; i < 100'000 && SteadyClock::now() < deadline; ++i) {
      verifier.run();
      if (done()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return done();
  }
  FailureVerifier verifier;
  std::vector<uint64_t> declared;
};

constexpr uint64_t kId = 7 | uint64_t{1} << 32;

}  // namespace

TEST_CASE("failure verifier: a suspect that answers is cleared, never declared",
          "[coordinator][failure]") {
  EchoServer server;
  Harness h({.timeout_ns = 300'000'000, .attempts = 3});
  REQUIRE(h.verifier.suspect(kId, server.locator()));
  CHECK(h.verifier.verifying(kId));
  REQUIRE(h.run_until([&] { return h.verifier.suspect_count() == 0; }));
  CHECK(server.pings == 1);
  CHECK(h.declared.empty());
  CHECK_FALSE(h.verifier.verifying(kId));
}

TEST_CASE("failure verifier: a dead suspect is declared after every attempt failed, spread out",
          "[coordinator][failure]") {
  const uint64_t timeout_ns = 200'000'000;
  Harness h({.timeout_ns = timeout_ns, .attempts = 3});
  const auto start = SteadyClock::now();
  REQUIRE(h.verifier.suspect(kId, dead_locator()));
  REQUIRE(h.run_until([&] { return !h.declared.empty(); }));
  const auto elapsed = SteadyClock::now() - start;
  CHECK(h.declared == std::vector<uint64_t>{kId});
  // Refused connections fail at once, but the attempts are a timeout apart.
  CHECK(elapsed >= std::chrono::nanoseconds(2 * timeout_ns));
  CHECK(h.verifier.suspect_count() == 0);
  // Declared once: more loop runs change nothing.
  for (int i = 0; i < 10; ++i) h.verifier.run();
  CHECK(h.declared.size() == 1);
}

TEST_CASE("failure verifier: one suspect is verified once at a time", "[coordinator][failure]") {
  Harness h({.timeout_ns = 200'000'000, .attempts = 2});
  const std::string dead = dead_locator();
  REQUIRE(h.verifier.suspect(kId, dead));
  CHECK_FALSE(h.verifier.suspect(kId, dead));
  // Another server is verified beside it.
  EchoServer alive;
  CHECK(h.verifier.suspect(kId + 1, alive.locator()));
  CHECK(h.verifier.suspect_count() == 2);
  REQUIRE(h.run_until([&] { return h.verifier.suspect_count() == 0; }));
  CHECK(h.declared == std::vector<uint64_t>{kId});
  // Settled: the same server may be suspected again.
  CHECK(h.verifier.suspect(kId, dead));
}

TEST_CASE("failure verifier: a suspect that answers a later attempt is not declared",
          "[coordinator][failure]") {
  // Nothing listens at first (the first attempt is refused); the server comes up on the
  // same port before the last attempt is due.
  const uint64_t timeout_ns = 300'000'000;
  const std::string locator = dead_locator();
  Harness h({.timeout_ns = timeout_ns, .attempts = 3});
  const auto start = SteadyClock::now();
  REQUIRE(h.verifier.suspect(kId, locator));
  std::unique_ptr<EchoServer> server;
  REQUIRE(h.run_until([&] {
    if (server == nullptr && SteadyClock::now() - start >= std::chrono::milliseconds(450)) {
      server = std::make_unique<EchoServer>(locator);
    }
    return h.verifier.suspect_count() == 0;
  }));
  REQUIRE(server != nullptr);
  CHECK(server->pings == 1);
  CHECK(h.declared.empty());
}

TEST_CASE("failure verifier: the loop is told to wake while a ping is due or in flight",
          "[coordinator][failure]") {
  Harness h({.timeout_ns = 200'000'000, .attempts = 3});
  CHECK(h.verifier.run() == UINT64_MAX);  // nothing to do: sleep until an event
  CHECK(h.verifier.wait_fd() >= 0);
  REQUIRE(h.verifier.suspect(kId, dead_locator()));
  CHECK(h.verifier.run() <= 200'000'000);
  REQUIRE(h.run_until([&] { return !h.declared.empty(); }));
  CHECK(h.verifier.run() == UINT64_MAX);
}

}  // namespace ramkv::coordinator
