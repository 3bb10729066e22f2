#!/usr/bin/env python3
"""Write a Mozilla-style kiln master.rhai: B branches x P platforms.

usage: gen_master.py OUTDIR BRANCHES PLATFORMS WORKERS [PORT] [WWWPORT]

The same shape as buildbot/gen_master.py (beside this file) writes for
Buildbot, so that `kiln checkconfig` and `buildbot checkconfig` are timed on
equal work: each branch one Scheduler over its builders, each (branch,
platform) one builder with five steps shaped like the seed's ScriptFactory,
and one ForceScheduler over every builder. The loops run in Rhai, as the
Python ones run in Buildbot's master.cfg.
"""
import os
import sys

out, B, P, W = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
port = int(sys.argv[5]) if len(sys.argv) > 5 else 9990
wwwport = int(sys.argv[6]) if len(sys.argv) > 6 else 0
www = f'www: #{{ port: {wwwport} }},' if wwwport else ''
platforms = ["linux", "linux64", "win32", "win64", "macosx64", "android", "android-x86", "linux64-asan"][:P]
while len(platforms) < P:
    platforms.append("plat%d" % len(platforms))
plist = ", ".join('"%s"' % p for p in platforms)

cfg = f'''
let c = #{{
    title: "bench",
    buildbotURL: "http://127.0.0.1:8010/",
    db: #{{ db_url: "sqlite:///state.sqlite" }},
    protocols: #{{ msgpack_experimental_v7: #{{ port: {port} }} }},
    {www}
    workers: [],
    builders: [],
    schedulers: [],
}};
let workernames = [];
for i in 0..{W} {{
    c.workers.push(Worker(`w${{i}}`, "pw"));
    workernames.push(`w${{i}}`);
}}

let PLATFORMS = [{plist}];
let BRANCHES = #{{}};
for b in 0..{B} {{
    let n = `${{b}}`;
    while n.len() < 4 {{ n = "0" + n; }}
    let name = `branch-${{n}}`;
    let platforms = #{{}};
    for p in PLATFORMS {{
        platforms[p] = #{{
            base_name: `${{p}} ${{name}}`,
            stage_product: "firefox",
            mozharness_config: #{{ script_name: "scripts/fx_desktop_build.py", extra_args: ["--config", `builds/${{p}}.py`] }},
        }};
    }}
    BRANCHES[name] = #{{ repo_path: "projects/" + name, platforms: platforms, enabled_products: ["firefox"] }};
}}

fn make_factory(pf, branch) {{
    let f = BuildFactory();
    f.addStep(SetProperty(#{{ name: "get_basedir", property: "basedir", command: ["pwd"], haltOnFailure: true }}));
    f.addStep(ShellCommand(#{{ name: "clone_scripts", command: ["true"], haltOnFailure: true }}));
    f.addStep(ShellCommand(#{{ name: "run_script",
        command: ["echo", pf.mozharness_config.script_name] + pf.mozharness_config.extra_args + ["--branch", branch],
        haltOnFailure: true, timeout: 3600, maxTime: 4 * 3600 }}));
    f.addStep(ShellCommand(#{{ name: "cleanup", command: ["true"], alwaysRun: true }}));
    f.addStep(ShellCommand(#{{ name: "reboot", command: ["true"], alwaysRun: true, flunkOnFailure: false }}));
    f
}}

let all_names = [];
let branch_names = BRANCHES.keys();
branch_names.sort();
for branch in branch_names {{
    let config = BRANCHES[branch];
    let names = [];
    let pnames = config.platforms.keys();
    pnames.sort();
    for platform in pnames {{
        let pf = config.platforms[platform];
        if !config.enabled_products.contains(pf.stage_product) {{ continue; }}
        let bname = `${{pf.base_name}} build`;
        names.push(bname);
        all_names.push(bname);
        c.builders.push(BuilderConfig(#{{ name: bname, workernames: workernames,
            factory: make_factory(pf, branch), builddir: `${{branch}}-${{platform}}` }}));
    }}
    c.schedulers.push(Scheduler(#{{ name: branch + "-firefox", branch: config.repo_path,
        treeStableTimer: (), builderNames: names }}));
}}
c.schedulers.push(ForceScheduler(#{{ name: "force", builderNames: all_names }}));

c
'''
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "master.rhai"), "w") as f:
    f.write(cfg)
