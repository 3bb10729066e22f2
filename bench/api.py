#!/usr/bin/env python3
"""Read API latency with many builds in the store.

usage: api.py KILN WORKDIR [BUILDS] [REQUESTS] [SSE_CLIENTS]

Makes a master (2 builders, no change sources, no workers), lets kiln
create its store, fills it with BUILDS finished builds (each with its
buildset, request and two steps; every two buildsets are one push of a
revision with its change) through SQLite, starts the master and times
REQUESTS GETs of each URL below, one after another, printing the median
and 95th percentile per URL and the master's RSS.

Then SSE fan-out: SSE_CLIENTS (default 100) clients follow
/api/v2/events; 50 changes are posted to the base change hook, 50 ms
apart, and each client's delay from the post to its copy of the event is
measured (median, p95, max over every client and event).
"""
import socket
import threading
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request

kiln, work = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 10000
reqs = int(sys.argv[4]) if len(sys.argv) > 4 else 50
clients = int(sys.argv[5]) if len(sys.argv) > 5 else 100
d = os.path.join(work, "api")
os.makedirs(d, exist_ok=True)
with open(os.path.join(d, "master.rhai"), "w") as f:
    f.write('''
let s = BuildFactory();
s.addStep(ShellCommand(#{ name: "compile", command: ["true"] }));
s.addStep(ShellCommand(#{ name: "test", command: ["true"] }));
#{
    www: #{ port: 0, change_hook_dialects: #{ base: true } },
    workers: [Worker("w1", "pw")],
    schedulers: [ForceScheduler(#{ name: "force", builderNames: ["linux", "win"] })],
    builders: [BuilderConfig(#{ name: "linux", workernames: ["w1"], factory: s }),
               BuilderConfig(#{ name: "win", workernames: ["w1"], factory: s })],
}
''')


