#!/usr/bin/env python3
"""Read API latency with many builds in the store.

usage: api.py KILN WORKDIR [BUILDS] [REQUESTS]

Makes a master (2 builders, no change sources, no workers), lets kiln
create its store, fills it with BUILDS finished builds (each with its
buildset, request and two steps) through SQLite, starts the master and
times REQUESTS GETs of each URL below, one after another, printing the
median and 95th percentile per URL and the master's RSS.
"""
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
d = os.path.join(work, "api")
os.makedirs(d, exist_ok=True)
with open(os.path.join(d, "master.rhai"), "w") as f:
    f.write('''
let s = BuildFactory();
s.addStep(ShellCommand(#{ name: "compile", command: ["true"] }));
s.addStep(ShellCommand(#{ name: "test", command: ["true"] }));
#{
    www: #{ port: 0 },
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
]
out = []
for u in urls:
    times = []
    for _ in range(reqs):
        t0 = time.perf_counter()
        urllib.request.urlopen(url + u).read()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    out.append(f"{u}: median {statistics.median(times):.1f} ms, p95 {times[int(len(times) * 0.95) - 1]:.1f} ms")
rss = int(open(f"/proc/{p.pid}/status").read().split("VmRSS:")[1].split()[0]) / 1024
stop(p)
print(f"{n} builds in the store; {reqs} requests each; master RSS {rss:.0f} MB")
for line in out:
    print("  " + line)
