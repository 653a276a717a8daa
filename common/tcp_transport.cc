// TCP implementation of transport.h. Non-blocking sockets under epoll; every message is
// framed by wire::MessageHeader. A peer that breaks framing (bad magic, version or
// length) has its connection closed; the loop carries on with everyone else.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <unordered_map>
#include <utility>

#include "common/acceptor.h"
#include "common/assert.h"
#include "common/clock.h"
#include "common/log.h"
#include "common/prefault.h"
#include "common/transport.h"

namespace ramkv {

std::string Locator::to_string() const { return host + ":" + std::to_string(port); }

Result<Locator> parse_locator(std::string_view text) {
  size_t colon = text.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 >= text.size()) {
    return Status::kInvalidArgument;
  }
  Locator l;
  l.host = std::string(text.substr(0, colon));
  auto port_text = text.substr(colon + 1);
  unsigned port = 0;
  auto [ptr, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec != std::errc() || ptr != port_text.data() + port_text.size() || port > 65535) {
    return Status::kInvalidArgument;
  }
  l.port = static_cast<uint16_t>(port);
  return l;
}

size_t Reply::total_bytes() const {
  size_t n = body_.size();
  for (auto p : external_) n += p.size();
  return n;
}

namespace {

constexpr size_t kHeaderBytes = sizeof(wire::MessageHeader);
constexpr size_t kReadChunk = 64 * 1024;
// Pieces one sendmsg takes at most: a queued recovery data reply is thousands of runs.
constexpr size_t kMaxIov = 1024;
static_assert(kMaxIov <= IOV_MAX);
// Connection::fill stops reading once this much is buffered and holds a whole message.
constexpr size_t kParseBatchBytes = 256 * 1024;

void set_socket_options(int fd, const TransportOptions& o) {
  apply_tcp_congestion(fd);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  unsigned timeout = o.tcp_user_timeout_ms;
  setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &timeout, sizeof(timeout));
}

// Memory for a ByteQueue: plain new[] up to a huge page; past that, 2 MiB-aligned and
// asking for transparent huge pages. A connection that receives large messages (a
// recovery master's recovery data, megabytes per reply) grows its buffer once, into memory
// no one touched: on the virtual machines we measure on each 4 KiB page then costs a fault
// (about 9 us) and the kernel's first copy into it as much again (docs/recovery.md,
// "Where the time goes"); a huge page costs one fault per 2 MiB and no first-copy penalty.
class QueueMemory {
 public:
  static constexpr size_t kHugePage = kHugePageBytes;
  QueueMemory() = default;
  explicit QueueMemory(size_t bytes) : huge_(bytes >= kHugePage) {
    if (huge_) {
      bytes_ = (bytes + kHugePage - 1) / kHugePage * kHugePage;
      data_ = static_cast<std::byte*>(::operator new[](bytes_, std::align_val_t{kHugePage}));
      advise_huge_pages({data_, bytes_});  // advice: without it, 4 KiB pages
    } else {
      bytes_ = bytes;
      data_ = new std::byte[bytes];  // default-init: not zeroed
    }
  }
  ~QueueMemory() { release(); }
  QueueMemory(QueueMemory&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)),
        bytes_(std::exchange(o.bytes_, 0)),
        huge_(o.huge_) {}
  QueueMemory& operator=(QueueMemory&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
      huge_ = o.huge_;
    }
    return *this;
  }
  std::byte* get() const { return data_; }
  size_t size() const { return bytes_; }

 private:
  void release() {
    if (data_ == nullptr) return;
    if (huge_) {
      ::operator delete[](data_, std::align_val_t{kHugePage});
    } else {
      delete[] data_;
    }
    data_ = nullptr;
  }
  std::byte* data_ = nullptr;
  size_t bytes_ = 0;
  bool huge_ = false;
};

