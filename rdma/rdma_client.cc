// The RDMA transport's client side (rdma_transport.h): connects queue pairs to servers
// over TCP, sends requests and matches replies, and posts one-sided RDMA WRITEs.
#include "rdma/verbs_link.h"

namespace ramkv::rdma {

namespace {

using namespace internal;

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
    apply_tcp_congestion(fd);
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

Result<std::unique_ptr<ClientTransport>> make_rdma_client_transport(const TransportOptions& options,
                                                                    const RdmaOptions& rdma,
                                                                    std::string* why) {
  auto verbs = Verbs::open(rdma, why);
  if (!verbs.ok()) return verbs.status();
  return std::unique_ptr<ClientTransport>(
      new RdmaClientTransport(options, std::move(verbs).value()));
}

}  // namespace ramkv::rdma
