// Listening TCP sockets, shared by the TCP and RDMA transports (RDMA sets up its queue
// pairs over TCP): resolve(), listen_tcp(), and the Acceptor, which takes connections off
// a non-blocking listening socket, also when the process has run out of file descriptors.
//
// Why: accept4() then fails with EMFILE (or ENFILE) and leaves the connection queued, so
// the listening socket stays readable and a dispatch loop waiting in epoll wakes at once,
// again and again: a server out of descriptors would spin a CPU and answer nobody new.
// The acceptor keeps one spare descriptor for that moment: it gives it up, takes the
// queued connection with it, closes that connection at once (the peer sees it closed and
// may retry later) and opens its spare again. Said in the log once per 10 s.
// Owner: a server transport. Threads: the owner's dispatch thread.
#pragma once

#include <netinet/in.h>

#include <cstdint>
#include <string>

#include "common/result.h"
#include "common/transport.h"

namespace ramkv {

// The IPv4 address of a locator (a host name is looked up); kInvalidArgument if none.
Result<sockaddr_in> resolve(const Locator& l);
// A non-blocking, close-on-exec socket listening on `text` ("host:port"; port 0 picks
// one); *bound is the locator really bound. kInvalidArgument for a bad locator, kIoError
// (logged) when it cannot listen.
Result<int> listen_tcp(const std::string& text, std::string* bound);

class Acceptor {
 public:
  Acceptor();
  ~Acceptor();
  Acceptor(const Acceptor&) = delete;
  Acceptor& operator=(const Acceptor&) = delete;

  // A new connection (non-blocking, close-on-exec), or -1 when none is queued (or the
  // one queued was refused for want of descriptors: then call again).
  int accept(int listen_fd);
  // Connections closed at once because the process had no descriptor for them.
  uint64_t refused() const { return refused_; }

 private:
  int spare_ = -1;
  uint64_t refused_ = 0;
  uint64_t last_warning_ns_ = 0;
};

}  // namespace ramkv
