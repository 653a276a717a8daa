#include "common/acceptor.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "common/clock.h"
#include "common/log.h"

namespace ramkv {

namespace {
constexpr uint64_t kWarningEveryNs = 10'000'000'000;
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
    const uint64_t now = SystemClock::instance().now_ns();
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
