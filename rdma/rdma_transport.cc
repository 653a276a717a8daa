#include "rdma/rdma_transport.h"

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

#include "common/assert.h"
#include "common/clock.h"
#include "common/log.h"

namespace ramkv::rdma {

namespace {

constexpr size_t kHeaderBytes = sizeof(wire::MessageHeader);
constexpr uint32_t kHelloMagic = 0x52444d41;  // "AMDR": an RDMA connection request
constexpr uint16_t kHelloVersion = 1;
constexpr uint32_t kSendQueueDepth = 256;
// One unsignalled send in this many is signalled, so the send queue's slots come back.
constexpr uint32_t kSignalEvery = 64;
constexpr int kMaxSge = 8;
constexpr int kPollBatch = 16;

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

std::string errno_text(int e) { return std::strerror(e); }

Result<sockaddr_in> resolve(const Locator& l) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(l.port);
  if (inet_pton(AF_INET, l.host.c_str(), &addr.sin_addr) == 1) return addr;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(l.host.c_str(), nullptr, &hints, &res) != 0 || res == nullptr) {
    return Status::kInvalidArgument;
  }
  addr.sin_addr = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr;
  freeaddrinfo(res);
  return addr;
}

// Memory aligned to a page: registration pins whole pages anyway.
struct PageFree {
  void operator()(std::byte* p) const { std::free(p); }
};
using PageBuffer = std::unique_ptr<std::byte, PageFree>;
PageBuffer page_alloc(size_t bytes) {
  const size_t page = 4096;
  void* p = std::aligned_alloc(page, (bytes + page - 1) / page * page);
  return PageBuffer(static_cast<std::byte*>(p));
}

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
                  bool next_waiting = false) {
  if (!link.room() || (!next_waiting && !link.waiting.empty())) {
    size_t total = 0;
    for (auto p : pieces) total += p.size();
    if (total > link.peer_max) return 0;
    Waiting m;
    m.bytes.reserve(total);
    for (auto p : pieces) m.bytes.insert(m.bytes.end(), p.begin(), p.end());
    link.waiting.push_back(std::move(m));
    return 1;
  }
  bool signalled = false;
  bool zero_copied = false;
  uint64_t id = verbs.send(link.qp, pieces, link.peer_max, link.by_reference, link.must_signal(),
                           &signalled, &zero_copied);
  if (id == 0) return 0;
  link.note_posted(signalled);
  return zero_copied ? id : 1;
}

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
bool flush_waiting(Verbs& verbs, Link& link) {
  return flush_waiting(verbs, link, [](const Waiting&) {
    RAMKV_CHECK_MSG(false, "a server link has no remote writes");
    return false;
  });
}

uint32_t random_psn() {
  static thread_local std::mt19937 rng{std::random_device{}()};
  return rng() & 0xffffff;
}

// Reads exactly sizeof(Hello) bytes that have arrived so far into *buf; true when whole.
// false with *failed on EOF or error.
bool read_hello(int fd, std::vector<std::byte>* buf, bool* failed) {
  while (buf->size() < sizeof(Hello)) {
    std::byte tmp[sizeof(Hello)];
    ssize_t n = ::read(fd, tmp, sizeof(Hello) - buf->size());
    if (n > 0) {
      buf->insert(buf->end(), tmp, tmp + n);
      continue;
    }
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) *failed = true;
    return false;
  }
  return true;
}

bool write_all(int fd, const void* data, size_t bytes) {
  const auto* p = static_cast<const std::byte*>(data);
  uint64_t deadline = SystemClock::instance().now_ns() + 1'000'000'000;
  while (bytes > 0) {
    ssize_t n = ::send(fd, p, bytes, MSG_NOSIGNAL);
    if (n > 0) {
      p += n;
      bytes -= static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) &&
        SystemClock::instance().now_ns() < deadline) {
      continue;  // 40 bytes into an empty socket buffer: does not happen in practice
    }
    return false;
  }
  return true;
}

bool hello_ok(const Hello& h) { return h.magic == kHelloMagic && h.version == kHelloVersion; }

// ---------------------------------------------------------------------------------------
class RdmaServerTransport final : public ServerTransport {
 public:
  RdmaServerTransport(const TransportOptions& o, std::unique_ptr<Verbs> verbs)
      : options_(o), verbs_(std::move(verbs)) {
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    stop_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  }
  ~RdmaServerTransport() override {
    for (auto& [qpn, c] : by_qp_) {
      ibv_destroy_qp(c.link.qp);
      ::close(c.fd);
    }
    for (auto& [fd, h] : handshakes_) ::close(fd);
    if (listen_fd_ >= 0) ::close(listen_fd_);
    ::close(stop_fd_);
    ::close(epoll_fd_);
  }

