// SegmentIterator: walks the entries of a segment's bytes as a backup or recovery sees
// them (one contiguous buffer, e.g. a replica file) and checks them.
//
// Two ways to use it:
//   - With a certificate: validate() proves that [0, certificate.segment_bytes) is made of
//     whole entries with good checksums and that the chained header checksum matches.
//     Iteration then stops exactly at the certificate's length, and checks the chained
//     header checksum there too: reordered or substituted entries end the iteration
//     with status() kCorrupt even without validate().
//   - Without one (scan): iteration goes until the bytes end, an all-zero tag (unwritten
//     space) or the first entry that is truncated or fails its checksum: the torn or
//     corrupt tail. status() and valid_bytes() say where and why it stopped.
//
// The iterator never reads outside `bytes` and never trusts a length from them. It does
// not own the bytes: they must outlive it and every view it returns.
// Threads: one thread at a time.
#pragma once

#include <cstdint>
#include <optional>
#include <span>

#include "common/certificate.h"
#include "common/log_entry.h"
#include "common/result.h"

namespace ramkv {

class SegmentIterator {
 public:
  explicit SegmentIterator(std::span<const std::byte> bytes,
                           std::optional<Certificate> certificate = std::nullopt);

  // Checks every entry in the certified prefix, and the certificate itself, without
  // moving the iterator. kCorrupt for a checksum mismatch; kFormatError for a bad
  // header, an entry that overruns the prefix, or a certificate longer than the bytes.
  // Without a certificate: checks up to the end of the valid prefix and returns kOk.
  Status validate() const;

  // True while the iterator is on a valid entry.
  bool valid() const { return current_.has_value(); }
  void next();

  EntryType type() const { return current_->header.type; }
  uint32_t offset() const { return offset_; }
  const EntryHeader& header() const { return current_->header; }
  std::span<const std::byte> payload() const { return current_->payload; }
  // The whole entry (header and payload), for copying it verbatim.
  std::span<const std::byte> raw() const {
    return bytes_.subspan(offset_, current_->header.total_bytes());
  }

  // Why iteration stopped: kOk at the end of the certified prefix or at clean unwritten
  // space; kCorrupt or kFormatError at a bad entry (the torn or corrupt tail).
  Status status() const { return status_; }
  // Bytes of whole, checked entries before the current position (or the stop).
  uint32_t valid_bytes() const { return valid() ? offset_ : stop_offset_; }

 private:
  struct Current {
    EntryHeader header;
    std::span<const std::byte> payload;
  };
  // Decodes and checks the entry at `offset` within `limit`; sets status on failure.
  static Result<Current> check_entry(std::span<const std::byte> bytes, uint32_t offset,
                                     uint32_t limit);
  void load();

  std::span<const std::byte> bytes_;
  std::optional<Certificate> certificate_;
  uint32_t limit_ = 0;
  uint32_t offset_ = 0;
  std::optional<Current> current_;
  CertificateBuilder chain_;  // over the headers visited, checked at the certified end
  Status status_ = Status::kOk;
  uint32_t stop_offset_ = 0;
};

}  // namespace ramkv
