// The emulated adapter's thread, LID and sockets (verbs emulation; see emu_nic.h).
#include <fcntl.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

#include "rdma/emu/emu_nic.h"

namespace ramkv::rdma::emu {
namespace {

constexpr uint64_t kListenId = 1;
constexpr uint64_t kKickId = 2;
constexpr uint16_t kMaxLid = 0xbfff;  // unicast LIDs
constexpr size_t kReadChunk = 256 * 1024;
constexpr int kSocketBufferBytes = 4 << 20;

std::string emulation_dir() {
  const char* env = std::getenv("RAMKV_VERBS_EMU_DIR");
  if (env != nullptr && env[0] != '\0') return env;
  return "/tmp/ramkv-verbs-emu-" + std::to_string(::getuid());
}

bool make_dirs(const std::string& path) {
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos != path.size() && path[pos] != '/') continue;
    const std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0700) != 0 && errno != EEXIST) return false;
  }
  return true;
}

std::string sock_path(const std::string& dir, uint16_t lid) {
  return dir + "/lid-" + std::to_string(lid) + ".sock";
}

bool fill_sockaddr(const std::string& path, sockaddr_un* addr) {
  std::memset(addr, 0, sizeof(*addr));
  addr->sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr->sun_path)) return false;
  std::memcpy(addr->sun_path, path.c_str(), path.size() + 1);
  return true;
}

void set_buffers(int fd) {
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &kSocketBufferBytes, sizeof(kSocketBufferBytes));
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &kSocketBufferBytes, sizeof(kSocketBufferBytes));
}

bool quiet_logs() {
  const char* level = std::getenv("RAMKV_LOG_LEVEL");
  return level != nullptr &&
         (std::strcmp(level, "warning") == 0 || std::strcmp(level, "error") == 0 ||
          std::strcmp(level, "silent") == 0);
}

// The process's Nic. Lock order: g_nic_mu, then Nic::mu_.
std::mutex g_nic_mu;
Nic* g_nic = nullptr;
std::once_flag g_atfork_once;

void atfork_prepare() {
  g_nic_mu.lock();
  if (g_nic != nullptr) g_nic->mu_.lock();
}

void atfork_parent() {
  if (g_nic != nullptr) g_nic->mu_.unlock();
  g_nic_mu.unlock();
}

}  // namespace

void emu_log(bool warning, const char* format, ...) {
  if (!warning && quiet_logs()) return;
  char line[512];
  int n = std::snprintf(line, sizeof(line), "verbs emulation: ");
  va_list args;
  va_start(args, format);
  n += std::vsnprintf(line + n, sizeof(line) - static_cast<size_t>(n), format, args);
  va_end(args);
  size_t bytes = std::min(static_cast<size_t>(n), sizeof(line) - 2);
  line[bytes++] = '\n';
  ssize_t ignored = ::write(STDERR_FILENO, line, bytes);
  (void)ignored;
}

// The child of a fork does not own the parent's adapter: it closes the inherited
// descriptors (so a peer still sees the parent's connections close when the parent
// dies) and forgets the Nic, so that its own ibv_open_device starts a fresh one.
void emu_atfork_child() {
  Nic* nic = g_nic;
  if (nic != nullptr) {
    for (auto& [id, conn] : nic->conns_) ::close(conn.fd);
    for (int fd : {nic->listen_fd_, nic->epoll_fd_, nic->kick_fd_, nic->lock_fd_}) {
      if (fd >= 0) ::close(fd);
    }
    nic->mu_.unlock();
    // The Nic object is abandoned (leaked): the parent's contexts are unusable here.
    g_nic = nullptr;
  }
  g_nic_mu.unlock();
}

Nic* Nic::acquire() {
  std::lock_guard<std::mutex> lock(g_nic_mu);
  if (g_nic == nullptr) g_nic = start();
  if (g_nic != nullptr) g_nic->context_count_++;
  return g_nic;
}

void Nic::release(Nic* nic) {
  std::lock_guard<std::mutex> lock(g_nic_mu);
  if (nic != g_nic || --nic->context_count_ > 0) return;
  nic->stop();
  delete nic;
  g_nic = nullptr;
}

