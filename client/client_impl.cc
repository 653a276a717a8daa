#include "client/client_impl.h"

#include <algorithm>
#include <random>

#include "client/client_transport.h"
#include "common/clock.h"

namespace ramkv {

using client::OpPtr;
using client::Target;

namespace {

constexpr uint64_t kNsPerMs = 1'000'000;

uint64_t random_u64() {
  std::random_device rd;
  return (uint64_t{rd()} << 32) ^ rd();
}

}  // namespace

Client::Impl::Impl(const ClientOptions& options, std::unique_ptr<ClientTransport> transport)
    : options_(options), transport_(std::move(transport)) {
  do {
    client_id_ = random_u64();
  } while (client_id_ == 0);
  jitter_seed_ = random_u64() | 1;
}

Client::Impl::~Impl() = default;

Result<std::unique_ptr<Client::Impl>> Client::Impl::create(const ClientOptions& options) {
  if (!parse_locator(options.coordinator).ok()) return Status::kInvalidArgument;
  if (options.timeout_ms == 0 || options.rpc_timeout_ms == 0) return Status::kInvalidArgument;
  // Last: the options are known good before a device is opened.
  auto transport = client::make_transport(options);
  if (!transport.ok()) return transport.status();
  return std::unique_ptr<Impl>(new Impl(options, std::move(transport).value()));
}

uint64_t Client::Impl::now_ns() const { return SystemClock::instance().now_ns(); }

uint64_t Client::Impl::deadline_after_ms(uint64_t ms) const {
  // Saturating: timeouts are uint64_t milliseconds from the caller, and a huge one
  // would otherwise wrap into the past and fail every operation at once.
  uint64_t now = now_ns();
  if (ms > (UINT64_MAX - now) / kNsPerMs) return UINT64_MAX;
  return now + ms * kNsPerMs;
}

OpPtr Client::Impl::make_op(wire::Opcode opcode, Target target) {
  auto op = std::make_shared<client::Op>();
  op->opcode = opcode;
  op->target = target;
  op->deadline_ns = deadline_after_ms(options_.timeout_ms);
  op->rpc_seq = next_rpc_seq();
  open_seqs_.insert(op->rpc_seq);
  op->backoff = client::Backoff(jitter_seed_ += 0x9e3779b97f4a7c15ULL);
  return op;
}

void Client::Impl::start(OpPtr op) {
  if (op->user) begin_user_op();
  dispatch(op);
}

void Client::Impl::dispatch(const OpPtr& op) {
  if (now_ns() >= op->deadline_ns) return finish(op, op->last_transient, {});
  switch (op->target) {
    case Target::kCoordinator:
      return send(op, options_.coordinator);
    case Target::kLocator:
      return send(op, op->locator);
    case Target::kRouted:
      return dispatch_routed(op);
  }
}

void Client::Impl::dispatch_routed(const OpPtr& op) {
  const client::Tablet* t =
      table_stale(op->table_id) ? nullptr : map_.find(op->table_id, op->key_hash);
  if (t != nullptr) return send_routed(op, *t);
  refresh_table(op->table_id, [this, op](Status s) {
    if (s != Status::kOk) {
      return client::should_resend(s) ? retry_later(op, s) : finish(op, s, {});
    }
    const client::Tablet* fresh = map_.find(op->table_id, op->key_hash);
    if (fresh == nullptr) return finish(op, Status::kUnknownTable, {});
    send_routed(op, *fresh);
  });
}

void Client::Impl::send_routed(const OpPtr& op, const client::Tablet& tablet) {
  op->tablet = tablet;
  op->map_epoch = tables_[op->table_id].epoch;
  const client::ServerRecord* server = map_.server(tablet.server_id);
  if (server == nullptr || server->status != 0) {
    // The owner is crashed (recovery under way) or unnamed: wait for the map to move on.
    mark_stale(op->table_id);
    return retry_later(op, Status::kUnavailable);
  }
  if (op->make_body) op->make_body(tablet, op->attempts + 1, &op->body);
  send(op, server->locator);
}

void Client::Impl::send(const OpPtr& op, const std::string& locator) {
  ++op->attempts;
  uint64_t left_ns = op->deadline_ns - std::min(op->deadline_ns, now_ns());
  ClientTransport::Request request{
      .opcode = op->opcode,
      .client_id = client_id_,
      .rpc_seq = op->rpc_seq,
      .ack_seq = ack_seq(),
      .timeout_ns = std::max<uint64_t>(1, std::min(left_ns, options_.rpc_timeout_ms * kNsPerMs)),
  };
  transport_->send(locator, request, op->body,
                   [this, op](Status transport_status, const wire::MessageHeader& h,
                              std::span<const std::byte> body) {
                     Status s = transport_status != Status::kOk ? transport_status
                                                                : static_cast<Status>(h.status);
                     if (transport_status != Status::kOk) op->maybe_applied = true;
                     on_reply(op, s, body);
                   });
}

void Client::Impl::on_reply(const OpPtr& op, Status status, std::span<const std::byte> body) {
  // A master the coordinator declared crashed answers kFenced: its tablets are going to
  // recovery masters. For the client that is "not mine" (docs/recovery.md).
  if (op->target == Target::kRouted && status == Status::kFenced) status = Status::kUnknownTablet;
  // The last attempt's RPC timeout is cut to what is left of the operation's: its timeout
  // at the deadline says nothing new, and the answer before it (kRetry from a server that
  // kept refusing, say) stays the operation's.
  if (op->resend && status == Status::kTimeout && op->attempts > 1 && now_ns() >= op->deadline_ns) {
    return finish(op, op->last_transient, {});
  }
  if (!op->resend || !client::should_resend(status)) return finish(op, status, body);
  if (op->target == Target::kRouted && tables_[op->table_id].epoch == op->map_epoch) {
    mark_stale(op->table_id);
  }
  // A tablet that stays "not mine" until the deadline is reported as a timeout: the
  // caller did nothing wrong, the cluster did not settle in time.
  retry_later(op, status == Status::kUnknownTablet ? Status::kTimeout : status);
}

void Client::Impl::retry_later(const OpPtr& op, Status why) {
  op->last_transient = why;
  uint64_t now = now_ns();
  if (now >= op->deadline_ns) return finish(op, why, {});
  schedule(op->backoff.next_delay_ns(now, op->deadline_ns), [this, op] { dispatch(op); });
}

void Client::Impl::finish(const OpPtr& op, Status status, std::span<const std::byte> body) {
  client::Op::Done done = std::move(op->done);
  op->done = nullptr;
  open_seqs_.erase(op->rpc_seq);
  if (op->user) end_user_op();
  if (done) done(status, body, op->target == Target::kRouted ? &op->tablet : nullptr);
}

// ---- Tablet map ----------------------------------------------------------------------

bool Client::Impl::table_stale(uint64_t table_id) const {
  auto it = tables_.find(table_id);
  return it != tables_.end() && it->second.stale;
}

void Client::Impl::mark_stale(uint64_t table_id) { tables_[table_id].stale = true; }

void Client::Impl::refresh_table(uint64_t table_id, std::function<void(Status)> then) {
  TableState& state = tables_[table_id];
  state.waiters.push_back(std::move(then));
  if (state.refreshing) return;
  state.refreshing = true;
  // The refresh is one attempt: its waiters own the retry policy and their deadlines.
  OpPtr op = make_op(wire::Opcode::kGetTabletMap, Target::kCoordinator);
  op->resend = false;
  op->deadline_ns = deadline_after_ms(options_.rpc_timeout_ms);
  wire::BodyWriter(&op->body).put(wire::TabletMapRequest{.table_id = table_id});
  op->done = [this, table_id](Status s, std::span<const std::byte> body, const client::Tablet*) {
    end_refresh(table_id, s, body);
  };
  start(op);
}

void Client::Impl::end_refresh(uint64_t table_id, Status status, std::span<const std::byte> body) {
  if (status == Status::kOk) {
    auto reply = client::decode_tablet_map(body);
    if (reply.ok()) {
      map_.replace_table(table_id, *reply);
    } else {
      status = reply.status();
    }
  } else if (status == Status::kUnknownTable) {
    map_.forget_table(table_id);
    status = Status::kOk;  // fresh: the table has no tablets
  }
  TableState& state = tables_[table_id];
  state.refreshing = false;
  if (status == Status::kOk) {
    state.stale = false;
    ++state.epoch;
  }
  std::vector<std::function<void(Status)>> waiters;
  waiters.swap(state.waiters);
  for (auto& w : waiters) w(status);
}

Status Client::Impl::load_map() {
  OpPtr op = make_op(wire::Opcode::kGetTabletMap, Target::kCoordinator);
  wire::BodyWriter(&op->body).put(wire::TabletMapRequest{.table_id = 0});
  Status result = Status::kInternal;
  bool done = false;
  op->done = [&](Status s, std::span<const std::byte> body, const client::Tablet*) {
    done = true;
    result = s;
    if (s != Status::kOk) return;
    auto reply = client::decode_tablet_map(body);
    if (!reply.ok()) {
      result = reply.status();
      return;
    }
    map_.replace_all(*reply);
  };
  start(op);
  while (!done) poll(kNsPerMs);
  return result;
}

// ---- Polling -------------------------------------------------------------------------

void Client::Impl::schedule(uint64_t delay_ns, std::function<void()> fn) {
  timers_.emplace(now_ns() + delay_ns, std::move(fn));
}

int Client::Impl::fire_timers() {
  int fired = 0;
  uint64_t now = now_ns();
  while (!timers_.empty() && timers_.begin()->first <= now) {
    auto fn = std::move(timers_.begin()->second);
    timers_.erase(timers_.begin());
    fn();
    ++fired;
  }
  return fired;
}

int Client::Impl::poll(uint64_t timeout_ns) {
  uint64_t before = completed_;
  fire_timers();
  uint64_t wait_ns = completed_ != before ? 0 : timeout_ns;
  if (!timers_.empty()) {
    uint64_t now = now_ns();
    uint64_t due = timers_.begin()->first;
    wait_ns = std::min(wait_ns, due > now ? due - now : 0);
  }
  transport_->poll(wait_ns);
  fire_timers();
  return static_cast<int>(completed_ - before);
}

}  // namespace ramkv
