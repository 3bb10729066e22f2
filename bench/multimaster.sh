#!/usr/bin/env bash
# Several kiln masters on one PostgreSQL beside one master on SQLite, same
# work: the 1000-builder master of burst.sh (200 branches x 5 platforms),
# 40 changes through the base change hook, 5 builds each (200 builds), on 4
# kiln workers: all on the SQLite master, or one on each of MASTERS masters
# (multiMaster, heartbeat 1 s, dead_after 5 s); GET /api/v2/builds?limit=100
# on each store (mean ms, 300 requests); then fail-over: of two masters
# each running a 3 s build, one is SIGKILLed: the time until its request
# builds again on the other, and whether every request ended with exactly
# one SUCCESS build.
# usage: bench/multimaster.sh [MASTERS]   (default 4; KILN_BIN=path as burst.sh;
# PG_SYNC=off runs PostgreSQL with synchronous_commit off, which is what
# SQLite's WAL with synchronous=NORMAL promises: no fsync per commit)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
masters=${1:-4}
work=$(mktemp -d /tmp/kiln-bench-mm.XXXXXX)
pids=()
. "$here/pg.sh"
. "$here/lib.sh"  # wait_log
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f "worker start $work/" 2>/dev/null || true
  sleep 1; pg_stop; rm -rf "$work"
}
trap cleanup EXIT
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
kiln="${KILN_BIN:-$root/target/release/kiln}"

worker() { # dir name master-port
  "$kiln" worker create "$work/$1" --master "127.0.0.1:$3" --name "$2" --password pw >/dev/null
  ("$kiln" worker start "$work/$1" >/dev/null 2>&1 &)
}
api_ms() { # www-port
  python3 - "$1" <<'PY'
import http.client, sys, time
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
n = 300
t0 = time.time()
for _ in range(n):
    c.request("GET", "/api/v2/builds?limit=100")
    r = c.getresponse(); b = r.read()
    assert r.status == 200 and b.count(b'"buildid"') == 100, r.status
print("%.2f" % (1000 * (time.time() - t0) / n))
PY
}

# --- one master on SQLite
python3 "$here/gen_master.py" "$work/lite" 200 5 4 19984 18004
(cd "$work/lite" && exec "$kiln" start . 2>"$work/lite.err") & pids+=($!)
wait_log "$work/lite.err" "master running"
for i in 0 1 2 3; do worker "lw$i" "w$i" 19984; done
for _ in $(seq 1 300); do [ "$(grep -c 'INFO connected' "$work/lite.err")" -ge 4 ] && break; sleep 0.1; done
lite_q() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(sys.argv[2]).fetchone()[0])" "$work/lite/state.sqlite" "$1"; }
t0=$(date +%s.%N)
python3 "$here/post_changes.py" 18004 40 0 >/dev/null
for _ in $(seq 1 6000); do [ "$(lite_q 'select count(*) from builds where complete_at is not null')" -ge 200 ] && break; sleep 0.05; done
t1=$(date +%s.%N)
lite_s=$(echo "$t1 - $t0" | bc -l)
lite_rss=$(ps -o rss= -p "${pids[0]}")
lite_api=$(api_ms 18004)
"$kiln" stop "$work/lite" >/dev/null
echo "1 master, SQLite, 4 kiln workers: 200 builds in $(printf %.2f "$lite_s") s; master rss ${lite_rss} kB; builds?limit=100 ${lite_api} ms"

