#!/usr/bin/env bash
# The crash soak at length: tests/it/soak.rs with ROUNDS rounds of its four
# stages (a change just taken, a build running, a build just ended,
# requests waiting), the master SIGKILLed at each and started again, while
# pushes build on kiln's worker and a stock buildbot-worker. It fails if
# any change, buildset, request or build is lost or doubled; else it prints
# the kills survived and the builds retried.
# usage: bench/soak.sh [ROUNDS]   (default 10: 40 kills)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-10}
cd "$root"
if ! [ -x target/tools/venv/bin/buildbot-worker ] || ! [ -x target/tools/venv/bin/hg ]; then
  echo "soak.sh: the stock buildbot-worker is missing; run bash .ci/test once (it installs it and Mercurial under target/tools/)" >&2
  exit 2
fi
export PATH="$root/target/tools/venv/bin:$PATH"
# The test runs kiln and kiln-worker of its own (dev) profile: the soak
# counts what survives, not how fast.
cargo build --locked --workspace --bins
KILN_SOAK_ROUNDS=$rounds cargo test --locked --test it -- --nocapture soak:: 2>&1 \
  | grep -E "^soak:|test result|panicked" 
