// TabletMap: the client's cached copy of the coordinator's tablet map, and the routing
// decision made from it: which master serves (table, key hash).
//
// Owner: one Client::Impl; its thread only (not thread-safe).
//
// Invariants:
//   1. The tablets of one table do not overlap; find() returns the one covering the hash,
//      or nullptr where the cached map has a hole (the caller refreshes the table).
//   2. Each table's tablets are replaced as a whole (replace_table), never merged, so a
//      refresh cannot leave a mix of old and new owners for one table.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/result.h"
#include "common/wire_format.h"

namespace ramkv::client {

struct Tablet {
  uint64_t table_id = 0;
  uint64_t start_hash = 0;  // inclusive
  uint64_t end_hash = 0;    // inclusive
  uint64_t server_id = 0;
  bool covers(uint64_t hash) const { return hash >= start_hash && hash <= end_hash; }
};

struct ServerRecord {
  uint64_t server_id = 0;
  uint32_t services = 0;
  uint8_t status = 0;  // 0 up, 1 crashed, 2 removed
  std::string locator;
};

// A decoded kGetTabletMap response.
struct TabletMapReply {
  uint64_t version = 0;
  std::vector<Tablet> tablets;
  std::vector<ServerRecord> servers;
};
// kBadRequest when the body is short, too long or lies about a length.
Result<TabletMapReply> decode_tablet_map(std::span<const std::byte> body);
// Reads `count` x (ServerEntry + locator); shared with the server-list decoder.
bool decode_servers(wire::BodyReader& r, uint32_t count, std::vector<ServerRecord>* out);

class TabletMap {
 public:
  // Replaces every cached tablet of `table_id` by those of `tablets` that belong to it,
  // and records the servers named. A table with no tablets is forgotten.
  void replace_table(uint64_t table_id, const TabletMapReply& reply);
  // Replaces the whole map (a reply for every table).
  void replace_all(const TabletMapReply& reply);
  void forget_table(uint64_t table_id);

  const Tablet* find(uint64_t table_id, uint64_t hash) const;
  const ServerRecord* server(uint64_t server_id) const;
  bool has_table(uint64_t table_id) const;
  // The tablets of one table in hash order.
  std::vector<Tablet> tablets_of(uint64_t table_id) const;
  size_t tablet_count() const { return tablets_.size(); }

 private:
  void add_servers(const TabletMapReply& reply);

  // Keyed by (table id, start hash): the covering tablet is the last one at or before
  // (table, hash).
  std::map<std::pair<uint64_t, uint64_t>, Tablet> tablets_;
  std::unordered_map<uint64_t, ServerRecord> servers_;
};

}  // namespace ramkv::client
