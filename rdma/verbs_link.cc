#include "rdma/verbs_link.h"

namespace ramkv::rdma::internal {

std::string errno_text(int e) { return std::strerror(e); }

PageBuffer page_alloc(size_t bytes) {
  const size_t page = 4096;
  void* p = std::aligned_alloc(page, (bytes + page - 1) / page * page);
  return PageBuffer(static_cast<std::byte*>(p));
}

// Sends a message on `link` now, or keeps a copy until there is room. Returns the wr_id
// when it went by reference (the caller must wait for it), 1 when it went or waits
// otherwise, 0 when the message cannot be sent at all.
// `next_waiting`: the message is the front of link.waiting, being sent now.
uint64_t transmit(Verbs& verbs, Link& link, std::span<const std::span<const std::byte>> pieces,
                  bool next_waiting) {
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

}  // namespace ramkv::rdma::internal
