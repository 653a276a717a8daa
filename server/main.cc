// ramkv-server: one storage host. It allocates the master's memory, listens, enlists with
// the coordinator and serves master RPCs on one dispatch thread until SIGTERM or SIGINT
// (docs/rpc.md, "Master"). The backup service arrives in a later issue.
//
// Exit codes: 0 after a clean stop; 1 when the coordinator cannot be reached or refuses
// us, or the memory cannot be had; 2 for bad flags or a bad configuration. Each failure
// ends with one line on stderr.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "common/clock.h"
#include "common/config.h"
#include "common/log.h"
#include "common/stop_signals.h"
#include "common/transport.h"
#include "common/wire_format.h"
#include "master/master_service.h"

namespace {

using ramkv::Status;

struct ServerOptions {
  std::string coordinator;
  std::string listen = "127.0.0.1:0";
  bool master = true;
  bool backup = false;
  std::string memory = "1G";
  std::string segment_bytes;
  std::string hash_table_bytes;
  std::string poll = "block";
  std::string log_level;
};

// How long to keep trying a coordinator that does not answer, and each attempt's timeout.
constexpr uint64_t kEnlistPatienceNs = 10'000'000'000;
constexpr uint64_t kEnlistAttemptNs = 1'000'000'000;

template <typename... Args>
int fail(int code, fmt::format_string<Args...> format, Args&&... args) {
  std::fprintf(stderr, "ramkv-server: %s\n",
               fmt::format(format, std::forward<Args>(args)...).c_str());
  return code;
}

void add_flags(CLI::App& app, ServerOptions& o) {
  app.add_option("--coordinator", o.coordinator, "coordinator locator HOST:PORT")->required();
  app.add_option("--listen", o.listen, "address to serve on, HOST:PORT (port 0: any free port)")
      ->capture_default_str();
  app.add_flag("--master,!--no-master", o.master, "run the master service (default on)");
  app.add_flag("--backup", o.backup, "run the backup service (not available yet)");
  app.add_option("--memory", o.memory, "log memory of the master, e.g. 1G")->capture_default_str();
  app.add_option("--segment-bytes", o.segment_bytes, "log segment size, e.g. 8M (default 8M)");
  app.add_option("--hash-table-bytes", o.hash_table_bytes,
                 "hash-table memory (default: memory / 16)");
  app.add_option("--poll", o.poll, "dispatch loop: busy (spin) or block (sleep in the kernel)")
      ->check(CLI::IsMember({"busy", "block"}))
      ->capture_default_str();
  app.add_option("--log-level", o.log_level, "debug, info, warning, error or silent");
}

// Turns the size flags into a MasterConfig; the error line names the flag.
ramkv::Result<ramkv::master::MasterConfig> master_config(const ServerOptions& o) {
  ramkv::master::MasterConfig config;
  // The server id is known only after enlisting, which happens after the memory is
  // allocated (so a host that cannot allocate never enlists); 0 marks "not enlisted".
  config.master_id = 0;
  auto memory = ramkv::parse_bytes(o.memory);
  if (!memory.ok()) {
    fail(2, "bad --memory '{}': expected a size such as 1G", o.memory);
    return Status::kInvalidArgument;
  }
  config.memory_bytes = *memory;
  if (!o.segment_bytes.empty()) {
    auto segment = ramkv::parse_bytes(o.segment_bytes);
    if (!segment.ok() || *segment > UINT32_MAX) {
      fail(2, "bad --segment-bytes '{}': expected a size such as 8M", o.segment_bytes);
      return Status::kInvalidArgument;
    }
    config.segment_bytes = static_cast<uint32_t>(*segment);
  }
  if (!o.hash_table_bytes.empty()) {
    auto table = ramkv::parse_bytes(o.hash_table_bytes);
    if (!table.ok() || *table == 0) {
      fail(2, "bad --hash-table-bytes '{}': expected a size such as 64M", o.hash_table_bytes);
      return Status::kInvalidArgument;
    }
    config.hash_table_bytes = *table;
  }
  return config;
}

// Enlists as a master, retrying while the coordinator is unreachable. The server id, or
// 0 after printing why not.
uint64_t enlist(const std::string& coordinator, const std::string& locator) {
  auto transport = ramkv::make_tcp_client_transport({});
  std::vector<std::byte> body;
  ramkv::wire::BodyWriter w(&body);
  w.put(ramkv::wire::EnlistServerRequest{.services = ramkv::wire::kServiceMaster,
                                         .locator_bytes = static_cast<uint32_t>(locator.size()),
                                         .replaces_id = 0});
  w.put_bytes(locator);
  const ramkv::Clock& clock = ramkv::SystemClock::instance();
  const uint64_t deadline = clock.now_ns() + kEnlistPatienceNs;
  Status last = Status::kUnavailable;
  while (!ramkv::stop_requested() && clock.now_ns() < deadline) {
    auto r = ramkv::call(
        *transport, coordinator,
        {.opcode = ramkv::wire::Opcode::kEnlistServer, .timeout_ns = kEnlistAttemptNs}, body);
    last = r.status;
    if (r.status == Status::kOk) {
      ramkv::wire::BodyReader in(r.body);
      ramkv::wire::EnlistServerResponse resp;
      if (!in.get(&resp) || !in.at_end() || resp.server_id == 0) {
        fail(1, "the coordinator at {} sent a malformed enlist reply", coordinator);
        return 0;
      }
      return resp.server_id;
    }
    if (!ramkv::status_is_retryable(r.status)) break;
    transport->disconnect(coordinator);  // reconnect from scratch next time
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  if (ramkv::stop_requested()) {
    fail(1, "stopped before enlisting");
  } else if (ramkv::status_is_retryable(last)) {
    fail(1, "cannot reach the coordinator at {} (gave up after {} s: {})", coordinator,
         kEnlistPatienceNs / 1'000'000'000, ramkv::status_name(last));
  } else {
    fail(1, "the coordinator at {} refused to enlist us: {}", coordinator,
         ramkv::status_name(last));
  }
  return 0;
}

int run_server(const ServerOptions& o) {
  auto config = master_config(o);
  if (!config.ok()) return 2;
  auto service = ramkv::master::MasterService::create(*config);
  if (!service.ok()) {
    // kInvalidArgument was explained on one line by MasterConfig::finalize.
    if (service.status() == Status::kInvalidArgument) return 2;
    return fail(1, "cannot allocate the master's memory ({}): {}", o.memory,
                ramkv::status_name(service.status()));
  }
  ramkv::TransportOptions topts;
  topts.busy_poll = o.poll == "busy";
  auto transport = ramkv::make_tcp_server_transport(topts);
  if (Status s = transport->listen(o.listen); s != Status::kOk) {
    return fail(s == Status::kInvalidArgument ? 2 : 1, "cannot listen on {}: {}", o.listen,
                ramkv::status_name(s));
  }
  ramkv::stop_on_signal(transport.get());
  // The locator the transport really bound (port 0 picks one) is the one clients need.
  const std::string locator = transport->locator();
  if (locator.starts_with("0.0.0.0:")) {
    LOG_WARNING(
        "enlisting as {}: clients on other hosts cannot use that address; pass --listen "
        "with this host's address",
        locator);
  }
  uint64_t server_id = enlist(o.coordinator, locator);
  if (server_id == 0) {
    // The transport dies on return: a signal must not reach it through the handler.
    ramkv::stop_on_signal<ramkv::ServerTransport>(nullptr);
    return 1;
  }
  LOG_INFO("server {} listening on {} (master; {} of log memory)", server_id, locator,
           ramkv::format_bytes((*service)->objects().config().memory_bytes));
  ramkv::master::MasterService& master = **service;
  transport->run([&master](const ramkv::wire::MessageHeader& h, std::span<const std::byte> body,
                           ramkv::Reply& reply) { master.handle(h, body, reply); });
  ramkv::stop_on_signal<ramkv::ServerTransport>(nullptr);
  LOG_INFO("server {} stopped", server_id);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ramkv-server: a ramkv storage server (master service)"};
  ServerOptions options;
  add_flags(app, options);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return fail(2, "{} (see --help)", e.what());
  }
  if (!options.log_level.empty()) {
    ramkv::LogLevel level;
    if (!ramkv::parse_log_level(options.log_level, &level)) {
      return fail(2, "bad --log-level '{}': expected debug, info, warning, error or silent",
                  options.log_level);
    }
    ramkv::set_log_level(level);
  }
  if (options.backup) {
    return fail(2, "--backup: the backup service is not available yet (run with --master only)");
  }
  if (!options.master) return fail(2, "nothing to run: --no-master and no --backup");
  if (auto loc = ramkv::parse_locator(options.coordinator); !loc.ok()) {
    return fail(2, "bad --coordinator '{}': expected HOST:PORT", options.coordinator);
  }
  if (auto loc = ramkv::parse_locator(options.listen); !loc.ok()) {
    return fail(2, "bad --listen '{}': expected HOST:PORT", options.listen);
  }
  ramkv::install_stop_signals();
  return run_server(options);
}
