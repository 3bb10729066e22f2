#!/usr/bin/env bash
# The read API, the grid and SSE fan-out with 10,000 builds stored: kiln
# (bench/api.py) beside Buildbot 4.3 (bench/api_buildbot.py) in one run.
# usage: bench/api.sh [BUILDS] [REQUESTS] [SSE_CLIENTS] [skip-buildbot]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
peer="$root/bench/buildbot"
work=$(mktemp -d /tmp/kiln-bench-api.XXXXXX)
trap 'rm -rf "$work"' EXIT
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
kiln="${KILN_BIN:-$root/target/release/kiln}"
python3 "$here/api.py" "$kiln" "$work" "${1:-10000}" "${2:-50}" "${3:-100}"
if [ "${4:-}" != skip-buildbot ]; then
  venv=$("$peer/setup.sh")
  python3 "$here/api_buildbot.py" "$venv" "$work" "${1:-10000}" "${2:-50}"
  # Buildbot's live events go over its WebSocket: the same fan-out there.
  "$venv/bin/python" -c "import websockets" 2>/dev/null || "$venv/bin/pip" install -q websockets
  "$venv/bin/python" "$here/sse_buildbot.py" "$work" "${3:-100}"
fi
