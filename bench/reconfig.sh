#!/usr/bin/env bash
# Hot reconfig: kiln at 100, 1000 and 5000 builders beside Buildbot 4.3's
# `buildbot reconfig` at 1000, in the same run.
# usage: bench/reconfig.sh [RUNS] [skip-buildbot]   (RUNS saves per size, default 7)
# kiln: the latency from a save (one branch, 5 builders, added or removed)
# to the new config applied, with the watcher's default 300 ms quiet period
# and with 20 ms; the reload's own time; `kiln reconfig` wall time; the
# master's CPU while idle with the watcher on (bench/reconfig.py).
# Buildbot: bench/buildbot/run.sh reconfig (adds one branch to a
# 1000-builder master; "took N seconds" is its own time).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer="$root/bench/buildbot"
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
  # As bench/buildbot/run.sh reconfig, whose `--start-timeout`
  # Buildbot 4.3 spells `--start_timeout`.
  venv=$("$peer/setup.sh")
  d="$work/bb"
  python3 "$peer/gen_master.py" "$d" 200 5 10 19990 18010
  (cd "$d" && "$venv/bin/buildbot" create-master -r . >/dev/null)
  t0=$(date +%s.%N)
  (cd "$d" && "$venv/bin/buildbot" start --start_timeout 300 . >/dev/null 2>&1 || true)
  for _ in $(seq 1 1500); do grep -q "BuildMaster is running" "$d/twistd.log" 2>/dev/null && break; sleep 0.2; done
  echo "Buildbot 4.3, 1000 builders: start_s=$(echo "$(date +%s.%N) - $t0" | bc) rss_mb=$(( $(ps -o rss= -p "$(cat "$d/twistd.pid")") / 1024 ))"
  for i in $(seq 1 "$runs"); do
    if [ $((i % 2)) = 1 ]; then b=201; else b=200; fi
    python3 "$peer/gen_master.py" "$d" "$b" 5 10 19990 18010
    t0=$(date +%s.%N); (cd "$d" && "$venv/bin/buildbot" reconfig . >/dev/null 2>&1 || true)
    echo "  reconfig_cli_s=$(echo "$(date +%s.%N) - $t0" | bc) $(grep -o 'configuration update complete (took [0-9.]* seconds)' "$d/twistd.log" | tail -1)"
  done
  bbpid=$(cat "$d/twistd.pid")
  kill "$bbpid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$bbpid" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$bbpid" 2>/dev/null || true
fi
