#!/usr/bin/env bash
# Log throughput: one step writes SIZE_MB of output (lines of 100 bytes);
# how fast it goes from the worker's process into the stored log, and the
# master's peak memory meanwhile.
# usage: bench/logs.sh [SIZE_MB] [kiln|stock]   (defaults: 100 kiln)
# KILN_BIN=path measures that binary instead of building the release one.
# LOG_COMPRESSION=raw|gz|bz2|lz4|zstd sets logCompressionMethod (kiln's
# default, zstd, when unset); VARIED=1 writes compiler-like lines (paths,
# numbers) instead of one repeated line, which compress far less. TLS=1
# puts the worker port behind TLS (a self-signed certificate made with
# openssl): kiln's worker connects with wss:// and --ca-file, a stock one
# with --use-tls and SSL_CERT_FILE.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
size=${1:-100}
kind=${2:-kiln}
work=$(mktemp -d /tmp/kiln-bench-logs.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f "$work/w1" 2>/dev/null || true
  sleep 0.5; rm -rf "$work"
}
trap cleanup EXIT
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
kiln="${KILN_BIN:-$root/target/release/kiln}"

if [ -n "${VARIED:-}" ]; then
  python="for i in range($size * 10000): w(('[%07d] gecko/dom/base/nsContent%03d.cpp:%d:%d: warning: unused variable tmp%d' % (i, i % 379, (i * 7919) % 4001, i % 80, i % 13)).ljust(99) + '\\\\n')"
else
  python="line = 'x' * 99 + '\\\\n'\nfor _ in range($size * 10000): w(line)"
fi
compression=""
[ -z "${LOG_COMPRESSION:-}" ] || compression="logCompressionMethod: \"$LOG_COMPRESSION\","
mkdir -p "$work/m"
port=19996
scheme=""
if [ -n "${TLS:-}" ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/m/key.pem" -out "$work/m/cert.pem" \
    -days 2 -subj /CN=127.0.0.1 -addext "subjectAltName=IP:127.0.0.1" 2>/dev/null
  port='"ssl:19996:privateKey=key.pem:certKey=cert.pem"'
  scheme="wss://"
fi
cat > "$work/m/master.rhai" <<EOF
let f = BuildFactory();
// $size MB as 100-byte lines (99 characters and a newline).
f.addStep(ShellCommand(#{ name: "chatty", command: ["python3", "-c",
    "import sys\nw = sys.stdout.write\n$python"] }));
#{
    protocols: #{ msgpack_experimental_v7: #{ port: $port } },
    www: #{ port: 18016 },
    logMaxSize: $(( (size + 10) * 1024 * 1024 )),
    $compression
    workers: [Worker("w1", "pw")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
    builders: [BuilderConfig(#{ name: "b", workernames: ["w1"], factory: f })],
}
EOF
(cd "$work/m" && exec "$kiln" start . 2>"$work/m.err") &
pids+=($!)
for _ in $(seq 1 300); do grep -q "HTTP listening" "$work/m.err" 2>/dev/null && break; sleep 0.1; done
if [ "$kind" = stock ]; then
  worker="$root/target/tools/venv/bin/buildbot-worker"
  [ -x "$worker" ] || { echo "run bash .ci/test first (it installs buildbot-worker)" >&2; exit 1; }
  tls_args=()
  [ -z "${TLS:-}" ] || tls_args=(--use-tls)
  "$worker" create-worker --protocol msgpack_experimental_v7 "${tls_args[@]}" "$work/w1" 127.0.0.1:19996 w1 pw >/dev/null
  (SSL_CERT_FILE="$work/m/cert.pem" "$worker" start --nodaemon "$work/w1" >/dev/null 2>&1 &)
else
  ca_args=()
  [ -z "${TLS:-}" ] || ca_args=(--ca-file "$work/m/cert.pem")
  "$kiln" worker create "$work/w1" --master "${scheme}127.0.0.1:19996" --name w1 --password pw "${ca_args[@]}" >/dev/null
  ("$kiln" worker start "$work/w1" >/dev/null 2>&1 &)
fi
for _ in $(seq 1 300); do grep -q 'INFO connected' "$work/m.err" && break; sleep 0.1; done
q() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(sys.argv[2]).fetchone()[0])" "$work/m/state.sqlite" "$1"; }
hwm() { awk '/VmHWM/ {print $2}' "/proc/${pids[0]}/status"; }
before=$(hwm)
t0=$(date +%s.%N)
"$kiln" force --master http://127.0.0.1:18016 b >/dev/null
for _ in $(seq 1 6000); do [ "$(q 'select count(*) from builds where complete_at is not null')" -ge 1 ] && break; sleep 0.1; done
t1=$(date +%s.%N)
secs=$(echo "$t1 - $t0" | bc -l)
stored=$(q 'select coalesce(sum(length(content)), 0) from logchunks')
echo "kiln, $kind worker${TLS:+ over TLS}: $size MB of output in $(printf %.2f "$secs") s: $(echo "$size / $secs" | bc -l | xargs printf %.1f) MB/s; stored $((stored / 1024 / 1024)) MB; results $(q 'select results from builds'); master peak RSS $((before / 1024)) MB before, $(( $(hwm) / 1024 )) MB after"
"$kiln" stop "$work/m" >/dev/null
