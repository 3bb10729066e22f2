#!/usr/bin/env bash
# Master memory with COUNT connected kiln workers (one process simulates them).
# usage: bench/fleet.sh [COUNT]   (default 1000)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
count=${1:-1000}
work=$(mktemp -d /tmp/kiln-bench-fleet.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 1; rm -rf "$work"; }
trap cleanup EXIT
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
kiln="$root/target/release/kiln"
mkdir -p "$work/m"
cat > "$work/m/master.rhai" <<RHAI
let f = BuildFactory();
f.addStep(ShellCommand(#{ command: ["true"] }));
let workers = [];
let names = [];
for i in 0..$count { workers.push(Worker(\`w\${i}\`, "pw")); names.push(\`w\${i}\`); }
#{ protocols: #{ msgpack_experimental_v7: #{ port: 19996 } }, workers: workers,
   schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],
   builders: [BuilderConfig(#{ name: "b", workernames: names, factory: f })] }
RHAI
(cd "$work/m" && exec "$kiln" start . 2>"$work/m.err") &
pids+=($!)
for _ in $(seq 1 300); do grep -q "workers connect" "$work/m.err" 2>/dev/null && break; sleep 0.1; done
sleep 1
before=$(ps -o rss= -p "${pids[0]}")
t0=$(date +%s.%N)
"$kiln" bench worker-fleet "$work/f" --master 127.0.0.1:19996 --count "$count" --password pw 2>/dev/null &
pids+=($!)
for _ in $(seq 1 1200); do [ "$(grep -c 'INFO connected' "$work/m.err")" -ge "$count" ] && break; sleep 0.1; done
t1=$(date +%s.%N)
sleep 2
after=$(ps -o rss= -p "${pids[0]}")
n=$(grep -c 'INFO connected' "$work/m.err")
echo "$n of $count kiln workers connected in $(printf %.2f "$(echo "$t1 - $t0" | bc -l)") s; master RSS ${before} kB before, ${after} kB after: $(( (after - before) / (n > 0 ? n : 1) )) kB per worker; fleet process RSS $(ps -o rss= -p "${pids[1]}") kB"
