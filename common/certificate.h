// Certificates: proof of which prefix of a segment's bytes is whole (docs/log-format.md,
// "Certificates"). Shared by masters (which compute them as they append), backups (which
// store them with each replica) and recovery (which checks replicas against them).
#pragma once

#include <cstdint>
#include <span>

namespace ramkv {

// A certificate proves which prefix of a segment is valid: its length, and a checksum
// chained over every entry header in that prefix (each header holds its entry's payload
// checksum). Layout on the wire and disk: u32 segment_bytes, u32 checksum.
struct Certificate {
  uint32_t segment_bytes = 0;
  uint32_t checksum = 0;
  friend bool operator==(const Certificate&, const Certificate&) = default;
};
static_assert(sizeof(Certificate) == 8);

// Running state of a certificate, advanced one entry header at a time.
class CertificateBuilder {
 public:
  void add_header(std::span<const std::byte> header_bytes);
  Certificate finish(uint32_t segment_bytes) const;

 private:
  uint64_t chain_ = 0;
};

}  // namespace ramkv
