// The wire format: every RPC message ramkv sends, in one place (RAMCloud's WireFormat.h).
//
// A message is a fixed header followed by a body of `body_bytes`:
//
//   0       4       6       8               16      20      22      24
//   +-------+-------+-------+---------------+-------+-------+-------+
//   | magic |version|opcode | request id    | body  |status | flags |
//   +-------+-------+-------+---------------+-------+-------+-------+
//   24              32              40              48
//   +---------------+---------------+---------------+
//   | client id     | rpc sequence  | ack sequence  |
//   +---------------+---------------+---------------+
//   magic "RKV1" (0x31564b52), version kProtocolVersion, status 0 in requests, flags bit 0 =
//   response. client id and rpc sequence identify a request across retries; ack sequence
//   says that the client has the replies of all its requests up to that sequence. A
//   master keeps the results of writes, removes and increments by (client id, rpc
//   sequence) until they are acknowledged, so a retry is answered, not applied again
//   (exactly-once, docs/rpc.md "Exactly once"). 0 client id: no such guarantee.
//
// A body is a fixed-size struct below (little-endian, packed, sizes static_asserted),
// then the variable-length parts it announces (keys, values, names), in the order the
// struct's comment gives. Bodies are decoded only through BodyReader, which checks every
// length against the bytes received: a short or lying body is Status::kBadRequest, never
// an out-of-bounds read.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common/buffer.h"
#include "common/status.h"

namespace ramkv::wire {

constexpr uint32_t kMagic = 0x31564b52;   // "RKV1" little-endian
constexpr uint16_t kProtocolVersion = 2;  // 2: ack sequence in the header
// The largest body a peer may send: a 1 MiB value, a 64 KiB key, and room for multi-ops.
constexpr uint32_t kMaxBodyBytes = 16u << 20;

enum class Opcode : uint16_t {
  kEcho = 1,  // body echoed back: the bare round trip for benchmarks and health checks

  // Coordinator.
  kEnlistServer = 10,
  kGetServerList = 11,
  kCreateTable = 12,
  kDropTable = 13,
  kGetTableId = 14,
  kGetTabletMap = 15,
  kSetReplicationEpoch = 16,  // master -> coordinator: open replicas of a segment below
                              // this epoch are stale
  kGetReplicationEpochs = 17,
  kReportBackupReplicas = 18,  // backup -> coordinator, after a restart: what its disk holds
  kGetBackupReplicas = 19,
  kHintServerCrashed = 20,       // server -> coordinator: this server does not answer
  kRecoveryMasterFinished = 21,  // recovery master -> coordinator (docs/recovery.md)
  kGetRecoveries = 22,

  // Master.
  kRead = 30,
  kWrite = 31,
  kRemove = 32,
  kIncrement = 33,
  kMultiRead = 34,
  kMultiWrite = 35,
  kMultiRemove = 36,
  kEnumerate = 37,
  kTakeTablets = 38,       // coordinator -> master: you own these tablets now
  kDropTablets = 39,       // coordinator -> master: forget these tablets and their objects
  kServerListUpdate = 40,  // coordinator -> server: the server list changed
  kGetServerStats = 41,
  kIsReplicaNeeded = 42,  // backup -> master: may a replica found on disk be freed?
  kRecover = 43,          // coordinator -> recovery master: replay this partition