// Bytes with a consumed prefix, grown without zero-filling: std::vector::resize writes
// zeros over every new byte, which for a replicated 8 MiB segment cost as much as
// receiving it. Views into data() stay valid until the next reserve_tail().
class ByteQueue {
 public:
  size_t size() const { return end_ - start_; }
  bool empty() const { return end_ == start_; }
  const std::byte* data() const { return buf_.get() + start_; }
  // Room for `n` more bytes at the end (moving or reallocating what is held); returns
  // where they go. commit() says how many were written.
  std::byte* reserve_tail(size_t n) {
    if (buf_.size() - end_ < n) {
      const size_t held = size();
      if (start_ > 0 && buf_.size() - held >= n) {
        std::memmove(buf_.get(), buf_.get() + start_, held);
      } else {
        QueueMemory grown(std::max({held + n, buf_.size() * 2, kReadChunk}));
        if (held > 0) std::memcpy(grown.get(), buf_.get() + start_, held);
        buf_ = std::move(grown);
      }
      start_ = 0;
      end_ = held;
    }
    return buf_.get() + end_;
  }
  void commit(size_t n) { end_ += n; }
  // Keeps the first `n` bytes held, drops the rest.
  void truncate(size_t n) { end_ = start_ + std::min(n, size()); }
  void consume(size_t n) {
    start_ += n;
    if (start_ == end_) start_ = end_ = 0;
  }

 private:
  QueueMemory buf_;
  size_t start_ = 0;
  size_t end_ = 0;
};