  Status listen(const std::string& text) override {
    auto loc = parse_locator(text);
    if (!loc.ok()) return loc.status();
    auto addr = resolve(*loc);
    if (!addr.ok()) return addr.status();
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&*addr), sizeof(*addr)) != 0 ||
        ::listen(listen_fd_, 1024) != 0) {
      LOG_ERROR("cannot listen on {}: {}", text, errno_text(errno));
      return Status::kIoError;
    }
    sockaddr_in bound{};
    socklen_t len = sizeof(bound);
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &len);
    locator_ = Locator{loc->host, ntohs(bound.sin_port)}.to_string();
    add(listen_fd_, EPOLLIN);
    add(stop_fd_, EPOLLIN);
    add(verbs_->channel_fd(), EPOLLIN);
    return Status::kOk;
  }

  std::string locator() const override { return locator_; }

  void stop() override {
    stopping_.store(true);
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(stop_fd_, &one, sizeof(one));
  }

  void add_loop_task(LoopTask* task) override { tasks_.push_back(task); }

  Status register_memory(std::span<const std::byte> memory) override {
    return verbs_->register_memory(memory);
  }

  Result<RemoteRegion> expose_memory(std::span<std::byte> memory) override {
    return verbs_->expose(memory);
  }

  void withdraw_memory(const RemoteRegion& region) override { verbs_->withdraw(region.key); }

  void run(const Handler& handler) override {
    epoll_event events[64];
    Reply reply;
    std::vector<int> task_fds;
    for (LoopTask* task : tasks_) {
      int fd = task->wait_fd();
      if (fd >= 0 && std::find(task_fds.begin(), task_fds.end(), fd) == task_fds.end()) {
        task_fds.push_back(fd);
        add(fd, EPOLLIN);
      }
    }
    uint64_t task_wait_ns = UINT64_MAX;
    while (!stopping_.load(std::memory_order_relaxed)) {
      int timeout_ms = -1;
      if (options_.busy_poll || !stashed_.empty()) {
        timeout_ms = 0;
      } else if (task_wait_ns != UINT64_MAX) {
        timeout_ms = static_cast<int>(std::min<uint64_t>(
            task_wait_ns / 1'000'000 + (task_wait_ns % 1'000'000 != 0), INT_MAX));
      }
      int n = epoll_wait(epoll_fd_, events, 64, timeout_ms);
      if (n < 0 && errno != EINTR) {
        LOG_ERROR("epoll_wait: {}", errno_text(errno));
        return;
      }
      // Completions a zero-copy reply's wait set aside are handled now.
      bool cq_event = options_.busy_poll || !stashed_.empty();
      bool channel_event = false;
      for (int i = 0; i < n; ++i) {
        int fd = events[i].data.fd;
        if (fd == listen_fd_) {
          accept_all();
        } else if (fd == verbs_->channel_fd()) {
          cq_event = true;
          channel_event = true;
        } else if (fd == stop_fd_ ||
                   std::find(task_fds.begin(), task_fds.end(), fd) != task_fds.end()) {
          continue;
        } else if (handshakes_.count(fd) != 0) {
          handshake(fd);
        } else if (auto it = by_fd_.find(fd); it != by_fd_.end()) {
          // The peer's TCP connection closed (or sent something it should not): it is gone.
          close_qp(it->second, "peer closed its connection");
        }
      }
      if (cq_event) {
        if (channel_event) verbs_->take_channel_events();
        drain(handler, reply);
      }
      task_wait_ns = UINT64_MAX;
      for (LoopTask* task : tasks_) task_wait_ns = std::min(task_wait_ns, task->run());
    }
    for (int fd : task_fds) epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
  }

  bool send_deferred(const ReplyToken& token, const Reply& reply) override {
    auto it = by_qp_.find(static_cast<uint32_t>(token.connection));
    if (it == by_qp_.end() || it->second.serial != token.serial) return false;
    return send_reply(it->second, token.request, reply);
  }

 private:
  struct Conn {
    Link link;
    int fd = -1;  // the TCP connection the queue pair was set up on
    uint64_t serial = 0;
  };
  struct Handshake {
    std::vector<std::byte> in;
  };

  void add(int fd, uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = fd;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
  }

  void accept_all() {
    while (true) {
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      if (by_qp_.size() + handshakes_.size() >= options_.max_connections) {
        LOG_WARNING("refusing a connection: already {} open", by_qp_.size());
        ::close(fd);
        continue;
      }
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      handshakes_[fd] = {};
      add(fd, EPOLLIN | EPOLLRDHUP);
    }
  }

  void drop_handshake(int fd, const char* why) {
    LOG_DEBUG("rdma: dropping a connection request: {}", why);
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
    ::close(fd);
    handshakes_.erase(fd);
  }

  void handshake(int fd) {
    Handshake& h = handshakes_[fd];
    bool failed = false;
    if (!read_hello(fd, &h.in, &failed)) {
      if (failed) drop_handshake(fd, "closed before its hello");
      return;
    }
    Hello remote;
    std::memcpy(&remote, h.in.data(), sizeof(remote));
    if (!hello_ok(remote)) {
      LOG_WARNING("rdma: a connection request with a bad hello: closing it");
      return drop_handshake(fd, "bad hello");
    }
    std::string why;
    ibv_qp* qp = verbs_->create_qp(&why);
    const uint32_t psn = random_psn();
    Hello mine;
    if (qp != nullptr) {
      mine = verbs_->hello(qp, psn);
      if (verbs_->connect(qp, psn, remote, &why) != Status::kOk) {
        ibv_destroy_qp(qp);
        qp = nullptr;
      }
    }
    if (qp == nullptr) mine.status = static_cast<uint32_t>(Status::kUnavailable);
    const bool sent = write_all(fd, &mine, sizeof(mine));
    handshakes_.erase(fd);
    if (qp == nullptr || !sent) {
      if (qp != nullptr) ibv_destroy_qp(qp);
      epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
      ::close(fd);
      return;
    }
    Conn& c = by_qp_[qp->qp_num];
    c.link.qp = qp;
    c.link.peer_max = remote.max_message_bytes;
    c.link.by_reference = true;
    c.fd = fd;
    c.serial = ++next_serial_;
    by_fd_[fd] = qp->qp_num;
    LOG_DEBUG("rdma: queue pair {} connected to peer QP {}", qp->qp_num, remote.qp_num);
  }

  void close_qp(uint32_t qp_num, const char* why) {
    auto it = by_qp_.find(qp_num);
    if (it == by_qp_.end()) return;
    LOG_DEBUG("rdma: closing queue pair {}: {}", qp_num, why);
    ibv_destroy_qp(it->second.link.qp);
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, it->second.fd, nullptr);
    ::close(it->second.fd);
    by_fd_.erase(it->second.fd);
    by_qp_.erase(it);
  }

  // Handles every completion there is.
  void drain(const Handler& handler, Reply& reply) {
    ibv_wc wc[kPollBatch];
    while (true) {
      int n = 0;
      if (!stashed_.empty()) {
        n = static_cast<int>(std::min<size_t>(stashed_.size(), kPollBatch));
        std::copy_n(stashed_.begin(), n, wc);
        stashed_.erase(stashed_.begin(), stashed_.begin() + n);
      } else {
        n = verbs_->poll(wc, kPollBatch);
      }
      if (n <= 0) return;
      for (int i = 0; i < n; ++i) complete(wc[i], handler, reply);
    }
  }

  void complete(const ibv_wc& wc, const Handler& handler, Reply& reply) {
    if (wc.opcode & IBV_WC_RECV) {
      if (wc.status != IBV_WC_SUCCESS) {
        // Flushed from a queue pair in error: the buffer is free again.
        verbs_->post_recv(wc.wr_id);
        if (wc.status != IBV_WC_WR_FLUSH_ERR) close_qp(wc.qp_num, ibv_wc_status_str(wc.status));
        return;
      }
      serve(wc, handler, reply);
      verbs_->post_recv(wc.wr_id);
      return;
    }
    if ((wc.wr_id & Verbs::kKindMask) != Verbs::kSendUnbuffered) verbs_->release_send(wc.wr_id);
    if (wc.status != IBV_WC_SUCCESS) {
      if (wc.status != IBV_WC_WR_FLUSH_ERR) {
        LOG_WARNING("rdma: a reply on queue pair {} failed: {}", wc.qp_num,
                    ibv_wc_status_str(wc.status));
      }
      return close_qp(wc.qp_num, ibv_wc_status_str(wc.status));
    }
    sent(wc.qp_num);
  }

  // A signalled send of `qp_num` completed: room for waiting replies.
  void sent(uint32_t qp_num) {
    auto it = by_qp_.find(qp_num);
    if (it == by_qp_.end()) return;
    it->second.link.signalled_done();
    if (!flush_waiting(*verbs_, it->second.link)) close_qp(qp_num, "send failed");
  }

  void serve(const ibv_wc& wc, const Handler& handler, Reply& reply) {
    auto it = by_qp_.find(wc.qp_num);
    if (it == by_qp_.end()) return;  // a late message for a queue pair closed since
    auto bytes = verbs_->recv_bytes(wc.wr_id, wc.byte_len);
    wire::MessageHeader h;
    if (bytes.size() < kHeaderBytes) return close_qp(wc.qp_num, "short message");
    std::memcpy(&h, bytes.data(), kHeaderBytes);
    if (wire::check_header(h) != Status::kOk || kHeaderBytes + h.body_bytes != bytes.size()) {
      LOG_WARNING("closing an RDMA connection that sent a malformed message header");
      return close_qp(wc.qp_num, "malformed header");
    }
    if (h.flags & wire::kFlagResponse) return;
    reply.clear();
    reply.set_token(
        {.connection = static_cast<int>(wc.qp_num), .serial = it->second.serial, .request = h});
    if (!wire::opcode_known(h.opcode)) {
      reply.set_status(Status::kBadRequest);
    } else {
      handler(h, bytes.subspan(kHeaderBytes), reply);
    }
    if (reply.deferred()) return;
    // The handler may have closed nothing, but look the connection up again anyway.
    auto again = by_qp_.find(wc.qp_num);
    if (again != by_qp_.end()) send_reply(again->second, h, reply);
  }

  bool send_reply(Conn& c, const wire::MessageHeader& h, const Reply& reply) {
    wire::MessageHeader rh = h;
    rh.flags = wire::kFlagResponse;
    rh.status = static_cast<uint16_t>(reply.status());
    rh.body_bytes = static_cast<uint32_t>(reply.total_bytes());
    std::vector<std::span<const std::byte>> pieces;
    pieces.reserve(2 + reply.external().size());
    pieces.push_back({reinterpret_cast<const std::byte*>(&rh), kHeaderBytes});
    pieces.push_back({reply.body().data(), reply.body().size()});
    for (auto p : reply.external()) pieces.push_back(p);
    const uint32_t qp_num = c.link.qp->qp_num;
    uint64_t id = transmit(*verbs_, c.link, pieces);
    if (id == 0) {
      close_qp(qp_num, "send failed");
      return false;
    }
    if (id != 1) wait_for_send(qp_num, id);
    return true;
  }

  // Polls until send `id` has completed, keeping other completions for drain(): the
  // pieces it sent by reference may change once the handler's caller returns.
  void wait_for_send(uint32_t qp_num, uint64_t id) {
    const uint64_t deadline = SystemClock::instance().now_ns() + 10'000'000'000;
    ibv_wc wc[kPollBatch];
    while (SystemClock::instance().now_ns() < deadline) {
      int n = verbs_->poll(wc, kPollBatch);
      for (int i = 0; i < n; ++i) {
        if (!(wc[i].opcode & IBV_WC_RECV) && wc[i].wr_id == id && wc[i].qp_num == qp_num) {
          verbs_->release_send(id);
          if (wc[i].status != IBV_WC_SUCCESS) {
            close_qp(qp_num, "zero-copy reply failed");
          } else {
            sent(qp_num);
          }
          // The rest of this batch still has to be handled.
          for (int j = i + 1; j < n; ++j) stashed_.push_back(wc[j]);
          return;
        }
        stashed_.push_back(wc[i]);
      }
    }
    LOG_ERROR("rdma: a zero-copy reply did not complete in 10 s");
  }

  TransportOptions options_;
  std::unique_ptr<Verbs> verbs_;
  int epoll_fd_ = -1;
  int stop_fd_ = -1;
  int listen_fd_ = -1;
  std::string locator_;
  std::atomic<bool> stopping_{false};
  std::unordered_map<int, Handshake> handshakes_;
  std::unordered_map<uint32_t, Conn> by_qp_;
  std::unordered_map<int, uint32_t> by_fd_;
  std::deque<ibv_wc> stashed_;
  uint64_t next_serial_ = 0;
  std::vector<LoopTask*> tasks_;
};

