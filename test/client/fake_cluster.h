// FakeCluster: an in-process coordinator and two masters on loopback TCP, speaking the
// wire format with tiny in-memory handlers, so the client's routing and retries can be
// tested without the real servers. Each fake runs its dispatch loop on its own thread;
// all state sits behind one mutex.
//
// Knobs: `stale_map_fetches` tablet-map replies name the wrong owners (each master then
// answers kUnknownTablet) before the right map is given; `retry_replies` requests get
// kRetry before masters serve; `drop_reply_delay_ms` delays the answer to the drop that
// drops table "t" (later drops of it: kUnknownTable). Table "t" (id 1) is split into two halves:
// the low half on master 1, the high half on master 2.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/assert.h"
#include "common/checksum.h"
#include "common/transport.h"

namespace ramkv::test {

class FakeServer {
 public:
  explicit FakeServer(ServerTransport::Handler handler)
      : transport_(make_tcp_server_transport({})), handler_(std::move(handler)) {
    RAMKV_CHECK(transport_->listen("127.0.0.1:0") == Status::kOk);
    thread_ = std::thread([this] { transport_->run(handler_); });
  }
  ~FakeServer() {
    transport_->stop();
    thread_.join();
  }
  std::string locator() const { return transport_->locator(); }

 private:
  std::unique_ptr<ServerTransport> transport_;
  ServerTransport::Handler handler_;
  std::thread thread_;
};

class FakeCluster {
 public:
  static constexpr uint64_t kTable = 1;
  static constexpr uint64_t kHalf = UINT64_MAX / 2;

  FakeCluster() {
    for (uint64_t id = 1; id <= 2; ++id) {
      masters_.push_back(std::make_unique<FakeServer>(
          [this, id](const wire::MessageHeader& h, std::span<const std::byte> b, Reply& r) {
            serve_master(id, h, b, r);
          }));
    }
    coordinator_ = std::make_unique<FakeServer>([this](const wire::MessageHeader& h,
                                                       std::span<const std::byte> b,
                                                       Reply& r) { serve_coordinator(h, b, r); });
  }
  std::string coordinator() const { return coordinator_->locator(); }

  std::mutex mu;
  int stale_map_fetches = 0;
  int retry_replies = 0;
  int map_fetches = 0;
  int unknown_tablet_replies = 0;
  std::vector<uint64_t> rpc_seqs;  // of every kWrite received, in order
  std::vector<uint64_t> ack_seqs;  // their ack sequences
  std::vector<int> multi_rpcs_per_master = {0, 0};
  int drop_reply_delay_ms = 0;
  int drops_received = 0;
  bool table_dropped = false;

 private:
  struct Stored {
    std::string value;
    uint64_t version = 0;
  };

  uint64_t owner(uint64_t hash, bool stale) const {
    uint64_t right = hash <= kHalf ? 1 : 2;
    return stale ? 3 - right : right;
  }

  void serve_coordinator(const wire::MessageHeader& h, std::span<const std::byte> body, Reply& r) {
    std::lock_guard<std::mutex> lock(mu);
    wire::BodyReader in(body);
    auto w = r.writer();
    switch (static_cast<wire::Opcode>(h.opcode)) {
      case wire::Opcode::kGetTabletMap: {
        ++map_fetches;
        bool stale = stale_map_fetches > 0;
        if (stale) --stale_map_fetches;
        w.put(wire::TabletMapHeader{.version = 1, .count = 2, .server_count = 2});
        w.put(wire::TabletWire{kTable, 0, kHalf, owner(0, stale)});
        w.put(wire::TabletWire{kTable, kHalf + 1, UINT64_MAX, owner(UINT64_MAX, stale)});
        for (uint64_t id = 1; id <= 2; ++id) {
          std::string loc = masters_[id - 1]->locator();
          w.put(wire::ServerEntry{
              .server_id = id, .services = 3, .locator_bytes = static_cast<uint32_t>(loc.size())});
          w.put_bytes(loc);
        }
        return;
      }
      case wire::Opcode::kGetTableId:
      case wire::Opcode::kCreateTable: {
        uint32_t name_bytes = 0;
        std::string_view name;
        if (!in.get(&name_bytes)) return r.set_status(Status::kBadRequest);
        if (h.opcode == static_cast<uint16_t>(wire::Opcode::kCreateTable)) {
          uint32_t tablets = 0;
          in.get(&tablets);
        }
        if (!in.get_string(name_bytes, &name)) return r.set_status(Status::kBadRequest);
        if (name != "t") return r.set_status(Status::kUnknownTable);
        w.put(wire::TableIdResponse{kTable});
        return;
      }
      case wire::Opcode::kDropTable: {
        // Table "t" once; the drop that applies it answers `drop_reply_delay_ms` late.
        uint32_t name_bytes = 0;
        std::string_view name;
        if (!in.get(&name_bytes) || !in.get_string(name_bytes, &name)) {
          return r.set_status(Status::kBadRequest);
        }
        ++drops_received;
        if (name != "t" || table_dropped) return r.set_status(Status::kUnknownTable);
        table_dropped = true;
        if (drop_reply_delay_ms > 0) {
          std::this_thread::sleep_for(std::chrono::milliseconds(drop_reply_delay_ms));
        }
        return;
      }
      default:
        r.set_status(Status::kBadRequest);
    }
  }

