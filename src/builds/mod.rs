//! The build request distributor and the build runner.
//!
//! The distributor looks at unclaimed requests (highest priority, then
//! oldest, first), picks for each a connected worker among its builder's
//! `workernames` (the least busy; a worker runs one build per builder at a
//! time and at most `max_builds` in all, and only when the builder's
//! MasterLocks and WorkerLocks can be taken), claims the request in the store
//! (so a build never runs twice) and starts the build. The runner runs the
//! factory's steps in order on the worker, streams their output into the
//! store, and completes the request; a worker lost mid-build ends the build
//! as RETRY and gives the request back, and builds a dead master left
//! unfinished end as RETRY when the master starts again.

mod command;
mod dispatch;
mod locks;
mod logs;
mod render;
mod runner;
mod steps;
mod vcs;

use crate::workers::latent::LatentPool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{BuilderConfig, MasterConfig};
use crate::schedulers::Schedulers;
use crate::script::ScriptRuntime;
use crate::store::Store;
use crate::workers::Registry;

use locks::Busy;

/// How soon a request a script's callback held back is offered again.
const DEFERRED_RETRY: Duration = Duration::from_secs(1);

/// How long the distributor waits after a failed round: doubling from the
/// first to the last. (The store waits out its own passing faults; what
/// reaches here is rarer.)
const FAILED_RETRY: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(30)];

/// One loaded config and the functions its callbacks run against. A build
/// keeps the generation it started with to its end; a reload makes a new
/// one for the builds after it.
pub struct Generation {
    pub config: Arc<MasterConfig>,
    pub runtime: ScriptRuntime,
    /// Each builder's index in `config.builders`, by name: the distributor
    /// looks up the builder of every pending request.
    builder_index: HashMap<String, usize>,
}

impl Generation {
    fn new(config: Arc<MasterConfig>, runtime: ScriptRuntime) -> Generation {
        let builder_index = config
            .builders
            .iter()
            .enumerate()
            .map(|(i, b)| (b.name.to_string(), i))
            .collect();
        Generation {
            config,
            runtime,
            builder_index,
        }
    }

    fn builder(&self, name: &str) -> Option<&Arc<BuilderConfig>> {
        self.builder_index
            .get(name)
            .and_then(|&i| self.config.builders.get(i))
    }
}

/// Why a build request was not cancelled.
#[derive(Debug)]
pub enum CancelError {
    /// There is no such request.
    Missing(i64),
    /// It has completed.
    Complete(i64),
    /// It is claimed, but its build is not running on this master (yet).
    NotRunningHere(i64),
    /// The store failed.
    Store(anyhow::Error),
}

