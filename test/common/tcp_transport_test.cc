// The TCP transport between real sockets on 127.0.0.1: a server dispatch loop on its own
// thread, clients driving their own polls.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>
#include <thread>

#include "common/clock.h"
#include "common/log.h"
#include "common/transport.h"

namespace ramkv {
namespace {

// An echo server (plus one opcode that answers kObjectNotFound) on a free port.
class EchoServer {
 public:
  // `start`: serve at once; else listen only (connections wait in the backlog, unread)
  // until start().
  explicit EchoServer(bool busy_poll = false, bool start_now = true)
      : server_(make_tcp_server_transport({.busy_poll = busy_poll})) {
    REQUIRE(server_->listen("127.0.0.1:0") == Status::kOk);
    if (start_now) start();
  }
  void start() {
    thread_ = std::thread([this] {
      server_->run(
          [this](const wire::MessageHeader& h, std::span<const std::byte> body, Reply& reply) {
            ++served_;
            if (h.opcode == static_cast<uint16_t>(wire::Opcode::kRead)) {
              reply.set_status(Status::kObjectNotFound);
              return;
            }
            reply.body().assign(body.begin(), body.end());
          });
    });
  }
  ~EchoServer() {
    server_->stop();
    if (thread_.joinable()) thread_.join();
  }
  std::string locator() const { return server_->locator(); }
  uint64_t served() const { return served_.load(); }

 private:
  std::unique_ptr<ServerTransport> server_;
  std::atomic<uint64_t> served_{0};
  std::thread thread_;
};

std::vector<std::byte> bytes_of(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()),
          reinterpret_cast<const std::byte*>(s.data()) + s.size()};
}

CallResult echo(ClientTransport& client, const std::string& locator, std::string_view text) {
  auto body = bytes_of(text);
  return call(client, locator, {.opcode = wire::Opcode::kEcho, .timeout_ns = 5'000'000'000}, body);
}

// A raw socket to the server, for sending bytes no client would.
int raw_connect(const std::string& locator) {
  auto loc = parse_locator(locator);
  REQUIRE(loc.ok());
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(loc->port);
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  return fd;
}

// True when the peer has closed the socket (read returns 0 within a second).
bool closed_by_peer(int fd) {
  timeval tv{1, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  char buf[256];
  for (int i = 0; i < 100; ++i) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n == 0) return true;
    if (n < 0) return false;
  }
  return false;
}

}  // namespace

TEST_CASE("tcp transport: parse_locator accepts host:port and rejects the rest", "[common][tcp]") {
  auto l = parse_locator("127.0.0.1:12246");
  REQUIRE(l.ok());
  CHECK(l->host == "127.0.0.1");
  CHECK(l->port == 12246);
  CHECK(l->to_string() == "127.0.0.1:12246");
  for (const char* bad : {"", "127.0.0.1", ":80", "host:", "host:99999", "host:12x", "host:-1"}) {
    CHECK(parse_locator(bad).status() == Status::kInvalidArgument);
  }
}

// The congestion control of this process's TCP sockets that have `port` at either end
// (connected ones, and the listener on it), by their descriptors.
std::vector<std::string> congestion_of_sockets_on(uint16_t port) {
  std::vector<std::string> names;
  for (int fd = 0; fd < 4096; ++fd) {
    int domain = 0;
    int type = 0;
    socklen_t len = sizeof(int);
    if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || domain != AF_INET) continue;
    len = sizeof(int);
    if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) continue;
    sockaddr_in local{};
    sockaddr_in peer{};
    socklen_t alen = sizeof(local);
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &alen) != 0) continue;
    alen = sizeof(peer);
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &alen) != 0) peer = {};
    if (ntohs(local.sin_port) != port && ntohs(peer.sin_port) != port) continue;
    char name[32] = {};
    len = sizeof(name);
    REQUIRE(::getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name, &len) == 0);
    names.emplace_back(name);
  }
  return names;
}

