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

std::string server_id_string(uint64_t id) { return wire::server_id_text(id); }

Result<std::unique_ptr<CoordinatorService>> CoordinatorService::create(
    const CoordinatorOptions& options, std::unique_ptr<ExternalStore> store,
    std::unique_ptr<ServerTransport> transport) {
  std::unique_ptr<CoordinatorService> service(
      new CoordinatorService(options, std::move(store), std::move(transport)));
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
  service->transport_->add_loop_task(service->verifier_.get());
  service->transport_->add_loop_task(service->recovery_.get());
  service->send_tablets(wire::Opcode::kTakeTablets, service->state_.tablets(0), false);
  // Recoveries the previous coordinator did not finish carry on (recovery_manager.h).
  service->recovery_->check();
  return service;
}

CoordinatorService::CoordinatorService(const CoordinatorOptions& options,
                                       std::unique_ptr<ExternalStore> store,
                                       std::unique_ptr<ServerTransport> transport)
    : options_(options),
      store_(std::move(store)),
      notifier_(std::make_unique<MasterNotifier>(
          MasterNotifier::Options{.timeout_ns = options.master_rpc_timeout_ns})),
      verifier_(std::make_unique<FailureVerifier>(
          FailureVerifier::Options{.timeout_ns = options.verify_timeout_ns,
                                   .attempts = options.verify_attempts},
          [this](uint64_t id) { declare_crashed(id); })),
      recovery_(std::make_unique<RecoveryManager>(
          RecoveryOptions{.partition_bytes = options.recovery_partition_bytes,
                          .retry_delay_ns = options.recovery_retry_ns},
          static_cast<RecoveryHost&>(*this), SystemClock::instance())),
      transport_(transport != nullptr ? std::move(transport)
                                      : make_tcp_server_transport(
                                            TransportOptions{.busy_poll = options.busy_poll})) {}

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
    case wire::Opcode::kReportBackupReplicas:
      s = report_backup_replicas(in, reply);
      break;
    case wire::Opcode::kGetBackupReplicas:
      s = get_backup_replicas(in, reply);
      break;
    case wire::Opcode::kRecoveryMasterFinished:
      s = recovery_->master_finished(body, reply);
      break;
    case wire::Opcode::kGetRecoveries:
      s = get_recoveries(in, reply);
      break;
    case wire::Opcode::kHintServerCrashed:
      s = hint_server_crashed(in, reply);
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
  // A replaced master's tablets are recovered; a new master may be what a waiting
  // recovery needs.
  recovery_->check();
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

