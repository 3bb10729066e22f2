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
