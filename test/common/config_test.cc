#include "common/config.h"

#include <catch2/catch.hpp>

#include <string>

namespace ramkv {
namespace {

uint64_t bytes_ok(std::string_view text) {
  auto r = parse_bytes(text);
  INFO("parse_bytes(\"" << std::string(text) << "\")");
  REQUIRE(r.ok());
  return *r;
}

uint64_t duration_ok(std::string_view text) {
  auto r = parse_duration_ns(text);
  INFO("parse_duration_ns(\"" << std::string(text) << "\")");
  REQUIRE(r.ok());
  return *r;
}

TEST_CASE("config: parse_bytes reads plain numbers and binary suffixes", "[common][config]") {
  CHECK(bytes_ok("0") == 0);
  CHECK(bytes_ok("4096") == 4096);
  CHECK(bytes_ok("64K") == 64 * 1024);
  CHECK(bytes_ok("64k") == 64 * 1024);
  CHECK(bytes_ok("64KiB") == 64 * 1024);
  CHECK(bytes_ok("64KB") == 64 * 1024);
  CHECK(bytes_ok("8M") == 8ULL << 20);
  CHECK(bytes_ok("8MiB") == 8ULL << 20);
  CHECK(bytes_ok("8mi") == 8ULL << 20);
  CHECK(bytes_ok("4g") == 4ULL << 30);
  CHECK(bytes_ok("4GB") == 4ULL << 30);
  CHECK(bytes_ok("1T") == 1ULL << 40);
  CHECK(bytes_ok("512B") == 512);
  CHECK(bytes_ok("16777215T") == 16777215ULL << 40);
  CHECK(bytes_ok("18446744073709551615") == UINT64_MAX);
}

TEST_CASE("config: parse_bytes rejects empty, non-numeric, unknown suffixes and overflow",
          "[common][config]") {
  for (std::string_view bad : {"", "abc", "K", "12Q", "-1", "+1", " 1", "1 ", "1 K", "12KK",
                               "1Ki B", "1iB", "1Bi", "1.5M", "99999999999T", "16777216T",
                               "18446744073709551616", "99999999999999999999999999", "0x10"}) {
    INFO("parse_bytes(\"" << std::string(bad) << "\")");
    CHECK(parse_bytes(bad).status() == Status::kInvalidArgument);
  }
}

TEST_CASE("config: parse_duration_ns reads each unit and a bare number as milliseconds",
          "[common][config]") {
  CHECK(duration_ok("250ns") == 250);
  CHECK(duration_ok("500us") == 500'000);
  CHECK(duration_ok("10ms") == 10'000'000);
  CHECK(duration_ok("10MS") == 10'000'000);
  CHECK(duration_ok("10") == 10'000'000);
  CHECK(duration_ok("2s") == 2'000'000'000);
  CHECK(duration_ok("1m") == 60'000'000'000);
  CHECK(duration_ok("3min") == 180'000'000'000);
  CHECK(duration_ok("0s") == 0);
}

TEST_CASE("config: parse_duration_ns rejects bad units and overflow", "[common][config]") {
  for (std::string_view bad : {"", "s", "ms", "abc", "-5ms", "5h", "5 ms", "5sec", "1.5s",
                               "18446744073709551615s", "18446744074s", "307445735m"}) {
    INFO("parse_duration_ns(\"" << std::string(bad) << "\")");
    CHECK(parse_duration_ns(bad).status() == Status::kInvalidArgument);
  }
  // The largest whole number of seconds that fits.
  CHECK(duration_ok("18446744073s") == 18'446'744'073'000'000'000ULL);
  CHECK(duration_ok("307445734m") == 307'445'734ULL * 60'000'000'000ULL);
}

TEST_CASE("config: format_bytes picks the largest binary unit", "[common][config]") {
  CHECK(format_bytes(0) == "0 B");
  CHECK(format_bytes(512) == "512 B");
  CHECK(format_bytes(1023) == "1023 B");
  CHECK(format_bytes(1024) == "1.0 KiB");
  CHECK(format_bytes(1536) == "1.5 KiB");
  CHECK(format_bytes(8ULL << 20) == "8.0 MiB");
  CHECK(format_bytes(3ULL << 29) == "1.5 GiB");
  CHECK(format_bytes(1ULL << 40) == "1.0 TiB");
  // TiB is the largest unit.
  CHECK(format_bytes(1ULL << 50) == "1024.0 TiB");
}

}  // namespace
}  // namespace ramkv
