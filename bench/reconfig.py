#!/usr/bin/env python3
"""Hot reconfig figures for one running kiln master.

usage: reconfig.py KILN WORKDIR BRANCHES RUNS

Starts `kiln start` on a gen_master.py config of BRANCHES x 5 platforms
(no workers connect, no change sources: an idle master), then:

- idle CPU: the master's user+system CPU over 10 s with the file watcher on;
- RUNS times, a save that adds one branch (5 builders), alternately removing
  it again: the latency from the save to the master logging the new config
  applied (the watcher's 300 ms quiet period included, and also with the
  quiet period at 20 ms), and the reload's own time as stored;
- `kiln reconfig` wall time for the same change (the command line path).

Prints one line of medians.
"""
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

kiln, work, B, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
here = os.path.dirname(os.path.abspath(__file__))
d = os.path.join(work, f"r{B}")


def gen(branches):
    subprocess.run([sys.executable, os.path.join(here, "gen_master.py"), d, str(branches), "5", "10", "0"], check=True)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


APPLIED = re.compile(r"^(\S+) +INFO config reloaded in ([0-9.]+) ms \(scripts ([0-9.]+) ms\)")


def applied_lines(log):
    out = []
    with open(log) as f:
        for line in f:
            m = APPLIED.match(line)
            if m:
                ts = datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
                out.append((ts.timestamp(), float(m.group(2)), float(m.group(3))))
    return out


def wait_applied(log, n, limit=120):
    deadline = time.time() + limit
    while time.time() < deadline:
        lines = applied_lines(log)
        if len(lines) >= n:
            return lines[n - 1]
        time.sleep(0.005)
    sys.exit(f"no reload applied within {limit} s; see {log}")


def run_master(*args):
    gen(B)
    for f in ("state.sqlite", "state.sqlite-wal", "state.sqlite-shm", "kiln.log"):
        try:
            os.remove(os.path.join(d, f))
        except FileNotFoundError:
            pass
    log = os.path.join(d, "kiln.log")
    p = subprocess.Popen([kiln, "start", ".", *args], cwd=d,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "NO_COLOR": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(log) and "master running" in open(log).read():
            break
        time.sleep(0.05)
    else:
        p.kill()
        sys.exit("the master did not start")
    return p, log


scripts = []


def saves(p, log, n):
    """Latency save -> applied, and the stored reload time, per save."""
    lat, own = [], []
    for i in range(n):
        gen(B + 1 if i % 2 == 0 else B)
        t0 = time.time()
        # gen_master.py has written and closed the file: the save time is
        # when it returned.
        ts, ms, load = wait_applied(log, i + 1)
        lat.append((ts - t0) * 1000)
        own.append(ms)
        scripts.append(load)
        time.sleep(0.5)
    return lat, own


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()


# The default quiet period, and idle CPU with the watcher on.
p, log = run_master()
time.sleep(2)
c0 = cpu_seconds(p.pid)
time.sleep(10)
idle = (cpu_seconds(p.pid) - c0) / 10 * 100
lat300, own = saves(p, log, runs)
rss = int(open(f"/proc/{p.pid}/status").read().split("VmRSS:")[1].split()[0]) / 1024
stop(p)

p, log = run_master("--reload-quiet-ms", "20")
lat20, own20 = saves(p, log, runs)
stop(p)

# The command line path, on a master that does not watch.
p, log = run_master("--no-watch")
cli = []
for i in range(runs):
    gen(B + 1 if i % 2 == 0 else B)
    t0 = time.time()
    subprocess.run([kiln, "reconfig", "--wait", "120", "."], cwd=d, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cli.append((time.time() - t0) * 1000)
    wait_applied(log, i + 1)
stop(p)

med = statistics.median
print(f"builders={B * 5} save_to_applied_ms(quiet 300)={med(lat300):.0f} "
      f"save_to_applied_ms(quiet 20)={med(lat20):.0f} reload_ms={med(own + own20):.1f} "
      f"of_which_scripts_ms={med(scripts):.1f} "
      f"kiln_reconfig_cli_ms={med(cli):.0f} idle_cpu_pct={idle:.2f} rss_mb={rss:.1f}")