// Bytes to send that the socket did not take at once, in chunks sent in order: appending
// never moves what is queued (a ByteQueue would move the unsent bytes to its front each
// time it runs out of room, which with megabytes of replication writes queued behind a
// slow reader cost more than sending them).
class OutQueue {
 public:
  size_t size() const { return bytes_; }
  bool empty() const { return bytes_ == 0; }
  // Copies `pieces` (in order) into one new chunk.
  void append(std::span<const std::span<const std::byte>> pieces) {
    size_t n = 0;
    for (auto p : pieces) n += p.size();
    if (n == 0) return;
    Chunk c;
    c.owned.reset(new std::byte[n]);  // not zero-filled
    c.data = c.owned.get();
    c.size = n;
    size_t at = 0;
    for (auto p : pieces) {
      if (p.empty()) continue;
      std::memcpy(c.owned.get() + at, p.data(), p.size());
      at += p.size();
    }
    chunks_.push_back(std::move(c));
    bytes_ += n;
  }
  // Queues `bytes` without copying them: `keep` holds them until they are sent.
  void append_shared(std::span<const std::byte> bytes, std::shared_ptr<const void> keep) {
    if (bytes.empty()) return;
    Chunk c;
    c.keep = std::move(keep);
    c.data = bytes.data();
    c.size = bytes.size();
    chunks_.push_back(std::move(c));
    bytes_ += bytes.size();
  }
  // Sends as much as the socket takes. false on error.
  bool flush(int fd) {
    while (!chunks_.empty()) {
      iovec iov[kMaxIov];
      size_t n = 0;
      for (auto it = chunks_.begin(); it != chunks_.end() && n < kMaxIov; ++it, ++n) {
        iov[n] = {const_cast<std::byte*>(it->data + it->sent), it->size - it->sent};
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = n;
      ssize_t w = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
      if (w < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
      auto left = static_cast<size_t>(w);
      bytes_ -= left;
      while (left > 0) {
        Chunk& front = chunks_.front();
        const size_t take = std::min(left, front.size - front.sent);
        front.sent += take;
        left -= take;
        if (front.sent == front.size) chunks_.pop_front();
      }
    }
    return true;
  }

 private:
  struct Chunk {
    std::unique_ptr<std::byte[]> owned;  // a copy, or
    std::shared_ptr<const void> keep;    // what keeps the caller's bytes
    const std::byte* data = nullptr;
    size_t size = 0;
    size_t sent = 0;
  };
  std::deque<Chunk> chunks_;
  size_t bytes_ = 0;
};

// A server's placer (ServerTransport::set_placer) with its limits.
struct PlacerConfig {
  size_t prefix_bytes = 0;
  size_t min_body_bytes = 0;
  size_t max_message_bytes = 0;
  ServerTransport::Placer placer;
};

// Bytes received but not yet parsed, and bytes to send that the socket did not take.
struct Connection {
  int fd = -1;
  uint64_t serial = 0;  // server: which accept this is (deferred replies check it)
  ByteQueue in;         // consumed as messages are parsed
  OutQueue out;
  bool want_write = false;
  bool want_read = true;   // server: false while the peer does not read its replies
  size_t whole_bytes = 0;  // bytes of `in` known to be whole messages (skip_complete)
  // Server connections of a transport with a placer: the rest of the last message's body
  // is received into `placing->rest` (then `in` ends with that message's prefix, and
  // nothing more is read until it has been handled).
  const PlacerConfig* placer = nullptr;
  struct Placing {
    std::span<std::byte> rest;
    size_t got = 0;  // bytes of `rest` received
    size_t prefix_bytes = 0;
    std::shared_ptr<void> keep;
    bool whole() const { return got == rest.size(); }
  };
  std::optional<Placing> placing;
  bool placer_asked = false;  // about the last, incomplete message of `in`

  // Appends whatever read() gives until EAGAIN, or until `max_buffered` bytes are held
  // (the rest stays in the socket; epoll is level-triggered, so it is read later). The
  // cap keeps a peer that sends faster than we parse from growing `in` without bound.
  // Views into messages parsed before are dead by now (handlers and callbacks ran to
  // completion), so the buffer may move. false on EOF or error.
  bool fill(size_t max_buffered) {
    while (in.size() < max_buffered) {
      if (placing) {
        // A placed body: straight into its memory; once whole, it is handled first.
        if (placing->whole()) return true;
        const size_t want = placing->rest.size() - placing->got;
        ssize_t n = ::read(fd, placing->rest.data() + placing->got, want);
        if (n > 0) {
          placing->got += static_cast<size_t>(n);
          if (placing->whole() || static_cast<size_t>(n) < want) return true;
          continue;
        }
        if (n == 0) return false;
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
      }
      // The rest of the last, incomplete message is read in one go when its header says
      // how much, into room reserved for all of it: sized from the first message instead,
      // reads went on in 64 KiB pieces past it, and the megabytes of a large message that
      // arrived behind it were moved to the front of the buffer once the first was parsed.
      size_t want = kReadChunk;
      const size_t incomplete = skip_complete();
      if (in.size() - incomplete >= kHeaderBytes) {
        wire::MessageHeader h;
        std::memcpy(&h, in.data() + incomplete, kHeaderBytes);
        const size_t whole = kHeaderBytes + size_t{h.body_bytes};
        const size_t have = in.size() - incomplete;
        if (placeable(h)) {
          const size_t asked_at = kHeaderBytes + placer->prefix_bytes;
          if (have < asked_at) {
            want = asked_at - have;  // only up to the prefix: the placer says where the rest goes
          } else {
            if (place(incomplete, h)) continue;
            if (whole > have) want = std::max(want, whole - have);
          }
        } else if (whole <= max_buffered && whole > have) {
          want = std::max(want, whole - have);
        }
      }
      std::byte* at = in.reserve_tail(want);
      ssize_t n = ::read(fd, at, want);
      if (n > 0) {
        in.commit(static_cast<size_t>(n));
        if (static_cast<size_t>(n) < want) return true;
        // Whole messages of a batch's worth are parsed before reading on, while their
        // bytes are still in the cache (epoll is level-triggered: the rest comes next).
        if (in.size() >= kParseBatchBytes && skip_complete() > 0) return true;
        continue;
      }
      if (n == 0) return false;
      return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
    }
    return true;
  }

  // Where the first message not wholly buffered begins (in.size() when every buffered
  // message is whole), from `whole_bytes`, which remembers how far earlier calls got.
  // Framing is not checked here (next() does), only lengths are followed.
  size_t skip_complete() {
    while (in.size() - whole_bytes >= kHeaderBytes) {
      wire::MessageHeader h;
      std::memcpy(&h, in.data() + whole_bytes, kHeaderBytes);
      const size_t whole = kHeaderBytes + size_t{h.body_bytes};
      if (in.size() - whole_bytes < whole) break;
      whole_bytes += whole;
      placer_asked = false;  // a new message is the last one
    }
    return whole_bytes;
  }

  // Whether the placer is to be asked about a message with this header (well framed: one
  // that is not goes to next(), which closes the connection).
  bool placeable(const wire::MessageHeader& h) const {
    return placer != nullptr && !placer_asked && !placing &&
           h.body_bytes >= placer->min_body_bytes && h.body_bytes > placer->prefix_bytes &&
           (h.flags & wire::kFlagResponse) == 0 && wire::check_header(h) == Status::kOk &&
           kHeaderBytes + size_t{h.body_bytes} <= placer->max_message_bytes;
  }

  // Asks the placer about the last message (at `at`, its prefix buffered); when it names
  // memory, moves the body bytes already read past the prefix there. Whether it did.
  bool place(size_t at, const wire::MessageHeader& h) {
    placer_asked = true;
    const size_t prefix = placer->prefix_bytes;
    const std::byte* start = in.data() + at + kHeaderBytes;
    Placement p = placer->placer(h, {start, prefix});
    if (p.rest.empty() || p.rest.size() != h.body_bytes - prefix) return false;
    const size_t extra = in.size() - at - kHeaderBytes - prefix;  // < the rest: incomplete
    if (extra > 0) std::memcpy(p.rest.data(), start + prefix, extra);
    in.truncate(at + kHeaderBytes + prefix);
    placing =
        Placing{.rest = p.rest, .got = extra, .prefix_bytes = prefix, .keep = std::move(p.keep)};
    return true;
  }

  // The next whole message, if one is buffered. kBadRequest when framing is broken. A
  // placed message comes with `body` its prefix and `placed` the rest (placing stays
  // until the caller has handled it and resets it).
  Status next(const TransportOptions& o, wire::MessageHeader* h, std::span<const std::byte>* body,
              std::span<const std::byte>* placed = nullptr) {
    if (in.size() < kHeaderBytes) return Status::kRetry;
    std::memcpy(h, in.data(), kHeaderBytes);
    if (wire::check_header(*h) != Status::kOk ||
        h->body_bytes + kHeaderBytes > o.max_message_bytes) {
      return Status::kBadRequest;
    }
    if (in.size() < kHeaderBytes + h->body_bytes) {
      // Every message before a placed one is whole: an incomplete first one is it.
      if (!placing || !placing->whole() || placed == nullptr) return Status::kRetry;
      RAMKV_CHECK(in.size() == kHeaderBytes + placing->prefix_bytes);
      *body = {in.data() + kHeaderBytes, placing->prefix_bytes};
      *placed = placing->rest;
      in.consume(in.size());
      whole_bytes = 0;
      placer_asked = false;
      return Status::kOk;
    }
    *body = {in.data() + kHeaderBytes, h->body_bytes};
    const size_t whole = kHeaderBytes + h->body_bytes;
    in.consume(whole);
    whole_bytes = whole_bytes > whole ? whole_bytes - whole : 0;
    return Status::kOk;
  }

  // Sends pieces now as far as the socket takes them; the rest is queued: copied, but for
  // the pieces from `shared_from` on, which `keep` holds (OutQueue::append_shared). false
  // on error.
  bool send(std::span<const std::span<const std::byte>> pieces,
            std::shared_ptr<const void> keep = nullptr, size_t shared_from = SIZE_MAX) {
    size_t total = 0;
    for (auto p : pieces) total += p.size();
    size_t sent = 0;
    if (out.empty()) {
      // Many pieces (a backup's recovery data: thousands of runs of entries) go in
      // batches of up to kMaxIov, for as long as the socket takes them whole.
      iovec iov[kMaxIov];
      size_t next = 0;
      while (next < pieces.size()) {
        size_t n = 0;
        size_t batch = 0;
        for (; next < pieces.size() && n < kMaxIov; ++next) {
          if (pieces[next].empty()) continue;
          iov[n++] = {const_cast<std::byte*>(pieces[next].data()), pieces[next].size()};
          batch += pieces[next].size();
        }
        if (n == 0) break;
        // sendmsg with MSG_NOSIGNAL, not writev: a peer that went away must give EPIPE,
        // not a SIGPIPE that kills the process.
        msghdr msg{};
        msg.msg_iov = iov;
        msg.msg_iovlen = n;
        ssize_t w = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return false;
        sent += w > 0 ? static_cast<size_t>(w) : 0;
        if (w < 0 || static_cast<size_t>(w) < batch) break;  // the socket is full
      }
    }
    if (sent == total) return true;
    if (keep == nullptr) shared_from = SIZE_MAX;
    // What the socket did not take: copied pieces gathered into one chunk, each shared
    // piece queued where it lies.
    size_t skip = sent;
    std::vector<std::span<const std::byte>> copied;
    copied.reserve(std::min(pieces.size(), shared_from));
    for (size_t i = 0; i < pieces.size(); ++i) {
      std::span<const std::byte> p = pieces[i];
      if (skip >= p.size()) {
        skip -= p.size();
        continue;
      }
      p = p.subspan(skip);
      skip = 0;
      if (i < shared_from) {
        copied.push_back(p);
        continue;
      }
      if (!copied.empty()) {
        out.append(copied);
        copied.clear();
      }
      out.append_shared(p, keep);
    }
    if (!copied.empty()) out.append(copied);
    return true;
  }

  // Writes queued bytes. false on error.
  bool flush() { return out.flush(fd); }
};

// ---------------------------------------------------------------------------------------
class TcpServerTransport final : public ServerTransport {
 public:
  explicit TcpServerTransport(const TransportOptions& o) : options_(o) {
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    stop_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  }
  ~TcpServerTransport() override {
    for (auto& [fd, c] : connections_) ::close(fd);
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
    return Status::kOk;
  }

  std::string locator() const override { return locator_; }

  void stop() override {
    stopping_.store(true);
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(stop_fd_, &one, sizeof(one));
  }

  void run(const Handler& handler) override {
    epoll_event events[64];
    Reply reply;
    // Each task's descriptor joins the connections' (one task's twice is added once).
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
      if (options_.busy_poll) {
        timeout_ms = 0;
      } else if (task_wait_ns != UINT64_MAX) {
        timeout_ms = static_cast<int>(std::min<uint64_t>(
            task_wait_ns / 1'000'000 + (task_wait_ns % 1'000'000 != 0), INT_MAX));
      }
      int n = epoll_wait(epoll_fd_, events, 64, timeout_ms);
      if (n < 0 && errno != EINTR) {
        LOG_ERROR("epoll_wait: {}", std::strerror(errno));
        return;
      }
      for (int i = 0; i < n; ++i) {
        int fd = events[i].data.fd;
        if (fd == listen_fd_) {
          accept_all();
        } else if (std::find(task_fds.begin(), task_fds.end(), fd) != task_fds.end()) {
          for (LoopTask* task : tasks_) {
            if (task->wait_fd() == fd) task->on_wait_fd_ready();
          }
        } else if (fd != stop_fd_) {
          serve(fd, events[i].events, handler, reply);
        }
      }
      // After the batch: a master replicates everything the batch wrote at once, a backup
      // submits the batch's disk writes together. The loop sleeps until the soonest wake.
      task_wait_ns = UINT64_MAX;
      for (LoopTask* task : tasks_) task_wait_ns = std::min(task_wait_ns, task->run());
    }
    for (int fd : task_fds) epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
  }

  void add_loop_task(LoopTask* task) override { tasks_.push_back(task); }

  void set_placer(size_t prefix_bytes, size_t min_body_bytes, Placer placer) override {
    placer_ = {.prefix_bytes = prefix_bytes,
               .min_body_bytes = min_body_bytes,
               .max_message_bytes = options_.max_message_bytes,
               .placer = std::move(placer)};
  }

  bool send_deferred(const ReplyToken& token, const Reply& reply) override {
    auto it = connections_.find(token.connection);
    if (it == connections_.end() || it->second.serial != token.serial) return false;
    if (!send_reply(it->second, token.request, reply)) {
      close_connection(token.connection, "send failed");
      return false;
    }
    update_interest(token.connection, it->second);
    return true;
  }

 private:
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
      if (connections_.size() >= options_.max_connections) {
        LOG_WARNING("refusing a connection: already {} open", connections_.size());
        ::close(fd);
        continue;
      }
      set_socket_options(fd, options_);
      connections_[fd].fd = fd;
      connections_[fd].serial = ++next_serial_;
      if (placer_.placer) connections_[fd].placer = &placer_;
      add(fd, EPOLLIN | EPOLLRDHUP);
    }
  }

  void close_connection(int fd, const char* why) {
    if (why != nullptr) LOG_DEBUG("closing connection {}: {}", fd, why);
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
    ::close(fd);
    connections_.erase(fd);
  }

  void serve(int fd, uint32_t events, const Handler& handler, Reply& reply) {
    auto it = connections_.find(fd);
    if (it == connections_.end()) return;
    Connection& c = it->second;
    if (events & EPOLLOUT) {
      if (!c.flush()) return close_connection(fd, "write failed");
    }
    // Back-pressure: a peer that sends requests but does not read the replies is not
    // served (nor read from) while a message's worth of replies waits for it; without
    // this `out` would grow without bound. EPOLLOUT brings us back once it drains.
    const size_t max_queued = options_.max_message_bytes;
    bool open = true;
    if (c.out.size() < max_queued && (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
      open = c.fill(options_.max_message_bytes);
    }
    wire::MessageHeader h;
    std::span<const std::byte> body;
    std::span<const std::byte> placed;
    while (c.out.size() < max_queued) {
      placed = {};
      Status s = c.next(options_, &h, &body, &placed);
      if (s == Status::kRetry) break;
      if (s != Status::kOk) {
        LOG_WARNING("closing a connection that sent a malformed message header");
        return close_connection(fd, nullptr);
      }
      if (h.flags & wire::kFlagResponse) continue;  // not a request: ignore
      reply.clear();
      reply.set_token({.connection = fd, .serial = c.serial, .request = h});
      reply.set_placed(placed);
      if (!wire::opcode_known(h.opcode)) {
        reply.set_status(Status::kBadRequest);
      } else {
        handler(h, body, reply);
      }
      if (!placed.empty()) c.placing.reset();  // the placer's memory is its own again
      reply.set_placed({});
      if (reply.deferred()) continue;
      const bool sent = send_reply(c, h, reply);
      reply.clear();  // drops its keep: what the socket did not take holds its own
      if (!sent) return close_connection(fd, "send failed");
    }
    if (!open) return close_connection(fd, "peer closed");
    update_interest(fd, c);
  }

  bool send_reply(Connection& c, const wire::MessageHeader& h, const Reply& reply) {
    wire::MessageHeader rh = h;
    rh.flags = wire::kFlagResponse;
    rh.status = static_cast<uint16_t>(reply.status());
    rh.body_bytes = static_cast<uint32_t>(reply.total_bytes());
    std::span<const std::byte> fixed[] = {{reinterpret_cast<const std::byte*>(&rh), kHeaderBytes},
                                          {reply.body().data(), reply.body().size()}};
    if (reply.external().empty()) return c.send(fixed);
    std::vector<std::span<const std::byte>> pieces(std::begin(fixed), std::end(fixed));
    for (auto p : reply.external()) pieces.push_back(p);
    return c.send(pieces, reply.keep(), /*shared_from=*/2);
  }

  // Epoll interest follows what the connection waits for: writable while replies are
  // queued, readable while fewer than a message's worth of replies wait (back-pressure).
  void update_interest(int fd, Connection& c) {
    bool want = !c.out.empty();
    bool reading = c.out.size() < options_.max_message_bytes;
    if (want != c.want_write || reading != c.want_read) {
      c.want_write = want;
      c.want_read = reading;
      epoll_event ev{};
      ev.events = (reading ? EPOLLIN | EPOLLRDHUP : 0u) | (want ? EPOLLOUT : 0u);
      ev.data.fd = fd;
      epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, fd, &ev);
    }
  }

  TransportOptions options_;
  int epoll_fd_ = -1;
  int stop_fd_ = -1;
  int listen_fd_ = -1;
  std::string locator_;
  std::atomic<bool> stopping_{false};
  std::unordered_map<int, Connection> connections_;
  Acceptor acceptor_;
  uint64_t next_serial_ = 0;
  std::vector<LoopTask*> tasks_;
  PlacerConfig placer_;
};

