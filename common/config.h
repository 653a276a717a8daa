// Parsing of configuration values shared by every binary: byte sizes ("64K", "8M", "4G")
// and durations ("500us", "10ms", "2s"). Bad input yields Status::kInvalidArgument; the
// binaries turn it into one clear line and a non-zero exit.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/result.h"

namespace ramkv {

// "4096", "64K", "64KiB", "8M", "4G", "1T" (binary multiples; case-insensitive suffix).
Result<uint64_t> parse_bytes(std::string_view text);
// "250ns", "500us", "10ms", "2s", "1m"; a bare number is milliseconds.
Result<uint64_t> parse_duration_ns(std::string_view text);
// "8.0 MiB", "1.5 GiB", "512 B": for logs and tables.
std::string format_bytes(uint64_t bytes);

}  // namespace ramkv
