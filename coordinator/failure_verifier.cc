#include "coordinator/failure_verifier.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "common/log.h"
#include "coordinator/coordinator_state.h"

namespace ramkv::coordinator {

namespace {

// How long the loop may sleep while a ping is in flight: its timeout is checked, and a
// failed connect reported, only when run() polls.
constexpr uint64_t kInFlightWakeNs = 10'000'000;

}  // namespace

FailureVerifier::FailureVerifier(const Options& options, Declare declare, const Clock& clock)
    : options_(options),
      declare_(std::move(declare)),
      clock_(clock),
      client_(make_client_transport({})) {
  RAMKV_CHECK(options_.attempts >= 1 && options_.timeout_ns > 0);
}

FailureVerifier::~FailureVerifier() = default;

bool FailureVerifier::suspect(uint64_t server_id, const std::string& locator) {
  if (suspects_.contains(server_id)) return false;
  if (suspects_.size() >= kMaxSuspects) {
    LOG_WARNING("not verifying server {}: already verifying {} servers",
                wire::server_id_text(server_id), suspects_.size());
    return false;
  }
  Suspect& s = suspects_[server_id];
  s.locator = locator;
  s.serial = ++next_serial_;
  s.next_send_ns = clock_.now_ns();
  LOG_INFO("server {} at {} is suspected of having crashed: verifying ({} pings of {} ms)",
           wire::server_id_text(server_id), locator, options_.attempts,
           options_.timeout_ns / 1'000'000);
  return true;
}

uint64_t FailureVerifier::run() {
  if (std::exchange(wait_fd_ready_, false) || client_->outstanding() > 0) client_->poll(0);
  // Settled suspects are erased here, not in the transport's callbacks, and `declare_` is
  // called outside them: it changes and persists the coordinator's state.
  std::vector<uint64_t> crashed;
  const uint64_t now = clock_.now_ns();
  uint64_t wake_ns = UINT64_MAX;
  for (auto it = suspects_.begin(); it != suspects_.end();) {
    Suspect& s = it->second;
    if (s.done) {
      if (s.failures >= options_.attempts) crashed.push_back(it->first);
      it = suspects_.erase(it);
      continue;
    }
    if (!s.in_flight) {
      if (s.next_send_ns <= now) {
        send_ping(it->first, s, now);
      } else {
        wake_ns = std::min(wake_ns, s.next_send_ns - now);
      }
    }
    ++it;
  }
  for (uint64_t id : crashed) declare_(id);
  if (client_->outstanding() > 0) wake_ns = std::min(wake_ns, kInFlightWakeNs);
  return wake_ns;
}

void FailureVerifier::send_ping(uint64_t server_id, Suspect& s, uint64_t now) {
  s.in_flight = true;
  // Attempts are spread over time: a suspect that is only slow for a moment (a loaded
  // machine, a long handler) gets attempts x timeout to show it is alive, even when a
  // failure comes back at once (a refused connection).
  s.next_send_ns = now + options_.timeout_ns;
  const uint64_t serial = s.serial;
  client_->send(
      s.locator,
      {.opcode = wire::Opcode::kEcho,
       .client_id = 0,
       .rpc_seq = ++rpc_seq_,
       .timeout_ns = options_.timeout_ns},
      {},
      [this, server_id, serial](Status st, const wire::MessageHeader&, std::span<const std::byte>) {
        on_reply(server_id, serial, st);
      });
}

void FailureVerifier::on_reply(uint64_t server_id, uint64_t serial, Status transport_status) {
  auto it = suspects_.find(server_id);
  if (it == suspects_.end() || it->second.serial != serial) return;
  Suspect& s = it->second;
  s.in_flight = false;
  if (transport_status == Status::kOk) {
    LOG_INFO("server {} answered the coordinator's ping: not crashed",
             wire::server_id_text(server_id));
    s.done = true;
    return;
  }
  ++s.failures;
  // The next attempt connects afresh, not behind a connection that may be stuck.
  client_->disconnect(s.locator);
  LOG_INFO("server {} did not answer the coordinator's ping {} of {}: {}",
           wire::server_id_text(server_id), s.failures, options_.attempts,
           status_name(transport_status));
  if (s.failures >= options_.attempts) s.done = true;
}

}  // namespace ramkv::coordinator
