#include "master/log_cleaner.h"

#include <algorithm>
#include <array>
#include <string>

#include "common/config.h"
#include "common/log.h"

namespace ramkv::master {

LogCleaner::LogCleaner(Log& log, LogEntryHandlers& handlers, const Clock& clock)
    : log_(log), handlers_(handlers), clock_(clock), seglet_bytes_(log.pool().seglet_bytes()) {}

LogCleaner::~LogCleaner() { stop(); }

void LogCleaner::start() {
  RAMKV_CHECK(!thread_.joinable());
  log_.set_cleaner_wakeup([this] { wake(); });
  thread_ = std::thread([this] { run(); });
}

void LogCleaner::stop() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void LogCleaner::wake() {
  {
    std::lock_guard lock(mutex_);
    woken_ = true;
  }
  cv_.notify_one();
}

CleanerStats LogCleaner::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

void LogCleaner::count_copied(uint64_t bytes) {
  std::lock_guard lock(mutex_);
  stats_.bytes_copied += bytes;
}

void LogCleaner::run() {
  const uint64_t low = log_.low_free_seglets();
  const uint64_t high = 2 * low;
  bool was_stuck = false;
  std::unique_lock lock(mutex_);
  while (!stop_) {
    cv_.wait_for(lock, std::chrono::milliseconds(20), [&] { return stop_ || woken_; });
    woken_ = false;
    if (stop_) break;
    if (log_.free_for_data() >= low) {
      // Nothing to do; answer writers that asked while memory was fine.
      lock.unlock();
      log_.finish_cleaning_round(log_.cleaning_requests(), false);
      was_stuck = false;
      lock.lock();
      continue;
    }
    lock.unlock();
    uint64_t request = log_.cleaning_requests();
    bool stuck = false;
    while (log_.free_for_data() < high) {
      if (clean_once() == 0) {
        stuck = log_.free_for_data() == 0;
        break;
      }
      std::lock_guard check(mutex_);
      if (stop_) break;
    }
    if (stuck && !was_stuck) {
      // Writes of new data answer kNoSpace until something is removed or overwritten.
      const LogStats stats = log_.stats();
      LOG_WARNING(
          "log cleaner: memory is full and cleaning can free none of it: {} of {} bytes "
          "live ({} of them tombstones)",
          stats.live_bytes, stats.memory_bytes, handlers_.tombstone_bytes());
    }
    was_stuck = stuck;
    log_.finish_cleaning_round(request, stuck);
    lock.lock();
  }
}

double LogCleaner::score(const Segment& s, uint64_t now_ns, bool combined,
                         uint64_t dying_tombstones) const {
  double denom = combined ? static_cast<double>(s.capacity())
                          : static_cast<double>(std::max<uint64_t>(s.memory_bytes(), 1));
  double u = std::min(1.0, static_cast<double>(s.live_bytes()) / denom);
  // Tombstones that die with the segment come back as memory too (at their holders' next
  // compaction), at no copying cost.
  double gain = 1.0 - u + static_cast<double>(dying_tombstones) / denom;
  double age =
      1.0 + static_cast<double>(now_ns > s.created_ns() ? now_ns - s.created_ns() : 0) / 1e9;
  return gain * age / (1.0 + u);
}

uint64_t LogCleaner::clean_once() {
  std::vector<Segment*> segments = log_.cleanable_segments();
  if (segments.empty()) return 0;
  const MasterConfig& cfg = log_.config();
  if (static_cast<double>(segments.size() + 1) >
      0.9 * static_cast<double>(cfg.max_log_segments())) {
    if (uint64_t freed = clean_combined(segments); freed > 0) return freed;
  }
  // Tombstones die only with the segments they name, which compaction never removes: once
  // they hold a quarter of the memory that objects leave, remove segments first.
  if (const uint64_t tombstones = handlers_.tombstone_bytes(); tombstones > 0) {
    const LogStats stats = log_.stats();
    const uint64_t objects = stats.live_bytes > tombstones ? stats.live_bytes - tombstones : 0;
    const uint64_t headroom = stats.memory_bytes > objects ? stats.memory_bytes - objects : 0;
    if (tombstones > headroom / 4) {
      if (uint64_t freed = clean_combined_for(segments, /*memory_only=*/true); freed > 0) {
        return freed;
      }
    }
  }
  // Best segment to compact: frees at least one seglet and fits the memory the cleaner
  // can count on. The copy is at most the live bytes (entries are packed end to end and
  // a closed segment's live bytes only shrink), so it needs no seglet of slack.
  uint64_t now = clock_.now_ns();
  const uint64_t available = cleaner_seglets();
  Segment* best = nullptr;
  double best_score = -1;
  for (Segment* s : segments) {
    uint64_t needed = (s->live_bytes() + seglet_bytes_ - 1) / seglet_bytes_;
    if (needed >= s->seglet_count() || needed > available) continue;
    double sc = score(*s, now, false);
    if (sc > best_score) {
      best_score = sc;
      best = s;
    }
  }
  if (best != nullptr) {
    if (uint64_t freed = compact(best); freed > 0) return freed;
  }
  // Memory is the goal here: a pass that would only merge segments costs memory (the
  // new head), and repeating it would drain the reserve without end.
  return clean_combined_for(std::move(segments), /*memory_only=*/true);
}

uint64_t LogCleaner::cleaner_seglets() const {
  // The head never takes the last reserve_seglets, so that many (or what is free, if a
  // cleaning pass already dipped into them) stay free for the cleaner however writers run.
  return std::min(log_.pool().free_count(), log_.pool().reserve_seglets());
}

// Fills survivor segments for one combined pass.
class LogCleaner::Survivors final : public EntryRelocator {
 public:
  Survivors(Log& log, uint64_t created_ns)
      : log_(log), created_ns_(created_ns), in_log_(log.segment_ids()) {}
  // The victim whose entries are appended next. Every victim named before it was moved
  // out in full, so it leaves the log with the survivors.
  void start_victim(uint64_t segment_id) {
    leaving_.insert(std::upper_bound(leaving_.begin(), leaving_.end(), segment_id), segment_id);
  }
  bool tombstone_needed(uint64_t named) const override {
    return std::binary_search(in_log_.begin(), in_log_.end(), named) &&
           !std::binary_search(leaving_.begin(), leaving_.end(), named);
  }
  Result<LogRef> append(std::span<const std::byte> raw, uint32_t header_bytes) override {
    for (int attempt = 0; attempt < 2; ++attempt) {
      if (!current_) {
        current_ = log_.new_survivor(created_ns_);
      }
      auto off = current_->append_raw(raw, header_bytes);
      if (off.ok()) {
        current_->add_live_bytes(raw.size());
        copied_ += raw.size();
        return current_->arena_offset(*off);
      }
      if (off.status() != Status::kNoSpace) return off.status();
      current_->close();
      done_.push_back(std::move(current_));
    }
    return Status::kInternal;
  }
  std::vector<std::unique_ptr<Segment>> take() {
    if (current_) done_.push_back(std::move(current_));
    return std::move(done_);
  }
  uint64_t memory_bytes() const {
    uint64_t n = current_ ? current_->memory_bytes() : 0;
    for (const auto& s : done_) n += s->memory_bytes();
    return n;
  }
  uint64_t copied() const { return copied_; }

