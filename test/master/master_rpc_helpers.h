// Encoders for master request bodies and a direct call into MasterService::handle, for
// tests that exercise the service without a network. Bodies follow common/wire_format.h.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/transport.h"
#include "common/wire_format.h"
#include "master/master_service.h"

namespace ramkv::master::testing {

using Body = std::vector<std::byte>;

inline Body read_body(uint64_t table_id, std::string_view key, wire::RejectRulesWire rules = {}) {
  Body b;
  wire::BodyWriter w(&b);
  w.put(wire::ReadRequest{
      .table_id = table_id, .key_bytes = static_cast<uint32_t>(key.size()), .rules = rules});
  w.put_bytes(key);
  return b;
}
inline Body remove_body(uint64_t table_id, std::string_view key, wire::RejectRulesWire rules = {}) {
  return read_body(table_id, key, rules);
}

inline Body write_body(uint64_t table_id, std::string_view key, std::string_view value,
                       wire::RejectRulesWire rules = {}) {
  Body b;
  wire::BodyWriter w(&b);
  w.put(wire::WriteRequest{.table_id = table_id,
                           .key_bytes = static_cast<uint32_t>(key.size()),
                           .value_bytes = static_cast<uint32_t>(value.size()),
                           .rules = rules});
  w.put_bytes(key);
  w.put_bytes(value);
  return b;
}

inline Body increment_body(uint64_t table_id, std::string_view key, int64_t delta,
                           wire::RejectRulesWire rules = {}) {
  Body b;
  wire::BodyWriter w(&b);
  w.put(wire::IncrementRequest{.table_id = table_id,
                               .delta = delta,
                               .key_bytes = static_cast<uint32_t>(key.size()),
                               .rules = rules});
  w.put_bytes(key);
  return b;
}

// A multi-op body: MultiHeader then the items, each encoded as its single-op body.
inline Body multi_body(const std::vector<Body>& items) {
  Body b;
  wire::BodyWriter w(&b);
  w.put(wire::MultiHeader{.count = static_cast<uint32_t>(items.size())});
  for (const Body& item : items) w.put_bytes(std::span<const std::byte>(item));
  return b;
}

inline Body enumerate_body(uint64_t table_id, uint64_t start_hash, uint64_t end_hash,
                           uint64_t cursor, uint32_t max_objects) {
  Body b;
  wire::BodyWriter(&b).put(wire::EnumerateRequest{.table_id = table_id,
                                                  .start_hash = start_hash,
                                                  .end_hash = end_hash,
                                                  .cursor = cursor,
                                                  .max_objects = max_objects});
  return b;
}

inline Body tablets_body(const std::vector<wire::TabletWire>& tablets) {
  Body b;
  wire::BodyWriter w(&b);
  w.put(wire::TabletListHeader{.count = static_cast<uint32_t>(tablets.size())});
  for (const auto& t : tablets) w.put(t);
  return b;
}

// A reply as the peer would receive it: status and the body with external pieces joined.
struct Response {
  Status status = Status::kOk;
  Body body;
};

inline Response call(MasterService& service, wire::Opcode op, std::span<const std::byte> body) {
  wire::MessageHeader h;
  h.opcode = static_cast<uint16_t>(op);
  h.body_bytes = static_cast<uint32_t>(body.size());
  Reply reply;
  service.handle(h, body, reply);
  Response r{reply.status(), reply.body()};
  for (auto piece : reply.external()) r.body.insert(r.body.end(), piece.begin(), piece.end());
  return r;
}

}  // namespace ramkv::master::testing
