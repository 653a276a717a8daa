// Multi-operations (multi read / write / remove): many keys, split by master into one RPC
// per master (more when a batch passes wire::kMaxMultiCount items or the body limit),
// all in flight at once. Items that come back with a resend status (kUnknownTablet,
// kRetry, kUnavailable, kTimeout), or that a master left unanswered, go to the next
// round after a back-off and a map refresh; the others are final. At the deadline the
// items still open get the last transient status.
//
// Owner: the Client::Impl that runs it; its thread only.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "client/client_impl.h"

namespace ramkv::client {

// One item as it travels: the encoded request item (ReadRequest + key, ...).
struct MultiItem {
  uint64_t table_id = 0;
  uint64_t key_hash = 0;
  std::vector<std::byte> request;
};
// One item's outcome: kOk with the bytes after its status (ReadResponse + value, or
// VersionResponse), or a failure status with no payload.
struct MultiItemResult {
  Status status = Status::kTimeout;
  std::vector<std::byte> payload;
};

// opcode: kMultiRead, kMultiWrite or kMultiRemove. `done` runs once, from poll().
void start_multi(Client::Impl& impl, wire::Opcode opcode, std::vector<MultiItem> items,
                 std::function<void(std::vector<MultiItemResult>)> done);

// Enumerates a whole table (enumeration.cc). `done` runs once, from poll().
void start_enumerate(Client::Impl& impl, uint64_t table_id,
                     std::function<void(Result<std::vector<Object>>)> done);

}  // namespace ramkv::client
