// TabletDropper: empties the key ranges a master gave up (a dropped table, a tablet moved
// away) a bounded number of objects at a time, on the dispatch loop between requests.
//
// Removing an object writes a tombstone; a table of millions of objects took seconds
// in one go, during which the master answered no ping (its backups and then the
// coordinator took it for dead: a live master declared crashed) and the coordinator's
// drop timed out. Ownership goes first (MasterService::drop_tablets), so nothing reads or
// writes a range being emptied. Before a range is owned again (take_tablets, a recovery
// into it) what is still pending over it is finished at once (finish_overlapping): the old
// objects must not show through, nor the removal reach the new ones.
//
// Owner: the server (server/main.cc). Threads: every method runs on the dispatch thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <span>

#include "common/status.h"
#include "common/transport.h"
#include "common/wire_format.h"
#include "master/object_manager.h"

namespace ramkv::master {

class TabletDropper final : public LoopTask {
 public:
  struct Options {
    size_t objects_per_run = 4096;    // removed per pass of the loop, about
    uint64_t retry_ns = 100'000'000;  // after a failed step (a log full of tombstones)
  };

  TabletDropper(ObjectManager& objects, Options options);

  // Queues [range.start_hash, range.end_hash] of range.table_id for removal.
  void add(const TabletRange& range);
  // Removes now everything still queued over a range that overlaps `range`. kOk when
  // nothing of it is left queued.
  Status finish_overlapping(const TabletRange& range);
  // The same for each tablet of a list as the coordinator sends them.
  void add(std::span<const wire::TabletWire> tablets);
  Status finish_overlapping(std::span<const wire::TabletWire> tablets);
  size_t pending() const { return pending_.size(); }
  uint64_t objects_removed() const { return removed_; }

  int wait_fd() const override { return -1; }
  uint64_t run() override;

 private:
  struct Pending {
    TabletRange range;
    uint64_t cursor = 0;
    uint64_t removed = 0;
    uint64_t started_ns = 0;
    bool warned = false;  // a failed step was logged
  };
  // One step of `p`; true once its range is empty.
  Result<bool> step(Pending& p, size_t max_objects);
  void done(const Pending& p) const;

  ObjectManager& objects_;
  Options options_;
  std::deque<Pending> pending_;
  uint64_t retry_at_ns_ = 0;
  uint64_t removed_ = 0;
};

}  // namespace ramkv::master