// ---------------------------------------------------------------------------------------
class TcpClientTransport final : public ClientTransport {
 public:
  explicit TcpClientTransport(const TransportOptions& o) : options_(o) {
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  }
  ~TcpClientTransport() override {
    for (auto& [loc, s] : sessions_) ::close(s.conn.fd);
    ::close(epoll_fd_);
  }

  void send(const std::string& locator, const Request& request, std::span<const std::byte> body,
            Callback callback) override {
    send_pieces(locator, request, body, {}, nullptr, std::move(callback));
  }

  void send_pieces(const std::string& locator, const Request& request,
                   std::span<const std::byte> head,
                   std::span<const std::span<const std::byte>> tail,
                   std::shared_ptr<const void> keep, Callback callback) override {
    uint64_t id = next_request_id_++;
    // Saturating: a huge timeout must mean "far away", not wrap into the past.
    uint64_t now = clock_.now_ns();
    uint64_t deadline =
        request.timeout_ns > UINT64_MAX - now ? UINT64_MAX : now + request.timeout_ns;
    Session* s = session(locator);
    if (s == nullptr) {
      failed_.push_back({std::move(callback), Status::kUnavailable});
      return;
    }
    size_t body_bytes = head.size();
    for (const auto piece : tail) body_bytes += piece.size();
    wire::MessageHeader h;
    h.opcode = static_cast<uint16_t>(request.opcode);
    h.request_id = id;
    h.body_bytes = static_cast<uint32_t>(body_bytes);
    h.client_id = request.client_id;
    h.rpc_seq = request.rpc_seq;
    h.ack_seq = request.ack_seq;
    // Header, head, then the tail: on the stack for a plain request (no heap allocation on
    // a client's path), in a vector for a replication write from a segment's seglets.
    constexpr size_t kInline = 8;
    std::array<std::span<const std::byte>, kInline> inline_pieces;
    std::vector<std::span<const std::byte>> many;
    std::span<std::span<const std::byte>> pieces;
    if (2 + tail.size() <= kInline) {
      pieces = std::span(inline_pieces).first(2 + tail.size());
    } else {
      many.resize(2 + tail.size());
      pieces = many;
    }
    pieces[0] = {reinterpret_cast<const std::byte*>(&h), kHeaderBytes};
    pieces[1] = head;
    std::copy(tail.begin(), tail.end(), pieces.begin() + 2);
    s->pending[id] = {std::move(callback), deadline};
    if (!s->conn.send(pieces, std::move(keep), 2)) {
      fail_session(locator, Status::kUnavailable);
      return;
    }
    update_interest(*s);
  }

