// The control path of the verbs (devices, ports, memory registration, the RC state
// machine, completion channels), run against the library the build links: the verbs
// emulation (rdma/emu) unless built with -DRAMKV_VERBS=system.
#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/epoll.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <string>

#include "test/rdma/verbs/verbs_test_util.h"

namespace ramkv::test::verbs {
namespace {

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "lists one device whose name says it is emulated", "[rdma]") {
  int count = -1;
  ibv_device** list = ibv_get_device_list(&count);
  // libibverbs answers NULL (ENOSYS) where the kernel has no RDMA support at all.
  if (list == nullptr || count == 0) {
    if (list != nullptr) ibv_free_device_list(list);
    WARN("SKIPPED: no RDMA device (ibv_get_device_list)");
    return;
  }
  REQUIRE(list[count] == nullptr);
  const std::string name = ibv_get_device_name(list[0]);
#ifdef RAMKV_VERBS_EMULATED
  CHECK(count == 1);
  CHECK(name == "ramkv_verbs_emu0");
  CHECK(name.find("emu") != std::string::npos);
#endif
  ibv_context* ctx = ibv_open_device(list[0]);
  ibv_free_device_list(list);
  REQUIRE(ctx != nullptr);
  CHECK(ibv_close_device(ctx) == 0);
}

#ifdef RAMKV_VERBS_EMULATED
TEST_CASE(RAMKV_VERBS_TEST_PREFIX "RAMKV_VERBS_EMU_DEVICES=0 hides the device", "[rdma]") {
  ::setenv("RAMKV_VERBS_EMU_DEVICES", "0", 1);
  int count = -1;
  ibv_device** list = ibv_get_device_list(&count);
  ::unsetenv("RAMKV_VERBS_EMU_DEVICES");
  REQUIRE(list != nullptr);
  CHECK(count == 0);
  CHECK(list[0] == nullptr);
  ibv_free_device_list(list);
}
#endif

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "device, port and GID queries describe an active port",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  ibv_device_attr dev{};
  REQUIRE(ibv_query_device(c.ctx, &dev) == 0);
  CHECK(dev.phys_port_cnt >= 1);
  CHECK(dev.max_qp_wr > 0);
  CHECK(dev.max_sge > 0);
  CHECK(dev.max_cqe > 0);
#ifdef RAMKV_VERBS_EMULATED
  CHECK(std::string(dev.fw_ver).find("emulation") != std::string::npos);
#endif
  ibv_port_attr port{};
  REQUIRE(ibv_query_port(c.ctx, 1, &port) == 0);
  CHECK(port.state == IBV_PORT_ACTIVE);
  CHECK(port.lid != 0);
  CHECK(port.active_mtu >= IBV_MTU_1024);
  CHECK(port.max_msg_sz >= (1u << 20));
  ibv_gid gid{};
  CHECK(ibv_query_gid(c.ctx, 1, 0, &gid) == 0);
  CHECK(gid.global.subnet_prefix != 0);
#ifdef RAMKV_VERBS_EMULATED
  CHECK(ibv_query_port(c.ctx, 2, &port) != 0);
  CHECK(ibv_query_gid(c.ctx, 1, 5, &gid) != 0);
#endif
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "two contexts in one process share a LID", "[rdma]") {
  Context a;
  REQUIRE_DEVICE(a);
  Context b;
  REQUIRE(b.ok());
  CHECK(a.lid == b.lid);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "each process gets its own LID", "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  ChildPeer child([](int, int out) {
    Context own;
    if (!own.ok()) return 2;
    return write_all(out, &own.lid, sizeof(own.lid)) ? 0 : 3;
  });
  REQUIRE(child.started());
  uint16_t child_lid = 0;
  REQUIRE(read_all(child.in_fd(), &child_lid, sizeof(child_lid)));
  CHECK(child.wait() == 0);
  CHECK(child_lid != 0);
  CHECK(child_lid != c.lid);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "memory registration gives keys and checks its arguments",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  std::vector<uint8_t> buf(8192);
  ibv_mr* mr =
      ibv_reg_mr(c.pd, buf.data(), buf.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  REQUIRE(mr != nullptr);
  CHECK(mr->addr == buf.data());
  CHECK(mr->length == buf.size());
  CHECK(mr->pd == c.pd);
  // (One flag alone is cast: verbs.h's ibv_reg_mr macro masks it with a constant of
  // another enum, which clang deprecates in C++20.)
  ibv_mr* mr2 = ibv_reg_mr(c.pd, buf.data(), 100, static_cast<int>(IBV_ACCESS_LOCAL_WRITE));
  REQUIRE(mr2 != nullptr);
  CHECK(mr2->lkey != mr->lkey);
  CHECK(mr2->rkey != mr->rkey);
  // Remote write without local write is refused, as on hardware.
  errno = 0;
  CHECK(ibv_reg_mr(c.pd, buf.data(), buf.size(), static_cast<int>(IBV_ACCESS_REMOTE_WRITE)) ==
        nullptr);
  CHECK(errno == EINVAL);
  // A non-constant access value goes through ibv_reg_mr_iova2.
  volatile unsigned access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ;
  ibv_mr* mr3 = ibv_reg_mr(c.pd, buf.data(), buf.size(), access);
  REQUIRE(mr3 != nullptr);
  // A PD with memory registered cannot go.
  CHECK(ibv_dealloc_pd(c.pd) == EBUSY);
  CHECK(ibv_dereg_mr(mr3) == 0);
  CHECK(ibv_dereg_mr(mr2) == 0);
  CHECK(ibv_dereg_mr(mr) == 0);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "only RC queue pairs, within the device's limits", "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  ibv_cq* cq = ibv_create_cq(c.ctx, 16, nullptr, nullptr, 0);
  REQUIRE(cq != nullptr);
  ibv_device_attr dev{};
  REQUIRE(ibv_query_device(c.ctx, &dev) == 0);
  ibv_qp_init_attr init{};
  init.send_cq = cq;
  init.recv_cq = cq;
  init.qp_type = IBV_QPT_RC;
  init.cap = {.max_send_wr = static_cast<uint32_t>(dev.max_qp_wr) + 1,
              .max_recv_wr = 1,
              .max_send_sge = 1,
              .max_recv_sge = 1,
              .max_inline_data = 0};
  CHECK(ibv_create_qp(c.pd, &init) == nullptr);
  init.cap.max_send_wr = 8;
  ibv_qp* qp = ibv_create_qp(c.pd, &init);
  REQUIRE(qp != nullptr);
  CHECK(qp->qp_type == IBV_QPT_RC);
  CHECK(qp->state == IBV_QPS_RESET);
  CHECK(qp_state(qp) == IBV_QPS_RESET);
  // The CQ is in use by the QP.
  CHECK(ibv_destroy_cq(cq) == EBUSY);
  CHECK(ibv_destroy_qp(qp) == 0);
  CHECK(ibv_destroy_cq(cq) == 0);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "the RC state machine refuses wrong transitions and masks",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Endpoint e(c);
  REQUIRE(e.ok());
  const QpInfo self = e.info();
  ConnectOptions o;
  ibv_qp_attr a{};

  // RESET -> RTR skips INIT.
  a.qp_state = IBV_QPS_RTR;
  CHECK(ibv_modify_qp(e.qp, &a, IBV_QP_STATE) == EINVAL);
  // RESET -> INIT needs pkey index, port and access flags.
  a = {};
  a.qp_state = IBV_QPS_INIT;
  a.port_num = 1;
  CHECK(ibv_modify_qp(e.qp, &a, IBV_QP_STATE | IBV_QP_PORT) == EINVAL);
  // ... and takes no RTR attribute.
  a.qp_access_flags = IBV_ACCESS_REMOTE_WRITE;
  CHECK(ibv_modify_qp(e.qp, &a,
                      IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS |
                          IBV_QP_DEST_QPN) == EINVAL);
  CHECK(qp_state(e.qp) == IBV_QPS_RESET);
  REQUIRE(to_init(e.qp, o.access) == 0);
  CHECK(qp_state(e.qp) == IBV_QPS_INIT);
  // INIT -> RTS skips RTR.
  CHECK(to_rts(e.qp, e.psn, o) == EINVAL);
  // INIT -> RTR without the minimum RNR timer.
  a = {};
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = IBV_MTU_1024;
  a.dest_qp_num = self.qpn;
  a.rq_psn = self.psn;
  a.max_dest_rd_atomic = 1;
  a.ah_attr.dlid = self.lid;
  a.ah_attr.port_num = 1;
  CHECK(ibv_modify_qp(e.qp, &a,
                      IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                          IBV_QP_MAX_DEST_RD_ATOMIC) == EINVAL);
  REQUIRE(to_rtr(e.qp, self, e.psn, o) == 0);
  CHECK(qp_state(e.qp) == IBV_QPS_RTR);
  // RTR -> RTS without the retry count.
  a = {};
  a.qp_state = IBV_QPS_RTS;
  a.sq_psn = e.psn;
  a.timeout = 14;
  a.rnr_retry = 7;
  a.max_rd_atomic = 1;
  CHECK(ibv_modify_qp(e.qp, &a,
                      IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RNR_RETRY |
                          IBV_QP_MAX_QP_RD_ATOMIC) == EINVAL);
  REQUIRE(to_rts(e.qp, e.psn, o) == 0);
  CHECK(qp_state(e.qp) == IBV_QPS_RTS);

  ibv_qp_attr q{};
  ibv_qp_init_attr qi{};
  REQUIRE(ibv_query_qp(e.qp, &q, IBV_QP_STATE | IBV_QP_DEST_QPN | IBV_QP_TIMEOUT, &qi) == 0);
  CHECK(q.dest_qp_num == self.qpn);
  CHECK(q.timeout == o.timeout);
  CHECK(q.retry_cnt == o.retry_cnt);
  CHECK(q.ah_attr.dlid == self.lid);

  // RTS -> RTS may change the minimum RNR timer but not the path MTU.
  a = {};
  a.min_rnr_timer = 3;
  CHECK(ibv_modify_qp(e.qp, &a, IBV_QP_MIN_RNR_TIMER) == 0);
  a.path_mtu = IBV_MTU_2048;
  CHECK(ibv_modify_qp(e.qp, &a, IBV_QP_PATH_MTU) == EINVAL);
  // Any state -> ERR, ERR -> only RESET, RESET -> INIT again.
  a = {};
  a.qp_state = IBV_QPS_ERR;
  REQUIRE(ibv_modify_qp(e.qp, &a, IBV_QP_STATE) == 0);
  CHECK(qp_state(e.qp) == IBV_QPS_ERR);
  a.qp_state = IBV_QPS_RTS;
  CHECK(ibv_modify_qp(e.qp, &a, IBV_QP_STATE) == EINVAL);
  a.qp_state = IBV_QPS_RESET;
  REQUIRE(ibv_modify_qp(e.qp, &a, IBV_QP_STATE) == 0);
  CHECK(qp_state(e.qp) == IBV_QPS_RESET);
  CHECK(to_init(e.qp, o.access) == 0);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "posting before RTS is refused", "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Endpoint e(c);
  REQUIRE(e.ok());
  SendOptions s{.addr = e.addr(), .length = 8, .lkey = e.mr->lkey};
  // A receive in RESET, a send in INIT and RTR.
  CHECK(post_recv(e.qp, 1, e.addr(), 8, e.mr->lkey) != 0);
  REQUIRE(to_init(e.qp, ConnectOptions{}.access) == 0);
  CHECK(post_recv(e.qp, 1, e.addr(), 8, e.mr->lkey) == 0);
  CHECK(post_send(e.qp, s) != 0);
  REQUIRE(to_rtr(e.qp, e.info(), e.psn, {}) == 0);
  CHECK(post_send(e.qp, s) != 0);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "completion channel fd wakes poll and epoll on a completion",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  ibv_comp_channel* channel = ibv_create_comp_channel(c.ctx);
  REQUIRE(channel != nullptr);
  REQUIRE(channel->fd >= 0);
  {
    Endpoint a(c, {.channel = channel});
    Endpoint b(c);
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    REQUIRE(connect_qp(a, b.info()) == 0);
    REQUIRE(connect_qp(b, a.info()) == 0);
    // A channel with a CQ on it cannot be destroyed.
    CHECK(ibv_destroy_comp_channel(channel) == EBUSY);

    const int flags = ::fcntl(channel->fd, F_GETFL);
    REQUIRE(::fcntl(channel->fd, F_SETFL, flags | O_NONBLOCK) == 0);
    const int ep = ::epoll_create1(EPOLL_CLOEXEC);
    REQUIRE(ep >= 0);
    epoll_event ev{};
    ev.events = EPOLLIN;
    REQUIRE(::epoll_ctl(ep, EPOLL_CTL_ADD, channel->fd, &ev) == 0);

    REQUIRE(ibv_req_notify_cq(a.cq, 0) == 0);
    // Nothing yet: neither epoll nor ibv_get_cq_event has an event.
    CHECK(::epoll_wait(ep, &ev, 1, 50) == 0);
    ibv_cq* ev_cq = nullptr;
    void* ev_ctx = nullptr;
    CHECK(ibv_get_cq_event(channel, &ev_cq, &ev_ctx) == -1);
    CHECK(errno == EAGAIN);

    REQUIRE(post_recv(a.qp, 7, a.addr(), 64, a.mr->lkey) == 0);
    std::memcpy(b.buf.data(), "wake up", 8);
    REQUIRE(post_send(b.qp, {.wr_id = 1, .addr = b.addr(), .length = 8, .lkey = b.mr->lkey}) == 0);
    REQUIRE(::epoll_wait(ep, &ev, 1, 5000) == 1);
    pollfd pfd{channel->fd, POLLIN, 0};
    CHECK(::poll(&pfd, 1, 0) == 1);
    REQUIRE(ibv_get_cq_event(channel, &ev_cq, &ev_ctx) == 0);
    CHECK(ev_cq == a.cq);
    ibv_ack_cq_events(ev_cq, 1);
    const auto wcs = poll_n(a.cq, 1);
    REQUIRE(wcs.size() == 1);
    CHECK(wcs[0].wr_id == 7);
    CHECK(wcs[0].status == IBV_WC_SUCCESS);
    // One event per arming: another completion without re-arming stays silent.
    REQUIRE(post_recv(a.qp, 8, a.addr(), 64, a.mr->lkey) == 0);
    REQUIRE(post_send(b.qp, {.wr_id = 2, .addr = b.addr(), .length = 8, .lkey = b.mr->lkey}) == 0);
    REQUIRE(poll_n(a.cq, 1).size() == 1);
    CHECK(::epoll_wait(ep, &ev, 1, 50) == 0);
    ::close(ep);
    REQUIRE(poll_n(b.cq, 2).size() == 2);
  }
  CHECK(ibv_destroy_comp_channel(channel) == 0);
}

}  // namespace
}  // namespace ramkv::test::verbs
