// ClientOptions::transport (client/client_transport.h): the names a Client accepts and
// the clear, early errors for those it cannot use. No cluster: every failure here comes
// before the coordinator is contacted.
#include "client/client_transport.h"

#include <catch2/catch.hpp>

#include <chrono>

#include "ramkv/client.h"

using ramkv::Client;
using ramkv::ClientOptions;
using ramkv::Status;

namespace {

// A coordinator nobody listens on; options that would spend seconds trying to reach it,
// so a quick answer shows that the transport was refused first.
ClientOptions unreachable(std::string transport) {
  ClientOptions o;
  o.coordinator = "127.0.0.1:1";
  o.timeout_ms = 5'000;
  o.transport = std::move(transport);
  return o;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

TEST_CASE("client transport: an unknown transport name is an invalid argument at once",
          "[client][transport]") {
  for (const char* name : {"udp", "TCP", "rdma ", "infiniband"}) {
    INFO("transport \"" << name << "\"");
    auto start = std::chrono::steady_clock::now();
    CHECK(Client::connect(unreachable(name)).status() == Status::kInvalidArgument);
    CHECK(seconds_since(start) < 1.0);
    CHECK_FALSE(Client::transport_available(name));
    CHECK(ramkv::client::make_transport(unreachable(name)).status() == Status::kInvalidArgument);
  }
}

TEST_CASE("client transport: tcp and the process default are always available",
          "[client][transport]") {
  CHECK(Client::transport_available("tcp"));
  CHECK(Client::transport_available(""));
  for (const char* name : {"tcp", ""}) {
    auto t = ramkv::client::make_transport(unreachable(name));
    REQUIRE(t.ok());
    CHECK(*t != nullptr);
    // Past the transport, connect fails only on the missing coordinator.
    auto o = unreachable(name);
    o.timeout_ms = 300;
    auto c = Client::connect(o);
    CHECK((c.status() == Status::kUnavailable || c.status() == Status::kTimeout));
  }
}

TEST_CASE("client transport: rdma is refused clearly where it cannot be used",
          "[client][transport][rdma]") {
  if (!Client::transport_available("rdma")) {
    // A build without the RDMA transport: the name is known, the transport is not here.
    CHECK(Client::connect(unreachable("rdma")).status() == Status::kInvalidArgument);
    return;
  }
  // A build with it: a device that is not there and ports outside 1-255 are refused
  // before any device is opened or the coordinator tried.
  auto start = std::chrono::steady_clock::now();
  auto o = unreachable("rdma");
  o.rdma_device = "no-such-rdma-device";
  CHECK(Client::connect(o).status() == Status::kInvalidArgument);
  o.rdma_device = "";
  o.rdma_port = 0;
  CHECK(Client::connect(o).status() == Status::kInvalidArgument);
  o.rdma_port = 256;
  CHECK(Client::connect(o).status() == Status::kInvalidArgument);
  CHECK(seconds_since(start) < 1.0);
}
