#!/usr/bin/env bash
# Makes the repositories a local staging master builds from, under DIR:
#   DIR/mozilla-central    a Mercurial repository to push to;
#   DIR/build/mozharness   the project's mozharness stand-in (./mozharness);
#   DIR/hgweb.conf         `hg serve --web-conf DIR/hgweb.conf` serves both.
# Existing repositories are left as they are.
# usage: setup-repos.sh DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: setup-repos.sh DIR}
mkdir -p "$dir/build"
dir=$(cd "$dir" && pwd)
export HGPLAIN=1 HGUSER="${HGUSER:-kiln staging <staging@localhost>}"

if [ ! -d "$dir/build/mozharness/.hg" ]; then
  hg init "$dir/build/mozharness"
  cp -R "$here/mozharness/." "$dir/build/mozharness/"
  (cd "$dir/build/mozharness" && hg commit -q -A -m "mozharness stand-in for a local staging master")
fi
if [ ! -d "$dir/mozilla-central/.hg" ]; then
  hg init "$dir/mozilla-central"
  echo "mozilla-central, a local staging copy" > "$dir/mozilla-central/README"
  (cd "$dir/mozilla-central" && hg commit -q -A -m "Initial commit")
fi
printf '[paths]\n/ = %s/**\n' "$dir" > "$dir/hgweb.conf"
echo "repositories in $dir; serve them with:"
echo "  hg serve -a 127.0.0.1 -p 8000 --web-conf $dir/hgweb.conf"
