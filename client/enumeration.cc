// Enumerating a table: one tablet after another, each walked with kEnumerate batches of
// up to kBatchObjects, following the master's cursor. Each batch is an Op with its own
// deadline, so a large table is not bounded by one operation timeout.
//
// A cursor means something only to the master that issued it. When a batch has to be
// resent (the tablet moved, its master crashed and was recovered), the walk restarts the
// covering tablet from cursor 0 and from then on drops keys it has already returned.
#include <memory>
#include <unordered_set>

#include "client/multi_op.h"
#include "common/checksum.h"

namespace ramkv::client {

namespace {

constexpr uint32_t kBatchObjects = 1000;

struct Enumeration : std::enable_shared_from_this<Enumeration> {
  Client::Impl* impl = nullptr;
  uint64_t table_id = 0;
  uint64_t next_hash = 0;  // the walk has finished every hash below this
  uint64_t cursor = 0;
  Tablet walking;  // the tablet `cursor` belongs to
  bool dedupe = false;
  std::unordered_set<std::string> seen;
  std::vector<Object> objects;
  std::function<void(Result<std::vector<Object>>)> done;

  void next_batch();
  void make_body(const Tablet& t, uint32_t attempt, std::vector<std::byte>* body);
  void on_batch(Status s, std::span<const std::byte> body, const Tablet* t);
  bool add_objects(wire::BodyReader& r, uint32_t count);
  void finish(Status s);
};

void Enumeration::next_batch() {
  OpPtr op = impl->make_op(wire::Opcode::kEnumerate, Target::kRouted);
  op->table_id = table_id;
  op->key_hash = next_hash;
  op->make_body = [self = shared_from_this()](const Tablet& t, uint32_t attempt,
                                              std::vector<std::byte>* body) {
    self->make_body(t, attempt, body);
  };
  op->done = [self = shared_from_this()](Status s, std::span<const std::byte> body,
                                         const Tablet* t) { self->on_batch(s, body, t); };
  impl->start(op);
}

void Enumeration::make_body(const Tablet& t, uint32_t attempt, std::vector<std::byte>* body) {
  bool same = t.start_hash == walking.start_hash && t.end_hash == walking.end_hash &&
              t.server_id == walking.server_id;
  if (cursor != 0 && (attempt > 1 || !same)) {
    // Restarting a tablet part-way: forget the cursor, skip what was already returned.
    if (!dedupe) {
      for (const auto& o : objects) seen.insert(o.key);
      dedupe = true;
    }
    cursor = 0;
  }
  walking = t;
  body->clear();
  wire::BodyWriter(body).put(wire::EnumerateRequest{.table_id = table_id,
                                                    .start_hash = t.start_hash,
                                                    .end_hash = t.end_hash,
                                                    .cursor = cursor,
                                                    .max_objects = kBatchObjects});
}

void Enumeration::on_batch(Status s, std::span<const std::byte> body, const Tablet* t) {
  if (s != Status::kOk) return finish(s);
  wire::BodyReader r(body);
  wire::EnumerateResponse h;
  if (!r.get(&h) || !add_objects(r, h.count) || !r.at_end()) return finish(Status::kBadRequest);
  if (h.next_cursor != wire::kEnumerateDone) {
    // A master's cursor only moves forward (it is a bucket index); one that does not
    // would make this walk loop forever, each batch within its own deadline.
    if (h.next_cursor <= cursor) return finish(Status::kBadRequest);
    cursor = h.next_cursor;
    return next_batch();
  }
  if (t->end_hash == UINT64_MAX) return finish(Status::kOk);
  next_hash = t->end_hash + 1;
  cursor = 0;
  next_batch();
}

bool Enumeration::add_objects(wire::BodyReader& r, uint32_t count) {
  for (uint32_t i = 0; i < count; ++i) {
    wire::EnumeratedObject e;
    std::string_view key, value;
    if (!r.get(&e) || !r.get_string(e.key_bytes, &key) || !r.get_string(e.value_bytes, &value)) {
      return false;
    }
    if (dedupe && !seen.insert(std::string(key)).second) continue;
    objects.push_back({std::string(key), std::string(value), e.version});
  }
  return true;
}

void Enumeration::finish(Status s) {
  auto fn = std::move(done);
  done = nullptr;
  impl->end_user_op();
  if (!fn) return;
  if (s != Status::kOk) return fn(s);
  fn(std::move(objects));
}

}  // namespace

void start_enumerate(Client::Impl& impl, uint64_t table_id,
                     std::function<void(Result<std::vector<Object>>)> done) {
  auto e = std::make_shared<Enumeration>();
  e->impl = &impl;
  e->table_id = table_id;
  e->done = std::move(done);
  impl.begin_user_op();
  e->next_batch();
}

}  // namespace ramkv::client
