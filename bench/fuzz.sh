#!/usr/bin/env bash
# Property-based fuzzing of every door, at length: the worker protocol's
# decoder (any bytes, any MessagePack value, cut frames, huge declared
# lengths), the json-pushes parser, the API's query parameters, the base
# change hook's form, Interpolate/WithProperties rendering, Nightly's
# cron fields, QueueDir's item names and files, and the master's handling
# of worker requests (unknown ops and command ids, wrong types, transfer
# calls out of order). The test suite runs each with proptest's default 256 cases;
# this runs CASES each (default 100000; 1000000 for a long night) in the
# release profile and prints the time. A failure prints proptest's
# minimal failing input and exits 1.
# usage: bench/fuzz.sh [CASES]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cases=${1:-100000}
cd "$root"
t0=$(date +%s.%N)
PROPTEST_CASES=$cases cargo test --release --locked -p kiln-protocol -p kiln --lib -- fuzz 2>&1 \
  | grep -E "^test .*fuzz|test result|panicked|minimal failing" || true
status=${PIPESTATUS[0]}
t1=$(date +%s.%N)
printf 'fuzz: %s cases per target in %.0f s\n' "$cases" "$(echo "$t1 - $t0" | bc -l)"
exit "$status"