impl std::fmt::Display for CancelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CancelError::Missing(brid) => write!(f, "there is no build request {brid}"),
            CancelError::Complete(brid) => write!(f, "build request {brid} is complete already"),
            CancelError::NotRunningHere(brid) => write!(
                f,
                "build request {brid} is claimed and its build is not running on this master yet; stop its build"
            ),
            CancelError::Store(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for CancelError {}

pub struct Distributor {
    gen: std::sync::RwLock<Arc<Generation>>,
    /// The latent workers: started when requests wait, stopped when idle.
    pub latent: Arc<LatentPool>,
    registry: Arc<Registry>,
    store: Store,
    schedulers: Schedulers,
    masterid: i64,
    /// The master dir: transfer steps' master-side paths are relative to it.
    master_dir: std::path::PathBuf,
    busy: Mutex<Busy>,
    /// Wakes the distributor (a build ended).
    pub wake: Notify,
    /// Callback failures already logged (each is logged once, not every
    /// round).
    warned: Mutex<HashSet<String>>,
    /// Builds running now, by build id, so that they can be stopped.
    running_builds: Mutex<HashMap<i64, Arc<RunningBuild>>>,
    /// Rounds over the queue so far (`/metrics`: an idle master runs none).
    pub rounds: std::sync::atomic::AtomicU64,
}

/// A running build's stop signal.
struct RunningBuild {
    worker: String,
    /// The requests it builds (collapsed ones too).
    requests: Vec<i64>,
    stop: CancellationToken,
    reason: Mutex<String>,
}

use crate::sync::lock;

impl Distributor {
    pub fn new(
        config: Arc<MasterConfig>,
        registry: Arc<Registry>,
        store: Store,
        schedulers: Schedulers,
        runtime: ScriptRuntime,
        masterid: i64,
        master_dir: std::path::PathBuf,
    ) -> Arc<Distributor> {
        let latent = LatentPool::new(&master_dir, store.events().clone());
        latent.configure(&config.workers, config.latent_start_concurrency);
        Arc::new(Distributor {
            gen: std::sync::RwLock::new(Arc::new(Generation::new(config, runtime))),
            latent,
            registry,
            store,
            schedulers,
            masterid,
            master_dir,
            busy: Mutex::default(),
            wake: Notify::new(),
            warned: Mutex::default(),
            running_builds: Mutex::default(),
            rounds: Default::default(),
        })
    }

    /// Distributes until `cancel` fires; running builds are left to end
    /// (or to be retried at the next start).
    ///
    /// Latent workers follow along: their timeouts are kept, and when the
    /// master stops, every one it started is stopped before this returns.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let latent = tokio::spawn(self.latent.clone().run(cancel.clone()));
        let mut presence = self.registry.presence.subscribe();
        let added = self.schedulers.requests_added();
        let mut failed_rounds = 0u32;
        loop {
            self.rounds
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let retry = match self.clone().distribute().await {
                Ok(round) => {
                    failed_rounds = 0;
                    round.deferred.then_some(DEFERRED_RETRY)
                }
                Err(e) => {
                    failed_rounds = failed_rounds.saturating_add(1);
                    let wait = FAILED_RETRY[0]
                        .saturating_mul(1 << (failed_rounds - 1).min(5))
                        .min(FAILED_RETRY[1]);
                    tracing::error!(
                        "distributing build requests failed (again in {} s): {e:#}",
                        wait.as_secs()
                    );
                    Some(wait)
                }
            };
            // The next time something is due that no event announces: a
            // retry, or a latent worker whose start failed becoming
            // startable again.
            let due = [
                retry.map(|d| tokio::time::Instant::now() + d),
                self.latent.next_retry().map(tokio::time::Instant::from_std),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                _ = self.registry.changed.notified() => {}
                _ = self.wake.notified() => {}
                _ = added.notified() => {}
                _ = self.latent.changed.notified() => {}
                p = presence.recv() => match p {
                    Ok(p) => self.latent.presence(&p),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("missed {n} worker connection notices");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                },
                _ = async {
                    match due {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = cancel.cancelled() => break,
            }
        }
        let _ = latent.await;
    }

    /// Looks at the queue again now (requests another master gave back).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// This master's id in the store.
    pub fn masterid(&self) -> i64 {
        self.masterid
    }

    pub fn generation(&self) -> Arc<Generation> {
        crate::sync::read(&self.gen).clone()
    }

    /// Applies a reload: the next builds use `config`; running builds
    /// finish with the generation they started with.
    pub fn reload(&self, config: Arc<MasterConfig>, runtime: ScriptRuntime) {
        self.latent
            .configure(&config.workers, config.latent_start_concurrency);
        *crate::sync::write(&self.gen) = Arc::new(Generation::new(config, runtime));
        lock(&self.warned).clear();
        self.wake.notify_one();
    }

    /// The builds of `builder` running now.
    pub fn running_of_builder(&self, builder: &str) -> usize {
        lock(&self.busy)
            .running
            .values()
            .filter(|b| b.contains(builder))
            .count()
    }

    /// The builds running on `worker` now.
    pub fn running_on(&self, worker: &str) -> usize {
        lock(&self.busy).running.get(worker).map_or(0, HashSet::len)
    }

    /// Logs a callback's failure once (the distributor asks every round).
    fn warn_once(&self, builder: &str, msg: String) {
        let mut warned = lock(&self.warned);
        if warned.len() < 10_000 && warned.insert(format!("{builder}\0{msg}")) {
            tracing::warn!(builder = %builder, "{msg}");
        }
    }

    /// Calls a script callback off the async runtime.
    async fn call(
        &self,
        gen: &Generation,
        cb: &crate::config::Callback,
        args: impl rhai::FuncArgs + Send + 'static,
    ) -> Result<rhai::Dynamic, String> {
        let rt = gen.runtime.clone();
        let what = cb.describe();
        let cb = cb.clone();
        match tokio::task::spawn_blocking(move || rt.call(&cb, args)).await {
            Ok(r) => r,
            Err(e) => Err(format!("{what} did not finish ({e})")),
        }
    }

    /// Stops a running build: its current command is interrupted, the
    /// steps after it do not run, and the build and its requests end
    /// CANCELLED. False if the build is not running here.
    pub fn stop_build(&self, buildid: i64, reason: &str) -> bool {
        let Some(b) = lock(&self.running_builds).get(&buildid).cloned() else {
            return false;
        };
        *lock(&b.reason) = reason.to_string();
        b.stop.cancel();
        tracing::info!(worker = %b.worker, "build {buildid} stopped: {reason}");
        true
    }

    /// Asks the master of the fleet that runs `buildid` to stop it; that
    /// master's name, or `None` when no other master runs it.
    pub async fn stop_elsewhere(&self, buildid: i64, reason: &str) -> Option<String> {
        match self.store.ask_to_stop(buildid, self.masterid, reason).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("cannot ask another master to stop build {buildid}: {e:#}");
                None
            }
        }
    }

    /// Cancels a build request, as Buildbot's `cancel` does: one that waits
    /// completes CANCELLED at once; one being built has its build stopped
    /// (which completes it CANCELLED). An error says why it cannot be.
    pub async fn cancel_request(&self, brid: i64, reason: &str) -> Result<String, CancelError> {
        use crate::store::buildsets::Cancel;
        match self
            .store
            .cancel_request(brid)
            .await
            .map_err(CancelError::Store)?
        {
            Cancel::Cancelled => {
                tracing::info!("build request {brid} cancelled: {reason}");
                self.wake.notify_one();
                Ok(format!("build request {brid} cancelled"))
            }
            Cancel::Missing => Err(CancelError::Missing(brid)),
            Cancel::Complete => Err(CancelError::Complete(brid)),
            Cancel::Claimed => {
                let building = lock(&self.running_builds)
                    .iter()
                    .find(|(_, b)| b.requests.contains(&brid))
                    .map(|(id, _)| *id);
                match building {
                    Some(buildid) if self.stop_build(buildid, reason) => Ok(format!(
                        "build request {brid} is being built: build {buildid} was stopped"
                    )),
                    _ => {
                        // Another master of the fleet may be building it.
                        let elsewhere = match self.store.running_build_of(brid).await {
                            Ok(Some(buildid)) => self
                                .stop_elsewhere(buildid, reason)
                                .await
                                .map(|m| (buildid, m)),
                            _ => None,
                        };
                        match elsewhere {
                            Some((buildid, master)) => Ok(format!(
                                "build request {brid} is being built on master {master}: build {buildid} is asked to stop"
                            )),
                            None => Err(CancelError::NotRunningHere(brid)),
                        }
                    }
                }
            }
        }
    }

    /// Shuts a connected worker down: gracefully (it takes no new builds
    /// and is told to shut down once its running builds end) or at once
    /// (its running builds end RETRY and run again elsewhere).
    pub async fn shutdown_worker(&self, name: &str, graceful: bool) -> anyhow::Result<String> {
        let Some(conn) = self.registry.get(name) else {
            anyhow::bail!("worker `{name}` is not connected");
        };
        if graceful {
            conn.draining
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let running = lock(&self.busy).running.get(name).map_or(0, HashSet::len);
            if running > 0 {
                tracing::info!(worker = %name, "will shut down when its {running} build(s) end");
                return Ok(format!(
                    "worker `{name}` takes no new builds and shuts down when its {running} running build(s) end"
                ));
            }
            self.shutdown_if_drained(name).await;
            return Ok(format!("worker `{name}` was told to shut down"));
        }
        tracing::info!(worker = %name, "shutting down at once");
        if let Err(e) = tokio::time::timeout(Duration::from_secs(5), conn.shutdown()).await {
            tracing::warn!(worker = %name, "no answer to shutdown ({e}); disconnecting it");
        }
        conn.closed.cancel();
        Ok(format!("worker `{name}` was shut down"))
    }

    /// Tells a draining worker to shut down when it has no builds left
    /// (once per connection).
    async fn shutdown_if_drained(&self, name: &str) {
        use std::sync::atomic::Ordering;
        let Some(conn) = self.registry.get(name) else {
            return;
        };
        if !conn.draining.load(Ordering::SeqCst) {
            return;
        }
        if lock(&self.busy)
            .running
            .get(name)
            .is_some_and(|r| !r.is_empty())
        {
            return;
        }
        if conn.shutdown_sent.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::info!(worker = %name, "idle: telling it to shut down");
        if let Err(e) = conn.shutdown().await {
            // It may well have gone before answering.
            tracing::info!(worker = %name, "shutdown: {e:#}");
        }
    }
}
