// Time and randomness come in through interfaces so tests can drive them (STYLE.md).
//
// Clock::now_ns is monotonic (steady_clock); Clock::unix_seconds is wall time, used only
// for entry timestamps (the cleaner's age estimate), never for ordering.
// Implementations are thread-safe.
#pragma once

#include <atomic>
#include <cstdint>

namespace ramkv {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual uint64_t now_ns() const = 0;
  virtual uint32_t unix_seconds() const = 0;
};

class SystemClock final : public Clock {
 public:
  uint64_t now_ns() const override;
  uint32_t unix_seconds() const override;
  // A process-wide instance, for code that was not handed a clock.
  static const SystemClock& instance();
};

// A clock that moves only when told: deterministic ages and timeouts in tests.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(uint64_t start_ns = 1'000'000'000, uint32_t start_unix = 1'700'000'000)
      : ns_(start_ns), unix_(start_unix) {}
  uint64_t now_ns() const override { return ns_.load(); }
  uint32_t unix_seconds() const override { return unix_.load(); }
  void advance_ns(uint64_t ns) { ns_ += ns; }
  void advance_seconds(uint32_t s) {
    unix_ += s;
    ns_ += uint64_t{s} * 1'000'000'000;
  }

 private:
  std::atomic<uint64_t> ns_;
  std::atomic<uint32_t> unix_;
};

// CPU time the calling thread has used, in ns (CLOCK_THREAD_CPUTIME_ID): for logs that
// say where a long task's time went (its own work or waiting).
uint64_t thread_cpu_ns();

// A small, fast, seedable generator (xoshiro256**). Not thread-safe: one per thread.
class Random {
 public:
  explicit Random(uint64_t seed);
  uint64_t next();
  // Uniform in [0, bound); bound > 0.
  uint64_t uniform(uint64_t bound);
  // Uniform in [0, 1).
  double uniform_double() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  uint64_t s_[4];
};

}  // namespace ramkv
