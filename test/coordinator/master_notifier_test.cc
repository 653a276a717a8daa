#include "coordinator/master_notifier.h"

#include <catch2/catch.hpp>

#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

using ramkv::Status;
using ramkv::coordinator::MasterNotifier;
namespace wire = ramkv::wire;

namespace {

// A server on loopback that answers each request with the next status of `answers`
// (kOk once they run out) and records the opcodes it received, in order.
class ScriptedServer {
 public:
  explicit ScriptedServer(std::vector<Status> answers)
      : transport_(ramkv::make_tcp_server_transport({})), answers_(std::move(answers)) {
    REQUIRE(transport_->listen("127.0.0.1:0") == Status::kOk);
    thread_ = std::thread([this] {
      transport_->run(
          [this](const wire::MessageHeader& h, std::span<const std::byte>, ramkv::Reply& r) {
            std::lock_guard lock(mu_);
            received_.push_back(static_cast<wire::Opcode>(h.opcode));
            if (next_ < answers_.size()) r.set_status(answers_[next_++]);
          });
    });
  }
  ~ScriptedServer() {
    transport_->stop();
    thread_.join();
  }
  std::string locator() const { return transport_->locator(); }
  std::vector<wire::Opcode> received() {
    std::lock_guard lock(mu_);
    return received_;
  }

 private:
  std::unique_ptr<ramkv::ServerTransport> transport_;
  std::mutex mu_;
  std::vector<Status> answers_;
  size_t next_ = 0;
  std::vector<wire::Opcode> received_;
  std::thread thread_;
};

MasterNotifier::Options quick() {
  return {.timeout_ns = 500'000'000,
          .retry_initial_ns = 10'000'000,
          .retry_max_ns = 50'000'000,
          .give_up_ns = 400'000'000};
}

std::string dead_locator() {
  auto t = ramkv::make_tcp_server_transport({});
  REQUIRE(t->listen("127.0.0.1:0") == Status::kOk);
  return t->locator();
}

constexpr uint64_t kSeconds = 1'000'000'000;

}  // namespace

TEST_CASE("master notifier: a take answered kRetry is resent until taken, ahead of what follows",
          "[coordinator][notifier]") {
  ScriptedServer server({Status::kRetry, Status::kRetry});
  MasterNotifier notifier(quick());
  uint64_t take = notifier.post(
      {{.locator = server.locator(), .opcode = wire::Opcode::kTakeTablets, .body = {}}});
  uint64_t drop = notifier.post(
      {{.locator = server.locator(), .opcode = wire::Opcode::kDropTablets, .body = {}}});
  CHECK(notifier.wait(take, 5 * kSeconds));
  CHECK(notifier.wait(drop, 5 * kSeconds));
  // Three tries of the take, then the drop: a resend never overtakes a later order.
  CHECK(server.received() ==
        std::vector<wire::Opcode>{wire::Opcode::kTakeTablets, wire::Opcode::kTakeTablets,
                                  wire::Opcode::kTakeTablets, wire::Opcode::kDropTablets});
}

TEST_CASE("master notifier: a server that never answers is given up on, and the ticket ends",
          "[coordinator][notifier]") {
  MasterNotifier notifier(quick());
  auto start = std::chrono::steady_clock::now();
  uint64_t take = notifier.post(
      {{.locator = dead_locator(), .opcode = wire::Opcode::kTakeTablets, .body = {}}});
  CHECK(notifier.wait(take, 5 * kSeconds));
  CHECK(std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(400));
  CHECK(notifier.wait_idle(kSeconds));
}

TEST_CASE("master notifier: refusals and server lists are not resent", "[coordinator][notifier]") {
  ScriptedServer server({Status::kBadRequest, Status::kRetry});
  MasterNotifier notifier(quick());
  // The take is refused (kBadRequest), then the list is answered kRetry: neither again.
  uint64_t take = notifier.post(
      {{.locator = server.locator(), .opcode = wire::Opcode::kTakeTablets, .body = {}}});
  CHECK(notifier.wait(take, 5 * kSeconds));
  uint64_t list = notifier.post(
      {{.locator = server.locator(), .opcode = wire::Opcode::kServerListUpdate, .body = {}}});
  CHECK(notifier.wait(list, 5 * kSeconds));
  CHECK(notifier.wait_idle(kSeconds));
  CHECK(server.received() ==
        std::vector<wire::Opcode>{wire::Opcode::kTakeTablets, wire::Opcode::kServerListUpdate});
}

TEST_CASE("master notifier: a server list never waits behind an order being resent",
          "[coordinator][notifier]") {
  ScriptedServer server(std::vector<Status>(1, Status::kRetry));
  auto options = quick();
  options.retry_initial_ns = 300'000'000;  // the take waits 300 ms before its resend
  MasterNotifier notifier(options);
  uint64_t take = notifier.post(
      {{.locator = server.locator(), .opcode = wire::Opcode::kTakeTablets, .body = {}}});
  // Once the take has been refused, a server list goes out at once, ahead of its resend.
  for (int i = 0; i < 200 && server.received().empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  uint64_t list = notifier.post(
      {{.locator = server.locator(), .opcode = wire::Opcode::kServerListUpdate, .body = {}}});
  CHECK(notifier.wait(list, 5 * kSeconds));
  CHECK(notifier.wait(take, 5 * kSeconds));
  CHECK(server.received() == std::vector<wire::Opcode>{wire::Opcode::kTakeTablets,
                                                       wire::Opcode::kServerListUpdate,
                                                       wire::Opcode::kTakeTablets});
}

TEST_CASE("master notifier: a ticket whose messages did not all fit is not waited for",
          "[coordinator][notifier]") {
  ScriptedServer server({});
  auto options = quick();
  options.max_queued = 1;
  MasterNotifier notifier(options);
  uint64_t ticket = notifier.post(
      {{.locator = server.locator(), .opcode = wire::Opcode::kTakeTablets, .body = {}},
       {.locator = server.locator(), .opcode = wire::Opcode::kTakeTablets, .body = {}}});
  CHECK_FALSE(notifier.wait(ticket, 5 * kSeconds));
  CHECK(notifier.wait_idle(5 * kSeconds));
  CHECK(server.received().size() == 1);
  uint64_t fits = notifier.post(
      {{.locator = server.locator(), .opcode = wire::Opcode::kTakeTablets, .body = {}}});
  CHECK(notifier.wait(fits, 5 * kSeconds));
}

TEST_CASE("master notifier: one slow server holds up only its own messages",
          "[coordinator][notifier]") {
  ScriptedServer slow(std::vector<Status>(100, Status::kRetry));
  ScriptedServer fine({});
  auto options = quick();
  options.give_up_ns = 30 * kSeconds;
  MasterNotifier notifier(options);
  notifier.post({{.locator = slow.locator(), .opcode = wire::Opcode::kTakeTablets, .body = {}}});
  uint64_t other = notifier.post(
      {{.locator = fine.locator(), .opcode = wire::Opcode::kTakeTablets, .body = {}}});
  CHECK(notifier.wait(other, 5 * kSeconds));
  CHECK(fine.received().size() == 1);
  // The slow server's take is resent on its own lane meanwhile. (Its first answer may
  // come after the fine server's: wait for it, bounded.)
  for (int i = 0; i < 500 && slow.received().size() < 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(slow.received().size() >= 2);
}
