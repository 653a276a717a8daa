// Exactly-once writes with real processes (docs/rpc.md, "Exactly once"): an increment
// whose reply is lost and that is resent, to the same master or, after that master was
// killed with kill -9, to the recovery master that took its key, is applied once. The
// resends are sent as the client library sends them (same client id and sequence), on a
// raw transport, so the test decides exactly when the first reply is "lost".
#include <catch2/catch.hpp>

#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "common/checksum.h"
#include "common/clock.h"
#include "test/cluster/cluster_fixture.h"

namespace ramkv {
using test::ClusterShape;
using test::LocalCluster;
namespace {

constexpr uint64_t kClientId = 0x5eed0fca11ab1e;

struct Incremented {
  Status status = Status::kOk;
  int64_t value = 0;
  uint64_t version = 0;
};

// One increment request as the client library sends it.
Incremented increment(ClientTransport& transport, const std::string& locator, uint64_t table,
                      std::string_view key, int64_t delta, uint64_t seq, uint64_t ack) {
  std::vector<std::byte> body;
  wire::BodyWriter w(&body);
  w.put(wire::IncrementRequest{.table_id = table,
                               .delta = delta,
                               .key_bytes = static_cast<uint32_t>(key.size()),
                               .rules = {}});
  w.put_bytes(key);
  auto r = call(transport, locator,
                {.opcode = wire::Opcode::kIncrement,
                 .client_id = kClientId,
                 .rpc_seq = seq,
                 .ack_seq = ack,
                 .timeout_ns = 5'000'000'000},
                body);
  Incremented out{.status = r.status};
  if (r.status != Status::kOk) return out;
  wire::BodyReader in(r.body);
  wire::IncrementResponse resp;
  REQUIRE(in.get(&resp));
  out.value = resp.value;
  out.version = resp.version;
  return out;
}

// The owner of `key`'s tablet as the coordinator has it now: (server id, locator).
std::pair<uint64_t, std::string> owner_of(Client& client, uint64_t table, std::string_view key) {
  const uint64_t hash = key_hash(table, key);
  auto tablets = client.tablets(table);
  REQUIRE(tablets.ok());
  for (const auto& t : *tablets) {
    if (hash >= t.start_hash && hash <= t.end_hash) return {t.server_id, t.locator};
  }
  FAIL("no tablet holds " << key);
  return {};
}

int64_t read_counter(Client& client, uint64_t table, std::string_view key) {
  auto r = client.read(table, key);
  REQUIRE(r.ok());
  REQUIRE(r->value.size() == sizeof(int64_t));
  int64_t v = 0;
  std::memcpy(&v, r->value.data(), sizeof(v));
  return v;
}

}  // namespace

TEST_CASE("recovery: a client retrying an increment across a crash sees it applied once",
          "[cluster][recovery][exactly_once]") {
  LocalCluster cluster(ClusterShape{.servers = 4, .replicas = 3});
  auto client = cluster.client(60'000);
  auto table = client->create_table("counters", 8);
  REQUIRE(table.ok());
  auto servers = client->servers();
  REQUIRE(servers.ok());
  uint64_t victim = 0;
  for (const auto& s : *servers) {
    if (s.locator == cluster.locator_of(0)) victim = s.server_id;
  }
  REQUIRE(victim != 0);
  // A key on the master that will be killed, with some history from the real client.
  std::string key;
  for (int i = 0; key.empty(); ++i) {
    REQUIRE(i < 10'000);
    std::string candidate = "counter-" + std::to_string(i);
    if (owner_of(*client, *table, candidate).first == victim) key = candidate;
  }
  for (int i = 0; i < 3; ++i) REQUIRE(client->increment(*table, key, 100).ok());

  auto transport = make_client_transport({});
  // Sequence 1: applied; suppose its reply was lost. Its resend to the same master is
  // answered from the completion record.
  auto first = increment(*transport, cluster.locator_of(0), *table, key, 5, 1, 0);
  REQUIRE(first.status == Status::kOk);
  CHECK(first.value == 305);
  auto resent = increment(*transport, cluster.locator_of(0), *table, key, 5, 1, 0);
  REQUIRE(resent.status == Status::kOk);
  CHECK(resent.value == 305);
  CHECK(resent.version == first.version);

  // The master dies before the client hears back; the client resends to whichever master
  // the coordinator names, until one takes it (as Client does on kUnknownTablet).
  cluster.server(0).kill9();
  Incremented after;
  std::string new_owner;
  const uint64_t deadline = SystemClock::instance().now_ns() + 90'000'000'000;
  while (true) {
    REQUIRE(SystemClock::instance().now_ns() < deadline);
    auto [id, locator] = owner_of(*client, *table, key);
    if (id != victim && !locator.empty()) {
      after = increment(*transport, locator, *table, key, 5, 1, 0);
      if (after.status == Status::kOk) {
        new_owner = locator;
        break;
      }
      INFO("resend to " << locator << ": " << status_name(after.status));
      REQUIRE((after.status == Status::kUnknownTablet || after.status == Status::kUnavailable ||
               after.status == Status::kTimeout || after.status == Status::kRetry));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  // The recovery master answered from the record it recovered: same value, same version,
  // and the counter moved once.
  CHECK(after.value == 305);
  CHECK(after.version == first.version);
  CHECK(read_counter(*client, *table, key) == 305);
  auto stats = client->server_stats(new_owner);
  REQUIRE(stats.ok());
  CHECK(stats->find("rpc_result_duplicates 1\n") != std::string::npos);

  // The next request acknowledges sequence 1: it is applied, and 1 is now stale.
  auto next = increment(*transport, new_owner, *table, key, 5, 2, 1);
  REQUIRE(next.status == Status::kOk);
  CHECK(next.value == 310);
  CHECK(increment(*transport, new_owner, *table, key, 5, 1, 1).status == Status::kStaleRpc);
  CHECK(read_counter(*client, *table, key) == 310);
  // The real client goes on as before.
  auto more = client->increment(*table, key, 1);
  REQUIRE(more.ok());
  CHECK(more->value == 311);
}

}  // namespace ramkv
