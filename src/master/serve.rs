//! `kiln start`'s wiring: the store, the HTTP and worker ports, change
//! sources, schedulers, the distributor and status queues started in
//! order, the reload loop run until SIGTERM or SIGINT, and everything
//! stopped in reverse.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::db_target;
use super::pidfile::PidFile;
use super::reload::{paths, Loader, ReloadOptions, MAX_DEBOUNCE};
use super::watch::Watcher;
use crate::changes;
use crate::config::MasterConfig;
use crate::http::ReloadAsk;
use crate::schedulers::{Clock, Schedulers};
use crate::script::{Limits, Loaded};
use crate::store::Store;

/// How long shutdown waits for tasks before giving up on them.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(30);

pub(super) async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Runs the master in the foreground until SIGTERM or SIGINT.
pub fn run(dir: &Path, loaded: Loaded, options: ReloadOptions) -> anyhow::Result<()> {
    let target = db_target(dir, &loaded.config.db)?;
    let _pid = PidFile::take(dir, &target)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let store = Store::connect(&target).await?;
        tracing::info!("database {target}");
        serve(dir, loaded, store, options).await
    })
}

/// Buildbot's master name: `host:basedir`.
pub(super) fn master_name(dir: &Path) -> String {
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
pub(super) struct Listening {
    pub(super) stop: CancellationToken,
    pub(super) task: tokio::task::JoinHandle<()>,
    /// Its TLS, which a reload renews in place.
    pub(super) tls: Option<Arc<crate::net::Tls>>,
}

/// Everything a running master is made of; reloads change it in place.
pub(super) struct Live {
    pub(super) dir: PathBuf,
    pub(super) limits: Limits,
    pub(super) loader: Loader,
    pub(super) store: Store,
    pub(super) cancel: CancellationToken,
    pub(super) master_id: i64,
    pub(super) config: Arc<MasterConfig>,
    /// The files the running config was read from (or, after a failed
    /// reload, those and the failed one's): the watcher's list.
    pub(super) files: Vec<PathBuf>,
    pub(super) schedulers: Schedulers,
    pub(super) distributor: Arc<crate::builds::Distributor>,
    pub(super) pollers: changes::Pollers,
    pub(super) worker_setup: crate::workers::WorkerSetup,
    pub(super) registry: Arc<crate::workers::Registry>,
    pub(super) app: crate::http::AppState,
    pub(super) http: Option<Listening>,
    pub(super) worker_listener: Option<Listening>,
    /// Listeners a reload replaced, still finishing their requests.
    pub(super) retired: Vec<tokio::task::JoinHandle<()>>,
    /// A runner per queue directory the status handlers write to (one a
    /// reload drops keeps draining its queue until the master stops).
    pub(super) queues: BTreeMap<PathBuf, tokio::task::JoinHandle<()>>,
    /// In a fleet, the leases this master holds (`None`: not in a fleet,
    /// every service runs here).
    pub(super) held: Option<BTreeSet<String>>,
    /// The leased services the running config has, for the heartbeat.
    pub(super) wanted: tokio::sync::watch::Sender<Vec<String>>,
    /// The janitor the running config has, for the janitor's task.
    pub(super) janitor: tokio::sync::watch::Sender<Option<crate::config::Janitor>>,
}

impl Live {
    /// Runs the leased services this master now holds, and stops the
    /// others; each starts from its stored state.
    pub(super) async fn leases_changed(&mut self, held: BTreeSet<String>) {
        self.held = Some(held);
        let running = held_services(&self.config, self.held.as_ref());
        self.schedulers
            .reload(&running, self.schedulers.runtime())
            .await;
        self.pollers.reload(&running.change_source).await;
    }

    /// Starts a runner for each queue directory of the config that has none.
    pub(super) fn run_queues(&mut self) {
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

pub(super) async fn bind_http(
    www: &crate::config::WwwConfig,
    dir: &Path,
) -> anyhow::Result<crate::net::Bound> {
    crate::net::bind(&www.host, www.port, www.tls.as_ref(), dir)
        .await
        .context("the web port (www.port)")
}

pub(super) async fn bind_workers(
    protocols: &crate::config::ProtocolsConfig,
    port: u16,
    dir: &Path,
) -> anyhow::Result<crate::net::Bound> {
    crate::net::bind(
        &protocols.msgpack_interface,
        port,
        protocols.msgpack_tls.as_ref(),
        dir,
    )
    .await
    .context("the worker port (protocols.msgpack_experimental_v7.port)")
}

impl Live {
    pub(super) fn serve_http(&self, bound: crate::net::Bound) -> anyhow::Result<Listening> {
        let addr = bound.tcp.local_addr()?;
        tracing::info!(
            "HTTP listening on {}://{addr}/",
            bound.scheme("http", "https")
        );
        let stop = self.cancel.child_token();
        // Long answers (the event stream) end when this server stops.
        let mut state = self.app.clone();
        state.stopping = stop.clone();
        let app = crate::http::router(state);
        let tls = bound.tls.clone();
        let task = tokio::spawn(crate::http::server::serve(bound, app, stop.clone()));
        Ok(Listening { stop, task, tls })
    }

    /// Serves the worker port; `cert` is its TLS certificate file, which
    /// latent workers trust.
    pub(super) fn serve_workers(
        &self,
        bound: crate::net::Bound,
        cert: Option<&str>,
    ) -> anyhow::Result<Listening> {
        let addr = bound.tcp.local_addr()?;
        tracing::info!("workers connect to {}://{addr}/", bound.scheme("ws", "wss"));
        self.distributor.latent.set_master_addr(addr, cert);
        let stop = self.cancel.child_token();
        let tls = bound.tls.clone();
        let task = tokio::spawn(crate::workers::serve(
            bound,
            self.worker_setup.clone(),
            self.registry.clone(),
            self.store.clone(),
            self.master_id,
            self.cancel.clone(),
            stop.clone(),
        ));
        Ok(Listening { stop, task, tls })
    }
}

/// The latent workers of a config (recorded so that the API lists them
/// before they first connect).
pub(super) fn latent_names(config: &MasterConfig) -> Vec<String> {
    config
        .workers
        .iter()
        .filter(|w| w.latent.is_some())
        .map(|w| w.name.clone())
        .collect()
}

/// The configured builders as the store records them.
pub(super) fn builder_rows(config: &MasterConfig) -> Vec<(String, Option<String>, Vec<String>)> {
    config
        .builders
        .iter()
        .map(|b| {
            (
                b.name.to_string(),
                b.description.as_ref().map(|d| d.to_string()),
                b.tags.iter().map(|t| t.to_string()).collect(),
            )
        })
        .collect()
}

pub(super) async fn serve(
    dir: &Path,
    loaded: Loaded,
    store: Store,
    options: ReloadOptions,
) -> anyhow::Result<()> {
    let runtime = loaded.runtime();
    let config = Arc::new(loaded.config);
    let cancel = CancellationToken::new();
    let name = config
        .master_name
        .clone()
        .unwrap_or_else(|| master_name(dir));
    let master_id = store.master_started(&name).await?;
    store
        .register_builders(master_id, builder_rows(&config))
        .await?;
    store.workers_known(latent_names(&config)).await?;
    store.set_log_compression(config.log_compression.code());
    // In a fleet, this master runs the pollers and schedulers it holds the
    // lease of; the heartbeat takes more as others give them up or die.
    let held = match &config.multi_master {
        Some(mm) => Some(
            store
                .hold_leases(master_id, leased_names(&config), mm.dead_after)
                .await?
                .into_iter()
                .collect::<BTreeSet<String>>(),
        ),
        None => None,
    };
    if let Some(h) = &held {
        tracing::info!(
            "multiMaster: this master runs {} of the {} clustered change source(s) and scheduler(s){}",
            h.len(),
            leased_names(&config).len(),
            if h.is_empty() { String::new() } else { format!(": {}", h.iter().cloned().collect::<Vec<_>>().join(", ")) }
        );
    }
    let running = held_services(&config, held.as_ref());
    let (wanted_tx, wanted_rx) = tokio::sync::watch::channel(leased_names(&config));
    let (held_tx, mut held_rx) = tokio::sync::mpsc::channel::<BTreeSet<String>>(4);
    // In a fleet, what pollers and schedulers write stands on their lease.
    let services_store = match &held {
        Some(_) => store.fenced(master_id),
        None => store.clone(),
    };
    let ctx = changes::Context::new(services_store.clone(), dir)?;
    let schedulers = Schedulers::start(
        &running,
        runtime.clone(),
        services_store,
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
        poll_now: ctx.poll_now.clone(),
        poll_health: ctx.poll_health.clone(),
        schedulers: schedulers.clone(),
        builds: distributor.clone(),
        access: Arc::new(std::sync::RwLock::new(crate::http::auth::Access::of(
            config.www.as_ref(),
        ))),
        reload: reload_tx,
        watched: Arc::new(std::sync::RwLock::new(paths(&loaded.files))),
        stopping: CancellationToken::new(),
        started_at: Instant::now(),
        throttle: Default::default(),
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
        held: held.clone(),
        wanted: wanted_tx,
        janitor: tokio::sync::watch::channel(config.janitor.clone()).0,
    };
    live.run_queues();

    match &config.www {
        Some(www) => live.http = Some(live.serve_http(bind_http(www, dir).await?)?),
        None => tracing::info!("no `www` in the config: no HTTP server, so no change hook"),
    }
    store.master_connections_reset(master_id).await?;
    if let Some(port) = config.protocols.msgpack_port {
        live.worker_listener = Some(
            live.serve_workers(
                bind_workers(&config.protocols, port, dir).await?,
                config
                    .protocols
                    .msgpack_tls
                    .as_ref()
                    .map(|t| t.cert.as_str()),
            )?,
        );
    }

    let retried = store.retry_unfinished_builds(master_id).await?;
    if !retried.is_empty() {
        tracing::warn!(
            "{} build(s) were running when the master stopped; they end as RETRY and their requests run again",
            retried.len()
        );
    }
    let distributor_task = tokio::spawn(distributor.clone().run(cancel.clone()));
    let janitor_task = tokio::spawn(super::janitor::run(
        store.clone(),
        live.janitor.subscribe(),
        cancel.clone(),
    ));
    if let Some(remote) = store.remote() {
        tokio::spawn(hear_the_others(
            remote,
            store.clone(),
            schedulers.clone(),
            distributor.clone(),
            cancel.clone(),
        ));
    }
    let (dead_tx, mut declared_dead) = tokio::sync::mpsc::channel::<()>(1);
    let heartbeat_task = config.multi_master.clone().map(|mm| {
        tracing::info!(
            "multiMaster: master {name} (id {master_id}) heart-beats every {} s; a master silent for {} s is declared dead",
            mm.heartbeat,
            mm.dead_after
        );
        tokio::spawn(heartbeat(
            Pulse {
                store: store.clone(),
                me: master_id,
                mm,
                distributor: distributor.clone(),
                cancel: cancel.clone(),
                dead: dead_tx,
            },
            Leases {
                wanted: wanted_rx,
                held: held.clone().unwrap_or_default(),
                changed: held_tx,
            },
        ))
    });

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
    live.pollers.reload(&running.change_source).await;
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
            Some(()) = declared_dead.recv() => break "declared dead by another master",
            Some(h) = held_rx.recv() => {
                live.leases_changed(h).await;
                None
            }
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
    // A database fault no longer holds anything up: what cannot be
    // written now is recovered at the next start.
    store.faults().close();
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
        let _ = janitor_task.await;
        if let Some(t) = heartbeat_task {
            let _ = t.await;
        }
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

/// A multiMaster master's pulse: every `heartbeat` seconds it records that
/// it lives and declares dead the masters silent for `dead_after`, whose
/// requests then come back to the queue (and so the distributor looks
/// again). A master that finds itself declared dead says so on `dead`:
/// its builds were ended and its claims given back, so it stops rather
/// than finish builds that now run elsewhere too.
/// What the heartbeat needs of the master.
struct Pulse {
    store: Store,
    me: i64,
    mm: crate::config::MultiMaster,
    distributor: Arc<crate::builds::Distributor>,
    cancel: CancellationToken,
    dead: tokio::sync::mpsc::Sender<()>,
}

/// The leases the heartbeat keeps: the names the running config wants,
/// those held, and where a change of them is said.
struct Leases {
    wanted: tokio::sync::watch::Receiver<Vec<String>>,
    held: BTreeSet<String>,
    changed: tokio::sync::mpsc::Sender<BTreeSet<String>>,
}

async fn heartbeat(p: Pulse, mut leases: Leases) {
    let Pulse {
        store,
        me,
        mm,
        distributor,
        cancel,
        dead,
    } = p;
    let mut tick = tokio::time::interval(Duration::from_secs(mm.heartbeat));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        match store.master_heartbeat(me).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(
                    "another master declared this one dead (silent for more than {} s): stopping, \
                     so that no build runs twice",
                    mm.dead_after
                );
                let _ = dead.send(()).await;
                return;
            }
            Err(e) => {
                tracing::warn!("heartbeat failed (retrying in {} s): {e:#}", mm.heartbeat);
                continue;
            }
        }
        match store.reap_dead_masters(me, mm.dead_after).await {
            Ok(reaped) => {
                for r in &reaped {
                    tracing::warn!(
                        "master {} (id {}) was silent for more than {} s: declared dead; {} of its build(s) end RETRY, \
                         {} request(s) go back to the queue",
                        r.name,
                        r.masterid,
                        mm.dead_after,
                        r.builds.len(),
                        r.requests.len()
                    );
                }
                if !reaped.is_empty() {
                    distributor.wake();
                }
            }
            Err(e) => tracing::warn!("cannot look for dead masters: {e:#}"),
        }
        let names = leases.wanted.borrow().clone();
        match store.hold_leases(me, names, mm.dead_after).await {
            Ok(now) => {
                let now: BTreeSet<String> = now.into_iter().collect();
                if now != leases.held {
                    for n in now.difference(&leases.held) {
                        tracing::info!("took the lease of {n}: running it here");
                    }
                    for n in leases.held.difference(&now) {
                        tracing::warn!("lost the lease of {n}: stopping it here");
                    }
                    leases.held = now.clone();
                    let _ = leases.changed.send(now).await;
                }
            }
            Err(e) => tracing::warn!("cannot renew this master's leases: {e:#}"),
        }
    }
}

/// What the other masters of a shared database did, as it concerns this
/// one: new or returned requests (or workers and masters coming and going)
/// make its distributor look at the queue at once, a buildset they
/// completed reaches the Trigger steps waiting here, and a stop meant for
/// a build of this master stops it. (Their new changes reach this master's
/// schedulers through the store's change bus.)
async fn hear_the_others(
    mut remote: tokio::sync::broadcast::Receiver<crate::store::notify::Remote>,
    store: Store,
    schedulers: Schedulers,
    distributor: Arc<crate::builds::Distributor>,
    cancel: CancellationToken,
) {
    use crate::store::notify::Remote;
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let heard = tokio::select! {
            r = remote.recv() => r,
            _ = cancel.cancelled() => return,
        };
        match heard {
            Ok(Remote::Note(n)) => match (n.topic, n.event) {
                // A buildset another master completed: a Trigger step here
                // may wait for it.
                ("buildsets", "complete") => match store.get_buildset(n.id).await {
                    Ok(Some(bs)) => {
                        if let (true, Some(results)) = (bs.complete, bs.results) {
                            schedulers.buildset_done(crate::schedulers::BuildsetDone {
                                bsid: bs.bsid,
                                results,
                            });
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("cannot read buildset {}: {e:#}", n.id),
                },
                ("buildrequests", _)
                | ("buildsets", "new")
                | ("workers", _)
                | ("masters", _)
                | ("locks", _) => distributor.wake(),
                _ => {}
            },
            Ok(Remote::Stop {
                master,
                build,
                reason,
            }) if master == distributor.masterid() => {
                if !distributor.stop_build(build, &reason) {
                    tracing::info!("asked to stop build {build}, which is not running here");
                }
            }
            Ok(Remote::Stop { .. }) => {}
            Ok(Remote::Listening) | Err(RecvError::Lagged(_)) => distributor.wake(),
            Err(RecvError::Closed) => return,
        }
    }
}

/// The services of `config` that run on one master of a fleet at a time,
/// by lease: change sources, schedulers that read changes or keep timers,
/// and Dependent schedulers (which follow their upstream's buildsets in the
/// store, wherever they were built). Force and Triggerable schedulers run
/// on every master: each answers the calls made to its own master.
pub(super) fn leased_names(config: &MasterConfig) -> Vec<String> {
    let sources = config
        .change_source
        .iter()
        .map(|s| format!("change_source:{}", s.name()));
    let schedulers = config
        .schedulers
        .iter()
        .filter(|s| is_leased(s))
        .map(|s| format!("scheduler:{}", s.name));
    sources.chain(schedulers).collect()
}

fn is_leased(s: &crate::config::SchedulerConfig) -> bool {
    use crate::config::SchedulerKind as K;
    matches!(
        s.kind,
        K::Scheduler { .. }
            | K::AnyBranchScheduler { .. }
            | K::Nightly { .. }
            | K::Periodic { .. }
            | K::Dependent { .. }
    )
}

/// `config` with only the leased services this master holds (all of them
/// when it is not part of a fleet: `held` is `None`).
pub(super) fn held_services(
    config: &MasterConfig,
    held: Option<&BTreeSet<String>>,
) -> MasterConfig {
    let Some(held) = held else {
        return config.clone();
    };
    let mut c = config.clone();
    c.change_source
        .retain(|s| held.contains(&format!("change_source:{}", s.name())));
    c.schedulers
        .retain(|s| !is_leased(s) || held.contains(&format!("scheduler:{}", s.name)));
    c
}
