//! kiln's own worker: `kiln-worker create DIR ...` and `kiln-worker start
//! DIR` (also `kiln worker ...`). A crate of its own, so that a build
//! machine runs a small binary without the master's script engine,
//! database and web server. It speaks the same `msgpack_experimental_v7` protocol as a stock
//! buildbot-worker: it answers `get_worker_info`, `set_worker_settings`,
//! `keepalive`, `print`, `start_command`, `interrupt_command` and
//! `shutdown`, and reconnects with capped exponential backoff.
//!
//! Shell commands run in their own process group, with the requested env
//! and workdir; stdout and stderr are streamed as they come; `timeout` (no
//! output for N s) and `maxTime` (N s in all) kill the whole group, as
//! does an interrupt. File commands: mkdir, rmdir, rmfile, stat, glob,
//! listdir, cpdir, and the transfers upload_file, upload_directory (a tar,
//! optionally gz or bz2) and download_file, which call the master back
//! block by block and wait for each answer.

mod files;
mod session;
mod shell;
mod transfers;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use session::{session, Ended};

/// The worker's commands, for `kiln-worker` and `kiln worker` alike.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Make a worker dir that connects to a master.
    Create {
        dir: PathBuf,
        /// The master's worker port: HOST:PORT, or wss://HOST:PORT for a
        /// port with TLS (ws://HOST:PORT is HOST:PORT).
        #[arg(long)]
        master: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        password: String,
        /// PEM certificates of the authority (or the self-signed
        /// certificate) that a wss:// master's certificate must come from;
        /// without it, the public authorities (Mozilla's list).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Run the worker of DIR in the foreground (logs to stderr).
    Start { dir: PathBuf },
}

/// Runs one of the worker's commands; `program` is how the user called
/// this worker (`kiln worker` or `kiln-worker`), for the hints it prints.
pub fn run_command(command: Command, program: &str) -> anyhow::Result<()> {
    match command {
        Command::Create {
            dir,
            master,
            name,
            password,
            ca_file,
        } => {
            create(&dir, &master, &name, &password, ca_file.as_deref())?;
            println!(
                "created worker `{name}` in {}; run it with `{program} start {}`",
                dir.display(),
                dir.display()
            );
            Ok(())
        }
        Command::Start { dir } => start(&dir),
    }
}

/// The file in a worker dir that says where and who it is.
pub const CONFIG_FILE: &str = "kiln-worker.json";

#[derive(Serialize, Deserialize)]
struct WorkerFile {
    master: String,
    name: String,
    password: String,
    /// Trust for a wss:// master (absolute, or relative to the worker dir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
}

/// `kiln worker create`.
pub fn create(
    dir: &Path,
    master: &str,
    name: &str,
    password: &str,
    ca_file: Option<&Path>,
) -> anyhow::Result<()> {
    if dir.join(CONFIG_FILE).exists() {
        bail!("{} already holds a worker", dir.display());
    }
    session::master_url(master)?;
    if let Some(ca) = ca_file {
        session::roots(Some(ca), dir).with_context(|| format!("--ca-file {}", ca.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let text = serde_json::to_string_pretty(&WorkerFile {
        master: master.to_string(),
        name: name.to_string(),
        password: password.to_string(),
        ca_file: ca_file.map(Path::to_path_buf),
    })?;
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// `kiln worker start`: runs until SIGTERM/SIGINT or a `shutdown` request.
pub fn start(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no worker in {} (kiln worker create makes one)",
            dir.display()
        )
    })?;
    let cfg: WorkerFile =
        serde_json::from_str(&text).with_context(|| format!("{} is malformed", path.display()))?;
    let basedir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cfg, basedir))
}

/// Many workers in one process (for measuring a master with a large
/// fleet): `{prefix}0` .. `{prefix}{count-1}`, all with `password`, each
/// with its own basedir under `dir`. Runs until SIGTERM/SIGINT.
pub fn fleet(
    dir: &Path,
    master: &str,
    prefix: &str,
    count: usize,
    password: &str,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let basedir = dir.join(format!("{prefix}{i}"));
            std::fs::create_dir_all(&basedir)?;
            let cfg = WorkerFile {
                master: master.to_string(),
                name: format!("{prefix}{i}"),
                password: password.to_string(),
                ca_file: None,
            };
            tasks.push(tokio::spawn(run(cfg, basedir)));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}

async fn run(cfg: WorkerFile, basedir: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut failures: u32 = 0;
    loop {
        let session = session(&cfg, &basedir);
        let outcome = tokio::select! {
            r = session => r,
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        };
        match outcome {
            Ok(Ended::Shutdown) => {
                tracing::info!("the master asked this worker to shut down");
                return Ok(());
            }
            Ok(Ended::Lost(why)) => {
                failures = 0;
                tracing::warn!("connection to {} lost: {why}", cfg.master);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!("cannot connect to {}: {e:#}", cfg.master);
            }
        }
        // Capped exponential backoff: 1, 2, 4, ... 60 s.
        let wait = Duration::from_secs((1u64 << failures.min(6)).min(60));
        tracing::info!("reconnecting in {} s", wait.as_secs());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}