  int poll(uint64_t timeout_ns) override {
    int done = run_failed();
    if (done > 0) timeout_ns = 0;
    uint64_t now = clock_.now_ns();
    uint64_t wait_ns = timeout_ns;
    for (auto& [loc, s] : sessions_) {
      for (auto& [id, p] : s.pending) {
        wait_ns = std::min(wait_ns, p.deadline > now ? p.deadline - now : 0);
      }
    }
    // Clamped before the cast: a long wait must not wrap to a negative int, which
    // epoll_wait takes as "forever" (a hang with nothing in flight).
    uint64_t wait_ms = std::min<uint64_t>(wait_ns / 1'000'000 + (wait_ns % 1'000'000 != 0),
                                          static_cast<uint64_t>(INT_MAX));
    int timeout_ms = options_.busy_poll ? 0 : static_cast<int>(wait_ms);
    epoll_event events[64];
    int n = epoll_wait(epoll_fd_, events, 64, timeout_ms);
    for (int i = 0; i < n; ++i) {
      auto it = by_fd_.find(events[i].data.fd);
      if (it == by_fd_.end()) continue;
      done += handle(it->second, events[i].events);
    }
    done += expire();
    return done;
  }

  int wait_fd() const override { return epoll_fd_; }

  size_t outstanding() const override {
    size_t n = failed_.size();
    for (const auto& [loc, s] : sessions_) n += s.pending.size();
    return n;
  }

