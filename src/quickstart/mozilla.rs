//! `kiln quickstart --mozilla [DIR]`: the seed's staging master on this
//! machine. A master dir wired like Mozilla's staging build master (the
//! scripts of `scripts/mozilla`, a `master_config.json` naming four
//! branches), local Mercurial repositories for those branches and for
//! mozharness under `DIR/repos/`, a clone of each branch to push from
//! under `DIR/work/`, and one kiln worker per platform pool.
//!
//! A push to a branch's repository tells the master at once (a
//! `changegroup` hook posts to `/change_hook/poller`; the pollers also
//! poll every 30 s), and every platform the branch enables builds through
//! the ScriptFactory's steps with the mozharness stand-in.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use super::{port_or_free, LocalWorker};

/// The master's scripts, as the examples dir and a Mozilla master dir name
/// them (the config repository's files are copied; the per-master links
/// stay links).
const SCRIPTS: &[(&str, &str)] = &[
    (
        "master.rhai",
        include_str!("../../scripts/mozilla/universal_master.rhai"),
    ),
    (
        "master_common.rhai",
        include_str!("../../scripts/mozilla/master_common.rhai"),
    ),
    (
        "config.rhai",
        include_str!("../../scripts/mozilla/config.rhai"),
    ),
    (
        "build_localconfig.rhai",
        include_str!("../../scripts/mozilla/build_localconfig.rhai"),
    ),
    (
        "staging_config.rhai",
        include_str!("../../scripts/mozilla/staging_config.rhai"),
    ),
    (
        "production_config.rhai",
        include_str!("../../scripts/mozilla/production_config.rhai"),
    ),
    (
        "unittests.rhai",
        include_str!("../../scripts/mozilla/unittests.rhai"),
    ),
    (
        "passwords.rhai",
        include_str!("../../examples/mozilla-staging/passwords.rhai"),
    ),
];

/// This master's choices among the config repository's files.
const LINKS: &[(&str, &str)] = &[
    ("master_localconfig.rhai", "build_localconfig.rhai"),
    ("localconfig.rhai", "staging_config.rhai"),
];

/// The project's mozharness stand-in.
const MOZHARNESS: &[(&str, &str)] = &[
    (
        "scripts/fx_desktop_build.py",
        include_str!("../../examples/mozilla-staging/local/mozharness/scripts/fx_desktop_build.py"),
    ),
    (
        "mozharness/__init__.py",
        include_str!("../../examples/mozilla-staging/local/mozharness/mozharness/__init__.py"),
    ),
    (
        "scripts/desktop_unittest.py",
        include_str!("../../examples/mozilla-staging/local/mozharness/scripts/desktop_unittest.py"),
    ),
    (
        "external_tools/count_and_reboot.py",
        include_str!(
            "../../examples/mozilla-staging/local/mozharness/external_tools/count_and_reboot.py"
        ),
    ),
];

/// What Mozilla's postrun.py did for each finished build (upload its log,
/// announce it), reduced to a line in `postrun.log`.
const POSTRUN: &str = r#"#!/usr/bin/env python3
"""postrun.py for a laptop staging master: notes each finished build."""
import os, sys, time
builder, number = sys.argv[-2], sys.argv[-1]
results = os.environ.get("KILN_RESULTS", "?")
with open("postrun.log", "a") as f:
    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {builder} build {number}: results {results}\n")
"#;

/// Tells the master of a push (a `changegroup` hook of each branch's
/// repository); a master that is not running sees it at its next poll.
const POKE: &str = r#"#!/usr/bin/env python3
"""Tells a kiln master to poll now: run by Mercurial after a push."""
import sys, urllib.request
try:
    urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=b""), timeout=10)
except Exception as e:
    print(f"kiln: the master did not answer ({e}); it sees the push at its next poll")
"#;

/// The branches, with their repositories' paths under `DIR/repos/` (the
/// seed's `repo_path`s).
pub const BRANCHES: &[(&str, &str)] = &[
    ("mozilla-central", "mozilla-central"),
    ("mozilla-aurora", "releases/mozilla-aurora"),
    ("cedar", "projects/cedar"),
    ("try", "try"),
];

/// One worker for each platform pool of the staging config (linux and
/// linux64 draw from one pool, as do win32 and win64).
pub const WORKERS: &[&str] = &[
    "bld-linux64-ec2-stage-001",
    "bld-linux64-ec2-stage-002",
    "bld-lion-r5-stage-001",
    "b-2008-ix-stage-001",
];

/// How long a stand-in build compiles, in seconds, unless
/// `FX_STANDIN_BUILD_SECONDS` in the environment says otherwise.
const BUILD_SECONDS: &str = "4";

/// Whom the pushes from `DIR/work/` are by.
const PUSHER: &str = "Quick Starter <quickstart@mozilla.example>";

