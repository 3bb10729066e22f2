#!/usr/bin/env python3
"""Buildbot 4.3's side of the event fan-out in bench/api.py.

usage: sse_buildbot.py WORKDIR [CLIENTS]   (run with the Buildbot venv's
python, with the `websockets` package installed there)

Starts a Buildbot master (no builders' work, the base change hook on),
connects CLIENTS (default 100) WebSocket clients to its /ws that each
subscribe to `changes/*/*`, posts 50 changes to the base change hook 50 ms
apart, and measures each client's delay from the post to its copy of the
event (median, p95, max over every client and event), and the master's RSS.
"""
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import websockets

work = sys.argv[1]
clients = int(sys.argv[2]) if len(sys.argv) > 2 else 100
venv_bin = os.path.dirname(sys.executable)
bb = os.path.join(venv_bin, "buildbot")
d = os.path.join(work, "bbsse")
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
f.addStep(steps.ShellCommand(command=["true"]))
c["builders"] = [util.BuilderConfig(name="b", workernames=["w1"], factory=f)]
c["schedulers"] = [schedulers.ForceScheduler(name="force", builderNames=["b"])]
c["buildbotNetUsageData"] = None
c["www"] = {{"port": "tcp:{port}:interface=127.0.0.1", "change_hook_dialects": {{"base": True}}}}
c["db"] = {{"db_url": "sqlite:///state.sqlite"}}
''')
subprocess.run([bb, "start", "--start_timeout", "300", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
pid = int(open(os.path.join(d, "twistd.pid")).read())
url = f"http://127.0.0.1:{port}"
sent, delays = {}, []


async def client(ready):
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as ws:
        await ws.send(json.dumps({"cmd": "startConsuming", "path": "changes/*/*", "_id": 1}))
        while True:
            m = json.loads(await ws.recv())
            if m.get("_id") == 1:
                break
        ready.release()
        seen = 0
        while seen < 50:
            m = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if "k" in m and m["k"].endswith("/new"):
                key = m["m"].get("comments", "")
                if key in sent:
                    delays.append((time.perf_counter() - sent[key]) * 1000)
                    seen += 1


def post(k):
    key = f"sse-{k}"
    body = urllib.parse.urlencode({"author": "dev", "comments": key, "branch": "main", "revision": f"{k:040x}"}).encode()
    sent[key] = time.perf_counter()
    urllib.request.urlopen(url + "/change_hook/base", body).read()


async def main():
    ready = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(client(ready)) for _ in range(clients)]
    for _ in range(clients):
        await asyncio.wait_for(ready.acquire(), 60)
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    for k in range(50):
        await loop.run_in_executor(None, post, k)
        await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(*tasks), 120)


try:
    asyncio.run(main())
    rss = int(open(f"/proc/{pid}/status").read().split("VmRSS:")[1].split()[0]) / 1024
finally:
    subprocess.run([bb, "stop", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
delays.sort()
print(f"Buildbot 4.3 WebSocket: {clients} clients x 50 events, {len(delays)} deliveries: median {statistics.median(delays):.1f} ms, "
      f"p95 {delays[int(len(delays) * 0.95) - 1]:.1f} ms, max {delays[-1]:.1f} ms; master RSS {rss:.0f} MB")
