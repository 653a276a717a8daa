// The congestion control of this process's TCP sockets (transport.h, "set_tcp_congestion";
// docs/rpc.md, "TCP sockets").
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "common/log.h"
#include "common/transport.h"

namespace ramkv {

namespace {
std::string g_tcp_congestion = "cubic";  // set at start, before threads
std::atomic<bool> g_tcp_congestion_refused{false};
}  // namespace

void set_tcp_congestion(std::string_view name) { g_tcp_congestion = name; }
std::string_view tcp_congestion() { return g_tcp_congestion; }

bool tcp_congestion_usable(std::string_view name, std::string* why) {
  if (name.empty()) return true;
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    if (why != nullptr) *why = std::strerror(errno);
    return false;
  }
  const std::string n(name);
  const bool ok = ::setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, n.data(),
                               static_cast<socklen_t>(n.size())) == 0;
  if (!ok && why != nullptr) *why = std::strerror(errno);
  ::close(fd);
  return ok;
}

bool choose_tcp_congestion(std::string_view flag, bool given, std::string* error) {
  const std::string_view name = flag == "default" ? std::string_view() : flag;
  std::string why;
  if (tcp_congestion_usable(name, &why)) {
    set_tcp_congestion(name);
    return true;
  }
  auto read_line = [](const char* path) {
    std::string out;
    if (FILE* f = std::fopen(path, "r")) {
      char line[256] = {};
      if (std::fgets(line, sizeof(line), f) != nullptr) out = line;
      std::fclose(f);
    }
    while (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
  };
  const std::string available = read_line("/proc/sys/net/ipv4/tcp_available_congestion_control");
  const std::string allowed = read_line("/proc/sys/net/ipv4/tcp_allowed_congestion_control");
  std::string text = std::string("TCP congestion control '") + std::string(name) +
                     "': the kernel refused it (" + why + ")";
  if (!available.empty()) text += "; loaded: " + available;
  if (!allowed.empty()) text += "; allowed without CAP_NET_ADMIN: " + allowed;
  if (given) {
    if (error != nullptr) *error = text + "; or 'default' for the kernel's own";
    return false;
  }
  LOG_WARNING("{}. Sockets keep the kernel's default", text);
  set_tcp_congestion({});
  return true;
}

bool apply_tcp_congestion(int fd) {
  const std::string& name = g_tcp_congestion;
  if (name.empty()) return true;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name.data(),
                   static_cast<socklen_t>(name.size())) == 0) {
    return true;
  }
  const int err = errno;
  if (!g_tcp_congestion_refused.exchange(true)) {
    LOG_WARNING("TCP congestion control {}: {}; sockets keep the kernel's default", name,
                std::strerror(err));
  }
  return false;
}

}  // namespace ramkv