fn hg(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("hg")
        .args(args)
        .current_dir(dir)
        .env("HGPLAIN", "1")
        .env("HGUSER", PUSHER)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run hg ({e}); the Mozilla quickstart needs Mercurial: \
                 `apt-get install mercurial` or `pip install mercurial`"
            )
        })?;
    if !out.status.success() {
        bail!(
            "hg {} in {} failed: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A repository with one commit of `files`.
fn init_repo(repo: &Path, files: &[(&str, &str)], message: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(repo).with_context(|| format!("cannot create {}", repo.display()))?;
    hg(repo, &["init"])?;
    for (name, text) in files {
        let path = repo.join(name);
        write(&path, text)?;
        if name.ends_with(".py") {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot make {} executable", path.display()))?;
        }
    }
    hg(repo, &["commit", "-q", "-A", "-m", message])?;
    Ok(())
}

/// What `prepare` made, for `run` to start and to print.
pub struct Prepared {
    pub password: String,
}

/// Writes the staging master dir, its repositories and the clones to push
/// from (once; an existing dir is used as it is). Fails before writing
/// anything when Mercurial or Python is missing.
pub fn prepare(dir: &Path, http_port: u16, worker_port: u16) -> anyhow::Result<Prepared> {
    let entry = dir.join(crate::script::ENTRY_SCRIPT);
    let secret = dir.join("secrets").join("worker-password");
    if entry.exists() {
        let password = std::fs::read_to_string(&secret)
            .with_context(|| format!("{} is missing", secret.display()))?;
        return Ok(Prepared {
            password: password.trim().to_string(),
        });
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    hg(dir, &["--version", "-q"])?;
    Command::new("python3")
        .arg("--version")
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run python3 ({e}); the mozharness stand-in and postrun.py are Python"
            )
        })?;
    let root = crate::diagnostics::canonical(dir);
    let repos = root.join("repos");
    let http = port_or_free(http_port)?;
    let workers = port_or_free(worker_port)?;

    init_repo(
        &repos.join("build/mozharness"),
        MOZHARNESS,
        "mozharness stand-in for a local staging master",
    )?;
    write(&root.join("bin/poke-master.py"), POKE)?;
    write(&root.join("bin/postrun.py"), POSTRUN)?;
    let script = root.join("bin/poke-master.py").display().to_string();
    let poke = format!(
        "[hooks]\nchangegroup.kiln = python3 '{}' http://127.0.0.1:{http}/change_hook/poller\n",
        script.replace('\'', "'\\''")
    );
    for (branch, path) in BRANCHES {
        let repo = repos.join(path);
        init_repo(
            &repo,
            &[("README", &format!("{branch}, a local staging copy\n"))],
            "Initial commit",
        )?;
        write(&repo.join(".hg/hgrc"), &poke)?;
        let work = root.join("work").join(branch);
        std::fs::create_dir_all(root.join("work"))?;
        hg(
            &root.join("work"),
            &[
                "clone",
                "-q",
                &repo.to_string_lossy(),
                &work.to_string_lossy(),
            ],
        )?;
        let hgrc = work.join(".hg/hgrc");
        let mut text = std::fs::read_to_string(&hgrc).unwrap_or_default();
        text.push_str(&format!("\n[ui]\nusername = {PUSHER}\n"));
        write(&hgrc, &text)?;
    }

    for (name, text) in SCRIPTS {
        write(&root.join(name), text)?;
    }
    for (link, target) in LINKS {
        std::os::unix::fs::symlink(target, root.join(link))
            .with_context(|| format!("cannot link {link} to {target}"))?;
    }
    let config = serde_json::json!({
        "name": "staging-build-master",
        "role": "build",
        "http_port": http,
        "pb_port": workers,
        "queuedir": "queue",
        "limit_fx_branches": BRANCHES.iter().map(|(b, _)| *b).collect::<Vec<_>>(),
        "hgurl": format!("{}/", repos.display()),
        "mozharness_python": "python3",
        "worker_system": "posix",
        "python": "python3",
        "poll_interval": 30,
    });
    write(
        &root.join("master_config.json"),
        &format!("{}\n", serde_json::to_string_pretty(&config)?),
    )?;
    let password = crate::scaffold::random_token()?;
    crate::scaffold::write_secret(&root, "worker-password", &password)?;
    crate::scaffold::write_secret(&root, "dep-signing", &crate::scaffold::random_token()?)?;
    Ok(Prepared { password })
}

/// Starts the staging master in the foreground with its workers, until
/// Ctrl-C.
pub fn run(dir: &Path, prepared: &Prepared) -> anyhow::Result<()> {
    let shown = crate::diagnostics::display_pathbuf(dir);
    let seconds =
        std::env::var("FX_STANDIN_BUILD_SECONDS").unwrap_or_else(|_| BUILD_SECONDS.to_string());
    let workers: Vec<LocalWorker> = WORKERS
        .iter()
        .map(|name| LocalWorker {
            name,
            env: vec![("FX_STANDIN_BUILD_SECONDS", seconds.as_str())],
        })
        .collect();
    let pushes: Vec<String> = BRANCHES
        .iter()
        .map(|(branch, _)| {
            let work: PathBuf = PathBuf::from(&shown).join("work").join(branch);
            format!(
                "\x20   {branch:<16} (cd {} && echo change >> README && hg commit -qm 'Bug 1 - a change' && hg push -q)",
                work.display()
            )
        })
        .collect();
    super::run_master(dir, &prepared.password, &workers, |http| {
        format!(
            "\nkiln quickstart --mozilla in {shown}: the seed's staging build master, with \
             branches mozilla-central, mozilla-aurora, cedar and try, and a worker for each \
             platform pool\n\
             \x20 web page:     {http}/  (pushes of each branch, a row per platform; the API under {http}/api/v2/)\n\
             \x20 push a change to a branch (a comment that says \"bustage\" breaks the build):\n\
             {}\n\
             \x20 explore:      kiln repl {shown}   then branches(), builders(\"try\"), explain(#{{ branch: \"try\" }})\n\
             \x20 edit:         {shown}/config.rhai (branches and platforms) reloads on save\n\
             \x20 Ctrl-C stops the master and its workers.\n",
            pushes.join("\n")
        )
    })
}