  void disconnect(const std::string& locator) override {
    fail_session(locator, Status::kUnavailable);
  }

 private:
  struct Pending {
    Callback callback;
    uint64_t deadline = 0;
  };
  struct Session {
    Connection conn;
    uint64_t epoch = 0;  // unique per session: tells a reconnected session from the old one
    bool connected = false;
    std::map<uint64_t, Pending> pending;
  };
  struct Failed {
    Callback callback;
    Status status;
  };

  Session* session(const std::string& locator) {
    auto it = sessions_.find(locator);
    if (it != sessions_.end()) return &it->second;
    auto loc = parse_locator(locator);
    if (!loc.ok()) return nullptr;
    auto addr = resolve(*loc);
    if (!addr.ok()) return nullptr;
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return nullptr;
    set_socket_options(fd, options_);
    int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&*addr), sizeof(*addr));
    if (rc != 0 && errno != EINPROGRESS) {
      ::close(fd);
      return nullptr;
    }
    Session& s = sessions_[locator];
    s.conn.fd = fd;
    s.epoch = ++session_epoch_;
    s.connected = rc == 0;
    by_fd_[fd] = locator;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP;
    ev.data.fd = fd;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
    s.conn.want_write = true;
    return &s;
  }

  void update_interest(Session& s) {
    bool want = !s.conn.out.empty() || !s.connected;
    if (want == s.conn.want_write) return;
    s.conn.want_write = want;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP | (want ? EPOLLOUT : 0u);
    ev.data.fd = s.conn.fd;
    epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, s.conn.fd, &ev);
  }

  // `locator` is a copy: fail_session() erases the by_fd_ entry it may come from.
  int handle(const std::string locator, uint32_t events) {
    Session& s = sessions_[locator];
    const uint64_t epoch = s.epoch;
    if (events & EPOLLERR) {
      fail_session(locator, Status::kUnavailable);
      return run_failed();
    }
    if (events & EPOLLOUT) {
      s.connected = true;
      if (!s.conn.flush()) {
        fail_session(locator, Status::kUnavailable);
        return run_failed();
      }
    }
    bool open = true;
    int done = 0;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)) open = s.conn.fill(options_.max_message_bytes);
    wire::MessageHeader h;
    std::span<const std::byte> body;
    while (true) {
      Status st = s.conn.next(options_, &h, &body);
      if (st == Status::kRetry) break;
      if (st != Status::kOk) {
        LOG_WARNING("malformed response from {}: closing the session", locator);
        open = false;
        break;
      }
      auto it = s.pending.find(h.request_id);
      if (it == s.pending.end()) continue;  // timed out already
      Callback cb = std::move(it->second.callback);
      s.pending.erase(it);
      cb(Status::kOk, h, body);
      ++done;
      // The callback may have sent more (the session is a stable std::map node), or
      // disconnected this session: then `s` is gone and so is the rest of its input.
      // Compared by epoch, not fd: a callback that disconnects and sends again gets a new
      // session whose fd (and even node address) is often the old one's, and `s` would
      // then dangle.
      auto again = sessions_.find(locator);
      if (again == sessions_.end() || again->second.epoch != epoch) return done + run_failed();
    }
    if (!open) {
      fail_session(locator, Status::kUnavailable);
      return done + run_failed();
    }
    update_interest(s);
    return done;
  }

  void fail_session(const std::string& locator, Status status) {
    auto it = sessions_.find(locator);
    if (it == sessions_.end()) return;
    for (auto& [id, p] : it->second.pending) failed_.push_back({std::move(p.callback), status});
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, it->second.conn.fd, nullptr);
    ::close(it->second.conn.fd);
    by_fd_.erase(it->second.conn.fd);
    sessions_.erase(it);
  }

  int run_failed() {
    int n = 0;
    while (!failed_.empty()) {
      Failed f = std::move(failed_.front());
      failed_.pop_front();
      f.callback(f.status, wire::MessageHeader{}, {});
      ++n;
    }
    return n;
  }

  int expire() {
    uint64_t now = clock_.now_ns();
    int n = 0;
    for (auto& [loc, s] : sessions_) {
      for (auto it = s.pending.begin(); it != s.pending.end();) {
        if (it->second.deadline <= now) {
          failed_.push_back({std::move(it->second.callback), Status::kTimeout});
          it = s.pending.erase(it);
        } else {
          ++it;
        }
      }
    }
    n += run_failed();
    return n;
  }

  TransportOptions options_;
  const Clock& clock_ = SystemClock::instance();
  int epoll_fd_ = -1;
  uint64_t next_request_id_ = 1;
  uint64_t session_epoch_ = 0;
  std::map<std::string, Session> sessions_;  // std::map: stable nodes across callbacks
  std::unordered_map<int, std::string> by_fd_;
  std::deque<Failed> failed_;
};

}  // namespace

