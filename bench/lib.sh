# Helpers the benchmark scripts share; source it (`. "$here/lib.sh"`).

# median: the median of the numbers on stdin, one per line.
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# measure DIR CMD...: runs CMD in DIR $runs times (the caller sets runs);
# prints "wall_s peak_kb", the medians of the wall time and of the peak RSS.
measure() {
  local dir=$1; shift
  local walls=() peaks=()
  for _ in $(seq 1 "$runs"); do
    local t0 t1 peak
    t0=$(date +%s.%N)
    peak=$(cd "$dir" && /usr/bin/time -f "%M" "$@" 2>&1 >/dev/null | tail -1)
    t1=$(date +%s.%N)
    walls+=("$(echo "$t1 - $t0" | bc -l)"); peaks+=("$peak")
  done
  echo "$(printf '%s\n' "${walls[@]}" | median) $(printf '%s\n' "${peaks[@]}" | median)"
}

# wait_log FILE TEXT: waits up to 2 minutes for TEXT to appear in FILE;
# exits the script saying so when it does not.
wait_log() {
  for _ in $(seq 1 1200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "no '$2' in $1" >&2; exit 1
}
