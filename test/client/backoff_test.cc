#include "client/backoff.h"

#include <catch2/catch.hpp>

using ramkv::client::Backoff;

TEST_CASE("backoff: delays double up to the cap", "[client][backoff]") {
  Backoff b;
  uint64_t far = UINT64_MAX;
  CHECK(b.next_delay_ns(0, far) == Backoff::kInitialNs);
  CHECK(b.next_delay_ns(0, far) == 2 * Backoff::kInitialNs);
  CHECK(b.next_delay_ns(0, far) == 4 * Backoff::kInitialNs);
  for (int i = 0; i < 40; ++i) CHECK(b.next_delay_ns(0, far) <= Backoff::kMaxNs);
  CHECK(b.next_delay_ns(0, far) == Backoff::kMaxNs);
}

TEST_CASE("backoff: no delay runs past the deadline", "[client][backoff]") {
  for (uint64_t seed : {uint64_t{0}, uint64_t{42}}) {
    Backoff b(seed);
    const uint64_t deadline = 1'000'000'000;
    uint64_t now = 0;
    int attempts = 0;
    while (now < deadline) {
      uint64_t d = b.next_delay_ns(now, deadline);
      CHECK(now + d <= deadline);
      now += d == 0 ? 1 : d;
      ++attempts;
    }
    // Exponential: a second of back-off is reached in tens of attempts, not thousands.
    CHECK(attempts < 40);
  }
  Backoff late;
  CHECK(late.next_delay_ns(5, 3) == 0);
}

TEST_CASE("backoff: jitter stays within half a step", "[client][backoff]") {
  Backoff jittered(7);
  Backoff plain;
  for (int i = 0; i < 30; ++i) {
    uint64_t step = plain.next_delay_ns(0, UINT64_MAX);
    uint64_t d = jittered.next_delay_ns(0, UINT64_MAX);
    CHECK(d <= step);
    CHECK(d >= step / 2);
  }
}