std::unique_ptr<ServerTransport> make_tcp_server_transport(const TransportOptions& options) {
  return std::make_unique<TcpServerTransport>(options);
}

std::unique_ptr<ClientTransport> make_tcp_client_transport(const TransportOptions& options) {
  return std::make_unique<TcpClientTransport>(options);
}

namespace {
std::atomic<ClientTransportFactory> g_client_factory{nullptr};
std::string g_client_transport_name = "tcp";  // set at start, before threads
}  // namespace

void set_client_transport_factory(ClientTransportFactory factory) { g_client_factory = factory; }

std::unique_ptr<ClientTransport> make_client_transport(const TransportOptions& options) {
  ClientTransportFactory factory = g_client_factory.load();
  return factory != nullptr ? factory(options) : make_tcp_client_transport(options);
}

void set_client_transport_name(std::string_view name) { g_client_transport_name = name; }

std::string_view client_transport_name() { return g_client_transport_name; }

CallResult call(ClientTransport& transport, const std::string& locator,
                const ClientTransport::Request& request, std::span<const std::byte> body) {
  CallResult result;
  bool done = false;
  transport.send(locator, request, body,
                 [&](Status st, const wire::MessageHeader& h, std::span<const std::byte> b) {
                   done = true;
                   result.status = st != Status::kOk ? st : static_cast<Status>(h.status);
                   result.body.assign(b.begin(), b.end());
                 });
  while (!done) transport.poll(request.timeout_ns);
  return result;
}

}  // namespace ramkv
