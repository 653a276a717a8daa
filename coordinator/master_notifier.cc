#include "coordinator/master_notifier.h"

#include <algorithm>
#include <chrono>

#include "common/clock.h"
#include "common/log.h"

namespace ramkv::coordinator {

MasterNotifier::MasterNotifier(const Options& options)
    : options_(options), transport_(make_client_transport(TransportOptions{})) {
  thread_ = std::thread([this] { run(); });
}

MasterNotifier::~MasterNotifier() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  work_cv_.notify_all();
  thread_.join();
}

uint64_t MasterNotifier::post(std::vector<Message> messages) {
  std::lock_guard lock(mutex_);
  uint64_t ticket = next_ticket_++;
  size_t count = 0;
  for (auto& m : messages) {
    if (pending_ >= options_.max_queued) {
      LOG_WARNING("notifier queue full: dropping {} to {}", wire::opcode_name(m.opcode), m.locator);
      continue;
    }
    queue_.push_back({std::move(m), ticket});
    ++pending_;
    ++count;
  }
  if (count > 0) remaining_[ticket] = count;
  if (count < messages.size()) {
    short_tickets_.push_back(ticket);
    if (short_tickets_.size() > 1024) short_tickets_.pop_front();
  }
  work_cv_.notify_one();
  return ticket;
}

bool MasterNotifier::wait(uint64_t ticket, uint64_t timeout_ns) {
  std::unique_lock lock(mutex_);
  if (std::find(short_tickets_.begin(), short_tickets_.end(), ticket) != short_tickets_.end()) {
    return false;
  }
  return done_cv_.wait_for(lock, std::chrono::nanoseconds(timeout_ns),
                           [&] { return !remaining_.contains(ticket); });
}

bool MasterNotifier::wait_idle(uint64_t timeout_ns) {
  std::unique_lock lock(mutex_);
  return done_cv_.wait_for(lock, std::chrono::nanoseconds(timeout_ns),
                           [&] { return remaining_.empty(); });
}

namespace {

// Orders that go one at a time per server, in order, resent until answered.
bool ordered(wire::Opcode opcode) {
  return opcode == wire::Opcode::kTakeTablets || opcode == wire::Opcode::kDropTablets;
}

bool resent(wire::Opcode opcode, Status s) {
  return ordered(opcode) &&
         (s == Status::kRetry || s == Status::kTimeout || s == Status::kUnavailable);
}
}  // namespace

void MasterNotifier::run() {
  const Clock& clock = SystemClock::instance();
  std::unique_lock lock(mutex_);
  while (true) {
    if (stop_) return;
    // Server lists go at once, never behind an order being resent to the same server.
    std::vector<Queued> direct;
    for (auto& q : queue_) {
      if (ordered(q.message.opcode)) {
        lanes_[q.message.locator].waiting.push_back(std::move(q));
      } else {
        direct.push_back(std::move(q));
      }
    }
    queue_.clear();
    lock.unlock();
    for (auto& q : direct) send_once(q);
    send_ready(clock.now_ns());
    // A short poll, so that messages posted meanwhile are not held up behind a slow peer.
    if (transport_->outstanding() > 0) transport_->poll(1'000'000);
    const uint64_t next_ns = next_send_ns();
    lock.lock();
    if (transport_->outstanding() > 0 || !queue_.empty() || stop_) continue;
    auto woken = [&] { return stop_ || !queue_.empty(); };
    if (next_ns == UINT64_MAX) {
      work_cv_.wait(lock, woken);
    } else {
      const uint64_t now = clock.now_ns();
      if (next_ns > now) work_cv_.wait_for(lock, std::chrono::nanoseconds(next_ns - now), woken);
    }
  }
}

void MasterNotifier::send_ready(uint64_t now_ns) {
  for (auto& [locator, lane] : lanes_) {
    if (lane.in_flight || lane.waiting.empty() || lane.send_at_ns > now_ns) continue;
    lane.in_flight = true;
    send(locator, lane.waiting.front(), now_ns);
  }
}

