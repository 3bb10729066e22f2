#!/usr/bin/env python3
"""A stand-in for mozharness's scripts/fx_desktop_build.py.

It takes the arguments ScriptFactory passes, reads the build's properties
from $PROPERTIES_FILE as mozharness does, says what a Firefox build of
that revision would do, and exits with mozharness's status for success.
It compiles nothing: it lets a staging master run the whole flow from a
push to finished builds on any machine.

Exit status, as mozharness's: 0 success, 1 warnings, 2 failure,
3 exception, 4 retry.
"""

import argparse
import json
import os
import sys


def main():
    parser = argparse.ArgumentParser(prog="fx_desktop_build.py")
    parser.add_argument("--config", action="append", default=[], help="a mozharness config file")
    parser.add_argument("--branch", required=True)
    parser.add_argument("--build-pool", choices=["staging", "production"], required=True)
    args = parser.parse_args()

    props_file = os.environ.get("PROPERTIES_FILE")
    if not props_file:
        print("ERROR: PROPERTIES_FILE is not set; run me from a build master", flush=True)
        return 2
    try:
        with open(props_file) as f:
            buildprops = json.load(f)
    except (OSError, ValueError) as e:
        print(f"ERROR: cannot read the build properties from {props_file}: {e}", flush=True)
        return 2
    props = buildprops.get("properties", {})
    ss = buildprops.get("sourcestamp", {})

    print(f"fx_desktop_build: branch {args.branch}, pool {args.build_pool}, config {' '.join(args.config)}")
    print(f"builder {props.get('buildername')} build {props.get('buildnumber')} on {props.get('workername')}")
    print(f"basedir {props.get('basedir')}")
    print(f"building revision {ss.get('revision')} of {ss.get('repository')}")
    for change in ss.get("changes", []):
        files = ", ".join(f["name"] for f in change.get("files", []))
        print(f"  change {str(change.get('revision'))[:12]} by {change.get('who')}: {change.get('comments')} ({files})")
    print("fx_desktop_build: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
