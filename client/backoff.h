// Backoff: the delays between resends of one client operation. Exponential from
// kInitialNs to kMaxNs, with jitter so that clients that failed together do not come
// back together, and never past the operation's deadline.
//
// Owner: one operation; single-threaded.
//
// Invariants:
//   1. now + next_delay_ns(now, deadline) <= deadline whenever now <= deadline.
//   2. The un-jittered step doubles after each call, up to kMaxNs.
#pragma once

#include <algorithm>
#include <cstdint>

namespace ramkv::client {

class Backoff {
 public:
  static constexpr uint64_t kInitialNs = 500'000;  // 0.5 ms
  static constexpr uint64_t kMaxNs = 200'000'000;  // 200 ms

  // `jitter_seed` 0: no jitter (deterministic, for tests).
  explicit Backoff(uint64_t jitter_seed = 0) : seed_(jitter_seed) {}

  // The delay before the next attempt: the current step (less up to half of it as
  // jitter), clipped to the time left before `deadline_ns`.
  uint64_t next_delay_ns(uint64_t now_ns, uint64_t deadline_ns) {
    uint64_t delay = step_ns_;
    if (seed_ != 0) delay -= next_random() % (step_ns_ / 2 + 1);
    step_ns_ = std::min(step_ns_ * 2, kMaxNs);
    uint64_t left = deadline_ns > now_ns ? deadline_ns - now_ns : 0;
    return std::min(delay, left);
  }
  uint64_t step_ns() const { return step_ns_; }

 private:
  uint64_t next_random() {  // splitmix64: tiny, and plenty for jitter
    uint64_t z = (seed_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

  uint64_t step_ns_ = kInitialNs;
  uint64_t seed_;
};

}  // namespace ramkv::client
