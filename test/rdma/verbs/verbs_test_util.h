// Helpers for the verbs tests (test/rdma): open the first device, make an endpoint (CQ,
// QP, registered buffer), connect two QPs through the RC state machine, wait for
// completions with a deadline, and run a peer in a forked child process.
//
// The tests run against whatever libibverbs the build links (RAMKV_VERBS): the verbs
// emulation by default (rdma/emu), a real device under scripts/rdma-real-device.sh. So
// they use only the public verbs API, and the helpers use no Catch2 assertions: they
// also run in forked children, which report through exit codes instead.
#pragma once

#include <arpa/inet.h>
#include <infiniband/verbs.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

// Test names say what they run against: the emulation, or a real device.
#ifdef RAMKV_VERBS_EMULATED
#define RAMKV_VERBS_TEST_PREFIX "verbs emulation: "
#else
#define RAMKV_VERBS_TEST_PREFIX "verbs on a real device (system libibverbs): "
#endif

// In a test body: skips (ctest counts it skipped, never passed) where no device is
// listed, which only happens with RAMKV_VERBS=system on a machine without one.
#define REQUIRE_DEVICE(context)                              \
  do {                                                       \
    if (!(context).ok()) {                                   \
      WARN("SKIPPED: no RDMA device (ibv_get_device_list)"); \
      return;                                                \
    }                                                        \
  } while (0)

namespace ramkv::test::verbs {

// What a peer needs to connect to a QP and to address its buffer.
struct QpInfo {
  uint16_t lid = 0;
  uint32_t qpn = 0;
  uint32_t psn = 0;
  uint64_t addr = 0;
  uint32_t rkey = 0;
};

// One opened device with a protection domain. ok() is false when no device is listed.
struct Context {
  Context() {
    int count = 0;
    ibv_device** list = ibv_get_device_list(&count);
    if (list != nullptr && count > 0) ctx = ibv_open_device(list[0]);
    if (list != nullptr) ibv_free_device_list(list);
    if (ctx == nullptr) return;
    pd = ibv_alloc_pd(ctx);
    ibv_port_attr port{};
    if (ibv_query_port(ctx, 1, &port) == 0) lid = port.lid;
  }
  ~Context() {
    if (pd != nullptr) ibv_dealloc_pd(pd);
    if (ctx != nullptr) ibv_close_device(ctx);
  }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  bool ok() const { return ctx != nullptr && pd != nullptr; }

  ibv_context* ctx = nullptr;
  ibv_pd* pd = nullptr;
  uint16_t lid = 0;
};

struct EndpointOptions {
  uint32_t buffer_bytes = 4096;
  unsigned access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  uint32_t max_send_wr = 64;
  uint32_t max_recv_wr = 64;
  uint32_t max_sge = 4;
  uint32_t max_inline = 0;
  int cqe = 256;
  ibv_srq* srq = nullptr;
  ibv_comp_channel* channel = nullptr;
  bool sq_sig_all = false;
};

// A QP with its own CQ (sends and receives) and a registered buffer. Members are
// destroyed in reverse order of creation: QP, then CQ, then MR.
struct Endpoint {
  Endpoint(Context& context, const EndpointOptions& options = {}) : c(context) {
    buf.assign(options.buffer_bytes, 0);
    mr = ibv_reg_mr(c.pd, buf.data(), buf.size(), options.access);
    cq = ibv_create_cq(c.ctx, options.cqe, nullptr, options.channel, 0);
    if (cq == nullptr) return;
    ibv_qp_init_attr init{};
    init.send_cq = cq;
    init.recv_cq = cq;
    init.srq = options.srq;
    init.qp_type = IBV_QPT_RC;
    init.sq_sig_all = options.sq_sig_all ? 1 : 0;
    init.cap.max_send_wr = options.max_send_wr;
    init.cap.max_recv_wr = options.srq != nullptr ? 0 : options.max_recv_wr;
    init.cap.max_send_sge = options.max_sge;
    init.cap.max_recv_sge = options.srq != nullptr ? 0 : options.max_sge;
    init.cap.max_inline_data = options.max_inline;
    qp = ibv_create_qp(c.pd, &init);
    psn = (static_cast<uint32_t>(::getpid()) * 7919u + 17u) & 0xffffff;
  }
  ~Endpoint() {
    if (qp != nullptr) ibv_destroy_qp(qp);
    if (cq != nullptr) ibv_destroy_cq(cq);
    if (mr != nullptr) ibv_dereg_mr(mr);
  }
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;
  bool ok() const { return mr != nullptr && cq != nullptr && qp != nullptr; }
  QpInfo info() const {
    return {c.lid, qp->qp_num, psn, reinterpret_cast<uintptr_t>(buf.data()), mr->rkey};
  }
  uint64_t addr(size_t offset = 0) const {
    return reinterpret_cast<uintptr_t>(buf.data()) + offset;
  }