  // Decodes a ReadRequest-shaped item and checks ownership; false when not owned.
  bool owns(uint64_t id, uint64_t table_id, std::string_view key) const {
    return table_id == kTable && owner(key_hash(table_id, key), false) == id;
  }

  Status read_item(uint64_t id, wire::BodyReader& in, wire::BodyWriter& w, bool multi) {
    wire::ReadRequest q;
    std::string_view key;
    if (!in.get(&q) || !in.get_string(q.key_bytes, &key)) return Status::kBadRequest;
    Status s = Status::kOk;
    auto it = objects_.find(std::string(key));
    if (!owns(id, q.table_id, key)) {
      s = Status::kUnknownTablet;
    } else if (it == objects_.end()) {
      s = Status::kObjectNotFound;
    }
    if (multi) w.put(static_cast<uint16_t>(s));
    if (s == Status::kOk) {
      w.put(wire::ReadResponse{it->second.version, static_cast<uint32_t>(it->second.value.size())});
      w.put_bytes(it->second.value);
    }
    return s;
  }

  Status write_item(uint64_t id, wire::BodyReader& in, wire::BodyWriter& w, bool multi) {
    wire::WriteRequest q;
    std::string_view key, value;
    if (!in.get(&q) || !in.get_string(q.key_bytes, &key) || !in.get_string(q.value_bytes, &value)) {
      return Status::kBadRequest;
    }
    Status s = owns(id, q.table_id, key) ? Status::kOk : Status::kUnknownTablet;
    if (multi) w.put(static_cast<uint16_t>(s));
    if (s == Status::kOk) {
      objects_[std::string(key)] = {std::string(value), ++version_};
      w.put(wire::VersionResponse{version_});
    }
    return s;
  }

  void enumerate(uint64_t id, wire::BodyReader& in, wire::BodyWriter& w, Reply& r) {
    wire::EnumerateRequest q;
    if (!in.get(&q)) return r.set_status(Status::kBadRequest);
    if (owner(q.start_hash, false) != id) return r.set_status(Status::kUnknownTablet);
    std::vector<std::pair<std::string, Stored>> mine;
    for (const auto& [k, v] : objects_) {
      uint64_t hash = key_hash(kTable, k);
      if (hash >= q.start_hash && hash <= q.end_hash) mine.push_back({k, v});
    }
    size_t from = static_cast<size_t>(q.cursor);
    size_t to = std::min(mine.size(), from + 7);  // small batches exercise the cursor
    w.put(wire::EnumerateResponse{to == mine.size() ? wire::kEnumerateDone : to,
                                  static_cast<uint32_t>(to - std::min(from, to))});
    for (size_t i = from; i < to; ++i) {
      w.put(wire::EnumeratedObject{mine[i].second.version,
                                   static_cast<uint32_t>(mine[i].first.size()),
                                   static_cast<uint32_t>(mine[i].second.value.size())});
      w.put_bytes(mine[i].first);
      w.put_bytes(mine[i].second.value);
    }
  }

  void serve_master(uint64_t id, const wire::MessageHeader& h, std::span<const std::byte> body,
                    Reply& r) {
    std::lock_guard<std::mutex> lock(mu);
    if (retry_replies > 0) {
      --retry_replies;
      return r.set_status(Status::kRetry);
    }
    wire::BodyReader in(body);
    auto w = r.writer();
    Status s = Status::kOk;
    auto op = static_cast<wire::Opcode>(h.opcode);
    if (op == wire::Opcode::kRead) {
      s = read_item(id, in, w, false);
    } else if (op == wire::Opcode::kWrite) {
      rpc_seqs.push_back(h.rpc_seq);
      ack_seqs.push_back(h.ack_seq);
      s = write_item(id, in, w, false);
    } else if (op == wire::Opcode::kMultiRead || op == wire::Opcode::kMultiWrite) {
      ++multi_rpcs_per_master[id - 1];
      wire::MultiHeader m;
      if (!in.get(&m)) return r.set_status(Status::kBadRequest);
      for (uint32_t i = 0; i < m.count; ++i) {
        Status item = op == wire::Opcode::kMultiRead ? read_item(id, in, w, true)
                                                     : write_item(id, in, w, true);
        if (item == Status::kBadRequest) return r.set_status(item);
      }
    } else if (op == wire::Opcode::kEnumerate) {
      return enumerate(id, in, w, r);
    } else {
      s = Status::kBadRequest;
    }
    if (s == Status::kUnknownTablet) ++unknown_tablet_replies;
    if (s != Status::kOk) {
      r.body().clear();
      r.set_status(s);
    }
  }

  std::map<std::string, Stored> objects_;
  uint64_t version_ = 0;
  std::vector<std::unique_ptr<FakeServer>> masters_;
  std::unique_ptr<FakeServer> coordinator_;
};

}  // namespace ramkv::test
