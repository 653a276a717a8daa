#include "master/tablet_dropper.h"

#include "common/clock.h"
#include "common/log.h"

namespace ramkv::master {

TabletDropper::TabletDropper(ObjectManager& objects, Options options)
    : objects_(objects), options_(options) {}

void TabletDropper::add(const TabletRange& range) {
  pending_.push_back({.range = range, .started_ns = SystemClock::instance().now_ns()});
}

Result<bool> TabletDropper::step(Pending& p, size_t max_objects) {
  auto removed = objects_.remove_range_step(p.range.table_id, p.range.start_hash, p.range.end_hash,
                                            &p.cursor, max_objects);
  if (!removed.ok()) {
    if (!p.warned) {
      LOG_WARNING(
          "emptying dropped tablet {}:[{:#x},{:#x}] failed after {} objects ({}); "
          "trying again",
          p.range.table_id, p.range.start_hash, p.range.end_hash, p.removed,
          status_name(removed.status()));
      p.warned = true;
    }
    return removed.status();
  }
  p.removed += *removed;
  removed_ += *removed;
  return p.cursor == objects_.end_cursor();
}

void TabletDropper::done(const Pending& p) const {
  LOG_INFO("dropped tablet {}:[{:#x},{:#x}]: {} objects removed in {:.3f} s", p.range.table_id,
           p.range.start_hash, p.range.end_hash, p.removed,
           static_cast<double>(SystemClock::instance().now_ns() - p.started_ns) / 1e9);
}

Status TabletDropper::finish_overlapping(const TabletRange& range) {
  for (auto it = pending_.begin(); it != pending_.end();) {
    const TabletRange& r = it->range;
    if (r.table_id != range.table_id || r.start_hash > range.end_hash ||
        range.start_hash > r.end_hash) {
      ++it;
      continue;
    }
    auto empty = step(*it, SIZE_MAX);
    if (!empty.ok()) return empty.status();
    done(*it);
    it = pending_.erase(it);
  }
  return Status::kOk;
}

namespace {

TabletRange range_of(const wire::TabletWire& t) {
  return {.table_id = t.table_id, .start_hash = t.start_hash, .end_hash = t.end_hash};
}

}  // namespace

void TabletDropper::add(std::span<const wire::TabletWire> tablets) {
  for (const auto& t : tablets) add(range_of(t));
}

Status TabletDropper::finish_overlapping(std::span<const wire::TabletWire> tablets) {
  for (const auto& t : tablets) {
    if (Status s = finish_overlapping(range_of(t)); s != Status::kOk) return s;
  }
  return Status::kOk;
}

uint64_t TabletDropper::run() {
  if (pending_.empty()) return UINT64_MAX;
  const uint64_t now = SystemClock::instance().now_ns();
  if (now < retry_at_ns_) return retry_at_ns_ - now;
  auto empty = step(pending_.front(), options_.objects_per_run);
  if (!empty.ok()) {
    retry_at_ns_ = now + options_.retry_ns;
    return options_.retry_ns;
  }
  if (*empty) {
    done(pending_.front());
    pending_.pop_front();
  }
  return pending_.empty() ? UINT64_MAX : 0;
}

}  // namespace ramkv::master
