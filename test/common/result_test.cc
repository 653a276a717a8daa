#include "common/result.h"

#include <catch2/catch.hpp>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace ramkv {
namespace {

Result<int> parse_digit(char c) {
  if (c < '0' || c > '9') return Status::kInvalidArgument;
  return c - '0';
}

// Adds two digits; RAMKV_TRY returns the first error unchanged.
Result<int> add_digits(char a, char b, int* calls) {
  ++*calls;
  auto x = parse_digit(a);
  RAMKV_TRY(x);
  ++*calls;
  auto y = parse_digit(b);
  RAMKV_TRY(y);
  ++*calls;
  return *x + *y;
}

Result<void> check_even(int n) {
  if (n % 2 != 0) return Status::kBadRequest;
  return {};
}

Result<void> check_all_even(const std::vector<int>& v, size_t* checked) {
  for (int n : v) {
    RAMKV_TRY(check_even(n));
    ++*checked;
  }
  return {};
}

TEST_CASE("result: a value result is ok and holds the value", "[common][result]") {
  Result<std::string> r(std::string("hello"));
  CHECK(r.ok());
  CHECK(static_cast<bool>(r));
  CHECK(r.status() == Status::kOk);
  CHECK(r.value() == "hello");
  CHECK(*r == "hello");
  CHECK(r->size() == 5);
  r.value() += "!";
  CHECK(*r == "hello!");
  const auto& cr = r;
  CHECK(cr.value() == "hello!");
  CHECK(cr->size() == 6);
}

TEST_CASE("result: an error result is not ok and keeps its status", "[common][result]") {
  Result<int> r(Status::kObjectNotFound);
  CHECK_FALSE(r.ok());
  CHECK_FALSE(static_cast<bool>(r));
  CHECK(r.status() == Status::kObjectNotFound);
}

TEST_CASE("result: a move-only value can be moved out", "[common][result]") {
  Result<std::unique_ptr<int>> r(std::make_unique<int>(42));
  REQUIRE(r.ok());
  std::unique_ptr<int> p = std::move(r).value();
  REQUIRE(p != nullptr);
  CHECK(*p == 42);
}

TEST_CASE("result: a value of zero or empty is still ok", "[common][result]") {
  Result<int> zero(0);
  CHECK(zero.ok());
  CHECK(*zero == 0);
  Result<std::string> empty(std::string{});
  CHECK(empty.ok());
  CHECK(empty->empty());
}

TEST_CASE("result: Result<void> is ok by default and carries an error status", "[common][result]") {
  Result<void> ok;
  CHECK(ok.ok());
  CHECK(static_cast<bool>(ok));
  CHECK(ok.status() == Status::kOk);
  Result<void> err(Status::kNoSpace);
  CHECK_FALSE(err.ok());
  CHECK_FALSE(static_cast<bool>(err));
  CHECK(err.status() == Status::kNoSpace);
  Result<void> from_ok_status(Status::kOk);
  CHECK(from_ok_status.ok());
}

TEST_CASE("result: RAMKV_TRY passes values through and returns the first error",
          "[common][result]") {
  int calls = 0;
  auto sum = add_digits('3', '4', &calls);
  REQUIRE(sum.ok());
  CHECK(*sum == 7);
  CHECK(calls == 3);

  calls = 0;
  auto bad_first = add_digits('x', '4', &calls);
  CHECK(bad_first.status() == Status::kInvalidArgument);
  CHECK(calls == 1);

  calls = 0;
  auto bad_second = add_digits('3', 'y', &calls);
  CHECK(bad_second.status() == Status::kInvalidArgument);
  CHECK(calls == 2);
}

TEST_CASE("result: RAMKV_TRY works with Result<void> and stops at the first failure",
          "[common][result]") {
  size_t checked = 0;
  CHECK(check_all_even({2, 4, 6}, &checked).ok());
  CHECK(checked == 3);
  checked = 0;
  auto r = check_all_even({2, 3, 4}, &checked);
  CHECK(r.status() == Status::kBadRequest);
  CHECK(checked == 1);
}

}  // namespace
}  // namespace ramkv
