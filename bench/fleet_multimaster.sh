#!/usr/bin/env bash
# The seed's scale over several masters: BUILDERS builders split over
# MASTERS masters on one PostgreSQL (multiMaster), WORKERS kiln workers
# split over them (each master's workers simulated by one `kiln bench
# worker-fleet` process). Each master has 5 platform pools, its builders
# spread over them (a builder's workernames: its platform's pool), a
# ForceScheduler over its builders. Reports: each master's start time and
# RSS with its config loaded, the time for every worker to connect and
# each master's RSS then, and a burst: one force per master of BURST
# builders each (every builder a `true` step), the time until all built,
# each master's RSS after it, and how the masters table sees the fleet.
# usage: bench/fleet_multimaster.sh [MASTERS] [BUILDERS] [WORKERS] [BURST]
#        (default 4 10000 2000 100; KILN_BIN=path measures that binary)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
masters=${1:-4}
builders=${2:-10000}
workers=${3:-2000}
burst=${4:-100}
work=$(mktemp -d /tmp/kiln-bench-fleetmm.XXXXXX)
pids=()
. "$here/pg.sh"
. "$here/lib.sh"  # wait_log
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1; pg_stop; rm -rf "$work"
}
trap cleanup EXIT
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
kiln="${KILN_BIN:-$root/target/release/kiln}"
rss() { ps -o rss= -p "$1" | tr -d ' '; }

pg_start 25442
per_b=$((builders / masters))
per_w=$((workers / masters))
for m in $(seq 0 $((masters - 1))); do
  d="$work/m$m"; mkdir -p "$d"
  cat > "$d/master.rhai" <<RHAI
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "s", command: ["true"] }));
let platforms = ["linux", "linux64", "macosx64", "win32", "win64"];
let pools = #{};
let workers = [];
for p in platforms { pools[p] = []; }
for i in 0..$per_w {
    let name = \`m${m}w\${i}\`;
    workers.push(Worker(name, "pw", #{ max_builds: 1 }));
    pools[platforms[i % 5]].push(name);
}
let builders = [];
let names = [];
for i in 0..$per_b {
    let p = platforms[i % 5];
    let name = \`m${m} \${p} b\${i}\`;
    names.push(name);
    builders.push(BuilderConfig(#{ name: name, workernames: pools[p], factory: f, tags: [\`platform:\${p}\`] }));
}
#{
    masterName: "m$m",
    multiMaster: #{ heartbeat: 2, dead_after: 10 },
    db: #{ db_url: "$PG_URL" },
    protocols: #{ msgpack_experimental_v7: #{ port: $((19960 + m)) } },
    www: #{ port: $((18060 + m)) },
    workers: workers,
    schedulers: [ForceScheduler(#{ name: "force", builderNames: names })],
    builders: builders,
}
RHAI
  t0=$(date +%s.%N)
  (cd "$d" && exec "$kiln" start . 2>"$d.err") & pids+=($!)
  eval "pid_$m=$!"
  wait_log "$d.err" "master running"
  t1=$(date +%s.%N)
  echo "master m$m: $per_b builders, $per_w workers configured; running after $(echo "$t1 - $t0" | bc -l | xargs printf %.2f) s; RSS $(rss "${pids[-1]}") kB"
done

t0=$(date +%s.%N)
for m in $(seq 0 $((masters - 1))); do
  "$kiln" bench worker-fleet "$work/f$m" --master 127.0.0.1:$((19960 + m)) --count "$per_w" --prefix "m${m}w" --password pw 2>/dev/null &
  pids+=($!)
done
for _ in $(seq 1 3000); do [ "$(pg_q 'select count(*) from connected_workers')" -ge "$workers" ] && break; sleep 0.1; done
t1=$(date +%s.%N)
n=$(pg_q 'select count(*) from connected_workers')
line=""; for m in $(seq 0 $((masters - 1))); do p="pid_$m"; line="$line m$m $(rss "${!p}")"; done
echo "$n of $workers workers connected in $(echo "$t1 - $t0" | bc -l | xargs printf %.2f) s; master RSS (kB):$line"

# The burst: on each master, one force of its first BURST builders.
t0=$(date +%s.%N)
for m in $(seq 0 $((masters - 1))); do
  python3 - "$((18060 + m))" "$m" "$burst" <<'PY'
import http.client, json, sys
port, m, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
plats = ["linux", "linux64", "macosx64", "win32", "win64"]
names = [f"m{m} {plats[i % 5]} b{i}" for i in range(n)]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "force", "params": {"builderNames": names}})
c.request("POST", "/api/v2/forceschedulers/force", body, {"Content-Type": "application/json"})
r = c.getresponse(); out = r.read()
assert r.status == 200 and b'"error"' not in out, (r.status, out[:300])
PY
done
total=$((burst * masters))
for _ in $(seq 1 6000); do [ "$(pg_q 'select count(*) from builds where complete_at is not null')" -ge "$total" ] && break; sleep 0.05; done
t1=$(date +%s.%N)
done_n=$(pg_q 'select count(*) from builds where complete_at is not null')
spread=$(pg_q "select string_agg(n::text, '/' order by masterid) from (select masterid, count(*) n from builds group by masterid) x")
line=""; for m in $(seq 0 $((masters - 1))); do p="pid_$m"; line="$line m$m $(rss "${!p}")"; done
echo "burst: $done_n of $total builds done in $(echo "$t1 - $t0" | bc -l | xargs printf %.2f) s (per master $spread); master RSS (kB):$line"
echo "masters table: $(pg_q "select string_agg(name || '=' || active::text, ' ' order by id) from masters")"
