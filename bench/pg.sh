# A throwaway PostgreSQL server for the benchmarks (sourced, not run):
# Debian's postgresql binaries, a cluster in $work/pg, 127.0.0.1:$pgport,
# its socket in $work/pg. pg_start sets PG_URL (user kiln, password kiln);
# pg_stop stops it. initdb refuses root, so as root the server commands run
# as the postgres user.
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$pg_bin/initdb" ] || { echo "install Debian's postgresql (bash .ci/test does)" >&2; exit 1; }
pg_as() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_start() {
  pgport=$1
  mkdir -p "$work/pg"
  chmod 755 "$work"   # the postgres user must reach its dir
  echo kiln > "$work/pg/pw"
  [ "$(id -u)" = 0 ] && chown -R postgres "$work/pg"
  pg_as "$pg_bin/initdb" -D "$work/pg/data" -U kiln --pwfile="$work/pg/pw" \
    --auth-local=trust --auth-host=scram-sha-256 --no-locale -E UTF8 >/dev/null
  pg_as "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w \
    -o "-h 127.0.0.1 -p $pgport -k $work/pg -c max_connections=300 -c synchronous_commit=${PG_SYNC:-on}" start >/dev/null
  "$pg_bin/psql" -h "$work/pg" -p "$pgport" -U kiln -d postgres -q -c "CREATE DATABASE kiln" >/dev/null
  PG_URL="postgresql://kiln:kiln@127.0.0.1:$pgport/kiln"
}
pg_qd() { "$pg_bin/psql" -h "$work/pg" -p "$pgport" -U kiln -d "$1" -X -A -t -c "$2"; }
pg_q() { pg_qd kiln "$1"; }
pg_stop() { [ -d "$work/pg/data" ] && pg_as "$pg_bin/pg_ctl" -D "$work/pg/data" -m fast -w stop >/dev/null 2>&1 || true; }
