// The RPC transport: how requests and responses travel between processes. One interface,
// implemented over TCP (tcp_transport.h, the default and what every test runs on) and,
// later, RDMA verbs. The shape is chosen for both:
//   - A server runs one dispatch loop that owns its connections; handlers run to
//     completion on it (STYLE.md). The loop either busy-polls (lowest latency, one core
//     spinning) or blocks in the kernel (the default on small machines).
//   - A reply is a header, a body the handler filled, and optional external pieces that
//     are sent without copying (value bytes that already sit in the log, or registered
//     memory under RDMA). External pieces must stay valid until the handler's caller
//     returns from sending; the transport copies whatever it cannot send at once, unless
//     the reply names what keeps them (Reply::set_keep).
//   - Clients send asynchronously and collect completions by polling on their own
//     thread: no hand-off to another thread on the fast path (a wake-up across vCPUs
//     costs ~50 us here, REFERENCE-FIGURES.md).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/result.h"
#include "common/wire_format.h"

namespace ramkv {

// "host:port" split; kInvalidArgument when malformed. Port 0 is allowed for listening.
struct Locator {
  std::string host;
  uint16_t port = 0;
  std::string to_string() const;
};
Result<Locator> parse_locator(std::string_view text);

// Where a deferred reply goes (Reply::defer): the connection and the request it answers.
struct ReplyToken {
  int connection = -1;
  uint64_t serial = 0;  // tells a connection from a later one on the same descriptor
  wire::MessageHeader request;
};

class Reply {
 public:
  void set_status(Status s) { status_ = s; }
  Status status() const { return status_; }
  std::vector<std::byte>& body() { return body_; }
  const std::vector<std::byte>& body() const { return body_; }
  wire::BodyWriter writer() { return wire::BodyWriter(&body_); }
  // Appended after body() without a copy; see the file comment for lifetime.
  void add_external(std::span<const std::byte> piece) { external_.push_back(piece); }
  const std::vector<std::span<const std::byte>>& external() const { return external_; }
  // What keeps the external pieces' bytes valid and unchanged: a transport that cannot
  // send them at once holds it until it has, instead of copying them (a backup's
  // recovery data: megabytes a reply, most of which a full socket would otherwise copy).
  // The transport lets go of it on its dispatch thread (once the bytes are sent, or the
  // connection closes, or in its destructor): whatever it keeps alive must be cheap to
  // destroy and must not wait for that thread.
  void set_keep(std::shared_ptr<const void> keep) { keep_ = std::move(keep); }
  const std::shared_ptr<const void>& keep() const { return keep_; }
  size_t total_bytes() const;
  void clear() {
    status_ = Status::kOk;
    body_.clear();
    external_.clear();
    keep_.reset();
    deferred_ = false;
    placed_ = {};
  }
  // The rest of the request's body, when the transport received it into memory a placer
  // named (ServerTransport::set_placer); the handler's `body` is then only the prefix the
  // placer saw. Empty otherwise. Valid while the handler runs.
  std::span<const std::byte> placed() const { return placed_; }
  void set_placed(std::span<const std::byte> rest) { placed_ = rest; }
  // The handler answers later, through ServerTransport::send_deferred(token()): nothing is
  // sent when it returns. Used by a master whose writes wait for their backups.
  void defer() { deferred_ = true; }
  bool deferred() const { return deferred_; }
  const ReplyToken& token() const { return token_; }
  void set_token(const ReplyToken& token) { token_ = token; }