  // Backup (docs/rpc.md, Backup). Open and close travel as flags of kBackupWrite; their
  // own numbers are reserved and answered kBadRequest.
  kBackupOpen = 50,   // reserved
  kBackupWrite = 51,  // open, append, close a replica
  kBackupClose = 52,  // reserved
  kBackupFree = 53,
  kBackupListReplicas = 54,
  kBackupStartReadingData = 55,   // coordinator -> backup: recovery step 1
  kBackupStartPartitioning = 56,  // coordinator -> backup: recovery step 4
  kBackupGetRecoveryData = 57,    // recovery master -> backup: recovery step 5
};
std::string_view opcode_name(Opcode op);
bool opcode_known(uint16_t op);

#pragma pack(push, 1)
struct MessageHeader {
  uint32_t magic = kMagic;
  uint16_t version = kProtocolVersion;
  uint16_t opcode = 0;
  uint64_t request_id = 0;
  uint32_t body_bytes = 0;
  uint16_t status = 0;
  uint16_t flags = 0;
  uint64_t client_id = 0;
  uint64_t rpc_seq = 0;
  uint64_t ack_seq = 0;
};
static_assert(sizeof(MessageHeader) == 48);
constexpr uint16_t kFlagResponse = 1;

// Reject rules as they travel (master/object_manager.h RejectRules).
struct RejectRulesWire {
  uint8_t doesnt_exist = 0;
  uint8_t exists = 0;
  uint8_t version_le_given = 0;
  uint8_t version_ne_given = 0;
  uint64_t given_version = 0;
};
static_assert(sizeof(RejectRulesWire) == 12);

// ---- Coordinator -------------------------------------------------------------------
// kEnlistServer: + locator (address "host:port"). The coordinator answers with the new id.
struct EnlistServerRequest {
  uint32_t services = 0;  // bit 0 master, bit 1 backup
  uint32_t locator_bytes = 0;
  uint64_t replaces_id = 0;  // a restarted server's previous id, or 0
};
static_assert(sizeof(EnlistServerRequest) == 16);
struct EnlistServerResponse {
  uint64_t server_id = 0;  // index in the low 32 bits, generation in the high 32
};
static_assert(sizeof(EnlistServerResponse) == 8);
constexpr uint32_t kServiceMaster = 1;
constexpr uint32_t kServiceBackup = 2;

// kGetServerList: empty request. Response: ServerListHeader, then `count` x
// (ServerEntry + locator).
struct ServerListHeader {
  uint64_t version = 0;  // bumped on every change
  uint32_t count = 0;
};
static_assert(sizeof(ServerListHeader) == 12);
struct ServerEntry {
  uint64_t server_id = 0;
  uint32_t services = 0;
  uint8_t status = 0;  // 0 up, 1 crashed, 2 removed
  uint8_t pad[3] = {};
  uint32_t locator_bytes = 0;
};
static_assert(sizeof(ServerEntry) == 20);

// kCreateTable: + name. Response: TableIdResponse.
struct CreateTableRequest {
  uint32_t name_bytes = 0;
  uint32_t tablet_count = 0;  // 0: one per master
};
static_assert(sizeof(CreateTableRequest) == 8);
// kDropTable, kGetTableId: + name.
struct TableNameRequest {
  uint32_t name_bytes = 0;
};
static_assert(sizeof(TableNameRequest) == 4);
struct TableIdResponse {
  uint64_t table_id = 0;
};
static_assert(sizeof(TableIdResponse) == 8);

// A tablet: a range of key hashes of one table, owned by one master.
struct TabletWire {
  uint64_t table_id = 0;
  uint64_t start_hash = 0;  // inclusive
  uint64_t end_hash = 0;    // inclusive
  uint64_t server_id = 0;
};
static_assert(sizeof(TabletWire) == 32);
// kGetTabletMap: TabletMapRequest. Response: TabletMapHeader, count x TabletWire, then
// for each distinct server in the map a ServerEntry + locator (server_count of them).
struct TabletMapRequest {
  uint64_t table_id = 0;  // 0: every table
};
static_assert(sizeof(TabletMapRequest) == 8);
struct TabletMapHeader {
  uint64_t version = 0;
  uint32_t count = 0;
  uint32_t server_count = 0;
};
static_assert(sizeof(TabletMapHeader) == 16);

// kTakeTablets / kDropTablets: TabletListHeader + count x TabletWire. Empty response.
struct TabletListHeader {
  uint32_t count = 0;
};
static_assert(sizeof(TabletListHeader) == 4);

// kSetReplicationEpoch: ReplicationEpochEntry. Empty response. The coordinator keeps, per
// master, the (segment id, epoch) of the newest such call: an open replica of that segment
// whose epoch is below it is stale and never used by recovery. Lower (segment, epoch)
// pairs than the one recorded are accepted and change nothing (a resent call).
struct ReplicationEpochEntry {
  uint64_t master_id = 0;
  uint64_t segment_id = 0;
  uint64_t epoch = 0;
};
static_assert(sizeof(ReplicationEpochEntry) == 24);
// kGetReplicationEpochs: empty request. Response: ReplicationEpochsHeader, count x
// ReplicationEpochEntry, ordered by master id.
struct ReplicationEpochsHeader {
  uint32_t count = 0;
};
static_assert(sizeof(ReplicationEpochsHeader) == 4);

// kReportBackupReplicas: BackupReportHeader + count x ReplicaEntry (see Backup below): the
// replicas a restarted backup found on its disk. Empty response. The coordinator keeps the
// newest report of each backup that is up (in memory) and answers kFenced to a backup
// that was replaced or declared crashed.
struct BackupReportHeader {
  uint64_t backup_id = 0;
  uint32_t count = 0;
};
static_assert(sizeof(BackupReportHeader) == 12);
// kGetBackupReplicas: empty request. Response: BackupReplicasHeader, then
// count x ReportedReplica, ordered by (backup, master, segment).
struct BackupReplicasHeader {
  uint32_t count = 0;
};
static_assert(sizeof(BackupReplicasHeader) == 4);

// ---- Failure detection and recovery (docs/recovery.md) ----
// kHintServerCrashed: ServerIdRequest (the suspect). Empty response, sent before the
// coordinator's own check ends. An id never given out: kBadRequest.
struct ServerIdRequest {
  uint64_t server_id = 0;
};
static_assert(sizeof(ServerIdRequest) == 8);
// kRecoveryMasterFinished: RecoveryMasterFinishedRequest, then optionally the partition's
// tablets (TabletListHeader + count x TabletWire). Empty response. kOk in `status` when
// the partition is replayed and durable; anything else gives it to another master. The
// tablets let a coordinator that no longer knows the recovery (restarted, or retrying it)
// see in its persisted map that they were moved to this master already.
struct RecoveryMasterFinishedRequest {
  uint64_t recovery_id = 0;
  uint64_t recovery_master_id = 0;
  uint32_t partition_id = 0;
  uint16_t status = 0;  // a Status
  uint16_t pad = 0;
  uint64_t objects = 0;             // objects replayed (the newest versions kept)
  uint64_t bytes = 0;               // entry bytes pulled from backups
  uint64_t replay_ns = 0;           // from `recover` to finished
  uint64_t missing_segment_id = 0;  // status kIncomplete: the segment no backup could give
};
static_assert(sizeof(RecoveryMasterFinishedRequest) == 56);
// kGetRecoveries: empty request. Response: RecoveriesHeader + count x RecoveryInfo +
// partition_count x PartitionInfo (each recovery's partitions follow in its order) +
// per recovery, `error_bytes` of text (why it stopped; empty unless failed).
struct RecoveriesHeader {
  uint32_t count = 0;
  uint32_t partition_count = 0;
};
static_assert(sizeof(RecoveriesHeader) == 8);
constexpr uint8_t kRecoveryRunning = 0;
constexpr uint8_t kRecoveryDone = 1;
constexpr uint8_t kRecoveryFailed = 2;
struct RecoveryInfo {
  uint64_t recovery_id = 0;
  uint64_t crashed_master_id = 0;
  uint64_t declared_unix_ns = 0;  // when the master was declared crashed
  uint64_t finished_unix_ns = 0;  // 0 while running
  uint64_t bytes = 0;             // entry bytes replayed, all partitions
  uint32_t partitions = 0;
  uint32_t error_bytes = 0;
  uint8_t state = kRecoveryRunning;
  uint8_t pad[7] = {};
};
static_assert(sizeof(RecoveryInfo) == 56);
struct PartitionInfo {
  uint64_t recovery_master_id = 0;  // 0 while unassigned
  uint64_t bytes = 0;
  uint64_t replay_ns = 0;
  uint32_t partition_id = 0;
  uint8_t done = 0;
  uint8_t pad[3] = {};
};
static_assert(sizeof(PartitionInfo) == 32);

// ---- Master ------------------------------------------------------------------------
// kRead: + key. Response: ReadResponse + value.
struct ReadRequest {
  uint64_t table_id = 0;
  uint32_t key_bytes = 0;
  RejectRulesWire rules;
};
static_assert(sizeof(ReadRequest) == 24);
struct ReadResponse {
  uint64_t version = 0;
  uint32_t value_bytes = 0;
};
static_assert(sizeof(ReadResponse) == 12);

// kWrite: + key + value. Response: VersionResponse.
struct WriteRequest {
  uint64_t table_id = 0;
  uint32_t key_bytes = 0;
  uint32_t value_bytes = 0;
  RejectRulesWire rules;
};
static_assert(sizeof(WriteRequest) == 28);
struct VersionResponse {
  uint64_t version = 0;
};
static_assert(sizeof(VersionResponse) == 8);

// kRemove: + key. Response: VersionResponse (of the removed object, 0 if none).
using RemoveRequest = ReadRequest;

// kIncrement: + key. Response: IncrementResponse.
struct IncrementRequest {
  uint64_t table_id = 0;
  int64_t delta = 0;
  uint32_t key_bytes = 0;
  RejectRulesWire rules;
};
static_assert(sizeof(IncrementRequest) == 32);
struct IncrementResponse {
  int64_t value = 0;
  uint64_t version = 0;
};
static_assert(sizeof(IncrementResponse) == 16);

// Multi-operations: MultiHeader, then count items. Each response item starts with a
// u16 status.
//   kMultiRead   item: ReadRequest + key        -> status, ReadResponse + value
//   kMultiWrite  item: WriteRequest + key + value -> status, VersionResponse
//   kMultiRemove item: RemoveRequest + key      -> status, VersionResponse
// Failed items carry only their status.
struct MultiHeader {
  uint32_t count = 0;
};
static_assert(sizeof(MultiHeader) == 4);
constexpr uint32_t kMaxMultiCount = 4096;

// kEnumerate: EnumerateRequest. Response: EnumerateResponse, count x (EnumeratedObject +
// key + value).
struct EnumerateRequest {
  uint64_t table_id = 0;
  uint64_t start_hash = 0;  // the tablet being walked: [start_hash, end_hash]
  uint64_t end_hash = 0;
  uint64_t cursor = 0;  // 0 to begin
  uint32_t max_objects = 0;
};
static_assert(sizeof(EnumerateRequest) == 36);
struct EnumerateResponse {
  uint64_t next_cursor = 0;  // kEnumerateDone when this tablet is finished
  uint32_t count = 0;
};
static_assert(sizeof(EnumerateResponse) == 12);
constexpr uint64_t kEnumerateDone = UINT64_MAX;
struct EnumeratedObject {
  uint64_t version = 0;
  uint32_t key_bytes = 0;
  uint32_t value_bytes = 0;
};
static_assert(sizeof(EnumeratedObject) == 16);

// kGetServerStats: empty request. Response: text ("name value" lines).

// kIsReplicaNeeded: ReplicaNeededHeader + count x u64 segment id. Response: count x u8,
// 1 where the master still needs the backup's replica of that segment (it has not yet
// made R replicas of it elsewhere, or it does not know of the backup's restart yet), 0
// where the backup may free it (the segment left the log, or is safe elsewhere).
struct ReplicaNeededHeader {
  uint64_t backup_id = 0;  // the asking backup's current id
  uint32_t count = 0;
};
static_assert(sizeof(ReplicaNeededHeader) == 12);
constexpr uint32_t kMaxReplicaNeededCount = 65536;

// kRecover: RecoverRequest + tablet_count x TabletWire (the partition; server_id = the
// crashed master) + location_count x (RecoveryLocation + locator). Every segment of the
// crashed master's log has one or more locations, in the order to try them. Answered at
// once (kOk: started); the result comes as kRecoveryMasterFinished to the coordinator.
struct RecoverRequest {
  uint64_t recovery_id = 0;
  uint64_t crashed_master_id = 0;
  uint64_t safe_version = 0;  // versions issued by the crashed master are all below it
  uint32_t partition_id = 0;
  uint32_t tablet_count = 0;
  uint32_t location_count = 0;
  uint32_t pad = 0;
};
static_assert(sizeof(RecoverRequest) == 40);
struct RecoveryLocation {
  uint64_t segment_id = 0;
  uint64_t backup_id = 0;
  uint32_t locator_bytes = 0;
  uint32_t pad = 0;
};
static_assert(sizeof(RecoveryLocation) == 24);

// ---- Backup ------------------------------------------------------------------------
// kBackupWrite: BackupWriteRequest + `length` segment bytes. Empty response, or a
// BackupWriteResponse (below) when the write asked for one-sided writes and got them.
// An append at `offset`, which must equal the bytes the backup already holds for the
// replica. open = 1 creates the replica (first write); close = 1 closes it after this
// write. The certificate covers the replica's first certificate_bytes bytes
// (docs/log-format.md, Certificates). remote = 1 (with open = 1): the master would
// rather append with RDMA WRITEs from now on (docs/rdma.md, "One-sided mirroring").
struct BackupWriteRequest {
  uint64_t master_id = 0;
  uint64_t segment_id = 0;
  uint64_t epoch = 0;
  uint32_t offset = 0;
  uint32_t length = 0;
  uint32_t certificate_bytes = 0;
  uint32_t certificate_checksum = 0;
  uint8_t open = 0;
  uint8_t close = 0;
  uint8_t remote = 0;
  uint8_t pad[5] = {};
};
static_assert(sizeof(BackupWriteRequest) == 48);

// The answer to a write with remote = 1 that the backup grants: the replica's buffer is
// exposed for one-sided writes until the replica is closed, freed or its master fenced.
// Segment byte i goes to address + data_offset + i (i < capacity); the master then
// writes a RemoteCertificate at address + slot_offset, after the bytes it certifies.
struct BackupWriteResponse {
  uint64_t address = 0;
  uint64_t bytes = 0;  // of the whole region
  uint32_t key = 0;
  uint32_t slot_offset = 0;
  uint32_t data_offset = 0;
  uint32_t capacity = 0;
};
static_assert(sizeof(BackupWriteResponse) == 32);

// What a master's one-sided append leaves in the replica's certificate slot: how many
// segment bytes it wrote and the certificate over them. The backup takes it (absorbs
// it) when it next looks at the replica: an RPC for it, a listing, a fence, a recovery.
// `check` (XXH3 of the first 24 bytes, low 64 bits) tells a whole slot from a torn one
// or stale memory; `sequence` counts the master's appends to the replica (from 1).
struct RemoteCertificate {
  static constexpr uint32_t kMagic = 0x52434552;  // "RECR"
  uint32_t held_bytes = 0;
  uint32_t certificate_bytes = 0;
  uint32_t certificate_checksum = 0;
  uint32_t magic = kMagic;
  uint64_t sequence = 0;
  uint64_t check = 0;
};
static_assert(sizeof(RemoteCertificate) == 32);

// kBackupFree: BackupFreeRequest. Empty response.
struct BackupFreeRequest {
  uint64_t master_id = 0;
  uint64_t segment_id = 0;
};
static_assert(sizeof(BackupFreeRequest) == 16);

// kBackupListReplicas: empty request. Response: BackupListHeader, count x ReplicaEntry.
struct BackupListHeader {
  uint32_t count = 0;
};
static_assert(sizeof(BackupListHeader) == 4);
constexpr uint8_t kReplicaOk = 0;
constexpr uint8_t kReplicaTorn = 1;
constexpr uint8_t kReplicaCorrupt = 2;
struct ReplicaEntry {
  uint64_t master_id = 0;
  uint64_t segment_id = 0;
  uint64_t epoch = 0;
  uint32_t certificate_bytes = 0;
  uint8_t closed = 0;
  uint8_t status = kReplicaOk;  // kReplicaOk, kReplicaTorn, kReplicaCorrupt
  uint8_t found_on_disk = 0;    // 1: found by the backup's scan at start (read-only)
  uint8_t pad = 0;
};
static_assert(sizeof(ReplicaEntry) == 32);
// kBackupStartReadingData: StartReadingDataRequest. Response: StartReadingDataResponse +
// replica_count x ReplicaEntry (this master's replicas; found_on_disk as listed) +
// digest_count x u64 segment id + table_stat_count x TableStatWire. The digest, safe
// version and table statistics come from the replica with the highest segment id that
// has a digest (digest_count = 0: none has). The backup then reads every listed replica
// into memory in the background; with kDeferReads in flags it reads nothing until
// `backup start partitioning` names its primary replicas (docs/recovery.md, step 4).
// Resent (same recovery id): the same answer, no new reads. The backup fences the master
// first (its writes and frees are refused from then on), whether or not the server list
// saying it crashed has arrived yet.
constexpr uint32_t kDeferReads = 1;
struct StartReadingDataRequest {
  uint64_t master_id = 0;
  uint64_t recovery_id = 0;
  uint32_t flags = 0;  // kDeferReads
  uint32_t pad = 0;
};
static_assert(sizeof(StartReadingDataRequest) == 24);
struct StartReadingDataResponse {
  uint64_t digest_segment_id = 0;
  uint64_t digest_epoch = 0;
  uint64_t safe_version = 0;
  uint32_t replica_count = 0;
  uint32_t digest_count = 0;
  uint32_t table_stat_count = 0;
  uint8_t digest_closed = 0;  // the replica the digest came from is closed
  uint8_t pad[3] = {};
};
static_assert(sizeof(StartReadingDataResponse) == 40);
struct TableStatWire {
  uint64_t table_id = 0;
  uint64_t object_count = 0;
  uint64_t object_bytes = 0;
};
static_assert(sizeof(TableStatWire) == 24);
// kBackupStartPartitioning: StartPartitioningRequest + count x PartitionTablet +
// primary_count x u64 segment id. Empty response. Object and tombstone entries of each
// replica of that master are split by which (table, key hash) range they fall in; entries
// in no range are dropped. With kPrimariesNamed in flags, the segment ids that follow are
// this backup's primary replicas (docs/recovery.md, step 4): only those are read and
// split at once; the others (secondaries) are read when a recovery master first asks for
// one. Without the flag every replica is primary.
constexpr uint32_t kPrimariesNamed = 1;
struct StartPartitioningRequest {
  uint64_t master_id = 0;
  uint64_t recovery_id = 0;
  uint32_t count = 0;
  uint32_t primary_count = 0;
  uint32_t flags = 0;  // kPrimariesNamed
  uint32_t pad = 0;
};
static_assert(sizeof(StartPartitioningRequest) == 32);
struct PartitionTablet {
  uint64_t table_id = 0;
  uint64_t start_hash = 0;  // inclusive
  uint64_t end_hash = 0;    // inclusive
  uint32_t partition_id = 0;
  uint32_t pad = 0;
};
static_assert(sizeof(PartitionTablet) == 32);
// kBackupGetRecoveryData: GetRecoveryDataRequest. Response: RecoveryDataResponse +
// entry_bytes of whole log entries (common/log_entry.h), in log order. kRetry while the
// replica is not read and split yet; kBadRequest for a replica or recovery it does not
// have (the recovery master tries another backup).
struct GetRecoveryDataRequest {
  uint64_t master_id = 0;
  uint64_t recovery_id = 0;
  uint64_t segment_id = 0;
  uint32_t partition_id = 0;
  uint32_t pad = 0;
};
static_assert(sizeof(GetRecoveryDataRequest) == 32);
struct RecoveryDataResponse {
  uint64_t epoch = 0;  // of the replica the entries came from
  uint32_t entry_bytes = 0;
  uint32_t entry_count = 0;
  uint8_t closed = 0;
  uint8_t pad[7] = {};
};
static_assert(sizeof(RecoveryDataResponse) == 24);

// One replica a backup reported to the coordinator (kGetBackupReplicas).
struct ReportedReplica {
  uint64_t backup_id = 0;
  ReplicaEntry replica;
};
static_assert(sizeof(ReportedReplica) == 40);
#pragma pack(pop)

// ---- Encoding helpers ----------------------------------------------------------------

// Appends bytes to a growing message body.
class BodyWriter {
 public:
  explicit BodyWriter(std::vector<std::byte>* out) : out_(out) {}
  template <typename T>
  requires std::is_trivially_copyable_v<T>
  void put(const T& v) {
    size_t at = out_->size();
    out_->resize(at + sizeof(T));
    std::memcpy(out_->data() + at, &v, sizeof(T));
  }
  void put_bytes(std::string_view s) {
    size_t at = out_->size();
    out_->resize(at + s.size());
    if (!s.empty()) std::memcpy(out_->data() + at, s.data(), s.size());
  }
  void put_bytes(std::span<const std::byte> b) {
    put_bytes(std::string_view(reinterpret_cast<const char*>(b.data()), b.size()));
  }

