#include "common/log_entry.h"

#include <cstring>

#include "common/checksum.h"

namespace ramkv {

std::string_view entry_type_name(EntryType type) {
  switch (type) {
    case EntryType::kInvalid:
      return "invalid";
    case EntryType::kSegmentHeader:
      return "segment header";
    case EntryType::kObject:
      return "object";
    case EntryType::kTombstone:
      return "tombstone";
    case EntryType::kSafeVersion:
      return "safe version";
    case EntryType::kLogDigest:
      return "log digest";
    case EntryType::kTableStats:
      return "table stats";
    case EntryType::kRpcResult:
      return "rpc result";
  }
  return "unknown";
}

uint64_t entry_checksum_seed(EntryType type, uint32_t payload_bytes) {
  return (uint64_t{static_cast<uint8_t>(type)} << 32) | payload_bytes;
}

uint32_t entry_checksum(EntryType type, std::span<const std::byte> payload) {
  return checksum32(payload, entry_checksum_seed(type, static_cast<uint32_t>(payload.size())));
}

uint32_t encode_entry_header(EntryType type, uint32_t payload_bytes, uint32_t checksum,
                             std::byte* out) {
  RAMKV_CHECK(payload_bytes <= kMaxPayloadBytes);
  uint32_t len_bytes = length_field_bytes(payload_bytes);
  out[0] = static_cast<std::byte>(static_cast<uint8_t>(type) | ((len_bytes - 1) << 6));
  for (uint32_t i = 0; i < len_bytes; ++i) {
    out[1 + i] = static_cast<std::byte>((payload_bytes >> (8 * i)) & 0xff);
  }
  std::memcpy(out + 1 + len_bytes, &checksum, 4);
  return 1 + len_bytes + 4;
}

Result<EntryHeader> decode_entry_header(std::span<const std::byte> in) {
  if (in.empty()) return Status::kFormatError;
  auto tag = static_cast<uint8_t>(in[0]);
  EntryHeader h;
  uint8_t type = tag & 0x3f;
  if (tag == 0) return h;  // kInvalid: unwritten space
  if (type == 0 || type > kMaxEntryType) return Status::kFormatError;
  uint32_t len_bytes = (tag >> 6) + 1u;
  if (in.size() < 1 + len_bytes + 4) return Status::kFormatError;
  uint32_t length = 0;
  for (uint32_t i = 0; i < len_bytes; ++i) {
    length |= uint32_t{static_cast<uint8_t>(in[1 + i])} << (8 * i);
  }
  // The fewest bytes that hold the length: anything else is not an encoder's output.
  if (length_field_bytes(length) != len_bytes || length > kMaxPayloadBytes) {
    return Status::kFormatError;
  }
  h.type = static_cast<EntryType>(type);
  h.header_bytes = 1 + len_bytes + 4;
  h.payload_bytes = length;
  std::memcpy(&h.checksum, in.data() + 1 + len_bytes, 4);
  return h;
}

uint32_t encode_object_prefix(uint64_t table_id, uint64_t version, uint32_t timestamp,
                              uint32_t key_bytes, std::byte* out) {
  ByteWriter w({out, kMaxObjectPrefixBytes});
  w.put_varint(table_id);
  w.put_varint(version);
  w.put<uint32_t>(timestamp);
  w.put_varint(key_bytes);
  RAMKV_CHECK(w.ok());
  return static_cast<uint32_t>(w.size());
}

uint32_t encode_tombstone_prefix(uint64_t table_id, uint64_t version, uint64_t segment_id,
                                 uint32_t timestamp, std::byte* out) {
  ByteWriter w({out, kMaxTombstonePrefixBytes});
  w.put_varint(table_id);
  w.put_varint(version);
  w.put_varint(segment_id);
  w.put<uint32_t>(timestamp);
  RAMKV_CHECK(w.ok());
  return static_cast<uint32_t>(w.size());
}

Result<ObjectView> decode_object(std::span<const std::byte> payload) {
  ByteReader r(payload);
  ObjectView o;
  o.table_id = r.get_varint();
  o.version = r.get_varint();
  o.timestamp = r.get<uint32_t>();
  uint64_t key_bytes = r.get_varint();
  if (!r.ok() || key_bytes > r.remaining()) return Status::kFormatError;
  o.key = r.get_string(static_cast<size_t>(key_bytes));
  o.value = as_chars(r.rest());
  return o;
}

Result<TombstoneView> decode_tombstone(std::span<const std::byte> payload) {
  ByteReader r(payload);
  TombstoneView t;
  t.table_id = r.get_varint();
  t.version = r.get_varint();
  t.segment_id = r.get_varint();
  t.timestamp = r.get<uint32_t>();
  if (!r.ok()) return Status::kFormatError;
  t.key = as_chars(r.rest());
  return t;
}

uint32_t encode_rpc_result(const RpcResultView& r, std::byte* out) {
  ByteWriter w({out, kMaxRpcResultBytes});
  w.put_varint(r.table_id);
  w.put<uint64_t>(r.key_hash);
  w.put<uint64_t>(r.client_id);
  w.put_varint(r.rpc_seq);
  w.put_varint(r.ack_seq);
  w.put_varint(r.status);
  w.put_varint(r.version);
  if (r.value != 0) w.put<uint64_t>(r.value);  // most records are not increments
  RAMKV_CHECK(w.ok());
  return static_cast<uint32_t>(w.size());
}

Result<RpcResultView> decode_rpc_result(std::span<const std::byte> payload) {
  ByteReader r(payload);
  RpcResultView v;
  v.table_id = r.get_varint();
  v.key_hash = r.get<uint64_t>();
  v.client_id = r.get<uint64_t>();
  v.rpc_seq = r.get_varint();
  v.ack_seq = r.get_varint();
  uint64_t status = r.get_varint();
  v.version = r.get_varint();
  if (r.ok() && r.remaining() != 0) v.value = r.get<uint64_t>();
  if (!r.ok() || r.remaining() != 0 || status > UINT16_MAX) return Status::kFormatError;
  v.status = static_cast<uint32_t>(status);
  return v;
}

Result<SegmentHeaderView> decode_segment_header(std::span<const std::byte> payload) {
  ByteReader r(payload);
  SegmentHeaderView h;
  h.master_id = r.get<uint64_t>();
  h.segment_id = r.get<uint64_t>();
  h.segment_bytes = r.get<uint32_t>();
  if (!r.ok() || r.remaining() != 0) return Status::kFormatError;
  return h;
}

Result<uint64_t> decode_safe_version(std::span<const std::byte> payload) {
  ByteReader r(payload);
  uint64_t v = r.get_varint();
  if (!r.ok() || r.remaining() != 0) return Status::kFormatError;
  return v;
}

Result<std::vector<uint64_t>> decode_log_digest(std::span<const std::byte> payload) {
  ByteReader r(payload);
  uint64_t count = r.get_varint();
  if (!r.ok() || count != r.remaining() / 8 || r.remaining() % 8 != 0) {
    return Status::kFormatError;
  }
  std::vector<uint64_t> ids(static_cast<size_t>(count));
  for (auto& id : ids) id = r.get<uint64_t>();
  return ids;
}

Result<std::vector<TableStat>> decode_table_stats(std::span<const std::byte> payload) {
  ByteReader r(payload);
  uint64_t count = r.get_varint();
  // Each stat takes at least 3 bytes: a count beyond that is a lie, not an allocation.
  if (!r.ok() || count > r.remaining() / 3) return Status::kFormatError;
  std::vector<TableStat> stats(static_cast<size_t>(count));
  for (auto& s : stats) {
    s.table_id = r.get_varint();
    s.object_count = r.get_varint();
    s.object_bytes = r.get_varint();
  }
  if (!r.ok() || r.remaining() != 0) return Status::kFormatError;
  return stats;
}

namespace {
template <typename F>
void append_encoded(std::vector<std::byte>* out, size_t max_bytes, F&& fill) {
  size_t start = out->size();
  out->resize(start + max_bytes);
  ByteWriter w({out->data() + start, max_bytes});
  fill(w);
  RAMKV_CHECK(w.ok());
  out->resize(start + w.size());
}
}  // namespace

void encode_segment_header(const SegmentHeaderView& h, std::vector<std::byte>* out) {
  append_encoded(out, 20, [&](ByteWriter& w) {
    w.put<uint64_t>(h.master_id);
    w.put<uint64_t>(h.segment_id);
    w.put<uint32_t>(h.segment_bytes);
  });
}

void encode_safe_version(uint64_t safe_version, std::vector<std::byte>* out) {
  append_encoded(out, 10, [&](ByteWriter& w) { w.put_varint(safe_version); });
}

void encode_log_digest(std::span<const uint64_t> segment_ids, std::vector<std::byte>* out) {
  append_encoded(out, 10 + 8 * segment_ids.size(), [&](ByteWriter& w) {
    w.put_varint(segment_ids.size());
    for (uint64_t id : segment_ids) w.put<uint64_t>(id);
  });
}

void encode_table_stats(std::span<const TableStat> stats, std::vector<std::byte>* out) {
  append_encoded(out, 10 + 30 * stats.size(), [&](ByteWriter& w) {
    w.put_varint(stats.size());
    for (const auto& s : stats) {
      w.put_varint(s.table_id);
      w.put_varint(s.object_count);
      w.put_varint(s.object_bytes);
    }
  });
}

std::vector<std::byte> build_entry(EntryType type, std::span<const std::byte> payload) {
  auto payload_bytes = static_cast<uint32_t>(payload.size());
  std::vector<std::byte> out(entry_bytes(payload_bytes));
  uint32_t n = encode_entry_header(type, payload_bytes, entry_checksum(type, payload), out.data());
  if (!payload.empty()) std::memcpy(out.data() + n, payload.data(), payload.size());
  return out;
}

}  // namespace ramkv
