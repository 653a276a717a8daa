#include "common/clock.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <set>
#include <thread>
#include <vector>

namespace ramkv {
namespace {

TEST_CASE("clock: a manual clock stays put until advanced", "[common][clock]") {
  ManualClock clock(5'000, 1'700'000'000);
  CHECK(clock.now_ns() == 5'000);
  CHECK(clock.now_ns() == 5'000);
  CHECK(clock.unix_seconds() == 1'700'000'000);
  clock.advance_ns(250);
  CHECK(clock.now_ns() == 5'250);
  // Nanoseconds do not move wall time.
  CHECK(clock.unix_seconds() == 1'700'000'000);
  clock.advance_seconds(3);
  CHECK(clock.now_ns() == 3'000'005'250);
  CHECK(clock.unix_seconds() == 1'700'000'003);
  clock.advance_ns(0);
  CHECK(clock.now_ns() == 3'000'005'250);
}

TEST_CASE("clock: a manual clock works through the Clock interface", "[common][clock]") {
  ManualClock manual;
  const Clock& clock = manual;
  uint64_t before = clock.now_ns();
  manual.advance_seconds(10);
  CHECK(clock.now_ns() - before == 10'000'000'000ULL);
}

TEST_CASE("clock: the system clock is monotonic", "[common][clock]") {
  const Clock& clock = SystemClock::instance();
  uint64_t prev = clock.now_ns();
  for (int i = 0; i < 1000; ++i) {
    uint64_t now = clock.now_ns();
    REQUIRE(now >= prev);
    prev = now;
  }
  // After 2023-11-14, the default start of a ManualClock.
  CHECK(clock.unix_seconds() > 1'700'000'000u);
  CHECK(&SystemClock::instance() == &SystemClock::instance());
}

TEST_CASE("clock: a thread's CPU time grows with its work, not with its sleep", "[common][clock]") {
  const uint64_t start = thread_cpu_ns();
  // Work until the thread has used some CPU (bounded: a few seconds at most).
  volatile uint64_t sink = 0;
  const uint64_t wall_start = SystemClock::instance().now_ns();
  while (thread_cpu_ns() - start < 20'000'000 &&
         SystemClock::instance().now_ns() - wall_start < 5'000'000'000ULL) {
    for (int i = 0; i < 100'000; ++i) sink = sink + static_cast<uint64_t>(i);
  }
  const uint64_t worked = thread_cpu_ns();
  CHECK(worked - start >= 20'000'000);
  // Another thread's work is not ours.
  uint64_t other = 0;
  std::thread([&] { other = thread_cpu_ns(); }).join();
  CHECK(other < worked - start);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(thread_cpu_ns() - worked < 50'000'000);
}

TEST_CASE("clock: random sequences are fixed by the seed", "[common][clock][random]") {
  Random a(12345);
  Random b(12345);
  Random c(12346);
  std::vector<uint64_t> va, vb, vc;
  for (int i = 0; i < 100; ++i) {
    va.push_back(a.next());
    vb.push_back(b.next());
    vc.push_back(c.next());
  }
  CHECK(va == vb);
  CHECK(va != vc);
  // A sequence does not repeat its values in a short run.
  CHECK(std::set<uint64_t>(va.begin(), va.end()).size() == va.size());
}

TEST_CASE("clock: a zero seed still gives a working generator", "[common][clock][random]") {
  Random r(0);
  std::set<uint64_t> seen;
  for (int i = 0; i < 100; ++i) seen.insert(r.next());
  CHECK(seen.size() == 100);
}

TEST_CASE("clock: uniform stays below its bound and reaches every value",
          "[common][clock][random]") {
  Random r(99);
  for (uint64_t bound : {uint64_t{1}, uint64_t{2}, uint64_t{7}, uint64_t{100}}) {
    std::vector<int> hits(static_cast<size_t>(bound), 0);
    for (int i = 0; i < 10'000; ++i) {
      uint64_t v = r.uniform(bound);
      REQUIRE(v < bound);
      ++hits[static_cast<size_t>(v)];
    }
    for (size_t k = 0; k < hits.size(); ++k) {
      INFO("bound " << bound << " value " << k);
      CHECK(hits[k] > 0);
    }
  }
  for (int i = 0; i < 1000; ++i) {
    REQUIRE(r.uniform(UINT64_MAX) < UINT64_MAX);
    REQUIRE(r.uniform(uint64_t{1} << 40) < (uint64_t{1} << 40));
  }
}

TEST_CASE("clock: uniform is roughly uniform", "[common][clock][random]") {
  // A deterministic seed: the counts are fixed, and a broken generator (always low
  // values, a stuck bit) lands far outside these wide bounds.
  Random r(2024);
  std::vector<int> hits(10, 0);
  for (int i = 0; i < 100'000; ++i) ++hits[static_cast<size_t>(r.uniform(10))];
  for (int h : hits) {
    CHECK(h > 9'000);
    CHECK(h < 11'000);
  }
}

TEST_CASE("clock: uniform_double is at least 0 and below 1", "[common][clock][random]") {
  Random r(5);
  double lo = 1.0, hi = 0.0;
  for (int i = 0; i < 10'000; ++i) {
    double d = r.uniform_double();
    REQUIRE(d >= 0.0);
    REQUIRE(d < 1.0);
    lo = std::min(lo, d);
    hi = std::max(hi, d);
  }
  CHECK(lo < 0.01);
  CHECK(hi > 0.99);
}

}  // namespace
}  // namespace ramkv
