#include "common/wire_format.h"

namespace ramkv::wire {

std::string_view opcode_name(Opcode op) {
  switch (op) {
    case Opcode::kEcho:
      return "echo";
    case Opcode::kEnlistServer:
      return "enlist server";
    case Opcode::kGetServerList:
      return "get server list";
    case Opcode::kCreateTable:
      return "create table";
    case Opcode::kDropTable:
      return "drop table";
    case Opcode::kGetTableId:
      return "get table id";
    case Opcode::kGetTabletMap:
      return "get tablet map";
    case Opcode::kSetReplicationEpoch:
      return "set replication epoch";
    case Opcode::kGetReplicationEpochs:
      return "get replication epochs";
    case Opcode::kReportBackupReplicas:
      return "report backup replicas";
    case Opcode::kGetBackupReplicas:
      return "get backup replicas";
    case Opcode::kIsReplicaNeeded:
      return "is replica needed";
    case Opcode::kHintServerCrashed:
      return "hint server crashed";
    case Opcode::kRecoveryMasterFinished:
      return "recovery master finished";
    case Opcode::kGetRecoveries:
      return "get recoveries";
    case Opcode::kRecover:
      return "recover";
    case Opcode::kBackupStartReadingData:
      return "backup start reading data";
    case Opcode::kBackupStartPartitioning:
      return "backup start partitioning";
    case Opcode::kBackupGetRecoveryData:
      return "backup get recovery data";
    case Opcode::kRead:
      return "read";
    case Opcode::kWrite:
      return "write";
    case Opcode::kRemove:
      return "remove";
    case Opcode::kIncrement:
      return "increment";
    case Opcode::kMultiRead:
      return "multi read";
    case Opcode::kMultiWrite:
      return "multi write";
    case Opcode::kMultiRemove:
      return "multi remove";
    case Opcode::kEnumerate:
      return "enumerate";
    case Opcode::kTakeTablets:
      return "take tablets";
    case Opcode::kDropTablets:
      return "drop tablets";
    case Opcode::kServerListUpdate:
      return "server list update";
    case Opcode::kGetServerStats:
      return "get server stats";
    case Opcode::kBackupOpen:
      return "backup open";
    case Opcode::kBackupWrite:
      return "backup write";
    case Opcode::kBackupClose:
      return "backup close";
    case Opcode::kBackupFree:
      return "backup free";
    case Opcode::kBackupListReplicas:
      return "backup list replicas";
  }
  return "unknown opcode";
}

bool opcode_known(uint16_t op) { return opcode_name(static_cast<Opcode>(op)) != "unknown opcode"; }

std::string server_id_text(uint64_t id) {
  return std::to_string(static_cast<uint32_t>(id)) + "." + std::to_string(id >> 32);
}

Status decode_server_list(std::span<const std::byte> body, uint64_t* version,
                          std::vector<ServerListItem>* out) {
  BodyReader in(body);
  ServerListHeader header;
  if (!in.get(&header) || header.count > in.remaining() / sizeof(ServerEntry)) {
    return Status::kBadRequest;
  }
  out->clear();
  out->reserve(header.count);
  for (uint32_t i = 0; i < header.count; ++i) {
    ServerEntry entry;
    std::string_view locator;
    if (!in.get(&entry) || !in.get_string(entry.locator_bytes, &locator)) {
      return Status::kBadRequest;
    }
    out->push_back({.server_id = entry.server_id,
                    .services = entry.services,
                    .status = entry.status,
                    .locator = std::string(locator)});
  }
  if (!in.at_end()) return Status::kBadRequest;
  *version = header.version;
  return Status::kOk;
}

Status check_header(const MessageHeader& h) {
  if (h.magic != kMagic || h.version != kProtocolVersion || h.body_bytes > kMaxBodyBytes) {
    return Status::kBadRequest;
  }
  return Status::kOk;
}

}  // namespace ramkv::wire
