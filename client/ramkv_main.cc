// ramkv: the command-line client. Tables, objects and cluster status over the client
// library (include/ramkv/client.h). TABLE arguments are table names, resolved to ids.
//
// Output goes to stdout; an error is one line "ramkv: <command>: <status>" on stderr and
// exit status 1 (2 for bad command-line input).
#include <CLI/CLI.hpp>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/config.h"
#include "common/log.h"
#include "common/transport.h"
#include "common/wire_format.h"
#include "ramkv/client.h"

namespace {

using ramkv::Client;
using ramkv::Result;
using ramkv::Status;

struct Args {
  std::string coordinator = "127.0.0.1:12246";
  std::string timeout = "5s";
  std::string table;
  std::string key;
  std::string value;
  int64_t delta = 1;
  uint32_t tablet_count = 0;
  std::string transport = "tcp";
  std::string rdma_device;
  uint32_t rdma_port = 1;
};

int fail(const std::string& command, Status s) {
  std::fprintf(stderr, "ramkv: %s: %.*s\n", command.c_str(),
               static_cast<int>(ramkv::status_name(s).size()), ramkv::status_name(s).data());
  return 1;
}

void print_line(std::string_view text) {
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fputc('\n', stdout);
}

void add_commands(CLI::App& app, Args& a) {
  auto* create = app.add_subcommand("create-table", "create a table (or get an existing one's id)");
  create->add_option("NAME", a.table, "table name")->required();
  create->add_option("--tablets", a.tablet_count, "number of tablets (0: one per master)");
  app.add_subcommand("drop-table", "drop a table and all its objects")
      ->add_option("NAME", a.table, "table name")
      ->required();
  auto* put = app.add_subcommand("put", "write an object");
  put->add_option("TABLE", a.table, "table name")->required();
  put->add_option("KEY", a.key)->required();
  put->add_option("VALUE", a.value)->required();
  auto* get = app.add_subcommand("get", "read an object and print its value");
  get->add_option("TABLE", a.table, "table name")->required();
  get->add_option("KEY", a.key)->required();
  auto* del = app.add_subcommand("del", "remove an object");
  del->add_option("TABLE", a.table, "table name")->required();
  del->add_option("KEY", a.key)->required();
  auto* incr = app.add_subcommand("incr", "add DELTA (default 1) to an 8-byte counter, print it");
  incr->add_option("TABLE", a.table, "table name")->required();
  incr->add_option("KEY", a.key)->required();
  incr->add_option("DELTA", a.delta, "amount to add; put -- before a negative one");
  app.add_subcommand("scan",
                     "print every object of a table as key<TAB>value, one per line (\\xNN escapes)")
      ->add_option("TABLE", a.table, "table name")
      ->required();
  app.add_subcommand("servers", "list the servers the coordinator knows");
  app.add_subcommand("tablets", "list the tablets of one table, or of all")
      ->add_option("TABLE", a.table, "table name (default: every table)");
  app.add_subcommand("stats", "print every live server's statistics");
}

// Runs one resolved command; returns the exit status.
int resolve_table(Client& c, const std::string& command, const std::string& name, uint64_t* id) {
  auto r = c.get_table_id(name);
  if (!r.ok()) return fail(command, r.status());
  *id = *r;
  return 0;
}

int cmd_tables(Client& c, const std::string& command, const Args& a) {
  if (command == "create-table") {
    auto r = c.create_table(a.table, a.tablet_count);
    if (!r.ok()) return fail(command, r.status());
    std::printf("%" PRIu64 "\n", *r);
    return 0;
  }
  auto r = c.drop_table(a.table);
  return r.ok() ? 0 : fail(command, r.status());
}

int cmd_object(Client& c, const std::string& command, const Args& a, uint64_t table_id) {
  if (command == "put") {
    auto r = c.write(table_id, a.key, a.value);
    return r.ok() ? 0 : fail(command, r.status());
  }
  if (command == "get") {
    auto r = c.read(table_id, a.key);
    if (!r.ok()) return fail(command, r.status());
    print_line(r->value);
    return 0;
  }
  if (command == "del") {
    auto r = c.remove(table_id, a.key);
    return r.ok() ? 0 : fail(command, r.status());
  }
  if (command == "incr") {
    auto r = c.increment(table_id, a.key, a.delta);
    if (!r.ok()) return fail(command, r.status());
    std::printf("%" PRId64 "\n", r->value);
    return 0;
  }
  auto r = c.enumerate(table_id);  // scan
  if (!r.ok()) return fail(command, r.status());
  // One object per line: bytes that would break the line (control characters, the
  // integers `incr` stores) are written as \xNN escapes.
  auto escaped = [](std::string_view s) {
    std::string out;
    for (char byte : s) {
      auto ch = static_cast<unsigned char>(byte);
      if (ch >= 0x20 && ch < 0x7f && ch != '\\') {
        out.push_back(static_cast<char>(ch));
      } else {
        char buf[5];
        std::snprintf(buf, sizeof(buf), "\\x%02x", ch);
        out += buf;
      }
    }
    return out;
  };
  for (const auto& o : *r) {
    std::string line = escaped(o.key) + '\t' + escaped(o.value) + '\n';
    std::fwrite(line.data(), 1, line.size(), stdout);
  }
  return 0;
}

const char* server_status_name(ramkv::ServerStatus s) {
  switch (s) {
    case ramkv::ServerStatus::kUp:
      return "up";
    case ramkv::ServerStatus::kCrashed:
      return "crashed";
    case ramkv::ServerStatus::kRemoved:
      return "removed";
  }
  return "unknown";
}

std::string services_text(const ramkv::ServerInfo& s) {
  if (s.master && s.backup) return "master,backup";
  return s.master ? "master" : (s.backup ? "backup" : "-");
}

int cmd_servers(Client& c) {
  auto r = c.servers();
  if (!r.ok()) return fail("servers", r.status());
  std::printf("%-12s %-14s %-8s %s\n", "ID", "SERVICES", "STATUS", "LOCATOR");
  for (const auto& s : *r) {
    std::printf("%-12s %-14s %-8s %s\n", ramkv::wire::server_id_text(s.server_id).c_str(),
                services_text(s).c_str(), server_status_name(s.status), s.locator.c_str());
  }
  return 0;
}

int cmd_tablets(Client& c, const Args& a) {
  uint64_t table_id = 0;
  if (!a.table.empty()) {
    if (int rc = resolve_table(c, "tablets", a.table, &table_id); rc != 0) return rc;
  }
  auto r = c.tablets(table_id);
  if (!r.ok()) return fail("tablets", r.status());
  std::printf("%-8s %-18s %-18s %-12s %s\n", "TABLE", "START_HASH", "END_HASH", "SERVER",
              "LOCATOR");
  for (const auto& t : *r) {
    std::printf("%-8" PRIu64 " 0x%016" PRIx64 " 0x%016" PRIx64 " %-12s %s\n", t.table_id,
                t.start_hash, t.end_hash, ramkv::wire::server_id_text(t.server_id).c_str(),
                t.locator.c_str());
  }
  return 0;
}

int cmd_stats(Client& c) {
  auto r = c.servers();
  if (!r.ok()) return fail("stats", r.status());
  int rc = 0;
  for (const auto& s : *r) {
    if (s.status != ramkv::ServerStatus::kUp) continue;
    auto stats = c.server_stats(s.locator);
    if (!stats.ok()) {
      rc = fail("stats: " + s.locator, stats.status());
      continue;
    }
    std::printf("# server %s %s\n%s", ramkv::wire::server_id_text(s.server_id).c_str(),
                s.locator.c_str(), stats->c_str());
    if (!stats->empty() && stats->back() != '\n') std::fputc('\n', stdout);
  }
  return rc;
}

int run(const std::string& command, const Args& a) {
  auto timeout_ns = ramkv::parse_duration_ns(a.timeout);
  if (!timeout_ns.ok() || *timeout_ns < 1'000'000) {
    std::fprintf(stderr, "ramkv: --timeout: expected a duration such as 5s or 500ms, got '%s'\n",
                 a.timeout.c_str());
    return 2;
  }
  // Bad command-line input exits 2 (file comment), not 1.
  if (!ramkv::parse_locator(a.coordinator).ok()) {
    std::fprintf(stderr, "ramkv: --coordinator: expected HOST:PORT, got '%s'\n",
                 a.coordinator.c_str());
    return 2;
  }
  ramkv::ClientOptions options{.coordinator = a.coordinator, .timeout_ms = *timeout_ns / 1'000'000};
  options.rpc_timeout_ms = std::min(options.rpc_timeout_ms, options.timeout_ms);
  options.transport = a.transport;
  options.rdma_device = a.rdma_device;
  options.rdma_port = a.rdma_port;
  auto client = Client::connect(options);
  // The locator and timeouts were checked above, so kInvalidArgument here is the RDMA
  // device or port, which the library has just logged.
  if (!client.ok() && client.status() == Status::kInvalidArgument) {
    std::fprintf(stderr, "ramkv: --transport rdma: cannot use that RDMA device or port (above)\n");
    return 2;
  }
  if (!client.ok()) return fail(command, client.status());
  Client& c = **client;
  if (command == "create-table" || command == "drop-table") return cmd_tables(c, command, a);
  if (command == "servers") return cmd_servers(c);
  if (command == "tablets") return cmd_tablets(c, a);
  if (command == "stats") return cmd_stats(c);
  uint64_t table_id = 0;
  if (int rc = resolve_table(c, command, a.table, &table_id); rc != 0) return rc;
  return cmd_object(c, command, a, table_id);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ramkv: command-line client for a ramkv cluster"};
  app.require_subcommand(1);
  Args a;
  app.add_option("--coordinator", a.coordinator, "coordinator HOST:PORT")->capture_default_str();
  app.add_option("--timeout", a.timeout, "per-operation timeout (500ms, 5s, ...)")
      ->capture_default_str();
  app.add_option("--transport", a.transport, "the cluster's transport: tcp or rdma")
      ->check(CLI::IsMember({"tcp", "rdma"}))
      ->capture_default_str();
  app.add_option("--rdma-device", a.rdma_device,
                 "rdma: the device, as ibv_devices names it (default: the first)");
  app.add_option("--rdma-port", a.rdma_port, "rdma: the device port")
      ->check(CLI::Range(1, 255))
      ->capture_default_str();
  add_commands(app, a);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::fprintf(stderr, "%s: %s (see --help)\n", "ramkv", e.what());
    return 2;
  }
  // A command-line tool prints its answer and its errors, not the library's progress
  // lines (RAMKV_LOG_LEVEL still overrides; the verbs emulation reads it too).
  if (std::getenv("RAMKV_LOG_LEVEL") == nullptr) {
    ::setenv("RAMKV_LOG_LEVEL", "warning", 0);
    ramkv::set_log_level(ramkv::LogLevel::kWarning);
  }
  if (!Client::transport_available(a.transport)) {
    std::fprintf(stderr,
                 "ramkv: --transport %s: this build has no such transport (RDMA needs the "
                 "libibverbs headers at build time)\n",
                 a.transport.c_str());
    return 2;
  }
  return run(app.get_subcommands().front()->get_name(), a);
}
