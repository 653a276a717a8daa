// FailureDetector: a server's half of failure detection (docs/recovery.md, "Failure
// detection"). Every `ping_interval_ns` it pings one other server that is up, picked at
// random from the newest server list (`echo`, with `ping_timeout_ns`); a server that does
// not answer is reported to the coordinator (`hint server crashed`), which verifies it
// itself before declaring anything. It also watches this server's own standing: when every
// ping has failed for 3 x `ping_timeout_ns` (we may be the one cut off), or when its own
// thread did not run for longer than it slept plus `ping_timeout_ns` (the process was
// stopped or starved, as a zombie's would be), it fetches the server list from the
// coordinator, and calls `on_gone` if this server was declared crashed or replaced.
//
// It runs on its own thread and sleeps between pings (a condition variable, and epoll
// under its ClientTransport): it never spins, and never touches the dispatch loop.
//
// Owner: the server (server/main.cc). Threads: start(), stop() and the destructor from
// the owner's thread; update_servers() from any thread (the dispatch thread passes on the
// lists the coordinator pushes); `on_gone` runs on the detector's thread.
// Invariants:
//   1. At most one RPC in flight (ping, hint or list fetch), each bounded by
//      `ping_timeout_ns` (a list fetch by at least kMinFetchTimeoutNs); stop() returns
//      within about kStopSliceNs plus one poll, not after a whole timeout.
//   2. Only servers listed up, other than this one, are pinged; none at all once this
//      server is known to be declared crashed (by a list from either source).
//   3. `on_gone` is called at most once, and only for a list this detector fetched.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/transport.h"
#include "common/wire_format.h"

namespace ramkv::server {

// Whether `servers` says that the server `self_id` is no longer a member: its entry is
// listed crashed or removed, or its index is listed with a newer generation (it was
// replaced). A list without our index predates our enlistment and says nothing.
bool declared_gone(uint64_t self_id, const std::vector<wire::ServerListItem>& servers);

class FailureDetector {
 public:
  static constexpr uint64_t kStopSliceNs = 20'000'000;
  static constexpr uint64_t kMinFetchTimeoutNs = 1'000'000'000;

  struct Options {
    std::string coordinator;
    uint64_t self_id = 0;
    uint64_t ping_interval_ns = 100'000'000;
    uint64_t ping_timeout_ns = 500'000'000;
    uint64_t seed = 0;  // which server to ping; 0: from the clock
  };
  using OnGone = std::function<void()>;

  FailureDetector(const Options& options, OnGone on_gone);
  ~FailureDetector();  // stop()
  FailureDetector(const FailureDetector&) = delete;
  FailureDetector& operator=(const FailureDetector&) = delete;

  void start();
  // Idempotent; waits for the thread.
  void stop();
  // The coordinator's newest server list; older versions than one seen change nothing.
  void update_servers(uint64_t version, const std::vector<wire::ServerListItem>& servers);

 private:
  struct Peer {
    uint64_t id = 0;
    std::string locator;
  };

  void run();
  // One ping; true if answered.
  bool ping(ClientTransport& client, const Peer& peer);
  void hint(ClientTransport& client, const Peer& peer);
  // Fetches the list and takes it in; calls on_gone_ if it shows us gone.
  void check_membership(ClientTransport& client);
  struct Outcome {
    bool delivered = false;                // a reply came, whatever its status
    Status status = Status::kUnavailable;  // the transport's, or on delivery the reply's
    std::vector<std::byte> body;
  };
  // Sends and polls until the reply, the timeout or stop() (then: not delivered,
  // kUnavailable).
  Outcome call_unless_stopped(ClientTransport& client, const std::string& locator,
                              wire::Opcode opcode, std::span<const std::byte> body,
                              uint64_t timeout_ns);

  Options options_;
  OnGone on_gone_;
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
  // Guarded by mutex_.
  std::vector<Peer> peers_;
  uint64_t list_version_ = 0;
  bool have_list_ = false;
  bool gone_ = false;
  bool gone_reported_ = false;  // detector thread only
  uint64_t rpc_seq_ = 0;        // detector thread only
  std::thread thread_;
};

}  // namespace ramkv::server
