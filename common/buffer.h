// Bounds-checked binary encoding: ByteWriter appends to a caller's fixed buffer,
// ByteReader decodes from a view. Little-endian fixed-width integers and LEB128 varints.
//
// Bytes from the network or the disk are decoded only through ByteReader: every read is
// checked against the remaining length, and a read past the end sets a sticky failure
// flag instead of touching memory out of bounds. Callers check ok() once at the end and
// turn a failure into Status::kFormatError.
//
// Neither type owns memory: the storage must outlive the reader or writer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <type_traits>

namespace ramkv {

// Encoded size of v as a LEB128 varint (1..10 bytes).
constexpr size_t varint_bytes(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}

class ByteWriter {
 public:
  explicit ByteWriter(std::span<std::byte> out) : out_(out) {}

  template <typename T>
  requires std::is_integral_v<T>
  void put(T v) {
    if (!reserve(sizeof(T))) return;
    std::memcpy(out_.data() + pos_, &v, sizeof(T));  // little-endian hosts only (x86, arm)
    pos_ += sizeof(T);
  }
  void put_varint(uint64_t v) {
    if (!reserve(varint_bytes(v))) return;
    while (v >= 0x80) {
      out_[pos_++] = static_cast<std::byte>((v & 0x7f) | 0x80);
      v >>= 7;
    }
    out_[pos_++] = static_cast<std::byte>(v);
  }
  void put_bytes(std::span<const std::byte> bytes) {
    if (!reserve(bytes.size())) return;
    if (!bytes.empty()) std::memcpy(out_.data() + pos_, bytes.data(), bytes.size());
    pos_ += bytes.size();
  }
  void put_bytes(std::string_view s) {
    put_bytes({reinterpret_cast<const std::byte*>(s.data()), s.size()});
  }

  bool ok() const { return ok_; }
  size_t size() const { return pos_; }
  std::span<std::byte> written() const { return out_.first(pos_); }

 private:
  bool reserve(size_t n) {
    if (!ok_ || out_.size() - pos_ < n) {
      ok_ = false;
      return false;
    }
    return true;
  }
  std::span<std::byte> out_;
  size_t pos_ = 0;
  bool ok_ = true;
};

class ByteReader {
 public:
  explicit ByteReader(std::span<const std::byte> in) : in_(in) {}

  template <typename T>
  requires std::is_integral_v<T> T get() {
    T v{};
    if (!need(sizeof(T))) return v;
    std::memcpy(&v, in_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  // A varint longer than 10 bytes, or one that overflows 64 bits, is a failure.
  uint64_t get_varint() {
    uint64_t v = 0;
    for (unsigned shift = 0; shift < 64; shift += 7) {
      if (!need(1)) return 0;
      auto b = static_cast<uint8_t>(in_[pos_++]);
      if (shift == 63 && b > 1) break;
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return v;
    }
    ok_ = false;
    return 0;
  }
  std::span<const std::byte> get_bytes(size_t n) {
    if (!need(n)) return {};
    auto s = in_.subspan(pos_, n);
    pos_ += n;
    return s;
  }
  std::string_view get_string(size_t n) {
    auto b = get_bytes(n);
    return {reinterpret_cast<const char*>(b.data()), b.size()};
  }
  std::span<const std::byte> rest() {
    auto s = in_.subspan(ok_ ? pos_ : in_.size());
    pos_ = in_.size();
    return s;
  }

  bool ok() const { return ok_; }
  size_t position() const { return pos_; }
  size_t remaining() const { return ok_ ? in_.size() - pos_ : 0; }

 private:
  bool need(size_t n) {
    if (!ok_ || in_.size() - pos_ < n) {
      ok_ = false;
      return false;
    }
    return true;
  }
  std::span<const std::byte> in_;
  size_t pos_ = 0;
  bool ok_ = true;
};

}  // namespace ramkv
