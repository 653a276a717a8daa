// Result<T>: a T or a Status that is not kOk. Errors are values, never exceptions
// (LevelDB). Result<void> carries only a Status.
//
// Invariants:
//   1. A Result holds a value exactly when status() == Status::kOk.
//   2. value() on an error Result is a programmer error and aborts (RAMKV_CHECK).
#pragma once

#include <optional>
#include <utility>

#include "common/assert.h"
#include "common/status.h"

namespace ramkv {

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : status_(status) {      // NOLINT: implicit by design
    RAMKV_CHECK_MSG(status != Status::kOk, "an ok Result needs a value");
  }

  bool ok() const { return status_ == Status::kOk; }
  explicit operator bool() const { return ok(); }
  Status status() const { return status_; }

  T& value() & {
    RAMKV_CHECK_MSG(ok(), "value() of an error Result");
    return *value_;
  }
  const T& value() const& {
    RAMKV_CHECK_MSG(ok(), "value() of an error Result");
    return *value_;
  }
  T&& value() && {
    RAMKV_CHECK_MSG(ok(), "value() of an error Result");
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
#define RAMKV_TRY(expr)                                 \
  do {                                                  \
    auto ramkv_try_status_ = (expr).status();           \
    if (ramkv_try_status_ != ::ramkv::Status::kOk)      \
      return ramkv_try_status_;                         \
  } while (0)

}  // namespace ramkv
