#!/usr/bin/env bash
# Hot reconfig: kiln at 100, 1000 and 5000 builders beside Buildbot 4.3's
# `buildbot reconfig` at 1000, in the same run.
# usage: bench/reconfig.sh [RUNS] [skip-buildbot]   (RUNS saves per size, default 7)
# kiln: the latency from a save (one branch, 5 builders, added or removed)
# to the new config applied, with the watcher's default 300 ms quiet period
# and with 20 ms; the reload's own time; `kiln reconfig` wall time; the
# master's CPU while idle with the watcher on (bench/reconfig.py).
# Buildbot: ../shared/bench/buildbot/run.sh reconfig (adds one branch to a
# 1000-builder master; "took N seconds" is its own time).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer="$root/../shared/bench/buildbot"
runs=${1:-7}
work=$(mktemp -d /tmp/kiln-bench-reconfig.XXXXXX)
trap 'rm -rf "$work"' EXIT
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
kiln="${KILN_BIN:-$root/target/release/kiln}"
for b in 20 200 1000; do
  python3 "$here/reconfig.py" "$kiln" "$work" "$b" "$runs"
done
if [ "${2:-}" != skip-buildbot ]; then
  echo "Buildbot 4.3, 1000 builders:"
  "$peer/run.sh" reconfig "$work/buildbot"
fi
