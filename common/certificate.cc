#include "common/certificate.h"

#include <cstring>

#include "common/checksum.h"

namespace ramkv {

void CertificateBuilder::add_header(std::span<const std::byte> header_bytes) {
  chain_ = checksum64(header_bytes, chain_);
}

Certificate CertificateBuilder::finish(uint32_t segment_bytes) const {
  std::byte len[4];
  std::memcpy(len, &segment_bytes, 4);
  return {segment_bytes, checksum32(len, chain_)};
}

}  // namespace ramkv
