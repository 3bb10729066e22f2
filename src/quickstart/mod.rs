//! `kiln quickstart [DIR]`: a demo master with a local Git repository and
//! two local kiln workers, running in the foreground. A commit to
//! `DIR/repo` is polled within seconds and built on the workers.
//! `kiln quickstart --mozilla [DIR]` ([`mozilla`]) runs the seed's staging
//! master instead.

pub mod mozilla;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

use crate::scaffold::{self, Fill};

/// A free port on 127.0.0.1 when `port` is 0 (the OS picks; the socket is
/// closed at once, so another process could take it first: a demo's risk).
pub(crate) fn port_or_free(port: u16) -> anyhow::Result<u16> {
    if port != 0 {
        return Ok(port);
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run git ({e}); the quickstart needs git installed"))?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes the demo master dir (once; an existing one is used as it is).
/// Returns the worker password.
pub fn prepare(dir: &Path, http_port: u16, worker_port: u16) -> anyhow::Result<String> {
    let entry = dir.join(crate::script::ENTRY_SCRIPT);
    let secret = dir.join("secrets").join("worker-password");
    if entry.exists() {
        let password = std::fs::read_to_string(&secret)
            .with_context(|| format!("{} is missing", secret.display()))?;
        return Ok(password.trim().to_string());
    }
    std::fs::create_dir_all(dir.join("secrets"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "-q"])?;
    git(&repo, &["symbolic-ref", "HEAD", "refs/heads/main"])?;
    git(&repo, &["config", "user.name", "kiln quickstart"])?;
    git(&repo, &["config", "user.email", "quickstart@kiln.invalid"])?;
    std::fs::write(
        repo.join("README"),
        "A repository for kiln's quickstart: commit here, and watch it build.\n",
    )?;
    git(&repo, &["add", "README"])?;
    git(&repo, &["commit", "-q", "-m", "Initial commit"])?;
    let repo_abs = crate::diagnostics::canonical(&repo);
    let script = scaffold::render(
        scaffold::GIT_DEMO,
        &[
            ("REPO", Fill::Str(&repo_abs.to_string_lossy())),
            ("HTTP", Fill::Int(port_or_free(http_port)?.into())),
            ("WORKERS", Fill::Int(port_or_free(worker_port)?.into())),
        ],
    )?;
    scaffold::write_master(dir, &script)?;
    let password = scaffold::random_token()?;
    scaffold::write_secret(dir, "worker-password", &password)?;
    Ok(password)
}

/// The local workers; stopped when dropped.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A kiln worker the quickstart runs beside its master.
pub(crate) struct LocalWorker<'a> {
    pub name: &'a str,
    /// Added to the worker's environment (its builds see it).
    pub env: Vec<(&'a str, &'a str)>,
}

/// Starts the demo: the master in the foreground, two kiln workers as
/// child processes, until Ctrl-C.
pub fn run(dir: &Path, password: &str) -> anyhow::Result<()> {
    let workers = ["worker1", "worker2"].map(|name| LocalWorker { name, env: vec![] });
    let shown = crate::diagnostics::display_pathbuf(dir);
    run_master(dir, password, &workers, |http| {
        format!(
            "\nkiln quickstart in {shown}: a master polling {shown}/repo every 2 s, with two local workers\n\
             \x20 web page:     {http}/  (the pushes, builds and their logs; the API under {http}/api/v2/)\n\
             \x20 push:         (cd {shown}/repo && echo change >> README && git commit -qam 'a change')\n\
             \x20 watch:        kiln repl {shown} --master {http}   then live()\n\
             \x20 edit:         {shown}/master.rhai reloads on save\n\
             \x20 Ctrl-C stops the master and its workers.\n"
        )
    })
}

/// Runs the master of `dir` in the foreground with `workers` as child
/// processes (made under `dir/workers/` the first time), printing
/// `banner(web address)` once they are started; the workers stop when
/// the master does.
pub(crate) fn run_master(
    dir: &Path,
    password: &str,
    workers: &[LocalWorker],
    banner: impl FnOnce(&str) -> String,
) -> anyhow::Result<()> {
    let loaded =
        crate::script::load_master(dir, crate::script::Limits::default()).map_err(|f| {
            anyhow::anyhow!(
                "the quickstart master does not load:\n{}",
                crate::diagnostics::render(&f.diagnostics, &f.sources, false)
            )
        })?;
    let port = loaded
        .config
        .protocols
        .msgpack_port
        .context("the quickstart master has no worker port")?;
    let http = loaded
        .config
        .www
        .as_ref()
        .map(|w| format!("http://{}:{}", w.host, w.port))
        .context("the quickstart master has no www")?;
    let exe = std::env::current_exe().context("cannot find the kiln executable")?;
    let mut children = Workers(Vec::new());
    for w in workers {
        let wdir: PathBuf = dir.join("workers").join(w.name);
        if !wdir.exists() {
            kiln_worker::create(&wdir, &format!("127.0.0.1:{port}"), w.name, password, None)?;
        }
        let log = std::fs::File::create(dir.join("workers").join(format!("{}.log", w.name)))?;
        let child = Command::new(&exe)
            .args(["worker", "start"])
            .arg(&wdir)
            .envs(w.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start a local worker")?;
        children.0.push(child);
    }
    eprintln!("{}", banner(&http));
    let options = crate::master::ReloadOptions::default();
    let r = crate::master::run(dir, loaded, options);
    drop(children);
    r
}