# --- MASTERS masters on PostgreSQL, the 4 workers spread over them
pg_start 25432
start_fleet() { # tag
  for m in $(seq 0 $((masters - 1))); do
    d="$work/$1-m$m"
    python3 "$here/gen_master.py" "$d" 200 5 4 $((19990 + m)) $((18010 + m))
    sed -i "s|db: #{ db_url: \"sqlite:///state.sqlite\" },|db: #{ db_url: \"$PG_URL\" }, masterName: \"m$m\", multiMaster: #{ heartbeat: 1, dead_after: 5 },|" "$d/master.rhai"
    (cd "$d" && exec "$kiln" start . 2>"$d.err") & pids+=($!)
    eval "pid_$1_$m=$!"
    wait_log "$d.err" "master running"
  done
  # Worker w<i> on master i (mod MASTERS).
  for i in 0 1 2 3; do worker "$1-w$i" "w$i" $((19990 + i % masters)); done
  for _ in $(seq 1 300); do [ "$(pg_q 'select count(distinct workerid) from connected_workers')" -ge 4 ] && break; sleep 0.1; done
}
start_fleet a
t0=$(date +%s.%N)
python3 "$here/post_changes.py" 18010 40 0 >/dev/null
for _ in $(seq 1 6000); do [ "$(pg_q 'select count(*) from builds where complete_at is not null')" -ge 200 ] && break; sleep 0.05; done
t1=$(date +%s.%N)
pg_s=$(echo "$t1 - $t0" | bc -l)
spread=$(pg_q "select string_agg(n::text, '/' order by masterid) from (select masterid, count(*) n from builds group by masterid) x")
rss=""; for m in $(seq 0 $((masters - 1))); do p="pid_a_$m"; rss="$rss $(ps -o rss= -p "${!p}" | tr -d ' ')"; done
pg_api=$(api_ms 18010)
echo "$masters masters, PostgreSQL, 4 kiln workers: 200 builds in $(printf %.2f "$pg_s") s (builds per master $spread); master rss (kB):$rss; builds?limit=100 ${pg_api} ms"
echo "ratio PostgreSQL fleet / SQLite master: burst $(echo "$pg_s / $lite_s" | bc -l | xargs printf %.2f)x the time; API $(echo "$pg_api / $lite_api" | bc -l | xargs printf %.2f)x"

# --- fail-over: two masters on a database of their own, builder `slow` (a
# 3 s step) on a worker of each; the master running one of the two builds
# is SIGKILLed; how long until its request builds again on the other.
pg_qd postgres "CREATE DATABASE failover" >/dev/null
F_URL="postgresql://kiln:kiln@127.0.0.1:$pgport/failover"
for m in 0 1; do
  d="$work/f-m$m"; mkdir -p "$d"
  cat > "$d/master.rhai" <<RHAI
let f = BuildFactory();
f.addStep(ShellCommand(#{ name: "work", command: ["sleep", "3"] }));
#{
    masterName: "f$m",
    multiMaster: #{ heartbeat: 1, dead_after: 5 },
    db: #{ db_url: "$F_URL" },
    protocols: #{ msgpack_experimental_v7: #{ port: $((19980 + m)) } },
    www: #{ port: $((18020 + m)) },
    workers: [Worker("fw0", "pw", #{ max_builds: 1 }), Worker("fw1", "pw", #{ max_builds: 1 })],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["slow"] })],
    builders: [BuilderConfig(#{ name: "slow", workernames: ["fw0", "fw1"], factory: f })],
}
RHAI
  (cd "$d" && exec "$kiln" start . 2>"$d.err") & pids+=($!)
  eval "pid_f_$m=$!"
  wait_log "$d.err" "master running"
  worker "f-w$m" "fw$m" $((19980 + m))
done
for _ in $(seq 1 300); do [ "$(pg_qd failover 'select count(*) from connected_workers')" -ge 2 ] && break; sleep 0.1; done
"$kiln" force --master http://127.0.0.1:18020/ slow >/dev/null
"$kiln" force --master http://127.0.0.1:18020/ slow >/dev/null
for _ in $(seq 1 300); do [ "$(pg_qd failover 'select count(*) from builds where complete_at is null')" -ge 2 ] && break; sleep 0.05; done
fid=$(pg_qd failover "select id from masters where name = 'f1'")
kill -9 "$pid_f_1"; tk=$(date +%s.%N)
pkill -f "worker start $work/f-w1" 2>/dev/null || true
back=""
for _ in $(seq 1 1200); do
  r=$(pg_qd failover "select count(*) from builds b1 join builds b2 on b2.buildrequestid = b1.buildrequestid and b2.id > b1.id where b1.masterid = $fid and b1.results = 5")
  if [ "$r" -ge 1 ]; then back=$(date +%s.%N); break; fi
  sleep 0.05
done
for _ in $(seq 1 600); do [ "$(pg_qd failover 'select count(*) from buildrequests where complete = 0')" = 0 ] && break; sleep 0.1; done
once=$(pg_qd failover "select count(*) from buildrequests r where (select count(*) from builds b where b.buildrequestid = r.id and b.results = 0) != 1")
echo "failover (heartbeat 1 s, dead_after 5 s): the killed master's build ran again on the other $(echo "${back:?the build never ran again} - $tk" | bc -l | xargs printf %.2f) s after its death; requests without exactly one SUCCESS build: $once"