uint64_t MasterNotifier::next_send_ns() const {
  uint64_t next_ns = UINT64_MAX;
  for (const auto& [locator, lane] : lanes_) {
    if (!lane.in_flight && !lane.waiting.empty()) next_ns = std::min(next_ns, lane.send_at_ns);
  }
  return next_ns;
}

void MasterNotifier::send(const std::string& locator, Queued& item, uint64_t now_ns) {
  ClientTransport::Request request{.opcode = item.message.opcode,
                                   .client_id = 0,
                                   .rpc_seq = next_rpc_seq_++,
                                   .timeout_ns = options_.timeout_ns};
  if (item.attempts++ == 0) {
    item.first_sent_ns = now_ns;
    item.retry_delay_ns = options_.retry_initial_ns;
  }
  // The transport copies what it cannot send at once; the body stays for resends anyway.
  // The lane outlives the callback: it is erased only once its last message completed.
  transport_->send(
      locator, request, item.message.body,
      [this, locator](Status st, const wire::MessageHeader& h, std::span<const std::byte>) {
        on_answer(locator, st != Status::kOk ? st : static_cast<Status>(h.status));
      });
}

void MasterNotifier::send_once(const Queued& item) {
  ClientTransport::Request request{.opcode = item.message.opcode,
                                   .client_id = 0,
                                   .rpc_seq = next_rpc_seq_++,
                                   .timeout_ns = options_.timeout_ns};
  transport_->send(
      item.message.locator, request, item.message.body,
      [this, locator = item.message.locator, opcode = item.message.opcode, ticket = item.ticket](
          Status st, const wire::MessageHeader& h, std::span<const std::byte>) {
        Status s = st != Status::kOk ? st : static_cast<Status>(h.status);
        if (s != Status::kOk) {
          LOG_WARNING("{} to {} failed: {}", wire::opcode_name(opcode), locator, status_name(s));
        }
        complete(ticket);
      });
}

void MasterNotifier::on_answer(const std::string& locator, Status s) {
  auto it = lanes_.find(locator);
  if (it == lanes_.end() || it->second.waiting.empty()) return;
  Lane& lane = it->second;
  Queued& item = lane.waiting.front();
  lane.in_flight = false;
  const uint64_t now = SystemClock::instance().now_ns();
  const wire::Opcode opcode = item.message.opcode;
  const double since = static_cast<double>(now - item.first_sent_ns) / 1e9;
  if (s != Status::kOk && resent(opcode, s) && now - item.first_sent_ns < options_.give_up_ns) {
    if (item.attempts == 1) {
      LOG_WARNING("{} to {} failed: {}; resending until it is answered", wire::opcode_name(opcode),
                  locator, status_name(s));
    }
    lane.send_at_ns = now + item.retry_delay_ns;
    item.retry_delay_ns = std::min(item.retry_delay_ns * 2, options_.retry_max_ns);
    return;
  }
  if (s != Status::kOk && item.attempts > 1) {
    LOG_ERROR("{} to {} failed: {}; gave up after {} attempts over {:.1f} s",
              wire::opcode_name(opcode), locator, status_name(s), item.attempts, since);
  } else if (s != Status::kOk) {
    LOG_WARNING("{} to {} failed: {}", wire::opcode_name(opcode), locator, status_name(s));
  } else if (item.attempts > 1) {
    LOG_INFO("{} to {} answered after {} attempts over {:.1f} s", wire::opcode_name(opcode),
             locator, item.attempts, since);
  }
  const uint64_t ticket = item.ticket;
  lane.waiting.pop_front();
  lane.send_at_ns = 0;
  if (lane.waiting.empty()) lanes_.erase(it);
  complete(ticket);
}

void MasterNotifier::complete(uint64_t ticket) {
  std::lock_guard lock(mutex_);
  --pending_;
  auto it = remaining_.find(ticket);
  if (it != remaining_.end() && --it->second == 0) remaining_.erase(it);
  done_cv_.notify_all();
}

}  // namespace ramkv::coordinator