 private:
  std::vector<std::byte>* out_;
};

// Decodes a received body; every read is bounds-checked (sticky failure, as ByteReader).
class BodyReader {
 public:
  explicit BodyReader(std::span<const std::byte> body) : r_(body) {}
  template <typename T>
  requires std::is_trivially_copyable_v<T>
  bool get(T* v) {
    auto b = r_.get_bytes(sizeof(T));
    if (!r_.ok()) return false;
    std::memcpy(v, b.data(), sizeof(T));
    return true;
  }
  // A string of `n` bytes as a view into the body; false if the body is shorter.
  bool get_string(uint64_t n, std::string_view* s) {
    if (n > r_.remaining()) {
      r_.get_bytes(r_.remaining() + 1);  // sets the failure flag
      return false;
    }
    *s = r_.get_string(static_cast<size_t>(n));
    return r_.ok();
  }
  bool ok() const { return r_.ok(); }
  bool at_end() const { return r_.ok() && r_.remaining() == 0; }
  size_t remaining() const { return r_.remaining(); }

 private:
  ByteReader r_;
};

// A server list (kGetServerList reply, kServerListUpdate body), decoded.
struct ServerListItem {
  uint64_t server_id = 0;
  uint32_t services = 0;
  uint8_t status = 0;  // 0 up, 1 crashed, 2 removed
  std::string locator;
};
// A server id as logs and tools show it: "index.generation".
std::string server_id_text(uint64_t id);
// kBadRequest for a short, lying or over-long body.
Status decode_server_list(std::span<const std::byte> body, uint64_t* version,
                          std::vector<ServerListItem>* out);

// Checks a received header: magic, version, body size. kBadRequest if any is wrong.
Status check_header(const MessageHeader& h);

}  // namespace ramkv::wire