TEST_CASE("tcp transport: every socket uses the process's congestion control", "[common][tcp]") {
  // One the kernel would not have given them: reno unless that is its default.
  std::string kernel_default;
  if (FILE* f = std::fopen("/proc/sys/net/ipv4/tcp_congestion_control", "r")) {
    char line[64] = {};
    if (std::fgets(line, sizeof(line), f) != nullptr) kernel_default = line;
    std::fclose(f);
  }
  while (!kernel_default.empty() && kernel_default.back() == '\n') kernel_default.pop_back();
  const std::string chosen = kernel_default == "reno" ? "cubic" : "reno";
  REQUIRE(tcp_congestion() == "cubic");  // the built-in choice
  std::string why;
  REQUIRE(tcp_congestion_usable(chosen, &why));
  struct Restore {
    ~Restore() { set_tcp_congestion("cubic"); }
  } restore;
  set_tcp_congestion(chosen);
  {
    EchoServer server;
    auto client = make_tcp_client_transport({});
    REQUIRE(echo(*client, server.locator(), "congestion").status == Status::kOk);
    auto port = parse_locator(server.locator())->port;
    auto names = congestion_of_sockets_on(port);
    // The listener (accepted sockets must inherit the choice from it: one switched after
    // the handshake stays paced if the kernel's default was BBR), the client's socket and
    // the one the server accepted.
    CHECK(names.size() == 3);
    for (const auto& n : names) CHECK(n == chosen);
  }
  // "default" leaves the kernel's; an unknown name is refused with what the kernel offers
  // when given, and falls back to the kernel's (with a warning) when not.
  REQUIRE(choose_tcp_congestion("default", true, &why));
  CHECK(tcp_congestion().empty());
  {
    EchoServer server;
    auto client = make_tcp_client_transport({});
    REQUIRE(echo(*client, server.locator(), "congestion").status == Status::kOk);
    auto names = congestion_of_sockets_on(parse_locator(server.locator())->port);
    CHECK(names.size() == 3);
    for (const auto& n : names) CHECK(n == kernel_default);
  }
  why.clear();
  CHECK_FALSE(choose_tcp_congestion("no-such-cc", true, &why));
  CHECK(why.find("no-such-cc") != std::string::npos);
  CHECK(tcp_congestion().empty());  // unchanged by a refusal
  set_tcp_congestion("cubic");
  CHECK(choose_tcp_congestion("no-such-cc", false, &why));
  CHECK(tcp_congestion().empty());
}

TEST_CASE("tcp transport: an echo request comes back with its body", "[common][tcp]") {
  EchoServer server;
  auto client = make_tcp_client_transport({});
  auto r = echo(*client, server.locator(), "hello, ramkv");
  REQUIRE(r.status == Status::kOk);
  CHECK(std::string(reinterpret_cast<const char*>(r.body.data()), r.body.size()) == "hello, ramkv");
}

TEST_CASE("tcp transport: a handler's status reaches the caller unchanged", "[common][tcp]") {
  EchoServer server;
  auto client = make_tcp_client_transport({});
  auto r = call(*client, server.locator(), {.opcode = wire::Opcode::kRead}, {});
  CHECK(r.status == Status::kObjectNotFound);
}

TEST_CASE("tcp transport: many requests in flight complete once each", "[common][tcp]") {
  EchoServer server;
  auto client = make_tcp_client_transport({});
  constexpr int kRequests = 500;
  std::vector<int> seen(kRequests, 0);
  std::vector<std::vector<std::byte>> bodies;
  for (int i = 0; i < kRequests; ++i) bodies.push_back(bytes_of(std::to_string(i)));
  for (int i = 0; i < kRequests; ++i) {
    client->send(server.locator(), {.opcode = wire::Opcode::kEcho}, bodies[static_cast<size_t>(i)],
                 [&seen, i](Status s, const wire::MessageHeader&, std::span<const std::byte> b) {
                   REQUIRE(s == Status::kOk);
                   CHECK(std::string(reinterpret_cast<const char*>(b.data()), b.size()) ==
                         std::to_string(i));
                   ++seen[static_cast<size_t>(i)];
                 });
  }
  for (int rounds = 0; client->outstanding() > 0 && rounds < 10000; ++rounds) {
    client->poll(100'000'000);
  }
  CHECK(client->outstanding() == 0);
  for (int n : seen) CHECK(n == 1);
}

TEST_CASE("tcp transport: a message larger than the socket buffers arrives whole",
          "[common][tcp]") {
  EchoServer server;
  auto client = make_tcp_client_transport({});
  std::string big(3u << 20, 'x');
  for (size_t i = 0; i < big.size(); i += 4096) big[i] = static_cast<char>('a' + (i / 4096) % 26);
  auto r = echo(*client, server.locator(), big);
  REQUIRE(r.status == Status::kOk);
  CHECK(std::string(reinterpret_cast<const char*>(r.body.data()), r.body.size()) == big);
}

