#!/usr/bin/env python3
"""Buildbot 4.3's side of bench/api.py: the same 10,000 builds in
Buildbot's own schema, the same read API requests.

usage: api_buildbot.py BUILDBOT_VENV WORKDIR [BUILDS] [REQUESTS]

Creates a Buildbot master (2 builders, a worker that never connects, a
ForceScheduler, www on a free port), starts it once so that it records
its builders and worker, fills its SQLite store through SQL with BUILDS
finished builds shaped as bench/api.py makes them (each with its
buildset, sourcestamp, request and two steps), starts it again and times
REQUESTS GETs of each URL, printing the median and 95th percentile and
the master's RSS.
"""
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request

venv, work = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 10000
reqs = int(sys.argv[4]) if len(sys.argv) > 4 else 50
d = os.path.join(work, "bbapi")
bb = os.path.join(venv, "bin", "buildbot")
subprocess.run([bb, "create-master", "-r", d], check=True, stdout=subprocess.DEVNULL)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
with open(os.path.join(d, "master.cfg"), "w") as f:
    f.write(f'''
from buildbot.plugins import *
c = BuildmasterConfig = {{}}
c["workers"] = [worker.Worker("w1", "pw")]
c["protocols"] = {{"pb": {{"port": "tcp:0:interface=127.0.0.1"}}}}
f = util.BuildFactory()
f.addStep(steps.ShellCommand(name="compile", command=["true"]))
f.addStep(steps.ShellCommand(name="test", command=["true"]))
c["builders"] = [util.BuilderConfig(name="linux", workernames=["w1"], factory=f),
                 util.BuilderConfig(name="win", workernames=["w1"], factory=f)]
c["schedulers"] = [schedulers.ForceScheduler(name="force", builderNames=["linux", "win"])]
c["www"] = {{"port": "tcp:{port}:interface=127.0.0.1"}}
c["db"] = {{"db_url": "sqlite:///state.sqlite"}}
c["buildbotNetUsageData"] = None
''')


def start():
    subprocess.run([bb, "start", "--start_timeout", "300", d], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    for _ in range(1500):
        log = os.path.join(d, "twistd.log")
        if os.path.exists(log) and "BuildMaster is running" in open(log).read():
            return int(open(os.path.join(d, "twistd.pid")).read())
        time.sleep(0.2)
    raise SystemExit("Buildbot did not start")


def stop():
    subprocess.run([bb, "stop", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


start()
stop()
db = sqlite3.connect(os.path.join(d, "state.sqlite"))
c = db.cursor()
builders = [r[0] for r in c.execute("SELECT id FROM builders ORDER BY id")]
master = c.execute("SELECT id FROM masters LIMIT 1").fetchone()[0]
worker = c.execute("SELECT id FROM workers WHERE name = 'w1'").fetchone()[0]
now = int(time.time())
for i in range(n):
    b = builders[i % 2]
    t = now - (n - i) * 60
    c.execute("INSERT INTO buildsets (reason, submitted_at, complete, complete_at, results) VALUES ('bench', ?, 1, ?, 0)", (t, t + 30))
    bs = c.lastrowid
    if i % 2 == 0:
        rev = f"{i:040x}"
        c.execute("INSERT INTO sourcestamps (ss_hash, branch, revision, repository, codebase, project, created_at) VALUES (?, 'main', ?, 'repo', '', '', ?)", (rev, rev, t))
        ss = c.lastrowid
    c.execute("INSERT INTO buildset_sourcestamps (buildsetid, sourcestampid) VALUES (?, ?)", (bs, ss))
    res = i % 3 == 0 and 2 or 0
    c.execute("INSERT INTO buildrequests (buildsetid, builderid, complete, results, submitted_at, complete_at) VALUES (?, ?, 1, ?, ?, ?)", (bs, b, res, t, t + 30))
    br = c.lastrowid
    c.execute("INSERT INTO buildrequest_claims (brid, masterid, claimed_at) VALUES (?, ?, ?)", (br, master, t))
    c.execute("INSERT INTO builds (number, builderid, buildrequestid, workerid, masterid, started_at, complete_at, locks_duration_s, state_string, results) VALUES (?, ?, ?, ?, ?, ?, ?, 0, 'done', ?)",
              (i // 2 + 1, b, br, worker, master, t + 1, t + 30, res))
    bid = c.lastrowid
    for k, name in enumerate(["compile", "test"]):
        c.execute("INSERT INTO steps (number, name, buildid, started_at, complete_at, state_string, results, urls_json) VALUES (?, ?, ?, ?, ?, 'done', 0, '[]')", (k, name, bid, t + 1, t + 30))
db.commit()
db.close()

pid = start()
url = f"http://127.0.0.1:{port}"
urls = [
    "/api/v2/builds?limit=100",
    "/api/v2/builds?order=-buildid&limit=100",
    f"/api/v2/builders/{builders[0]}/builds?results=2&order=-number&limit=100",
    "/api/v2/builds/5000/steps",
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
rss = int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0]) / 1024
stop()
print(f"Buildbot 4.3: {n} builds in the store; {reqs} requests each; master RSS {rss:.0f} MB")
for line in out:
    print("  " + line)
