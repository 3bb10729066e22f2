//! `kiln start` and `kiln stop`: the running master's lifetime.
//!
//! Start loads the config, takes the pid file, opens the store, binds the
//! HTTP port and starts every change source, then waits for SIGTERM or
//! SIGINT. Stopping cancels the pollers (a poll in flight either finishes
//! its store transaction or never starts it), lets the HTTP server finish
//! its requests, and removes the pid file.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::changes::{self, ChangeBus};
use crate::config::MasterConfig;
use crate::reconfig::{ConfigDiff, ReloadAsk};
use crate::schedulers::{Clock, Schedulers};
use crate::script::{Limits, Loaded};
use crate::store::reloads::NewReload;
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

/// The pid file holds the master's pid and, on the next line, its
/// database (for `kiln reconfig`, which must not depend on the config
/// loading).
fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn read_pid_db(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let db = text.lines().nth(1)?.trim();
    (!db.is_empty()).then(|| PathBuf::from(db))
}

/// The pid file, removed when the master ends.
struct PidFile(PathBuf);

impl PidFile {
    fn take(dir: &Path, db: &Path) -> anyhow::Result<PidFile> {
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
        writeln!(f, "{}", crate::diagnostics::canonical(db).display())?;
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

/// How the master follows its scripts.
#[derive(Clone, Debug)]
pub struct ReloadOptions {
    /// Watch the files the config was read from.
    pub watch: bool,
    /// A burst of saves ends when no file changed for this long.
    pub quiet: Duration,
    /// The limits every load of the scripts runs under.
    pub limits: Limits,
    /// When the first load began: a file changed since then reloads.
    pub loaded_at: Option<std::time::SystemTime>,
}

impl Default for ReloadOptions {
    fn default() -> Self {
        ReloadOptions {
            watch: true,
            quiet: Duration::from_millis(300),
            limits: Limits::default(),
            loaded_at: None,
        }
    }
}

/// The longest a burst of saves can put a reload off.
const MAX_DEBOUNCE: Duration = Duration::from_secs(5);

/// Runs the master in the foreground until SIGTERM or SIGINT.
pub fn run(dir: &Path, loaded: Loaded, options: ReloadOptions) -> anyhow::Result<()> {
    let db = db_path(dir, &loaded.config.db.db_url);
    let store = Store::open(&db)?;
    let _pid = PidFile::take(dir, &db)?;
    tracing::info!("database {}", db.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(dir, loaded, store, options))
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

/// A listening socket's task.
struct Listening {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Everything a running master is made of; reloads change it in place.
struct Live {
    dir: PathBuf,
    limits: Limits,
    loader: Loader,
    store: Store,
    cancel: CancellationToken,
    master_id: i64,
    config: Arc<MasterConfig>,
    /// The files the running config was read from (or, after a failed
    /// reload, those and the failed one's): the watcher's list.
    files: Vec<PathBuf>,
    schedulers: Schedulers,
    distributor: Arc<crate::builds::Distributor>,
    pollers: changes::Pollers,
    worker_setup: crate::workers::WorkerSetup,
    registry: Arc<crate::workers::Registry>,
    app: crate::http::AppState,
    http: Option<Listening>,
    worker_listener: Option<Listening>,
    /// Listeners a reload replaced, still finishing their requests.
    retired: Vec<tokio::task::JoinHandle<()>>,
    /// A runner per queue directory the status handlers write to (one a
    /// reload drops keeps draining its queue until the master stops).
    queues: BTreeMap<PathBuf, tokio::task::JoinHandle<()>>,
}

impl Live {
    /// Starts a runner for each queue directory of the config that has none.
    fn run_queues(&mut self) {
        for target in &self.config.status {
            let crate::config::StatusTarget::QueuedCommandHandler { queuedir, .. } = target;
            let root = self.dir.join(&queuedir.path);
            if self.queues.contains_key(&root) {
                continue;
            }
            let queue = match crate::queuedir::QueueDir::open(&root) {
                Ok(q) => q,
                Err(e) => {
                    tracing::error!(queue = %queuedir.name, "{e:#}");
                    continue;
                }
            };
            tracing::info!(queue = %queuedir.name, "running the commands queued in {}", root.display());
            let cancel = self.cancel.clone();
            let name = queuedir.name.clone();
            let task = tokio::spawn(async move {
                let opts = crate::queuedir::RunOptions::default();
                if let Err(e) = crate::queuedir::run(&queue, &opts, false, &cancel).await {
                    tracing::error!(queue = %name, "the queue runner stopped: {e:#}");
                }
            });
            self.queues.insert(root, task);
        }
    }
}

async fn bind_http(www: &crate::config::WwwConfig) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind((www.host.as_str(), www.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", www.host, www.port))
}

async fn bind_workers(port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    // Workers are remote machines: listen on every interface, as Buildbot does.
    tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("cannot listen for workers on port {port}"))
}

impl Live {
    fn serve_http(&self, listener: tokio::net::TcpListener) -> anyhow::Result<Listening> {
        let addr = listener.local_addr()?;
        tracing::info!("HTTP listening on http://{addr}/");
        let stop = self.cancel.child_token();
        // Long answers (the event stream) end when this server stops.
        let mut state = self.app.clone();
        state.stopping = stop.clone();
        let app = crate::http::router(state);
        let until = stop.clone();
        let task = tokio::spawn(async move {
            let r = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(async move { until.cancelled().await })
            .await;
            if let Err(e) = r {
                tracing::warn!("HTTP server: {e}");
            }
        });
        Ok(Listening { stop, task })
    }

    fn serve_workers(&self, listener: tokio::net::TcpListener) -> anyhow::Result<Listening> {
        tracing::info!("workers connect to ws://{}/", listener.local_addr()?);
        let stop = self.cancel.child_token();
        let task = tokio::spawn(crate::workers::serve(
            listener,
            self.worker_setup.clone(),
            self.registry.clone(),
            self.store.clone(),
            self.master_id,
            self.cancel.clone(),
            stop.clone(),
        ));
        Ok(Listening { stop, task })
    }

    /// Loads the scripts again and applies what changed; a failure at any
    /// point leaves the running config as it was. Every attempt is stored.
    async fn reload(&mut self, trigger: &str) -> crate::store::reloads::Reload {
        let started = Instant::now();
        let started_at = unix_now();
        tracing::info!("reloading the config ({trigger})");
        let loaded = self.loader.load(&self.dir, &self.limits).await;
        let load_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut record = NewReload {
            started_at,
            trigger: trigger.to_string(),
            ..Default::default()
        };
        match loaded {
            Err(e) => record.errors = e,
            Ok(Err(failure)) => {
                record.errors =
                    crate::diagnostics::render(&failure.diagnostics, &failure.sources, false);
                // Watch what the failed load read as well: fixing a module
                // it newly imports must reload.
                for f in &failure.files {
                    if !self.files.contains(f) {
                        self.files.push(f.clone());
                    }
                }
                record.files = paths(&failure.files);
            }
            Ok(Ok(loaded)) => {
                record.files = paths(&loaded.files);
                for w in &loaded.warnings {
                    tracing::warn!("{}", w.message);
                }
                match self.apply(loaded).await {
                    Ok(diff) => {
                        record.applied = true;
                        record.diff = diff;
                    }
                    Err(e) => record.errors = format!("{e:#}"),
                }
            }
        }
        record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        *self.app.watched.write().unwrap_or_else(|e| e.into_inner()) = paths(&self.files);
        if record.applied {
            tracing::info!(
                "config reloaded in {:.1} ms (scripts {load_ms:.1} ms) ({trigger}): {}",
                record.duration_ms,
                record.diff.replace('\n', "; ")
            );
        } else {
            tracing::error!(
                "reload failed ({trigger}); the running config is unchanged:\n{}",
                record.errors
            );
        }
        let row = crate::store::reloads::Reload {
            reloadid: 0,
            started_at,
            finished_at: Some(unix_now()),
            trigger: record.trigger.clone(),
            applied: record.applied,
            diff: record.diff.clone(),
            errors: record.errors.clone(),
            files: record.files.clone(),
            duration_ms: record.duration_ms,
        };
        match self.store.add_reload(record).await {
            Ok(id) => crate::store::reloads::Reload {
                reloadid: id,
                ..row
            },
            Err(e) => {
                tracing::error!("cannot store the reload: {e:#}");
                row
            }
        }
    }

    /// Applies a loaded config: everything that can fail (a database that
    /// would change, a port that cannot be bound) is checked before
    /// anything changes.
    async fn apply(&mut self, loaded: Loaded) -> anyhow::Result<String> {
        let old = self.config.clone();
        let runtime = loaded.runtime();
        let new = Arc::new(loaded.config);
        if let Some(why) = ConfigDiff::needs_restart(&old, &new) {
            bail!("{why}");
        }
        let diff = ConfigDiff::between(&old, &new);

        // New sockets first: a port that cannot be bound refuses the reload.
        let http_moved = old.www.as_ref().map(|w| (&w.host, w.port))
            != new.www.as_ref().map(|w| (&w.host, w.port));
        let new_http = match (&new.www, http_moved) {
            (Some(www), true) => Some(bind_http(www).await.context(
                "the new HTTP address cannot be used; nothing of this reload was applied",
            )?),
            _ => None,
        };
        let workers_moved = old.protocols.msgpack_port != new.protocols.msgpack_port;
        let new_workers = match (new.protocols.msgpack_port, workers_moved) {
            (Some(port), true) => Some(bind_workers(port).await.context(
                "the new worker port cannot be used; nothing of this reload was applied",
            )?),
            _ => None,
        };

        // Builds: the next ones use the new builders.
        self.distributor.reconfigure(new.clone(), runtime.clone());
        // Workers: new passwords for the next connections; a worker whose
        // password changed reconnects with the new one; a removed one is let
        // go once its builds end.
        self.worker_setup.replace(&new);
        for name in &diff.passwords {
            if let Some(conn) = self.registry.get(name) {
                tracing::info!(worker = %name, "its password changed: disconnecting it; it must reconnect with the new one");
                conn.closed.cancel();
            }
        }
        for name in &diff.workers.removed {
            if self.registry.get(name).is_some() {
                match self.distributor.shutdown_worker(name, true).await {
                    Ok(msg) => tracing::info!(worker = %name, "removed from the config: {msg}"),
                    Err(e) => tracing::warn!(worker = %name, "removed from the config: {e:#}"),
                }
            }
        }
        if let Err(e) = self.app.store.register_builders(builder_rows(&new)).await {
            tracing::warn!("cannot record the new builders: {e:#}");
        }
        self.schedulers.reconfigure(&new, runtime).await;
        self.pollers.reconfigure(&new.change_source).await;
        *self.app.access.write().unwrap_or_else(|e| e.into_inner()) =
            crate::http::auth::Access::of(new.www.as_ref());
        if http_moved {
            if let Some(old) = self.http.take() {
                old.stop.cancel();
                self.retired.push(old.task);
            }
            if let Some(listener) = new_http {
                self.http = Some(self.serve_http(listener)?);
            }
        }
        if workers_moved {
            if let Some(old) = self.worker_listener.take() {
                old.stop.cancel();
                self.retired.push(old.task);
            }
            if let Some(listener) = new_workers {
                self.worker_listener = Some(self.serve_workers(listener)?);
            }
        }

        let mut summary = diff.to_string();
        // A removed builder's requests stay in the store, unclaimed; a
        // builder of that name in a later config builds them.
        if !diff.builders.removed.is_empty() {
            let pending = self.store.unclaimed_requests(100_000).await?;
            for name in &diff.builders.removed {
                let n = pending.iter().filter(|r| &r.buildername == name).count();
                let running = self.distributor.running_of_builder(name);
                if n > 0 || running > 0 {
                    let line = format!(
                        "builder `{name}` was removed: {running} running build(s) finish, {n} pending request(s) stay in the store"
                    );
                    tracing::warn!("{line}");
                    summary.push('\n');
                    summary.push_str(&line);
                }
            }
        }
        self.config = new;
        self.run_queues();
        self.files = loaded.files;
        Ok(summary)
    }
}

type LoadJob = (
    PathBuf,
    Limits,
    tokio::sync::oneshot::Sender<Result<Loaded, crate::script::LoadFailure>>,
);

/// The thread every reload evaluates the scripts on. Always the same
/// thread: the allocator gives each thread its own arena, and loads on
/// the blocking pool's changing threads left a config's worth of freed
/// memory in each (RSS grew by ~11 MB per reload of a 1000-builder
/// config until every arena had one).
struct Loader {
    jobs: std::sync::mpsc::Sender<LoadJob>,
}

impl Loader {
    fn start() -> anyhow::Result<Loader> {
        let (jobs, rx) = std::sync::mpsc::channel::<LoadJob>();
        std::thread::Builder::new()
            .name("kiln-reload".into())
            .spawn(move || {
                for (dir, limits, reply) in rx {
                    let _ = reply.send(crate::script::load_master(&dir, limits));
                }
            })
            .context("cannot start the reload thread")?;
        Ok(Loader { jobs })
    }

    async fn load(
        &self,
        dir: &Path,
        limits: &Limits,
    ) -> Result<Result<Loaded, crate::script::LoadFailure>, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send((dir.to_path_buf(), limits.clone(), reply))
            .map_err(|_| "the reload thread has stopped; restart the master".to_string())?;
        answer
            .await
            .map_err(|_| "the reload did not finish (the reload thread failed)".to_string())
    }
}

fn paths(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|f| f.display().to_string()).collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The directories to watch for `files` (editors replace a file by
/// renaming another over it, which only the directory sees).
fn watch_dirs(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    files
        .iter()
        .filter_map(|f| f.parent())
        .filter(|d| d.is_dir())
        .map(Path::to_path_buf)
        .collect()
}

/// Watches directories, sending the paths of what changed in them.
struct Watcher {
    inner: Option<notify::RecommendedWatcher>,
    dirs: BTreeSet<PathBuf>,
}

impl Watcher {
    fn new(tx: tokio::sync::mpsc::UnboundedSender<Vec<PathBuf>>) -> Watcher {
        let inner = notify::recommended_watcher(move |r: notify::Result<notify::Event>| match r {
            Ok(ev) => {
                if !matches!(ev.kind, notify::EventKind::Access(_)) {
                    let _ = tx.send(ev.paths);
                }
            }
            Err(e) => tracing::warn!("file watcher: {e}"),
        });
        match inner {
            Ok(w) => Watcher {
                inner: Some(w),
                dirs: BTreeSet::new(),
            },
            Err(e) => {
                tracing::warn!(
                    "cannot watch the config's files ({e}); reload with SIGHUP or `kiln reconfig`"
                );
                Watcher {
                    inner: None,
                    dirs: BTreeSet::new(),
                }
            }
        }
    }

    /// Watches exactly the directories of `files`.
    fn follow(&mut self, files: &[PathBuf]) {
        use notify::Watcher as _;
        let Some(w) = self.inner.as_mut() else {
            return;
        };
        let wanted = watch_dirs(files);
        for gone in self.dirs.difference(&wanted) {
            let _ = w.unwatch(gone);
        }
        for dir in wanted.difference(&self.dirs) {
            if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
                tracing::warn!("cannot watch {}: {e}", dir.display());
            }
        }
        self.dirs = wanted;
    }
}

/// The configured builders as the store records them.
fn builder_rows(config: &MasterConfig) -> Vec<(String, Option<String>, Vec<String>)> {
    config
        .builders
        .iter()
        .map(|b| {
            (
                b.name.clone(),
                b.description.as_ref().map(|d| d.to_string()),
                b.tags.clone(),
            )
        })
        .collect()
}

async fn serve(
    dir: &Path,
    loaded: Loaded,
    store: Store,
    options: ReloadOptions,
) -> anyhow::Result<()> {
    let runtime = loaded.runtime();
    let config = Arc::new(loaded.config);
    let cancel = CancellationToken::new();
    let master_id = store.master_started(&master_name(dir)).await?;
    store.register_builders(builder_rows(&config)).await?;
    let bus = ChangeBus::default();
    let ctx = changes::Context::new(store.clone(), bus.clone(), dir)?;
    let schedulers = Schedulers::start(
        &config,
        runtime.clone(),
        store.clone(),
        &bus,
        Clock::new(),
        &cancel,
    );

    let registry = Arc::new(crate::workers::Registry::default());
    let distributor = crate::builds::Distributor::new(
        config.clone(),
        registry.clone(),
        store.clone(),
        schedulers.clone(),
        runtime,
        master_id,
        dir.to_path_buf(),
    );
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadAsk>(16);
    let app = crate::http::AppState {
        store: store.clone(),
        bus: bus.clone(),
        poll_now: ctx.poll_now.clone(),
        poll_errors: ctx.poll_errors.clone(),
        schedulers: schedulers.clone(),
        builds: distributor.clone(),
        access: Arc::new(std::sync::RwLock::new(crate::http::auth::Access::of(
            config.www.as_ref(),
        ))),
        reload: reload_tx,
        watched: Arc::new(std::sync::RwLock::new(paths(&loaded.files))),
        stopping: CancellationToken::new(),
        started_at: Instant::now(),
    };
    let mut live = Live {
        dir: dir.to_path_buf(),
        limits: options.limits.clone(),
        loader: Loader::start()?,
        store: store.clone(),
        cancel: cancel.clone(),
        master_id,
        config: config.clone(),
        files: loaded.files,
        schedulers: schedulers.clone(),
        distributor: distributor.clone(),
        pollers: changes::Pollers::start(&[], &ctx, &cancel),
        worker_setup: crate::workers::WorkerSetup::from_config(&config),
        registry,
        app,
        http: None,
        worker_listener: None,
        retired: Vec::new(),
        queues: BTreeMap::new(),
    };
    live.run_queues();

    match &config.www {
        Some(www) => live.http = Some(live.serve_http(bind_http(www).await?)?),
        None => tracing::info!("no `www` in the config: no HTTP server, so no change hook"),
    }
    store.master_connections_reset(master_id).await?;
    if let Some(port) = config.protocols.msgpack_port {
        live.worker_listener = Some(live.serve_workers(bind_workers(port).await?)?);
    }

    let retried = store.retry_unfinished_builds(master_id).await?;
    if !retried.is_empty() {
        tracing::warn!(
            "{} build(s) were running when the master stopped; they end as RETRY and their requests run again",
            retried.len()
        );
    }
    let distributor_task = tokio::spawn(distributor.run(cancel.clone()));

    let (fs_tx, mut fs_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut watcher = if options.watch {
        let mut w = Watcher::new(fs_tx);
        w.follow(&live.files);
        Some(w)
    } else {
        drop(fs_tx);
        None
    };
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    // A file saved between the load and the watcher's start is a burst
    // already under way.
    let mut burst: Option<(PathBuf, Instant, tokio::time::Instant)> = None;
    if let (Some(_), Some(since)) = (&watcher, options.loaded_at) {
        if let Some(f) = live.files.iter().find(|f| {
            std::fs::metadata(f)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since)
        }) {
            burst = Some((
                f.clone(),
                Instant::now(),
                tokio::time::Instant::now() + options.quiet,
            ));
        }
    }
    live.pollers.reconfigure(&config.change_source).await;
    tracing::info!(
        "master running in {}: {} change source(s), {} scheduler(s), {} builder(s)",
        dir.display(),
        live.pollers.len(),
        config.schedulers.len(),
        config.builders.len()
    );

    let stop = shutdown_signal();
    tokio::pin!(stop);
    // A burst of saves (`burst`): the first file seen, when it began, and
    // when it is quiet enough to reload.
    let why = loop {
        let quiet_at = burst.as_ref().map(|b| b.2);
        let trigger = tokio::select! {
            why = &mut stop => break why?,
            _ = hup.recv() => Some(("SIGHUP".to_string(), None)),
            Some(ask) = reload_rx.recv() => Some((ask.trigger, ask.reply)),
            Some(changed) = fs_rx.recv() => {
                if let Some(path) = changed.into_iter().find(|p| live.files.contains(p)) {
                    let now = Instant::now();
                    let began = burst.as_ref().map_or(now, |b| b.1);
                    let at = if now.duration_since(began) >= MAX_DEBOUNCE {
                        tokio::time::Instant::now()
                    } else {
                        tokio::time::Instant::now() + options.quiet
                    };
                    let first = burst.take().map_or(path, |b| b.0);
                    burst = Some((first, began, at));
                }
                None
            }
            _ = async {
                match quiet_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => burst.take().map(|(path, _, _)| (format!("file changed: {}", path.display()), None)),
        };
        if let Some((trigger, reply)) = trigger {
            // Saves during the reload are seen by it or start the next one.
            let row = live.reload(&trigger).await;
            if let Some(w) = watcher.as_mut() {
                w.follow(&live.files);
            }
            if let Some(reply) = reply {
                let _ = reply.send(row);
            }
        }
    };
    drop(watcher);
    tracing::info!("{why}: stopping");
    cancel.cancel();
    let Live {
        pollers,
        http,
        worker_listener,
        retired,
        queues,
        ..
    } = live;
    let wait_all = async {
        pollers.stopped().await;
        schedulers.stopped().await;
        if let Some(w) = worker_listener {
            let _ = w.task.await;
        }
        let _ = distributor_task.await;
        if let Some(s) = http {
            let _ = s.task.await;
        }
        for t in retired {
            let _ = t.await;
        }
        for t in queues.into_values() {
            let _ = t.await;
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

/// `kiln reconfig`: SIGHUP to the master of `dir`, then its record of that
/// reload, once stored.
pub fn reconfig(dir: &Path, wait: Duration) -> anyhow::Result<crate::store::reloads::Reload> {
    let path = dir.join(PID_FILE);
    let Some(pid) = read_pid(&path).filter(|p| is_kiln(*p)) else {
        bail!(
            "no master is running in {} (no live pid in {PID_FILE}); `kiln start {}` starts one",
            dir.display(),
            dir.display()
        );
    };
    let Some(db) = read_pid_db(&path) else {
        bail!(
            "{} does not name the master's database (a master older than this kiln?); send SIGHUP to pid {pid} to reload",
            path.display()
        );
    };
    let store = Store::open(&db)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let before = store.reloads(1).await?.first().map_or(0, |r| r.reloadid);
        // SAFETY: plain kill(2) on a pid we checked is a kiln.
        if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
            bail!(
                "cannot signal pid {pid}: {}",
                std::io::Error::last_os_error()
            );
        }
        let deadline = Instant::now() + wait;
        loop {
            let newer = store.reloads(20).await?;
            if let Some(r) = newer
                .into_iter()
                .filter(|r| r.reloadid > before && r.trigger == "SIGHUP")
                .min_by_key(|r| r.reloadid)
            {
                return Ok(r);
            }
            if !is_kiln(pid) {
                bail!("the master (pid {pid}) stopped before reloading");
            }
            if Instant::now() > deadline {
                bail!(
                    "the master (pid {pid}) did not finish reloading within {} s",
                    wait.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
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
