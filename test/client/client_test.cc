#include "ramkv/client.h"

#include <catch2/catch.hpp>

#include <chrono>
#include <set>

#include "test/client/fake_cluster.h"

using ramkv::Client;
using ramkv::ClientOptions;
using ramkv::Status;
using ramkv::test::FakeCluster;

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::unique_ptr<Client> connect_to(FakeCluster& cluster, uint64_t timeout_ms = 5'000) {
  auto c = Client::connect({.coordinator = cluster.coordinator(), .timeout_ms = timeout_ms});
  REQUIRE(c.ok());
  return std::move(*c);
}

// A port nobody listens on: bind, read the port, close.
std::string dead_locator() {
  auto t = ramkv::make_tcp_server_transport({});
  REQUIRE(t->listen("127.0.0.1:0") == Status::kOk);
  return t->locator();
}

}  // namespace

TEST_CASE("client: connecting to a dead coordinator fails within the timeout", "[client]") {
  auto start = std::chrono::steady_clock::now();
  auto c = Client::connect({.coordinator = dead_locator(), .timeout_ms = 300});
  CHECK_FALSE(c.ok());
  CHECK((c.status() == Status::kUnavailable || c.status() == Status::kTimeout));
  CHECK(seconds_since(start) < 2.0);
}

TEST_CASE("client: a coordinator that never answers times out, not hangs", "[client]") {
  // A listening socket whose owner never runs its loop: connects, then silence.
  auto silent = ramkv::make_tcp_server_transport({});
  REQUIRE(silent->listen("127.0.0.1:0") == Status::kOk);
  auto start = std::chrono::steady_clock::now();
  auto c = Client::connect({.coordinator = silent->locator(), .timeout_ms = 300});
  CHECK(c.status() == Status::kTimeout);
  CHECK(seconds_since(start) < 2.0);
}

TEST_CASE("client: a malformed coordinator locator is an invalid argument", "[client]") {
  CHECK(Client::connect({.coordinator = "no-port"}).status() == Status::kInvalidArgument);
  CHECK(Client::connect({.coordinator = "127.0.0.1:99999"}).status() == Status::kInvalidArgument);
  CHECK(Client::connect({.coordinator = "127.0.0.1:1", .timeout_ms = 0}).status() ==
        Status::kInvalidArgument);
}

TEST_CASE("client: writes and reads route to the owning master", "[client][fake]") {
  FakeCluster cluster;
  auto c = connect_to(cluster);
  REQUIRE(c->get_table_id("t").value() == FakeCluster::kTable);
  CHECK(c->get_table_id("nope").status() == Status::kUnknownTable);
  for (int i = 0; i < 50; ++i) {
    std::string key = "k" + std::to_string(i);
    REQUIRE(c->write(FakeCluster::kTable, key, "v" + std::to_string(i)).ok());
  }
  for (int i = 0; i < 50; ++i) {
    auto r = c->read(FakeCluster::kTable, "k" + std::to_string(i));
    REQUIRE(r.ok());
    CHECK(r->value == "v" + std::to_string(i));
  }
  CHECK(cluster.unknown_tablet_replies == 0);
  CHECK(c->read(FakeCluster::kTable, "missing").status() == Status::kObjectNotFound);
}

TEST_CASE("client: a stale map is refreshed and the request resent", "[client][fake]") {
  FakeCluster cluster;
  {
    std::lock_guard<std::mutex> lock(cluster.mu);
    cluster.stale_map_fetches = 2;  // connect's fetch and the first refresh are wrong
  }
  auto c = connect_to(cluster);
  auto v = c->write(FakeCluster::kTable, "key", "value");
  REQUIRE(v.ok());
  CHECK(c->read(FakeCluster::kTable, "key")->value == "value");
  std::lock_guard<std::mutex> lock(cluster.mu);
  CHECK(cluster.unknown_tablet_replies >= 2);
  CHECK(cluster.map_fetches >= 3);
  // Every resend of the one write carried the same sequence number.
  REQUIRE(cluster.rpc_seqs.size() >= 3);
  CHECK(std::set<uint64_t>(cluster.rpc_seqs.begin(), cluster.rpc_seqs.end()).size() == 1);
  for (uint64_t ack : cluster.ack_seqs) CHECK(ack < cluster.rpc_seqs.front());
}

TEST_CASE("client: requests acknowledge the sequences finished before them, never an open one",
          "[client][fake]") {
  FakeCluster cluster;
  auto c = connect_to(cluster);
  constexpr int kBatch = 20;
  for (int i = 0; i < kBatch; ++i) {
    c->write_async(FakeCluster::kTable, "a" + std::to_string(i), "v",
                   [](ramkv::Result<uint64_t> r) { CHECK(r.ok()); });
  }
  c->wait_all();
  REQUIRE(c->write(FakeCluster::kTable, "last", "v").ok());
  std::lock_guard<std::mutex> lock(cluster.mu);
  REQUIRE(cluster.rpc_seqs.size() == kBatch + 1);
  const uint64_t first_batch_seq = cluster.rpc_seqs.front();
  for (size_t i = 0; i < kBatch; ++i) {
    // All of the batch was open when it was sent: none of it is acknowledged.
    CHECK(cluster.ack_seqs[i] < first_batch_seq);
  }
  // Sent after the batch finished: it acknowledges all of it, but not itself.
  const uint64_t last_seq = cluster.rpc_seqs.back();
  CHECK(cluster.ack_seqs.back() >=
        *std::max_element(cluster.rpc_seqs.begin(), cluster.rpc_seqs.end() - 1));
  CHECK(cluster.ack_seqs.back() < last_seq);
}

