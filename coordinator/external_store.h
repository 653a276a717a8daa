// ExternalStore: where the coordinator keeps its state so that a restarted coordinator
// carries on (DESIGN.md, Coordinator). The whole state is one opaque blob of bytes
// (CoordinatorState::serialize); the store only keeps it safe. One interface, so that a
// ZooKeeper store (a highly available coordinator group) can replace the file later.
//
// FileStore: the default, a single file `<dir>/coordinator.state`, written durably:
//
//   0        4        8                16               24
//   +--------+--------+----------------+----------------+---------------------+
//   | magic  |version | payload bytes  | checksum64     | payload ...         |
//   +--------+--------+----------------+----------------+---------------------+
//   magic "RKVC" (0x43564b52), version 1; checksum64 (XXH3) covers the first 16 bytes of
//   the header and the payload.
//
// A put writes `coordinator.state.tmp`, fsyncs it, renames it over the state file and
// fsyncs the directory, so a crash leaves either the old or the new state, never a mix.
//
// Owner: the CoordinatorService. Threads: not thread-safe; one caller at a time.
// Invariants:
//   1. get() returns exactly the bytes of the last successful put(), or kObjectNotFound
//      when nothing was ever put.
//   2. A state file that is truncated, extended or fails its checksum is reported as
//      kCorrupt; it is never half-trusted.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/result.h"

namespace ramkv::coordinator {

class ExternalStore {
 public:
  virtual ~ExternalStore() = default;
  // The last state put; kObjectNotFound if none, kCorrupt if it fails its checks,
  // kIoError if it cannot be read.
  virtual Result<std::vector<std::byte>> get() = 0;
  // Replaces the state durably; kIoError if it could not (the old state is then kept).
  virtual Status put(std::span<const std::byte> state) = 0;
};

class FileStore final : public ExternalStore {
 public:
  static constexpr const char* kFileName = "coordinator.state";
  // Creates `dir` if missing. kIoError if it cannot be created or is not a directory.
  static Result<std::unique_ptr<FileStore>> open(const std::string& dir);

  Result<std::vector<std::byte>> get() override;
  Status put(std::span<const std::byte> state) override;

  std::string path() const { return dir_ + "/" + kFileName; }

 private:
  explicit FileStore(std::string dir) : dir_(std::move(dir)) {}
  std::string dir_;
};

// In-memory store for tests and for a coordinator run without persistence.
class MemoryStore final : public ExternalStore {
 public:
  Result<std::vector<std::byte>> get() override {
    if (!has_state_) return Status::kObjectNotFound;
    return state_;
  }
  Status put(std::span<const std::byte> state) override {
    state_.assign(state.begin(), state.end());
    has_state_ = true;
    return Status::kOk;
  }

 private:
  bool has_state_ = false;
  std::vector<std::byte> state_;
};

}  // namespace ramkv::coordinator
