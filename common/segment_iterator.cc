#include "common/segment_iterator.h"

namespace ramkv {

SegmentIterator::SegmentIterator(std::span<const std::byte> bytes,
                                 std::optional<Certificate> certificate)
    : bytes_(bytes), certificate_(certificate) {
  uint64_t size = bytes.size();
  if (certificate_ && certificate_->segment_bytes > size) {
    // The certificate claims bytes we do not have: a torn replica. Walk what is there.
    status_ = Status::kFormatError;
    limit_ = static_cast<uint32_t>(std::min<uint64_t>(size, UINT32_MAX));
  } else {
    limit_ = certificate_ ? certificate_->segment_bytes
                          : static_cast<uint32_t>(std::min<uint64_t>(size, UINT32_MAX));
  }
  load();
}

Result<SegmentIterator::Current> SegmentIterator::check_entry(std::span<const std::byte> bytes,
                                                              uint32_t offset, uint32_t limit) {
  auto window = bytes.subspan(offset, limit - offset);
  auto h = decode_entry_header(window);
  if (!h.ok()) return h.status();
  if (h->type == EntryType::kInvalid) return Status::kObjectNotFound;  // unwritten space
  if (uint64_t{h->header_bytes} + h->payload_bytes > window.size()) return Status::kFormatError;
  auto payload = window.subspan(h->header_bytes, h->payload_bytes);
  if (entry_checksum(h->type, payload) != h->checksum) return Status::kCorrupt;
  return Current{*h, payload};
}

void SegmentIterator::load() {
  current_.reset();
  if (offset_ >= limit_) {
    stop_offset_ = offset_;
    if (certificate_ && status_ == Status::kOk && chain_.finish(offset_) != *certificate_) {
      status_ = Status::kCorrupt;
    }
    return;
  }
  auto c = check_entry(bytes_, offset_, limit_);
  if (c.ok()) {
    current_ = *c;
    chain_.add_header(bytes_.subspan(offset_, c->header.header_bytes));
    return;
  }
  stop_offset_ = offset_;
  if (c.status() == Status::kObjectNotFound) {
    // Unwritten space: the clean end of a scan, but a hole inside a certified prefix.
    if (certificate_ && status_ == Status::kOk) status_ = Status::kFormatError;
    return;
  }
  if (status_ == Status::kOk) status_ = c.status();
}

void SegmentIterator::next() {
  if (!current_) return;
  offset_ += current_->header.total_bytes();
  load();
}

Status SegmentIterator::validate() const {
  if (certificate_ && certificate_->segment_bytes > bytes_.size()) return Status::kFormatError;
  CertificateBuilder cert;
  uint32_t offset = 0;
  while (offset < limit_) {
    auto c = check_entry(bytes_, offset, limit_);
    if (!c.ok()) {
      if (c.status() == Status::kObjectNotFound) {
        return certificate_ ? Status::kFormatError : Status::kOk;
      }
      return certificate_ ? c.status() : Status::kOk;
    }
    cert.add_header(bytes_.subspan(offset, c->header.header_bytes));
    offset += c->header.total_bytes();
  }
  if (certificate_ && cert.finish(offset) != *certificate_) return Status::kCorrupt;
  return Status::kOk;
}

}  // namespace ramkv