 private:
  bool deferred_ = false;
  std::span<const std::byte> placed_;
  ReplyToken token_;
  Status status_ = Status::kOk;
  std::vector<std::byte> body_;
  std::vector<std::span<const std::byte>> external_;
  std::shared_ptr<const void> keep_;
};

struct TransportOptions {
  // Spin on the socket instead of sleeping in epoll_wait.
  bool busy_poll = false;
  // Abort a connection whose sent data stays unacknowledged this long (TCP_USER_TIMEOUT).
  uint32_t tcp_user_timeout_ms = 10'000;
  // A peer's message above this is refused (connection closed).
  uint32_t max_message_bytes = wire::kMaxBodyBytes + sizeof(wire::MessageHeader);
  // Server: most connections at once; more are accepted and closed at once.
  uint32_t max_connections = 4096;
};

// Work a dispatch loop does besides serving requests (a master's replication, a backup's
// disk writes): run() is called on the dispatch thread after every batch of events, and
// when wait_fd() becomes readable or the time it asked for has passed. A loop may have
// several; each runs after every batch.
class LoopTask {
 public:
  virtual ~LoopTask() = default;
  // A descriptor the loop waits on with its connections (-1: none).
  virtual int wait_fd() const = 0;
  // Does what is due; returns how long the loop may sleep before calling again when
  // nothing happens (UINT64_MAX: until an event).
  virtual uint64_t run() = 0;
  // The loop found wait_fd() readable in the batch it just handled; run() comes next and
  // must take in what made it so: the loop waits level-triggered, and a descriptor left
  // readable wakes it again at once (a loop that spins, as every server's did while a
  // peer it had a connection to was dead and not yet declared).
  virtual void on_wait_fd_ready() {}
};

// Memory a server exposed for one-sided writes (ServerTransport::expose_memory): what a
// writer needs to name it. Plain data, sent on the wire as wire::RemoteRegionWire.
struct RemoteRegion {
  uint64_t address = 0;  // the first byte, in the exposing process's address space
  uint64_t bytes = 0;
  uint32_t key = 0;  // RDMA: the memory region's rkey
};

// Where a placer wants the rest of a request's body received (ServerTransport::set_placer).
struct Placement {
  std::span<std::byte> rest;  // exactly the body's length past the prefix, or empty: no
  // Held while the transport may write into `rest`: until the request's handler has run,
  // or its connection closed first. Its release is how the placer learns the end.
  std::shared_ptr<void> keep;
};

class ServerTransport {
 public:
  using Handler = std::function<void(const wire::MessageHeader& request,
                                     std::span<const std::byte> body, Reply& reply)>;
  using Placer = std::function<Placement(const wire::MessageHeader& request,
                                         std::span<const std::byte> prefix)>;
  virtual ~ServerTransport() = default;
  // Binds and listens; "127.0.0.1:0" picks a free port (see locator()).
  virtual Status listen(const std::string& locator) = 0;
  virtual std::string locator() const = 0;
  // Runs the dispatch loop on the calling thread until stop().
  virtual void run(const Handler& handler) = 0;
  // Adds a task, before run(); it must outlive run(). Tasks run in the order added.
  virtual void add_loop_task(LoopTask* task) = 0;
  // The name from when a loop had one task.
  void set_loop_task(LoopTask* task) { add_loop_task(task); }
  // Memory that reply pieces may come from (a master's log), registered with the network
  // adapter once, before run(): RDMA sends such pieces without copying them. TCP has
  // nothing to do. kOk, or the adapter's refusal (logged).
  virtual Status register_memory(std::span<const std::byte> memory) {
    (void)memory;
    return Status::kOk;
  }
  // One-sided writes (RDMA): exposes `memory` to the peers of this transport, which may
  // then write into it with ClientTransport::write_remote() without this process taking
  // part. Returns where it lies for them (the region's address and key, sent to the
  // writer in an RPC reply). kUnavailable on a transport without one-sided writes (TCP);
  // kNoSpace when the adapter refuses (logged). Dispatch thread only, as withdraw.
  virtual Result<RemoteRegion> expose_memory(std::span<std::byte> memory) {
    (void)memory;
    return Status::kUnavailable;
  }
  // Ends a region's exposure: once this returns, no write through `region.key` lands
  // (the writer's queue pair fails instead), so its memory may be read as final or
  // reused. Regions still exposed when the transport is destroyed are withdrawn then.
  virtual void withdraw_memory(const RemoteRegion& region) { (void)region; }
  // Receiving large bodies in place (a backup's replica buffers: the bytes a master
  // replicates are then not copied again out of a receive buffer). For a request whose
  // body is at least `min_body_bytes` (and longer than `prefix_bytes`), once its header
  // and the first `prefix_bytes` of its body are in, `placer` is asked, on the dispatch
  // thread, where the rest goes; the transport receives it there, and the handler gets
  // the prefix as `body` and the rest as Reply::placed(). A placement with no memory
  // leaves the request as it is. Before run(). Transports that cannot (RDMA) ignore it.
  virtual void set_placer(size_t prefix_bytes, size_t min_body_bytes, Placer placer) {
    (void)prefix_bytes;
    (void)min_body_bytes;
    (void)placer;
  }
  // Sends a reply a handler deferred. Dispatch thread only. Dropped (and false) when the
  // connection has closed since the request arrived.
  virtual bool send_deferred(const ReplyToken& token, const Reply& reply) = 0;
  // Thread-safe and async-signal-safe: makes run() return soon.
  virtual void stop() = 0;
};

class ClientTransport {
 public:
  // Called once per request from poll(): kOk with the response (whose own status is in
  // header.status), or the transport's failure (kTimeout, kUnavailable) with no body.
  using Callback = std::function<void(Status transport_status, const wire::MessageHeader& header,
                                      std::span<const std::byte> body)>;
  struct Request {
    wire::Opcode opcode = wire::Opcode::kEcho;
    uint64_t client_id = 0;
    uint64_t rpc_seq = 0;
    uint64_t ack_seq = 0;  // wire_format.h, MessageHeader
    uint64_t timeout_ns = 5'000'000'000;
  };
  virtual ~ClientTransport() = default;
  // Queues a request to the server at `locator` (connecting if needed) and sends what
  // it can now; the body need not outlive the call (what is not sent is copied). The callback runs
  // from a later poll(), never from send(). A callback may send() and disconnect(), but must not
  // poll(): the body it is given lives in the connection's receive buffer.
  virtual void send(const std::string& locator, const Request& request,
                    std::span<const std::byte> body, Callback callback) = 0;
  // send() with the body in parts: `head`, copied as a body is, then the pieces of
  // `tail`, which are not copied: their bytes must not change while `keep` lives, and the
  // transport holds `keep` until it no longer needs them (what the socket does not take
  // at once is sent from there later). A caller that fills one buffer and sends it to
  // several servers (replication) saves a copy per server; one whose bytes already lie in
  // memory that stays put (a master's log, in seglets) saves the copy into a buffer too.
  // The default copies all of it.
  virtual void send_pieces(const std::string& locator, const Request& request,
                           std::span<const std::byte> head,
                           std::span<const std::span<const std::byte>> tail,
                           std::shared_ptr<const void> keep, Callback callback) {
    (void)keep;
    std::vector<std::byte> body(head.begin(), head.end());
    for (const auto piece : tail) body.insert(body.end(), piece.begin(), piece.end());
    send(locator, request, body, std::move(callback));
  }
  // Waits up to timeout_ns for progress, runs completions; returns how many ran.
  virtual int poll(uint64_t timeout_ns) = 0;
  virtual size_t outstanding() const = 0;
  // A descriptor that becomes readable when poll() has something to do, for callers that
  // wait on it in their own loop (LoopTask::wait_fd); -1 if there is none.
  virtual int wait_fd() const { return -1; }
  // Closes the connection to `locator`, failing its requests with kUnavailable.
  virtual void disconnect(const std::string& locator) = 0;

