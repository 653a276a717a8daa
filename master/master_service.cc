#include "master/master_service.h"

#include <fmt/format.h>

#include <utility>

#include "common/checksum.h"
#include "common/log.h"

namespace ramkv::master {

namespace {

RejectRules to_reject_rules(const wire::RejectRulesWire& w) {
  return RejectRules{.doesnt_exist = w.doesnt_exist != 0,
                     .exists = w.exists != 0,
                     .version_le_given = w.version_le_given != 0,
                     .version_ne_given = w.version_ne_given != 0,
                     .given_version = w.given_version};
}

void append_stat(std::string* out, std::string_view name, uint64_t value) {
  fmt::format_to(std::back_inserter(*out), "{} {}\n", name, value);
}

}  // namespace

Result<std::unique_ptr<MasterService>> MasterService::create(MasterConfig config,
                                                             const Clock& clock) {
  auto objects = ObjectManager::create(config, clock);
  if (!objects.ok()) return objects.status();
  return std::make_unique<MasterService>(std::move(objects).value());
}

MasterService::MasterService(std::unique_ptr<ObjectManager> objects)
    : objects_(std::move(objects)) {}

void MasterService::handle(const wire::MessageHeader& header, std::span<const std::byte> body,
                           Reply& reply) {
  using wire::Opcode;
  ++rpc_count_;
  reply.clear();
  const auto op = static_cast<Opcode>(header.opcode);
  const bool mutates = op == Opcode::kWrite || op == Opcode::kRemove || op == Opcode::kIncrement ||
                       op == Opcode::kMultiWrite || op == Opcode::kMultiRemove;
  if (mutates && replicas_ != nullptr && replicas_->fenced()) {
    // Declared crashed (replica_manager.h, rule 6): nothing more is acknowledged.
    reply.set_status(Status::kFenced);
    return;
  }
  if (op != Opcode::kEcho && fenced()) {
    // Declared crashed (invariant 5): a zombie serves nothing, not even reads, whose
    // answers recovery may already have made stale.
    reply.set_status(Status::kFenced);
    return;
  }
  Status s = Status::kBadRequest;
  const RpcId rpc{.client_id = header.client_id, .seq = header.rpc_seq, .ack = header.ack_seq};
  switch (static_cast<Opcode>(header.opcode)) {
    case Opcode::kEcho:
      // The request body stays valid until the reply is sent (transport.h), so no copy.
      reply.add_external(body);
      s = Status::kOk;
      break;
    case Opcode::kRead:
      s = read(body, reply);
      break;
    case Opcode::kWrite:
      s = write(body, rpc, reply);
      break;
    case Opcode::kRemove:
      s = remove(body, rpc, reply);
      break;
    case Opcode::kIncrement:
      s = increment(body, rpc, reply);
      break;
    case Opcode::kMultiRead:
      s = multi_read(body, reply);
      break;
    case Opcode::kMultiWrite:
      s = multi_write(body, reply);
      break;
    case Opcode::kMultiRemove:
      s = multi_remove(body, reply);
      break;
    case Opcode::kEnumerate:
      s = enumerate(body, reply);
      break;
    case Opcode::kTakeTablets:
      s = take_tablets(body);
      break;
    case Opcode::kDropTablets:
      s = drop_tablets(body);
      break;
    case Opcode::kServerListUpdate:
      s = server_list_update(body);
      break;
    case Opcode::kGetServerStats:
      s = server_stats(body, reply);
      break;
    case Opcode::kIsReplicaNeeded:
      s = replica_needed(body, reply);
      break;
    case Opcode::kRecover:
      if (recovery_ != nullptr) s = recovery_->start(body);
      break;
    default:
      break;  // coordinator opcodes and unknown numbers
  }
  if (s != Status::kOk) {
    if (s == Status::kBadRequest) ++bad_request_count_;
    reply.clear();  // invariant 2
    reply.set_status(s);
  } else if (mutates && replicas_ != nullptr) {
    replicas_->hold(reply);  // answered once on R backups (invariant 4)
  }
}

Status MasterService::replica_needed(std::span<const std::byte> body, Reply& reply) {
  wire::BodyReader in(body);
  wire::ReplicaNeededHeader header;
  if (!in.get(&header) || header.count > wire::kMaxReplicaNeededCount ||
      in.remaining() != uint64_t{header.count} * sizeof(uint64_t)) {
    return Status::kBadRequest;
  }
  auto out = reply.writer();
  for (uint32_t i = 0; i < header.count; ++i) {
    uint64_t segment_id = 0;
    in.get(&segment_id);
    // Without replication this master keeps nothing on backups.
    const bool needed =
        replicas_ != nullptr && replicas_->replica_needed(header.backup_id, segment_id);
    out.put(static_cast<uint8_t>(needed ? 1 : 0));
  }
  return Status::kOk;
}

// ---- Decoding ---------------------------------------------------------------------------

bool MasterService::decode_read_item(wire::BodyReader& in, KeyedItem* item) {
  wire::ReadRequest r;
  if (!in.get(&r) || !in.get_string(r.key_bytes, &item->key)) return false;
  item->table_id = r.table_id;
  item->rules = to_reject_rules(r.rules);
  return true;
}

bool MasterService::decode_write_item(wire::BodyReader& in, KeyedItem* item) {
  wire::WriteRequest r;
  if (!in.get(&r) || !in.get_string(r.key_bytes, &item->key) ||
      !in.get_string(r.value_bytes, &item->value)) {
    return false;
  }
  item->table_id = r.table_id;
  item->rules = to_reject_rules(r.rules);
  return true;
}

bool MasterService::decode_increment_item(wire::BodyReader& in, KeyedItem* item) {
  wire::IncrementRequest r;
  if (!in.get(&r) || !in.get_string(r.key_bytes, &item->key)) return false;
  item->table_id = r.table_id;
  item->delta = r.delta;
  item->rules = to_reject_rules(r.rules);
  return true;
}

// ---- Single-object operations -----------------------------------------------------------

bool MasterService::owns(uint64_t table_id, std::string_view key) const {
  return tablets_.contains(table_id, key_hash(table_id, key));
}

Result<uint64_t> MasterService::read_item(const KeyedItem& item, std::string* value) {
  if (!owns(item.table_id, item.key)) return Status::kUnknownTablet;
  return objects_->read(item.table_id, item.key, value, &item.rules);
}

Result<uint64_t> MasterService::write_item(const KeyedItem& item, const RpcId* rpc) {
  if (!owns(item.table_id, item.key)) return Status::kUnknownTablet;
  return objects_->write(item.table_id, item.key, item.value, &item.rules, rpc);
}

Result<uint64_t> MasterService::remove_item(const KeyedItem& item, const RpcId* rpc) {
  if (!owns(item.table_id, item.key)) return Status::kUnknownTablet;
  return objects_->remove(item.table_id, item.key, &item.rules, rpc);
}

Status MasterService::read(std::span<const std::byte> body, Reply& reply) {
  wire::BodyReader in(body);
  KeyedItem item;
  if (!decode_read_item(in, &item) || !in.at_end()) return Status::kBadRequest;
  auto version = read_item(item, &value_scratch_);
  if (!version.ok()) return version.status();
  auto w = reply.writer();
  w.put(wire::ReadResponse{.version = *version,
                           .value_bytes = static_cast<uint32_t>(value_scratch_.size())});
  w.put_bytes(value_scratch_);
  return Status::kOk;
}

Status MasterService::write(std::span<const std::byte> body, const RpcId& rpc, Reply& reply) {
  wire::BodyReader in(body);
  KeyedItem item;
  if (!decode_write_item(in, &item) || !in.at_end()) return Status::kBadRequest;
  auto version = write_item(item, &rpc);
  if (!version.ok()) return version.status();
  reply.writer().put(wire::VersionResponse{.version = *version});
  return Status::kOk;
}

Status MasterService::remove(std::span<const std::byte> body, const RpcId& rpc, Reply& reply) {
  wire::BodyReader in(body);
  KeyedItem item;
  if (!decode_read_item(in, &item) || !in.at_end()) return Status::kBadRequest;
  auto version = remove_item(item, &rpc);
  if (!version.ok()) return version.status();
  reply.writer().put(wire::VersionResponse{.version = *version});
  return Status::kOk;
}

Status MasterService::increment(std::span<const std::byte> body, const RpcId& rpc, Reply& reply) {
  wire::BodyReader in(body);
  KeyedItem item;
  if (!decode_increment_item(in, &item) || !in.at_end()) return Status::kBadRequest;
  if (!owns(item.table_id, item.key)) return Status::kUnknownTablet;
  auto r = objects_->increment(item.table_id, item.key, item.delta, &item.rules, &rpc);
  if (!r.ok()) return r.status();
  reply.writer().put(wire::IncrementResponse{.value = r->value, .version = r->version});
  return Status::kOk;
}

// ---- Tablets and stats ------------------------------------------------------------------

namespace {

// Decodes a whole tablet list before anything changes, so a bad list changes nothing.
bool decode_tablets(std::span<const std::byte> body, std::vector<wire::TabletWire>* out) {
  wire::BodyReader in(body);
  wire::TabletListHeader h;
  if (!in.get(&h) || in.remaining() != uint64_t{h.count} * sizeof(wire::TabletWire)) return false;
  out->resize(h.count);
  for (auto& t : *out) {
    if (!in.get(&t) || t.table_id == 0 || t.start_hash > t.end_hash) return false;
  }
  return in.at_end();
}

}  // namespace

// A list naming another server was meant for one that had this locator before (the
// coordinator's notifier resends orders, and a server can restart on the same port):
// taking or dropping its tablets here would serve or empty ranges that are not ours.
Status MasterService::decode_own_tablets(wire::Opcode opcode, std::span<const std::byte> body,
                                         std::vector<wire::TabletWire>* out) const {
  if (!decode_tablets(body, out)) return Status::kBadRequest;
  const uint64_t self = objects_->log().master_id();
  for (const auto& t : *out) {
    if (self != 0 && t.server_id != self) {
      LOG_WARNING("refused {}: its tablet {}:[{:#x},{:#x}] names server {}, this is {}",
                  wire::opcode_name(opcode), t.table_id, t.start_hash, t.end_hash, t.server_id,
                  self);
      return Status::kBadRequest;
    }
  }
  return Status::kOk;
}

Status MasterService::take_tablets(std::span<const std::byte> body) {
  std::vector<wire::TabletWire> list;
  if (Status s = decode_own_tablets(wire::Opcode::kTakeTablets, body, &list); s != Status::kOk) {
    return s;
  }
  // What is left of a range dropped here before goes first, or it would show through.
  if (dropper_ != nullptr && dropper_->finish_overlapping(list) != Status::kOk) {
    return Status::kRetry;
  }
  for (const auto& t : list) tablets_.add(t.table_id, {t.start_hash, t.end_hash});
  LOG_DEBUG("took {} tablets; {} ranges owned", list.size(), tablets_.range_count());
  return Status::kOk;
}

Status MasterService::drop_tablets(std::span<const std::byte> body) {
  std::vector<wire::TabletWire> list;
  if (Status s = decode_own_tablets(wire::Opcode::kDropTablets, body, &list); s != Status::kOk) {
    return s;
  }
  // Ownership goes first so nothing new lands in a range being emptied. The objects are
  // removed whether or not the range was owned, so a drop the coordinator resends after
  // a failure (kRetry, kNoSpace for tombstones) finishes the job.
  for (const auto& t : list) tablets_.remove(t.table_id, {t.start_hash, t.end_hash});
  if (dropper_ != nullptr) {
    dropper_->add(list);
    return Status::kOk;
  }
  for (const auto& t : list) {
    auto removed = objects_->remove_range(t.table_id, t.start_hash, t.end_hash);
    if (!removed.ok()) return removed.status();
    LOG_DEBUG("dropped tablet {}:[{:#x},{:#x}]: {} objects removed", t.table_id, t.start_hash,
              t.end_hash, *removed);
  }
  return Status::kOk;
}

// Checks the whole list, keeps its version and size. Older versions (updates can pass
// each other on different connections) are ignored.
Status MasterService::server_list_update(std::span<const std::byte> body) {
  uint64_t version = 0;
  if (wire::decode_server_list(body, &version, &servers_scratch_) != Status::kOk) {
    return Status::kBadRequest;
  }
  update_server_list(version, servers_scratch_);
  return Status::kOk;
}

void MasterService::update_server_list(uint64_t version,
                                       const std::vector<wire::ServerListItem>& servers) {
  if (version < server_list_version_) return;  // an older list that arrives late
  server_list_version_ = version;
  server_count_ = static_cast<uint32_t>(servers.size());
  if (replicas_ != nullptr) replicas_->update_servers(servers);
}

Status MasterService::server_stats(std::span<const std::byte> body, Reply& reply) {
  if (!body.empty()) return Status::kBadRequest;
  ObjectManagerStats s = objects_->stats();
  std::string text;
  append_stat(&text, "object_count", s.object_count);
  append_stat(&text, "user_bytes", s.user_bytes);
  append_stat(&text, "hash_table_bytes", s.hash_table_bytes);
  append_stat(&text, "hash_overflow_buckets", s.hash_overflow_buckets);
  append_stat(&text, "log_memory_bytes", s.log.memory_bytes);
  append_stat(&text, "log_free_bytes", s.log.free_bytes);
  append_stat(&text, "log_live_bytes", s.log.live_bytes);
  append_stat(&text, "log_segment_count", s.log.segment_count);
  append_stat(&text, "log_head_rollovers", s.log.head_rollovers);
  append_stat(&text, "log_appended_bytes", s.log.appended_bytes);
  append_stat(&text, "cleaner_compactions", s.cleaner.compactions);
  append_stat(&text, "cleaner_combined_passes", s.cleaner.combined_passes);
  append_stat(&text, "cleaner_segments_cleaned", s.cleaner.segments_cleaned);
  append_stat(&text, "cleaner_bytes_copied", s.cleaner.bytes_copied);
  append_stat(&text, "cleaner_bytes_freed", s.cleaner.bytes_freed);
  append_stat(&text, "rpc_result_clients", s.rpc_results.clients);
  append_stat(&text, "rpc_result_records", s.rpc_results.records);
  append_stat(&text, "rpc_result_duplicates", s.rpc_results.duplicates);
  append_stat(&text, "rpc_result_stale", s.rpc_results.stale);
  append_stat(&text, "rpc_result_released", s.rpc_results.released);
  append_stat(&text, "rpc_result_expired_clients", s.rpc_results.expired_clients);
  append_stat(&text, "tablet_ranges", tablets_.range_count());
  append_stat(&text, "rpc_count", rpc_count_);
  append_stat(&text, "server_list_version", server_list_version_);
  append_stat(&text, "server_list_servers", server_count_);
  append_stat(&text, "bad_request_count", bad_request_count_);
  if (replicas_ != nullptr) {
    const ReplicationStats& r = replicas_->stats();
    append_stat(&text, "replication_write_rpcs", r.write_rpcs);
    append_stat(&text, "replication_bytes_sent", r.bytes_sent);
    append_stat(&text, "replication_remote_writes", r.remote_writes);
    append_stat(&text, "replication_remote_bytes", r.remote_bytes);
    append_stat(&text, "replication_replicas_lost", r.replicas_lost);
    append_stat(&text, "replication_retries", r.retries);
    append_stat(&text, "replication_replies_held", replicas_->held_replies());
    append_stat(&text, "replication_writes_in_flight", replicas_->writes_in_flight());
    append_stat(&text, "replication_replies_released", r.replies_released);
    append_stat(&text, "replication_segments_freed", r.segments_freed);
    append_stat(&text, "replication_backups", r.backups);
    append_stat(&text, "replication_fenced", replicas_->fenced() ? 1 : 0);
  }
  if (recovery_ != nullptr) {
    const RecoveryTaskStats& r = recovery_->stats();
    append_stat(&text, "recovery_partitions_running", recovery_->running());
    append_stat(&text, "recovery_partitions_started", r.partitions_started);
    append_stat(&text, "recovery_partitions_finished", r.partitions_finished);
    append_stat(&text, "recovery_partitions_failed", r.partitions_failed);
    append_stat(&text, "recovery_bytes_pulled", r.bytes_pulled);
    append_stat(&text, "recovery_segments_local", r.segments_local);
    append_stat(&text, "recovery_segments_remote", r.segments_remote);
    append_stat(&text, "recovery_bytes_pulled_remote", r.bytes_pulled_remote);
    append_stat(&text, "recovery_objects_replayed", r.objects_replayed);
  }
  reply.writer().put_bytes(text);
  return Status::kOk;
}

}  // namespace ramkv::master
