#!/usr/bin/env bash
# The README's test command: sets up, builds and runs every test.
#   1. installs the build dependencies (scripts/setup.sh);
#   2. checks formatting;
#   3. builds with warnings as errors (build-test/; scripts/run.sh uses build/) and runs
#      every ctest test, the benchmarks' smoke runs and the whole-cluster tests included;
#   4. builds with AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/) and runs
#      the unit tests again;
#   5. builds the libFuzzer target with clang and fuzzes the master's request decoder
#      for FUZZ_SECONDS (30).
# Prints each ctest summary, then one closing line "N passed, N failed".
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
jobs=${JOBS:-2}

bash scripts/setup.sh || { echo "test: setup failed"; exit 1; }

passed=0
failed=0
skipped=0
# Runs ctest in a build dir and adds its counts to the totals.
run_ctest() {
  local dir=$1
  shift
  local log
  log=$(mktemp)
  (cd "$dir" && ctest --output-on-failure -j "$jobs" "$@") 2>&1 | tee "$log"
  local line total nfail nskip
  line=$(grep -E 'tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1)
  if [ -z "$line" ]; then
    echo "test: ctest in $dir printed no summary"
    failed=$((failed + 1))
  else
    nfail=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")
    total=$(sed -E 's/.* failed out of ([0-9]+).*/\1/' <<<"$line")
    # Skipped tests (listed under "did not run") count as neither passed nor failed.
    nskip=$(sed -n '/The following tests did not run:/,/^$/p' "$log" | grep -c '(Skipped)' || true)
    passed=$((passed + total - nfail - nskip))
    failed=$((failed + nfail))
    skipped=$((skipped + nskip))
  fi
  rm -f "$log"
}

echo "== format"
if bash scripts/check-format.sh; then passed=$((passed + 1)); else failed=$((failed + 1)); fi

echo "== build (warnings are errors)"
if JOBS=$jobs bash scripts/build.sh build-test -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRAMKV_WERROR=ON \
    -DRAMKV_BUILD_TESTS=ON -DRAMKV_BUILD_BENCH=ON; then
  echo "== tests"
  run_ctest build-test
else
  echo "test: build failed"
  failed=$((failed + 1))
fi

echo "== build with ASan + UBSan"
if JOBS=$jobs bash scripts/build.sh build-asan -DCMAKE_BUILD_TYPE=Debug -DRAMKV_SANITIZE=ON \
    -DRAMKV_WERROR=ON -DRAMKV_BUILD_TESTS=ON -DRAMKV_BUILD_BENCH=OFF; then
  echo "== tests under ASan + UBSan"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_ctest build-asan
else
  echo "test: sanitizer build failed"
  failed=$((failed + 1))
fi

echo "== fuzz: the master's request decoder under libFuzzer (clang, ASan+UBSan), ${FUZZ_SECONDS:-30} s"
if CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DRAMKV_FUZZ=ON -DRAMKV_BUILD_BENCH=OFF >/dev/null &&
   cmake --build build-fuzz -j "$jobs" --target master_request_fuzz >build-fuzz.log 2>&1 ||
   { tail -n 30 build-fuzz.log; false; }; then
  corpus=$(mktemp -d)
  if ./build-fuzz/bin/master_request_fuzz -max_total_time="${FUZZ_SECONDS:-30}" -max_len=4096 \
      "$corpus" >build-fuzz/fuzz.log 2>&1; then
    echo "fuzz: $(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' build-fuzz/fuzz.log), no failure"
    passed=$((passed + 1))
  else
    tail -n 30 build-fuzz/fuzz.log
    echo "fuzz: FAILED (crash input saved in the working directory)"
    failed=$((failed + 1))
  fi
  rm -rf "$corpus"
else
  echo "test: fuzz build failed"
  failed=$((failed + 1))
fi

echo
[ "$skipped" -gt 0 ] && echo "($skipped skipped: see the SKIPPED lines above for why)"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