  // ---- One-sided writes (RDMA; docs/rdma.md, "One-sided mirroring") ------------------
  // Whether write_remote() works here. TCP: false, and the caller uses RPCs instead.
  virtual bool one_sided() const { return false; }
  // Memory that write_remote() pieces may come from (a master's log), registered with the
  // adapter once: such pieces go without a copy. kOk, or the adapter's refusal (logged).
  virtual Status register_memory(std::span<const std::byte> memory) {
    (void)memory;
    return Status::kOk;
  }
  // One RDMA WRITE: `bytes` into the server's exposed region `key` at `address` (absolute,
  // inside the region).
  struct RemoteWrite {
    uint64_t address = 0;
    uint32_t key = 0;
    std::span<const std::byte> bytes;
  };
  using WriteCallback = std::function<void(Status)>;
  // Writes each of `writes`, in order, on the connection to the server at `locator` (the
  // one its RPCs go on: a write posted before a request lands before the request is
  // served). Pieces in registered memory are read by the adapter later and must not
  // change until `done` runs; others are copied before this returns. `done` runs from a
  // later poll(), once every write is in the server's memory (not its disk): kOk, or
  // kUnavailable when the connection failed (a bad key or bounds: the queue pair goes to
  // the error state and the connection is closed, failing its requests too), or
  // kTimeout (the connection is then closed as well). Without one_sided(): kUnavailable at once
  // (from this call).
  virtual void write_remote(const std::string& locator, std::span<const RemoteWrite> writes,
                            uint64_t timeout_ns, WriteCallback done) {
    (void)locator;
    (void)writes;
    (void)timeout_ns;
    done(Status::kUnavailable);
  }
};

std::unique_ptr<ServerTransport> make_tcp_server_transport(const TransportOptions& options);
std::unique_ptr<ClientTransport> make_tcp_client_transport(const TransportOptions& options);

// The transport this process sends its RPCs with: TCP, unless the process installed
// another at start, before making any (rdma::use_rdma, from `--transport rdma`). Every
// part of a process (client library, master, backup, coordinator) makes its client
// transports through make_client_transport(), so one flag moves all of them. A cluster
// uses one transport throughout: locators do not say which.
using ClientTransportFactory = std::unique_ptr<ClientTransport> (*)(const TransportOptions&);
void set_client_transport_factory(ClientTransportFactory factory);
std::unique_ptr<ClientTransport> make_client_transport(const TransportOptions& options);
// "tcp" unless another factory was installed (then its name, as given).
void set_client_transport_name(std::string_view name);
std::string_view client_transport_name();

// The congestion control every TCP socket of this process uses (TCP_CONGESTION), set on
// each socket before it connects, and on listeners (accepted sockets inherit it: set
// after the handshake, a socket BBR had paced would stay paced). "cubic" unless the process chose
// another at start, before making any transport (`--tcp-congestion`); "" leaves the
// kernel's default (net.ipv4.tcp_congestion_control). Why not the kernel's default: where
// that is BBR, every connection is paced by the kernel (a timer per burst), and on the
// machines we measure on a loopback stream then costs twice the CPU per byte (the bench's
// network floor: 1.02 CPU-s for 2.95 GB against 0.47 with cubic; docs/recovery.md).
void set_tcp_congestion(std::string_view name);
std::string_view tcp_congestion();
// Whether this kernel lets a socket use `name` (probes a socket of its own); errno's text
// in *why when not. "" is always usable.
bool tcp_congestion_usable(std::string_view name, std::string* why);
// A program's `--tcp-congestion NAME` flag ("default": the kernel's). Sets it when the
// kernel lets sockets use it and returns true; otherwise, when the flag was given
// (`given`), returns false with the reason in *error (what the kernel offers included),
// and when it was not (the built-in "cubic"), logs a warning and leaves the kernel's.
bool choose_tcp_congestion(std::string_view flag, bool given, std::string* error);
// Sets tcp_congestion() on a socket; a refusal is logged once per process (the socket
// keeps the kernel's default) and returns false.
bool apply_tcp_congestion(int fd);

// A synchronous call on a client transport: sends and polls until the response or the
// timeout. status is the transport's or, on delivery, the response header's status.
struct CallResult {
  Status status = Status::kOk;
  std::vector<std::byte> body;
};
CallResult call(ClientTransport& transport, const std::string& locator,
                const ClientTransport::Request& request, std::span<const std::byte> body);

}  // namespace ramkv
