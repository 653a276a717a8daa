#include "coordinator/coordinator_state.h"

#include <algorithm>
#include <set>

#include "common/buffer.h"
#include "common/wire_format.h"

namespace ramkv::coordinator {

namespace {

constexpr uint32_t kFormatVersion = 2;
// Version 1 lacks the replication epoch section; it is still read.
constexpr uint32_t kFormatVersionNoEpochs = 1;
constexpr size_t kEpochEntryBytes = 3 * 8;
constexpr size_t kMaxVarintBytes = 10;

bool tablet_less(const Tablet& a, const Tablet& b) {
  return a.table_id != b.table_id ? a.table_id < b.table_id : a.start_hash < b.start_hash;
}

}  // namespace

std::vector<std::pair<uint64_t, uint64_t>> split_hash_space(uint32_t count) {
  RAMKV_CHECK(count >= 1);
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  ranges.reserve(count);
  using u128 = unsigned __int128;
  const u128 space = u128{1} << 64;
  for (uint32_t i = 0; i < count; ++i) {
    auto start = static_cast<uint64_t>(space * i / count);
    auto end = static_cast<uint64_t>(space * (i + 1) / count - 1);
    ranges.emplace_back(start, end);
  }
  return ranges;
}

// ---- Server list ------------------------------------------------------------------------

CoordinatorState::EnlistResult CoordinatorState::enlist(uint32_t services, std::string_view locator,
                                                        uint64_t replaces_id) {
  ServerInfo* old = nullptr;
  if (find_server(replaces_id) != nullptr) old = &servers_[server_index(replaces_id) - 1];
  if (old == nullptr) {
    for (auto& s : servers_) {
      if (s.status == ServerStatus::kUp && s.locator == locator) old = &s;
    }
  }
  EnlistResult result;
  ServerInfo* slot = old;
  if (old != nullptr) {
    result.replaced_id = old->id;
    uint32_t generation = server_generation(old->id) + 1;
    slot->id = make_server_id(server_index(old->id), generation);
  } else {
    RAMKV_CHECK(servers_.size() < UINT32_MAX);
    servers_.push_back({});
    slot = &servers_.back();
    slot->id = make_server_id(static_cast<uint32_t>(servers_.size()), 1);
  }
  slot->services = services;
  slot->status = ServerStatus::kUp;
  slot->locator = std::string(locator);
  result.server_id = slot->id;
  ++server_list_version_;
  // A replaced master keeps its tablets: they are recovered from its backups onto the
  // masters that are up (coordinator/recovery_manager.h), the restarted one among them.
  return result;
}

const ServerInfo* CoordinatorState::find_server(uint64_t id) const {
  uint32_t index = server_index(id);
  if (index == 0 || index > servers_.size()) return nullptr;
  const ServerInfo& s = servers_[index - 1];
  return s.id == id ? &s : nullptr;
}

bool CoordinatorState::issued(uint64_t id) const {
  uint32_t index = server_index(id);
  if (index == 0 || index > servers_.size()) return false;
  uint32_t generation = server_generation(id);
  return generation >= 1 && generation <= server_generation(servers_[index - 1].id);
}

bool CoordinatorState::mark_crashed(uint64_t id) {
  if (find_server(id) == nullptr) return false;
  ServerInfo& s = servers_[server_index(id) - 1];
  if (s.status != ServerStatus::kUp) return false;
  s.status = ServerStatus::kCrashed;
  ++server_list_version_;
  return true;
}

std::vector<uint64_t> CoordinatorState::up_masters() const {
  std::vector<uint64_t> ids;
  for (const auto& s : servers_) {
    if (s.status == ServerStatus::kUp && (s.services & wire::kServiceMaster) != 0) {
      ids.push_back(s.id);
    }
  }
  return ids;
}

// ---- Tables --------------------------------------------------------------------------------

std::optional<uint64_t> CoordinatorState::table_id(std::string_view name) const {
  auto it = tables_.find(name);
  if (it == tables_.end()) return std::nullopt;
  return it->second;
}

bool CoordinatorState::has_table(uint64_t id) const {
  return std::any_of(tables_.begin(), tables_.end(), [&](const auto& t) { return t.second == id; });
}

uint64_t CoordinatorState::create_table(std::string_view name, uint32_t tablet_count,
                                        const std::vector<uint64_t>& masters) {
  RAMKV_CHECK(!masters.empty() && !tables_.contains(name));
  if (tablet_count == 0) tablet_count = static_cast<uint32_t>(masters.size());
  uint64_t id = next_table_id_++;
  tables_.emplace(std::string(name), id);
  auto ranges = split_hash_space(tablet_count);
  for (size_t i = 0; i < ranges.size(); ++i) {
    tablets_.push_back({.table_id = id,
                        .start_hash = ranges[i].first,
                        .end_hash = ranges[i].second,
                        .server_id = masters[i % masters.size()]});
  }
  std::sort(tablets_.begin(), tablets_.end(), tablet_less);
  ++tablet_map_version_;
  return id;
}

Result<std::vector<Tablet>> CoordinatorState::drop_table(std::string_view name) {
  auto it = tables_.find(name);
  if (it == tables_.end()) return Status::kUnknownTable;
  uint64_t id = it->second;
  tables_.erase(it);
  std::vector<Tablet> dropped = tablets(id);
  std::erase_if(tablets_, [&](const Tablet& t) { return t.table_id == id; });
  ++tablet_map_version_;
  return dropped;
}

std::vector<Tablet> CoordinatorState::tablets(uint64_t id) const {
  if (id == 0) return tablets_;
  std::vector<Tablet> out;
  for (const auto& t : tablets_) {
    if (t.table_id == id) out.push_back(t);
  }
  return out;
}

std::vector<Tablet> CoordinatorState::tablets_of(uint64_t server_id) const {
  std::vector<Tablet> out;
  for (const auto& t : tablets_) {
    if (t.server_id == server_id) out.push_back(t);
  }
  return out;
}

// ---- Replication epochs ------------------------------------------------------------------

bool CoordinatorState::set_replication_epoch(uint64_t master_id, ReplicationEpoch e) {
  RAMKV_CHECK(issued(master_id));
  auto [it, inserted] = replication_epochs_.try_emplace(master_id, e);
  if (inserted) return true;
  if (e <= it->second) return false;
  it->second = e;
  return true;
}

Status CoordinatorState::move_tablet_range(uint64_t from, const Tablet& moved) {
  auto it = std::find_if(tablets_.begin(), tablets_.end(), [&](const Tablet& t) {
    return t.table_id == moved.table_id && t.server_id == from &&
           t.start_hash <= moved.start_hash && moved.end_hash <= t.end_hash &&
           moved.start_hash <= moved.end_hash;
  });
  if (it == tablets_.end()) return Status::kInvalidArgument;
  const Tablet whole = *it;
  std::vector<Tablet> pieces;
  if (whole.start_hash < moved.start_hash) {
    pieces.push_back({whole.table_id, whole.start_hash, moved.start_hash - 1, from});
  }
  pieces.push_back(moved);
  if (moved.end_hash < whole.end_hash) {
    pieces.push_back({whole.table_id, moved.end_hash + 1, whole.end_hash, from});
  }
  it = tablets_.erase(it);
  tablets_.insert(it, pieces.begin(), pieces.end());
  ++tablet_map_version_;
  return Status::kOk;
}

bool CoordinatorState::mark_removed(uint64_t id) {
  if (find_server(id) == nullptr) return false;
  ServerInfo& s = servers_[server_index(id) - 1];
  if (s.status != ServerStatus::kCrashed) return false;
  s.status = ServerStatus::kRemoved;
  ++server_list_version_;
  return true;
}

std::optional<ReplicationEpoch> CoordinatorState::replication_epoch(uint64_t master_id) const {
  auto it = replication_epochs_.find(master_id);
  if (it == replication_epochs_.end()) return std::nullopt;
  return it->second;
}

bool CoordinatorState::operator==(const CoordinatorState& o) const {
  return server_list_version_ == o.server_list_version_ &&
         tablet_map_version_ == o.tablet_map_version_ && next_table_id_ == o.next_table_id_ &&
         servers_ == o.servers_ && tables_ == o.tables_ && tablets_ == o.tablets_ &&
         replication_epochs_ == o.replication_epochs_;
}

// ---- Persistence ---------------------------------------------------------------------------

std::vector<std::byte> CoordinatorState::serialize() const {
  size_t bound = 4 + 3 * 8 + 4 * kMaxVarintBytes;
  for (const auto& s : servers_) bound += 8 + 4 + 1 + kMaxVarintBytes + s.locator.size();
  for (const auto& [name, id] : tables_) bound += 8 + kMaxVarintBytes + name.size();
  bound += tablets_.size() * 32;
  bound += replication_epochs_.size() * kEpochEntryBytes;
  std::vector<std::byte> out(bound);
  ByteWriter w(out);
  w.put(kFormatVersion);
  w.put(server_list_version_);
  w.put(tablet_map_version_);
  w.put(next_table_id_);
  w.put_varint(servers_.size());
  for (const auto& s : servers_) {
    w.put(s.id);
    w.put(s.services);
    w.put(static_cast<uint8_t>(s.status));
    w.put_varint(s.locator.size());
    w.put_bytes(s.locator);
  }
  w.put_varint(tables_.size());
  for (const auto& [name, id] : tables_) {
    w.put(id);
    w.put_varint(name.size());
    w.put_bytes(name);
  }
  w.put_varint(tablets_.size());
  for (const auto& t : tablets_) {
    w.put(t.table_id);
    w.put(t.start_hash);
    w.put(t.end_hash);
    w.put(t.server_id);
  }
  w.put_varint(replication_epochs_.size());
  for (const auto& [master_id, e] : replication_epochs_) {
    w.put(master_id);
    w.put(e.segment_id);
    w.put(e.epoch);
  }
  RAMKV_CHECK(w.ok());
  out.resize(w.size());
  return out;
}

Result<CoordinatorState> CoordinatorState::deserialize(std::span<const std::byte> bytes) {
  ByteReader r(bytes);
  CoordinatorState st;
  uint32_t version = r.get<uint32_t>();
  if (version != kFormatVersion && version != kFormatVersionNoEpochs) return Status::kFormatError;
  st.server_list_version_ = r.get<uint64_t>();
  st.tablet_map_version_ = r.get<uint64_t>();
  st.next_table_id_ = r.get<uint64_t>();
  // Counts are checked against the bytes left before anything is reserved.
  uint64_t server_count = r.get_varint();
  if (server_count > r.remaining()) return Status::kFormatError;
  for (uint64_t i = 0; i < server_count && r.ok(); ++i) {
    ServerInfo s;
    s.id = r.get<uint64_t>();
    s.services = r.get<uint32_t>();
    uint8_t status = r.get<uint8_t>();
    if (status > static_cast<uint8_t>(ServerStatus::kRemoved)) return Status::kFormatError;
    s.status = static_cast<ServerStatus>(status);
    uint64_t locator_bytes = r.get_varint();
    if (locator_bytes > r.remaining()) return Status::kFormatError;
    s.locator = std::string(r.get_string(static_cast<size_t>(locator_bytes)));
    st.servers_.push_back(std::move(s));
  }
  uint64_t table_count = r.get_varint();
  if (table_count > r.remaining()) return Status::kFormatError;
  for (uint64_t i = 0; i < table_count && r.ok(); ++i) {
    uint64_t id = r.get<uint64_t>();
    uint64_t name_bytes = r.get_varint();
    if (name_bytes > r.remaining()) return Status::kFormatError;
    if (!st.tables_.emplace(std::string(r.get_string(static_cast<size_t>(name_bytes))), id)
             .second) {
      return Status::kFormatError;
    }
  }
  uint64_t tablet_count = r.get_varint();
  if (tablet_count > r.remaining() / 32) return Status::kFormatError;
  for (uint64_t i = 0; i < tablet_count && r.ok(); ++i) {
    Tablet t;
    t.table_id = r.get<uint64_t>();
    t.start_hash = r.get<uint64_t>();
    t.end_hash = r.get<uint64_t>();
    t.server_id = r.get<uint64_t>();
    st.tablets_.push_back(t);
  }
  if (version >= kFormatVersion) {
    uint64_t epoch_count = r.get_varint();
    if (epoch_count > r.remaining() / kEpochEntryBytes) return Status::kFormatError;
    for (uint64_t i = 0; i < epoch_count && r.ok(); ++i) {
      uint64_t master_id = r.get<uint64_t>();
      ReplicationEpoch e;
      e.segment_id = r.get<uint64_t>();
      e.epoch = r.get<uint64_t>();
      // Strictly increasing ids: no duplicates, and serialize() gives back the same bytes.
      if (!st.replication_epochs_.empty() && master_id <= st.replication_epochs_.rbegin()->first) {
        return Status::kFormatError;
      }
      st.replication_epochs_.emplace_hint(st.replication_epochs_.end(), master_id, e);
    }
  }
  if (!r.ok() || r.remaining() != 0) return Status::kFormatError;
  if (Status s = st.validate(); s != Status::kOk) return s;
  return st;
}

Status CoordinatorState::validate() const {
  for (size_t i = 0; i < servers_.size(); ++i) {
    if (server_index(servers_[i].id) != i + 1 || server_generation(servers_[i].id) == 0) {
      return Status::kFormatError;
    }
  }
  std::set<uint64_t> ids;
  for (const auto& [name, id] : tables_) {
    if (id == 0 || id >= next_table_id_ || !ids.insert(id).second) return Status::kFormatError;
  }
  if (!std::is_sorted(tablets_.begin(), tablets_.end(), tablet_less)) return Status::kFormatError;
  // Each table's tablets must tile [0, 2^64) exactly: contiguous, starting at 0, ending
  // at UINT64_MAX.
  for (size_t i = 0; i < tablets_.size(); ++i) {
    const Tablet& t = tablets_[i];
    bool first = i == 0 || tablets_[i - 1].table_id != t.table_id;
    bool last = i + 1 == tablets_.size() || tablets_[i + 1].table_id != t.table_id;
    if (!ids.contains(t.table_id) || t.end_hash < t.start_hash) return Status::kFormatError;
    if (first ? t.start_hash != 0 : tablets_[i - 1].end_hash + 1 != t.start_hash) {
      return Status::kFormatError;
    }
    if (last && t.end_hash != UINT64_MAX) return Status::kFormatError;
  }
  for (const auto& [master_id, e] : replication_epochs_) {
    if (!issued(master_id)) return Status::kFormatError;
  }
  return Status::kOk;
}

}  // namespace ramkv::coordinator
