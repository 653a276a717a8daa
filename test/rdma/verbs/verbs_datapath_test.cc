// The data path of the verbs between two QPs of one process (SEND/RECV, SRQ, immediate
// data, inline sends, RDMA WRITE and READ, selective signalling, ordering) and the
// errors a reliable connection reports (remote access, RNR, length, local protection,
// flushes). Against the verbs emulation by default; see verbs_control_test.cc.
#include <arpa/inet.h>

#include <catch2/catch.hpp>
#include <numeric>

#include "test/rdma/verbs/verbs_test_util.h"

namespace ramkv::test::verbs {
namespace {

// Two endpoints of one process connected to each other.
struct Pair {
  explicit Pair(Context& c, const EndpointOptions& ao = {}, const EndpointOptions& bo = {},
                const ConnectOptions& co = {})
      : a(c, ao), b(c, bo) {
    ok = a.ok() && b.ok() && connect_qp(a, b.info(), co) == 0 && connect_qp(b, a.info(), co) == 0;
  }
  Endpoint a;
  Endpoint b;
  bool ok = false;
};

void fill(std::vector<uint8_t>& buf, size_t offset, size_t bytes, uint8_t seed) {
  for (size_t i = 0; i < bytes; ++i) buf[offset + i] = static_cast<uint8_t>(seed + i * 7);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "SEND lands in a receive posted to a shared receive queue",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  ibv_srq_init_attr si{};
  si.attr.max_wr = 16;
  si.attr.max_sge = 1;
  ibv_srq* srq = ibv_create_srq(c.pd, &si);
  REQUIRE(srq != nullptr);
  {
    Endpoint receiver(c, {.srq = srq});
    Endpoint s1(c);
    Endpoint s2(c);
    REQUIRE(receiver.ok());
    // One receiver QP per sender would be the usual set-up; here two receiver QPs share
    // the SRQ.
    Endpoint receiver2(c, {.srq = srq});
    REQUIRE(connect_qp(receiver, s1.info()) == 0);
    REQUIRE(connect_qp(s1, receiver.info()) == 0);
    REQUIRE(connect_qp(receiver2, s2.info()) == 0);
    REQUIRE(connect_qp(s2, receiver2.info()) == 0);
    // A QP on an SRQ takes no receives of its own.
    CHECK(post_recv(receiver.qp, 1, receiver.addr(), 64, receiver.mr->lkey) != 0);
    for (uint64_t i = 0; i < 4; ++i) {
      REQUIRE(post_srq_recv(srq, 100 + i, receiver.addr(i * 256), 256, receiver.mr->lkey) == 0);
    }
    fill(s1.buf, 0, 200, 1);
    fill(s2.buf, 0, 100, 2);
    REQUIRE(post_send(s1.qp, {.wr_id = 1, .addr = s1.addr(), .length = 200, .lkey = s1.mr->lkey}) ==
            0);
    REQUIRE(poll_n(s1.cq, 1).size() == 1);
    REQUIRE(post_send(s2.qp, {.wr_id = 2, .addr = s2.addr(), .length = 100, .lkey = s2.mr->lkey}) ==
            0);
    const auto r1 = poll_n(receiver.cq, 1);
    const auto r2 = poll_n(receiver2.cq, 1);
    REQUIRE(r1.size() == 1);
    REQUIRE(r2.size() == 1);
    CHECK(r1[0].status == IBV_WC_SUCCESS);
    CHECK(r1[0].opcode == IBV_WC_RECV);
    CHECK(r1[0].wr_id == 100);  // receives are consumed in order
    CHECK(r1[0].byte_len == 200);
    CHECK(r1[0].qp_num == receiver.qp->qp_num);
    CHECK(r1[0].src_qp == s1.qp->qp_num);
    CHECK((r1[0].wc_flags & IBV_WC_WITH_IMM) == 0);
    CHECK(r2[0].wr_id == 101);
    CHECK(r2[0].byte_len == 100);
    CHECK(std::equal(s1.buf.begin(), s1.buf.begin() + 200, receiver.buf.begin()));
    CHECK(std::equal(s2.buf.begin(), s2.buf.begin() + 100, receiver.buf.begin() + 256));
    const auto sent = poll_n(s2.cq, 1);
    REQUIRE(sent.size() == 1);
    CHECK(sent[0].opcode == IBV_WC_SEND);
    CHECK(sent[0].wr_id == 2);
    // An SRQ with QPs attached cannot be destroyed.
    CHECK(ibv_destroy_srq(srq) == EBUSY);
  }
  CHECK(ibv_destroy_srq(srq) == 0);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "SEND_WITH_IMM carries immediate data in network order",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Pair p(c);
  REQUIRE(p.ok);
  REQUIRE(post_recv(p.b.qp, 9, p.b.addr(), 64, p.b.mr->lkey) == 0);
  REQUIRE(post_send(p.a.qp, {.opcode = IBV_WR_SEND_WITH_IMM,
                             .wr_id = 3,
                             .addr = p.a.addr(),
                             .length = 16,
                             .lkey = p.a.mr->lkey,
                             .imm_host = 0xdeadbeef}) == 0);
  const auto wcs = poll_n(p.b.cq, 1);
  REQUIRE(wcs.size() == 1);
  CHECK(wcs[0].status == IBV_WC_SUCCESS);
  CHECK(wcs[0].opcode == IBV_WC_RECV);
  CHECK((wcs[0].wc_flags & IBV_WC_WITH_IMM) != 0);
  CHECK(ntohl(wcs[0].imm_data) == 0xdeadbeef);
  CHECK(wcs[0].byte_len == 16);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "inline sends copy the data at post time and honour the limit",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  // Inline data comes from unregistered memory (no lkey needed).
  Pair p(c, {.max_inline = 64});
  REQUIRE(p.ok);
  ibv_qp_attr attr{};
  ibv_qp_init_attr init{};
  REQUIRE(ibv_query_qp(p.a.qp, &attr, IBV_QP_CAP, &init) == 0);
  REQUIRE(init.cap.max_inline_data >= 64);
  REQUIRE(post_recv(p.b.qp, 1, p.b.addr(), 128, p.b.mr->lkey) == 0);
  char scratch[64];
  std::memcpy(scratch, "inline payload", 15);
  REQUIRE(post_send(p.a.qp, {.wr_id = 5,
                             .addr = reinterpret_cast<uintptr_t>(scratch),
                             .length = 15,
                             .lkey = 0,
                             .flags = IBV_SEND_SIGNALED | IBV_SEND_INLINE}) == 0);
  std::memset(scratch, 'x', sizeof(scratch));  // reusable at once
  const auto wcs = poll_n(p.b.cq, 1);
  REQUIRE(wcs.size() == 1);
  CHECK(wcs[0].byte_len == 15);
  CHECK(std::memcmp(p.b.buf.data(), "inline payload", 15) == 0);
  REQUIRE(poll_n(p.a.cq, 1).size() == 1);
  // Above max_inline_data the post fails at once (as hardware refuses it).
  std::vector<uint8_t> big(init.cap.max_inline_data + 1);
  CHECK(post_send(p.a.qp, {.addr = reinterpret_cast<uintptr_t>(big.data()),
                           .length = static_cast<uint32_t>(big.size()),
                           .flags = IBV_SEND_SIGNALED | IBV_SEND_INLINE}) != 0);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "RDMA WRITE and READ move data one-sided, with sg lists",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Pair p(c, {.buffer_bytes = 1 << 20}, {.buffer_bytes = 1 << 20});
  REQUIRE(p.ok);
  fill(p.a.buf, 0, 300000, 3);
  // WRITE from two pieces of a's buffer to one place in b's.
  ibv_sge sges[2] = {{p.a.addr(0), 100000, p.a.mr->lkey}, {p.a.addr(200000), 100000, p.a.mr->lkey}};
  ibv_send_wr wr{};
  wr.wr_id = 11;
  wr.sg_list = sges;
  wr.num_sge = 2;
  wr.opcode = IBV_WR_RDMA_WRITE;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.wr.rdma.remote_addr = p.b.addr(4096);
  wr.wr.rdma.rkey = p.b.mr->rkey;
  ibv_send_wr* bad = nullptr;
  REQUIRE(ibv_post_send(p.a.qp, &wr, &bad) == 0);
  auto wcs = poll_n(p.a.cq, 1);
  REQUIRE(wcs.size() == 1);
  CHECK(wcs[0].status == IBV_WC_SUCCESS);
  CHECK(wcs[0].opcode == IBV_WC_RDMA_WRITE);
  CHECK(wcs[0].wr_id == 11);
  CHECK(std::equal(p.a.buf.begin(), p.a.buf.begin() + 100000, p.b.buf.begin() + 4096));
  CHECK(std::equal(p.a.buf.begin() + 200000, p.a.buf.begin() + 300000,
                   p.b.buf.begin() + 4096 + 100000));
  // The target got no completion: one-sided.
  CHECK(stays_empty(p.b.cq, std::chrono::milliseconds(20)));

  // READ it back into a different place of a's buffer.
  REQUIRE(post_send(p.a.qp, {.opcode = IBV_WR_RDMA_READ,
                             .wr_id = 12,
                             .addr = p.a.addr(500000),
                             .length = 200000,
                             .lkey = p.a.mr->lkey,
                             .remote_addr = p.b.addr(4096),
                             .rkey = p.b.mr->rkey}) == 0);
  wcs = poll_n(p.a.cq, 1);
  REQUIRE(wcs.size() == 1);
  CHECK(wcs[0].status == IBV_WC_SUCCESS);
  CHECK(wcs[0].opcode == IBV_WC_RDMA_READ);
  CHECK(wcs[0].byte_len == 200000);
  CHECK(std::equal(p.b.buf.begin() + 4096, p.b.buf.begin() + 4096 + 200000,
                   p.a.buf.begin() + 500000));
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "RDMA WRITE_WITH_IMM places data then consumes a receive",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Pair p(c);
  REQUIRE(p.ok);
  fill(p.a.buf, 0, 512, 4);
  REQUIRE(post_recv(p.b.qp, 77, 0, 0, 0) == 0);  // no buffer needed
  REQUIRE(post_send(p.a.qp, {.opcode = IBV_WR_RDMA_WRITE_WITH_IMM,
                             .wr_id = 13,
                             .addr = p.a.addr(),
                             .length = 512,
                             .lkey = p.a.mr->lkey,
                             .remote_addr = p.b.addr(1024),
                             .rkey = p.b.mr->rkey,
                             .imm_host = 42}) == 0);
  const auto wcs = poll_n(p.b.cq, 1);
  REQUIRE(wcs.size() == 1);
  CHECK(wcs[0].status == IBV_WC_SUCCESS);
  CHECK(wcs[0].opcode == IBV_WC_RECV_RDMA_WITH_IMM);
  CHECK(wcs[0].wr_id == 77);
  CHECK(ntohl(wcs[0].imm_data) == 42);
  CHECK((wcs[0].wc_flags & IBV_WC_WITH_IMM) != 0);
  CHECK(wcs[0].byte_len == 512);
  CHECK(std::equal(p.a.buf.begin(), p.a.buf.begin() + 512, p.b.buf.begin() + 1024));
  const auto sent = poll_n(p.a.cq, 1);
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].opcode == IBV_WC_RDMA_WRITE);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX
          "selective signalling completes only signalled requests and "
          "frees their slots when polled",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Pair p(c, {.max_send_wr = 4});
  REQUIRE(p.ok);
  auto write = [&](uint64_t wr_id, unsigned flags) {
    return post_send(p.a.qp, {.opcode = IBV_WR_RDMA_WRITE,
                              .wr_id = wr_id,
                              .addr = p.a.addr(),
                              .length = 64,
                              .lkey = p.a.mr->lkey,
                              .remote_addr = p.b.addr(),
                              .rkey = p.b.mr->rkey,
                              .flags = flags});
  };
  REQUIRE(write(1, 0) == 0);
  REQUIRE(write(2, 0) == 0);
  REQUIRE(write(3, 0) == 0);
  REQUIRE(write(4, IBV_SEND_SIGNALED) == 0);
  // The send queue is full until the signalled completion has been polled.
  CHECK(write(5, IBV_SEND_SIGNALED) == ENOMEM);
  const auto wcs = poll_n(p.a.cq, 1);
  REQUIRE(wcs.size() == 1);
  CHECK(wcs[0].wr_id == 4);
  CHECK(stays_empty(p.a.cq, std::chrono::milliseconds(20)));
  for (uint64_t i = 5; i < 9; ++i) CHECK(write(i, i == 8 ? IBV_SEND_SIGNALED : 0) == 0);
  const auto more = poll_n(p.a.cq, 1);
  REQUIRE(more.size() == 1);
  CHECK(more[0].wr_id == 8);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX
          "requests of one QP complete in order and a WRITE is placed "
          "before a later SEND is delivered",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Pair p(c, {.buffer_bytes = 1 << 20, .max_send_wr = 256},
         {.buffer_bytes = 1 << 20, .max_recv_wr = 128});
  REQUIRE(p.ok);
  constexpr int kRounds = 100;
  for (int i = 0; i < kRounds; ++i) {
    REQUIRE(post_recv(p.b.qp, static_cast<uint64_t>(i), p.b.addr(900000), 8, p.b.mr->lkey) == 0);
  }
  for (int i = 0; i < kRounds; ++i) {
    // A large WRITE, then a SEND that announces it: the receiver must find the data.
    const auto seed = static_cast<uint8_t>(i);
    p.a.buf[static_cast<size_t>(i) * 8000] = seed;
    REQUIRE(post_send(p.a.qp, {.opcode = IBV_WR_RDMA_WRITE,
                               .wr_id = static_cast<uint64_t>(2 * i),
                               .addr = p.a.addr(static_cast<size_t>(i) * 8000),
                               .length = 8000,
                               .lkey = p.a.mr->lkey,
                               .remote_addr = p.b.addr(static_cast<size_t>(i) * 8000),
                               .rkey = p.b.mr->rkey}) == 0);
    REQUIRE(post_send(p.a.qp, {.wr_id = static_cast<uint64_t>(2 * i + 1),
                               .addr = p.a.addr(static_cast<size_t>(i) * 8000),
                               .length = 1,
                               .lkey = p.a.mr->lkey}) == 0);
  }
  const auto sent = poll_n(p.a.cq, 2 * kRounds);
  REQUIRE(sent.size() == 2 * kRounds);
  for (size_t i = 0; i < sent.size(); ++i) {
    CHECK(sent[i].wr_id == i);
    CHECK(sent[i].status == IBV_WC_SUCCESS);
  }
  const auto received = poll_n(p.b.cq, kRounds);
  REQUIRE(received.size() == kRounds);
  for (int i = 0; i < kRounds; ++i) {
    CHECK(received[static_cast<size_t>(i)].wr_id == static_cast<uint64_t>(i));
    CHECK(p.b.buf[static_cast<size_t>(i) * 8000] == static_cast<uint8_t>(i));
  }
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX
          "a bad rkey fails with REM_ACCESS_ERR, puts the QP in ERR and "
          "flushes the rest",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Pair p(c);
  REQUIRE(p.ok);
  REQUIRE(post_recv(p.a.qp, 50, p.a.addr(), 64, p.a.mr->lkey) == 0);
  SendOptions bad_write{.opcode = IBV_WR_RDMA_WRITE,
                        .wr_id = 1,
                        .addr = p.a.addr(),
                        .length = 64,
                        .lkey = p.a.mr->lkey,
                        .remote_addr = p.b.addr(),
                        .rkey = p.b.mr->rkey + 1000};
  REQUIRE(post_send(p.a.qp, bad_write) == 0);
  SendOptions later = bad_write;
  later.wr_id = 2;
  later.rkey = p.b.mr->rkey;
  later.flags = 0;  // unsignalled, yet flushed with a completion
  REQUIRE(post_send(p.a.qp, later) == 0);
  const auto wcs = poll_n(p.a.cq, 3);
  REQUIRE(wcs.size() == 3);
  CHECK(wcs[0].wr_id == 1);
  CHECK(wcs[0].status == IBV_WC_REM_ACCESS_ERR);
  // The flushed send and the posted receive share the CQ; their relative order depends
  // on whether the error came before the second post.
  for (size_t i = 1; i < 3; ++i) {
    CHECK((wcs[i].wr_id == 2 || wcs[i].wr_id == 50));
    CHECK(wcs[i].status == IBV_WC_WR_FLUSH_ERR);
  }
  CHECK(wcs[1].wr_id != wcs[2].wr_id);
  CHECK(qp_state(p.a.qp) == IBV_QPS_ERR);
  // Later requests, sends and receives, are flushed at once.
  later.wr_id = 3;
  REQUIRE(post_send(p.a.qp, later) == 0);
  REQUIRE(post_recv(p.a.qp, 51, p.a.addr(), 64, p.a.mr->lkey) == 0);
  const auto flushed = poll_n(p.a.cq, 2);
  REQUIRE(flushed.size() == 2);
  CHECK(flushed[0].wr_id == 3);
  CHECK(flushed[0].status == IBV_WC_WR_FLUSH_ERR);
  CHECK(flushed[1].wr_id == 51);
  CHECK(flushed[1].status == IBV_WC_WR_FLUSH_ERR);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX
          "remote access needs the MR's and the QP's access flags and "
          "stays in bounds",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  struct Case {
    const char* what;
    ibv_wr_opcode opcode;
    unsigned target_access;
    unsigned qp_access;
    size_t offset;
    uint32_t length;
  };
  const unsigned rw = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  const unsigned qrw = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  const Case cases[] = {
      {"write to an MR without remote write", IBV_WR_RDMA_WRITE, IBV_ACCESS_LOCAL_WRITE, qrw, 0,
       64},
      {"read from an MR without remote read", IBV_WR_RDMA_READ,
       IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE, qrw, 0, 64},
      {"write to a QP without remote write", IBV_WR_RDMA_WRITE, rw, IBV_ACCESS_REMOTE_READ, 0, 64},
      {"write past the end of the MR", IBV_WR_RDMA_WRITE, rw, qrw, 4096 - 32, 64},
  };
  for (const Case& k : cases) {
    SECTION(k.what) {
      Endpoint a(c);
      Endpoint b(c, {.access = k.target_access});
      REQUIRE(a.ok());
      REQUIRE(b.ok());
      REQUIRE(connect_qp(a, b.info()) == 0);
      REQUIRE(connect_qp(b, a.info(), {.access = k.qp_access}) == 0);
      REQUIRE(post_send(a.qp, {.opcode = k.opcode,
                               .wr_id = 1,
                               .addr = a.addr(),
                               .length = k.length,
                               .lkey = a.mr->lkey,
                               .remote_addr = b.addr(k.offset),
                               .rkey = b.mr->rkey}) == 0);
      const auto wcs = poll_n(a.cq, 1);
      REQUIRE(wcs.size() == 1);
      CHECK(wcs[0].status == IBV_WC_REM_ACCESS_ERR);
      CHECK(qp_state(a.qp) == IBV_QPS_ERR);
      CHECK(qp_state(b.qp) == IBV_QPS_ERR);
    }
  }
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX
          "a SEND without a receive retries RNR and fails with "
          "RNR_RETRY_EXC_ERR",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  ConnectOptions co;
  co.rnr_retry = 2;
  co.min_rnr_timer = 14;  // 1.28 ms
  Pair p(c, {}, {}, co);
  REQUIRE(p.ok);
  REQUIRE(post_send(p.a.qp, {.wr_id = 1, .addr = p.a.addr(), .length = 8, .lkey = p.a.mr->lkey}) ==
          0);
  const auto wcs = poll_n(p.a.cq, 1);
  REQUIRE(wcs.size() == 1);
  CHECK(wcs[0].wr_id == 1);
  CHECK(wcs[0].status == IBV_WC_RNR_RETRY_EXC_ERR);
  CHECK(qp_state(p.a.qp) == IBV_QPS_ERR);
  // The receiver saw nothing.
  CHECK(stays_empty(p.b.cq, std::chrono::milliseconds(20)));
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "with rnr_retry 7 a SEND waits until a receive is posted",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Pair p(c);  // rnr_retry 7: for ever
  REQUIRE(p.ok);
  std::memcpy(p.a.buf.data(), "late", 5);
  REQUIRE(post_send(p.a.qp, {.wr_id = 1, .addr = p.a.addr(), .length = 5, .lkey = p.a.mr->lkey}) ==
          0);
  CHECK(stays_empty(p.a.cq, std::chrono::milliseconds(100)));
  REQUIRE(post_recv(p.b.qp, 2, p.b.addr(), 64, p.b.mr->lkey) == 0);
  const auto sent = poll_n(p.a.cq, 1);
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].status == IBV_WC_SUCCESS);
  const auto received = poll_n(p.b.cq, 1);
  REQUIRE(received.size() == 1);
  CHECK(std::memcmp(p.b.buf.data(), "late", 5) == 0);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX
          "a message larger than the receive is REM_INV_REQ_ERR at the "
          "requester and LOC_LEN_ERR at the responder",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Pair p(c);
  REQUIRE(p.ok);
  REQUIRE(post_recv(p.b.qp, 5, p.b.addr(), 16, p.b.mr->lkey) == 0);
  REQUIRE(post_recv(p.b.qp, 6, p.b.addr(), 16, p.b.mr->lkey) == 0);
  REQUIRE(post_send(p.a.qp, {.wr_id = 1, .addr = p.a.addr(), .length = 17, .lkey = p.a.mr->lkey}) ==
          0);
  const auto sent = poll_n(p.a.cq, 1);
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].status == IBV_WC_REM_INV_REQ_ERR);
  const auto received = poll_n(p.b.cq, 2);
  REQUIRE(received.size() == 2);
  CHECK(received[0].wr_id == 5);
  CHECK(received[0].status == IBV_WC_LOC_LEN_ERR);
  CHECK(received[1].wr_id == 6);
  CHECK(received[1].status == IBV_WC_WR_FLUSH_ERR);
  CHECK(qp_state(p.a.qp) == IBV_QPS_ERR);
  CHECK(qp_state(p.b.qp) == IBV_QPS_ERR);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX
          "a bad lkey completes with LOC_PROT_ERR after the requests "
          "before it",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Pair p(c);
  REQUIRE(p.ok);
  SendOptions good{.opcode = IBV_WR_RDMA_WRITE,
                   .wr_id = 1,
                   .addr = p.a.addr(),
                   .length = 64,
                   .lkey = p.a.mr->lkey,
                   .remote_addr = p.b.addr(),
                   .rkey = p.b.mr->rkey};
  REQUIRE(post_send(p.a.qp, good) == 0);
  SendOptions bad = good;
  bad.wr_id = 2;
  bad.lkey = p.a.mr->lkey + 77;
  REQUIRE(post_send(p.a.qp, bad) == 0);
  SendOptions outside = good;  // a valid lkey, but past the end of its MR
  outside.wr_id = 3;
  outside.addr = p.a.addr(4090);
  REQUIRE(post_send(p.a.qp, outside) == 0);
  const auto wcs = poll_n(p.a.cq, 3);
  REQUIRE(wcs.size() == 3);
  CHECK(wcs[0].wr_id == 1);
  CHECK(wcs[0].status == IBV_WC_SUCCESS);
  CHECK(wcs[1].wr_id == 2);
  CHECK(wcs[1].status == IBV_WC_LOC_PROT_ERR);
  CHECK(wcs[2].status == IBV_WC_WR_FLUSH_ERR);
  CHECK(qp_state(p.a.qp) == IBV_QPS_ERR);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "memory of another protection domain is refused", "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  Pair p(c);
  REQUIRE(p.ok);
  ibv_pd* other = ibv_alloc_pd(c.ctx);
  REQUIRE(other != nullptr);
  std::vector<uint8_t> mem(256);
  ibv_mr* foreign =
      ibv_reg_mr(other, mem.data(), mem.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  REQUIRE(foreign != nullptr);
  // The rkey belongs to a PD other than the responder QP's.
  REQUIRE(post_send(p.a.qp, {.opcode = IBV_WR_RDMA_WRITE,
                             .wr_id = 1,
                             .addr = p.a.addr(),
                             .length = 8,
                             .lkey = p.a.mr->lkey,
                             .remote_addr = reinterpret_cast<uintptr_t>(mem.data()),
                             .rkey = foreign->rkey}) == 0);
  const auto wcs = poll_n(p.a.cq, 1);
  REQUIRE(wcs.size() == 1);
  CHECK(wcs[0].status == IBV_WC_REM_ACCESS_ERR);
  CHECK(ibv_dereg_mr(foreign) == 0);
  CHECK(ibv_dealloc_pd(other) == 0);
}

