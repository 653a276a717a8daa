// The RDMA transport: ramkv's RPCs over reliable-connected (RC) queue pairs on
// libibverbs, next to TCP (common/transport.h). Chosen per process with
// `--transport rdma`.
//
// How it works (docs/rdma.md):
//   - Connection set-up goes over TCP to the server's locator: the client sends its queue
//     pair's address (LID, GID, QP number, first packet sequence number), the server
//     creates a queue pair, brings it to ready-to-send and answers with its own. The TCP
//     connection stays open for the queue pair's life: its close is how either side
//     learns that the other went away, and tears the queue pair down.
//   - Each transport (server or client) owns one protection domain, one completion queue
//     (for sends and receives of all its queue pairs) with a completion channel, and one
//     shared receive queue with `recv_buffers` pre-registered buffers sized for the
//     largest message. A message is one SEND (header, then body).
//   - Sends of at most the device's inline size go inline and unsignalled (one in
//     `kSignalEvery` is signalled, so the send queue drains); larger ones are copied into
//     a registered send buffer, or, for reply pieces in memory registered with
//     register_memory() (a master's log), sent straight from there (zero copy).
//   - The dispatch loop busy-polls the completion queue, or, in blocking mode, sleeps in
//     epoll on the completion channel's descriptor with the TCP descriptors.
//   - One-sided writes (docs/rdma.md, "One-sided mirroring"): a server exposes memory
//     with expose_memory(), a region registered for remote write whose rkey is the
//     RemoteRegion's key; withdraw_memory() deregisters it, and the transport's destructor
//     deregisters what is still exposed (before its protection domain). A client's
//     write_remote() posts one RDMA WRITE per piece, in order, on the session's queue pair
//     (the one its RPCs use): pieces in memory given to the client's register_memory()
//     go by reference, pieces of at most the inline size inline, others are copied into a
//     send buffer, given back when that write completes or, if the session fails first,
//     once its queue pair is destroyed (not before: the adapter may still read it). The
//     call's last write is signalled and its completion runs `done(kOk)`. Writes wait, in
//     order with the messages, while the queue pair is being connected or its send queue
//     is full. A write that fails (a bad or withdrawn key, out of bounds: the queue pair
//     goes to the error state) fails the session: its requests and writes get
//     kUnavailable and the next send() or write_remote() to that server connects anew. A
//     call past its timeout gets kTimeout and closes the session too, since a posted
//     write cannot be taken back.
//
// Ordering rules that callers may rely on:
//   1. Messages on one connection arrive in the order sent (RC); a send completion means
//      the peer's adapter has the bytes, not that a handler ran.
//   2. Writes and sends on one connection are executed at the server in the order
//      posted: the bytes of a write_remote() are in the server's memory before a request
//      sent after it (on the same client transport, to the same server) is served.
//   3. The bytes within one RDMA WRITE may land in any order, and a reader on the server
//      may see part of a write in progress: only what a later request or the writer's
//      `done` says is complete may be read as such.
//   4. A write's completion (`done(kOk)`) means the server's memory (its adapter) has the
//      bytes, not its disk, and that no handler on the server ran for them.
// A receiver without a posted buffer makes the sender retry (RNR, forever), so a slow
// server slows its clients down instead of losing messages.
//
// Zero-copy replies and the transport contract (common/transport.h): external pieces need
// only stay valid until the handler's caller returns from sending. A reply sent from
// registered memory is therefore waited for (its send completion polled) before the
// dispatch loop goes on, so the log memory may change right afterwards.
//
// Threads: as the TCP transport. The server's dispatch loop owns everything; a client
// transport belongs to the thread that polls it.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/result.h"
#include "common/transport.h"

namespace ramkv::rdma {

struct RdmaOptions {
  std::string device;          // "" = the first device listed
  uint8_t port = 1;            // the device port to use
  int gid_index = 0;           // GID table index (RoCE)
  uint32_t recv_buffers = 16;  // posted to the shared receive queue (server)
  // A client transport's (use_rdma): a process has several, each with its own buffers.
  uint32_t client_recv_buffers = 4;
  // The largest message either side sends; receive buffers are this big.
  uint32_t max_message_bytes = wire::kMaxBodyBytes + sizeof(wire::MessageHeader);
  // Send buffers for messages too large to go inline, kept registered.
  uint32_t send_buffers = 16;
  uint32_t send_buffer_bytes = 64u << 10;  // larger messages get a buffer of their own
  // Replies (server) and remote writes (client) with pieces in memory given to
  // register_memory() go without copying.
  bool zero_copy = true;
  // Connection set-up over TCP: how long to wait for the peer.
  uint64_t connect_timeout_ns = 5'000'000'000;
};

// Whether this build has the RDMA transport (the verbs headers were found). The
// emulated provider counts: rdma_provider() says which.
bool rdma_built();
// "libibverbs" or "emulated verbs (rdma/emu)": what the verbs calls go to in this build.
std::string_view rdma_provider();

// Opens the device and allocates what a transport needs. A clear error (logged and in
// *why) for: no device, a device name not found, a port that is not active, memory that
// cannot be registered (`ulimit -l`).
Result<std::unique_ptr<ServerTransport>> make_rdma_server_transport(const TransportOptions& options,
                                                                    const RdmaOptions& rdma,
                                                                    std::string* why = nullptr);
Result<std::unique_ptr<ClientTransport>> make_rdma_client_transport(const TransportOptions& options,
                                                                    const RdmaOptions& rdma,
                                                                    std::string* why = nullptr);

// Makes every client transport this process makes from now on (make_client_transport)
// an RDMA one with these options. Call at start, before any thread makes a transport. A
// transport that cannot open the device then fails each request with kUnavailable (and
// says why in the log) rather than quietly using TCP.
void use_rdma(const RdmaOptions& rdma);

}  // namespace ramkv::rdma
