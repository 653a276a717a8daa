// ClientOptions::transport against real processes: a coordinator and a master started
// with --transport rdma (over the emulated verbs provider, rdma/emu, unless built with
// -DRAMKV_VERBS=system), and a Client that picks RDMA through its options alone. This
// test process never installs a process-wide transport (rdma::use_rdma), unlike
// LocalCluster, so only the option can make the Client reach the cluster.
//
// The emulated adapters of the test and of its children meet in one directory:
// RAMKV_VERBS_EMU_DIR as the test was started with (children inherit it), or the
// emulation's default.
#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "test/cluster/cluster_fixture.h"

namespace ramkv::test {
namespace {

// A coordinator and one master-only server, every process on --transport rdma.
class RdmaCluster {
 public:
  RdmaCluster() {
    char tmpl[] = "/var/tmp/ramkv-client-rdma-test-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    dir_ = tmpl;
    coordinator_ = "127.0.0.1:" + std::to_string(free_port());
    coordinator_process_.start(
        {std::string(RAMKV_BIN_DIR) + "/ramkv-coordinator", "--listen", coordinator_, "--data-dir",
         dir_ + "/coordinator", "--transport", "rdma"},
        dir_ + "/coordinator.log");
    server_.start(
        {std::string(RAMKV_BIN_DIR) + "/ramkv-server", "--coordinator", coordinator_, "--listen",
         "127.0.0.1:" + std::to_string(free_port()), "--master", "--replicas", "0", "--memory",
         "64M", "--transport", "rdma", "--rdma-recv-buffers", std::to_string(kTestRdmaRecvBuffers)},
        dir_ + "/server-1.log");
  }
  ~RdmaCluster() {
    server_.stop();
    coordinator_process_.stop();
    std::error_code ec;
    if (std::getenv("RAMKV_KEEP_TEST_DIRS") == nullptr) std::filesystem::remove_all(dir_, ec);
  }

  ClientOptions rdma_options() const {
    ClientOptions o;
    o.coordinator = coordinator_;
    o.timeout_ms = 2000;
    o.rpc_timeout_ms = 1000;
    o.transport = "rdma";
    return o;
  }

  // A connected RDMA client once the master is up (within ~20 s: device set-up of three
  // processes on a loaded machine).
  std::unique_ptr<Client> wait_for_master() {
    for (int i = 0; i < 100; ++i) {
      REQUIRE(server_.running());
      auto c = Client::connect(rdma_options());
      if (c.ok()) {
        auto list = (*c)->servers();
        if (list.ok()) {
          for (const auto& s : *list) {
            if (s.master && s.status == ServerStatus::kUp) return std::move(c).value();
          }
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    FAIL("the master did not enlist over rdma; logs in " << dir_);
    return nullptr;
  }

  const std::string& coordinator() const { return coordinator_; }

 private:
  std::string dir_;
  std::string coordinator_;
  Process coordinator_process_;
  Process server_;
};

}  // namespace

TEST_CASE(
    "client transport: a client with transport rdma writes and reads on a cluster over rdma "
    "(verbs emulation unless RAMKV_VERBS=system)",
    "[cluster][client][rdma]") {
  if (!Client::transport_available("rdma")) {
    WARN("SKIPPED: this build has no RDMA transport (no libibverbs headers)");
    return;
  }
  RdmaCluster cluster;
  auto client = cluster.wait_for_master();
  // The option chose the Client's transport; the process-wide one is untouched.
  CHECK(client_transport_name() == "tcp");

  auto table = client->create_table("rdma-client");
  REQUIRE(table.ok());
  auto written = client->write(*table, "key", "value over rdma");
  REQUIRE(written.ok());
  auto read = client->read(*table, "key");
  REQUIRE(read.ok());
  CHECK(read->value == "value over rdma");
  CHECK(read->version == *written);

  // Values larger than the inline size go through registered send buffers.
  std::string big(200'000, 'b');
  REQUIRE(client->write(*table, "big", big).ok());
  auto big_read = client->read(*table, "big");
  REQUIRE(big_read.ok());
  CHECK(big_read->value == big);

  // A client on TCP cannot talk to this cluster (one transport throughout), and its
  // attempt leaves the cluster serving RDMA clients.
  ClientOptions tcp = cluster.rdma_options();
  tcp.transport = "tcp";
  tcp.timeout_ms = 300;
  tcp.rpc_timeout_ms = 300;
  CHECK_FALSE(Client::connect(tcp).ok());
  auto again = client->read(*table, "key");
  REQUIRE(again.ok());
  CHECK(again->value == "value over rdma");
}

}  // namespace ramkv::test
