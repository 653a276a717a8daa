#include "client/multi_op.h"

#include <map>
#include <memory>
#include <set>

namespace ramkv::client {

namespace {

// Leaves room for the header and the MultiHeader under the body limit.
constexpr size_t kMaxBatchBytes = wire::kMaxBodyBytes - 4096;

struct MultiOp : std::enable_shared_from_this<MultiOp> {
  Client::Impl* impl = nullptr;
  wire::Opcode opcode = wire::Opcode::kMultiRead;
  std::vector<MultiItem> items;
  std::vector<MultiItemResult> results;
  std::vector<size_t> open;   // items of the current round
  std::vector<size_t> again;  // items for the next round
  uint64_t deadline_ns = 0;
  Backoff backoff{0x5eed};
  Status last_transient = Status::kTimeout;
  size_t rpcs_in_flight = 0;
  size_t refreshes_in_flight = 0;
  Status refresh_status = Status::kOk;
  std::function<void(std::vector<MultiItemResult>)> done;

  void round(bool refreshed);
  void refresh(const std::set<uint64_t>& tables);
  void send_batch(const std::string& locator, std::vector<size_t> batch);
  void on_batch(const std::vector<size_t>& batch, Status s, std::span<const std::byte> body);
  bool parse_item(wire::BodyReader& r, size_t index);
  void end_round();
  void finish();
};

using MultiOpPtr = std::shared_ptr<MultiOp>;

void MultiOp::round(bool refreshed) {
  if (impl->now_ns() >= deadline_ns) {
    for (size_t i : open) results[i].status = last_transient;
    return finish();
  }
  std::map<std::string, std::vector<size_t>> by_master;
  std::set<uint64_t> need_map;
  // Items whose owner is down go to `again` only once this round is sure to be sent: a
  // round that waits for a refresh is redone from `open`, which still holds them, and
  // adding them now would duplicate them (the same write twice in one batch, and
  // copies that multiply round after round).
  std::vector<size_t> owner_down;
  for (size_t i : open) {
    const MultiItem& item = items[i];
    bool usable = refreshed || !impl->table_stale(item.table_id);
    const Tablet* t = usable ? impl->map().find(item.table_id, item.key_hash) : nullptr;
    if (t == nullptr) {
      if (refreshed) {
        results[i].status = Status::kUnknownTable;
      } else {
        need_map.insert(item.table_id);
      }
      continue;
    }
    const ServerRecord* server = impl->map().server(t->server_id);
    if (server == nullptr || server->status != 0) {
      impl->mark_stale(item.table_id);
      last_transient = Status::kUnavailable;
      owner_down.push_back(i);
      continue;
    }
    by_master[server->locator].push_back(i);
  }
  if (!need_map.empty()) return refresh(need_map);  // the whole round waits for the map
  again.insert(again.end(), owner_down.begin(), owner_down.end());
  open.clear();
  for (auto& [locator, indices] : by_master) {
    std::vector<size_t> batch;
    size_t batch_bytes = 0;
    for (size_t i : indices) {
      size_t n = items[i].request.size();
      if (!batch.empty() &&
          (batch.size() == wire::kMaxMultiCount || batch_bytes + n > kMaxBatchBytes)) {
        send_batch(locator, std::move(batch));
        batch.clear();
        batch_bytes = 0;
      }
      batch.push_back(i);
      batch_bytes += n;
    }
    if (!batch.empty()) send_batch(locator, std::move(batch));
  }
  if (rpcs_in_flight == 0) end_round();
}

void MultiOp::refresh(const std::set<uint64_t>& tables) {
  refreshes_in_flight = tables.size();
  refresh_status = Status::kOk;
  for (uint64_t table_id : tables) {
    impl->refresh_table(table_id, [self = shared_from_this()](Status s) {
      if (s != Status::kOk) self->refresh_status = s;
      if (--self->refreshes_in_flight > 0) return;
      if (self->refresh_status == Status::kOk) return self->round(true);
      if (!should_resend(self->refresh_status)) {
        for (size_t i : self->open) self->results[i].status = self->refresh_status;
        return self->finish();
      }
      self->last_transient = self->refresh_status;
      self->again.insert(self->again.end(), self->open.begin(), self->open.end());
      self->open.clear();
      self->end_round();
    });
  }
}

void MultiOp::send_batch(const std::string& locator, std::vector<size_t> batch) {
  OpPtr op = impl->make_op(opcode, Target::kLocator);
  op->locator = locator;
  op->resend = false;
  op->deadline_ns = deadline_ns;
  wire::BodyWriter w(&op->body);
  w.put(wire::MultiHeader{.count = static_cast<uint32_t>(batch.size())});
  for (size_t i : batch) w.put_bytes(std::span<const std::byte>(items[i].request));
  op->done = [self = shared_from_this(), batch = std::move(batch)](
                 Status s, std::span<const std::byte> body, const Tablet*) {
    self->on_batch(batch, s, body);
  };
  ++rpcs_in_flight;
  impl->start(op);
}

// A master the coordinator declared crashed answers kFenced, to a whole batch or an item:
// its tablets are going to recovery masters, so it is treated as "not mine".
Status as_routed(Status s) { return s == Status::kFenced ? Status::kUnknownTablet : s; }

void MultiOp::on_batch(const std::vector<size_t>& batch, Status s,
                       std::span<const std::byte> body) {
  s = as_routed(s);
  if (s != Status::kOk) {
    for (size_t i : batch) {
      if (should_resend(s)) {
        impl->mark_stale(items[i].table_id);
        again.push_back(i);
      } else {
        results[i].status = s;
      }
    }
    if (should_resend(s)) last_transient = s == Status::kUnknownTablet ? Status::kTimeout : s;
  } else {
    wire::BodyReader r(body);
    for (size_t k = 0; k < batch.size(); ++k) {
      // A master may answer fewer items than asked (a full reply); the rest go again.
      if (!parse_item(r, batch[k])) again.push_back(batch[k]);
    }
  }
  if (--rpcs_in_flight == 0) end_round();
}

// false: the item must go again (not answered, or a resend status).
bool MultiOp::parse_item(wire::BodyReader& r, size_t index) {
  uint16_t raw = 0;
  if (!r.get(&raw)) return false;
  auto s = as_routed(static_cast<Status>(raw));
  MultiItemResult& out = results[index];
  if (should_resend(s)) {
    impl->mark_stale(items[index].table_id);
    last_transient = s == Status::kUnknownTablet ? Status::kTimeout : s;
    return false;
  }
  out.payload.clear();
  out.status = s;
  if (s != Status::kOk) return true;
  wire::BodyWriter w(&out.payload);
  std::string_view value;
  if (opcode == wire::Opcode::kMultiRead) {
    wire::ReadResponse rr;
    if (!r.get(&rr) || !r.get_string(rr.value_bytes, &value)) return false;
    w.put(rr);
    w.put_bytes(value);
  } else {
    wire::VersionResponse vr;
    if (!r.get(&vr)) return false;
    w.put(vr);
  }
  return true;
}

void MultiOp::end_round() {
  if (again.empty()) return finish();
  open.swap(again);
  again.clear();
  uint64_t now = impl->now_ns();
  if (now >= deadline_ns) return round(false);  // fails the open items
  impl->schedule(backoff.next_delay_ns(now, deadline_ns),
                 [self = shared_from_this()] { self->round(false); });
}

void MultiOp::finish() {
  auto fn = std::move(done);
  done = nullptr;
  impl->end_user_op();
  if (fn) fn(std::move(results));
}

}  // namespace

void start_multi(Client::Impl& impl, wire::Opcode opcode, std::vector<MultiItem> items,
                 std::function<void(std::vector<MultiItemResult>)> done) {
  auto m = std::make_shared<MultiOp>();
  m->impl = &impl;
  m->opcode = opcode;
  m->results.resize(items.size());
  m->items = std::move(items);
  m->open.resize(m->items.size());
  for (size_t i = 0; i < m->open.size(); ++i) m->open[i] = i;
  m->deadline_ns = impl.deadline_after_ms(impl.options().timeout_ms);
  m->done = std::move(done);
  impl.begin_user_op();
  if (m->items.empty()) {
    impl.schedule(0, [m] { m->finish(); });  // completions run from poll(), never here
    return;
  }
  m->round(false);
}

}  // namespace ramkv::client
