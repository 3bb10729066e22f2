#!/usr/bin/env bash
# Latent workers (issue 17), kiln alone: Buildbot has no latent worker that
# runs a local process, so the comparison is with kiln's always-on workers.
#  1. cold start: from `kiln force` to the first step running, on a
#     LocalLatentWorker that is stopped (build_wait_timeout 0 stops it after
#     each build), five times; beside the same on an always-on worker.
#  2. a burst: 40 changes, each building 5 builders (200 builds of 5 trivial
#     steps), on 8 LocalLatentWorkers starting from none, beside 8 always-on
#     kiln workers.
# usage: bench/latent.sh      (KILN_BIN=path measures another binary)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=$(mktemp -d /tmp/kiln-bench-latent.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1; pkill -f "worker start $work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
kiln="${KILN_BIN:-$root/target/release/kiln}"

# master DIR WORKERS_RHAI STEPS_RHAI: a master with builders b0..b4 on
# w0..w7 and a Scheduler on branch main, free of ports the OS picks.
master() {
  mkdir -p "$1"
  local steps=${3//@DIR@/$1}
  cat >"$1/master.rhai" <<RHAI
let f = BuildFactory();
$steps
let names = ["w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7"];
let c = #{
    protocols: #{ msgpack_experimental_v7: #{ port: 0 } },
    www: #{ port: 0 },
    workers: [],
    builders: [],
    schedulers: [],
    collapseRequests: false,
    latentStartConcurrency: 8,
};
for n in names { c.workers.push($2); }
let builders = [];
for i in 0..5 { builders.push(\`b\${i}\`); c.builders.push(BuilderConfig(#{ name: \`b\${i}\`, workernames: names, factory: f })); }
c.schedulers.push(Scheduler(#{ name: "main", branch: "main", treeStableTimer: (), builderNames: builders }));
c.schedulers.push(ForceScheduler(#{ name: "force", builderNames: builders }));
c
RHAI
}

start() { # DIR -> sets url, wport
  (cd "$1" && exec "$kiln" start . 2>"$1/k.err") &
  pids+=($!)
  for _ in $(seq 1 300); do grep -q "HTTP listening" "$1/k.err" 2>/dev/null && break; sleep 0.1; done
  url=$(grep -o 'HTTP listening on http://[0-9.:]*' "$1/k.err" | head -1 | sed 's/HTTP listening on //')
  wport=$(grep -o 'workers connect to ws://[0-9.:]*' "$1/k.err" | head -1 | sed 's/.*://')
}
stop() { "$kiln" stop "$1" >/dev/null; }
q() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(sys.argv[2]).fetchone()[0])" "$1/state.sqlite" "$2"; }
always_on() { # DIR: 8 kiln workers started by hand
  for i in 0 1 2 3 4 5 6 7; do
    "$kiln" worker create "$1/kw$i" --master "127.0.0.1:$wport" --name "w$i" --password pw >/dev/null
    ("$kiln" worker start "$1/kw$i" >/dev/null 2>&1 &)
  done
  for _ in $(seq 1 300); do [ "$(grep -c 'INFO connected' "$1/k.err")" -ge 8 ] && break; sleep 0.1; done
}

# 1. Cold start to first step.
step='f.addStep(ShellCommand(#{ name: "t", command: ["sh", "-c", "date +%s.%N > @DIR@/first-step"] }));'
cold() { # DIR KIND
  local d=$1 all=()
  for i in 1 2 3 4 5; do
    rm -f "$d/first-step"
    t0=$(date +%s.%N)
    "$kiln" force --master "$url" b0 >/dev/null
    for _ in $(seq 1 600); do [ -s "$d/first-step" ] && break; sleep 0.02; done
    t1=$(cat "$d/first-step")
    all+=("$(echo "$t1 - $t0" | bc -l)")
    for _ in $(seq 1 600); do [ "$(q "$d" "select count(*) from builds where complete_at is not null")" -ge "$i" ] && break; sleep 0.05; done
    if [ "$2" = latent ]; then
      # Until the worker has stopped again.
      for _ in $(seq 1 600); do pgrep -f "worker start $d" >/dev/null || break; sleep 0.05; done
    fi
  done
  printf '%s\n' "${all[@]}" | sort -n | awk '{a[NR]=$1} END {printf "median %.2f s (min %.2f, max %.2f)\n", a[int((NR+1)/2)], a[1], a[NR]}'
}
master "$work/lc" 'LocalLatentWorker(n, "pw", #{ build_wait_timeout: 0 })' "$step"
start "$work/lc"
echo "cold LocalLatentWorker, force to first step: $(cold "$work/lc" latent)"
stop "$work/lc"
master "$work/ac" 'Worker(n, "pw")' "$step"
start "$work/ac"; always_on "$work/ac"
echo "always-on worker, force to first step:      $(cold "$work/ac" on)"
stop "$work/ac"; pkill -f "worker start $work/ac" || true

# 2. The burst.
steps='for s in 0..5 { f.addStep(ShellCommand(#{ name: `s${s}`, command: ["true"] })); }'
burst() { # DIR
  local port=${url##*:}
  t0=$(date +%s.%N)
  python3 - "$port" <<'PY'
import http.client, sys, urllib.parse
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
for i in range(40):
    body = urllib.parse.urlencode({"branch": "main", "revision": "%040x" % (i + 1), "author": "dev <dev@example.com>",
                                   "comments": "push %d" % i, "files": '["a.c"]', "repository": "r", "project": "p"})
    conn.request("POST", "/change_hook/base", body, {"Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse(); r.read()
    assert r.status == 200, r.status
PY
  for _ in $(seq 1 6000); do [ "$(q "$1" 'select count(*) from builds where complete_at is not null')" -ge 200 ] && break; sleep 0.1; done
  t1=$(date +%s.%N)
  echo "200 builds in $(printf %.2f "$(echo "$t1 - $t0" | bc -l)") s; results $(q "$1" 'select group_concat(distinct results) from builds')"
}
master "$work/lb" 'LocalLatentWorker(n, "pw", #{ build_wait_timeout: 60 })' "$steps"
start "$work/lb"
echo "burst on 8 LocalLatentWorkers from none: $(burst "$work/lb")"
stop "$work/lb"
master "$work/ab" 'Worker(n, "pw")' "$steps"
start "$work/ab"; always_on "$work/ab"
echo "burst on 8 always-on workers:            $(burst "$work/ab")"
stop "$work/ab"; pkill -f "worker start $work/ab" || true
