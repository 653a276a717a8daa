// FoundReplicaCollector: decides what becomes of the replicas a restarted backup found on
// its disk (BackupService's scan; docs/rpc.md, "A backup's restart"). It runs on its own
// thread beside the server's dispatch loop and is an ordinary client: it asks the
// coordinator for the server list, asks masters, and frees replicas by sending
// kBackupFree to its own server.
//
// A found replica of master M is
//   - freed once M is up and answers kIsReplicaNeeded with "no": M knows of the backup's
//     restart and holds that segment on R replicas elsewhere, or the segment left its log
//     (freeing it sooner could lose the only copy if M died before re-replicating);
//   - freed once M is listed as removed (its recovery finished);
//   - kept while M is crashed, replaced by a newer generation (its recovery needs the
//     replica) or cannot be reached; it is asked again each interval.
// The collector stops when nothing found is left, or at stop().
//
// Owner: server/main.cc. Threads: start() and stop()/the destructor on one thread; pass()
// runs on the collector's thread (or a test's).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/transport.h"
#include "common/wire_format.h"

namespace ramkv::backup {

class FoundReplicaCollector {
 public:
  struct Options {
    std::string coordinator;
    std::string self_locator;  // this server, which frees its own replicas
    uint64_t backup_id = 0;    // this backup's current id
    uint64_t interval_ns = 1'000'000'000;
    uint64_t rpc_timeout_ns = 2'000'000'000;
  };

  FoundReplicaCollector(const Options& options, std::vector<wire::ReplicaEntry> found);
  ~FoundReplicaCollector();
  FoundReplicaCollector(const FoundReplicaCollector&) = delete;
  FoundReplicaCollector& operator=(const FoundReplicaCollector&) = delete;

  // Tells the coordinator what was found (kReportBackupReplicas), then runs pass() every
  // interval on a thread until nothing is left or stop().
  void start();
  void stop();

  // One round; returns how many found replicas are still undecided.
  size_t pass();
  size_t freed() const { return freed_; }

 private:
  // Whether `master_id` (up) still needs each of `segments`; empty on failure.
  std::vector<bool> ask_master(uint64_t master_id, const std::string& locator,
                               const std::vector<uint64_t>& segments);
  // Frees one replica on this server; true once it is gone.
  bool free_replica(uint64_t master_id, uint64_t segment_id);
  void report();

  Options options_;
  std::unique_ptr<ClientTransport> client_;
  std::map<uint64_t, std::vector<wire::ReplicaEntry>> found_;  // by master id
  size_t freed_ = 0;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace ramkv::backup