void CoordinatorService::broadcast_server_list(uint64_t also_to) {
  std::vector<std::byte> body;
  encode_server_list(&body);
  std::vector<MasterNotifier::Message> messages;
  for (const auto& s : state_.servers()) {
    if (s.status != ServerStatus::kUp && s.id != also_to) continue;
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

Status CoordinatorService::report_backup_replicas(wire::BodyReader& in, Reply&) {
  wire::BackupReportHeader header;
  if (!in.get(&header) || header.count > in.remaining() / sizeof(wire::ReplicaEntry)) {
    return Status::kBadRequest;
  }
  std::vector<wire::ReplicaEntry> replicas(header.count);
  for (auto& r : replicas) {
    if (!in.get(&r)) return Status::kBadRequest;
  }
  if (!in.at_end() || !state_.issued(header.backup_id)) return Status::kBadRequest;
  const ServerInfo* server = state_.find_server(header.backup_id);
  if (server == nullptr || server->status != ServerStatus::kUp) return Status::kFenced;
  if ((server->services & wire::kServiceBackup) == 0) return Status::kBadRequest;
  std::set<uint64_t> masters;
  size_t damaged = 0;
  for (const auto& r : replicas) {
    masters.insert(r.master_id);
    damaged += r.status != wire::kReplicaOk;
  }
  std::string names;
  for (uint64_t m : masters) names += (names.empty() ? "" : ", ") + server_id_string(m);
  LOG_INFO("backup {} holds {} replicas from before its restart ({} torn or corrupt){}{}",
           server_id_string(header.backup_id), replicas.size(), damaged,
           masters.empty() ? "" : " of masters ", names);
  // Reports of backups that are gone are dropped as they are replaced.
  for (auto it = backup_reports_.begin(); it != backup_reports_.end();) {
    const ServerInfo* s = state_.find_server(it->first);
    it = s == nullptr || s->status != ServerStatus::kUp ? backup_reports_.erase(it) : std::next(it);
  }
  backup_reports_[header.backup_id] = std::move(replicas);
  return Status::kOk;
}

Status CoordinatorService::get_backup_replicas(wire::BodyReader& in, Reply& reply) {
  if (!in.at_end()) return Status::kBadRequest;
  size_t count = 0;
  for (const auto& [backup, replicas] : backup_reports_) count += replicas.size();
  if (sizeof(wire::BackupReplicasHeader) + count * sizeof(wire::ReportedReplica) >
      wire::kMaxBodyBytes) {
    return Status::kInternal;  // too many to answer in one message
  }
  auto w = reply.writer();
  w.put(wire::BackupReplicasHeader{.count = static_cast<uint32_t>(count)});
  for (const auto& [backup, replicas] : backup_reports_) {  // std::map: by backup id
    for (const auto& r : replicas) w.put(wire::ReportedReplica{.backup_id = backup, .replica = r});
  }
  return Status::kOk;
}

Status CoordinatorService::hint_server_crashed(wire::BodyReader& in, Reply&) {
  wire::ServerIdRequest req;
  if (!in.get(&req) || !in.at_end() || !state_.issued(req.server_id)) return Status::kBadRequest;
  const ServerInfo* server = state_.find_server(req.server_id);
  // Replaced, crashed or removed already: nothing to verify. The reply goes out before
  // the verification ends; the hint's sender learns the outcome from the server list.
  if (server == nullptr || server->status != ServerStatus::kUp) return Status::kOk;
  verifier_->suspect(server->id, server->locator);
  return Status::kOk;
}

Status CoordinatorService::declare_crashed(uint64_t id) {
  const ServerInfo* server = state_.find_server(id);
  if (server == nullptr || server->status != ServerStatus::kUp) return Status::kOk;
  const bool master = (server->services & wire::kServiceMaster) != 0;
  const std::string locator = server->locator;
  CoordinatorState next = state_;
  next.mark_crashed(id);
  if (Status s = commit(std::move(next)); s != Status::kOk) {
    LOG_ERROR("server {} did not answer, but cannot be declared crashed: {}", server_id_string(id),
              status_name(s));
    return s;
  }
  LOG_WARNING("declared server {} at {} crashed{}", server_id_string(id), locator,
              master ? fmt::format(" (a master with {} tablets)", state_.tablets_of(id).size())
                     : std::string());
  broadcast_server_list(id);
  // Recovery of a crashed master starts here (coordinator/recovery_manager.h).
  recovery_->check();
  return Status::kOk;
}

Status CoordinatorService::get_recoveries(wire::BodyReader& in, Reply& reply) {
  if (!in.at_end()) return Status::kBadRequest;
  recovery_->encode(&reply.body());
  return Status::kOk;
}

Status CoordinatorService::move_tablets(const std::vector<Move>& moves) {
  CoordinatorState next = state_;
  std::vector<Tablet> all;
  for (const Move& m : moves) {
    for (const auto& t : m.tablets) {
      if (Status s = next.move_tablet_range(m.from, t); s != Status::kOk) return s;
      all.push_back(t);
    }
  }
  if (Status s = commit(std::move(next)); s != Status::kOk) return s;
  send_tablets(wire::Opcode::kTakeTablets, all, false);
  return Status::kOk;
}

void CoordinatorService::answer(const ReplyToken& token, Status status) {
  Reply reply;
  reply.set_status(status);
  transport_->send_deferred(token, reply);  // false: the master resends its report
}

Status CoordinatorService::finish_master(uint64_t master_id) {
  CoordinatorState next = state_;
  if (!next.mark_removed(master_id)) return Status::kOk;  // replaced, or removed already
  if (Status s = commit(std::move(next)); s != Status::kOk) return s;
  LOG_INFO("master {} is removed: nothing of it is left to recover", server_id_string(master_id));
  // Backups free the replicas of a removed master.
  broadcast_server_list();
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
