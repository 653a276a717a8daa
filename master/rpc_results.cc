#include "master/rpc_results.h"

namespace ramkv::master {

void RpcResults::take_ack(ClientState& c, uint64_t ack) {
  if (ack <= c.acked) return;
  c.acked = ack;
  auto end = c.records.upper_bound(ack);
  for (auto it = c.records.begin(); it != end; ++it) {
    release_(it->second.ref, it->second.entry_bytes);
    ++stats_.released;
  }
  stats_.records -= static_cast<uint64_t>(std::distance(c.records.begin(), end));
  c.records.erase(c.records.begin(), end);
}

RpcResults::Check RpcResults::check(const RpcId& id, uint64_t now_ns, RpcOutcome* out) {
  std::lock_guard lock(mutex_);
  auto [it, added] = clients_.try_emplace(id.client_id);
  if (added) ++stats_.clients;
  ClientState& c = it->second;
  c.last_seen_ns = now_ns;
  // A client never acknowledges a request it is still waiting for; an ack at or above
  // this request's sequence comes from a broken or hostile client, and is not taken.
  if (id.ack < id.seq) take_ack(c, id.ack);
  if (id.seq <= c.acked) {
    ++stats_.stale;
    return Check::kStale;
  }
  auto r = c.records.find(id.seq);
  if (r == c.records.end()) return Check::kNew;
  ++stats_.duplicates;
  *out = r->second.outcome;
  return Check::kDone;
}

void RpcResults::record(const RpcId& id, const RpcOutcome& outcome, LogRef ref,
                        uint32_t entry_bytes, uint64_t now_ns) {
  std::lock_guard lock(mutex_);
  auto [it, added] = clients_.try_emplace(id.client_id);
  if (added) ++stats_.clients;
  ClientState& c = it->second;
  c.last_seen_ns = now_ns;
  if (id.seq <= c.acked ||
      !c.records.try_emplace(id.seq, Record{outcome, ref, entry_bytes}).second) {
    release_(ref, entry_bytes);
    return;
  }
  ++stats_.records;
}

bool RpcResults::wanted(const RpcResultView& r, uint64_t now_ns) {
  std::lock_guard lock(mutex_);
  auto [it, added] = clients_.try_emplace(r.client_id);
  if (added) ++stats_.clients;
  ClientState& c = it->second;
  c.last_seen_ns = now_ns;
  if (r.ack_seq < r.rpc_seq) take_ack(c, r.ack_seq);
  return r.rpc_seq > c.acked && !c.records.contains(r.rpc_seq);
}

Status RpcResults::relocate(uint64_t client_id, uint64_t seq, LogRef old_ref,
                            const std::function<Result<LogRef>()>& move) {
  std::lock_guard lock(mutex_);
  auto c = clients_.find(client_id);
  if (c == clients_.end()) return Status::kOk;
  auto r = c->second.records.find(seq);
  if (r == c->second.records.end() || r->second.ref != old_ref) return Status::kOk;
  auto moved = move();
  if (!moved.ok()) return moved.status();
  r->second.ref = *moved;
  return Status::kOk;
}

uint64_t RpcResults::expire(uint64_t now_ns, uint64_t ttl_ns) {
  if (now_ns < ttl_ns) return 0;
  const uint64_t cutoff = now_ns - ttl_ns;
  std::lock_guard lock(mutex_);
  uint64_t expired = 0;
  for (auto it = clients_.begin(); it != clients_.end();) {
    if (it->second.last_seen_ns >= cutoff) {
      ++it;
      continue;
    }
    for (const auto& [seq, r] : it->second.records) release_(r.ref, r.entry_bytes);
    stats_.records -= it->second.records.size();
    it = clients_.erase(it);
    --stats_.clients;
    ++expired;
  }
  stats_.expired_clients += expired;
  return expired;
}

RpcResultsStats RpcResults::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

}  // namespace ramkv::master
