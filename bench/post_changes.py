#!/usr/bin/env python3
"""Post N changes to a master's base change hook, one after another on one
keep-alive connection, as burst.py (bench/buildbot) shapes them.
usage: post_changes.py PORT N [BRANCH_OFFSET]
Prints: seconds in all, milliseconds per change, changes per second."""
import http.client
import json
import sys
import time
import urllib.parse

port, n = int(sys.argv[1]), int(sys.argv[2])
off = int(sys.argv[3]) if len(sys.argv) > 3 else 0
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
t0 = time.time()
for i in range(n):
    body = urllib.parse.urlencode({
        "branch": "projects/branch-%04d" % ((off + i) % 200), "revision": "%040x" % (off + i + 1),
        "author": "dev <dev@example.com>", "comments": "push %d" % i, "files": json.dumps(["a.c"]),
        "repository": "r", "project": "p"})
    conn.request("POST", "/change_hook/base", body, {"Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        sys.exit("change %d: HTTP %d" % (i, r.status))
t = time.time() - t0
print("%.3f %.2f %.1f" % (t, 1000 * t / n, n / t))