def start():
    log = os.path.join(d, "kiln.log")
    if os.path.exists(log):
        os.remove(log)
    p = subprocess.Popen([kiln, "start", ".", "--no-watch"], cwd=d, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    for _ in range(600):
        if os.path.exists(log) and "master running" in open(log).read():
            break
        time.sleep(0.05)
    text = open(log).read()
    url = text.split("HTTP listening on ")[1].split()[0].rstrip("/")
    return p, url


def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(60)


p, _ = start()
stop(p)
db = sqlite3.connect(os.path.join(d, "state.sqlite"))
now = int(time.time())
c = db.cursor()
c.execute("INSERT OR IGNORE INTO builders (name) VALUES ('linux'), ('win')")
builders = [r[0] for r in c.execute("SELECT id FROM builders ORDER BY id")]
master = c.execute("SELECT id FROM masters LIMIT 1").fetchone()[0]
c.execute("INSERT OR IGNORE INTO workers (name) VALUES ('w1')")
worker = c.execute("SELECT id FROM workers WHERE name = 'w1'").fetchone()[0]
for i in range(n):
    b = builders[i % 2]
    t = now - (n - i) * 60
    c.execute("INSERT INTO buildsets (reason, scheduler, submitted_at, complete, complete_at, results) VALUES ('bench', 'force', ?, 1, ?, 0)", (t, t + 30))
    bs = c.lastrowid
    if i % 2 == 0:
        rev = f"{i:040x}"
        c.execute("INSERT INTO sourcestamps (branch, revision, repository, created_at) VALUES ('main', ?, 'repo', ?)", (rev, t))
        ss = c.lastrowid
        c.execute("INSERT INTO changes (author, comments, branch, revision, when_timestamp, repository, sourcestampid) VALUES ('dev <dev@example.org>', ?, 'main', ?, ?, 'repo', ?)", (f"Bug {i} - change {i}", rev, t, ss))
        ch = c.lastrowid
    c.execute("INSERT INTO buildset_sourcestamps (buildsetid, sourcestampid) VALUES (?, ?)", (bs, ss))
    c.execute("INSERT INTO buildset_changes (buildsetid, changeid) VALUES (?, ?)", (bs, ch))
    c.execute("INSERT INTO buildrequests (buildsetid, builderid, complete, results, submitted_at, complete_at) VALUES (?, ?, 1, ?, ?, ?)", (bs, b, i % 3 == 0 and 2 or 0, t, t + 30))
    br = c.lastrowid
    c.execute("INSERT INTO builds (number, builderid, buildrequestid, workerid, masterid, started_at, complete_at, state_string, results) VALUES (?, ?, ?, ?, ?, ?, ?, 'done', ?)",
              (i // 2 + 1, b, br, worker, master, t + 1, t + 30, i % 3 == 0 and 2 or 0))
    bid = c.lastrowid
    for k, name in enumerate(["compile", "test"]):
        c.execute("INSERT INTO steps (number, name, buildid, started_at, complete_at, state_string, results) VALUES (?, ?, ?, ?, ?, 'done', 0)", (k, name, bid, t + 1, t + 30))
db.commit()
db.close()

p, url = start()
urls = [
    "/api/v2/builds?limit=100",
    "/api/v2/builds?order=-buildid&limit=100",
    "/api/v2/builders/linux/builds?results=2&order=-number&limit=100",
    "/api/v2/builds/5000/steps",
    "/api/v2/grid?buildsets=60",
    "/",
]
out = []
for u in urls:
    times = []
    for _ in range(reqs):
        t0 = time.perf_counter()
        body = urllib.request.urlopen(url + u).read()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    try:
        got = json.loads(body)
        items = [len(v) for k, v in got.items() if isinstance(v, list)]
        what = f"{items[0]} items" if items else "?"
    except ValueError:
        what = f"{len(body)} bytes"
    out.append(f"{u}: median {statistics.median(times):.1f} ms, p95 {times[int(len(times) * 0.95) - 1]:.1f} ms ({what})")
rss = int(open(f"/proc/{p.pid}/status").read().split("VmRSS:")[1].split()[0]) / 1024

# SSE fan-out.
host, port = url.split("://")[1].split(":")
port = int(port)
delays, lock, ready = [], threading.Lock(), threading.Barrier(clients + 1)
sent = {}


def follow():
    s = socket.create_connection((host, port))
    s.sendall(b"GET /api/v2/events?topics=changes HTTP/1.1\r\nHost: x\r\n\r\n")
    f = s.makefile("rb")
    while f.readline() not in (b"\r\n", b""):
        pass
    ready.wait()
    seen = 0
    while seen < 50:
        line = f.readline()
        if not line:
            break
        if line.startswith(b"data:") and b'"comments"' in line:
            t = time.perf_counter()
            key = line.split(b'"comments":"')[1].split(b'"')[0].decode()
            with lock:
                delays.append((t - sent[key]) * 1000)
            seen += 1
    s.close()


threads = [threading.Thread(target=follow, daemon=True) for _ in range(clients)]
for t in threads:
    t.start()
ready.wait()
time.sleep(0.5)
import urllib.parse
for k in range(50):
    key = f"sse-{k}"
    body = urllib.parse.urlencode({"author": "dev", "comments": key, "branch": "main", "revision": f"{k:040x}"}).encode()
    sent[key] = time.perf_counter()
    urllib.request.urlopen(url + "/change_hook/base", body).read()
    time.sleep(0.05)
for t in threads:
    t.join(30)
rss_sse = int(open(f"/proc/{p.pid}/status").read().split("VmRSS:")[1].split()[0]) / 1024
stop(p)
print(f"{n} builds in the store; {reqs} requests each; master RSS {rss:.0f} MB")
for line in out:
    print("  " + line)
delays.sort()
print(f"SSE: {clients} clients x 50 events, {len(delays)} deliveries: median {statistics.median(delays):.1f} ms, "
      f"p95 {delays[int(len(delays) * 0.95) - 1]:.1f} ms, max {delays[-1]:.1f} ms; master RSS {rss_sse:.0f} MB")
