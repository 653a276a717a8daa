// MasterNotifier: delivers the coordinator's one-way orders to servers (take tablets,
// drop tablets; server list updates later) from its own thread, so that the dispatch
// loop never waits on a server that is slow, down, or not serving yet (a master enlists
// before its own loop runs: an order sent from the coordinator's loop while the master
// waits for its enlist reply would stall both until the timeout).
//
// A batch of messages is posted and gets a ticket; the poster may wait for the ticket
// (create table waits, so that masters own their tablets when the reply goes out) or not
// (re-sends at start and after a re-enlist). A failed send is logged, never retried
// here: the coordinator re-sends every owned tablet on start, and take tablets is
// idempotent.
//
// Owner: the CoordinatorService. Threads: post() and wait() from any thread; the
// ClientTransport is used only by the notifier's own thread.
// Invariants:
//   1. Every posted message completes exactly once (answered, failed or timed out), and
//      its ticket's count drops by one when it does.
//   2. At most `max_queued` messages wait to be sent; post() drops (and logs) beyond it.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/transport.h"

namespace ramkv::coordinator {

class MasterNotifier {
 public:
  struct Options {
    uint64_t timeout_ns = 2'000'000'000;  // per message
    size_t max_queued = 65536;
  };
  struct Message {
    std::string locator;
    wire::Opcode opcode = wire::Opcode::kTakeTablets;
    std::vector<std::byte> body;
  };

  explicit MasterNotifier(const Options& options);
  ~MasterNotifier();  // stops the thread; messages still in flight are abandoned
  MasterNotifier(const MasterNotifier&) = delete;
  MasterNotifier& operator=(const MasterNotifier&) = delete;

  uint64_t post(std::vector<Message> messages);
  // Waits until every message of `ticket` completed, or `timeout_ns`; true if they did.
  bool wait(uint64_t ticket, uint64_t timeout_ns);
  // Waits until nothing is queued or in flight (tests).
  bool wait_idle(uint64_t timeout_ns);

 private:
  struct Queued {
    Message message;
    uint64_t ticket = 0;
  };
  void run();
  void send(Queued item);
  void complete(uint64_t ticket);

  Options options_;
  // Declared before thread_: the thread uses it and is joined in the destructor first.
  std::unique_ptr<ClientTransport> transport_;
  std::mutex mutex_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<Queued> queue_;              // guarded by mutex_
  std::map<uint64_t, size_t> remaining_;  // ticket -> messages not yet complete
  uint64_t next_ticket_ = 1;              // guarded by mutex_
  bool stop_ = false;                     // guarded by mutex_
  uint64_t next_rpc_seq_ = 1;             // notifier thread only
  std::thread thread_;
};

}  // namespace ramkv::coordinator
