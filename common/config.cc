#include "common/config.h"

#include <fmt/format.h>

#include <cctype>
#include <charconv>
#include <string>

namespace ramkv {
namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Splits "123abc" into 123 and "abc"; false when there is no leading number.
bool split_number(std::string_view text, uint64_t* number, std::string_view* suffix) {
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, *number);
  if (ec != std::errc() || ptr == text.data()) return false;
  *suffix = std::string_view(ptr, static_cast<size_t>(end - ptr));
  return true;
}

bool multiply(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }

}  // namespace

Result<uint64_t> parse_bytes(std::string_view text) {
  uint64_t n = 0;
  std::string_view suffix;
  if (!split_number(text, &n, &suffix)) return Status::kInvalidArgument;
  std::string s = lower(suffix);
  if (!s.empty() && s.back() == 'b') s.pop_back();  // "8MB", "8MiB"
  if (s.size() == 2 && s[1] == 'i') s.pop_back();   // "8Mi"
  uint64_t mult = 1;
  if (s.empty()) {
    mult = 1;
  } else if (s == "k") {
    mult = 1ULL << 10;
  } else if (s == "m") {
    mult = 1ULL << 20;
  } else if (s == "g") {
    mult = 1ULL << 30;
  } else if (s == "t") {
    mult = 1ULL << 40;
  } else {
    return Status::kInvalidArgument;
  }
  uint64_t out = 0;
  if (!multiply(n, mult, &out)) return Status::kInvalidArgument;
  return out;
}

Result<uint64_t> parse_duration_ns(std::string_view text) {
  uint64_t n = 0;
  std::string_view suffix;
  if (!split_number(text, &n, &suffix)) return Status::kInvalidArgument;
  std::string s = lower(suffix);
  uint64_t mult = 0;
  if (s == "ns") {
    mult = 1;
  } else if (s == "us") {
    mult = 1'000;
  } else if (s.empty() || s == "ms") {
    mult = 1'000'000;
  } else if (s == "s") {
    mult = 1'000'000'000;
  } else if (s == "m" || s == "min") {
    mult = 60'000'000'000;
  } else {
    return Status::kInvalidArgument;
  }
  uint64_t out = 0;
  if (!multiply(n, mult, &out)) return Status::kInvalidArgument;
  return out;
}

std::string format_bytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  size_t unit = 0;
  // Compare with the rounding in mind: 1048575 bytes is "1.0 MiB", not "1024.0 KiB".
  while (v >= 1023.95 && unit + 1 < std::size(kUnits)) {
    v /= 1024.0;
    ++unit;
  }
  if (unit == 0) return fmt::format("{} B", bytes);
  return fmt::format("{:.1f} {}", v, kUnits[unit]);
}

}  // namespace ramkv
