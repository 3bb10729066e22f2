#!/usr/bin/env bash
# Change sources: one poll round of many HgPollers on local repositories,
# and the change ingest rate of the base change hook beside Buildbot 4.3's.
# usage: bench/changes.sh [POLLERS] [CHANGES]   (defaults 200 and 1000)
# Needs hg (on PATH or in target/tools/venv, as `bash .ci/test` installs it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer="$root/bench/buildbot"
pollers=${1:-200}
nchanges=${2:-1000}
work=$(mktemp -d /tmp/kiln-bench-changes.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -f "$work/bb/twistd.pid" ]; then
    bbpid=$(cat "$work/bb/twistd.pid"); kill "$bbpid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$bbpid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$bbpid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
export PATH="$root/target/tools/venv/bin:$PATH" HGPLAIN=1 HGRCPATH=
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
kiln="$root/target/release/kiln"

# --- one poll round of $pollers HgPollers (plain mode, local paths) ---
mkdir -p "$work/repos" "$work/poll/secrets"
hg init -q "$work/t1" && (cd "$work/t1" && echo a > a && hg commit -q -A -u bench -m one)
hg clone -q "$work/t1" "$work/t2" && (cd "$work/t2" && echo b > b && hg commit -q -A -u bench -m two)
for i in $(seq 1 "$pollers"); do cp -r "$work/t1" "$work/repos/r$i"; done
{
  echo 'let f = BuildFactory(); f.addStep(ShellCommand(#{ command: ["true"] }));'
  echo '#{ workers: [Worker("w", "pw")],'
  echo '   builders: [BuilderConfig(#{ name: "b", workernames: ["w"], factory: f })],'
  echo '   schedulers: [ForceScheduler(#{ name: "force", builderNames: ["b"] })],'
  echo '   change_source: ['
  for i in $(seq 1 "$pollers"); do echo "     HgPoller(#{ hgURL: \"$work/repos/r$i\", branch: \"\" }),"; done
  echo '   ] }'
} > "$work/poll/master.rhai"
round() { # label: prints wall and CPU (kiln and its hg processes) of one `kiln poll`
  /usr/bin/time -o "$work/time" -f "%e %U %S" "$kiln" poll "$work/poll" >/dev/null 2>"$work/poll.err" \
    || { tail -5 "$work/poll.err" >&2; exit 1; }
  read -r w u s <"$work/time"
  printf '%-34s %8.2f s wall %8.2f s CPU\n' "$1" "$w" "$(echo "$u + $s" | bc -l)"
}
echo "== one poll round, $pollers HgPollers on local repositories (kiln poll, 2 hg/git processes per core)"
round "first poll (mirror, record tip)"
round "nothing new"
for i in $(seq 1 "$pollers"); do rm -rf "$work/repos/r$i/.hg" && cp -r "$work/t2/.hg" "$work/repos/r$i/.hg"; done
round "one new changeset in each"
n=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from changes').fetchone()[0])" "$work/poll/state.sqlite")
echo "changes stored: $n (expected $pollers)"

# --- the base change hook: kiln, then Buildbot, same client and payload ---
echo "== base change hook, sequential POSTs on one connection (seconds, ms/change, changes/s)"
python3 "$here/gen_master.py" "$work/k" 200 5 10 19992 18012
(cd "$work/k" && exec "$kiln" start . 2>"$work/k.err") &
pids+=($!)
for _ in $(seq 1 300); do grep -q "HTTP listening" "$work/k.err" 2>/dev/null && break; sleep 0.1; done
echo "kiln 40:       $(python3 "$here/post_changes.py" 18012 40 0)"
echo "kiln $nchanges:     $(python3 "$here/post_changes.py" 18012 "$nchanges" 40)"
echo "kiln rss_kb:   $(ps -o rss= -p "${pids[0]}")"
"$kiln" stop "$work/k" >/dev/null

venv=$("$peer/setup.sh")
python3 "$peer/gen_master.py" "$work/bb" 200 5 10 19993 18013
(cd "$work/bb" && "$venv/bin/buildbot" create-master -r . >/dev/null)
(cd "$work/bb" && "$venv/bin/buildbot" start --start_timeout=300 . >/dev/null 2>&1 || true)
for _ in $(seq 1 600); do grep -q "BuildMaster is running" "$work/bb/twistd.log" 2>/dev/null && break; sleep 0.2; done
echo "buildbot 40:   $(python3 "$here/post_changes.py" 18013 40 0)"
