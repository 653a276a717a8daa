#include "master/log.h"

#include <algorithm>

#include "common/config.h"
#include "common/log.h"

namespace ramkv::master {

Result<std::unique_ptr<Log>> Log::create(const MasterConfig& config, const Clock& clock,
                                         HeadMetadataSource* metadata) {
  // An overwrite appends its object, a tombstone for the old one and its completion
  // record to one segment (append_all). The head's metadata takes at most a quarter of a
  // segment (MasterConfig::finalize), so the largest such batch must fit the other three.
  const uint64_t max_object =
      entry_bytes(kMaxObjectPrefixBytes + config.max_key_bytes + config.max_value_bytes);
  const uint64_t max_tombstone = entry_bytes(kMaxTombstonePrefixBytes + config.max_key_bytes);
  const uint64_t max_record = entry_bytes(kMaxRpcResultBytes);
  if (max_object + max_tombstone + max_record > uint64_t{config.segment_bytes} / 4 * 3) {
    LOG_ERROR(
        "invalid master configuration: the largest object ({} B key + {} B value), a "
        "tombstone for it and a completion record do not fit three quarters of a segment "
        "of {} B",
        config.max_key_bytes, config.max_value_bytes, config.segment_bytes);
    return Status::kInvalidArgument;
  }
  auto pool = SegletPool::create({.memory_bytes = config.memory_bytes,
                                  .seglet_bytes = config.seglet_bytes,
                                  .reserve_seglets = config.cleaner_reserve_seglets,
                                  .prefault = config.prefault_memory});
  if (!pool.ok()) return pool.status();
  std::unique_ptr<Log> log(new Log(config, clock, metadata, std::move(pool).value()));
  std::lock_guard lock(log->append_mutex_);
  if (Status s = log->open_head_locked(false); s != Status::kOk) return s;
  return log;
}

Log::Log(const MasterConfig& config, const Clock& clock, HeadMetadataSource* metadata,
         std::unique_ptr<SegletPool> pool)
    : config_(config),
      clock_(clock),
      metadata_(metadata),
      pool_(std::move(pool)),
      master_id_(config.master_id) {
  low_free_seglets_ = config_.cleaner_low_free_bytes / config_.seglet_bytes;
}

Log::~Log() {
  std::lock_guard lock(append_mutex_);
  segments_.clear();  // before pool_, which the segments free into
}

Status Log::open_head_locked(bool allow_reserve) {
  uint64_t id = next_segment_id_++;
  auto seg = std::make_unique<Segment>(
      *pool_, Segment::Options{.id = id,
                               .capacity = config_.segment_bytes,
                               .purpose = allow_reserve ? SegletPool::Purpose::kCleaner
                                                        : SegletPool::Purpose::kHead,
                               .created_ns = clock_.now_ns()});
  std::vector<uint64_t> ids;
  ids.reserve(segments_.size() + 1);
  for (const auto& [sid, s] : segments_) ids.push_back(sid);
  ids.push_back(id);
  std::sort(ids.begin(), ids.end());

  std::vector<std::byte> header, digest, safe, stats;
  encode_segment_header(
      {.master_id = master_id_, .segment_id = id, .segment_bytes = config_.segment_bytes}, &header);
  encode_log_digest(ids, &digest);
  encode_safe_version(metadata_ != nullptr ? metadata_->safe_version() : 1, &safe);
  encode_table_stats(metadata_ != nullptr ? metadata_->table_stats() : std::vector<TableStat>{},
                     &stats);
  std::pair<EntryType, const std::vector<std::byte>*> entries[] = {
      {EntryType::kSegmentHeader, &header},
      {EntryType::kLogDigest, &digest},
      {EntryType::kSafeVersion, &safe},
      {EntryType::kTableStats, &stats}};
  for (auto [type, payload] : entries) {
    std::span<const std::byte> piece[] = {*payload};
    auto r = seg->append(type, piece);
    if (!r.ok()) {
      // No memory for a new head: keep the old one; the caller retries after cleaning.
      return r.status() == Status::kNoSpace ? Status::kInternal : r.status();
    }
  }
  seg->set_purpose(SegletPool::Purpose::kHead);
  if (head_ != nullptr) {
    head_->close();
    ++head_rollovers_;
  }
  head_ = seg.get();
  segments_.emplace(id, std::move(seg));
  structure_changes_.fetch_add(1, std::memory_order_release);
  changes_.fetch_add(1, std::memory_order_release);
  return Status::kOk;
}

namespace {

// Payload bytes of an entry made of `pieces`. Oversized payloads are refused by
// Segment::append; this only has to not wrap.
uint32_t payload_bytes_of(std::span<const std::span<const std::byte>> pieces) {
  uint64_t payload = 0;
  for (auto p : pieces) payload += p.size();
  return static_cast<uint32_t>(std::min<uint64_t>(payload, kMaxPayloadBytes));
}

}  // namespace

Result<Log::Appended> Log::append(EntryType type,
                                  std::span<const std::span<const std::byte>> pieces, bool live,
                                  std::optional<uint32_t> checksum) {
  const EntryToAppend entries[] = {
      {.type = type, .pieces = pieces, .live = live, .checksum = checksum}};
  Appended out[1];
  if (Status s = append_all(entries, out); s != Status::kOk) return s;
  return out[0];
}

Status Log::append_all(std::span<const EntryToAppend> entries, std::span<Appended> out) {
  RAMKV_CHECK(!entries.empty() && out.size() == entries.size());
  uint64_t batch_bytes = 0;
  bool new_data = false;
  for (const EntryToAppend& e : entries) {
    batch_bytes += entry_bytes(payload_bytes_of(e.pieces));
    new_data = new_data || e.type == EntryType::kObject;
  }
  // A remove's tombstone may bring its completion record into the remove margin; a record
  // alone (a rejected request, a replayed record) is new data.
  new_data = new_data || (entries.size() == 1 && entries[0].type == EntryType::kRpcResult);
  {
    std::lock_guard lock(append_mutex_);
    if (new_data && seglets_to_append_locked(batch_bytes) > free_for_data()) {
      // Leave the last seglets to tombstones (invariant 4).
      if (wake_cleaner_) wake_cleaner_();
      return Status::kRetry;
    }
    if (uint64_t{head_->length()} + batch_bytes > head_->capacity()) {
      // The head cannot take the whole batch: start a new head.
      if (Status s = open_head_locked(false); s != Status::kOk) return s;
    }
    Segment* seg = head_;
    for (size_t i = 0; i < entries.size(); ++i) {
      const EntryToAppend& e = entries[i];
      Result<uint32_t> offset = seg->append(e.type, e.pieces, e.checksum);
      // finalize() and create() guarantee that the largest batch fits a fresh head.
      RAMKV_CHECK_MSG(offset.status() != Status::kNoSpace, "entries larger than a fresh head");
      if (!offset.ok() && i > 0) {
        // The memory check above saw room for the whole batch, but the cleaner took
        // seglets since (it allocates without this lock). What it holds is bounded by its
        // reserve, so the rest of the batch fits there; taking it keeps the batch whole.
        seg->set_purpose(SegletPool::Purpose::kCleaner);
        offset = seg->append(e.type, e.pieces, e.checksum);
        seg->set_purpose(SegletPool::Purpose::kHead);
        RAMKV_CHECK_MSG(offset.ok(), "no memory for the rest of an atomic append");
      }
      if (!offset.ok()) {
        if (wake_cleaner_) wake_cleaner_();
        return offset.status();
      }
      const uint32_t bytes = entry_bytes(payload_bytes_of(e.pieces));
      // Counted before the lock is dropped: once another append closes this segment the
      // cleaner may choose it by its live bytes (which must not grow after that), and may
      // free it (nothing holds a tombstone's segment alive the way a stripe lock holds an
      // object's).
      if (e.live) seg->add_live_bytes(bytes);
      out[i] = Appended{seg->arena_offset(*offset), seg, bytes, seg->id()};
    }
    changes_.fetch_add(1, std::memory_order_release);
  }
  appended_bytes_.fetch_add(batch_bytes, std::memory_order_relaxed);
  if (wake_cleaner_ && free_for_data() < low_free_seglets_) wake_cleaner_();
  return Status::kOk;
}

uint64_t Log::seglets_to_append_locked(uint64_t bytes) const {
  const uint64_t seglet = pool_->seglet_bytes();
  uint64_t end = uint64_t{head_->length()} + bytes;
  if (end <= head_->capacity()) {
    return end <= head_->memory_bytes() ? 0 : (end - head_->memory_bytes() + seglet - 1) / seglet;
  }
  // A new head: its metadata (one seglet in any usual configuration) and the entries.
  return (bytes + seglet - 1) / seglet + 1;
}

Status Log::roll_head() {
  std::lock_guard lock(append_mutex_);
  return open_head_locked(false);
}

std::vector<uint64_t> Log::segment_ids() const {
  std::lock_guard lock(append_mutex_);
  std::vector<uint64_t> ids;
  for (const auto& [id, s] : segments_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

std::optional<Log::SegmentCopy> Log::copy_segment(uint64_t segment_id) const {
  std::lock_guard lock(append_mutex_);
  auto it = segments_.find(segment_id);
  if (it == segments_.end()) return std::nullopt;
  return SegmentCopy{it->second->copy_out(), it->second->certificate()};
}

LogStats Log::stats() const {
  std::lock_guard lock(append_mutex_);
  LogStats s;
  s.memory_bytes = pool_->memory_bytes();
  s.free_bytes = uint64_t{pool_->free_count()} * pool_->seglet_bytes();
  for (const auto& [id, seg] : segments_) s.live_bytes += seg->live_bytes();
  s.segment_count = segments_.size();
  s.head_rollovers = head_rollovers_;
  s.appended_bytes = appended_bytes_.load(std::memory_order_relaxed);
  return s;
}

Status Log::wait_for_memory(uint64_t timeout_ns, EntryType type) {
  auto free_now = [&] {
    return type == EntryType::kTombstone ? pool_->free_for_head() : free_for_data();
  };
  if (!wake_cleaner_) return Status::kRetry;  // no cleaner thread: the caller decides
  std::unique_lock lock(memory_mutex_);
  uint64_t request = ++cleaning_requests_;
  lock.unlock();
  wake_cleaner_();
  lock.lock();
  // Wait for free memory, or for a round of cleaning that began after this request.
  auto answered = [&] { return free_now() > 0 || cleaning_rounds_done_ >= request; };
  if (!memory_cv_.wait_for(lock, std::chrono::nanoseconds(timeout_ns), answered)) {
    return Status::kRetry;
  }
  if (free_now() > 0) return Status::kOk;
  return cleaner_stuck_ ? Status::kNoSpace : Status::kOk;
}

uint64_t Log::cleaning_requests() const {
  std::lock_guard lock(memory_mutex_);
  return cleaning_requests_;
}

void Log::finish_cleaning_round(uint64_t request, bool stuck) {
  {
    std::lock_guard lock(memory_mutex_);
    cleaning_rounds_done_ = std::max(cleaning_rounds_done_, request);
    cleaner_stuck_ = stuck;
  }
  memory_cv_.notify_all();
}

std::vector<Segment*> Log::cleanable_segments() const {
  std::lock_guard lock(append_mutex_);
  std::vector<Segment*> out;
  out.reserve(segments_.size());
  for (const auto& [id, seg] : segments_) {
    if (seg.get() == head_) continue;
    if (replication_required_ && !replicated_.contains(id)) continue;  // not on backups yet
    out.push_back(seg.get());
  }
  return out;
}

bool Log::contains_segment(uint64_t segment_id) const {
  std::lock_guard lock(append_mutex_);
  return segments_.count(segment_id) != 0 || pending_survivors_.count(segment_id) != 0;
}

Segment* Log::find_segment(uint64_t segment_id) const {
  std::lock_guard lock(append_mutex_);
  auto it = segments_.find(segment_id);
  return it != segments_.end() ? it->second.get() : nullptr;
}

std::unique_ptr<Segment> Log::new_survivor(uint64_t created_ns) {
  std::lock_guard lock(append_mutex_);
  uint64_t id = next_segment_id_++;
  pending_survivors_.insert(id);
  return std::make_unique<Segment>(*pool_,
                                   Segment::Options{.id = id,
                                                    .capacity = config_.segment_bytes,
                                                    .purpose = SegletPool::Purpose::kCleaner,
                                                    .created_ns = created_ns});
}

std::unique_ptr<Segment> Log::new_compaction_target(const Segment& victim) {
  return std::make_unique<Segment>(*pool_,
                                   Segment::Options{.id = victim.id(),
                                                    .capacity = victim.capacity(),
                                                    .purpose = SegletPool::Purpose::kCleaner,
                                                    .created_ns = victim.created_ns()});
}

void Log::finish_compaction(Segment* victim, std::unique_ptr<Segment> compacted) {
  compacted->close();
  std::unique_ptr<Segment> old;
  {
    std::lock_guard lock(append_mutex_);
    auto it = segments_.find(victim->id());
    RAMKV_CHECK(it != segments_.end() && it->second.get() == victim);
    old = std::move(it->second);
    it->second = std::move(compacted);
    structure_changes_.fetch_add(1, std::memory_order_release);
    changes_.fetch_add(1, std::memory_order_release);
  }
  old.reset();  // frees the victim's seglets
  notify_memory_freed();
}

void Log::commit_cleaning(std::vector<std::unique_ptr<Segment>> survivors,
                          std::span<Segment* const> victims) {
  std::vector<std::unique_ptr<Segment>> dead;
  {
    std::lock_guard lock(append_mutex_);
    for (auto& s : survivors) {
      s->close();
      pending_survivors_.erase(s->id());
      uint64_t id = s->id();
      segments_.emplace(id, std::move(s));
    }
    for (Segment* v : victims) {
      auto it = segments_.find(v->id());
      RAMKV_CHECK(it != segments_.end() && it->second.get() == v && v != head_);
      dead.push_back(std::move(it->second));
      segments_.erase(it);
      replicated_.erase(v->id());
    }
    // The new digest drops the victims and names the survivors. It may draw on the
    // reserve; if even that is spent, free the victims first (memory only: nothing
    // outside this process has seen the survivors yet).
    Status s = open_head_locked(true);
    if (s != Status::kOk) {
      dead.clear();
      s = open_head_locked(true);
    }
    // With no victim (the first one could not be moved whole), the survivors only hold
    // copies of entries that are still in the log, so the current digest still names a
    // complete log and the next head will name the survivors: keeping the head is safe,
    // and it is what happens when the survivors took the last free seglet.
    RAMKV_CHECK_MSG(s == Status::kOk || victims.empty(), "no memory for the head after cleaning");
    // Survivors came in even where no new head could open.
    structure_changes_.fetch_add(1, std::memory_order_release);
    changes_.fetch_add(1, std::memory_order_release);
  }
  dead.clear();
  notify_memory_freed();
}

Status Log::set_master_id(uint64_t master_id) {
  std::lock_guard lock(append_mutex_);
  if (segments_.size() != 1 || head_ == nullptr || head_->live_bytes() != 0 ||
      appended_bytes_.load() != 0) {
    return Status::kInvalidArgument;
  }
  master_id_ = master_id;
  head_ = nullptr;
  segments_.clear();
  next_segment_id_ = 1;
  return open_head_locked(false);
}

uint64_t Log::master_id() const {
  std::lock_guard lock(append_mutex_);
  return master_id_;
}

void Log::set_replication_required(bool required) {
  std::lock_guard lock(append_mutex_);
  replication_required_ = required;
}

std::vector<Log::SegmentView> Log::replication_view(uint64_t* head_id) const {
  std::lock_guard lock(append_mutex_);
  std::vector<SegmentView> out;
  out.reserve(segments_.size());
  for (const auto& [id, seg] : segments_) {
    // A head starts with its segment header (then the digest); survivors do not.
    bool has_digest = false;
    if (seg->length() > 0) {
      auto h = decode_entry_header(
          seg->peek(0, std::min<uint32_t>(seg->length(), kMaxEntryHeaderBytes)));
      has_digest = h.ok() && h->type == EntryType::kSegmentHeader;
    }
    out.push_back(
        {.id = id, .length = seg->length(), .closed = seg->closed(), .has_digest = has_digest});
  }
  std::sort(out.begin(), out.end(),
            [](const SegmentView& a, const SegmentView& b) { return a.id < b.id; });
  *head_id = head_->id();
  return out;
}

void Log::head_state(uint64_t* head_id, uint32_t* length) const {
  std::lock_guard lock(append_mutex_);
  *head_id = head_->id();
  *length = head_->length();
}

bool Log::replication_state(uint64_t segment_id, uint32_t* length, Certificate* certificate,
                            bool* closed) const {
  std::lock_guard lock(append_mutex_);
  auto it = segments_.find(segment_id);
  if (it == segments_.end()) return false;
  *length = it->second->length();
  *certificate = it->second->certificate();
  *closed = it->second->closed();
  return true;
}

bool Log::read_for_replication(uint64_t segment_id, uint32_t from, std::span<std::byte> out) const {
  std::lock_guard lock(append_mutex_);
  auto it = segments_.find(segment_id);
  if (it == segments_.end() || uint64_t{from} + out.size() > it->second->length()) return false;
  if (!out.empty()) it->second->read(from, out);
  return true;
}

bool Log::replication_views(uint64_t segment_id, uint32_t from, uint32_t bytes,
                            std::vector<std::span<const std::byte>>* out) const {
  std::lock_guard lock(append_mutex_);
  auto it = segments_.find(segment_id);
  if (it == segments_.end() || uint64_t{from} + bytes > it->second->length()) return false;
  it->second->views(from, bytes, out);
  return true;
}

void Log::mark_replicated(uint64_t segment_id) {
  std::lock_guard lock(append_mutex_);
  if (segments_.contains(segment_id)) replicated_.insert(segment_id);
}

void Log::notify_memory_freed() {
  { std::lock_guard lock(memory_mutex_); }
  memory_cv_.notify_all();
}

}  // namespace ramkv::master
