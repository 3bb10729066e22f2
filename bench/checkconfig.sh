#!/usr/bin/env bash
# kiln checkconfig beside Buildbot 4.3's, at 100, 1000 and 5000 builders.
# usage: bench/checkconfig.sh [RUNS]   (RUNS per size, default 5; the median is kept)
# Prints one line per size and tool: wall time (median), peak RSS (median), and
# the ratio Buildbot/kiln. Buildbot comes from bench/buildbot (a venv
# under /tmp, installed on first use).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer="$root/bench/buildbot"
runs=${1:-5}
work=$(mktemp -d /tmp/kiln-bench-checkconfig.XXXXXX)
trap 'rm -rf "$work"' EXIT

# KILN_BIN=path measures that kiln binary (another profile's, say) as it is.
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
kiln="${KILN_BIN:-$root/target/release/kiln}"
venv=$("$peer/setup.sh")

. "$here/lib.sh"  # median, measure

printf '%-9s %-10s %10s %10s\n' builders tool wall_s peak_MB
for b in 20 200 1000; do
  n=$((b * 5))
  python3 "$here/gen_master.py" "$work/k$b" "$b" 5 10
  python3 "$peer/gen_master.py" "$work/b$b" "$b" 5 10
  "$kiln" checkconfig "$work/k$b" >/dev/null
  read -r kw kp < <(measure "$work/k$b" "$kiln" checkconfig .)
  read -r bw bp < <(measure "$work/b$b" "$venv/bin/buildbot" checkconfig .)
  printf '%-9s %-10s %10.3f %10.1f\n' "$n" kiln "$kw" "$(echo "$kp / 1024" | bc -l)"
  printf '%-9s %-10s %10.3f %10.1f\n' "$n" buildbot "$bw" "$(echo "$bp / 1024" | bc -l)"
  printf '%-9s %-10s %9.1fx %9.1fx\n' "$n" ratio "$(echo "$bw / $kw" | bc -l)" "$(echo "$bp / $kp" | bc -l)"
done
