// ramkv/status.h: public. Status, the outcome of every operation that can fail at run time.
//
// The numbers are wire-stable: they travel in RPC replies and are surfaced by the client
// unchanged, so a number is never reused or renumbered. Each code says when it is
// returned and what a caller should do about it.
#pragma once
// Part of the public client API (installed); common/status.h includes it.

#include <cstdint>
#include <string_view>

namespace ramkv {

enum class Status : uint16_t {
  // Success.
  kOk = 0,
  // The object (or table entry) does not exist. Caller: treat as a miss; do not retry.
  kObjectNotFound = 1,
  // A reject rule said "fail if the object exists" and it does. Caller: give up or read.
  kObjectExists = 2,
  // A reject rule on the version failed (compare-and-swap lost). Caller: re-read, retry.
  kWrongVersion = 3,
  // No table with that id or name. Caller: give up (or create the table).
  kUnknownTable = 4,
  // This server does not own the tablet. Caller: refresh the tablet map and resend.
  kUnknownTablet = 5,
  // Transient: the server cannot take the request now (cleaner behind, recovery under
  // way). Caller: back off and retry; nothing was applied.
  kRetry = 6,
  // Memory (or disk) is full of live data; cleaning cannot help. Caller: delete data or
  // add servers; retrying the same request will fail again.
  kNoSpace = 7,
  // The cluster is read-only (backup in progress, restored cluster). Caller: retry later.
  kReadOnly = 8,
  // The request is malformed (bad lengths, bad arguments). Caller: fix the request.
  kBadRequest = 9,
  // The key is longer than the configured maximum (64 KiB by default). Caller: give up.
  kKeyTooLarge = 10,
  // The value is longer than the configured maximum (1 MiB by default). Caller: give up.
  kValueTooLarge = 11,
  // Bytes failed a checksum or certificate check. Caller: the data is not usable.
  kCorrupt = 12,
  // Bytes are not in the expected format (bad length, unknown type, truncated).
  kFormatError = 13,
  // An operating-system I/O call failed. Caller: see the log; the operation did not happen.
  kIoError = 14,
  // The operation did not finish in time. Caller: retry if it is idempotent.
  kTimeout = 15,
  // A value is not of the type the operation needs (increment of a non-8-byte value).
  kInvalidObject = 16,
  // The server is shutting down or the service is not running. Caller: try another.
  kUnavailable = 17,
  // Configuration or command-line input is invalid. Caller: fix the configuration.
  kInvalidArgument = 18,
  // A bug: an invariant did not hold. Caller: report it.
  kInternal = 19,
  // The coordinator declared the sending master crashed (a zombie): backups refuse its
  // replication. Caller (that master): stop serving; never retry.
  kFenced = 20,
  // Crash recovery cannot prove a log complete: some segment has no usable replica.
  // Caller (the coordinator): say which, keep the data unserved, try again later.
  kIncomplete = 21,
  // A write, remove or increment whose client already acknowledged its reply (a delayed
  // duplicate): nothing was done. Caller: none (the client has the first reply).
  kStaleRpc = 22,
};

// A short stable name such as "object not found"; "unknown status" for numbers this
// build does not know (a newer peer).
std::string_view status_name(Status s);

// True when a caller may retry the same request unchanged and expect it to succeed later.
constexpr bool status_is_retryable(Status s) {
  return s == Status::kRetry || s == Status::kTimeout || s == Status::kUnavailable;
}

}  // namespace ramkv
