#!/usr/bin/env bash
# Log storage (issue 18): BUILDS builds, each logging 1 MB of compiler-like
# output on kiln's worker, once per logCompressionMethod; the database's
# size after a clean stop, and the ingest rate (MB of log per second of the
# whole run); then what `kiln cleanupdb` makes of that database: every
# chunk compressed with zstd, then every log deleted (`--log-horizon 0`, as
# the janitor does once a build is older than its logHorizon), with its
# longest transaction: the longest any other write waits behind the janitor.
# usage: bench/logsize.sh [BUILDS] [METHODS...]   (defaults: 50 raw zstd)
# KILN_BIN=path measures that binary instead of building the release one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
builds=${1:-50}
shift || true
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(raw zstd)
work=$(mktemp -d /tmp/kiln-bench-logsize.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f "worker start $work" 2>/dev/null || true
  sleep 0.5; rm -rf "$work"
}
trap cleanup EXIT
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
kiln="${KILN_BIN:-$root/target/release/kiln}"

# 1 MB of lines such as a compiler prints: paths, line numbers, warnings
# (awk: a python3 generator of the same bytes took 0.3 s a build).
cat > "$work/chatty.awk" <<'AWK'
BEGIN {
  n = 0
  for (i = 0; n < 1000000; i++) {
    line = sprintf("[%05d] /builds/worker/checkouts/gecko/dom/base/nsContent%03d.cpp:%d:%d: warning: unused variable 'tmp%d' [-Wunused-variable]\n", i, i % 379, (i * 7919) % 4001, i % 80, i % 13)
    printf "%s", line
    n += length(line)
  }
}
AWK

for m in "${methods[@]}"; do
  d="$work/$m"
  mkdir -p "$d"
  cat > "$d/master.rhai" <<RHAI
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "compile", command: ["awk", "-f", "$work/chatty.awk"] }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    logCompressionMethod: "$m",
    workers: [Worker("w1", "pw")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f, collapseRequests: false })],
}
RHAI
  (cd "$d" && exec "$kiln" start . 2>"$d/k.err") &
  pids+=($!)
  for _ in $(seq 1 300); do grep -q "HTTP listening" "$d/k.err" 2>/dev/null && break; sleep 0.1; done
  url=$(grep -o 'HTTP listening on http://[0-9.:]*' "$d/k.err" | head -1 | sed 's/HTTP listening on //')
  wport=$(grep -o 'workers connect to ws://[0-9.:]*' "$d/k.err" | head -1 | sed 's/.*://')
  "$kiln" worker create "$d/w1" --master "127.0.0.1:$wport" --name w1 --password pw >/dev/null
  ("$kiln" worker start "$d/w1" >/dev/null 2>&1 &)
  for _ in $(seq 1 300); do grep -q "connected worker=w1" "$d/k.err" && break; sleep 0.1; done
  t0=$(date +%s.%N)
  for _ in $(seq 1 "$builds"); do "$kiln" force --master "$url" b >/dev/null; done
  q() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(sys.argv[2]).fetchone()[0])" "$d/state.sqlite" "$1"; }
  for _ in $(seq 1 $((builds * 20 + 600))); do [ "$(q 'select count(*) from builds where complete_at is not null')" -ge "$builds" ] && break; sleep 0.1; done
  t1=$(date +%s.%N)
  "$kiln" stop "$d" >/dev/null
  pkill -f "worker start $d/w1" || true
  python3 -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.execute('VACUUM')" "$d/state.sqlite"
  size=$(stat -c %s "$d/state.sqlite")
  secs=$(echo "$t1 - $t0" | bc -l)
  printf '%-5s %d builds x 1 MB: database %.1f MB (%.1f KB a build); %.2f s, %.1f MB/s of log\n' \
    "$m" "$builds" "$(echo "$size / 1048576" | bc -l)" "$(echo "$size / 1024 / $builds" | bc -l)" \
    "$secs" "$(echo "$builds / $secs" | bc -l)"
  sed -i 's/logCompressionMethod: "[a-z0-9]*"/logCompressionMethod: "zstd"/' "$d/master.rhai"
  t0=$(date +%s.%N)
  "$kiln" cleanupdb "$d" >/dev/null
  t1=$(date +%s.%N)
  zsize=$(stat -c %s "$d/state.sqlite")
  longest=$("$kiln" cleanupdb "$d" --log-horizon 0 | grep -o 'at most [0-9]* ms' || true)
  t2=$(date +%s.%N)
  psize=$(stat -c %s "$d/state.sqlite")
  printf '      cleanupdb: compressed with zstd %.1f MB (%.2f s); every log deleted %.2f MB (%.2f s; transactions of %s)\n' \
    "$(echo "$zsize / 1048576" | bc -l)" "$(echo "$t1 - $t0" | bc -l)" \
    "$(echo "$psize / 1048576" | bc -l)" "$(echo "$t2 - $t1" | bc -l)" "$longest"
done