// ---------------------------------------------------------------------------------------
class RdmaClientTransport final : public ClientTransport {
 public:
  RdmaClientTransport(const TransportOptions& o, std::unique_ptr<Verbs> verbs)
      : options_(o), verbs_(std::move(verbs)) {
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = verbs_->channel_fd();
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, verbs_->channel_fd(), &ev);
  }
  ~RdmaClientTransport() override {
    for (auto& [loc, s] : sessions_) {
      if (s.link.qp != nullptr) ibv_destroy_qp(s.link.qp);
      ::close(s.fd);
    }
    ::close(epoll_fd_);
  }

  void send(const std::string& locator, const Request& request, std::span<const std::byte> body,
            Callback callback) override {
    uint64_t id = next_request_id_++;
    uint64_t now = clock_.now_ns();
    uint64_t deadline =
        request.timeout_ns > UINT64_MAX - now ? UINT64_MAX : now + request.timeout_ns;
    Session* s = session(locator);
    if (s == nullptr) {
      failed_.push_back(Failed::request(std::move(callback), Status::kUnavailable));
      return;
    }
    wire::MessageHeader h;
    h.opcode = static_cast<uint16_t>(request.opcode);
    h.request_id = id;
    h.body_bytes = static_cast<uint32_t>(body.size());
    h.client_id = request.client_id;
    h.rpc_seq = request.rpc_seq;
    h.ack_seq = request.ack_seq;
    s->pending[id] = {std::move(callback), deadline};
    if (s->state != State::kReady) {
      // Sent once the queue pair is up, in order with the writes that wait too.
      Waiting m;
      m.bytes.resize(kHeaderBytes + body.size());
      std::memcpy(m.bytes.data(), &h, kHeaderBytes);
      if (!body.empty()) std::memcpy(m.bytes.data() + kHeaderBytes, body.data(), body.size());
      s->link.waiting.push_back(std::move(m));
      return;
    }
    std::span<const std::byte> pieces[] = {{reinterpret_cast<const std::byte*>(&h), kHeaderBytes},
                                           body};
    if (!post(*s, pieces)) fail_session(locator, Status::kUnavailable);
  }

  bool one_sided() const override { return true; }

  Status register_memory(std::span<const std::byte> memory) override {
    return verbs_->register_memory(memory);
  }

  void write_remote(const std::string& locator, std::span<const RemoteWrite> writes,
                    uint64_t timeout_ns, WriteCallback done) override {
    // Empty writes move nothing: the call is done once its last non-empty write is.
    size_t last = writes.size();
    for (size_t i = 0; i < writes.size(); ++i) {
      if (!writes[i].bytes.empty()) last = i;
    }
    if (last == writes.size()) {
      failed_.push_back(Failed::write(std::move(done), Status::kOk));
      return;
    }
    const uint64_t now = clock_.now_ns();
    const uint64_t deadline = timeout_ns > UINT64_MAX - now ? UINT64_MAX : now + timeout_ns;
    Session* s = session(locator);
    if (s == nullptr) {
      failed_.push_back(Failed::write(std::move(done), Status::kUnavailable));
      return;
    }
    const uint64_t call = next_write_call_++;
    s->writes[call] = {std::move(done), deadline};
    for (size_t i = 0; i <= last; ++i) {
      const RemoteWrite& w = writes[i];
      if (w.bytes.empty()) continue;
      Waiting item;
      item.write = true;
      item.remote_address = w.address;
      item.key = w.key;
      item.call = i == last ? call : 0;
      // Posted now when nothing waits before it and there is room; otherwise kept, in
      // order with the messages, by reference when in registered memory, else copied.
      if (s->state == State::kReady && s->link.waiting.empty() && s->link.room()) {
        item.ref = w.bytes;
        if (!post_write(*s, item)) {
          fail_session(locator, Status::kUnavailable);
          return;
        }
        continue;
      }
      if (verbs_->by_reference(w.bytes)) {
        item.ref = w.bytes;
      } else {
        item.bytes.assign(w.bytes.begin(), w.bytes.end());
      }
      s->link.waiting.push_back(std::move(item));
    }
  }

  int poll(uint64_t timeout_ns) override {
    int done = run_failed();
    if (done > 0) timeout_ns = 0;
    done += drain();
    if (done > 0) timeout_ns = 0;
    uint64_t now = clock_.now_ns();
    uint64_t wait_ns = timeout_ns;
    for (auto& [loc, s] : sessions_) {
      for (auto& [id, p] : s.pending) {
        wait_ns = std::min(wait_ns, p.deadline > now ? p.deadline - now : 0);
      }
      for (auto& [call, w] : s.writes) {
        wait_ns = std::min(wait_ns, w.deadline > now ? w.deadline - now : 0);
      }
      if (s.state != State::kReady) {
        wait_ns = std::min(wait_ns, s.connect_deadline > now ? s.connect_deadline - now : 0);
      }
    }
    uint64_t wait_ms = std::min<uint64_t>(wait_ns / 1'000'000 + (wait_ns % 1'000'000 != 0),
                                          static_cast<uint64_t>(INT_MAX));
    int timeout_ms = options_.busy_poll ? 0 : static_cast<int>(wait_ms);
    epoll_event events[64];
    int n = epoll_wait(epoll_fd_, events, 64, timeout_ms);
    bool cq_event = options_.busy_poll;
    bool channel_event = false;
    for (int i = 0; i < n; ++i) {
      int fd = events[i].data.fd;
      if (fd == verbs_->channel_fd()) {
        cq_event = true;
        channel_event = true;
        continue;
      }
      auto it = by_fd_.find(fd);
      if (it == by_fd_.end()) continue;
      done += handle_tcp(it->second, events[i].events);
    }
    if (cq_event) {
      if (channel_event) verbs_->take_channel_events();
      done += drain();
    }
    done += expire();
    return done;
  }

  int wait_fd() const override { return epoll_fd_; }

  size_t outstanding() const override {
    size_t n = failed_.size();
    for (const auto& [loc, s] : sessions_) n += s.pending.size() + s.writes.size();
    return n;
  }

  void disconnect(const std::string& locator) override {
    fail_session(locator, Status::kUnavailable);
  }

 private:
  enum class State { kConnecting, kHelloSent, kReady };
  struct Pending {
    Callback callback;
    uint64_t deadline = 0;
  };
  // A write_remote() call not yet done.
  struct PendingWrite {
    WriteCallback done;
    uint64_t deadline = 0;
  };
  struct Session {
    int fd = -1;
    Link link;  // its `waiting` also holds what is sent once the queue pair is up
    uint32_t psn = 0;
    State state = State::kConnecting;
    uint64_t epoch = 0;
    uint64_t connect_deadline = 0;
    std::vector<std::byte> hello_in;
    std::map<uint64_t, Pending> pending;
    std::map<uint64_t, PendingWrite> writes;  // by call id
  };
  // A signalled RDMA WRITE in flight (wr_id Verbs::kRemoteWrite | serial).
  struct WriteWr {
    uint64_t epoch = 0;   // of the session whose queue pair it is on
    uint64_t buffer = 0;  // the send buffer it reads from (a Verbs send id), or 0
    uint64_t call = 0;    // the write_remote() call its completion finishes, or 0
  };
  // A callback that runs from the next poll(): a request's (callback) or a write's.
  struct Failed {
    Callback callback;
    WriteCallback write_done;
    Status status = Status::kOk;

    static Failed request(Callback cb, Status s) {
      Failed f;
      f.callback = std::move(cb);
      f.status = s;
      return f;
    }
    static Failed write(WriteCallback done, Status s) {
      Failed f;
      f.write_done = std::move(done);
      f.status = s;
      return f;
    }
  };

  Session* session(const std::string& locator) {
    auto it = sessions_.find(locator);
    if (it != sessions_.end()) return &it->second;
    auto loc = parse_locator(locator);
    if (!loc.ok()) return nullptr;
    auto addr = resolve(*loc);
    if (!addr.ok()) return nullptr;
    std::string why;
    ibv_qp* qp = verbs_->create_qp(&why);
    if (qp == nullptr) return nullptr;
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      ibv_destroy_qp(qp);
      return nullptr;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&*addr), sizeof(*addr));
    if (rc != 0 && errno != EINPROGRESS) {
      ::close(fd);
      ibv_destroy_qp(qp);
      return nullptr;
    }
    Session& s = sessions_[locator];
    s.fd = fd;
    s.link.qp = qp;
    s.psn = random_psn();
    s.epoch = ++session_epoch_;
    s.connect_deadline = clock_.now_ns() + verbs_->options().connect_timeout_ns;
    by_fd_[fd] = locator;
    by_qp_[qp->qp_num] = locator;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP;
    ev.data.fd = fd;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
    return &s;
  }

  // `locator` is a copy: fail_session() erases the map entry it may come from.
  int handle_tcp(const std::string locator, uint32_t events) {
    Session& s = sessions_[locator];
    if (events & EPOLLERR) {
      fail_session(locator, Status::kUnavailable);
      return run_failed();
    }
    if (s.state == State::kConnecting && (events & EPOLLOUT)) {
      Hello mine = verbs_->hello(s.link.qp, s.psn);
      if (!write_all(s.fd, &mine, sizeof(mine))) {
        fail_session(locator, Status::kUnavailable);
        return run_failed();
      }
      s.state = State::kHelloSent;
      epoll_event ev{};
      ev.events = EPOLLIN | EPOLLRDHUP;
      ev.data.fd = s.fd;
      epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, s.fd, &ev);
    }
    if (!(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP))) return 0;
    if (s.state == State::kReady) {
      // After set-up the TCP connection carries nothing: readable means closed.
      fail_session(locator, Status::kUnavailable);
      return run_failed();
    }
    if (s.state != State::kHelloSent) return 0;
    bool failed = false;
    if (!read_hello(s.fd, &s.hello_in, &failed)) {
      if (failed) {
        fail_session(locator, Status::kUnavailable);
        return run_failed();
      }
      return 0;
    }
    Hello remote;
    std::memcpy(&remote, s.hello_in.data(), sizeof(remote));
    std::string why;
    if (!hello_ok(remote) || remote.status != 0 ||
        verbs_->connect(s.link.qp, s.psn, remote, &why) != Status::kOk) {
      LOG_WARNING("rdma: cannot connect to {}: {}", locator,
                  why.empty() ? std::string("the server refused") : why);
      fail_session(locator, Status::kUnavailable);
      return run_failed();
    }
    s.state = State::kReady;
    s.link.peer_max = remote.max_message_bytes;
    if (!flush(s)) {
      fail_session(locator, Status::kUnavailable);
      return run_failed();
    }
    return 0;
  }

  bool post(Session& s, std::span<const std::span<const std::byte>> pieces) {
    // Never by reference (Link::by_reference is false): the body need not outlive send().
    return transmit(*verbs_, s.link, pieces) != 0;
  }

  // Posts what waits on the session's link while there is room.
  bool flush(Session& s) {
    return flush_waiting(*verbs_, s.link, [&](const Waiting& w) { return post_write(s, w); });
  }

  // Posts one RDMA WRITE of `w` on the session's queue pair, which must have room.
  // Signalled when it finishes a call, holds a send buffer, or the link asks for it.
  bool post_write(Session& s, const Waiting& w) {
    const uint64_t serial = ++write_serial_ & ~Verbs::kKindMask;
    bool signalled = false;
    uint64_t buffer = 0;
    if (!verbs_->write(s.link.qp, w.write_bytes(), w.remote_address, w.key,
                       w.call != 0 || s.link.must_signal(), Verbs::kRemoteWrite | serial,
                       &signalled, &buffer)) {
      return false;
    }
    s.link.note_posted(signalled);
    if (signalled) write_wrs_[serial] = {.epoch = s.epoch, .buffer = buffer, .call = w.call};
    return true;
  }

  // A signalled RDMA WRITE completed (or was flushed).
  int write_completed(const ibv_wc& wc) {
    auto it = write_wrs_.find(wc.wr_id & ~Verbs::kKindMask);
    // Not there: its session failed, which released what it held.
    if (it == write_wrs_.end()) return 0;
    const WriteWr wr = it->second;
    write_wrs_.erase(it);
    // Completed, even in error: the adapter is done with the buffer.
    if (wr.buffer != 0) verbs_->release_send(wr.buffer);
    if (wc.status != IBV_WC_SUCCESS) {
      // A bad key or bounds (IBV_WC_REM_ACCESS_ERR), or a peer gone: the queue pair is in
      // the error state, the session fails with its requests and writes.
      if (wc.status != IBV_WC_WR_FLUSH_ERR) {
        LOG_WARNING("rdma: a remote write on queue pair {} failed: {}", wc.qp_num,
                    ibv_wc_status_str(wc.status));
      }
      fail_qp(wc.qp_num, wc.status);
      return 0;
    }
    auto q = by_qp_.find(wc.qp_num);
    if (q == by_qp_.end()) return 0;
    const std::string locator = q->second;
    Session& s = sessions_[locator];
    if (s.epoch != wr.epoch) return 0;
    s.link.signalled_done();
    WriteCallback done;
    if (wr.call != 0) {
      // RC completes in order: every write of the call before this one is done too.
      if (auto w = s.writes.find(wr.call); w != s.writes.end()) {
        done = std::move(w->second.done);
        s.writes.erase(w);
      }
    }
    if (!flush(s)) fail_session(locator, Status::kUnavailable);
    // Last: `done` may send, write or disconnect.
    if (!done) return 0;
    done(Status::kOk);
    return 1;
  }

  int drain() {
    int done = 0;
    ibv_wc wc[kPollBatch];
    while (true) {
      int n = verbs_->poll(wc, kPollBatch);
      if (n <= 0) break;
      for (int i = 0; i < n; ++i) done += complete(wc[i]);
    }
    return done + run_failed();
  }

  int complete(const ibv_wc& wc) {
    if (!(wc.opcode & IBV_WC_RECV)) {
      const uint64_t kind = wc.wr_id & Verbs::kKindMask;
      if (kind == Verbs::kRemoteWrite) return write_completed(wc);
      if (kind != Verbs::kSendUnbuffered) verbs_->release_send(wc.wr_id);
      if (wc.status != IBV_WC_SUCCESS) {
        fail_qp(wc.qp_num, wc.status);
        return 0;
      }
      if (auto it = by_qp_.find(wc.qp_num); it != by_qp_.end()) {
        const std::string locator = it->second;
        Session& s = sessions_[locator];
        s.link.signalled_done();
        if (!flush(s)) fail_session(locator, Status::kUnavailable);
      }
      return 0;
    }
    if (wc.status != IBV_WC_SUCCESS) {
      verbs_->post_recv(wc.wr_id);
      if (wc.status != IBV_WC_WR_FLUSH_ERR) fail_qp(wc.qp_num, wc.status);
      return 0;
    }
    int done = 0;
    auto loc = by_qp_.find(wc.qp_num);
    if (loc != by_qp_.end()) {
      const std::string locator = loc->second;
      auto bytes = verbs_->recv_bytes(wc.wr_id, wc.byte_len);
      wire::MessageHeader h;
      if (bytes.size() < kHeaderBytes) {
        fail_session(locator, Status::kUnavailable);
      } else {
        std::memcpy(&h, bytes.data(), kHeaderBytes);
        if (wire::check_header(h) != Status::kOk || kHeaderBytes + h.body_bytes != bytes.size()) {
          LOG_WARNING("malformed response from {}: closing the session", locator);
          fail_session(locator, Status::kUnavailable);
        } else {
          Session& s = sessions_[locator];
          auto it = s.pending.find(h.request_id);
          if (it != s.pending.end()) {
            Callback cb = std::move(it->second.callback);
            s.pending.erase(it);
            cb(Status::kOk, h, bytes.subspan(kHeaderBytes));
            ++done;
          }
        }
      }
    }
    verbs_->post_recv(wc.wr_id);
    return done;
  }

  void fail_qp(uint32_t qp_num, ibv_wc_status status) {
    auto it = by_qp_.find(qp_num);
    if (it == by_qp_.end()) return;
    LOG_DEBUG("rdma: session to {} failed: {}", it->second, ibv_wc_status_str(status));
    fail_session(std::string(it->second), Status::kUnavailable);
  }

  void fail_session(const std::string& locator, Status status) {
    auto it = sessions_.find(locator);
    if (it == sessions_.end()) return;
    Session& s = it->second;
    for (auto& [id, p] : s.pending) {
      failed_.push_back(Failed::request(std::move(p.callback), status));
    }
    for (auto& [call, w] : s.writes) {
      failed_.push_back(Failed::write(std::move(w.done), status));
    }
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, s.fd, nullptr);
    ::close(s.fd);
    by_fd_.erase(s.fd);
    if (s.link.qp != nullptr) {
      by_qp_.erase(s.link.qp->qp_num);
      // Completions of this queue pair still in the CQ name a QP number that no longer
      // maps to a session; their buffers are re-posted or released when polled.
      ibv_destroy_qp(s.link.qp);
    }
    // The adapter reads no more of this queue pair's writes once it is destroyed (not
    // before: a write in flight may still be reading its buffer): their buffers go back
    // now, and their late completions, if any, find nothing to release.
    for (auto w = write_wrs_.begin(); w != write_wrs_.end();) {
      if (w->second.epoch != s.epoch) {
        ++w;
        continue;
      }
      if (w->second.buffer != 0) verbs_->release_send(w->second.buffer);
      w = write_wrs_.erase(w);
    }
    sessions_.erase(it);
  }

  int run_failed() {
    int n = 0;
    while (!failed_.empty()) {
      Failed f = std::move(failed_.front());
      failed_.pop_front();
      if (f.write_done) {
        f.write_done(f.status);
      } else {
        f.callback(f.status, wire::MessageHeader{}, {});
      }
      ++n;
    }
    return n;
  }

  int expire() {
    uint64_t now = clock_.now_ns();
    std::vector<std::string> stuck;
    std::vector<std::string> late_writes;
    for (auto& [loc, s] : sessions_) {
      if (s.state != State::kReady && s.connect_deadline <= now) {
        stuck.push_back(loc);
        continue;
      }
      for (auto it = s.pending.begin(); it != s.pending.end();) {
        if (it->second.deadline <= now) {
          failed_.push_back(Failed::request(std::move(it->second.callback), Status::kTimeout));
          it = s.pending.erase(it);
        } else {
          ++it;
        }
      }
      // A late write cannot be taken back while the adapter may still read its bytes
      // (or write them into the server): the whole session goes, which stops it.
      bool late = false;
      for (auto it = s.writes.begin(); it != s.writes.end();) {
        if (it->second.deadline <= now) {
          failed_.push_back(Failed::write(std::move(it->second.done), Status::kTimeout));
          it = s.writes.erase(it);
          late = true;
        } else {
          ++it;
        }
      }
      if (late) late_writes.push_back(loc);
    }
    for (const auto& loc : stuck) {
      LOG_WARNING("rdma: no connection to {} after {} ms", loc,
                  verbs_->options().connect_timeout_ns / 1'000'000);
      fail_session(loc, Status::kUnavailable);
    }
    for (const auto& loc : late_writes) {
      LOG_WARNING("rdma: remote writes to {} timed out: closing the session", loc);
      fail_session(loc, Status::kUnavailable);
    }
    return run_failed();
  }

  TransportOptions options_;
  std::unique_ptr<Verbs> verbs_;
  const Clock& clock_ = SystemClock::instance();
  int epoll_fd_ = -1;
  uint64_t next_request_id_ = 1;
  uint64_t next_write_call_ = 1;
  uint64_t write_serial_ = 0;
  uint64_t session_epoch_ = 0;
  std::map<std::string, Session> sessions_;
  std::unordered_map<int, std::string> by_fd_;
  std::unordered_map<uint32_t, std::string> by_qp_;
  std::unordered_map<uint64_t, WriteWr> write_wrs_;  // by serial; at most a send queue per session
  std::deque<Failed> failed_;
};

