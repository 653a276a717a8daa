// ramkv/result.h: public. Result<T>: a T or a Status that is not kOk. Errors are values, never
// exceptions (LevelDB). Result<void> carries only a Status.
//
// Invariants:
//   1. A Result holds a value exactly when status() == Status::kOk.
//   2. value() on an error Result is a programmer error and aborts.
#pragma once

#include <optional>
#include <utility>

#include <cstdio>
#include <cstdlib>

#include "ramkv/status.h"

namespace ramkv {

namespace internal {
[[noreturn]] inline void bad_result_access() {
  std::fputs("ramkv: value() of an error Result\n", stderr);
  std::abort();
}
}  // namespace internal

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}                // NOLINT: implicit by design
  Result(Status status) : status_(status) {                    // NOLINT: implicit by design
    if (status == Status::kOk) internal::bad_result_access();  // an ok Result needs a value
  }

  bool ok() const { return status_ == Status::kOk; }
  explicit operator bool() const { return ok(); }
  Status status() const { return status_; }

  T& value() & {
    if (!ok()) internal::bad_result_access();
    return *value_;
  }
  const T& value() const& {
    if (!ok()) internal::bad_result_access();
    return *value_;
  }
  T&& value() && {
    if (!ok()) internal::bad_result_access();
    return std::move(*value_);
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  Status status_ = Status::kOk;
  std::optional<T> value_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Status status) : status_(status) {}  // NOLINT: implicit by design
  bool ok() const { return status_ == Status::kOk; }
  explicit operator bool() const { return ok(); }
  Status status() const { return status_; }

 private:
  Status status_ = Status::kOk;
};

// Propagates an error Result from the enclosing function.
#define RAMKV_TRY(expr)                                                      \
  do {                                                                       \
    auto ramkv_try_status_ = (expr).status();                                \
    if (ramkv_try_status_ != ::ramkv::Status::kOk) return ramkv_try_status_; \
  } while (0)

}  // namespace ramkv
