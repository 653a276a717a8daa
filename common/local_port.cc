#include "common/local_port.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <mutex>
#include <random>
#include <set>

namespace ramkv {

namespace {

constexpr uint32_t kLow = 10000;
constexpr uint32_t kHigh = 32000;

bool can_bind(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  // As the servers' own listen sockets do: a port whose last connections linger in
  // TIME_WAIT is free for them.
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}

}  // namespace

std::optional<uint16_t> unused_local_port() {
  static std::mutex mu;
  static std::set<uint16_t> given;
  static uint32_t next = std::random_device{}() % (kHigh - kLow);
  std::lock_guard lock(mu);
  for (uint32_t tries = 0; tries < kHigh - kLow; ++tries) {
    const auto port = static_cast<uint16_t>(kLow + next++ % (kHigh - kLow));
    if (given.contains(port) || !can_bind(port)) continue;
    given.insert(port);
    return port;
  }
  return std::nullopt;
}

}  // namespace ramkv