 private:
  Log& log_;
  uint64_t created_ns_;
  std::unique_ptr<Segment> current_;
  std::vector<std::unique_ptr<Segment>> done_;
  uint64_t copied_ = 0;
  const std::vector<uint64_t> in_log_;  // the log's segment ids when the pass began, sorted
  std::vector<uint64_t> leaving_;       // sorted ids of the victims moved out or being moved
};

namespace {
// Relocates into one compaction target.
class CompactionTarget final : public EntryRelocator {
 public:
  CompactionTarget(Segment& target, std::vector<uint64_t> in_log)
      : target_(target), in_log_(std::move(in_log)) {}
  Result<LogRef> append(std::span<const std::byte> raw, uint32_t header_bytes) override {
    auto off = target_.append_raw(raw, header_bytes);
    if (!off.ok()) return off.status();
    target_.add_live_bytes(raw.size());
    copied_ += raw.size();
    return target_.arena_offset(*off);
  }
  uint64_t copied() const { return copied_; }
  // The compacted segment keeps its id, and its replicas keep every entry it ever held:
  // nothing leaves the log.
  bool tombstone_needed(uint64_t named) const override {
    return std::binary_search(in_log_.begin(), in_log_.end(), named);
  }

 private:
  Segment& target_;
  const std::vector<uint64_t> in_log_;  // the log's segment ids, sorted
  uint64_t copied_ = 0;
};

// Moves every entry of `victim` through `to`; false at the first failure. Entries go in
// small batches whose hash-table buckets are prefetched first: the bucket miss is most of
// the cost of moving a small object, and the batch lets the misses overlap.
bool relocate_all(const Segment& victim, LogEntryHandlers& handlers, EntryRelocator& to) {
  constexpr size_t kBatch = 8;
  std::array<std::string, kBatch> scratch;  // for entries that cross seglets
  std::array<std::pair<uint32_t, Segment::Entry>, kBatch> batch;
  uint32_t offset = 0;
  while (offset < victim.length()) {
    size_t n = 0;
    for (; n < kBatch && offset < victim.length(); ++n) {
      Segment::Entry e = victim.entry_at(offset, &scratch[n]);
      handlers.prefetch(e);
      batch[n] = {offset, e};
      offset += e.header.total_bytes();
    }
    for (size_t i = 0; i < n; ++i) {
      if (handlers.relocate(victim, batch[i].first, batch[i].second, to) != Status::kOk) {
        return false;
      }
    }
  }
  return true;
}
}  // namespace

uint64_t LogCleaner::compact(Segment* victim) {
  std::unique_ptr<Segment> target = log_.new_compaction_target(*victim);
  CompactionTarget to(*target, log_.segment_ids());
  bool ok = relocate_all(*victim, handlers_, to);
  // The sizes were checked against the reserve, which only the cleaner draws on.
  RAMKV_CHECK_MSG(ok, "compaction ran out of reserved memory");
  uint64_t before = victim->memory_bytes();
  uint64_t after = target->memory_bytes();
  log_.finish_compaction(victim, std::move(target));
  uint64_t freed = before > after ? before - after : 0;
  std::lock_guard lock(mutex_);
  stats_.compactions++;
  stats_.bytes_copied += to.copied();
  stats_.bytes_freed += freed;
  return freed;
}

uint64_t LogCleaner::clean_combined(std::vector<Segment*> candidates) {
  return clean_combined_for(std::move(candidates), /*memory_only=*/false);
}

uint64_t LogCleaner::clean_combined_for(std::vector<Segment*> candidates, bool memory_only) {
  // Snapshot each candidate once: live bytes change under writers while we choose, and a
  // comparator whose answers change is not a strict weak ordering (std::sort then runs
  // off the end of the vector).
  struct Candidate {
    Segment* segment;
    uint64_t live;
    uint64_t memory;
    uint64_t naming;  // bytes of the tombstones that die when it leaves the log
    double rank;      // cost-benefit; a pass for memory counts the tombstones in
  };
  const uint64_t now = clock_.now_ns();
  std::vector<Candidate> ranked;
  ranked.reserve(candidates.size());
  for (Segment* s : candidates) {
    Candidate c{s, s->live_bytes(), s->memory_bytes(), handlers_.tombstone_bytes_naming(s->id()),
                0};
    c.rank = score(*s, now, true, memory_only ? c.naming : 0);
    ranked.push_back(c);
  }
  std::sort(ranked.begin(), ranked.end(),
            [](const Candidate& a, const Candidate& b) { return a.rank > b.rank; });

  // Survivors must fit the memory the cleaner can count on (the victims are freed only
  // after them): a seglet of slack per survivor and two for the head.
  const uint64_t segment_bytes = log_.config().segment_bytes;
  const uint64_t reserve_bytes = cleaner_seglets() * seglet_bytes_;
  auto fits = [&](uint64_t live) {
    return live + (live / segment_bytes + 3) * seglet_bytes_ <= reserve_bytes;
  };
  // What a pass gives back (victims' memory and the tombstones that die with them) less
  // what it takes before the victims go: survivors and the new head, at most.
  auto net = [&](uint64_t given_back, uint64_t live) {
    const uint64_t taken = (live / seglet_bytes_ + live / segment_bytes + 2) * seglet_bytes_;
    return static_cast<int64_t>(given_back) - static_cast<int64_t>(taken);
  };
  // Best first, passing over any that no longer fit: stopping at the first one left
  // passes of a single small segment that gave nothing back while memory ran out.
  std::vector<const Candidate*> chosen;
  uint64_t live = 0;
  uint64_t given_back = 0;  // victims' memory and the tombstones that die with them
  for (const Candidate& c : ranked) {
    if (!fits(live + c.live)) continue;
    chosen.push_back(&c);
    live += c.live;
    given_back += c.memory + c.naming;
  }
  if (memory_only) {
    // The best-ranked few can give back less than one victim that fills the reserve
    // alone (a knapsack's greedy answer against its best single item): take whichever
    // gives more. In a memory full of live objects and tombstones, a small segment
    // ranked first with nothing else fitting beside it left the cleaner stuck
    // (docs/master-storage.md, "Cleaning").
    const Candidate* single = nullptr;
    int64_t single_net = 0;
    for (const Candidate& c : ranked) {
      // One without dying tombstones is a compaction's work, not a pass's.
      if (c.naming == 0 || !fits(c.live)) continue;
      const int64_t c_net = net(c.memory + c.naming, c.live);
      if (single == nullptr || c_net > single_net) {
        single = &c;
        single_net = c_net;
      }
    }
    if (single != nullptr && single_net > net(given_back, live)) {
      chosen = {single};
      live = single->live;
      given_back = single->memory + single->naming;
    }
  }
  // Oldest id first: a tombstone names a segment no newer than the one holding it (but
  // for one written into the head during a pass, naming that pass's survivor), so the
  // segment it names has mostly been moved out when it comes up, and it is dropped
  // instead of copied. The order only decides how many are copied.
  std::sort(chosen.begin(), chosen.end(), [](const Candidate* a, const Candidate* b) {
    return a->segment->id() < b->segment->id();
  });
  std::vector<Segment*> victims;
  uint64_t dying_tombstones = 0;
  for (const Candidate* c : chosen) {
    victims.push_back(c->segment);
    dying_tombstones += c->naming;
  }
  // The tombstones naming the victims die with them: their bytes come back when the
  // segments holding them are next cleaned (overwrites write one each, so in a memory
  // full of live objects this may be the only way to free any).
  bool frees_memory = net(given_back, live) > 0;
  bool frees_segments = victims.size() > live / segment_bytes + 1;
  if (victims.empty() || (victims.size() < 2 && dying_tombstones == 0) ||
      (!frees_memory && (memory_only || !frees_segments))) {
    return 0;
  }

  uint64_t created = 0;
  {
    // Survivors inherit the live-byte-weighted age of their victims.
    double weighted = 0;
    for (Segment* v : victims) {
      weighted += static_cast<double>(v->created_ns()) * static_cast<double>(v->live_bytes() + 1);
    }
    created = static_cast<uint64_t>(weighted / static_cast<double>(live + victims.size()));
  }
  Survivors to(log_, created);
  size_t done = 0;
  for (Segment* v : victims) {
    to.start_victim(v->id());
    if (!relocate_all(*v, handlers_, to)) break;
    ++done;
  }
  // A victim not fully relocated stays in the log; what moved out of it is dead there.
  std::vector<Segment*> cleaned(victims.begin(), victims.begin() + static_cast<ptrdiff_t>(done));
  uint64_t before = 0;
  for (Segment* v : cleaned) before += v->memory_bytes();
  uint64_t after = to.memory_bytes();
  uint64_t copied = to.copied();
  std::vector<uint64_t> cleaned_ids;
  cleaned_ids.reserve(cleaned.size());
  for (Segment* v : cleaned) cleaned_ids.push_back(v->id());
  log_.commit_cleaning(to.take(), cleaned);
  uint64_t freed = before > after ? before - after : 0;
  uint64_t died = handlers_.segments_left_log(cleaned_ids);
  std::lock_guard lock(mutex_);
  stats_.combined_passes++;
  stats_.segments_cleaned += cleaned.size();
  stats_.bytes_copied += copied;
  stats_.bytes_freed += freed;
  stats_.tombstone_bytes_killed += died;
  if (done == 0) return 0;
  // Dead tombstones are memory that the next compaction of their segments frees. Fewer
  // segments in the log is progress even when no memory came back, unless memory was the
  // point.
  return memory_only ? freed + died : std::max<uint64_t>(freed + died, 1);
}

}  // namespace ramkv::master