TEST_CASE("client: kRetry is retried with back-off, bounded by the deadline", "[client][fake]") {
  FakeCluster cluster;
  auto c = connect_to(cluster, 400);
  {
    std::lock_guard<std::mutex> lock(cluster.mu);
    cluster.retry_replies = 3;
  }
  CHECK(c->write(FakeCluster::kTable, "a", "1").ok());
  {
    std::lock_guard<std::mutex> lock(cluster.mu);
    cluster.retry_replies = 1'000'000;
  }
  auto start = std::chrono::steady_clock::now();
  CHECK(c->write(FakeCluster::kTable, "a", "2").status() == Status::kRetry);
  double took = seconds_since(start);
  CHECK(took >= 0.3);
  CHECK(took < 1.5);
}

TEST_CASE("client: a drop retried after an unanswered attempt that applied it succeeds",
          "[client][fake]") {
  FakeCluster cluster;
  // The first attempt is applied but answered after the client gave up on it; the resend
  // finds no table.
  auto c = Client::connect(
      {.coordinator = cluster.coordinator(), .timeout_ms = 5'000, .rpc_timeout_ms = 150});
  REQUIRE(c.ok());
  {
    std::lock_guard<std::mutex> lock(cluster.mu);
    cluster.drop_reply_delay_ms = 500;
  }
  CHECK((*c)->drop_table("t").ok());
  {
    std::lock_guard<std::mutex> lock(cluster.mu);
    CHECK(cluster.table_dropped);
    CHECK(cluster.drops_received >= 2);
  }
  // A drop answered at once is told the truth: no such table.
  CHECK((*c)->drop_table("t").status() == Status::kUnknownTable);
  CHECK((*c)->drop_table("other").status() == Status::kUnknownTable);
}

TEST_CASE("client: multi-operations split by master, one RPC each", "[client][fake]") {
  FakeCluster cluster;
  auto c = connect_to(cluster);
  std::vector<ramkv::MultiWriteItem> writes;
  for (int i = 0; i < 200; ++i) {
    writes.push_back({FakeCluster::kTable, "m" + std::to_string(i), std::to_string(i * i)});
  }
  auto wr = c->multi_write(writes);
  REQUIRE(wr.size() == 200);
  for (const auto& r : wr) CHECK(r.ok());
  std::vector<ramkv::MultiReadItem> reads;
  for (int i = 0; i < 200; ++i) reads.push_back({FakeCluster::kTable, "m" + std::to_string(i)});
  reads.push_back({FakeCluster::kTable, "absent"});
  auto rr = c->multi_read(reads);
  REQUIRE(rr.size() == 201);
  for (int i = 0; i < 200; ++i) {
    REQUIRE(rr[static_cast<size_t>(i)].ok());
    CHECK(rr[static_cast<size_t>(i)]->value == std::to_string(i * i));
  }
  CHECK(rr[200].status() == Status::kObjectNotFound);
  std::lock_guard<std::mutex> lock(cluster.mu);
  CHECK(cluster.multi_rpcs_per_master == std::vector<int>{2, 2});
}

TEST_CASE("client: multi-operations survive a stale map", "[client][fake]") {
  FakeCluster cluster;
  {
    std::lock_guard<std::mutex> lock(cluster.mu);
    cluster.stale_map_fetches = 1;
  }
  auto c = connect_to(cluster);
  std::vector<ramkv::MultiWriteItem> writes;
  for (int i = 0; i < 64; ++i)
    writes.push_back({FakeCluster::kTable, "s" + std::to_string(i), "x"});
  for (const auto& r : c->multi_write(writes)) CHECK(r.ok());
  CHECK(c->multi_write({}).empty());
}

TEST_CASE("client: enumerate walks every tablet", "[client][fake]") {
  FakeCluster cluster;
  auto c = connect_to(cluster);
  std::set<std::string> written;
  for (int i = 0; i < 40; ++i) {
    std::string key = "e" + std::to_string(i);
    REQUIRE(c->write(FakeCluster::kTable, key, key + "!").ok());
    written.insert(key);
  }
  auto all = c->enumerate(FakeCluster::kTable);
  REQUIRE(all.ok());
  std::set<std::string> seen;
  for (const auto& o : *all) {
    CHECK(o.value == o.key + "!");
    seen.insert(o.key);
  }
  CHECK(seen == written);
  CHECK(all->size() == written.size());
}

TEST_CASE("client: asynchronous callbacks and futures complete from poll", "[client][fake]") {
  FakeCluster cluster;
  auto c = connect_to(cluster);
  int done = 0;
  for (int i = 0; i < 20; ++i) {
    c->write_async(FakeCluster::kTable, "a" + std::to_string(i), "v",
                   [&done](ramkv::Result<uint64_t> r) {
                     CHECK(r.ok());
                     ++done;
                   });
  }
  CHECK(done == 0);  // never from the call itself
  CHECK(c->outstanding() == 20);
  c->wait_all();
  CHECK(done == 20);
  CHECK(c->outstanding() == 0);
  auto p = c->read_async(FakeCluster::kTable, "a3");
  auto missing = c->read_async(FakeCluster::kTable, "zzz");
  CHECK(p.get()->value == "v");
  CHECK(missing.get().status() == Status::kObjectNotFound);
}
