#include "client/tablet_map.h"

namespace ramkv::client {

bool decode_servers(wire::BodyReader& r, uint32_t count, std::vector<ServerRecord>* out) {
  for (uint32_t i = 0; i < count; ++i) {
    wire::ServerEntry e;
    std::string_view locator;
    if (!r.get(&e) || !r.get_string(e.locator_bytes, &locator)) return false;
    out->push_back({.server_id = e.server_id,
                    .services = e.services,
                    .status = e.status,
                    .locator = std::string(locator)});
  }
  return true;
}

Result<TabletMapReply> decode_tablet_map(std::span<const std::byte> body) {
  wire::BodyReader r(body);
  wire::TabletMapHeader h;
  if (!r.get(&h)) return Status::kBadRequest;
  // Each tablet takes sizeof(TabletWire) bytes: a count the body cannot hold is a lie,
  // refused before anything is reserved.
  if (h.count > r.remaining() / sizeof(wire::TabletWire)) return Status::kBadRequest;
  TabletMapReply reply;
  reply.version = h.version;
  reply.tablets.reserve(h.count);
  for (uint32_t i = 0; i < h.count; ++i) {
    wire::TabletWire t;
    if (!r.get(&t)) return Status::kBadRequest;
    reply.tablets.push_back({t.table_id, t.start_hash, t.end_hash, t.server_id});
  }
  if (!decode_servers(r, h.server_count, &reply.servers) || !r.at_end()) {
    return Status::kBadRequest;
  }
  return reply;
}

void TabletMap::add_servers(const TabletMapReply& reply) {
  for (const auto& s : reply.servers) servers_[s.server_id] = s;
}

void TabletMap::replace_table(uint64_t table_id, const TabletMapReply& reply) {
  forget_table(table_id);
  for (const auto& t : reply.tablets) {
    if (t.table_id == table_id) tablets_[{t.table_id, t.start_hash}] = t;
  }
  add_servers(reply);
}

void TabletMap::replace_all(const TabletMapReply& reply) {
  tablets_.clear();
  for (const auto& t : reply.tablets) tablets_[{t.table_id, t.start_hash}] = t;
  add_servers(reply);
}

void TabletMap::forget_table(uint64_t table_id) {
  tablets_.erase(tablets_.lower_bound({table_id, 0}),
                 table_id == UINT64_MAX ? tablets_.end() : tablets_.lower_bound({table_id + 1, 0}));
}

const Tablet* TabletMap::find(uint64_t table_id, uint64_t hash) const {
  auto it = tablets_.upper_bound({table_id, hash});
  if (it == tablets_.begin()) return nullptr;
  --it;
  const Tablet& t = it->second;
  return t.table_id == table_id && t.covers(hash) ? &t : nullptr;
}

const ServerRecord* TabletMap::server(uint64_t server_id) const {
  auto it = servers_.find(server_id);
  return it == servers_.end() ? nullptr : &it->second;
}

bool TabletMap::has_table(uint64_t table_id) const {
  auto it = tablets_.lower_bound({table_id, 0});
  return it != tablets_.end() && it->first.first == table_id;
}

std::vector<Tablet> TabletMap::tablets_of(uint64_t table_id) const {
  std::vector<Tablet> out;
  for (auto it = tablets_.lower_bound({table_id, 0});
       it != tablets_.end() && it->first.first == table_id; ++it) {
    out.push_back(it->second);
  }
  return out;
}

}  // namespace ramkv::client
