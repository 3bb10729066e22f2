#!/usr/bin/env python3
"""A stand-in for mozharness's scripts/desktop_unittest.py.

It takes the arguments the test builders' ScriptFactory passes, reads the
build's properties from $PROPERTIES_FILE as mozharness does, and prints a
test suite's lines as a run of it would, over $FX_STANDIN_TEST_SECONDS
(default 0). It tests nothing: it lets a staging fleet run the whole flow
from a push to builds to the tests that follow them on any machine.

A push whose comments say "orange" has a test fail (status 1, WARNINGS,
orange on a push page, as TBPL showed a test failure).

Exit status, as mozharness's: 0 success, 1 warnings, 2 failure.
"""

import argparse
import os
import sys
import time

# As mozharness's scripts do: the library is beside scripts/.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mozharness import read_buildprops  # noqa: E402

TESTS = [
    "dom/base/test/test_bug5141.html",
    "layout/base/tests/test_reftest_helper.html",
    "toolkit/content/tests/widgets/test_videocontrols.html",
    "netwerk/test/mochitests/test_xhr_redirect.html",
]


def main():
    parser = argparse.ArgumentParser(prog="desktop_unittest.py")
    parser.add_argument("--cfg", action="append", default=[], help="a mozharness config file")
    parser.add_argument("--test-suite", required=True)
    parser.add_argument("--branch", required=True)
    args = parser.parse_args()

    read = read_buildprops()
    if isinstance(read, str):
        print(read, flush=True)
        return 2
    props, ss = read
    print(f"desktop_unittest: {args.test_suite} on branch {args.branch}, config {' '.join(args.cfg)}")
    print(f"builder {props.get('buildername')} build {props.get('buildnumber')} on {props.get('workername')}")
    print(f"testing revision {ss.get('revision')} of {ss.get('repository')}")
    orange = any("orange" in str(c.get("comments", "")).lower() for c in ss.get("changes", []))
    try:
        seconds = float(os.environ.get("FX_STANDIN_TEST_SECONDS", "0"))
    except ValueError:
        seconds = 0
    pause = seconds / len(TESTS) if seconds > 0 else 0
    failed = 0
    for i, test in enumerate(TESTS):
        print(f"TEST-START | {test}", flush=True)
        if pause:
            time.sleep(pause)
        if orange and i == 1:
            print(f"TEST-UNEXPECTED-FAIL | {test} | an intermittent failure", flush=True)
            failed += 1
        else:
            print(f"TEST-PASS | {test} | took {200 + 37 * i}ms", flush=True)
    print(f"{args.test_suite}: {len(TESTS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
