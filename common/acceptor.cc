#include "common/acceptor.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <ctime>

#include "common/log.h"

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
