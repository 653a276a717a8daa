#include "common/status.h"

#include <catch2/catch.hpp>

#include <cstdint>
#include <set>
#include <string>

namespace ramkv {
namespace {

constexpr uint16_t kLastKnownStatus = static_cast<uint16_t>(Status::kStaleRpc);

TEST_CASE("status: every known code has its own name", "[common][status]") {
  std::set<std::string> names;
  for (uint16_t n = 0; n <= kLastKnownStatus; ++n) {
    std::string name(status_name(static_cast<Status>(n)));
    INFO("status number " << n);
    CHECK_FALSE(name.empty());
    CHECK(name != "unknown status");
    CHECK(names.insert(name).second);
  }
  CHECK(names.size() == size_t{kLastKnownStatus} + 1);
}

TEST_CASE("status: the wire numbers are fixed", "[common][status]") {
  CHECK(static_cast<uint16_t>(Status::kOk) == 0);
  CHECK(static_cast<uint16_t>(Status::kObjectNotFound) == 1);
  CHECK(static_cast<uint16_t>(Status::kRetry) == 6);
  CHECK(static_cast<uint16_t>(Status::kNoSpace) == 7);
  CHECK(static_cast<uint16_t>(Status::kCorrupt) == 12);
  CHECK(static_cast<uint16_t>(Status::kFormatError) == 13);
  CHECK(static_cast<uint16_t>(Status::kInternal) == 19);
  CHECK(static_cast<uint16_t>(Status::kFenced) == 20);
  CHECK(static_cast<uint16_t>(Status::kIncomplete) == 21);
  CHECK(static_cast<uint16_t>(Status::kStaleRpc) == 22);
  CHECK(status_name(Status::kOk) == "ok");
  CHECK(status_name(Status::kObjectNotFound) == "object not found");
}

TEST_CASE("status: a number this build does not know is named unknown status", "[common][status]") {
  CHECK(status_name(static_cast<Status>(kLastKnownStatus + 1)) == "unknown status");
  CHECK(status_name(static_cast<Status>(1000)) == "unknown status");
  CHECK(status_name(static_cast<Status>(UINT16_MAX)) == "unknown status");
}

TEST_CASE("status: only retry, timeout and unavailable are retryable", "[common][status]") {
  for (uint16_t n = 0; n <= kLastKnownStatus + 5; ++n) {
    auto s = static_cast<Status>(n);
    bool expected = s == Status::kRetry || s == Status::kTimeout || s == Status::kUnavailable;
    INFO("status " << status_name(s));
    CHECK(status_is_retryable(s) == expected);
  }
  static_assert(status_is_retryable(Status::kRetry));
  static_assert(!status_is_retryable(Status::kOk));
  static_assert(!status_is_retryable(Status::kNoSpace));
  static_assert(!status_is_retryable(Status::kCorrupt));
}

}  // namespace
}  // namespace ramkv
