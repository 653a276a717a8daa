// The parts of the RDMA transport (rdma_transport.h) that its server and client share:
// the connection request exchanged over TCP (Hello), the verbs objects one transport owns
// (Verbs: device, protection domain, completion queue and channel, shared receive queue,
// send buffers, registered and exposed regions), and one queue pair's sending side (Link:
// selective signalling, messages and writes waiting for room). Internal to rdma/: the
// server is in rdma_server.cc, the client in rdma_client.cc.
// Threads: a transport's objects are used by the thread that runs it.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <deque>
#include <map>
#include <random>
#include <unordered_map>
#include <vector>

#include "common/acceptor.h"
#include "common/assert.h"
#include "common/clock.h"
#include "common/log.h"
#include "rdma/rdma_transport.h"

namespace ramkv::rdma::internal {

inline constexpr size_t kHeaderBytes = sizeof(wire::MessageHeader);
inline constexpr uint32_t kHelloMagic = 0x52444d41;  // "AMDR": an RDMA connection request
inline constexpr uint16_t kHelloVersion = 1;
inline constexpr uint32_t kSendQueueDepth = 256;
// One unsignalled send in this many is signalled, so the send queue's slots come back.
inline constexpr uint32_t kSignalEvery = 64;
inline constexpr int kMaxSge = 8;
inline constexpr int kPollBatch = 16;

// What each side tells the other over TCP to connect two queue pairs.
#pragma pack(push, 1)
struct Hello {
  uint32_t magic = kHelloMagic;
  uint16_t version = kHelloVersion;
  uint16_t lid = 0;
  uint32_t qp_num = 0;
  uint32_t psn = 0;
  uint8_t gid[16] = {};
  uint32_t max_message_bytes = 0;  // the largest message this side can receive
  uint32_t status = 0;             // server: 0, or why it refused (a ramkv::Status)
};
#pragma pack(pop)
static_assert(sizeof(Hello) == 40);

std::string errno_text(int e);

// Memory aligned to a page: registration pins whole pages anyway.
struct PageFree {
  void operator()(std::byte* p) const { std::free(p); }
};
using PageBuffer = std::unique_ptr<std::byte, PageFree>;
PageBuffer page_alloc(size_t bytes);

// A registered buffer.
struct Buffer {
  PageBuffer memory;
  size_t bytes = 0;
  ibv_mr* mr = nullptr;
};

// ---------------------------------------------------------------------------------------
// The verbs objects one transport owns: device, protection domain, completion queue and
// channel, shared receive queue and its buffers, send buffers, registered regions.
class Verbs {
 public:
  ~Verbs() {
    // Memory regions go before the protection domain they belong to.
    for (auto& [key, mr] : exposed_) ibv_dereg_mr(mr);
    for (ibv_mr* mr : regions_mrs_) ibv_dereg_mr(mr);
    for (auto& b : recv_) {
      if (b.mr != nullptr) ibv_dereg_mr(b.mr);
    }
    for (auto& b : send_) {
      if (b.mr != nullptr) ibv_dereg_mr(b.mr);
    }
    for (auto& [id, b] : large_) {
      if (b.mr != nullptr) ibv_dereg_mr(b.mr);
    }
    if (srq_ != nullptr) ibv_destroy_srq(srq_);
    if (cq_ != nullptr) {
      if (unacked_events_ > 0) ibv_ack_cq_events(cq_, unacked_events_);
      ibv_destroy_cq(cq_);
    }
    if (channel_ != nullptr) ibv_destroy_comp_channel(channel_);
    if (pd_ != nullptr) ibv_dealloc_pd(pd_);
    if (ctx_ != nullptr) ibv_close_device(ctx_);
  }

  static Result<std::unique_ptr<Verbs>> open(const RdmaOptions& o, std::string* why) {
    std::unique_ptr<Verbs> v(new Verbs(o));
    if (Status s = v->init(why); s != Status::kOk) return s;
    return v;
  }

