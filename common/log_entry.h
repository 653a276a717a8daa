// Log entries: the byte format of everything a master writes into its log, and the
// only format backups and recovery parse. The full layout is in docs/log-format.md.
//
// Every entry:
//
//   0        1            1+L          5+L
//   +--------+------------+------------+----------------------------+
//   | tag    | length     | checksum   | payload (length bytes)     |
//   +--------+------------+------------+----------------------------+
//   tag:      bits 0-5 EntryType, bits 6-7 = L - 1 (L = 1..4 length bytes)
//   length:   payload length, little-endian, L bytes (the fewest that hold it)
//   checksum: low 32 bits of XXH3-64(payload, seed = tag << 32 | length)
//
// Entries are position-independent: the cleaner moves them byte for byte, and their
// checksums stay valid.
//
// Payloads (varint = LEB128, u32/u64 little-endian):
//   kSegmentHeader: u64 master_id, u64 segment_id, u32 segment_bytes
//   kObject:        varint table_id, varint version, u32 timestamp, varint key_bytes,
//                   key, value (the rest of the payload)
//   kTombstone:     varint table_id, varint version (of the removed object),
//                   varint segment_id (that held it), u32 timestamp, key (the rest)
//   kSafeVersion:   varint safe_version (every version ever issued is below it)
//   kLogDigest:     varint segment_count, then segment_count x u64 segment_id
//   kTableStats:    varint table_count, then per table: varint table_id,
//                   varint object_count, varint object_bytes (entry bytes in the log)
//   kRpcResult:     varint table_id, u64 key_hash, u64 client_id, varint rpc_seq,
//                   varint ack_seq, varint status, varint version, then u64 value
//                   only if it is not 0 (the completion record of a write, remove or
//                   increment: docs/rpc.md, "Exactly once")
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "common/buffer.h"
#include "common/result.h"

