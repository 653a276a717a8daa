#include "coordinator/master_notifier.h"

#include <chrono>

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
    if (queue_.size() >= options_.max_queued) {
      LOG_WARNING("notifier queue full: dropping {} to {}", wire::opcode_name(m.opcode), m.locator);
      continue;
    }
    queue_.push_back({std::move(m), ticket});
    ++count;
  }
  if (count > 0) remaining_[ticket] = count;
  work_cv_.notify_one();
  return ticket;
}

bool MasterNotifier::wait(uint64_t ticket, uint64_t timeout_ns) {
  std::unique_lock lock(mutex_);
  return done_cv_.wait_for(lock, std::chrono::nanoseconds(timeout_ns),
                           [&] { return !remaining_.contains(ticket); });
}

bool MasterNotifier::wait_idle(uint64_t timeout_ns) {
  std::unique_lock lock(mutex_);
  return done_cv_.wait_for(lock, std::chrono::nanoseconds(timeout_ns),
                           [&] { return remaining_.empty(); });
}

void MasterNotifier::run() {
  std::unique_lock lock(mutex_);
  while (true) {
    work_cv_.wait(lock, [&] { return stop_ || !queue_.empty() || transport_->outstanding() > 0; });
    if (stop_) return;
    std::deque<Queued> batch;
    batch.swap(queue_);
    lock.unlock();
    for (auto& item : batch) send(std::move(item));
    // A short poll, so that messages posted meanwhile are not held up behind a slow peer.
    if (transport_->outstanding() > 0) transport_->poll(1'000'000);
    lock.lock();
  }
}

void MasterNotifier::send(Queued item) {
  ClientTransport::Request request{.opcode = item.message.opcode,
                                   .client_id = 0,
                                   .rpc_seq = next_rpc_seq_++,
                                   .timeout_ns = options_.timeout_ns};
  std::string locator = item.message.locator;
  wire::Opcode opcode = item.message.opcode;
  uint64_t ticket = item.ticket;
  // The transport copies what it cannot send at once, so the body may go after send().
  transport_->send(locator, request, item.message.body,
                   [this, locator, opcode, ticket](Status st, const wire::MessageHeader& h,
                                                   std::span<const std::byte>) {
                     Status s = st != Status::kOk ? st : static_cast<Status>(h.status);
                     if (s != Status::kOk) {
                       LOG_WARNING("{} to {} failed: {}", wire::opcode_name(opcode), locator,
                                   status_name(s));
                     }
                     complete(ticket);
                   });
}

void MasterNotifier::complete(uint64_t ticket) {
  std::lock_guard lock(mutex_);
  auto it = remaining_.find(ticket);
  if (it != remaining_.end() && --it->second == 0) remaining_.erase(it);
  done_cv_.notify_all();
}

}  // namespace ramkv::coordinator
