#include "coordinator/coordinator_service.h"

#include <fmt/format.h>

#include <map>
#include <set>

#include "common/log.h"

namespace ramkv::coordinator {

namespace {

constexpr uint32_t kKnownServices = wire::kServiceMaster | wire::kServiceBackup;

// Reads a length-prefixed table name request (TableNameRequest + name), exactly.
bool read_table_name(wire::BodyReader& in, std::string_view* name) {
  wire::TableNameRequest req;
  return in.get(&req) && in.get_string(req.name_bytes, name) && in.at_end();
}

bool valid_table_name(std::string_view name) {
  return !name.empty() && name.size() <= CoordinatorService::kMaxTableNameBytes;
}

void put_server_entry(wire::BodyWriter& w, uint64_t id, const ServerInfo* s) {
  wire::ServerEntry e;
  e.server_id = id;
  // A server that was replaced is reported as removed, with no locator.
  e.status = static_cast<uint8_t>(s != nullptr ? s->status : ServerStatus::kRemoved);
  e.services = s != nullptr ? s->services : 0;
  std::string_view locator = s != nullptr ? std::string_view(s->locator) : std::string_view();
  e.locator_bytes = static_cast<uint32_t>(locator.size());
  w.put(e);
  w.put_bytes(locator);
}

}  // namespace

std::string server_id_string(uint64_t id) {
  return fmt::format("{}.{}", server_index(id), server_generation(id));
}

Result<std::unique_ptr<CoordinatorService>> CoordinatorService::create(
    const CoordinatorOptions& options, std::unique_ptr<ExternalStore> store) {
  std::unique_ptr<CoordinatorService> service(new CoordinatorService(options, std::move(store)));
  auto bytes = service->store_->get();
  if (bytes.ok()) {
    auto loaded = CoordinatorState::deserialize(*bytes);
    if (!loaded.ok()) {
      LOG_ERROR("the stored coordinator state is unreadable: {}", status_name(loaded.status()));
      return loaded.status();
    }
    service->state_ = std::move(*loaded);
    LOG_INFO("loaded coordinator state: {} servers, {} tables", service->state_.servers().size(),
             service->state_.table_count());
  } else if (bytes.status() != Status::kObjectNotFound) {
    return bytes.status();
  }
  Status s = service->transport_->listen(options.listen_locator);
  if (s != Status::kOk) return s;
  service->send_tablets(wire::Opcode::kTakeTablets, service->state_.tablets(0), false);
  return service;
}

CoordinatorService::CoordinatorService(const CoordinatorOptions& options,
                                       std::unique_ptr<ExternalStore> store)
    : options_(options),
      store_(std::move(store)),
      notifier_(std::make_unique<MasterNotifier>(
          MasterNotifier::Options{.timeout_ns = options.master_rpc_timeout_ns})),
      transport_(make_tcp_server_transport(TransportOptions{.busy_poll = options.busy_poll})) {}

CoordinatorService::~CoordinatorService() = default;

void CoordinatorService::run() {
  transport_->run([this](const wire::MessageHeader& h, std::span<const std::byte> body,
                         Reply& reply) { handle(h, body, reply); });
}

void CoordinatorService::handle(const wire::MessageHeader& request, std::span<const std::byte> body,
                                Reply& reply) {
  wire::BodyReader in(body);
  Status s = Status::kBadRequest;
  switch (static_cast<wire::Opcode>(request.opcode)) {
    case wire::Opcode::kEcho:
      reply.writer().put_bytes(body);
      s = Status::kOk;
      break;
    case wire::Opcode::kEnlistServer:
      s = enlist_server(in, reply);
      break;
    case wire::Opcode::kGetServerList:
      s = get_server_list(in, reply);
      break;
    case wire::Opcode::kCreateTable:
      s = create_table(in, reply);
      break;
    case wire::Opcode::kDropTable:
      s = drop_table(in, reply);
      break;
    case wire::Opcode::kGetTableId:
      s = get_table_id(in, reply);
      break;
    case wire::Opcode::kGetTabletMap:
      s = get_tablet_map(in, reply);
      break;
    case wire::Opcode::kSetReplicationEpoch:
      s = set_replication_epoch(in, reply);
      break;
    case wire::Opcode::kGetReplicationEpochs:
      s = get_replication_epochs(in, reply);
      break;
    default:
      break;  // a master's opcode: not served here
  }
  if (s != Status::kOk) reply.body().clear();
  reply.set_status(s);
}

Status CoordinatorService::enlist_server(wire::BodyReader& in, Reply& reply) {
  wire::EnlistServerRequest req;
  std::string_view locator;
  if (!in.get(&req) || !in.get_string(req.locator_bytes, &locator) || !in.at_end()) {
    return Status::kBadRequest;
  }
  auto parsed = parse_locator(locator);
  if (req.services == 0 || (req.services & ~kKnownServices) != 0 ||
      locator.size() > kMaxLocatorBytes || !parsed.ok() || parsed->port == 0) {
    return Status::kBadRequest;
  }
  CoordinatorState next = state_;
  auto enlisted = next.enlist(req.services, locator, req.replaces_id);
  if (Status s = commit(std::move(next)); s != Status::kOk) return s;
  LOG_INFO("enlisted server {} at {} (services {}{}){}", server_id_string(enlisted.server_id),
           locator, (req.services & wire::kServiceMaster) != 0 ? "master " : "",
           (req.services & wire::kServiceBackup) != 0 ? "backup" : "",
           enlisted.replaced_id != 0
               ? fmt::format(", replacing {}", server_id_string(enlisted.replaced_id))
               : std::string());
  reply.writer().put(wire::EnlistServerResponse{.server_id = enlisted.server_id});
  broadcast_server_list();
  if (enlisted.replaced_id != 0) {
    // Not waited for: the new master is not serving until it has this reply.
    send_tablets(wire::Opcode::kTakeTablets, state_.tablets_of(enlisted.server_id), false);
  }
  return Status::kOk;
}

Status CoordinatorService::get_server_list(wire::BodyReader& in, Reply& reply) {
  if (!in.at_end()) return Status::kBadRequest;
  encode_server_list(&reply.body());
  return Status::kOk;
}

void CoordinatorService::encode_server_list(std::vector<std::byte>* body) const {
  wire::BodyWriter w(body);
  const auto& servers = state_.servers();
  w.put(wire::ServerListHeader{.version = state_.server_list_version(),
                               .count = static_cast<uint32_t>(servers.size())});
  for (const auto& s : servers) put_server_entry(w, s.id, &s);
}

void CoordinatorService::broadcast_server_list() {
  std::vector<std::byte> body;
  encode_server_list(&body);
  std::vector<MasterNotifier::Message> messages;
  for (const auto& s : state_.servers()) {
    if (s.status != ServerStatus::kUp) continue;
    messages.push_back(
        {.locator = s.locator, .opcode = wire::Opcode::kServerListUpdate, .body = body});
  }
  if (!messages.empty()) notifier_->post(std::move(messages));
}

Status CoordinatorService::create_table(wire::BodyReader& in, Reply& reply) {
  wire::CreateTableRequest req;
  std::string_view name;
  if (!in.get(&req) || !in.get_string(req.name_bytes, &name) || !in.at_end() ||
      !valid_table_name(name) || req.tablet_count > CoordinatorState::kMaxTabletsPerTable) {
    return Status::kBadRequest;
  }
  if (auto existing = state_.table_id(name)) {
    reply.writer().put(wire::TableIdResponse{.table_id = *existing});
    return Status::kOk;
  }
  auto masters = state_.up_masters();
  if (masters.empty()) return Status::kRetry;
  CoordinatorState next = state_;
  uint64_t id = next.create_table(name, req.tablet_count, masters);
  if (Status s = commit(std::move(next)); s != Status::kOk) return s;
  auto tablets = state_.tablets(id);
  LOG_INFO("created table '{}' id {}: {} tablets over {} masters", name, id, tablets.size(),
           std::min(tablets.size(), masters.size()));
  reply.writer().put(wire::TableIdResponse{.table_id = id});
  send_tablets(wire::Opcode::kTakeTablets, tablets, true);
  return Status::kOk;
}

Status CoordinatorService::drop_table(wire::BodyReader& in, Reply&) {
  std::string_view name;
  if (!read_table_name(in, &name) || !valid_table_name(name)) return Status::kBadRequest;
  CoordinatorState next = state_;
  auto dropped = next.drop_table(name);
  if (!dropped.ok()) return dropped.status();
  if (Status s = commit(std::move(next)); s != Status::kOk) return s;
  LOG_INFO("dropped table '{}' ({} tablets)", name, dropped->size());
  send_tablets(wire::Opcode::kDropTablets, *dropped, true);
  return Status::kOk;
}

Status CoordinatorService::get_table_id(wire::BodyReader& in, Reply& reply) {
  std::string_view name;
  if (!read_table_name(in, &name) || !valid_table_name(name)) return Status::kBadRequest;
  auto id = state_.table_id(name);
  if (!id) return Status::kUnknownTable;
  reply.writer().put(wire::TableIdResponse{.table_id = *id});
  return Status::kOk;
}

Status CoordinatorService::get_tablet_map(wire::BodyReader& in, Reply& reply) {
  wire::TabletMapRequest req;
  if (!in.get(&req) || !in.at_end()) return Status::kBadRequest;
  if (req.table_id != 0 && !state_.has_table(req.table_id)) return Status::kUnknownTable;
  auto tablets = state_.tablets(req.table_id);
  std::vector<uint64_t> server_ids;
  std::set<uint64_t> seen;
  for (const auto& t : tablets) {
    if (seen.insert(t.server_id).second) server_ids.push_back(t.server_id);
  }
  auto w = reply.writer();
  w.put(wire::TabletMapHeader{.version = state_.tablet_map_version(),
                              .count = static_cast<uint32_t>(tablets.size()),
                              .server_count = static_cast<uint32_t>(server_ids.size())});
  for (const auto& t : tablets) {
    w.put(wire::TabletWire{.table_id = t.table_id,
                           .start_hash = t.start_hash,
                           .end_hash = t.end_hash,
                           .server_id = t.server_id});
  }
  for (uint64_t id : server_ids) put_server_entry(w, id, state_.find_server(id));
  return Status::kOk;
}

Status CoordinatorService::set_replication_epoch(wire::BodyReader& in, Reply&) {
  wire::ReplicationEpochEntry req;
  if (!in.get(&req) || !in.at_end()) return Status::kBadRequest;
  // An id never given out is a malformed request; one given out but replaced since, or a
  // master declared crashed, is a zombie that must learn it.
  if (!state_.issued(req.master_id)) return Status::kBadRequest;
  const ServerInfo* server = state_.find_server(req.master_id);
  if (server == nullptr) return Status::kFenced;
  if ((server->services & wire::kServiceMaster) == 0) return Status::kBadRequest;
  if (server->status != ServerStatus::kUp) return Status::kFenced;
  const ReplicationEpoch e{.segment_id = req.segment_id, .epoch = req.epoch};
  CoordinatorState next = state_;
  if (!next.set_replication_epoch(req.master_id, e)) return Status::kOk;  // nothing new
  // Persisted before the reply: once the master hears kOk, recovery will see this epoch.
  if (Status s = commit(std::move(next)); s != Status::kOk) return s;
  LOG_INFO("master {}: replication epoch of segment {} is now {}", server_id_string(req.master_id),
           req.segment_id, req.epoch);
  return Status::kOk;
}

Status CoordinatorService::get_replication_epochs(wire::BodyReader& in, Reply& reply) {
  if (!in.at_end()) return Status::kBadRequest;
  const auto& epochs = state_.replication_epochs();
  auto w = reply.writer();
  w.put(wire::ReplicationEpochsHeader{.count = static_cast<uint32_t>(epochs.size())});
  for (const auto& [master_id, e] : epochs) {  // std::map: increasing master id
    w.put(wire::ReplicationEpochEntry{
        .master_id = master_id, .segment_id = e.segment_id, .epoch = e.epoch});
  }
  return Status::kOk;
}

Status CoordinatorService::commit(CoordinatorState next) {
  auto bytes = next.serialize();
  if (Status s = store_->put(bytes); s != Status::kOk) {
    LOG_ERROR("cannot persist the coordinator state: {}", status_name(s));
    return Status::kIoError;
  }
  state_ = std::move(next);
  return Status::kOk;
}

void CoordinatorService::send_tablets(wire::Opcode opcode, const std::vector<Tablet>& tablets,
                                      bool wait) {
  std::map<uint64_t, std::vector<const Tablet*>> by_server;
  for (const auto& t : tablets) by_server[t.server_id].push_back(&t);
  std::vector<MasterNotifier::Message> messages;
  for (const auto& [id, owned] : by_server) {
    const ServerInfo* server = state_.find_server(id);
    if (server == nullptr || server->status != ServerStatus::kUp) {
      LOG_WARNING("not sending {} to server {}: it is not up", wire::opcode_name(opcode),
                  server_id_string(id));
      continue;
    }
    MasterNotifier::Message m{.locator = server->locator, .opcode = opcode, .body = {}};
    wire::BodyWriter w(&m.body);
    w.put(wire::TabletListHeader{.count = static_cast<uint32_t>(owned.size())});
    for (const Tablet* t : owned) {
      w.put(wire::TabletWire{.table_id = t->table_id,
                             .start_hash = t->start_hash,
                             .end_hash = t->end_hash,
                             .server_id = t->server_id});
    }
    messages.push_back(std::move(m));
  }
  if (messages.empty()) return;
  uint64_t ticket = notifier_->post(std::move(messages));
  if (wait && !notifier_->wait(ticket, options_.master_rpc_timeout_ns + 1'000'000'000)) {
    LOG_WARNING("{}: some masters did not answer in time", wire::opcode_name(opcode));
  }
}

}  // namespace ramkv::coordinator
