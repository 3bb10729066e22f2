#!/usr/bin/env bash
# Makes DIR a staging master dir that builds mozilla-central's Unix
# platforms from the repositories served at HGURL (see setup-repos.sh):
# the scripts are links to this checkout's examples/mozilla-staging (edit
# them there), the secrets are copies, and master_config.json says where
# the repositories are. Existing secrets are kept.
# usage: make-master.sh DIR HGURL [HTTP_PORT [WORKER_PORT]]
set -euo pipefail
example=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:?usage: make-master.sh DIR HGURL [HTTP_PORT [WORKER_PORT]]}
hgurl=${2:?usage: make-master.sh DIR HGURL [HTTP_PORT [WORKER_PORT]]}
http_port=${3:-8010}
worker_port=${4:-9989}
case "$hgurl" in */) ;; *) hgurl="$hgurl/" ;; esac

mkdir -p "$dir/secrets"
for f in "$example"/*.rhai; do
  name=$(basename "$f")
  target=$(readlink "$f" || true)
  case "$target" in
    "") cp "$f" "$dir/$name" ;;                       # a file of the master's own
    */*) ln -sfn "$(readlink -f "$f")" "$dir/$name" ;; # into the config repository
    *) ln -sfn "$target" "$dir/$name" ;;               # to a sibling: stays one
  esac
done
for f in "$example"/secrets/*; do
  [ -e "$dir/secrets/$(basename "$f")" ] || cp "$f" "$dir/secrets/"
done
cat > "$dir/master_config.json" <<JSON
{
    "name": "staging-build-master",
    "role": "build",
    "http_port": $http_port,
    "pb_port": $worker_port,
    "queuedir": "queue",
    "limit_fx_branches": ["mozilla-central"],
    "limit_fx_platforms": ["linux", "linux64", "macosx64"],
    "hgurl": "$hgurl",
    "mozharness_python": "python3"
}
JSON
echo "master dir $dir: workers bld-linux64-ec2-stage-001 (linux, linux64) and"
echo "bld-lion-r5-stage-001 (macosx64), password in $dir/secrets/worker-password"