  Context& c;
  std::vector<uint8_t> buf;
  ibv_mr* mr = nullptr;
  ibv_cq* cq = nullptr;
  ibv_qp* qp = nullptr;
  uint32_t psn = 0;
};

struct ConnectOptions {
  uint8_t timeout = 14;  // 4.096 us * 2^14 = 67 ms
  uint8_t retry_cnt = 7;
  uint8_t rnr_retry = 7;       // 7 = for ever
  uint8_t min_rnr_timer = 12;  // 0.64 ms
  unsigned access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
};

inline int to_init(ibv_qp* qp, unsigned access) {
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_INIT;
  a.pkey_index = 0;
  a.port_num = 1;
  a.qp_access_flags = access;
  return ibv_modify_qp(qp, &a,
                       IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
}

inline int to_rtr(ibv_qp* qp, const QpInfo& remote, uint32_t own_rq_psn, const ConnectOptions& o) {
  (void)own_rq_psn;
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = IBV_MTU_1024;
  a.dest_qp_num = remote.qpn;
  a.rq_psn = remote.psn;  // the peer's first send PSN
  a.max_dest_rd_atomic = 1;
  a.min_rnr_timer = o.min_rnr_timer;
  a.ah_attr.dlid = remote.lid;
  a.ah_attr.port_num = 1;
  return ibv_modify_qp(qp, &a,
                       IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                           IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
}

inline int to_rts(ibv_qp* qp, uint32_t own_sq_psn, const ConnectOptions& o) {
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_RTS;
  a.sq_psn = own_sq_psn;
  a.timeout = o.timeout;
  a.retry_cnt = o.retry_cnt;
  a.rnr_retry = o.rnr_retry;
  a.max_rd_atomic = 1;
  return ibv_modify_qp(qp, &a,
                       IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                           IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC);
}

// RESET -> INIT -> RTR -> RTS towards `remote`; 0 or the first error.
inline int connect_qp(Endpoint& e, const QpInfo& remote, const ConnectOptions& o = {}) {
  if (int rc = to_init(e.qp, o.access); rc != 0) return rc;
  if (int rc = to_rtr(e.qp, remote, e.psn, o); rc != 0) return rc;
  return to_rts(e.qp, e.psn, o);
}

inline ibv_qp_state qp_state(ibv_qp* qp) {
  ibv_qp_attr a{};
  ibv_qp_init_attr init{};
  if (ibv_query_qp(qp, &a, IBV_QP_STATE, &init) != 0) return IBV_QPS_UNKNOWN;
  return a.qp_state;
}

// Polls until `count` completions arrived or `timeout` passed; returns what arrived.
inline std::vector<ibv_wc> poll_n(ibv_cq* cq, size_t count,
                                  std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  std::vector<ibv_wc> out;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (out.size() < count && std::chrono::steady_clock::now() < deadline) {
    ibv_wc wc[16];
    const int n = ibv_poll_cq(cq, static_cast<int>(std::min<size_t>(16, count - out.size())), wc);
    if (n < 0) break;
    for (int i = 0; i < n; ++i) out.push_back(wc[i]);
    if (n == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return out;
}

// Whether the CQ stays empty for `quiet` (no unexpected completion).
inline bool stays_empty(ibv_cq* cq, std::chrono::milliseconds quiet) {
  return poll_n(cq, 1, quiet).empty();
}

inline int post_recv(ibv_qp* qp, uint64_t wr_id, uint64_t addr, uint32_t length, uint32_t lkey) {
  ibv_sge sge{addr, length, lkey};
  ibv_recv_wr wr{};
  wr.wr_id = wr_id;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  return ibv_post_recv(qp, &wr, &bad);
}

inline int post_srq_recv(ibv_srq* srq, uint64_t wr_id, uint64_t addr, uint32_t length,
                         uint32_t lkey) {
  ibv_sge sge{addr, length, lkey};
  ibv_recv_wr wr{};
  wr.wr_id = wr_id;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  return ibv_post_srq_recv(srq, &wr, &bad);
}

struct SendOptions {
  ibv_wr_opcode opcode = IBV_WR_SEND;
  uint64_t wr_id = 0;
  uint64_t addr = 0;
  uint32_t length = 0;
  uint32_t lkey = 0;
  uint64_t remote_addr = 0;
  uint32_t rkey = 0;
  uint32_t imm_host = 0;  // sent as htonl(imm_host)
  unsigned flags = IBV_SEND_SIGNALED;
};

inline int post_send(ibv_qp* qp, const SendOptions& o) {
  ibv_sge sge{o.addr, o.length, o.lkey};
  ibv_send_wr wr{};
  wr.wr_id = o.wr_id;
  wr.sg_list = &sge;
  wr.num_sge = o.length > 0 ? 1 : 0;
  wr.opcode = o.opcode;
  wr.send_flags = o.flags;
  wr.imm_data = htonl(o.imm_host);
  wr.wr.rdma.remote_addr = o.remote_addr;
  wr.wr.rdma.rkey = o.rkey;
  ibv_send_wr* bad = nullptr;
  return ibv_post_send(qp, &wr, &bad);
}

// Full-duplex byte pipes between the test and a forked child.
struct Pipes {
  int to_child[2] = {-1, -1};
  int to_parent[2] = {-1, -1};
};

inline bool write_all(int fd, const void* data, size_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd, p, bytes);
    if (n <= 0) return false;
    p += n;
    bytes -= static_cast<size_t>(n);
  }
  return true;
}

// Reads exactly `bytes`, or false after `timeout_ms` or at end of file.
inline bool read_all(int fd, void* data, size_t bytes, int timeout_ms = 10000) {
  auto* p = static_cast<uint8_t*>(data);
  while (bytes > 0) {
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, timeout_ms) <= 0) return false;
    const ssize_t n = ::read(fd, p, bytes);
    if (n <= 0) return false;
    p += n;
    bytes -= static_cast<size_t>(n);
  }
  return true;
}

// A peer in a forked child process (a separate address space, its own emulated NIC).
// `body` runs in the child with the child's ends of the pipes (read, write) and its
// return value is the exit code; an alarm kills a child that hangs. The destructor
// kills (SIGKILL) and reaps a child still running, so no test leaves one behind.
class ChildPeer {
 public:
  explicit ChildPeer(std::function<int(int in_fd, int out_fd)> body) {
    if (::pipe(pipes_.to_child) != 0 || ::pipe(pipes_.to_parent) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      ::alarm(60);
      ::close(pipes_.to_child[1]);
      ::close(pipes_.to_parent[0]);
      int code = 99;
      try {
        code = body(pipes_.to_child[0], pipes_.to_parent[1]);
      } catch (...) {
      }
      ::_exit(code);
    }
    ::close(pipes_.to_child[0]);
    ::close(pipes_.to_parent[1]);
  }
  ~ChildPeer() {
    kill();
    ::close(pipes_.to_child[1]);
    ::close(pipes_.to_parent[0]);
  }
  ChildPeer(const ChildPeer&) = delete;
  ChildPeer& operator=(const ChildPeer&) = delete;

  bool started() const { return pid_ > 0; }
  int in_fd() const { return pipes_.to_parent[0]; }
  int out_fd() const { return pipes_.to_child[1]; }
  // SIGKILL and reap; no-op once reaped.
  void kill() {
    if (pid_ <= 0 || reaped_) return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    reaped_ = true;
  }
  // Waits (bounded) for the child to exit; its exit code, or -1 (killed, timed out).
  int wait(std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    if (pid_ <= 0 || reaped_) return -1;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        reaped_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    kill();
    return -1;
  }

 private:
  Pipes pipes_;
  pid_t pid_ = -1;
  bool reaped_ = false;
};

}  // namespace ramkv::test::verbs
