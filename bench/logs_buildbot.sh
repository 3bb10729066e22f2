#!/usr/bin/env bash
# Buildbot 4.3's side of bench/logs.sh: one step writes SIZE_MB of output
# (100-byte lines) on a stock msgpack worker; the time from the force to
# the build's end, and the master's peak memory.
# usage: bench/logs_buildbot.sh [SIZE_MB]   (default 100)
# Buildbot comes from bench/buildbot/setup.sh (a venv in /tmp).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
size=${1:-100}
venv=$(bash "$root/bench/buildbot/setup.sh")
work=$(mktemp -d /tmp/kiln-bench-bblogs.XXXXXX)
cleanup() {
  if [ -f "$work/w1/twistd.pid" ]; then kill "$(cat "$work/w1/twistd.pid")" 2>/dev/null || true; fi
  if [ -f "$work/m/twistd.pid" ]; then kill "$(cat "$work/m/twistd.pid")" 2>/dev/null || true; fi
  sleep 2
  [ -n "${KEEP:-}" ] || rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT

mkdir -p "$work/m"
python3 - "$work/m/master.cfg" "$size" <<'PY'
import sys
path, size = sys.argv[1], int(sys.argv[2])
program = "import sys\nline = 'x' * 99 + '\\n'\nw = sys.stdout.write\nfor _ in range(%d): w(line)" % (size * 10000)
with open(path, "w") as f:
    f.write(f"""from buildbot.plugins import schedulers, steps, util, worker
c = BuildmasterConfig = {{}}
c['workers'] = [worker.Worker('w1', 'pw')]
c['protocols'] = {{'msgpack_experimental_v7': {{'port': 19997}}}}
f = util.BuildFactory()
f.addStep(steps.ShellCommand(name='chatty', command=['python3', '-c', {program!r}]))
c['builders'] = [util.BuilderConfig(name='b', workernames=['w1'], factory=f)]
c['schedulers'] = [schedulers.ForceScheduler(name='force', builderNames=['b'])]
c['www'] = {{'port': 18017, 'plugins': {{}}}}
c['db'] = {{'db_url': 'sqlite:///state.sqlite'}}
c['buildbotNetUsageData'] = None
""")
PY
(cd "$work/m" && "$venv/bin/buildbot" create-master -r . >/dev/null)
(cd "$work/m" && "$venv/bin/buildbot" start --start_timeout 120 . >/dev/null 2>&1 || true)
for _ in $(seq 1 600); do grep -q "BuildMaster is running" "$work/m/twistd.log" 2>/dev/null && break; sleep 0.2; done
"$venv/bin/buildbot-worker" create-worker --protocol msgpack_experimental_v7 "$work/w1" 127.0.0.1:19997 w1 pw >/dev/null
"$venv/bin/buildbot-worker" start "$work/w1" >/dev/null 2>&1
for _ in $(seq 1 300); do grep -q "Worker w1 attached to b" "$work/m/twistd.log" 2>/dev/null && break; sleep 0.2; done
sleep 1
mpid=$(cat "$work/m/twistd.pid")
hwm() { awk '/VmHWM/ {print $2}' "/proc/$mpid/status"; }
# Buildbot's SQLite may be locked while it writes: a failed read is 0.
q() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1], timeout=10).execute(sys.argv[2]).fetchone()[0])" "$work/m/state.sqlite" "$1" 2>/dev/null || echo 0; }
before=$(hwm)
t0=$(date +%s.%N)
curl -s -X POST http://127.0.0.1:18017/api/v2/forceschedulers/force \
  -H 'Content-Type: application/json' \
  -d '{"jsonrpc":"2.0","id":1,"method":"force","params":{"builderNames":["b"]}}' >/dev/null
for _ in $(seq 1 12000); do
  [ "$(q 'select count(*) from builds where complete_at is not null')" -ge 1 ] && break
  sleep 0.1
done
t1=$(date +%s.%N)
secs=$(echo "$t1 - $t0" | bc -l)
echo "Buildbot 4.3, stock worker: $size MB of output in $(printf %.2f "$secs") s: $(echo "$size / $secs" | bc -l | xargs printf %.1f) MB/s; results $(q 'select results from builds'); master peak RSS $((before / 1024)) MB before, $(( $(hwm) / 1024 )) MB after"
