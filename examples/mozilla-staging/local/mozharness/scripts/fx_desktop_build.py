#!/usr/bin/env python3
"""A stand-in for mozharness's scripts/fx_desktop_build.py.

It takes the arguments ScriptFactory passes, reads the build's properties
from $PROPERTIES_FILE as mozharness does, says what a Firefox build of
that revision would do, prints compiler-like lines as a build would, and
exits with mozharness's status. It compiles nothing: it lets a staging
master run the whole flow from a push to finished builds on any machine.

A push whose comments say "bustage" fails to compile (status 2), so that
a push page shows failures too. $FX_STANDIN_BUILD_SECONDS (default 0)
spreads the compile lines over that many seconds, for a build that takes
a while as real ones do.

Exit status, as mozharness's: 0 success, 1 warnings, 2 failure,
3 exception, 4 retry.
"""

import argparse
import os
import sys
import time

# As mozharness's scripts do: the library is beside scripts/.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mozharness import read_buildprops  # noqa: E402

SOURCES = [
    "xpcom/base/nsCycleCollector.cpp",
    "js/src/vm/Interpreter.cpp",
    "dom/base/Document.cpp",
    "layout/generic/nsFrame.cpp",
    "gfx/layers/Compositor.cpp",
    "netwerk/protocol/http/nsHttpChannel.cpp",
    "browser/app/nsBrowserApp.cpp",
    "toolkit/xre/nsAppRunner.cpp",
]


def compile_tree(busted, seconds):
    """Prints what a build of the tree prints; False when it is busted."""
    pause = seconds / len(SOURCES) if seconds > 0 else 0
    for i, src in enumerate(SOURCES):
        print(f"{i + 1:>3}/{len(SOURCES)} /usr/bin/clang++ -O2 -std=gnu++17 -c {src}", flush=True)
        if pause:
            time.sleep(pause)
        if busted and src.startswith("dom/"):
            print(f"{src}:1234:5: error: use of undeclared identifier 'mBustage'", flush=True)
            print(f"make[4]: *** [{src[:-4]}.o] Error 1", flush=True)
            print("make[3]: *** [dom/base/target] Error 2", flush=True)
            return False
    print("linking dist/bin/libxul.so", flush=True)
    return True


def main():
    parser = argparse.ArgumentParser(prog="fx_desktop_build.py")
    parser.add_argument("--config", action="append", default=[], help="a mozharness config file")
    parser.add_argument("--branch", required=True)
    parser.add_argument("--build-pool", choices=["staging", "production"], required=True)
    args = parser.parse_args()

    read = read_buildprops()
    if isinstance(read, str):
        print(read, flush=True)
        return 2
    props, ss = read

    print(f"fx_desktop_build: branch {args.branch}, pool {args.build_pool}, config {' '.join(args.config)}")
    print(f"builder {props.get('buildername')} build {props.get('buildnumber')} on {props.get('workername')}")
    print(f"basedir {props.get('basedir')}")
    print(f"building revision {ss.get('revision')} of {ss.get('repository')}")
    changes = ss.get("changes", [])
    for change in changes:
        files = ", ".join(f["name"] for f in change.get("files", []))
        print(f"  change {str(change.get('revision'))[:12]} by {change.get('who')}: {change.get('comments')} ({files})")
    busted = any("bustage" in str(c.get("comments", "")).lower() for c in changes)
    try:
        seconds = float(os.environ.get("FX_STANDIN_BUILD_SECONDS", "0"))
    except ValueError:
        seconds = 0
    if not compile_tree(busted, seconds):
        print("fx_desktop_build: FAILED: the tree does not compile", flush=True)
        return 2
    print("fx_desktop_build: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