  const RdmaOptions& options() const { return o_; }
  ibv_cq* cq() const { return cq_; }
  int channel_fd() const { return channel_->fd; }
  uint32_t max_inline() const { return max_inline_; }

  // A new RC queue pair in INIT, on the shared CQ and SRQ.
  ibv_qp* create_qp(std::string* why) {
    ibv_qp_init_attr attr{};
    attr.send_cq = cq_;
    attr.recv_cq = cq_;
    attr.srq = srq_;
    attr.qp_type = IBV_QPT_RC;
    attr.sq_sig_all = 0;
    attr.cap.max_send_wr = kSendQueueDepth;
    attr.cap.max_recv_wr = 1;  // receives come from the SRQ
    attr.cap.max_send_sge = kMaxSge;
    attr.cap.max_recv_sge = 1;
    attr.cap.max_inline_data = max_inline_;
    ibv_qp* qp = ibv_create_qp(pd_, &attr);
    if (qp == nullptr) {
      // Some devices take less inline data than asked: retry without.
      attr.cap.max_inline_data = 0;
      qp = ibv_create_qp(pd_, &attr);
      if (qp != nullptr) max_inline_ = 0;
    }
    if (qp == nullptr) {
      set_why(why, "cannot create a queue pair on {}: {}", name_, errno_text(errno));
      return nullptr;
    }
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = o_.port;
    a.qp_access_flags = static_cast<unsigned>(IBV_ACCESS_REMOTE_WRITE) |
                        static_cast<unsigned>(IBV_ACCESS_REMOTE_READ);
    if (int rc = ibv_modify_qp(
            qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
        rc != 0) {
      set_why(why, "cannot bring a queue pair to INIT: {}", errno_text(rc));
      ibv_destroy_qp(qp);
      return nullptr;
    }
    return qp;
  }

  Hello hello(const ibv_qp* qp, uint32_t psn) const {
    Hello h;
    h.lid = lid_;
    h.qp_num = qp->qp_num;
    h.psn = psn;
    std::memcpy(h.gid, gid_.raw, sizeof(h.gid));
    h.max_message_bytes = o_.max_message_bytes;
    return h;
  }

  // INIT -> RTR -> RTS towards the peer described by `remote`.
  Status connect(ibv_qp* qp, uint32_t local_psn, const Hello& remote, std::string* why) {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_RTR;
    a.path_mtu = mtu_;
    a.dest_qp_num = remote.qp_num;
    a.rq_psn = remote.psn;
    a.max_dest_rd_atomic = 1;
    a.min_rnr_timer = 12;  // 0.64 ms before a sender retries a receiver without buffers
    a.ah_attr.dlid = remote.lid;
    a.ah_attr.sl = 0;
    a.ah_attr.src_path_bits = 0;
    a.ah_attr.port_num = o_.port;
    if (global_) {
      a.ah_attr.is_global = 1;
      std::memcpy(a.ah_attr.grh.dgid.raw, remote.gid, sizeof(remote.gid));
      a.ah_attr.grh.sgid_index = static_cast<uint8_t>(o_.gid_index);
      a.ah_attr.grh.hop_limit = 1;
    }
    if (int rc =
            ibv_modify_qp(qp, &a,
                          IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                              IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
        rc != 0) {
      set_why(why, "cannot bring a queue pair to RTR: {}", errno_text(rc));
      return Status::kUnavailable;
    }
    ibv_qp_attr r{};
    r.qp_state = IBV_QPS_RTS;
    r.timeout = 14;   // 4.096 us x 2^14 = 67 ms per try
    r.retry_cnt = 7;  // then the peer is taken as dead
    r.rnr_retry = 7;  // a receiver out of buffers: retry forever (flow control)
    r.sq_psn = local_psn;
    r.max_rd_atomic = 1;
    if (int rc = ibv_modify_qp(qp, &r,
                               IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                                   IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
        rc != 0) {
      set_why(why, "cannot bring a queue pair to RTS: {}", errno_text(rc));
      return Status::kUnavailable;
    }
    return Status::kOk;
  }

  // ---- Receives ------------------------------------------------------------------------
  std::span<const std::byte> recv_bytes(uint64_t index, uint32_t bytes) const {
    return {recv_[index].memory.get(), bytes};
  }
  bool post_recv(uint64_t index) {
    Buffer& b = recv_[index];
    ibv_sge sge{};
    sge.addr = reinterpret_cast<uint64_t>(b.memory.get());
    sge.length = static_cast<uint32_t>(b.bytes);
    sge.lkey = b.mr->lkey;
    ibv_recv_wr wr{};
    wr.wr_id = index;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    ibv_recv_wr* bad = nullptr;
    if (int rc = ibv_post_srq_recv(srq_, &wr, &bad); rc != 0) {
      LOG_ERROR("cannot post a receive buffer: {}", errno_text(rc));
      return false;
    }
    return true;
  }

  // ---- Sends ---------------------------------------------------------------------------
  // wr_id of a send: kind in the top byte, then the buffer (or 0).
  static constexpr uint64_t kSendUnbuffered = 1ULL << 56;
  static constexpr uint64_t kSendPooled = 2ULL << 56;
  static constexpr uint64_t kSendLarge = 3ULL << 56;
  // A signalled RDMA WRITE of a client's write_remote(), then its serial (the client
  // transport knows what it holds: a send buffer, the call it finishes).
  static constexpr uint64_t kRemoteWrite = 4ULL << 56;
  static constexpr uint64_t kKindMask = 0xffULL << 56;

  // Posts one message (the concatenation of `pieces`) on `qp`. *signalled says whether
  // the send will complete on the CQ (the caller counts unsignalled ones per queue pair).
  // `by_reference`: pieces in registered memory may go without a copy (*zero_copied), and
  // then the caller must wait for the send. Returns the wr_id, or 0 on failure.
  uint64_t send(ibv_qp* qp, std::span<const std::span<const std::byte>> pieces, uint32_t peer_max,
                bool by_reference, bool force_signal, bool* signalled, bool* zero_copied) {
    size_t total = 0;
    for (auto p : pieces) total += p.size();
    *zero_copied = false;
    if (total > peer_max) {
      LOG_WARNING("a message of {} bytes is above the peer's largest ({})", total, peer_max);
      return 0;
    }
    ibv_send_wr wr{};
    ibv_sge sge[kMaxSge];
    wr.opcode = IBV_WR_SEND;
    wr.sg_list = sge;
    if (total <= max_inline_) {
      // Inline: the adapter copies the bytes at post time; nothing to keep.
      std::byte inline_bytes[1024];
      size_t at = 0;
      for (auto p : pieces) {
        if (!p.empty()) std::memcpy(inline_bytes + at, p.data(), p.size());
        at += p.size();
      }
      sge[0] = {reinterpret_cast<uint64_t>(inline_bytes), static_cast<uint32_t>(total), 0};
      wr.num_sge = 1;
      wr.send_flags = static_cast<unsigned>(IBV_SEND_INLINE) |
                      (force_signal ? static_cast<unsigned>(IBV_SEND_SIGNALED) : 0u);
      wr.wr_id = kSendUnbuffered;
      *signalled = force_signal;
      return post(qp, wr);
    }
    // Pieces in registered regions go by reference (zero copy); the rest is copied,
    // in order, into one send buffer that leads the scatter list.
    size_t copied = 0;
    std::vector<std::pair<std::span<const std::byte>, uint32_t>> refs;  // piece, lkey
    bool by_ref = by_reference && o_.zero_copy && !regions_.empty();
    if (by_ref) {
      bool tail = false;  // references may only follow the copied prefix
      for (auto p : pieces) {
        uint32_t lkey = 0;
        if (!p.empty() && lkey_of(p, &lkey)) {
          refs.emplace_back(p, lkey);
          tail = true;
        } else if (tail && !p.empty()) {
          by_ref = false;  // a copied piece after a referenced one: copy everything
          break;
        } else {
          copied += p.size();
        }
      }
      if (refs.empty() || refs.size() + 1 > kMaxSge) by_ref = false;
    }
    if (!by_ref) {
      refs.clear();
      copied = total;
    }
    uint64_t id = 0;
    Buffer* b = send_buffer(copied, &id);
    if (b == nullptr) return 0;
    size_t at = 0;
    for (auto p : pieces) {
      if (by_ref && at >= copied) break;
      if (!p.empty()) std::memcpy(b->memory.get() + at, p.data(), p.size());
      at += p.size();
    }
    int n = 0;
    if (copied > 0) {
      sge[n++] = {reinterpret_cast<uint64_t>(b->memory.get()), static_cast<uint32_t>(copied),
                  b->mr->lkey};
    }
    for (const auto& [p, lkey] : refs) {
      sge[n++] = {reinterpret_cast<uint64_t>(p.data()), static_cast<uint32_t>(p.size()), lkey};
    }
    wr.num_sge = n;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr_id = id;
    *signalled = true;
    *zero_copied = !refs.empty();
    if (post(qp, wr) == 0) {
      release_send(id);
      return 0;
    }
    return id;
  }

  // Posts one RDMA WRITE of `bytes` (not empty, under 4 GiB: one scatter entry) to
  // `remote_address` under `key` on `qp`.
  // Bytes inside memory given to register_memory() go by reference (they must not change
  // until the write completes), at most max_inline() bytes inline, and others are copied
  // into a send buffer whose id is put in *buffer (else 0). A write with a buffer is always
  // signalled: its buffer is released (release_send) once it completed, or once its queue
  // pair is destroyed. `signal` asks for a completion, with `wr_id`; *signalled says
  // whether there will be one. false when it cannot be posted (logged).
  bool write(ibv_qp* qp, std::span<const std::byte> bytes, uint64_t remote_address, uint32_t key,
             bool signal, uint64_t wr_id, bool* signalled, uint64_t* buffer) {
    RAMKV_CHECK(!bytes.empty() && bytes.size() <= UINT32_MAX);
    *buffer = 0;
    ibv_sge sge{};
    sge.addr = reinterpret_cast<uint64_t>(bytes.data());
    sge.length = static_cast<uint32_t>(bytes.size());
    ibv_send_wr wr{};
    wr.opcode = IBV_WR_RDMA_WRITE;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.wr.rdma.remote_addr = remote_address;
    wr.wr.rdma.rkey = key;
    unsigned flags = 0;
    if (o_.zero_copy && lkey_of(bytes, &sge.lkey)) {
      // By reference: the caller keeps the bytes unchanged until the write is done.
    } else if (bytes.size() <= max_inline_) {
      flags |= static_cast<unsigned>(IBV_SEND_INLINE);  // copied by the adapter at post time
    } else {
      Buffer* b = send_buffer(bytes.size(), buffer);
      if (b == nullptr) return false;
      std::memcpy(b->memory.get(), bytes.data(), bytes.size());
      sge.addr = reinterpret_cast<uint64_t>(b->memory.get());
      sge.lkey = b->mr->lkey;
      signal = true;
    }
    if (signal) flags |= static_cast<unsigned>(IBV_SEND_SIGNALED);
    wr.send_flags = flags;
    // An unsignalled write completes only when its queue pair fails (flushed): as an
    // unbuffered send, it has nothing to give back then.
    wr.wr_id = signal ? wr_id : kSendUnbuffered;
    *signalled = signal;
    if (post(qp, wr) == 0) {
      if (*buffer != 0) release_send(*buffer);
      *buffer = 0;
      return false;
    }
    return true;
  }

  // Whether `bytes` lies in memory given to register_memory() and would be written by
  // reference (write()).
  bool by_reference(std::span<const std::byte> bytes) const {
    uint32_t lkey = 0;
    return o_.zero_copy && lkey_of(bytes, &lkey);
  }

  // Registers `memory` for remote writes by the peers of this protection domain.
  Result<RemoteRegion> expose(std::span<std::byte> memory) {
    ibv_mr* mr = ibv_reg_mr(pd_, memory.data(), memory.size(),
                            static_cast<int>(static_cast<unsigned>(IBV_ACCESS_LOCAL_WRITE) |
                                             static_cast<unsigned>(IBV_ACCESS_REMOTE_WRITE)));
    if (mr == nullptr) {
      LOG_ERROR("cannot expose {} bytes of memory with {}: {} (is `ulimit -l` too low?)",
                memory.size(), name_, errno_text(errno));
      return Status::kNoSpace;
    }
    exposed_[mr->rkey] = mr;
    return RemoteRegion{.address = reinterpret_cast<uint64_t>(memory.data()),
                        .bytes = memory.size(),
                        .key = mr->rkey};
  }

  // Deregisters the region exposed under `key`; unknown keys are ignored. Once the
  // adapter has deregistered it, writes through `key` fail at the writer.
  void withdraw(uint32_t key) {
    auto it = exposed_.find(key);
    if (it == exposed_.end()) return;
    if (int rc = ibv_dereg_mr(it->second); rc != 0) {
      LOG_ERROR("rdma: cannot withdraw the region with key {}: {}", key, errno_text(rc));
    }
    exposed_.erase(it);
  }

  // A signalled send completed (or was flushed): its buffer is free again.
  void release_send(uint64_t wr_id) {
    const uint64_t kind = wr_id & kKindMask;
    const uint64_t index = wr_id & ~kKindMask;
    if (kind == kSendPooled) {
      free_send_.push_back(index);
    } else if (kind == kSendLarge) {
      auto it = large_.find(index);
      if (it != large_.end()) {
        ibv_dereg_mr(it->second.mr);
        large_.erase(it);
      }
    }
  }

  Status register_memory(std::span<const std::byte> memory) {
    ibv_mr* mr = ibv_reg_mr(pd_, const_cast<std::byte*>(memory.data()), memory.size(),
                            static_cast<unsigned>(IBV_ACCESS_LOCAL_WRITE));
    if (mr == nullptr) {
      LOG_ERROR("cannot register {} bytes of memory with {}: {} (is `ulimit -l` too low?)",
                memory.size(), name_, errno_text(errno));
      return Status::kNoSpace;
    }
    regions_mrs_.push_back(mr);
    regions_.push_back({reinterpret_cast<uintptr_t>(memory.data()), memory.size(), mr->lkey});
    std::sort(regions_.begin(), regions_.end(),
              [](const Region& a, const Region& b) { return a.base < b.base; });
    LOG_INFO("registered {} MiB with {} for zero-copy sends", memory.size() >> 20, name_);
    return Status::kOk;
  }

  // ---- Completions ---------------------------------------------------------------------
  // Re-arms the CQ after the channel said it has events; call before polling.
  void take_channel_events() {
    ibv_cq* ev_cq = nullptr;
    void* ev_ctx = nullptr;
    // The channel's descriptor is non-blocking: read every event that is there.
    while (ibv_get_cq_event(channel_, &ev_cq, &ev_ctx) == 0) ++unacked_events_;
    if (unacked_events_ >= 64) {
      ibv_ack_cq_events(cq_, unacked_events_);
      unacked_events_ = 0;
    }
    arm();
  }
  void arm() { ibv_req_notify_cq(cq_, 0); }
  int poll(ibv_wc* wc, int n) { return ibv_poll_cq(cq_, n, wc); }

 private:
  struct Region {
    uintptr_t base = 0;
    size_t bytes = 0;
    uint32_t lkey = 0;
  };

  explicit Verbs(const RdmaOptions& o) : o_(o) {}

  template <typename... Args>
  void set_why(std::string* why, fmt::format_string<Args...> format, Args&&... args) {
    std::string text = fmt::format(format, std::forward<Args>(args)...);
    LOG_ERROR("rdma: {}", text);
    if (why != nullptr) *why = text;
  }

  Status init(std::string* why) {
    int count = 0;
    ibv_device** list = ibv_get_device_list(&count);
    if (list == nullptr || count == 0) {
      if (list != nullptr) ibv_free_device_list(list);
      set_why(why, "no RDMA device found (ibv_get_device_list lists none; provider: {})",
              rdma_provider());
      return Status::kUnavailable;
    }
    ibv_device* dev = nullptr;
    for (int i = 0; i < count && dev == nullptr; ++i) {
      if (o_.device.empty() || o_.device == ibv_get_device_name(list[i])) dev = list[i];
    }
    if (dev == nullptr) {
      ibv_free_device_list(list);
      set_why(why, "no RDMA device named '{}'", o_.device);
      return Status::kInvalidArgument;
    }
    name_ = ibv_get_device_name(dev);
    ctx_ = ibv_open_device(dev);
    ibv_free_device_list(list);
    if (ctx_ == nullptr) {
      set_why(why, "cannot open RDMA device {}: {}", name_, errno_text(errno));
      return Status::kUnavailable;
    }
    ibv_port_attr port{};
    if (int rc = ibv_query_port(ctx_, o_.port, &port); rc != 0) {
      set_why(why, "cannot query port {} of {}: {}", o_.port, name_, errno_text(rc));
      return Status::kInvalidArgument;
    }
    if (port.state != IBV_PORT_ACTIVE) {
      set_why(why, "port {} of {} is not active (state {})", o_.port, name_,
              ibv_port_state_str(port.state));
      return Status::kUnavailable;
    }
    lid_ = port.lid;
    mtu_ = port.active_mtu;
    global_ = port.link_layer == IBV_LINK_LAYER_ETHERNET || port.lid == 0;
    if (ibv_query_gid(ctx_, o_.port, o_.gid_index, &gid_) != 0) std::memset(&gid_, 0, sizeof(gid_));
    ibv_device_attr dev_attr{};
    if (ibv_query_device(ctx_, &dev_attr) == 0) {
      srq_depth_limit_ = static_cast<uint32_t>(std::max(dev_attr.max_srq_wr, 1));
    }
    pd_ = ibv_alloc_pd(ctx_);
    channel_ = ibv_create_comp_channel(ctx_);
    if (pd_ == nullptr || channel_ == nullptr) {
      set_why(why, "cannot allocate a protection domain or completion channel on {}: {}", name_,
              errno_text(errno));
      return Status::kUnavailable;
    }
    // Blocking mode reads the channel from epoll: it must not block the loop.
    fcntl(channel_->fd, F_SETFL, fcntl(channel_->fd, F_GETFL) | O_NONBLOCK);
    const int cq_depth = static_cast<int>(o_.recv_buffers + 4 * kSendQueueDepth);
    cq_ = ibv_create_cq(ctx_, cq_depth, nullptr, channel_, 0);
    const uint32_t depth = std::min(o_.recv_buffers, srq_depth_limit_);
    ibv_srq_init_attr sa{};
    sa.attr.max_wr = depth;
    sa.attr.max_sge = 1;
    srq_ = ibv_create_srq(pd_, &sa);
    if (cq_ == nullptr || srq_ == nullptr) {
      set_why(why, "cannot create a completion queue or shared receive queue on {}: {}", name_,
              errno_text(errno));
      return Status::kUnavailable;
    }
    recv_.resize(depth);
    for (uint64_t i = 0; i < depth; ++i) {
      if (Status s = make_buffer(o_.max_message_bytes, static_cast<int>(IBV_ACCESS_LOCAL_WRITE),
                                 &recv_[i], why);
          s != Status::kOk) {
        return s;
      }
      if (!post_recv(i)) return Status::kUnavailable;
    }
    send_.resize(o_.send_buffers);
    for (uint64_t i = 0; i < o_.send_buffers; ++i) {
      if (Status s = make_buffer(o_.send_buffer_bytes, 0, &send_[i], why); s != Status::kOk) {
        return s;
      }
      free_send_.push_back(i);
    }
    arm();
    LOG_INFO("rdma: {} port {} ({}), {} receive buffers of {} KiB, inline up to {} B", name_,
             o_.port, rdma_provider(), depth, o_.max_message_bytes >> 10, max_inline_);
    return Status::kOk;
  }

  Status make_buffer(size_t bytes, int access, Buffer* b, std::string* why) {
    b->memory = page_alloc(bytes);
    b->bytes = bytes;
    if (b->memory == nullptr) {
      set_why(why, "out of memory for a {} byte buffer", bytes);
      return Status::kNoSpace;
    }
    b->mr = ibv_reg_mr(pd_, b->memory.get(), bytes, static_cast<unsigned>(access));
    if (b->mr == nullptr) {
      set_why(why, "cannot register {} bytes of memory with {}: {} (is `ulimit -l` too low?)",
              bytes, name_, errno_text(errno));
      return Status::kNoSpace;
    }
    return Status::kOk;
  }

  Buffer* send_buffer(size_t bytes, uint64_t* id) {
    if (bytes <= o_.send_buffer_bytes && !free_send_.empty()) {
      uint64_t index = free_send_.back();
      free_send_.pop_back();
      *id = kSendPooled | index;
      return &send_[index];
    }
    // Too large for the pool, or the pool is in flight: a buffer of its own.
    uint64_t index = ++large_serial_ & ~kKindMask;
    Buffer& b = large_[index];
    if (make_buffer(std::max<size_t>(bytes, 1), 0, &b, nullptr) != Status::kOk) {
      large_.erase(index);
      return nullptr;
    }
    *id = kSendLarge | index;
    return &b;
  }

  bool lkey_of(std::span<const std::byte> p, uint32_t* lkey) const {
    const auto addr = reinterpret_cast<uintptr_t>(p.data());
    auto it = std::upper_bound(regions_.begin(), regions_.end(), addr,
                               [](uintptr_t a, const Region& r) { return a < r.base; });
    if (it == regions_.begin()) return false;
    --it;
    if (addr + p.size() > it->base + it->bytes) return false;
    *lkey = it->lkey;
    return true;
  }

  uint64_t post(ibv_qp* qp, ibv_send_wr& wr) {
    ibv_send_wr* bad = nullptr;
    if (int rc = ibv_post_send(qp, &wr, &bad); rc != 0) {
      LOG_WARNING("rdma: cannot post a send: {}", errno_text(rc));
      return 0;
    }
    return wr.wr_id;
  }

  RdmaOptions o_;
  std::string name_;
  ibv_context* ctx_ = nullptr;
  ibv_pd* pd_ = nullptr;
  ibv_comp_channel* channel_ = nullptr;
  ibv_cq* cq_ = nullptr;
  ibv_srq* srq_ = nullptr;
  unsigned unacked_events_ = 0;
  uint16_t lid_ = 0;
  ibv_mtu mtu_ = IBV_MTU_1024;
  ibv_gid gid_{};
  bool global_ = false;
  uint32_t max_inline_ = 256;
  uint32_t srq_depth_limit_ = UINT32_MAX;
  std::vector<Buffer> recv_;
  std::vector<Buffer> send_;
  std::vector<uint64_t> free_send_;
  std::unordered_map<uint64_t, Buffer> large_;
  uint64_t large_serial_ = 0;
  std::vector<Region> regions_;
  std::vector<ibv_mr*> regions_mrs_;
  std::unordered_map<uint32_t, ibv_mr*> exposed_;  // by rkey (expose)
};

// What waits on a link for room in its send queue (or, on a client, for its queue pair
// to be connected), in the order given: a whole message, or one RDMA WRITE of a
// write_remote() call (clients only).
struct Waiting {
  std::vector<std::byte> bytes;  // the message, or a write's bytes when copied
  bool write = false;
  // A write's bytes when they lie in registered memory: not copied, since the caller
  // keeps them unchanged until its `done` runs.
  std::span<const std::byte> ref;
  uint64_t remote_address = 0;
  uint32_t key = 0;
  uint64_t call = 0;  // the write_remote() call this is the last write of, else 0

  std::span<const std::byte> write_bytes() const {
    return ref.empty() ? std::span<const std::byte>(bytes) : ref;
  }
};

// One connected queue pair's sending side: what is posted and not yet known complete,
// and what waits for room in its send queue. Completions of one queue pair's requests
// (SENDs and RDMA WRITEs alike) arrive in the order posted (RC), so a signalled one's
// completion means every request posted before it on that queue pair is done too.
struct Link {
  ibv_qp* qp = nullptr;
  uint32_t peer_max = 0;
  // Whether messages may be sent from registered memory by reference: a server's replies
  // (whose sender waits for them). Never a client's requests, whose bodies need not
  // outlive send(), even where they lie in memory registered for remote writes.
  bool by_reference = false;
  uint64_t posted = 0;     // requests posted (sends and writes)
  uint64_t completed = 0;  // requests known complete
  uint64_t last_signal = 0;
  std::deque<uint64_t> signals;  // `posted` after each signalled request still in flight
  std::deque<Waiting> waiting;   // for want of room, in order

  bool room() const { return posted - completed + 1 < kSendQueueDepth; }
  // Signalled every kSignalEvery requests, and whenever the queue is half full, so the
  // send queue's slots come back.
  bool must_signal() const {
    return posted - last_signal + 1 >= kSignalEvery ||
           posted - completed + 1 >= kSendQueueDepth / 2;
  }
  void note_posted(bool signalled) {
    ++posted;
    if (signalled) {
      last_signal = posted;
      signals.push_back(posted);
    }
  }
  // A signalled send of this queue pair completed (or was flushed).
  void signalled_done() {
    if (signals.empty()) return;
    completed = signals.front();
    signals.pop_front();
  }
};

// Sends a message on `link` now, or keeps a copy until there is room. Returns the wr_id
// when it went by reference (the caller must wait for it), 1 when it went or waits
// otherwise, 0 when the message cannot be sent at all.
// `next_waiting`: the message is the front of link.waiting, being sent now.
uint64_t transmit(Verbs& verbs, Link& link, std::span<const std::span<const std::byte>> pieces,
                  bool next_waiting = false);

// Posts what waits while there is room: messages here, writes through `post_write`
// (which returns false when one cannot be posted). false if something cannot be sent.
template <typename PostWrite>
bool flush_waiting(Verbs& verbs, Link& link, PostWrite&& post_write) {
  while (!link.waiting.empty() && link.room()) {
    Waiting w = std::move(link.waiting.front());
    link.waiting.pop_front();
    if (w.write) {
      if (!post_write(w)) return false;
      continue;
    }
    std::span<const std::byte> pieces[] = {w.bytes};
    if (transmit(verbs, link, pieces, /*next_waiting=*/true) == 0) return false;
  }
  return true;
}

// A server's link, which only ever holds messages.
bool flush_waiting(Verbs& verbs, Link& link);

uint32_t random_psn();

// Reads exactly sizeof(Hello) bytes that have arrived so far into *buf; true when whole.
// false with *failed on EOF or error.
bool read_hello(int fd, std::vector<std::byte>* buf, bool* failed);

bool write_all(int fd, const void* data, size_t bytes);

bool hello_ok(const Hello& h);

}  // namespace ramkv::rdma::internal
