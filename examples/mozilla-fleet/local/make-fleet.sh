#!/usr/bin/env bash
# Makes DIR a fleet of four staging masters on one PostgreSQL database, as
# Mozilla ran build masters with roles (each master dir's
# master_config.json says its role):
#   DIR/scheduler    polls mozilla-central at HGURL and schedules its builds;
#   DIR/build-linux  builds linux and linux64 (bld-linux64-ec2-stage-*);
#   DIR/build-mac    builds macosx64 (bld-lion-r5-stage-*);
#   DIR/tests        runs the unit tests that follow a good push's builds
#                    (tst-linux64-ec2-stage-*, t-yosemite-r7-stage-*).
# Each is a master dir of examples/mozilla-staging (its scripts are links to
# this checkout's, made by that example's local/make-master.sh, with its
# secrets). The database's password, if it has one, goes in
# DB_PASSWORD (it is written to each master's secrets/db-password) or in
# DB_URL itself.
# Ports: the masters' web pages on BASEPORT..BASEPORT+3, their worker ports
# on BASEPORT+1979..; BASEPORT 0 lets each master pick free ports.
# usage: make-fleet.sh DIR HGURL DB_URL [BASEPORT]
set -euo pipefail
usage="usage: make-fleet.sh DIR HGURL DB_URL [BASEPORT]"
here=$(cd "$(dirname "$0")" && pwd)
staging=$(cd "$here/../../mozilla-staging/local" && pwd)
dir=${1:?$usage}
hgurl=${2:?$usage}
db_url=${3:?$usage}
base=${4:-8010}
case "$hgurl" in */) ;; *) hgurl="$hgurl/" ;; esac
case "$db_url" in
  postgresql://* | postgres://*) ;;
  *) echo "make-fleet.sh: DB_URL must be a postgresql:// URL: several masters share one PostgreSQL database" >&2; exit 2 ;;
esac

# role name platforms
masters=(
  'scheduler scheduler "linux", "linux64", "macosx64"'
  'build build-linux "linux", "linux64"'
  'build build-mac "macosx64"'
  'tests tests "linux64", "macosx64"'
)
i=0
for m in "${masters[@]}"; do
  read -r role name platforms <<<"$m"
  master="$dir/$name"
  bash "$staging/make-master.sh" "$master" "$hgurl" 0 0 >/dev/null
  if [ "$base" = 0 ]; then http=0; pb=0; else http=$((base + i)); pb=$((base + 1979 + i)); fi
  password=""
  if [ -n "${DB_PASSWORD:-}" ]; then
    (umask 077 && printf '%s' "$DB_PASSWORD" > "$master/secrets/db-password")
    password='
    "db_password_secret": "db-password",'
  fi
  cat > "$master/master_config.json" <<JSON
{
    "name": "fleet-$name",
    "role": "$role",
    "multi_master": true,
    "db_url": "$db_url",$password
    "http_port": $http,
    "pb_port": $pb,
    "queuedir": "queue",
    "limit_fx_branches": ["mozilla-central"],
    "limit_fx_platforms": [$platforms],
    "hgurl": "$hgurl",
    "mozharness_python": "python3"
}
JSON
  i=$((i + 1))
done
echo "fleet in $dir: masters scheduler, build-linux, build-mac and tests on one database;"
echo "worker password in $dir/scheduler/secrets/worker-password"
