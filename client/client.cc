// ramkv::Client: the public face of the client library. Each method encodes its request
// (wire_format.h), hands an Op to Client::Impl (client_impl.h), and decodes the answer.
// Synchronous methods are their asynchronous form plus polling until it completes.
#include "ramkv/client.h"

#include "client/client_impl.h"
#include "client/client_transport.h"
#include "client/multi_op.h"
#include "common/checksum.h"

namespace ramkv {

using client::OpPtr;
using client::Target;

namespace {

using Bytes = std::vector<std::byte>;
using Body = std::span<const std::byte>;

wire::RejectRulesWire to_wire(const RejectRules* r) {
  wire::RejectRulesWire w;
  if (r == nullptr) return w;
  w.doesnt_exist = r->doesnt_exist ? 1 : 0;
  w.exists = r->exists ? 1 : 0;
  w.version_le_given = r->version_le_given ? 1 : 0;
  w.version_ne_given = r->version_ne_given ? 1 : 0;
  w.given_version = r->given_version;
  return w;
}

uint32_t u32(size_t n) { return static_cast<uint32_t>(n); }

// ReadRequest + key: the body of kRead and kRemove and their multi items.
Bytes encode_key_op(uint64_t table_id, std::string_view key, const RejectRules* rules) {
  Bytes b;
  wire::BodyWriter w(&b);
  w.put(wire::ReadRequest{
      .table_id = table_id, .key_bytes = u32(key.size()), .rules = to_wire(rules)});
  w.put_bytes(key);
  return b;
}

Bytes encode_write(uint64_t table_id, std::string_view key, std::string_view value,
                   const RejectRules* rules) {
  Bytes b;
  wire::BodyWriter w(&b);
  w.put(wire::WriteRequest{.table_id = table_id,
                           .key_bytes = u32(key.size()),
                           .value_bytes = u32(value.size()),
                           .rules = to_wire(rules)});
  w.put_bytes(key);
  w.put_bytes(value);
  return b;
}

Bytes encode_name(std::string_view name) {
  Bytes b;
  wire::BodyWriter w(&b);
  w.put(wire::TableNameRequest{.name_bytes = u32(name.size())});
  w.put_bytes(name);
  return b;
}

Result<ReadResult> decode_read(Body body) {
  wire::BodyReader r(body);
  wire::ReadResponse h;
  std::string_view value;
  if (!r.get(&h) || !r.get_string(h.value_bytes, &value) || !r.at_end()) {
    return Status::kBadRequest;
  }
  return ReadResult{std::string(value), h.version};
}

Result<uint64_t> decode_version(Body body) {
  wire::BodyReader r(body);
  wire::VersionResponse h;
  if (!r.get(&h) || !r.at_end()) return Status::kBadRequest;
  return h.version;
}

Result<IncrementResult> decode_increment(Body body) {
  wire::BodyReader r(body);
  wire::IncrementResponse h;
  if (!r.get(&h) || !r.at_end()) return Status::kBadRequest;
  return IncrementResult{h.value, h.version};
}

Result<uint64_t> decode_table_id(Body body) {
  wire::BodyReader r(body);
  wire::TableIdResponse h;
  if (!r.get(&h) || !r.at_end()) return Status::kBadRequest;
  return h.table_id;
}

Result<std::string> decode_text(Body body) { return std::string(as_chars(body)); }

Result<bool> decode_empty(Body) { return true; }

// The whole request must fit in one message; the master judges the key and value limits.
bool fits(const Bytes& body) { return body.size() <= wire::kMaxBodyBytes; }

// An Op's completion that decodes the body into a Result<T> for the caller's callback.
template <typename T, typename Decode>
client::Op::Done deliver(Client::Callback<T> done, Decode decode) {
  return [done = std::move(done), decode](Status s, Body body, const client::Tablet*) {
    if (s != Status::kOk) return done(Result<T>(s));
    done(decode(body));
  };
}

template <typename T>
std::pair<Pending<T>, Client::Callback<T>> make_pending(Client* client) {
  auto state = std::make_shared<typename Pending<T>::State>();
  return {Pending<T>(client, state), [state](Result<T> r) { state->result.emplace(std::move(r)); }};
}

template <typename T, typename Decode>
void start_routed(Client::Impl& impl, wire::Opcode opcode, uint64_t table_id, std::string_view key,
                  Bytes body, Client::Callback<T> done, Decode decode) {
  if (!fits(body)) {
    // Counted as a user op like any other, so that outstanding() and wait_all() wait
    // for this completion too instead of returning before it has run.
    impl.begin_user_op();
    impl.schedule(0, [&impl, done = std::move(done)] {
      impl.end_user_op();
      done(Status::kValueTooLarge);
    });
    return;
  }
  OpPtr op = impl.make_op(opcode, Target::kRouted);
  op->table_id = table_id;
  op->key_hash = key_hash(table_id, key);
  op->body = std::move(body);
  op->user = true;
  op->done = deliver<T>(std::move(done), decode);
  impl.start(op);
}

// A coordinator (or fixed-server) request, run to completion.
template <typename T, typename Decode>
Result<T> call_sync(Client* client, Client::Impl& impl, OpPtr op, Decode decode) {
  auto [pending, done] = make_pending<T>(client);
  op->user = true;
  op->done = deliver<T>(std::move(done), decode);
  impl.start(op);
  return pending.get();
}

}  // namespace

// ---- Setup -------------------------------------------------------------------------

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

Result<std::unique_ptr<Client>> Client::connect(const ClientOptions& options) {
  auto impl = Impl::create(options);
  if (!impl.ok()) return impl.status();
  Status s = (*impl)->load_map();
  if (s != Status::kOk) return s;
  return std::unique_ptr<Client>(new Client(std::move(*impl)));
}

bool Client::transport_available(std::string_view transport) {
  return client::transport_available(transport);
}

uint64_t Client::client_id() const { return impl_->client_id(); }
int Client::poll(uint64_t timeout_ns) { return impl_->poll(timeout_ns); }
size_t Client::outstanding() const { return impl_->outstanding(); }
void Client::wait_all() {
  while (impl_->outstanding() > 0) impl_->poll(1'000'000);
}

// ---- Tables ------------------------------------------------------------------------

Result<uint64_t> Client::create_table(std::string_view name, uint32_t tablet_count) {
  OpPtr op = impl_->make_op(wire::Opcode::kCreateTable, Target::kCoordinator);
  wire::BodyWriter w(&op->body);
  w.put(wire::CreateTableRequest{.name_bytes = u32(name.size()), .tablet_count = tablet_count});
  w.put_bytes(name);
  return call_sync<uint64_t>(this, *impl_, op, decode_table_id);
}

Result<void> Client::drop_table(std::string_view name) {
  OpPtr op = impl_->make_op(wire::Opcode::kDropTable, Target::kCoordinator);
  op->body = encode_name(name);
  auto r = call_sync<bool>(this, *impl_, op, decode_empty);
  // The coordinator answers a drop of a table it does not have kUnknownTable, a resent
  // one too: when an earlier attempt went unanswered, that attempt dropped it.
  if (r.status() == Status::kUnknownTable && op->maybe_applied) return {};
  if (!r.ok()) return r.status();
  return {};
}

Result<uint64_t> Client::get_table_id(std::string_view name) {
  OpPtr op = impl_->make_op(wire::Opcode::kGetTableId, Target::kCoordinator);
  op->body = encode_name(name);
  return call_sync<uint64_t>(this, *impl_, op, decode_table_id);
}

// ---- Objects: asynchronous ---------------------------------------------------------

void Client::read_async(uint64_t table_id, std::string_view key, Callback<ReadResult> done,
                        const RejectRules* rules) {
  start_routed<ReadResult>(*impl_, wire::Opcode::kRead, table_id, key,
                           encode_key_op(table_id, key, rules), std::move(done), decode_read);
}

void Client::write_async(uint64_t table_id, std::string_view key, std::string_view value,
                         Callback<uint64_t> done, const RejectRules* rules) {
  start_routed<uint64_t>(*impl_, wire::Opcode::kWrite, table_id, key,
                         encode_write(table_id, key, value, rules), std::move(done),
                         decode_version);
}

void Client::remove_async(uint64_t table_id, std::string_view key, Callback<uint64_t> done,
                          const RejectRules* rules) {
  start_routed<uint64_t>(*impl_, wire::Opcode::kRemove, table_id, key,
                         encode_key_op(table_id, key, rules), std::move(done), decode_version);
}

void Client::increment_async(uint64_t table_id, std::string_view key, int64_t delta,
                             Callback<IncrementResult> done, const RejectRules* rules) {
  Bytes b;
  wire::BodyWriter w(&b);
  w.put(wire::IncrementRequest{
      .table_id = table_id, .delta = delta, .key_bytes = u32(key.size()), .rules = to_wire(rules)});
  w.put_bytes(key);
  start_routed<IncrementResult>(*impl_, wire::Opcode::kIncrement, table_id, key, std::move(b),
                                std::move(done), decode_increment);
}

Pending<ReadResult> Client::read_async(uint64_t table_id, std::string_view key,
                                       const RejectRules* rules) {
  auto [pending, done] = make_pending<ReadResult>(this);
  read_async(table_id, key, std::move(done), rules);
  return pending;
}

Pending<uint64_t> Client::write_async(uint64_t table_id, std::string_view key,
                                      std::string_view value, const RejectRules* rules) {
  auto [pending, done] = make_pending<uint64_t>(this);
  write_async(table_id, key, value, std::move(done), rules);
  return pending;
}

Pending<uint64_t> Client::remove_async(uint64_t table_id, std::string_view key,
                                       const RejectRules* rules) {
  auto [pending, done] = make_pending<uint64_t>(this);
  remove_async(table_id, key, std::move(done), rules);
  return pending;
}

Pending<IncrementResult> Client::increment_async(uint64_t table_id, std::string_view key,
                                                 int64_t delta, const RejectRules* rules) {
  auto [pending, done] = make_pending<IncrementResult>(this);
  increment_async(table_id, key, delta, std::move(done), rules);
  return pending;
}

// ---- Objects: synchronous ----------------------------------------------------------

Result<ReadResult> Client::read(uint64_t table_id, std::string_view key, const RejectRules* rules) {
  return read_async(table_id, key, rules).get();
}

Result<uint64_t> Client::write(uint64_t table_id, std::string_view key, std::string_view value,
                               const RejectRules* rules) {
  return write_async(table_id, key, value, rules).get();
}

Result<uint64_t> Client::remove(uint64_t table_id, std::string_view key, const RejectRules* rules) {
  return remove_async(table_id, key, rules).get();
}

Result<IncrementResult> Client::increment(uint64_t table_id, std::string_view key, int64_t delta,
                                          const RejectRules* rules) {
  return increment_async(table_id, key, delta, rules).get();
}

// ---- Multi-operations --------------------------------------------------------------

namespace {

template <typename T, typename Decode>
std::function<void(std::vector<client::MultiItemResult>)> deliver_multi(
    std::function<void(std::vector<Result<T>>)> done, Decode decode) {
  return [done = std::move(done), decode](std::vector<client::MultiItemResult> items) {
    std::vector<Result<T>> out;
    out.reserve(items.size());
    for (auto& item : items) {
      if (item.status != Status::kOk) {
        out.emplace_back(item.status);
      } else {
        out.push_back(decode(item.payload));
      }
    }
    done(std::move(out));
  };
}

template <typename T>
std::vector<Result<T>> wait_multi(Client* client, std::vector<Result<T>>* out, bool* done) {
  while (!*done) client->poll(1'000'000);
  return std::move(*out);
}

client::MultiItem key_item(uint64_t table_id, const std::string& key, Bytes request) {
  return {.table_id = table_id, .key_hash = key_hash(table_id, key), .request = std::move(request)};
}

}  // namespace

void Client::multi_read_async(const std::vector<MultiReadItem>& items,
                              std::function<void(std::vector<Result<ReadResult>>)> done) {
  std::vector<client::MultiItem> wire_items;
  wire_items.reserve(items.size());
  for (const auto& i : items) {
    wire_items.push_back(key_item(i.table_id, i.key, encode_key_op(i.table_id, i.key, i.rules)));
  }
  client::start_multi(*impl_, wire::Opcode::kMultiRead, std::move(wire_items),
                      deliver_multi<ReadResult>(std::move(done), decode_read));
}

void Client::multi_write_async(const std::vector<MultiWriteItem>& items,
                               std::function<void(std::vector<Result<uint64_t>>)> done) {
  std::vector<client::MultiItem> wire_items;
  wire_items.reserve(items.size());
  for (const auto& i : items) {
    wire_items.push_back(
        key_item(i.table_id, i.key, encode_write(i.table_id, i.key, i.value, i.rules)));
  }
  client::start_multi(*impl_, wire::Opcode::kMultiWrite, std::move(wire_items),
                      deliver_multi<uint64_t>(std::move(done), decode_version));
}

void Client::multi_remove_async(const std::vector<MultiRemoveItem>& items,
                                std::function<void(std::vector<Result<uint64_t>>)> done) {
  std::vector<client::MultiItem> wire_items;
  wire_items.reserve(items.size());
  for (const auto& i : items) {
    wire_items.push_back(key_item(i.table_id, i.key, encode_key_op(i.table_id, i.key, i.rules)));
  }
  client::start_multi(*impl_, wire::Opcode::kMultiRemove, std::move(wire_items),
                      deliver_multi<uint64_t>(std::move(done), decode_version));
}

std::vector<Result<ReadResult>> Client::multi_read(const std::vector<MultiReadItem>& items) {
  std::vector<Result<ReadResult>> out;
  bool done = false;
  multi_read_async(items, [&](std::vector<Result<ReadResult>> r) {
    out = std::move(r);
    done = true;
  });
  return wait_multi(this, &out, &done);
}

std::vector<Result<uint64_t>> Client::multi_write(const std::vector<MultiWriteItem>& items) {
  std::vector<Result<uint64_t>> out;
  bool done = false;
  multi_write_async(items, [&](std::vector<Result<uint64_t>> r) {
    out = std::move(r);
    done = true;
  });
  return wait_multi(this, &out, &done);
}

std::vector<Result<uint64_t>> Client::multi_remove(const std::vector<MultiRemoveItem>& items) {
  std::vector<Result<uint64_t>> out;
  bool done = false;
  multi_remove_async(items, [&](std::vector<Result<uint64_t>> r) {
    out = std::move(r);
    done = true;
  });
  return wait_multi(this, &out, &done);
}

// ---- Enumerate and cluster information ---------------------------------------------

Result<std::vector<Object>> Client::enumerate(uint64_t table_id) {
  std::optional<Result<std::vector<Object>>> out;
  client::start_enumerate(*impl_, table_id,
                          [&](Result<std::vector<Object>> r) { out.emplace(std::move(r)); });
  while (!out.has_value()) impl_->poll(1'000'000);
  return std::move(*out);
}

namespace {

ServerInfo to_info(const client::ServerRecord& s) {
  return {.server_id = s.server_id,
          .master = (s.services & wire::kServiceMaster) != 0,
          .backup = (s.services & wire::kServiceBackup) != 0,
          .status = static_cast<ServerStatus>(s.status),
          .locator = s.locator};
}

Result<std::vector<ServerInfo>> decode_server_list(Body body) {
  wire::BodyReader r(body);
  wire::ServerListHeader h;
  std::vector<client::ServerRecord> records;
  if (!r.get(&h) || h.count > r.remaining() / sizeof(wire::ServerEntry) ||
      !client::decode_servers(r, h.count, &records) || !r.at_end()) {
    return Status::kBadRequest;
  }
  std::vector<ServerInfo> out;
  for (const auto& s : records) out.push_back(to_info(s));
  return out;
}

Result<std::vector<TabletInfo>> decode_tablets(Body body) {
  auto reply = client::decode_tablet_map(body);
  if (!reply.ok()) return reply.status();
  std::vector<TabletInfo> out;
  for (const auto& t : reply->tablets) {
    std::string locator;
    for (const auto& s : reply->servers) {
      if (s.server_id == t.server_id) locator = s.locator;
    }
    out.push_back({t.table_id, t.start_hash, t.end_hash, t.server_id, std::move(locator)});
  }
  return out;
}

}  // namespace

Result<std::vector<ServerInfo>> Client::servers() {
  OpPtr op = impl_->make_op(wire::Opcode::kGetServerList, Target::kCoordinator);
  return call_sync<std::vector<ServerInfo>>(this, *impl_, op, decode_server_list);
}

Result<std::vector<TabletInfo>> Client::tablets(uint64_t table_id) {
  OpPtr op = impl_->make_op(wire::Opcode::kGetTabletMap, Target::kCoordinator);
  wire::BodyWriter(&op->body).put(wire::TabletMapRequest{.table_id = table_id});
  return call_sync<std::vector<TabletInfo>>(this, *impl_, op, decode_tablets);
}

Result<std::string> Client::server_stats(const std::string& locator) {
  if (!parse_locator(locator).ok()) return Status::kInvalidArgument;
  OpPtr op = impl_->make_op(wire::Opcode::kGetServerStats, Target::kLocator);
  op->locator = locator;
  return call_sync<std::string>(this, *impl_, op, decode_text);
}

}  // namespace ramkv