namespace ramkv {

enum class EntryType : uint8_t {
  kInvalid = 0,  // zero bytes: never written
  kSegmentHeader = 1,
  kObject = 2,
  kTombstone = 3,
  kSafeVersion = 4,
  kLogDigest = 5,
  kTableStats = 6,
  kRpcResult = 7,
};
constexpr uint8_t kMaxEntryType = 7;

std::string_view entry_type_name(EntryType type);

// The largest entry header: tag + 4 length bytes + checksum.
constexpr uint32_t kMaxEntryHeaderBytes = 9;
// Payloads are limited so that a length always fits 4 bytes and an entry fits a segment.
constexpr uint32_t kMaxPayloadBytes = (1u << 30);

// Bytes of the length field for a payload of `payload_bytes`.
constexpr uint32_t length_field_bytes(uint32_t payload_bytes) {
  return payload_bytes < (1u << 8)    ? 1
         : payload_bytes < (1u << 16) ? 2
         : payload_bytes < (1u << 24) ? 3
                                      : 4;
}
constexpr uint32_t entry_header_bytes(uint32_t payload_bytes) {
  return 1 + length_field_bytes(payload_bytes) + 4;
}
constexpr uint32_t entry_bytes(uint32_t payload_bytes) {
  return entry_header_bytes(payload_bytes) + payload_bytes;
}

// A decoded entry header.
struct EntryHeader {
  EntryType type = EntryType::kInvalid;
  uint32_t header_bytes = 0;
  uint32_t payload_bytes = 0;
  uint32_t checksum = 0;
  uint32_t total_bytes() const { return header_bytes + payload_bytes; }
};

// Encodes a header into `out` (at least kMaxEntryHeaderBytes); returns its size.
uint32_t encode_entry_header(EntryType type, uint32_t payload_bytes, uint32_t checksum,
                             std::byte* out);
// Decodes a header from the first bytes of `in`. kFormatError when truncated or the type
// is unknown; kInvalid type (all-zero tag) is returned as a header with type kInvalid.
Result<EntryHeader> decode_entry_header(std::span<const std::byte> in);
// The checksum of a payload for an entry of `type`.
uint32_t entry_checksum(EntryType type, std::span<const std::byte> payload);
// Seed for the streaming form of entry_checksum (payload in pieces).
uint64_t entry_checksum_seed(EntryType type, uint32_t payload_bytes);

// Object payload fields. The views point into the payload bytes, which must outlive it.
struct ObjectView {
  uint64_t table_id = 0;
  uint64_t version = 0;
  uint32_t timestamp = 0;
  std::string_view key;
  std::string_view value;
};
struct TombstoneView {
  uint64_t table_id = 0;
  uint64_t version = 0;
  uint64_t segment_id = 0;
  uint32_t timestamp = 0;
  std::string_view key;
};
struct SegmentHeaderView {
  uint64_t master_id = 0;
  uint64_t segment_id = 0;
  uint32_t segment_bytes = 0;
};
// The completion record of a client's write, remove or increment: who asked (client id,
// sequence), what the client had acknowledged then, and the result to answer a retry with.
// It lives in the partition of the object it is about (table id, key hash).
struct RpcResultView {
  uint64_t table_id = 0;
  uint64_t key_hash = 0;
  uint64_t client_id = 0;
  uint64_t rpc_seq = 0;
  uint64_t ack_seq = 0;
  uint32_t status = 0;  // a ramkv::Status
  uint64_t version = 0;
  uint64_t value = 0;  // an increment's new value (two's complement); 0 for the others
  friend bool operator==(const RpcResultView&, const RpcResultView&) = default;
};
struct TableStat {
  uint64_t table_id = 0;
  uint64_t object_count = 0;
  uint64_t object_bytes = 0;
  friend bool operator==(const TableStat&, const TableStat&) = default;
};

// The encoded metadata of an object (everything before the key), for appending an object
// as three pieces: prefix, key, value. `out` needs kMaxObjectPrefixBytes.
constexpr uint32_t kMaxObjectPrefixBytes = 10 + 10 + 4 + 10;
uint32_t encode_object_prefix(uint64_t table_id, uint64_t version, uint32_t timestamp,
                              uint32_t key_bytes, std::byte* out);
constexpr uint32_t kMaxTombstonePrefixBytes = 10 + 10 + 10 + 4;
uint32_t encode_tombstone_prefix(uint64_t table_id, uint64_t version, uint64_t segment_id,
                                 uint32_t timestamp, std::byte* out);

// A kRpcResult payload; `out` needs kMaxRpcResultBytes. Returns its size.
constexpr uint32_t kMaxRpcResultBytes = 10 + 8 + 8 + 10 + 10 + 10 + 10 + 8;
uint32_t encode_rpc_result(const RpcResultView& r, std::byte* out);

Result<ObjectView> decode_object(std::span<const std::byte> payload);
Result<RpcResultView> decode_rpc_result(std::span<const std::byte> payload);
Result<TombstoneView> decode_tombstone(std::span<const std::byte> payload);
Result<SegmentHeaderView> decode_segment_header(std::span<const std::byte> payload);
Result<uint64_t> decode_safe_version(std::span<const std::byte> payload);
Result<std::vector<uint64_t>> decode_log_digest(std::span<const std::byte> payload);
Result<std::vector<TableStat>> decode_table_stats(std::span<const std::byte> payload);

// Encoders for the metadata entries' payloads (appended to `out`).
void encode_segment_header(const SegmentHeaderView& h, std::vector<std::byte>* out);
void encode_safe_version(uint64_t safe_version, std::vector<std::byte>* out);
void encode_log_digest(std::span<const uint64_t> segment_ids, std::vector<std::byte>* out);
void encode_table_stats(std::span<const TableStat> stats, std::vector<std::byte>* out);

// A whole entry (header + payload) built in memory: tests, tools, small metadata.
std::vector<std::byte> build_entry(EntryType type, std::span<const std::byte> payload);

}  // namespace ramkv
