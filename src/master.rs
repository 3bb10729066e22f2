//! `kiln start` and `kiln stop`: the running master's lifetime.
//!
//! Start loads the config, takes the pid file, opens the store, binds the
//! HTTP port and starts every change source, then waits for SIGTERM or
//! SIGINT. Stopping cancels the pollers (a poll in flight either finishes
//! its store transaction or never starts it), lets the HTTP server finish
//! its requests, and removes the pid file.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::changes::{self, ChangeBus};
use crate::config::MasterConfig;
use crate::schedulers::{Clock, Schedulers};
use crate::script::{Loaded, ScriptRuntime};
use crate::store::Store;

/// The running master's process id, in the master dir.
pub const PID_FILE: &str = "kiln.pid";
/// The master's log, in the master dir (also written to stderr).
pub const LOG_FILE: &str = "kiln.log";

/// How long shutdown waits for tasks before giving up on them.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Where `db.db_url` puts the database: `sqlite:///state.sqlite` is relative
/// to the master dir, `sqlite:////abs/path` is absolute.
pub fn db_path(dir: &Path, db_url: &str) -> PathBuf {
    let rest = db_url.strip_prefix("sqlite://").unwrap_or(db_url);
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let p = Path::new(rest);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// Whether a process with this id is alive and is a kiln.
fn is_kiln(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !alive {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => String::from_utf8_lossy(&cmd).contains("kiln"),
        // Without /proc, trust the pid file.
        Err(_) => true,
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The pid file, removed when the master ends.
struct PidFile(PathBuf);

impl PidFile {
    fn take(dir: &Path) -> anyhow::Result<PidFile> {
        let path = dir.join(PID_FILE);
        if let Some(pid) = read_pid(&path) {
            if pid != std::process::id() as i32 && is_kiln(pid) {
                bail!(
                    "a master is already running in {} (pid {pid}); `kiln stop {}` stops it",
                    dir.display(),
                    dir.display()
                );
            }
            tracing::info!("removing a stale {PID_FILE} (pid {pid} is not running)");
        }
        let mut f = std::fs::File::create(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(f, "{}", std::process::id())?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if read_pid(&self.0) == Some(std::process::id() as i32) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Runs the master in the foreground until SIGTERM or SIGINT.
pub fn run(dir: &Path, loaded: Loaded) -> anyhow::Result<()> {
    let _pid = PidFile::take(dir)?;
    let runtime = loaded.runtime();
    let config = loaded.config;
    let db = db_path(dir, &config.db.db_url);
    let store = Store::open(&db)?;
    tracing::info!("database {}", db.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(dir, config, runtime, store))
}

/// Buildbot's master name: `host:basedir`.
fn master_name(dir: &Path) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let host = if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".to_string()
    };
    format!("{host}:{}", crate::diagnostics::canonical(dir).display())
}

async fn serve(
    dir: &Path,
    config: MasterConfig,
    runtime: ScriptRuntime,
    store: Store,
) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let master_id = store.master_started(&master_name(dir)).await?;
    let bus = ChangeBus::default();
    let ctx = changes::Context::new(store.clone(), bus.clone(), dir)?;
    let (schedulers, scheduler_tasks) = Schedulers::start(
        &config,
        runtime.clone(),
        store.clone(),
        &bus,
        Clock::new(),
        &cancel,
    );

    let registry = std::sync::Arc::new(crate::workers::Registry::default());
    let distributor = crate::builds::Distributor::new(
        std::sync::Arc::new(config.clone()),
        registry.clone(),
        store.clone(),
        schedulers.clone(),
        runtime,
        master_id,
        dir.to_path_buf(),
    );

    let server = match &config.www {
        Some(www) => {
            let listener = tokio::net::TcpListener::bind((www.host.as_str(), www.port))
                .await
                .with_context(|| format!("cannot listen on {}:{}", www.host, www.port))?;
            let addr = listener.local_addr()?;
            tracing::info!("HTTP listening on http://{addr}/");
            let app = crate::http::router(crate::http::AppState {
                store: store.clone(),
                bus: bus.clone(),
                poll_now: ctx.poll_now.clone(),
                schedulers: schedulers.clone(),
                builds: distributor.clone(),
                users: www.users.clone(),
                started_at: Instant::now(),
            });
            let stop = cancel.clone();
            Some(tokio::spawn(async move {
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                )
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
            }))
        }
        None => {
            tracing::info!("no `www` in the config: no HTTP server, so no change hook");
            None
        }
    };

    store.master_connections_reset(master_id).await?;
    let worker_server = match config.protocols.msgpack_port {
        Some(port) => {
            // Workers are remote machines: listen on every interface, as Buildbot does.
            let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
                .await
                .with_context(|| format!("cannot listen for workers on port {port}"))?;
            tracing::info!("workers connect to ws://{}/", listener.local_addr()?);
            Some(tokio::spawn(crate::workers::serve(
                listener,
                crate::workers::WorkerSetup::from_config(&config),
                registry.clone(),
                store.clone(),
                master_id,
                cancel.clone(),
            )))
        }
        None => None,
    };

    let retried = store.retry_unfinished_builds(master_id).await?;
    if !retried.is_empty() {
        tracing::warn!(
            "{} build(s) were running when the master stopped; they end as RETRY and their requests run again",
            retried.len()
        );
    }
    let distributor_task = tokio::spawn(distributor.run(cancel.clone()));

    let pollers = changes::spawn_all(&config.change_source, &ctx, &cancel);
    tracing::info!(
        "master running in {}: {} change source(s), {} scheduler(s), {} builder(s)",
        dir.display(),
        pollers.len(),
        config.schedulers.len(),
        config.builders.len()
    );

    let why = shutdown_signal().await?;
    tracing::info!("{why}: stopping");
    cancel.cancel();
    let wait_all = async {
        for p in pollers.into_iter().chain(scheduler_tasks) {
            let _ = p.await;
        }
        if let Some(w) = worker_server {
            let _ = w.await;
        }
        let _ = distributor_task.await;
        if let Some(s) = server {
            match s.await {
                Ok(Err(e)) => tracing::warn!("HTTP server: {e}"),
                Err(e) => tracing::warn!("HTTP server task: {e}"),
                Ok(Ok(())) => {}
            }
        }
    };
    if tokio::time::timeout(STOP_GRACE, wait_all).await.is_err() {
        tracing::warn!("some tasks did not stop within {} s", STOP_GRACE.as_secs());
    }
    if let Err(e) = store.master_stopped(master_id).await {
        tracing::warn!("cannot record the master as stopped: {e:#}");
    }
    tracing::info!("master stopped");
    Ok(())
}

/// `kiln stop`: SIGTERM to the master of `dir`, then wait until it is gone.
pub fn stop(dir: &Path, wait: Duration) -> anyhow::Result<()> {
    let path = dir.join(PID_FILE);
    let Some(pid) = read_pid(&path) else {
        bail!("no master is running in {} (no {PID_FILE})", dir.display());
    };
    if !is_kiln(pid) {
        let _ = std::fs::remove_file(&path);
        bail!(
            "no master is running in {} (pid {pid} from {PID_FILE} is gone; removed the stale file)",
            dir.display()
        );
    }
    // SAFETY: plain kill(2) on a pid we checked is a kiln.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        bail!(
            "cannot signal pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if !is_kiln(pid) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the master (pid {pid}) did not stop within {} s",
        wait.as_secs()
    )
}

/// `kiln poll`: every change source polled once, at the same time. Returns
/// how many failed (each is logged).
pub fn poll_once(dir: &Path, config: &MasterConfig) -> anyhow::Result<usize> {
    let db = db_path(dir, &config.db.db_url);
    let store = Store::open(&db)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let ctx = changes::Context::new(store, ChangeBus::default(), dir)?;
        let started = Instant::now();
        let tasks: Vec<_> = config
            .change_source
            .iter()
            .map(|s| {
                let mut poller = changes::Poller::new(s);
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let r = poller.poll(&ctx).await;
                    (poller.name(), r)
                })
            })
            .collect();
        let (mut changes, mut failed) = (0, 0);
        for t in tasks {
            match t.await {
                Ok((_, Ok(n))) => changes += n,
                Ok((name, Err(e))) => {
                    failed += 1;
                    tracing::error!(poller = %name, "poll failed: {e:#}");
                }
                Err(e) => {
                    failed += 1;
                    tracing::error!("poll task failed: {e}");
                }
            }
        }
        println!(
            "polled {} change source(s) in {:.3} s: {changes} new change(s), {failed} failed",
            config.change_source.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(failed)
    })
}