Nic* Nic::start() {
  std::call_once(g_atfork_once,
                 [] { pthread_atfork(atfork_prepare, atfork_parent, emu_atfork_child); });
  auto nic = std::make_unique<Nic>();
  nic->dir_ = emulation_dir();
  if (!make_dirs(nic->dir_)) {
    const int err = errno;
    emu_log(true, "cannot create directory %s: %s", nic->dir_.c_str(), std::strerror(err));
    errno = err;
    return nullptr;
  }
  // Take the first free LID from a per-process starting point, so that a LID freed by
  // a process that just died is not handed out again at once.
  const uint16_t first = static_cast<uint16_t>(1 + (::getpid() % kMaxLid));
  for (uint32_t i = 0; i < kMaxLid && nic->lid_ == 0; ++i) {
    const auto lid = static_cast<uint16_t>(1 + (first - 1 + i) % kMaxLid);
    const std::string lock_path = nic->dir_ + "/lid-" + std::to_string(lid) + ".lock";
    const int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
      const int err = errno;
      emu_log(true, "cannot open %s: %s", lock_path.c_str(), std::strerror(err));
      errno = err;
      return nullptr;
    }
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
      nic->lid_ = lid;
      nic->lock_fd_ = fd;
    } else {
      ::close(fd);
    }
  }
  if (nic->lid_ == 0) {
    emu_log(true, "no free LID in %s", nic->dir_.c_str());
    errno = EADDRINUSE;
    return nullptr;
  }
  nic->sock_path_ = sock_path(nic->dir_, nic->lid_);
  sockaddr_un addr;
  if (!fill_sockaddr(nic->sock_path_, &addr)) {
    emu_log(true, "socket path too long: %s (set RAMKV_VERBS_EMU_DIR)", nic->sock_path_.c_str());
    ::close(nic->lock_fd_);
    errno = ENAMETOOLONG;
    return nullptr;
  }
  ::unlink(nic->sock_path_.c_str());  // a stale socket of a dead holder of this LID
  nic->listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  nic->epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  nic->kick_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (nic->listen_fd_ < 0 || nic->epoll_fd_ < 0 || nic->kick_fd_ < 0 ||
      ::bind(nic->listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(nic->listen_fd_, 512) != 0) {
    const int err = errno;
    emu_log(true, "cannot listen on %s: %s", nic->sock_path_.c_str(), std::strerror(err));
    for (int fd : {nic->listen_fd_, nic->epoll_fd_, nic->kick_fd_, nic->lock_fd_}) {
      if (fd >= 0) ::close(fd);
    }
    errno = err;
    return nullptr;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kListenId;
  ::epoll_ctl(nic->epoll_fd_, EPOLL_CTL_ADD, nic->listen_fd_, &ev);
  ev.data.u64 = kKickId;
  ::epoll_ctl(nic->epoll_fd_, EPOLL_CTL_ADD, nic->kick_fd_, &ev);

  std::random_device random;
  nic->next_qpn_ = (random() & 0x7fff) << 8;
  nic->next_key_ = random() | 1;

  Nic* raw = nic.release();
  raw->thread_ = std::thread([raw] { raw->run(); });
  {
    // Until the thread runs, it allocates outside mu_ (its start-up, and under ASan the
    // sanitizer's per-thread state); a fork() then would leave the child's allocator
    // locked. From now on the thread allocates only with mu_ held, which the fork
    // handlers take.
    std::unique_lock<std::mutex> lock(raw->mu_);
    raw->running_cv_.wait(lock, [raw] { return raw->running_; });
  }
  // Once per process (and again in a forked child): what this device really is.
  static pid_t announced_pid = 0;
  if (announced_pid != ::getpid()) {
    announced_pid = ::getpid();
    emu_log(false, "%s is an EMULATED RDMA device (no hardware): lid %u, pid %d, %s", kDeviceName,
            raw->lid_, static_cast<int>(::getpid()), raw->dir_.c_str());
  }
  return raw;
}

void Nic::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  kick();
  thread_.join();
  for (auto& [id, conn] : conns_) ::close(conn.fd);
  conns_.clear();
  dialled_.clear();
  ::unlink(sock_path_.c_str());  // before the lock goes: the LID is still ours
  for (int fd : {listen_fd_, epoll_fd_, kick_fd_, lock_fd_}) {
    if (fd >= 0) ::close(fd);
  }
}

void Nic::kick() {
  const uint64_t one = 1;
  ssize_t ignored = ::write(kick_fd_, &one, sizeof(one));
  (void)ignored;
}

