#!/usr/bin/env bash
# checkconfig of a master in the seed's own idiom (generateBranchObjects
# per branch, mergeBuildObjects by value, platform maps with `slaves` pools
# and mozharness settings), kiln beside Buildbot 4.3 on the same shape.
# usage: bench/seed_checkconfig.sh [RUNS] [BRANCHES...]   (default 5 runs; 200 and 1000 branches of 5 platforms)
# Prints per size and tool: wall time and peak RSS (medians), the peak
# above the tool's own one-branch config (Buildbot refuses a config without
# builders), that per added builder, and the ratios; then, with two sizes
# or more, each tool's cost per builder between the smallest and the
# largest (the slope, which a few hundred KB of noise in the one-branch
# peak does not move).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
runs=${1:-5}; shift || true
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(200 1000)
work=$(mktemp -d /tmp/kiln-bench-seed.XXXXXX)
trap 'rm -rf "$work"' EXIT

# KILN_BIN=path measures that kiln binary (another profile's, say) as it is.
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
kiln=${KILN_BIN:-$root/target/release/kiln}
venv=$("$root/bench/buildbot/setup.sh")

. "$here/lib.sh"  # median, measure

python3 "$here/gen_seed_master.py" "$work/k0" 1
python3 "$root/bench/buildbot/gen_seed_master.py" "$work/b0" 1
"$kiln" checkconfig "$work/k0" >/dev/null
read -r _ k0 < <(measure "$work/k0" "$kiln" checkconfig .)
read -r _ b0 < <(measure "$work/b0" "$venv/bin/buildbot" checkconfig .)
printf 'one branch (5 builders): kiln %.1f MB, buildbot %.1f MB\n' "$(echo "$k0/1024" | bc -l)" "$(echo "$b0/1024" | bc -l)"
printf '%-9s %-9s %8s %8s %9s %11s\n' builders tool wall_s peak_MB above_MB KB/added
declare -A kpeak bpeak
for b in "${sizes[@]}"; do
  n=$((b * 5))
  python3 "$here/gen_seed_master.py" "$work/k$b" "$b"
  python3 "$root/bench/buildbot/gen_seed_master.py" "$work/b$b" "$b"
  out=$("$kiln" checkconfig "$work/k$b" 2>&1) || { echo "$out"; exit 1; }
  (cd "$work/b$b" && "$venv/bin/buildbot" checkconfig . >/dev/null) || { echo "buildbot checkconfig failed"; exit 1; }
  read -r kw kp < <(measure "$work/k$b" "$kiln" checkconfig .)
  read -r bw bp < <(measure "$work/b$b" "$venv/bin/buildbot" checkconfig .)
  kpeak[$n]=$kp; bpeak[$n]=$bp
  ka=$(echo "($kp - $k0) / 1024" | bc -l); ba=$(echo "($bp - $b0) / 1024" | bc -l)
  printf '%-9s %-9s %8.3f %8.1f %9.1f %11.2f\n' "$n" kiln "$kw" "$(echo "$kp/1024" | bc -l)" "$ka" "$(echo "$ka*1024/($n - 5)" | bc -l)"
  printf '%-9s %-9s %8.3f %8.1f %9.1f %11.2f\n' "$n" buildbot "$bw" "$(echo "$bp/1024" | bc -l)" "$ba" "$(echo "$ba*1024/($n - 5)" | bc -l)"
  printf '%-9s %-9s %7.1fx %17s %10.2fx\n' "$n" ratio "$(echo "$bw / $kw" | bc -l)" "" "$(echo "$ba / $ka" | bc -l)"
  echo "  kiln's warnings: $(printf '%s\n' "$out" | grep -c 'legacy' || true) line(s) for the $n platforms' \`slaves\`"
done
if [ ${#sizes[@]} -ge 2 ]; then
  lo=$((sizes[0] * 5)); hi=$((sizes[${#sizes[@]} - 1] * 5))
  ks=$(echo "(${kpeak[$hi]} - ${kpeak[$lo]}) / ($hi - $lo)" | bc -l)
  bs=$(echo "(${bpeak[$hi]} - ${bpeak[$lo]}) / ($hi - $lo)" | bc -l)
  printf 'per builder from %s to %s builders: kiln %.2f KB, buildbot %.2f KB, %.2fx\n' "$lo" "$hi" "$ks" "$bs" "$(echo "$bs / $ks" | bc -l)"
fi
