#include "server/failure_detector.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <set>

#include "common/clock.h"
#include "common/log.h"

namespace ramkv::server {

namespace {}  // namespace

bool declared_gone(uint64_t self_id, const std::vector<wire::ServerListItem>& servers) {
  const auto index = static_cast<uint32_t>(self_id);
  const auto generation = static_cast<uint32_t>(self_id >> 32);
  return std::any_of(servers.begin(), servers.end(), [&](const wire::ServerListItem& s) {
    if (static_cast<uint32_t>(s.server_id) != index) return false;
    if (s.server_id == self_id) return s.status != 0;
    return static_cast<uint32_t>(s.server_id >> 32) > generation;
  });
}

FailureDetector::FailureDetector(const Options& options, OnGone on_gone)
    : options_(options), on_gone_(std::move(on_gone)) {
  RAMKV_CHECK(options_.ping_interval_ns > 0 && options_.ping_timeout_ns > 0);
}

FailureDetector::~FailureDetector() { stop(); }

void FailureDetector::start() {
  RAMKV_CHECK(!thread_.joinable());
  thread_ = std::thread([this] { run(); });
}

void FailureDetector::stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_.store(true);
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void FailureDetector::update_servers(uint64_t version,
                                     const std::vector<wire::ServerListItem>& servers) {
  std::vector<Peer> peers;
  for (const auto& s : servers) {
    if (s.status == 0 && s.server_id != options_.self_id) peers.push_back({s.server_id, s.locator});
  }
  const bool gone = declared_gone(options_.self_id, servers);
  std::lock_guard lock(mutex_);
  if (have_list_ && version < list_version_) return;  // an older list that arrived late
  have_list_ = true;
  list_version_ = version;
  peers_ = std::move(peers);
  gone_ = gone_ || gone;
}

void FailureDetector::run() {
  auto client = make_client_transport({});
  const Clock& clock = SystemClock::instance();
  Random random(options_.seed != 0 ? options_.seed : clock.now_ns() ^ options_.self_id);
  const uint64_t interval_ns = options_.ping_interval_ns;
  const uint64_t timeout_ns = options_.ping_timeout_ns;
  const uint64_t lost_touch_ns = 3 * timeout_ns;
  uint64_t last_answer_ns = clock.now_ns();  // the last ping answered, or nobody to ping
  uint64_t last_check_ns = 0;
  // Peers whose failure was logged (once), until they answer again; at most one entry per
  // server id the cluster gave out.
  std::set<uint64_t> suspects;
  std::unique_lock lock(mutex_);
  while (!stopping_.load()) {
    const uint64_t sleep_start_ns = clock.now_ns();
    wake_.wait_for(lock, std::chrono::nanoseconds(interval_ns), [&] { return stopping_.load(); });
    if (stopping_.load()) break;
    const uint64_t slept_ns = clock.now_ns() - sleep_start_ns;
    std::optional<Peer> peer;
    if (!gone_ && !peers_.empty()) peer = peers_[random.uniform(peers_.size())];
    lock.unlock();
    // Sleeping far longer than asked means this process did not run (stopped, or
    // starved): the cluster may have declared us crashed meanwhile.
    bool stalled = slept_ns > interval_ns + timeout_ns;
    if (!peer) {
      last_answer_ns = clock.now_ns();
    } else {
      const uint64_t ping_start_ns = clock.now_ns();
      const bool answered = ping(*client, *peer);
      const uint64_t ping_ns = clock.now_ns() - ping_start_ns;
      // A ping never legitimately takes much past its timeout.
      stalled = stalled || ping_ns > 2 * timeout_ns;
      if (answered) {
        last_answer_ns = clock.now_ns();
        if (suspects.erase(peer->id) > 0) {
          LOG_INFO("server {} answers pings again", wire::server_id_text(peer->id));
        }
      } else if (!stopping_.load()) {
        if (suspects.insert(peer->id).second) {
          LOG_WARNING("server {} at {} did not answer a ping within {} ms: telling the coordinator",
                      wire::server_id_text(peer->id), peer->locator, timeout_ns / 1'000'000);
        }
        hint(*client, *peer);
      }
    }
    const uint64_t now = clock.now_ns();
    const bool lost_touch = now - last_answer_ns >= lost_touch_ns;
    if (!stopping_.load() && (stalled || (lost_touch && now - last_check_ns >= lost_touch_ns))) {
      LOG_INFO("{}: asking the coordinator whether this server is still a member",
               stalled ? "the failure detector did not run for a while"
                       : "no ping answered for a while");
      last_check_ns = now;
      check_membership(*client);
    }
    lock.lock();
  }
}

bool FailureDetector::ping(ClientTransport& client, const Peer& peer) {
  auto r =
      call_unless_stopped(client, peer.locator, wire::Opcode::kEcho, {}, options_.ping_timeout_ns);
  // Any reply shows the process alive, whatever its status.
  const bool answered = r.delivered;
  // A later ping connects afresh rather than queueing behind a stuck connection.
  if (!answered) client.disconnect(peer.locator);
  return answered;
}

void FailureDetector::hint(ClientTransport& client, const Peer& peer) {
  std::vector<std::byte> body;
  wire::BodyWriter(&body).put(wire::ServerIdRequest{.server_id = peer.id});
  auto r = call_unless_stopped(client, options_.coordinator, wire::Opcode::kHintServerCrashed, body,
                               options_.ping_timeout_ns);
  if (r.status != Status::kOk) {
    LOG_DEBUG("hint about server {} not delivered: {}", wire::server_id_text(peer.id),
              status_name(r.status));
  }
}

void FailureDetector::check_membership(ClientTransport& client) {
  auto r = call_unless_stopped(client, options_.coordinator, wire::Opcode::kGetServerList, {},
                               std::max(options_.ping_timeout_ns, kMinFetchTimeoutNs));
  uint64_t version = 0;
  std::vector<wire::ServerListItem> servers;
  Status s = r.status;
  if (s == Status::kOk) s = wire::decode_server_list(r.body, &version, &servers);
  if (s != Status::kOk) {
    LOG_WARNING("cannot get the server list from the coordinator at {}: {}", options_.coordinator,
                status_name(s));
    if (!r.delivered) client.disconnect(options_.coordinator);
    return;
  }
  update_servers(version, servers);
  if (declared_gone(options_.self_id, servers) && !gone_reported_) {
    gone_reported_ = true;
    on_gone_();
  }
}

FailureDetector::Outcome FailureDetector::call_unless_stopped(ClientTransport& client,
                                                              const std::string& locator,
                                                              wire::Opcode opcode,
                                                              std::span<const std::byte> body,
                                                              uint64_t timeout_ns) {
  Outcome out;
  bool done = false;
  client.send(locator,
              {.opcode = opcode, .client_id = 0, .rpc_seq = ++rpc_seq_, .timeout_ns = timeout_ns},
              body, [&](Status st, const wire::MessageHeader& h, std::span<const std::byte> b) {
                done = true;
                out.delivered = st == Status::kOk;
                out.status = st != Status::kOk ? st : static_cast<Status>(h.status);
                out.body.assign(b.begin(), b.end());
              });
  // The transport expires the request itself; the slices only let stop() in.
  while (!done && !stopping_.load()) client.poll(kStopSliceNs);
  if (!done) {
    // Stopped first: the request fails now, and its callback runs in this poll, while
    // `out` and `done` still exist.
    client.disconnect(locator);
    client.poll(0);
    RAMKV_CHECK(done);
    out = Outcome{};
  }
  return out;
}

}  // namespace ramkv::server
