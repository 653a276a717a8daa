#include "common/acceptor.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>

#include "common/log.h"
#include "common/transport.h"

namespace ramkv {

namespace {

constexpr uint64_t kWarningEveryNs = 10'000'000'000;

// CLOCK_MONOTONIC without SystemClock: a virtual call here makes UBSan's type check probe
// memory through a pipe, which a process out of descriptors cannot make (it then reports
// a false type mismatch).
uint64_t monotonic_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000 + static_cast<uint64_t>(ts.tv_nsec);
}

}  // namespace

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

Result<int> listen_tcp(const std::string& text, std::string* bound) {
  auto loc = parse_locator(text);
  if (!loc.ok()) return loc.status();
  auto addr = resolve(*loc);
  if (!addr.ok()) return addr.status();
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  // The process's congestion control, on the listener: accepted sockets inherit it from
  // their first packet. Set after accept() instead, a switch away from the kernel's BBR
  // would leave the socket paced (BBR turns pacing on when the connection is established,
  // and nothing turns it off), which is the cost the choice is there to avoid.
  if (fd >= 0) apply_tcp_congestion(fd);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&*addr), sizeof(*addr)) != 0 ||
      ::listen(fd, 1024) != 0) {
    LOG_ERROR("cannot listen on {}: {}", text, std::strerror(errno));
    if (fd >= 0) ::close(fd);
    return Status::kIoError;
  }
  sockaddr_in at{};
  socklen_t len = sizeof(at);
  getsockname(fd, reinterpret_cast<sockaddr*>(&at), &len);
  *bound = Locator{loc->host, ntohs(at.sin_port)}.to_string();
  return fd;
}

Acceptor::Acceptor() : spare_(::open("/dev/null", O_RDONLY | O_CLOEXEC)) {}

Acceptor::~Acceptor() {
  if (spare_ >= 0) ::close(spare_);
}

int Acceptor::accept(int listen_fd) {
  for (;;) {
    int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) return fd;
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if ((errno != EMFILE && errno != ENFILE) || spare_ < 0) return -1;
    // Out of descriptors: take the queued connection with the spare and close it.
    ::close(spare_);
    spare_ = -1;
    fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) {
      ::close(fd);
      ++refused_;
    }
    spare_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    const uint64_t now = monotonic_ns();
    if (last_warning_ns_ == 0 || now - last_warning_ns_ >= kWarningEveryNs) {
      last_warning_ns_ = now;
      LOG_WARNING(
          "out of file descriptors: closing new connections at once ({} so far); raise the "
          "limit (ulimit -n) or lower the number of clients",
          refused_);
    }
    return -1;
  }
}

}  // namespace ramkv
