// FailureVerifier: the coordinator's own check of a server that another server reported
// as not answering (`hint server crashed`, docs/recovery.md, "Failure detection"). It
// pings the suspect (`echo`) up to `attempts` times, each with `timeout_ns` and at least
// `timeout_ns` after the previous one was sent; one answer clears the suspect, and only
// when every attempt failed is the `declare` callback called. A hint is a rumour from a
// server that may itself be slow or cut off; the verification is what keeps a loaded
// machine from declaring a live server dead.
//
// It runs as a LoopTask on the coordinator's dispatch loop (transport.h) and never blocks
// it: pings go out on its own ClientTransport, whose wait_fd() the loop watches, and run()
// collects what arrived with poll(0).
//
// Owner: the CoordinatorService. Threads: every method, and the `declare` callback, on the
// coordinator's dispatch thread (or before run()).
// Invariants:
//   1. At most one verification per server id at a time; a hint about a server being
//      verified changes nothing.
//   2. At most kMaxSuspects verifications at once; suspect() refuses more (and logs).
//   3. `declare` is called at most once per verification, and only after `attempts`
//      consecutive failed pings; after an attempt fails its connection is dropped, so the
//      next attempt connects afresh rather than queueing behind a stuck one.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "common/clock.h"
#include "common/transport.h"

namespace ramkv::coordinator {

class FailureVerifier final : public LoopTask {
 public:
  static constexpr size_t kMaxSuspects = 4096;

  struct Options {
    uint64_t timeout_ns = 500'000'000;  // per ping
    uint32_t attempts = 3;              // >= 1
  };
  // Called when a suspect failed every attempt (it is then forgotten here).
  using Declare = std::function<void(uint64_t server_id)>;

  FailureVerifier(const Options& options, Declare declare,
                  const Clock& clock = SystemClock::instance());
  ~FailureVerifier() override;
  FailureVerifier(const FailureVerifier&) = delete;
  FailureVerifier& operator=(const FailureVerifier&) = delete;

  // Starts verifying `server_id` at `locator`; false (nothing started) if it is already
  // being verified or kMaxSuspects are.
  bool suspect(uint64_t server_id, const std::string& locator);
  bool verifying(uint64_t server_id) const { return suspects_.contains(server_id); }
  size_t suspect_count() const { return suspects_.size(); }

  // LoopTask
  int wait_fd() const override { return client_->wait_fd(); }
  uint64_t run() override;
  void on_wait_fd_ready() override { wait_fd_ready_ = true; }

 private:
  struct Suspect {
    std::string locator;
    uint32_t failures = 0;
    uint64_t next_send_ns = 0;  // the next attempt goes no sooner
    uint64_t serial = 0;        // tells this verification's replies from an earlier one's
    bool in_flight = false;
    bool done = false;  // answered, or every attempt failed: settled after the poll
  };

  void send_ping(uint64_t server_id, Suspect& suspect, uint64_t now);
  // `transport_status` kOk: the suspect answered (whatever its reply's status says).
  void on_reply(uint64_t server_id, uint64_t serial, Status transport_status);

  Options options_;
  Declare declare_;
  const Clock& clock_;
  std::unique_ptr<ClientTransport> client_;
  bool wait_fd_ready_ = false;  // on_wait_fd_ready(): run() polls even with nothing outstanding
  std::map<uint64_t, Suspect> suspects_;  // by server id
  uint64_t next_serial_ = 0;
  uint64_t rpc_seq_ = 0;
};

}  // namespace ramkv::coordinator
