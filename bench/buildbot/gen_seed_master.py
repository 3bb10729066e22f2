#!/usr/bin/env python3
"""Write a Buildbot master.cfg in the seed's own idiom: B branches x 5 platforms.

usage: gen_seed_master.py OUTDIR BRANCHES [WORKERS_PER_POOL]

The shape bench/gen_seed_master.py writes for kiln, in the Python of
buildbot-configs and buildbotcustom (without their packages, which do not
run on Buildbot 4): platform dicts with `slaves` pools and mozharness
settings, a BRANCHES dict, and per branch a generateBranchObjects (one
HgPoller, one SingleBranchScheduler with a treeStableTimer, a builder per
platform with a ScriptFactory's six steps and its properties) merged with
buildbotcustom's mergeBuildObjects (a shallow copy whose lists are
extended). BRANCHES=0: the empty config.
"""
import os
import sys

out, B = sys.argv[1], int(sys.argv[2])
W = int(sys.argv[3]) if len(sys.argv) > 3 else 10

cfg = f'''
import copy, re
from buildbot.plugins import util, steps, schedulers, worker, changes
from buildbot.process.factory import BuildFactory
c = BuildmasterConfig = {{}}
c["protocols"] = {{"msgpack_experimental_v7": {{"port": 9990}}}}
c["db"] = {{"db_url": "sqlite:///state.sqlite"}}
c["buildbotNetUsageData"] = None
c["title"] = "seed-shape bench"
c["buildbotURL"] = "http://127.0.0.1:8010/"

def pool(prefix, n):
    return ["%s-%d" % (prefix, i) for i in range(1, n + 1)]

SLAVES = {{
    "linux": pool("bld-linux64-ec2", {W}),
    "linux64": pool("bld-linux64-ec2", {W}),
    "win32": pool("b-2008-ix", {W}),
    "win64": pool("b-2008-ix", {W}),
    "macosx64": pool("bld-lion-r5", {W}),
}}
names = sorted(set(n for p in SLAVES.values() for n in p))
c["workers"] = [worker.Worker(n, "pw", max_builds=1) for n in names]

REBOOT = ["scripts/external_tools/count_and_reboot.py", "-f", "../reboot_count.txt", "-n", "1", "-z"]
def platform_vars(pretty, config_file, python, reboot, slaves):
    return {{
        "product_name": "firefox", "stage_product": "firefox",
        "base_name": pretty + " {{branch}}",
        "mozharness_config": {{"script_name": "scripts/fx_desktop_build.py",
                               "extra_args": ["--config", config_file],
                               "mozharness_python": python, "reboot_command": reboot}},
        "slaves": slaves, "timeout": 3600, "maxTime": 4 * 3600,
    }}
PLATFORM_VARS = {{
    "linux": platform_vars("Linux", "builds/releng_base_linux_32_builds.py", "/tools/buildbot/bin/python", REBOOT, SLAVES["linux"]),
    "linux64": platform_vars("Linux x86-64", "builds/releng_base_linux_64_builds.py", "/tools/buildbot/bin/python", REBOOT, SLAVES["linux64"]),
    "win32": platform_vars("WINNT 5.2", "builds/releng_base_windows_32_builds.py", "c:/mozilla-build/python27/python", None, SLAVES["win32"]),
    "win64": platform_vars("WINNT 6.1 x86-64", "builds/releng_base_windows_64_builds.py", "c:/mozilla-build/python27/python", None, SLAVES["win64"]),
    "macosx64": platform_vars("OS X 10.7", "builds/releng_base_mac_64_builds.py", "/tools/buildbot/bin/python", REBOOT, SLAVES["macosx64"]),
}}

BRANCHES = {{}}
for b in range({B}):
    name = "project-%d" % b
    branch = {{"repo_path": "projects/" + name, "hgurl": "https://hg.mozilla.org/",
              "mozharness_repo_path": "build/mozharness", "mozharness_tag": "production",
              "enabled_products": ["firefox"], "staging": False, "pollInterval": 60,
              "platforms": {{}}}}
    for platform, pf in PLATFORM_VARS.items():
        pf = copy.deepcopy(pf)
        pf["base_name"] = pf["base_name"].replace("{{branch}}", name)
        branch["platforms"][platform] = pf
    BRANCHES[name] = branch

def normalize(name):
    for a, b in [("mozilla-", "m-"), ("project-", "p-"), ("linux64", "l64"), ("macosx64", "m64"), ("win32", "w32"), ("win64", "w64")]:
        name = name.replace(a, b)
    return name

def script_factory(pf, branch, config):
    mh = pf["mozharness_config"]
    f = BuildFactory()
    win = "win" in pf["base_name"].lower()
    f.addStep(steps.SetPropertyFromCommand(name="get_basedir", property="basedir", command=["cd"] if win else ["pwd"], workdir=".", haltOnFailure=True))
    f.addStep(steps.ShellCommand(name="clone_scripts", command=["hg", "clone", config["hgurl"] + config["mozharness_repo_path"], "scripts"], workdir=".", haltOnFailure=True))
    f.addStep(steps.JSONPropertiesDownload(name="download_props", workerdest="buildprops.json", workdir=".", haltOnFailure=True))
    f.addStep(steps.ShellCommand(name="run_script",
        command=[mh["mozharness_python"], "scripts/" + mh["script_name"]] + mh["extra_args"] + ["--branch", branch, "--build-pool", "production"],
        env={{"PROPERTIES_FILE": util.Interpolate("%(prop:basedir)s/buildprops.json")}},
        workdir=".", haltOnFailure=True, timeout=pf["timeout"], maxTime=pf["maxTime"]))
    f.addStep(steps.ShellCommand(name="cleanup", command=["rm", "-f", "buildprops.json"], workdir=".", alwaysRun=True, flunkOnFailure=False))
    if mh["reboot_command"]:
        f.addStep(steps.ShellCommand(name="reboot", command=mh["reboot_command"], workdir=".", alwaysRun=True, flunkOnFailure=False))
    return f

def generateBranchObjects(config, name):
    out = {{"builders": [], "change_source": [], "schedulers": [], "status": []}}
    out["change_source"].append(changes.HgPoller(repourl=config["hgurl"] + config["repo_path"], branches=["default"],
        pollInterval=config["pollInterval"], workdir="hgpoller-" + name))
    names = []
    for platform in sorted(config["platforms"]):
        pf = config["platforms"][platform]
        if pf["stage_product"] not in config["enabled_products"]:
            continue
        builddir = "%s-%s" % (name, platform)
        bname = pf["base_name"] + " build"
        names.append(bname)
        out["builders"].append(util.BuilderConfig(name=bname, workernames=pf["slaves"],
            builddir=builddir, workerbuilddir=normalize(builddir), tags=[name],
            factory=script_factory(pf, name, config),
            properties={{"branch": name, "platform": platform, "product": pf["product_name"],
                        "repo_path": config["repo_path"], "script_repo_revision": config["mozharness_tag"]}}))
    out["schedulers"].append(schedulers.SingleBranchScheduler(name=name + "-firefox",
        change_filter=util.ChangeFilter(branch="default", repository=config["hgurl"] + config["repo_path"]),
        treeStableTimer=3, builderNames=names))
    return out

def mergeBuildObjects(d1, d2):
    retval = d1.copy()
    for key in ["builders", "status", "schedulers", "change_source"]:
        retval.setdefault(key, []).extend(d2.get(key, []))
    return retval

buildObjects = {{}}
for name in sorted(BRANCHES):
    buildObjects = mergeBuildObjects(buildObjects, generateBranchObjects(BRANCHES[name], name))
c["builders"] = buildObjects.get("builders", [])
c["change_source"] = buildObjects.get("change_source", [])
c["schedulers"] = buildObjects.get("schedulers", [])
'''
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "master.cfg"), "w") as f:
    f.write(cfg)
