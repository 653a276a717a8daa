// MasterNotifier: delivers the coordinator's one-way orders to servers (take tablets,
// drop tablets; server list updates later) from its own thread, so that the dispatch
// loop never waits on a server that is slow, down, or not serving yet (a master enlists
// before its own loop runs: an order sent from the coordinator's loop while the master
// waits for its enlist reply would stall both until the timeout).
//
// A batch of messages is posted and gets a ticket; the poster may wait for the ticket
// (create table waits, so that masters own their tablets when the reply goes out) or not
// (re-sends at start and after a re-enlist).
//
// Take and drop tablets are resent until they are answered: a master that timed out, or
// answered kRetry (it could not yet empty a range dropped there before), would otherwise
// never own a tablet the coordinator's map gives it, and its clients would retry it until
// their deadlines. Both are idempotent. Resends back off (retry_initial_ns doubling to
// retry_max_ns) and stop after give_up_ns (the server is gone; a restarted coordinator
// sends every owned tablet again). Orders to one locator go one at a time, in the order
// posted, so a resent take cannot overtake the drop that followed it. A server that
// restarted on the same locator refuses orders naming the server before it (masters check
// the server id of every tablet). Server list updates are not resent (a newer one follows)
// and never wait behind an order being resent to the same server.
//
// Owner: the CoordinatorService. Threads: post() and wait() from any thread; the
// ClientTransport and the lanes are used only by the notifier's own thread.
// Invariants:
//   1. Every posted message completes exactly once (answered, or failed for good), and
//      its ticket's count drops by one when it does.
//   2. At most `max_queued` messages are posted and not complete; post() drops (and logs)
//      beyond it.
//   3. Per locator at most one take or drop is in flight, the oldest posted not yet
//      complete; server lists go outside that order, at once.
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
    uint64_t timeout_ns = 2'000'000'000;  // per attempt
    size_t max_queued = 65536;
    uint64_t retry_initial_ns = 100'000'000;
    uint64_t retry_max_ns = 2'000'000'000;
    uint64_t give_up_ns = 60'000'000'000;  // after the first attempt
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
  // False at once for a ticket post() had to drop messages of (queue full).
  bool wait(uint64_t ticket, uint64_t timeout_ns);
  // Waits until nothing is queued or in flight (tests).
  bool wait_idle(uint64_t timeout_ns);

 private:
  struct Queued {
    Message message;
    uint64_t ticket = 0;
    uint32_t attempts = 0;
    uint64_t first_sent_ns = 0;
    uint64_t retry_delay_ns = 0;
  };
  // The messages to one locator, oldest first; the front one is the one sent.
  struct Lane {
    std::deque<Queued> waiting;
    bool in_flight = false;
    uint64_t send_at_ns = 0;  // a resend waits until then
  };
  void run();
  // Sends the front message of every lane that may send now.
  void send_ready(uint64_t now_ns);
  // When a lane may send next (UINT64_MAX: none has a message waiting to be sent).
  uint64_t next_send_ns() const;
  void send(const std::string& locator, Queued& item, uint64_t now_ns);
  // A message outside the lanes (a server list): sent once, now.
  void send_once(const Queued& item);
  void on_answer(const std::string& locator, Status s);
  void complete(uint64_t ticket);

  Options options_;
  // Declared before thread_: the thread uses it and is joined in the destructor first.
  std::unique_ptr<ClientTransport> transport_;
  std::mutex mutex_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<Queued> queue_;              // guarded by mutex_
  std::map<uint64_t, size_t> remaining_;  // ticket -> messages not yet complete
  size_t pending_ = 0;                    // posted and not yet complete; guarded by mutex_
  std::deque<uint64_t> short_tickets_;    // the latest tickets post() dropped messages of
  uint64_t next_ticket_ = 1;              // guarded by mutex_
  bool stop_ = false;                     // guarded by mutex_
  uint64_t next_rpc_seq_ = 1;             // notifier thread only
  std::map<std::string, Lane> lanes_;     // notifier thread only
  std::thread thread_;
};

}  // namespace ramkv::coordinator