TEST_CASE(RAMKV_VERBS_TEST_PREFIX "a destroyed peer QP makes requests fail with RETRY_EXC_ERR",
          "[rdma]") {
  Context c;
  REQUIRE_DEVICE(c);
  ConnectOptions co;
  co.timeout = 10;  // 4 ms, clamped by the emulation to 20 ms
  co.retry_cnt = 2;
  Endpoint a(c);
  auto b = std::make_unique<Endpoint>(c);
  REQUIRE(a.ok());
  REQUIRE(b->ok());
  REQUIRE(connect_qp(a, b->info(), co) == 0);
  REQUIRE(connect_qp(*b, a.info(), co) == 0);
  const QpInfo target = b->info();
  b.reset();
  REQUIRE(post_send(a.qp, {.opcode = IBV_WR_RDMA_WRITE,
                           .wr_id = 1,
                           .addr = a.addr(),
                           .length = 64,
                           .lkey = a.mr->lkey,
                           .remote_addr = target.addr,
                           .rkey = target.rkey}) == 0);
  REQUIRE(post_send(a.qp, {.wr_id = 2, .addr = a.addr(), .length = 8, .lkey = a.mr->lkey}) == 0);
  const auto wcs = poll_n(a.cq, 2);
  REQUIRE(wcs.size() == 2);
  CHECK(wcs[0].wr_id == 1);
  CHECK(wcs[0].status == IBV_WC_RETRY_EXC_ERR);
  CHECK(wcs[1].wr_id == 2);
  CHECK(wcs[1].status == IBV_WC_WR_FLUSH_ERR);
  CHECK(qp_state(a.qp) == IBV_QPS_ERR);
}

}  // namespace
}  // namespace ramkv::test::verbs