TEST_CASE("tcp transport: large messages queued behind each other arrive whole and in order",
          "[common][tcp]") {
  // Sent without polling in between, they pile up in the client's queue of unsent bytes
  // (chunks, sent across their boundaries as the socket takes them), and their echoes in
  // the server's.
  EchoServer server;
  auto client = make_tcp_client_transport({});
  constexpr int kMessages = 12;
  std::vector<std::vector<std::byte>> bodies;
  for (int i = 0; i < kMessages; ++i) {
    std::vector<std::byte> b((size_t{1} << 20) + static_cast<size_t>(i) * 300'001);
    for (size_t j = 0; j < b.size(); ++j) {
      b[j] = static_cast<std::byte>((j * 7 + static_cast<size_t>(i) * 13) % 251);
    }
    bodies.push_back(std::move(b));
  }
  std::vector<int> order;
  for (int i = 0; i < kMessages; ++i) {
    client->send(server.locator(), {.opcode = wire::Opcode::kEcho, .timeout_ns = 30'000'000'000},
                 bodies[static_cast<size_t>(i)],
                 [&, i](Status s, const wire::MessageHeader&, std::span<const std::byte> b) {
                   REQUIRE(s == Status::kOk);
                   const auto& sent = bodies[static_cast<size_t>(i)];
                   CHECK(b.size() == sent.size());
                   CHECK(std::equal(b.begin(), b.end(), sent.begin(), sent.end()));
                   order.push_back(i);
                 });
  }
  for (int rounds = 0; client->outstanding() > 0 && rounds < 10000; ++rounds) {
    client->poll(100'000'000);
  }
  CHECK(client->outstanding() == 0);
  std::vector<int> expected(kMessages);
  for (int i = 0; i < kMessages; ++i) expected[static_cast<size_t>(i)] = i;
  CHECK(order == expected);
}

TEST_CASE("tcp transport: shared tails are sent from the caller's buffer, then let go",
          "[common][tcp]") {
  // send_pieces: a head copied as a body is, and a tail the transport keeps (by its
  // shared_ptr) while the socket has not taken it. Several messages share one tail
  // buffer, as replication writes of one segment to several backups do; sent without
  // polling, most of them wait in the queue, from the shared buffer.
  EchoServer server;
  auto client = make_tcp_client_transport({});
  auto tail = std::make_shared<std::vector<std::byte>>(size_t{3} << 20);
  for (size_t j = 0; j < tail->size(); ++j) tail->at(j) = static_cast<std::byte>((j * 11) % 253);
  constexpr int kMessages = 6;
  std::vector<int> order;
  for (int i = 0; i < kMessages; ++i) {
    const std::byte head[3] = {std::byte{0xAB}, static_cast<std::byte>(i), std::byte{0xCD}};
    // Each message sends a different part of the buffer.
    auto part = std::span<const std::byte>(*tail).subspan(static_cast<size_t>(i) * 1000);
    client->send_pieces(
        server.locator(), {.opcode = wire::Opcode::kEcho, .timeout_ns = 30'000'000'000}, head,
        std::span(&part, 1), tail,
        [&, i, part](Status s, const wire::MessageHeader&, std::span<const std::byte> b) {
          REQUIRE(s == Status::kOk);
          REQUIRE(b.size() == 3 + part.size());
          CHECK(b[0] == std::byte{0xAB});
          CHECK(b[1] == static_cast<std::byte>(i));
          CHECK(b[2] == std::byte{0xCD});
          CHECK(std::equal(b.begin() + 3, b.end(), part.begin(), part.end()));
          order.push_back(i);
        });
  }
  // The head was copied (it lived on the stack); the tails wait in the queue, held.
  CHECK(tail.use_count() > 1);
  for (int rounds = 0; client->outstanding() > 0 && rounds < 10000; ++rounds) {
    client->poll(100'000'000);
  }
  CHECK(client->outstanding() == 0);
  CHECK(order == std::vector<int>{0, 1, 2, 3, 4, 5});
  CHECK(tail.use_count() == 1);  // all sent: the transport holds none of it any more
}

TEST_CASE("tcp transport: a tail of many pieces is sent from where they lie, in order",
          "[common][tcp]") {
  // A replication write from a segment's seglets: the tail is many pieces scattered over
  // one region (not in order of address), none copied; several such messages, sent
  // while the server reads nothing yet, fill the socket, so most of them wait in the
  // queue, held by `keep`.
  EchoServer server(/*busy_poll=*/false, /*start_now=*/false);
  auto client = make_tcp_client_transport({});
  auto region = std::make_shared<std::vector<std::byte>>(size_t{4} << 20);
  for (size_t j = 0; j < region->size(); ++j) {
    region->at(j) = static_cast<std::byte>((j * 13 + j / 4096) % 251);
  }
  constexpr size_t kPiece = 64 << 10;
  constexpr size_t kPieces = (size_t{4} << 20) / kPiece;
  constexpr int kMessages = 5;
  std::vector<std::vector<std::byte>> expected(kMessages);
  std::vector<int> order;
  for (int i = 0; i < kMessages; ++i) {
    // Message i sends the pieces in a rotated order, the first and last one cut short.
    std::vector<std::span<const std::byte>> tail;
    for (size_t k = 0; k < kPieces; ++k) {
      const size_t piece = (k * 7 + static_cast<size_t>(i)) % kPieces;
      auto p = std::span<const std::byte>(*region).subspan(piece * kPiece, kPiece);
      if (k == 0) p = p.subspan(100);
      if (k + 1 == kPieces) p = p.first(1000);
      tail.push_back(p);
    }
    const std::byte head[2] = {std::byte{0x5A}, static_cast<std::byte>(i)};
    expected[static_cast<size_t>(i)].assign(head, head + 2);
    for (auto p : tail)
      expected[static_cast<size_t>(i)].insert(expected[static_cast<size_t>(i)].end(), p.begin(),
                                              p.end());
    client->send_pieces(
        server.locator(), {.opcode = wire::Opcode::kEcho, .timeout_ns = 30'000'000'000}, head, tail,
        region, [&, i](Status s, const wire::MessageHeader&, std::span<const std::byte> b) {
          REQUIRE(s == Status::kOk);
          const auto& want = expected[static_cast<size_t>(i)];
          CHECK(std::equal(b.begin(), b.end(), want.begin(), want.end()));
          order.push_back(i);
        });
  }
  CHECK(region.use_count() > 1);  // pieces wait in the queue, held, not copied
  server.start();
  for (int rounds = 0; client->outstanding() > 0 && rounds < 10000; ++rounds) {
    client->poll(100'000'000);
  }
  CHECK(client->outstanding() == 0);
  CHECK(order == std::vector<int>{0, 1, 2, 3, 4});
  CHECK(region.use_count() == 1);
}

TEST_CASE("tcp transport: a reply of thousands of pieces arrives whole and in order",
          "[common][tcp]") {
  // A backup's recovery data: runs of entries sent from where they lie, more pieces than
  // one sendmsg takes and more bytes than the socket holds (the rest is queued).
  std::vector<std::byte> source(size_t{6} << 20);
  for (size_t j = 0; j < source.size(); ++j) source[j] = static_cast<std::byte>((j * 31) % 241);
  std::vector<std::span<const std::byte>> runs;
  std::vector<std::byte> expected = {std::byte{'h'}, std::byte{'d'}};
  for (size_t at = 0, i = 0; at + 4000 < source.size(); ++i) {
    const size_t n = 100 + (i * 37) % 1900;  // every other run skipped: not contiguous
    runs.push_back(std::span<const std::byte>(source).subspan(at, n));
    expected.insert(expected.end(), source.begin() + static_cast<ptrdiff_t>(at),
                    source.begin() + static_cast<ptrdiff_t>(at + n));
    at += n + 500;
  }
  REQUIRE(runs.size() > 3000);
  auto server = make_tcp_server_transport({});
  REQUIRE(server->listen("127.0.0.1:0") == Status::kOk);
  std::thread loop([&] {
    server->run([&](const wire::MessageHeader&, std::span<const std::byte>, Reply& reply) {
      reply.body() = {std::byte{'h'}, std::byte{'d'}};
      for (const auto run : runs) reply.add_external(run);
    });
  });
  auto client = make_tcp_client_transport({});
  for (int i = 0; i < 3; ++i) {
    auto r = call(*client, server->locator(),
                  {.opcode = wire::Opcode::kEcho, .timeout_ns = 10'000'000'000}, {});
    REQUIRE(r.status == Status::kOk);
    CHECK(r.body == expected);
  }
  server->stop();
  loop.join();
}

// An echo server with a placer: bodies of 64 KiB or more that start with 'P' have the
// rest (past an 8-byte prefix) received into memory of the placer's, which the handler
// checks it got, then echoes prefix and rest back.
class PlacingServer {
 public:
  static constexpr size_t kPrefix = 8;
  PlacingServer() : server_(make_tcp_server_transport({})) {
    REQUIRE(server_->listen("127.0.0.1:0") == Status::kOk);
    server_->set_placer(kPrefix, 64 * 1024,
                        [this](const wire::MessageHeader& h, std::span<const std::byte> prefix) {
                          ++asked_;
                          if (prefix.size() != kPrefix || prefix[0] != std::byte{'P'}) {
                            return Placement{};
                          }
                          target_.assign(h.body_bytes - kPrefix, std::byte{0});
                          auto released = released_;
                          return Placement{.rest = target_,
                                           .keep = std::shared_ptr<void>(
                                               nullptr, [released](void*) { ++*released; })};
                        });
    thread_ = std::thread([this] {
      server_->run(
          [this](const wire::MessageHeader&, std::span<const std::byte> body, Reply& reply) {
            reply.body().assign(body.begin(), body.end());
            if (!reply.placed().empty()) {
              ++placed_;
              if (reply.placed().data() != target_.data() || body.size() != kPrefix) ++wrong_;
              reply.body().insert(reply.body().end(), reply.placed().begin(), reply.placed().end());
            }
          });
    });
  }
  ~PlacingServer() {
    server_->stop();
    thread_.join();
  }
  std::string locator() const { return server_->locator(); }
  uint64_t asked() const { return asked_.load(); }
  uint64_t placed() const { return placed_.load(); }
  uint64_t released() const { return released_->load(); }
  uint64_t wrong() const { return wrong_.load(); }

 private:
  std::unique_ptr<ServerTransport> server_;
  std::vector<std::byte> target_;  // server thread only
  std::atomic<uint64_t> asked_{0};
  std::atomic<uint64_t> placed_{0};
  std::atomic<uint64_t> wrong_{0};
  std::shared_ptr<std::atomic<uint64_t>> released_ = std::make_shared<std::atomic<uint64_t>>(0);
  std::thread thread_;
};

std::vector<std::byte> patterned(size_t n, char first, size_t seed) {
  std::vector<std::byte> b(n);
  for (size_t j = 0; j < n; ++j) b[j] = static_cast<std::byte>((j * 7 + seed * 13) % 251);
  if (n > 0) b[0] = static_cast<std::byte>(first);
  return b;
}

TEST_CASE("tcp transport: a placed body arrives where the placer said, whole and in order",
          "[common][tcp]") {
  // Large placed messages, large ones the placer declines and small ones, sent without
  // polling in between, so they arrive back to back (parts of one read).
  PlacingServer server;
  auto client = make_tcp_client_transport({});
  std::vector<std::vector<std::byte>> bodies;
  const char firsts[] = {'P', 'N', 'P', 'P', 's', 'P', 'N', 's', 'P'};
  for (size_t i = 0; i < std::size(firsts); ++i) {
    const size_t n = firsts[i] == 's' ? 1000 + i : (size_t{1} << 20) + i * 200'003;
    bodies.push_back(patterned(n, firsts[i], i));
  }
  std::vector<size_t> order;
  for (size_t i = 0; i < bodies.size(); ++i) {
    client->send(server.locator(), {.opcode = wire::Opcode::kEcho, .timeout_ns = 30'000'000'000},
                 bodies[i],
                 [&, i](Status s, const wire::MessageHeader&, std::span<const std::byte> b) {
                   REQUIRE(s == Status::kOk);
                   CHECK(std::equal(b.begin(), b.end(), bodies[i].begin(), bodies[i].end()));
                   order.push_back(i);
                 });
  }
  for (int rounds = 0; client->outstanding() > 0 && rounds < 10000; ++rounds) {
    client->poll(100'000'000);
  }
  CHECK(client->outstanding() == 0);
  CHECK(order == std::vector<size_t>{0, 1, 2, 3, 4, 5, 6, 7, 8});
  // The placer is asked about a large message only if its body was not wholly read with
  // its prefix (how much of it the socket had by then is up to the scheduler): at most
  // once per large one, and it places only the 'P' ones. A message that trickles in is
  // always asked about (the test of that below).
  CHECK(server.asked() <= 7);
  CHECK(server.placed() <= 5);
  CHECK(server.placed() <= server.asked());
  CHECK(server.released() == server.placed());  // each placement let go once its handler ran
  CHECK(server.wrong() == 0);
}

TEST_CASE("tcp transport: a placement whose peer goes away is let go, and serving goes on",
          "[common][tcp]") {
  PlacingServer server;
  int fd = raw_connect(server.locator());
  const auto body = patterned(size_t{2} << 20, 'P', 1);
  wire::MessageHeader h;
  h.opcode = static_cast<uint16_t>(wire::Opcode::kEcho);
  h.body_bytes = static_cast<uint32_t>(body.size());
  REQUIRE(::write(fd, &h, sizeof(h)) == static_cast<ssize_t>(sizeof(h)));
  const size_t half = body.size() / 2;
  size_t sent = 0;
  while (sent < half) {
    ssize_t n = ::write(fd, body.data() + sent, half - sent);
    REQUIRE(n > 0);
    sent += static_cast<size_t>(n);
  }
  for (int i = 0; i < 500 && server.asked() == 0; ++i) usleep(10'000);
  REQUIRE(server.asked() == 1);
  CHECK(server.released() == 0);  // half a body: still being received
  ::close(fd);
  for (int i = 0; i < 500 && server.released() == 0; ++i) usleep(10'000);
  CHECK(server.released() == 1);
  CHECK(server.placed() == 0);  // never handled
  auto client = make_tcp_client_transport({});
  const auto again = patterned(size_t{1} << 20, 'P', 2);
  auto r = call(*client, server.locator(),
                {.opcode = wire::Opcode::kEcho, .timeout_ns = 10'000'000'000}, again);
  REQUIRE(r.status == Status::kOk);
  CHECK(r.body == again);
  CHECK(server.placed() == 1);
}

TEST_CASE(
    "tcp transport: a server out of file descriptors closes new connections, then "
    "serves again",
    "[common][tcp]") {
  // In a child process, whose descriptor limit can be lowered without harm here. Without
  // the acceptor's spare descriptor, the connection would stay queued (and the server's
  // loop would spin on its listening socket): the client would never see it closed.
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    int code = 0;
    {
      rlimit limit{64, 64};
      if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) ::_exit(10);
      // Nothing but the transport runs while descriptors are out: no log lines (under
      // UBSan, checks in formatting code may need a pipe and report falsely without one).
      set_log_level(LogLevel::kSilent);
      EchoServer server;
      std::vector<int> fillers;
      for (int fd; (fd = ::open("/dev/null", O_RDONLY)) >= 0;) fillers.push_back(fd);
      // One descriptor left: the client's socket takes it, the server has none.
      ::close(fillers.back());
      fillers.pop_back();
      auto loc = parse_locator(server.locator());
      int client = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_port = htons(loc->port);
      inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
      if (client < 0 || ::connect(client, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
        code = 11;
      } else {
        timeval tv{5, 0};
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        char buf[16];
        ssize_t n = ::read(client, buf, sizeof(buf));
        if (n != 0 && !(n < 0 && errno == ECONNRESET)) code = 12;  // not closed by the server
        ::close(client);
      }
      for (int fd : fillers) ::close(fd);
      // Descriptors again: served as ever.
      if (code == 0) {
        auto transport = make_tcp_client_transport({});
        auto r = echo(*transport, server.locator(), "again");
        if (r.status != Status::kOk || r.body != bytes_of("again")) code = 13;
      }
    }
    ::_exit(code);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);  // 11: no connect, 12: not closed, 13: no echo after
}

TEST_CASE("tcp transport: a busy-polling server answers like a blocking one", "[common][tcp]") {
  EchoServer server(/*busy_poll=*/true);
  auto client = make_tcp_client_transport({});
  for (int i = 0; i < 20; ++i) CHECK(echo(*client, server.locator(), "ping").status == Status::kOk);
}

TEST_CASE("tcp transport: a server that is not there gives unavailable, not a hang",
          "[common][tcp]") {
  std::string locator;
  {
    EchoServer gone;
    locator = gone.locator();
  }
  auto client = make_tcp_client_transport({});
  auto r = call(*client, locator, {.opcode = wire::Opcode::kEcho, .timeout_ns = 2'000'000'000}, {});
  CHECK((r.status == Status::kUnavailable || r.status == Status::kTimeout));
}

TEST_CASE("tcp transport: a request that gets no answer times out", "[common][tcp]") {
  // A listening socket that never accepts: the request is sent but never answered.
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  REQUIRE(::listen(fd, 4) == 0);
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  std::string locator = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  auto client = make_tcp_client_transport({});
  uint64_t start = SystemClock::instance().now_ns();
  auto r = call(*client, locator, {.opcode = wire::Opcode::kEcho, .timeout_ns = 200'000'000}, {});
  CHECK(r.status == Status::kTimeout);
  CHECK(SystemClock::instance().now_ns() - start < 10'000'000'000ULL);  // bounded, not a hang
  ::close(fd);
}

TEST_CASE("tcp transport: garbage bytes close that connection and the server keeps serving",
          "[common][tcp]") {
  EchoServer server;
  auto client = make_tcp_client_transport({});
  int fd = raw_connect(server.locator());
  std::string garbage = "this is not a ramkv message, not even close to one.........";
  REQUIRE(::write(fd, garbage.data(), garbage.size()) == static_cast<ssize_t>(garbage.size()));
  CHECK(closed_by_peer(fd));
  ::close(fd);
  CHECK(echo(*client, server.locator(), "still here").status == Status::kOk);
}

TEST_CASE("tcp transport: a header announcing a huge body is refused", "[common][tcp]") {
  EchoServer server;
  int fd = raw_connect(server.locator());
  wire::MessageHeader h;
  h.opcode = static_cast<uint16_t>(wire::Opcode::kEcho);
  h.body_bytes = 0xffffffffu;
  REQUIRE(::write(fd, &h, sizeof(h)) == static_cast<ssize_t>(sizeof(h)));
  CHECK(closed_by_peer(fd));
  ::close(fd);
  auto client = make_tcp_client_transport({});
  CHECK(echo(*client, server.locator(), "after").status == Status::kOk);
}

TEST_CASE("tcp transport: a wrong protocol version is refused", "[common][tcp]") {
  EchoServer server;
  int fd = raw_connect(server.locator());
  wire::MessageHeader h;
  h.version = 99;
  REQUIRE(::write(fd, &h, sizeof(h)) == static_cast<ssize_t>(sizeof(h)));
  CHECK(closed_by_peer(fd));
  ::close(fd);
}

TEST_CASE("tcp transport: an unknown opcode gets bad request and the connection stays",
          "[common][tcp]") {
  EchoServer server;
  int fd = raw_connect(server.locator());
  for (int i = 0; i < 2; ++i) {
    wire::MessageHeader h;
    h.opcode = 999;
    h.request_id = 7;
    REQUIRE(::write(fd, &h, sizeof(h)) == static_cast<ssize_t>(sizeof(h)));
    wire::MessageHeader r;
    size_t got = 0;
    while (got < sizeof(r)) {
      ssize_t n = ::read(fd, reinterpret_cast<char*>(&r) + got, sizeof(r) - got);
      REQUIRE(n > 0);
      got += static_cast<size_t>(n);
    }
    CHECK(r.request_id == 7);
    CHECK((r.flags & wire::kFlagResponse) != 0);
    CHECK(static_cast<Status>(r.status) == Status::kBadRequest);
  }
  ::close(fd);
  CHECK(server.served() == 0);  // the handler never saw the unknown opcode
}

// Reads exactly `n` bytes, or fails the test after 10 s without them.
static void read_exactly(int fd, std::byte* into, size_t n) {
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::read(fd, into + got, n - got);
    INFO("read " << got << " of " << n << " bytes");
    REQUIRE(r > 0);
    got += static_cast<size_t>(r);
  }
}

TEST_CASE("tcp transport: a reply's kept pieces wait where they lie until sent, then are let go",
          "[common][tcp]") {
  // A backup's recovery data while its recovery master does not read: far more than the
  // socket holds, queued without a copy, the reply's keep holding the bytes until sent.
  auto source = std::make_shared<std::vector<std::byte>>(size_t{24} << 20);
  for (size_t j = 0; j < source->size(); ++j) {
    (*source)[j] = static_cast<std::byte>((j * 17) % 251);
  }
  std::vector<std::span<const std::byte>> runs;
  std::vector<std::byte> expected = {std::byte{'k'}};
  for (size_t at = 0, i = 0; at + 5000 < source->size(); ++i) {
    const size_t n = 500 + (i * 53) % 3000;
    runs.push_back(std::span<const std::byte>(*source).subspan(at, n));
    expected.insert(expected.end(), source->begin() + static_cast<ptrdiff_t>(at),
                    source->begin() + static_cast<ptrdiff_t>(at + n));
    at += n + 700;
  }
  REQUIRE(expected.size() > (size_t{12} << 20));
  std::atomic<int> served{0};
  auto server = make_tcp_server_transport({});
  REQUIRE(server->listen("127.0.0.1:0") == Status::kOk);
  std::thread loop([&] {
    server->run([&](const wire::MessageHeader&, std::span<const std::byte>, Reply& reply) {
      reply.body() = {std::byte{'k'}};
      for (const auto run : runs) reply.add_external(run);
      reply.set_keep(source);
      ++served;
    });
  });
  // Stops the server and joins its loop however the test ends (a failed REQUIRE too).
  struct Stop {
    ServerTransport& server;
    std::thread& loop;
    int fd = -1;
    ~Stop() {
      if (fd >= 0) ::close(fd);
      server.stop();
      loop.join();
    }
  } stop{*server, loop};
  // A small receive buffer, so that most of the reply waits at the server whatever the
  // host's TCP memory settings.
  auto loc = parse_locator(server->locator());
  REQUIRE(loc.ok());
  stop.fd = ::socket(AF_INET, SOCK_STREAM, 0);
  int small = 64 * 1024;
  setsockopt(stop.fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(loc->port);
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  REQUIRE(::connect(stop.fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  wire::MessageHeader h;
  h.opcode = static_cast<uint16_t>(wire::Opcode::kEcho);
  h.rpc_seq = 1;
  REQUIRE(::write(stop.fd, &h, sizeof(h)) == static_cast<ssize_t>(sizeof(h)));
  // Nothing read yet: the server answered, and holds what the socket did not take.
  for (int i = 0; i < 1000 && served.load() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  REQUIRE(served.load() == 1);
  // However long we wait: a copy would let go of `source` once made, within milliseconds.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(source.use_count() > 1);
  wire::MessageHeader rh;
  read_exactly(stop.fd, reinterpret_cast<std::byte*>(&rh), sizeof(rh));
  CHECK(rh.rpc_seq == 1);
  REQUIRE(rh.body_bytes == expected.size());
  std::vector<std::byte> body(rh.body_bytes);
  read_exactly(stop.fd, body.data(), body.size());
  CHECK(std::memcmp(body.data(), expected.data(), body.size()) == 0);  // not printed whole
  // Sent whole: the server lets go of the bytes (its loop drops them after the send).
  for (int i = 0; i < 500 && source.use_count() > 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(source.use_count() == 1);
}

TEST_CASE(
    "tcp transport: a large message that trickles in, then a small one behind it, are both "
    "answered",
    "[common][tcp]") {
  // However the server waits for the rest of a large body (received in place or not), it
  // must take every piece of one that comes slowly, and notice the small message that
  // arrives in the same piece as its end. (Written for a try at waking the reader only per
  // megabyte, with SO_RCVLOWAT: on this kernel replication writes then stalled for seconds
  // on a window the reader was never woken to open; the try was dropped, the test kept.)
  for (bool placing : {false, true}) {
    INFO((placing ? "placing server" : "echo server"));
    std::unique_ptr<EchoServer> echo_server;
    std::unique_ptr<PlacingServer> placing_server;
    std::string locator;
    if (placing) {
      placing_server = std::make_unique<PlacingServer>();
      locator = placing_server->locator();
    } else {
      echo_server = std::make_unique<EchoServer>();
      locator = echo_server->locator();
    }
    int fd = raw_connect(locator);
    const auto big = patterned((size_t{3} << 20) / 2, 'P', 3);  // 'P': placed
    const auto small = bytes_of("after the big one");
    wire::MessageHeader h;
    h.opcode = static_cast<uint16_t>(wire::Opcode::kEcho);
    h.rpc_seq = 1;
    h.body_bytes = static_cast<uint32_t>(big.size());
    std::vector<std::byte> stream(sizeof(h));
    std::memcpy(stream.data(), &h, sizeof(h));
    stream.insert(stream.end(), big.begin(), big.end());
    h.rpc_seq = 2;
    h.body_bytes = static_cast<uint32_t>(small.size());
    const size_t second = stream.size();
    stream.resize(second + sizeof(h));
    std::memcpy(stream.data() + second, &h, sizeof(h));
    stream.insert(stream.end(), small.begin(), small.end());
    // 100 KiB at a time, 3 ms apart; the last piece ends with the whole small message.
    for (size_t sent = 0; sent < stream.size();) {
      const size_t piece = sent + (100u << 10) >= second ? stream.size() - sent : 100u << 10;
      for (size_t done = 0; done < piece;) {
        ssize_t n = ::write(fd, stream.data() + sent + done, piece - done);
        REQUIRE(n > 0);
        done += static_cast<size_t>(n);
      }
      sent += piece;
      usleep(3'000);
    }
    for (const auto& expected : {big, small}) {
      wire::MessageHeader rh;
      read_exactly(fd, reinterpret_cast<std::byte*>(&rh), sizeof(rh));
      REQUIRE(rh.body_bytes == expected.size());
      std::vector<std::byte> body(rh.body_bytes);
      read_exactly(fd, body.data(), body.size());
      CHECK(body == expected);
    }
    if (placing) CHECK(placing_server->placed() == 1);
    ::close(fd);
  }
}

TEST_CASE("tcp transport: a truncated message waits, and a closed half-message is dropped",
          "[common][tcp]") {
  EchoServer server;
  int fd = raw_connect(server.locator());
  wire::MessageHeader h;
  h.opcode = static_cast<uint16_t>(wire::Opcode::kEcho);
  h.body_bytes = 100;
  REQUIRE(::write(fd, &h, 20) == 20);  // half a header, then the peer goes away
  ::close(fd);
  auto client = make_tcp_client_transport({});
  CHECK(echo(*client, server.locator(), "fine").status == Status::kOk);
  CHECK(server.served() == 1);
}

TEST_CASE("tcp transport: random byte streams never take the server down", "[common][tcp]") {
  EchoServer server;
  Random rng(42);
  for (int i = 0; i < 50; ++i) {
    int fd = raw_connect(server.locator());
    std::vector<uint8_t> junk(rng.uniform(200) + 1);
    for (auto& b : junk) b = static_cast<uint8_t>(rng.next());
    if (rng.uniform(2) == 0 && junk.size() >= 8) {
      uint32_t magic = wire::kMagic;  // a plausible start makes the parser go further
      std::memcpy(junk.data(), &magic, 4);
    }
    [[maybe_unused]] ssize_t n = ::write(fd, junk.data(), junk.size());
    ::close(fd);
  }
  auto client = make_tcp_client_transport({});
  CHECK(echo(*client, server.locator(), "survived").status == Status::kOk);
}

TEST_CASE("tcp transport: a loop task is told its descriptor is readable, so the loop sleeps",
          "[common][tcp]") {
  // A task whose descriptor is a client transport's (a master's replication, a recovery's
  // pulls) takes in its events only when told: with nothing outstanding, a connection whose
  // peer died left the descriptor readable, and every server's loop spun until the peer was
  // declared crashed.
  struct Task final : LoopTask {
    std::unique_ptr<ClientTransport> client = make_tcp_client_transport({});
    std::string peer;
    bool ready = false;
    std::atomic<uint64_t> runs{0};
    std::atomic<bool> answered{false};
    int wait_fd() const override { return client->wait_fd(); }
    void on_wait_fd_ready() override { ready = true; }
    uint64_t run() override {
      ++runs;
      if (runs == 1) {
        const auto body = bytes_of("hello");
        client->send(peer, {.opcode = wire::Opcode::kEcho, .timeout_ns = 5'000'000'000}, body,
                     [this](Status s, const wire::MessageHeader&, std::span<const std::byte>) {
                       answered = s == Status::kOk;
                     });
      }
      if (std::exchange(ready, false) || client->outstanding() > 0) client->poll(0);
      return UINT64_MAX;
    }
  };
  auto peer = std::make_unique<EchoServer>();
  Task task;
  task.peer = peer->locator();
  auto server = make_tcp_server_transport({});
  REQUIRE(server->listen("127.0.0.1:0") == Status::kOk);
  server->add_loop_task(&task);
  std::thread loop(
      [&] { server->run([](const wire::MessageHeader&, std::span<const std::byte>, Reply&) {}); });
  // A request of our own wakes the loop, which runs the task for the first time.
  auto client = make_tcp_client_transport({});
  CHECK(echo(*client, server->locator(), "wake up").status == Status::kOk);
  for (int i = 0; i < 500 && !task.answered; ++i) usleep(10'000);
  CHECK(task.answered);
  peer.reset();  // its connections close: the task's socket reports the hangup
  usleep(300'000);
  const uint64_t runs = task.runs;
  server->stop();
  loop.join();
  // A few passes to take in the hangup; a loop left spinning makes tens of thousands.
  CHECK(runs < 100);
}

}  // namespace ramkv
