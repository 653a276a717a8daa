// A TCP port on 127.0.0.1 for a process that this one is about to start (tests, the
// local benchmarks): the child is told the port on its command line and listens on it.
#pragma once

#include <cstdint>
#include <optional>

namespace ramkv {

// A port on 127.0.0.1 that nothing listens on or is bound to now, never the same one
// twice in this process (two servers told the same port race for it; one fails with
// "address already in use"). Taken below the kernel's ephemeral range
// (ip_local_port_range, 32768-60999 by default), in 10000-31999: a port from there, as
// a listen on port 0 gives, is only free until an outgoing connection somewhere on the
// machine takes it as its source port, and the child told it then cannot listen. The
// walk starts at a random place, so that processes started side by side (ctest -j)
// rarely try the same ports; each port is tried with a bind before it is given.
// nullopt when none is free. Thread-safe.
std::optional<uint16_t> unused_local_port();

}  // namespace ramkv
