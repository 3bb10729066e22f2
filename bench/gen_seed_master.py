#!/usr/bin/env python3
"""Write a kiln master.rhai in the seed's own idiom: B branches x 5 platforms.

usage: gen_seed_master.py OUTDIR BRANCHES [WORKERS_PER_POOL]

As buildbot-configs' master config reads (see examples/mozilla-staging):
platform maps with their worker pools under the legacy key `slaves` and
mozharness settings, a BRANCHES map built from per-branch overrides, then
for each branch `generateBranchObjects(config, name, secrets)` and
`buildObjects = mergeBuildObjects(buildObjects, branchObjects)` by value.
Each branch makes one HgPoller, one Scheduler and a builder per platform
(a ScriptFactory of six steps). BRANCHES=0 writes the same master with no
branch: the empty config the per-builder memory is measured above.
bench/buildbot/gen_seed_master.py writes the same shape for Buildbot.
"""
import os
import sys

out, B = sys.argv[1], int(sys.argv[2])
W = int(sys.argv[3]) if len(sys.argv) > 3 else 10

cfg = f'''
let c = #{{
    title: "seed-shape bench",
    buildbotURL: "http://127.0.0.1:8010/",
    db: #{{ db_url: "sqlite:///state.sqlite" }},
    protocols: #{{ msgpack_experimental_v7: #{{ port: 9990 }} }},
    workers: [],
    builders: [],
    schedulers: [],
    change_source: [],
    status: [],
}};

fn pool(prefix, n) {{
    let out = [];
    for i in 1..=n {{ out.push(`${{prefix}}-${{i}}`); }}
    out
}}

let SLAVES = #{{
    linux: pool("bld-linux64-ec2", {W}),
    linux64: pool("bld-linux64-ec2", {W}),
    win32: pool("b-2008-ix", {W}),
    win64: pool("b-2008-ix", {W}),
    macosx64: pool("bld-lion-r5", {W}),
}};
let seen = #{{}};
for platform in SLAVES.keys() {{
    for name in SLAVES[platform] {{
        if !(name in seen) {{
            seen[name] = true;
            c.workers.push(Worker(name, "pw", #{{ max_builds: 1 }}));
        }}
    }}
}}

const REBOOT = ["scripts/external_tools/count_and_reboot.py", "-f", "../reboot_count.txt", "-n", "1", "-z"];
fn platform_vars(pretty, config_file, python, reboot, slaves) {{
    #{{
        product_name: "firefox",
        stage_product: "firefox",
        base_name: `${{pretty}} {{branch}}`,
        mozharness_config: #{{
            script_name: "scripts/fx_desktop_build.py",
            extra_args: ["--config", config_file],
            mozharness_python: python,
            reboot_command: reboot,
        }},
        slaves: slaves,
        timeout: 3600,
        maxTime: 4 * 3600,
    }}
}}
let PLATFORM_VARS = #{{
    linux: platform_vars("Linux", "builds/releng_base_linux_32_builds.py", "/tools/buildbot/bin/python", REBOOT, SLAVES.linux),
    linux64: platform_vars("Linux x86-64", "builds/releng_base_linux_64_builds.py", "/tools/buildbot/bin/python", REBOOT, SLAVES.linux64),
    win32: platform_vars("WINNT 5.2", "builds/releng_base_windows_32_builds.py", "c:/mozilla-build/python27/python", (), SLAVES.win32),
    win64: platform_vars("WINNT 6.1 x86-64", "builds/releng_base_windows_64_builds.py", "c:/mozilla-build/python27/python", (), SLAVES.win64),
    macosx64: platform_vars("OS X 10.7", "builds/releng_base_mac_64_builds.py", "/tools/buildbot/bin/python", REBOOT, SLAVES.macosx64),
}};

let BRANCHES = #{{}};
for b in 0..{B} {{
    let name = `project-${{b}}`;
    let branch = #{{
        repo_path: `projects/${{name}}`,
        hgurl: "https://hg.mozilla.org/",
        mozharness_repo_path: "build/mozharness",
        mozharness_tag: "production",
        enabled_products: ["firefox"],
        staging: false,
        pollInterval: 60,
        platforms: #{{}},
    }};
    for platform in PLATFORM_VARS.keys() {{
        let pf = PLATFORM_VARS[platform];
        pf.base_name.replace("{{branch}}", name);
        branch.platforms[platform] = pf;
    }}
    BRANCHES[name] = branch;
}}

let buildObjects = #{{ builders: [], status: [], change_source: [], schedulers: [] }};
for name in BRANCHES.keys() {{
    let branchObjects = generateBranchObjects(BRANCHES[name], name, #{{}});
    buildObjects = mergeBuildObjects(buildObjects, branchObjects);
}}
c.builders += buildObjects.builders;
c.change_source += buildObjects.change_source;
c.schedulers += buildObjects.schedulers;
c
'''
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "master.rhai"), "w") as f:
    f.write(cfg)
