#!/usr/bin/env python3
"""A stand-in for mozharness's external_tools/count_and_reboot.py.

Counts builds in a file and, once there have been --max-count of them,
announces a reboot the way the real script does ("SCHEDULED REBOOT"),
which makes the master's DisconnectStep drop the worker. Unlike the real
script it does not reboot this machine: the worker reconnects as it
would after a reboot.
"""

import argparse
import sys


def main():
    parser = argparse.ArgumentParser(prog="count_and_reboot.py")
    parser.add_argument("-f", "--count-file", required=True)
    parser.add_argument("-n", "--max-count", type=int, required=True)
    parser.add_argument("-z", "--zero-count", action="store_true",
                        help="reset the count when rebooting")
    args = parser.parse_args()

    try:
        with open(args.count_file) as f:
            count = int(f.read().strip() or 0)
    except (OSError, ValueError):
        count = 0
    count += 1
    if count >= args.max_count:
        print(f"{count} build(s) since the last reboot, the most allowed is {args.max_count}")
        print("=" * 20 + " SCHEDULED REBOOT " + "=" * 20, flush=True)
        if args.zero_count:
            count = 0
    else:
        print(f"{count} build(s) since the last reboot; no reboot yet")
    with open(args.count_file, "w") as f:
        f.write(f"{count}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
