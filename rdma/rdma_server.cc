// The RDMA transport's server side (rdma_transport.h): accepts connection requests over
// TCP, serves RPCs arriving on its queue pairs' shared receive queue, sends replies, and
// exposes memory for one-sided writes.
#include "rdma/verbs_link.h"

#include "common/acceptor.h"

namespace ramkv::rdma {

namespace {

using namespace internal;

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
    auto fd = listen_tcp(text, &locator_);
    if (!fd.ok()) return fd.status();
    listen_fd_ = *fd;
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
        } else if (std::find(task_fds.begin(), task_fds.end(), fd) != task_fds.end()) {
          for (LoopTask* task : tasks_) {
            if (task->wait_fd() == fd) task->on_wait_fd_ready();
          }
        } else if (fd == stop_fd_) {
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
      int fd = acceptor_.accept(listen_fd_);
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
  Acceptor acceptor_;
  std::string locator_;
  std::atomic<bool> stopping_{false};
  std::unordered_map<int, Handshake> handshakes_;
  std::unordered_map<uint32_t, Conn> by_qp_;
  std::unordered_map<int, uint32_t> by_fd_;
  std::deque<ibv_wc> stashed_;
  uint64_t next_serial_ = 0;
  std::vector<LoopTask*> tasks_;
};

}  // namespace

Result<std::unique_ptr<ServerTransport>> make_rdma_server_transport(const TransportOptions& options,
                                                                    const RdmaOptions& rdma,
                                                                    std::string* why) {
  auto verbs = Verbs::open(rdma, why);
  if (!verbs.ok()) return verbs.status();
  return std::unique_ptr<ServerTransport>(
      new RdmaServerTransport(options, std::move(verbs).value()));
}

}  // namespace ramkv::rdma
