// Verbs between two processes (a forked child is the peer, in its own address space with
// its own adapter): one-sided WRITE and READ on memory whose owner is not running verbs
// code, SEND, and a peer that is killed while requests are outstanding. Against the
// verbs emulation by default; see verbs_control_test.cc.
#include <catch2/catch.hpp>

#include "test/rdma/verbs/verbs_test_util.h"

namespace ramkv::test::verbs {
namespace {

constexpr uint32_t kChildBytes = 1 << 20;

uint8_t pattern(size_t i, uint8_t seed) { return static_cast<uint8_t>((i * 131 + seed) >> 1); }

// The child's side of a connection: opens its own device, sends its QP's address, takes
// the parent's, connects, and says "ready" (one byte). nullptr on failure.
struct ChildSide {
  ChildSide(int in, int out, const EndpointOptions& eo, const ConnectOptions& co)
      : endpoint(context, eo) {
    if (!context.ok() || !endpoint.ok()) return;
    const QpInfo mine = endpoint.info();
    QpInfo parent;
    if (!write_all(out, &mine, sizeof(mine)) || !read_all(in, &parent, sizeof(parent))) return;
    if (connect_qp(endpoint, parent, co) != 0) return;
    const char ready = 'r';
    ok = write_all(out, &ready, 1);
  }
  Context context;
  Endpoint endpoint;
  bool ok = false;
};

// The parent's side of the same exchange; the child's address in *child.
bool connect_to_child(ChildPeer& peer, Endpoint& e, QpInfo* child, const ConnectOptions& co) {
  const QpInfo mine = e.info();
  if (!read_all(peer.in_fd(), child, sizeof(*child))) return false;
  if (connect_qp(e, *child, co) != 0) return false;
  if (!write_all(peer.out_fd(), &mine, sizeof(mine))) return false;
  char ready = 0;
  return read_all(peer.in_fd(), &ready, 1) && ready == 'r';
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "RDMA WRITE, READ and SEND between two processes", "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Endpoint e(c, {.buffer_bytes = kChildBytes});
  REQUIRE(e.ok());
  ChildPeer child([](int in, int out) {
    ChildSide side(in, out, {.buffer_bytes = kChildBytes}, {});
    if (!side.ok) return 2;
    Endpoint& ep = side.endpoint;
    for (size_t i = 0; i < 65536; ++i) ep.buf[i] = pattern(i, 5);
    if (post_recv(ep.qp, 1, ep.addr(0), 64, ep.mr->lkey) != 0) return 3;
    const char go = 'g';  // the pattern is in place
    if (!write_all(out, &go, 1)) return 4;
    // This process only waits for the SEND; the WRITE before it lands without it.
    const auto wcs = poll_n(ep.cq, 1, std::chrono::seconds(20));
    if (wcs.size() != 1 || wcs[0].status != IBV_WC_SUCCESS || wcs[0].byte_len != 5) return 5;
    if (std::memcmp(ep.buf.data(), "done", 5) != 0) return 6;
    for (size_t i = 0; i < 262144; ++i) {
      if (ep.buf[524288 + i] != pattern(i, 9)) return 7;
    }
    return 0;
  });
  REQUIRE(child.started());
  QpInfo remote;
  REQUIRE(connect_to_child(child, e, &remote, {}));
  char go = 0;
  REQUIRE(read_all(child.in_fd(), &go, 1));

  // READ the child's pattern.
  REQUIRE(post_send(e.qp, {.opcode = IBV_WR_RDMA_READ,
                           .wr_id = 1,
                           .addr = e.addr(0),
                           .length = 65536,
                           .lkey = e.mr->lkey,
                           .remote_addr = remote.addr,
                           .rkey = remote.rkey}) == 0);
  auto wcs = poll_n(e.cq, 1);
  REQUIRE(wcs.size() == 1);
  REQUIRE(wcs[0].status == IBV_WC_SUCCESS);
  bool same = true;
  for (size_t i = 0; i < 65536; ++i) same = same && e.buf[i] == pattern(i, 5);
  CHECK(same);

  // WRITE into the child's memory, then SEND: the child checks the data on the SEND.
  for (size_t i = 0; i < 262144; ++i) e.buf[i] = pattern(i, 9);
  REQUIRE(post_send(e.qp, {.opcode = IBV_WR_RDMA_WRITE,
                           .wr_id = 2,
                           .addr = e.addr(0),
                           .length = 262144,
                           .lkey = e.mr->lkey,
                           .remote_addr = remote.addr + 524288,
                           .rkey = remote.rkey,
                           .flags = 0}) == 0);
  std::memcpy(e.buf.data() + 300000, "done", 5);
  REQUIRE(post_send(e.qp, {.wr_id = 3, .addr = e.addr(300000), .length = 5, .lkey = e.mr->lkey}) ==
          0);
  wcs = poll_n(e.cq, 1);
  REQUIRE(wcs.size() == 1);
  CHECK(wcs[0].wr_id == 3);
  CHECK(wcs[0].status == IBV_WC_SUCCESS);
  CHECK(child.wait() == 0);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX
          "a peer process killed during an RNR wait fails the request "
          "with RETRY_EXC_ERR and flushes the rest",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Endpoint e(c);
  REQUIRE(e.ok());
  // Retries: long enough that a loaded machine (sanitizers, parallel tests) does not
  // look like a dead peer, short enough that the failure comes within a second.
  ConnectOptions co;
  co.timeout = 14;  // 67 ms
  co.retry_cnt = 7;
  co.rnr_retry = 7;  // an RNR wait alone never ends
  ChildPeer child([co](int in, int out) {
    ChildSide side(in, out, {}, co);
    if (!side.ok) return 2;
    // Posts no receive and waits to be killed.
    ::pause();
    return 0;
  });
  REQUIRE(child.started());
  QpInfo remote;
  REQUIRE(connect_to_child(child, e, &remote, co));

  SendOptions write{.opcode = IBV_WR_RDMA_WRITE,
                    .wr_id = 1,
                    .addr = e.addr(),
                    .length = 1024,
                    .lkey = e.mr->lkey,
                    .remote_addr = remote.addr,
                    .rkey = remote.rkey};
  REQUIRE(post_send(e.qp, write) == 0);
  auto wcs = poll_n(e.cq, 1);
  REQUIRE(wcs.size() == 1);
  REQUIRE(wcs[0].status == IBV_WC_SUCCESS);

  // The SEND waits for a receive the child never posts; two WRITEs queue behind it.
  REQUIRE(post_send(e.qp, {.wr_id = 2, .addr = e.addr(), .length = 8, .lkey = e.mr->lkey}) == 0);
  write.wr_id = 3;
  REQUIRE(post_send(e.qp, write) == 0);
  write.wr_id = 4;
  write.flags = 0;
  REQUIRE(post_send(e.qp, write) == 0);
  CHECK(stays_empty(e.cq, std::chrono::milliseconds(100)));

  child.kill();
  const auto killed_at = std::chrono::steady_clock::now();
  wcs = poll_n(e.cq, 3);
  const auto took = std::chrono::steady_clock::now() - killed_at;
  REQUIRE(wcs.size() == 3);
  CHECK(wcs[0].wr_id == 2);
  CHECK(wcs[0].status == IBV_WC_RETRY_EXC_ERR);
  CHECK(wcs[1].wr_id == 3);
  CHECK(wcs[1].status == IBV_WC_WR_FLUSH_ERR);
  CHECK(wcs[2].wr_id == 4);
  CHECK(wcs[2].status == IBV_WC_WR_FLUSH_ERR);
  CHECK(qp_state(e.qp) == IBV_QPS_ERR);
  // (retry_cnt + 1) timeouts, not for ever.
  CHECK(took < std::chrono::seconds(5));
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX
          "a peer process killed during a stream of large writes fails "
          "the outstanding writes in order",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  constexpr int kWrites = 64;
  Endpoint e(c, {.buffer_bytes = kChildBytes, .max_send_wr = kWrites});
  REQUIRE(e.ok());
  ConnectOptions co;  // as above
  co.timeout = 14;
  co.retry_cnt = 7;
  ChildPeer child([co](int in, int out) {
    ChildSide side(in, out, {.buffer_bytes = kChildBytes}, co);
    if (!side.ok) return 2;
    ::pause();
    return 0;
  });
  REQUIRE(child.started());
  QpInfo remote;
  REQUIRE(connect_to_child(child, e, &remote, co));
  for (int i = 0; i < kWrites; ++i) {
    REQUIRE(post_send(e.qp, {.opcode = IBV_WR_RDMA_WRITE,
                             .wr_id = static_cast<uint64_t>(i),
                             .addr = e.addr(),
                             .length = kChildBytes,
                             .lkey = e.mr->lkey,
                             .remote_addr = remote.addr,
                             .rkey = remote.rkey}) == 0);
  }
  auto wcs = poll_n(e.cq, 1);
  REQUIRE(wcs.size() == 1);
  child.kill();  // mid-stream
  const auto rest = poll_n(e.cq, kWrites - 1);
  wcs.insert(wcs.end(), rest.begin(), rest.end());
  REQUIRE(wcs.size() == kWrites);
  // Successes, then one RETRY_EXC_ERR, then flushes; all in posting order.
  size_t first_error = wcs.size();
  for (size_t i = 0; i < wcs.size(); ++i) {
    CHECK(wcs[i].wr_id == i);
    if (first_error == wcs.size() && wcs[i].status != IBV_WC_SUCCESS) first_error = i;
  }
  if (first_error == wcs.size()) {
    WARN("every write completed before the kill; nothing was outstanding");
    return;
  }
  CHECK(wcs[first_error].status == IBV_WC_RETRY_EXC_ERR);
  for (size_t i = first_error + 1; i < wcs.size(); ++i) {
    CHECK(wcs[i].status == IBV_WC_WR_FLUSH_ERR);
  }
  CHECK(qp_state(e.qp) == IBV_QPS_ERR);
}

}  // namespace
}  // namespace ramkv::test::verbs