// What make_client_transport() gives when the device cannot be opened: every request
// fails at once with kUnavailable.
class UnusableClientTransport final : public ClientTransport {
 public:
  void send(const std::string&, const Request&, std::span<const std::byte>,
            Callback callback) override {
    failed_.push_back(std::move(callback));
  }
  int poll(uint64_t) override {
    int n = 0;
    while (!failed_.empty()) {
      Callback cb = std::move(failed_.front());
      failed_.pop_front();
      cb(Status::kUnavailable, wire::MessageHeader{}, {});
      ++n;
    }
    return n;
  }
  size_t outstanding() const override { return failed_.size(); }
  void disconnect(const std::string&) override {}

 private:
  std::deque<Callback> failed_;
};

RdmaOptions g_rdma_options;  // set by use_rdma() at start, before threads

std::unique_ptr<ClientTransport> make_rdma_client(const TransportOptions& options) {
  RdmaOptions rdma = g_rdma_options;
  rdma.recv_buffers = rdma.client_recv_buffers;
  auto t = make_rdma_client_transport(options, rdma);
  if (t.ok()) return std::move(t).value();
  return std::make_unique<UnusableClientTransport>();
}

}  // namespace

void use_rdma(const RdmaOptions& rdma) {
  g_rdma_options = rdma;
  set_client_transport_name("rdma");
  set_client_transport_factory(&make_rdma_client);
}

bool rdma_built() { return true; }

std::string_view rdma_provider() {
#ifdef RAMKV_VERBS_EMULATED
  return "emulated verbs (rdma/emu)";
#else
  return "libibverbs";
#endif
}

Result<std::unique_ptr<ServerTransport>> make_rdma_server_transport(const TransportOptions& options,
                                                                    const RdmaOptions& rdma,
                                                                    std::string* why) {
  auto verbs = Verbs::open(rdma, why);
  if (!verbs.ok()) return verbs.status();
  return std::unique_ptr<ServerTransport>(
      new RdmaServerTransport(options, std::move(verbs).value()));
}

Result<std::unique_ptr<ClientTransport>> make_rdma_client_transport(const TransportOptions& options,
                                                                    const RdmaOptions& rdma,
                                                                    std::string* why) {
  auto verbs = Verbs::open(rdma, why);
  if (!verbs.ok()) return verbs.status();
  return std::unique_ptr<ClientTransport>(
      new RdmaClientTransport(options, std::move(verbs).value()));
}

}  // namespace ramkv::rdma
