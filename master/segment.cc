#include "master/segment.h"

#include <cstring>

#include "common/checksum.h"

namespace ramkv::master {

Segment::Segment(SegletPool& pool, const Options& options)
    : pool_(pool),
      id_(options.id),
      capacity_(options.capacity),
      seglet_bytes_(pool.seglet_bytes()),
      purpose_(options.purpose),
      created_ns_(options.created_ns) {
  RAMKV_CHECK(capacity_ > 0 && capacity_ % seglet_bytes_ == 0);
  seglets_.reserve(capacity_ / seglet_bytes_);
}

Segment::~Segment() {
  for (uint32_t s : seglets_) pool_.free(s);
}

bool Segment::ensure_seglets(uint64_t end) {
  size_t needed = static_cast<size_t>((end + seglet_bytes_ - 1) / seglet_bytes_);
  size_t had = seglets_.size();
  while (seglets_.size() < needed) {
    uint32_t s = pool_.allocate(purpose_, this, static_cast<uint32_t>(seglets_.size()));
    if (s == SegletPool::kNoSeglet) {
      // Give back what this call took, so a failed append leaves no trace.
      while (seglets_.size() > had) {
        pool_.free(seglets_.back());
        seglets_.pop_back();
      }
      return false;
    }
    seglets_.push_back(s);
  }
  return true;
}

void Segment::write(uint32_t offset, std::span<const std::byte> bytes) {
  while (!bytes.empty()) {
    uint32_t in_seglet = offset % seglet_bytes_;
    size_t n = std::min<size_t>(bytes.size(), seglet_bytes_ - in_seglet);
    std::memcpy(pool_.seglet_memory(seglets_[offset / seglet_bytes_]) + in_seglet, bytes.data(), n);
    bytes = bytes.subspan(n);
    offset += static_cast<uint32_t>(n);
  }
}

void Segment::read(uint32_t offset, std::span<std::byte> out) const {
  RAMKV_CHECK(uint64_t{offset} + out.size() <= length_);
  while (!out.empty()) {
    uint32_t in_seglet = offset % seglet_bytes_;
    size_t n = std::min<size_t>(out.size(), seglet_bytes_ - in_seglet);
    std::memcpy(out.data(), pool_.seglet_memory(seglets_[offset / seglet_bytes_]) + in_seglet, n);
    out = out.subspan(n);
    offset += static_cast<uint32_t>(n);
  }
}

void Segment::views(uint32_t offset, uint32_t bytes,
                    std::vector<std::span<const std::byte>>* out) const {
  RAMKV_CHECK(uint64_t{offset} + bytes <= length_);
  while (bytes > 0) {
    uint32_t in_seglet = offset % seglet_bytes_;
    uint32_t n = std::min(bytes, seglet_bytes_ - in_seglet);
    const std::byte* p = pool_.seglet_memory(seglets_[offset / seglet_bytes_]) + in_seglet;
    if (!out->empty() && out->back().data() + out->back().size() == p) {
      out->back() = {out->back().data(), out->back().size() + n};
    } else {
      out->emplace_back(p, n);
    }
    offset += n;
    bytes -= n;
  }
}

std::span<const std::byte> Segment::peek(uint32_t offset, uint32_t bytes) const {
  // An empty payload may start exactly where the last seglet ends: no seglet to index.
  if (bytes == 0) return {};
  uint32_t in_seglet = offset % seglet_bytes_;
  if (in_seglet + bytes > seglet_bytes_) return {};
  return {pool_.seglet_memory(seglets_[offset / seglet_bytes_]) + in_seglet, bytes};
}

Result<uint32_t> Segment::append(EntryType type, std::span<const std::span<const std::byte>> pieces,
                                 std::optional<uint32_t> known_checksum) {
  RAMKV_CHECK(!closed_);
  uint64_t payload64 = 0;
  for (auto p : pieces) payload64 += p.size();
  if (payload64 > kMaxPayloadBytes) return Status::kNoSpace;
  auto payload_bytes = static_cast<uint32_t>(payload64);
  if (!fits(payload_bytes)) return Status::kNoSpace;
  uint32_t total = entry_bytes(payload_bytes);
  if (!ensure_seglets(uint64_t{length_} + total)) return Status::kRetry;

  uint32_t offset = length_;
  uint32_t header_bytes = entry_header_bytes(payload_bytes);
  uint32_t at = offset + header_bytes;
  for (auto p : pieces) {
    write(at, p);
    at += static_cast<uint32_t>(p.size());
  }
  // Checksum the bytes where they now lie: one pass when contiguous (the common case).
  uint32_t checksum;
  if (known_checksum) {
    checksum = *known_checksum;
  } else if (auto view = peek(offset + header_bytes, payload_bytes); view.size() == payload_bytes) {
    checksum = entry_checksum(type, view);
  } else {
    Checksum c(entry_checksum_seed(type, payload_bytes));
    for (auto p : pieces) c.update(p);
    checksum = static_cast<uint32_t>(c.digest());
  }
  std::byte header[kMaxEntryHeaderBytes];
  encode_entry_header(type, payload_bytes, checksum, header);
  write(offset, {header, header_bytes});
  cert_.add_header({header, header_bytes});
  length_ = offset + total;
  return offset;
}

Result<uint32_t> Segment::append_raw(std::span<const std::byte> entry, uint32_t header_bytes) {
  RAMKV_CHECK(!closed_);
  RAMKV_CHECK(header_bytes <= entry.size());
  if (uint64_t{length_} + entry.size() > capacity_) return Status::kNoSpace;
  if (!ensure_seglets(uint64_t{length_} + entry.size())) return Status::kRetry;
  uint32_t offset = length_;
  write(offset, entry);
  cert_.add_header(entry.first(header_bytes));
  length_ = offset + static_cast<uint32_t>(entry.size());
  return offset;
}

Segment::Entry Segment::entry_at(uint32_t offset, std::string* scratch) const {
  std::byte hdr[kMaxEntryHeaderBytes];
  uint32_t avail = std::min<uint32_t>(kMaxEntryHeaderBytes, length_ - offset);
  read(offset, {hdr, avail});
  // Entries in memory were written by this process: a bad header is a bug, not input.
  auto h = decode_entry_header({hdr, avail});
  RAMKV_CHECK(h.ok() && h->type != EntryType::kInvalid);
  Entry e{*h, {}};
  uint32_t payload_offset = offset + h->header_bytes;
  e.payload = peek(payload_offset, h->payload_bytes);
  if (e.payload.size() != h->payload_bytes) {
    scratch->resize(h->payload_bytes);
    auto* out = reinterpret_cast<std::byte*>(scratch->data());
    read(payload_offset, {out, h->payload_bytes});
    e.payload = {out, h->payload_bytes};
  }
  return e;
}

std::span<const std::byte> Segment::raw_entry_at(uint32_t offset, uint32_t total_bytes,
                                                 std::string* scratch) const {
  auto view = peek(offset, total_bytes);
  if (view.size() == total_bytes) return view;
  scratch->resize(total_bytes);
  auto* out = reinterpret_cast<std::byte*>(scratch->data());
  read(offset, {out, total_bytes});
  return {out, total_bytes};
}

std::vector<std::byte> Segment::copy_out() const {
  std::vector<std::byte> out(length_);
  read(0, out);
  return out;
}

uint64_t Segment::arena_offset(uint32_t offset) const {
  return pool_.arena_offset(seglets_[offset / seglet_bytes_]) + offset % seglet_bytes_;
}

}  // namespace ramkv::master
