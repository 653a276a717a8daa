// MasterService: the operations over many objects (multi read/write/remove, enumerate).
// A multi-op reply is, for each request item in order, a u16 status and, if kOk, the
// item's response (wire_format.h); the reply as a whole is kOk once the body decoded.
#include <algorithm>
#include <cstring>

#include "master/master_service.h"

namespace ramkv::master {

namespace {

void put_item_status(wire::BodyWriter& w, Status s) { w.put(static_cast<uint16_t>(s)); }

}  // namespace

template <typename DecodeItem>
bool MasterService::decode_multi(std::span<const std::byte> body, DecodeItem&& decode_item) {
  wire::BodyReader in(body);
  wire::MultiHeader h;
  if (!in.get(&h) || h.count > wire::kMaxMultiCount) return false;
  items_.resize(h.count);
  for (KeyedItem& item : items_) {
    item = KeyedItem{};
    if (!decode_item(in, &item)) return false;
  }
  return in.at_end();
}

Status MasterService::multi_read(std::span<const std::byte> body, Reply& reply) {
  if (!decode_multi(body, decode_read_item)) return Status::kBadRequest;
  auto w = reply.writer();
  bool full = false;
  for (size_t i = 0; i < items_.size(); ++i) {
    // Once the reply is full the rest answer kRetry unread (invariant 3).
    Result<uint64_t> version =
        full ? Result<uint64_t>(Status::kRetry) : read_item(items_[i], &value_scratch_);
    if (version.ok()) {
      size_t need = sizeof(uint16_t) + sizeof(wire::ReadResponse) + value_scratch_.size();
      // Room for a bare status for every later item is kept too.
      size_t later = sizeof(uint16_t) * (items_.size() - i - 1);
      if (reply.body().size() + need + later > wire::kMaxBodyBytes) {
        full = true;
        version = Status::kRetry;
      }
    }
    put_item_status(w, version.status());
    if (!version.ok()) continue;
    w.put(wire::ReadResponse{.version = *version,
                             .value_bytes = static_cast<uint32_t>(value_scratch_.size())});
    w.put_bytes(value_scratch_);
  }
  return Status::kOk;
}

Status MasterService::multi_write(std::span<const std::byte> body, Reply& reply) {
  if (!decode_multi(body, decode_write_item)) return Status::kBadRequest;
  auto w = reply.writer();
  for (const KeyedItem& item : items_) {
    auto version = write_item(item);
    put_item_status(w, version.status());
    if (version.ok()) w.put(wire::VersionResponse{.version = *version});
  }
  return Status::kOk;
}

Status MasterService::multi_remove(std::span<const std::byte> body, Reply& reply) {
  if (!decode_multi(body, decode_read_item)) return Status::kBadRequest;
  auto w = reply.writer();
  for (const KeyedItem& item : items_) {
    auto version = remove_item(item);
    put_item_status(w, version.status());
    if (version.ok()) w.put(wire::VersionResponse{.version = *version});
  }
  return Status::kOk;
}

// ---- Enumerate --------------------------------------------------------------------------

Status MasterService::enumerate(std::span<const std::byte> body, Reply& reply) {
  wire::BodyReader in(body);
  wire::EnumerateRequest r;
  if (!in.get(&r) || !in.at_end() || r.start_hash > r.end_hash) return Status::kBadRequest;
  if (!tablets_.covers(r.table_id, {r.start_hash, r.end_hash})) return Status::kUnknownTablet;
  auto w = reply.writer();
  w.put(wire::EnumerateResponse{});  // patched below once the count is known
  uint32_t count = 0;
  uint64_t next = wire::kEnumerateDone;
  if (r.cursor != wire::kEnumerateDone) {
    auto batch = enumerate_batch(r, reply, &count);
    if (!batch.ok()) return batch.status();
    next = *batch;
  }
  wire::EnumerateResponse head{.next_cursor = next, .count = count};
  std::memcpy(reply.body().data(), &head, sizeof(head));
  return Status::kOk;
}

Result<uint64_t> MasterService::enumerate_batch(const wire::EnumerateRequest& r, Reply& reply,
                                                uint32_t* count) {
  const uint32_t max_objects =
      r.max_objects == 0 ? kMaxEnumerateObjects : std::min(r.max_objects, kMaxEnumerateObjects);
  const MasterConfig& config = objects_->config();
  // The most one object can add to the body; asking the ObjectManager for no more than
  // the soft budget holds keeps a batch's overshoot to the rest of one bucket.
  const size_t object_max_bytes =
      sizeof(wire::EnumeratedObject) + size_t{config.max_key_bytes} + config.max_value_bytes;
  auto w = reply.writer();
  uint64_t cursor = r.cursor;
  while (cursor != objects_->end_cursor() && *count < max_objects &&
         reply.body().size() < kEnumerateSoftBytes) {
    size_t room = (kEnumerateSoftBytes - reply.body().size()) / object_max_bytes;
    size_t want = std::clamp<size_t>(room, 1, max_objects - *count);
    objects_scratch_.clear();
    auto next =
        objects_->enumerate(r.table_id, r.start_hash, r.end_hash, cursor, want, &objects_scratch_);
    if (!next.ok()) return next.status();
    for (const auto& o : objects_scratch_) {
      w.put(wire::EnumeratedObject{.version = o.version,
                                   .key_bytes = static_cast<uint32_t>(o.key.size()),
                                   .value_bytes = static_cast<uint32_t>(o.value.size())});
      w.put_bytes(o.key);
      w.put_bytes(o.value);
    }
    *count += static_cast<uint32_t>(objects_scratch_.size());
    cursor = *next;
  }
  return cursor == objects_->end_cursor() ? wire::kEnumerateDone : cursor;
}

}  // namespace ramkv::master