void Nic::run() {
  std::unique_lock<std::mutex> lock(mu_);
  std::vector<epoll_event> events(64);
  running_ = true;
  running_cv_.notify_all();
  while (!stopping_) {
    int timeout_ms = -1;
    if (auto deadline = next_deadline()) {
      const auto wait = std::chrono::ceil<std::chrono::milliseconds>(*deadline - Clock::now());
      timeout_ms = static_cast<int>(std::max<int64_t>(0, wait.count()));
    }
    lock.unlock();
    const int n =
        ::epoll_wait(epoll_fd_, events.data(), static_cast<int>(events.size()), timeout_ms);
    lock.lock();
    for (int i = 0; i < n; ++i) {
      const uint64_t id = events[static_cast<size_t>(i)].data.u64;
      if (id == kListenId) {
        accept_all();
      } else if (id == kKickId) {
        uint64_t value;
        ssize_t ignored = ::read(kick_fd_, &value, sizeof(value));
        (void)ignored;
      } else {
        handle_conn_event(id, events[static_cast<size_t>(i)].events);
      }
    }
    fire_timers();
    // Transmit what application threads posted since.
    std::set<uint32_t> dirty;
    dirty.swap(dirty_);
    for (uint32_t qpn : dirty) {
      auto it = qps_.find(qpn);
      if (it != qps_.end()) pump(it->second);
    }
  }
}

void Nic::accept_all() {
  for (;;) {
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    set_buffers(fd);
    const uint64_t id = next_conn_id_++;
    Conn& conn = conns_[id];
    conn.id = id;
    conn.fd = fd;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u64 = id;
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
  }
}

int Nic::dial(uint16_t lid) {
  sockaddr_un addr;
  if (!fill_sockaddr(sock_path(dir_, lid), &addr)) return -1;
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  set_buffers(fd);
  // A Unix-domain connect completes at once or fails (no such LID, a dead holder's stale
  // socket, a full backlog); a failed attempt just loses the frame, like a packet to a
  // port that is down, and the requester's retry timer takes over.
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  const uint64_t id = next_conn_id_++;
  Conn& conn = conns_[id];
  conn.id = id;
  conn.fd = fd;
  conn.dialled = true;
  conn.peer_lid = lid;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP;  // only to learn that the peer went away
  ev.data.u64 = id;
  ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
  dialled_[lid] = id;
  std::vector<uint8_t> hello(sizeof(FrameHeader));
  FrameHeader h{};
  h.magic = kFrameMagic;
  h.version = kFrameVersion;
  h.type = static_cast<uint8_t>(FrameType::kHello);
  h.src_lid = lid_;
  std::memcpy(hello.data(), &h, sizeof(h));
  conn.out.push_back(std::move(hello));
  return 0;
}

void Nic::send_frame(uint16_t lid, std::vector<uint8_t> frame) {
  auto it = dialled_.find(lid);
  if (it == dialled_.end()) {
    if (dial(lid) != 0) return;
    it = dialled_.find(lid);
  }
  const uint64_t id = it->second;
  Conn& conn = conns_.at(id);
  conn.out.push_back(std::move(frame));
  if (!conn.want_out && !flush_conn(conn)) close_conn(id);
}

bool Nic::flush_conn(Conn& conn) {
  while (!conn.out.empty()) {
    iovec iov[16];
    int count = 0;
    size_t offset = conn.out_offset;
    for (auto& frame : conn.out) {
      if (count == 16) break;
      iov[count].iov_base = frame.data() + offset;
      iov[count].iov_len = frame.size() - offset;
      offset = 0;
      ++count;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(count);
    const ssize_t n = ::sendmsg(conn.fd, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return false;
      break;
    }
    auto left = static_cast<size_t>(n);
    while (left > 0) {
      const size_t rest = conn.out.front().size() - conn.out_offset;
      if (left >= rest) {
        left -= rest;
        conn.out.pop_front();
        conn.out_offset = 0;
      } else {
        conn.out_offset += left;
        left = 0;
      }
    }
  }
  const bool want_out = !conn.out.empty();
  if (want_out != conn.want_out) {
    conn.want_out = want_out;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP | (want_out ? EPOLLOUT : 0u);
    ev.data.u64 = conn.id;
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, conn.fd, &ev);
  }
  return true;
}

void Nic::close_conn(uint64_t id) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, it->second.fd, nullptr);
  ::close(it->second.fd);
  if (it->second.dialled) {
    // Frames still queued are lost with the link; requesters retransmit on timeout.
    auto d = dialled_.find(it->second.peer_lid);
    if (d != dialled_.end() && d->second == id) dialled_.erase(d);
  }
  conns_.erase(it);
}

void Nic::handle_conn_event(uint64_t id, uint32_t events) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  Conn& conn = it->second;
  bool ok = true;
  if ((events & EPOLLOUT) != 0) ok = flush_conn(conn);
  if (ok && (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0) ok = read_conn(conn);
  if (!ok) close_conn(id);
}

