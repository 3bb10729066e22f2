#!/usr/bin/env bash
# 40 changes through the base change hook of a 1000-builder master (200
# branches x 5 platforms), each triggering 5 builds of 5 trivial steps, on 4
# stock buildbot-worker 4.3 processes: kiln, then Buildbot 4.3, same shape.
# usage: bench/burst.sh [skip-buildbot]
# KILN_WORKERS=1 runs kiln's own workers instead of stock ones for kiln.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer="$root/bench/buildbot"
work=$(mktemp -d /tmp/kiln-bench-burst.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for i in 0 1 2 3; do [ -f "$work/bw$i/twistd.pid" ] && kill "$(cat "$work/bw$i/twistd.pid")" 2>/dev/null || true; done
  if [ -f "$work/bb/twistd.pid" ]; then
    bbpid=$(cat "$work/bb/twistd.pid"); kill "$bbpid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$bbpid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$bbpid" 2>/dev/null || true
  fi
  sleep 1; rm -rf "$work"
}
trap cleanup EXIT
# KILN_BIN=path measures that kiln binary (another commit's, say) as it is.
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
kiln="${KILN_BIN:-$root/target/release/kiln}"
worker="$root/target/tools/venv/bin/buildbot-worker"
[ -x "$worker" ] || { echo "run bash .ci/test first (it installs buildbot-worker)" >&2; exit 1; }

python3 "$here/gen_master.py" "$work/k" 200 5 4 19994 18014
(cd "$work/k" && exec "$kiln" start . 2>"$work/k.err") &
pids+=($!)
for _ in $(seq 1 300); do grep -q "HTTP listening" "$work/k.err" 2>/dev/null && break; sleep 0.1; done
kind="4 stock workers"
for i in 0 1 2 3; do
  if [ -n "${KILN_WORKERS:-}" ]; then
    kind="4 kiln workers"
    "$kiln" worker create "$work/kw$i" --master 127.0.0.1:19994 --name "w$i" --password pw >/dev/null
    ("$kiln" worker start "$work/kw$i" >/dev/null 2>&1 &)
  else
    "$worker" create-worker --protocol msgpack_experimental_v7 "$work/kw$i" 127.0.0.1:19994 "w$i" pw >/dev/null
    ("$worker" start --nodaemon "$work/kw$i" >/dev/null 2>&1 &)
  fi
done
for _ in $(seq 1 300); do [ "$(grep -c 'INFO connected' "$work/k.err")" -ge 4 ] && break; sleep 0.1; done
q() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(sys.argv[2]).fetchone()[0])" "$work/k/state.sqlite" "$1"; }
t0=$(date +%s.%N)
python3 "$here/post_changes.py" 18014 40 0 >/dev/null
for _ in $(seq 1 6000); do [ "$(q 'select count(*) from builds where complete_at is not null')" -ge 200 ] && break; sleep 0.1; done
t1=$(date +%s.%N)
all=$(echo "$t1 - $t0" | bc -l)
echo "kiln, $kind: 200 builds in $(printf %.2f "$all") s: $(echo "200 / $all" | bc -l | xargs printf %.2f) builds/s; results $(q 'select group_concat(distinct results) from builds'); master rss $(ps -o rss= -p "${pids[0]}") kB"
for i in 0 1 2 3; do pkill -f "start --nodaemon $work/kw$i" || true; pkill -f "worker start $work/kw$i" || true; done
"$kiln" stop "$work/k" >/dev/null

[ "${1:-}" = skip-buildbot ] && exit 0
venv=$("$peer/setup.sh")
python3 "$peer/gen_master.py" "$work/bb" 200 5 4 19995 18015
(cd "$work/bb" && "$venv/bin/buildbot" create-master -r . >/dev/null)
(cd "$work/bb" && "$venv/bin/buildbot" start --start_timeout=300 . >/dev/null 2>&1 || true)
for _ in $(seq 1 900); do grep -q "BuildMaster is running" "$work/bb/twistd.log" 2>/dev/null && break; sleep 0.2; done
for i in 0 1 2 3; do
  "$venv/bin/buildbot-worker" create-worker --protocol msgpack_experimental_v7 "$work/bw$i" 127.0.0.1:19995 "w$i" pw >/dev/null
  "$venv/bin/buildbot-worker" start "$work/bw$i" >/dev/null 2>&1 || true
done
sleep 5
echo "buildbot, 4 stock workers: $(python3 "$peer/burst.py" 18015 40 5 0)"