bool Nic::read_conn(Conn& conn) {
  for (;;) {
    // Make room for the rest of the current frame, or a chunk.
    size_t want = kReadChunk;
    if (conn.in_bytes >= sizeof(FrameHeader)) {
      FrameHeader h;
      std::memcpy(&h, conn.in.data(), sizeof(h));
      if (h.magic != kFrameMagic || h.version != kFrameVersion ||
          h.payload_bytes > kMaxMessageBytes) {
        emu_log(true, "dropping a connection that sent a malformed frame");
        return false;
      }
      want = std::max(want, sizeof(FrameHeader) + h.payload_bytes - conn.in_bytes);
    }
    if (conn.in.size() < conn.in_bytes + want) conn.in.resize(conn.in_bytes + want);
    const ssize_t n = ::read(conn.fd, conn.in.data() + conn.in_bytes, want);
    if (n == 0) return false;  // the peer closed (or died)
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno == EAGAIN || errno == EWOULDBLOCK;
    }
    conn.in_bytes += static_cast<size_t>(n);
    if (!parse_frames(conn)) return false;
    // The conn may have been read to the end; large buffers are given back.
    if (conn.in_bytes == 0 && conn.in.size() > 4 * kReadChunk) {
      conn.in.clear();
      conn.in.shrink_to_fit();
    }
  }
}

bool Nic::parse_frames(Conn& conn) {
  size_t pos = 0;
  while (conn.in_bytes - pos >= sizeof(FrameHeader)) {
    FrameHeader h;
    std::memcpy(&h, conn.in.data() + pos, sizeof(h));
    if (h.magic != kFrameMagic || h.version != kFrameVersion ||
        h.payload_bytes > kMaxMessageBytes) {
      emu_log(true, "dropping a connection that sent a malformed frame");
      return false;
    }
    const size_t frame_bytes = sizeof(FrameHeader) + h.payload_bytes;
    if (conn.in_bytes - pos < frame_bytes) break;
    if (!handle_frame(h, conn.in.data() + pos + sizeof(FrameHeader))) {
      emu_log(true, "dropping a connection that sent an invalid frame (type %u)", h.type);
      return false;
    }
    pos += frame_bytes;
  }
  if (pos > 0) {
    std::memmove(conn.in.data(), conn.in.data() + pos, conn.in_bytes - pos);
    conn.in_bytes -= pos;
  }
  return true;
}

bool Nic::handle_frame(const FrameHeader& h, const uint8_t* payload) {
  switch (static_cast<FrameType>(h.type)) {
    case FrameType::kHello:
      return h.payload_bytes == 0;
    case FrameType::kSend:
    case FrameType::kSendImm:
    case FrameType::kWrite:
    case FrameType::kWriteImm:
    case FrameType::kReadReq:
      on_request(h, payload);
      return true;
    case FrameType::kAck:
    case FrameType::kReadResp:
    case FrameType::kNak: {
      auto it = qps_.find(h.dst_qpn);
      Qp* qp = it == qps_.end() ? nullptr : it->second;
      // Responses for a QP that is gone, or from a peer it is not connected to, are
      // stale: drop them as hardware drops such packets.
      if (qp == nullptr || qp->ibv.state != IBV_QPS_RTS || h.src_qpn != qp->attr.dest_qp_num ||
          h.src_lid != qp->attr.ah_attr.dlid) {
        return true;
      }
      const auto type = static_cast<FrameType>(h.type);
      if (type == FrameType::kAck) {
        on_ack(qp, h.psn);
      } else if (type == FrameType::kReadResp) {
        on_read_resp(qp, h, payload);
      } else {
        on_nak(qp, h);
      }
      return true;
    }
  }
  return false;
}

std::optional<Clock::time_point> Nic::next_deadline() {
  std::optional<Clock::time_point> next;
  for (auto& [qpn, qp] : qps_) {
    for (const auto& d : {qp->ack_deadline, qp->rnr_deadline}) {
      if (d && (!next || *d < *next)) next = d;
    }
  }
  return next;
}

void Nic::fire_timers() {
  const auto now = Clock::now();
  std::vector<Qp*> due;
  for (auto& [qpn, qp] : qps_) {
    if ((qp->ack_deadline && *qp->ack_deadline <= now) ||
        (qp->rnr_deadline && *qp->rnr_deadline <= now)) {
      due.push_back(qp);
    }
  }
  for (Qp* qp : due) {
    if (qp->rnr_deadline && *qp->rnr_deadline <= now) {
      qp->rnr_deadline.reset();
      go_back(qp);
      continue;
    }
    qp->ack_deadline.reset();
    if (qp->retries_left == 0) {
      // Nobody answered retry_cnt + 1 times: the peer is gone (or its QP is).
      fail_head(qp, IBV_WC_RETRY_EXC_ERR);
      continue;
    }
    qp->retries_left--;
    go_back(qp);
  }
}

}  // namespace ramkv::rdma::emu
