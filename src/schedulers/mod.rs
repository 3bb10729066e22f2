//! Schedulers: changes in, buildsets and build requests out, as Buildbot's
//! schedulers make them.
//!
//! Each scheduler is one task. Change-based ones (`Scheduler`,
//! `AnyBranchScheduler`, `Nightly`) read the changes stored after the last
//! one they handled (the bus only wakes them, so a lagging or restarted
//! scheduler misses nothing), classify each with `fileIsImportant`, and
//! store the classification, the buildsets it causes, the last change
//! handled and their timers in one transaction. A `treeStableTimer` or cron
//! deadline is stored as wall-clock time, so a restart resumes it.
//! `Triggerable` and `ForceScheduler` make buildsets on request;
//! `Dependent` when an upstream buildset succeeds (it reads the upstream's
//! buildsets from the store, so it sees those of every master and of its
//! own downtime); `Periodic` on its timer.

pub mod cron;

mod dependent;
mod filter;
mod task;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{MasterConfig, SchedulerConfig, SchedulerKind};
use crate::script::ScriptRuntime;
use crate::store::buildsets::{BuildsetIds, SourceStamp};
use crate::store::ChangeBus;
use crate::store::{Properties, Store};

pub use filter::{explain, Verdict};
use task::Task;

/// Wall-clock time that follows tokio's clock, so that tests with a paused
/// clock move both together.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base_wall: f64,
    base: tokio::time::Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    pub fn new() -> Clock {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Clock {
            base_wall: wall,
            base: tokio::time::Instant::now(),
        }
    }

    /// Unix seconds now.
    pub fn now(&self) -> f64 {
        self.base_wall + self.base.elapsed().as_secs_f64()
    }

    /// The tokio instant of a wall-clock time.
    fn instant(&self, wall: f64) -> tokio::time::Instant {
        let delta = wall - self.base_wall;
        if delta <= 0.0 {
            self.base
        } else {
            self.base + Duration::from_secs_f64(delta.min(1e9))
        }
    }
}

/// A buildset finished, with its results (published by whoever completes
/// build requests; `Dependent` schedulers and waiting `Trigger` steps
/// listen).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BuildsetDone {
    pub bsid: i64,
    pub results: i64,
}

/// What `force` and `trigger` are asked.
#[derive(Clone, Debug, Default)]
pub struct ForceRequest {
    /// Builders to build; empty means all of the scheduler's.
    pub builders: Vec<String>,
    pub branch: Option<String>,
    pub revision: Option<String>,
    pub repository: String,
    pub project: String,
    pub reason: String,
    pub owner: String,
    pub properties: BTreeMap<String, Value>,
}

enum Call {
    Force(ForceRequest, oneshot::Sender<anyhow::Result<BuildsetIds>>),
    Trigger {
        sourcestamps: Vec<SourceStamp>,
        properties: Properties,
        parent_buildid: Option<i64>,
        reply: oneshot::Sender<anyhow::Result<BuildsetIds>>,
    },
}

/// The running schedulers.
#[derive(Clone)]
pub struct Schedulers {
    running: Arc<std::sync::RwLock<HashMap<String, Entry>>>,
    done: broadcast::Sender<BuildsetDone>,
    shared: Arc<Shared>,
    bus: ChangeBus,
    /// The master's: stops every scheduler.
    cancel: CancellationToken,
}

/// One running scheduler.
struct Entry {
    cfg: SchedulerConfig,
    tx: mpsc::Sender<Call>,
    /// Stops this scheduler alone (a reload that removes or changes it).
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct Shared {
    store: Store,
    /// The current config's functions; a reload replaces them.
    runtime: std::sync::RwLock<ScriptRuntime>,
    clock: Clock,
    /// The last change each change-based scheduler has handled.
    progress: std::sync::Mutex<HashMap<String, i64>>,
    /// Woken when build requests are stored.
    requests_added: Arc<tokio::sync::Notify>,
}

/// How long a reload waits for a replaced scheduler to finish what it is
/// doing (a store write) before starting its successor anyway.
const STOP_WAIT: Duration = Duration::from_secs(30);

impl Schedulers {
    /// Starts a task per scheduler; they stop when `cancel` fires.
    pub fn start(
        config: &MasterConfig,
        runtime: ScriptRuntime,
        store: Store,
        clock: Clock,
        cancel: &CancellationToken,
    ) -> Schedulers {
        let (done, _) = broadcast::channel(1024);
        let bus = store.change_bus().clone();
        let shared = Arc::new(Shared {
            store,
            runtime: std::sync::RwLock::new(runtime),
            clock,
            progress: Default::default(),
            requests_added: Arc::default(),
        });
        let me = Schedulers {
            running: Arc::default(),
            done,
            shared,
            bus,
            cancel: cancel.clone(),
        };
        let mut running = me.write();
        for cfg in &config.schedulers {
            running.insert(cfg.name.clone(), me.spawn(cfg));
        }
        drop(running);
        me
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        crate::sync::read(&self.running)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        crate::sync::write(&self.running)
    }

    fn spawn(&self, cfg: &SchedulerConfig) -> Entry {
        let (tx, rx) = mpsc::channel(64);
        let task = Task {
            cfg: cfg.clone(),
            shared: self.shared.clone(),
            object: None,
            started_at: crate::store::now(),
        };
        let wake = self.bus.subscribe();
        let done_rx = self.done.subscribe();
        let stop = self.cancel.child_token();
        let until = stop.clone();
        let handle = tokio::spawn(async move {
            let name = task.cfg.name.clone();
            task.run(wake, done_rx, rx, until).await;
            tracing::debug!(scheduler = %name, "stopped");
        });
        Entry {
            cfg: cfg.clone(),
            tx,
            stop,
            task: Some(handle),
        }
    }

    /// Applies a reload: schedulers that are gone or changed stop (each
    /// finishing what it is doing), changed and new ones start; the others
    /// keep running and use the new config's functions from now on. A
    /// scheduler that keeps its name keeps its stored state (last change
    /// handled, classified changes, timers): its successor reads it.
    pub async fn reload(&self, config: &MasterConfig, runtime: ScriptRuntime) {
        *crate::sync::write(&self.shared.runtime) = runtime;
        let wanted: HashMap<&str, &SchedulerConfig> = config
            .schedulers
            .iter()
            .map(|c| (c.name.as_str(), &**c))
            .collect();
        let mut stopping = Vec::new();
        {
            let mut running = self.write();
            let names: Vec<String> = running.keys().cloned().collect();
            for name in names {
                let keep = match (running.get(&name), wanted.get(name.as_str())) {
                    (Some(e), Some(new)) => crate::config::diff::same_printed(&e.cfg, *new),
                    _ => false,
                };
                if !keep {
                    if let Some(mut e) = running.remove(&name) {
                        e.stop.cancel();
                        stopping.push((name, e.task.take()));
                    }
                }
            }
        }
        for (name, task) in stopping {
            if let Some(t) = task {
                if tokio::time::timeout(STOP_WAIT, t).await.is_err() {
                    tracing::warn!(scheduler = %name, "did not stop within {} s", STOP_WAIT.as_secs());
                }
            }
        }
        let mut running = self.write();
        for cfg in &config.schedulers {
            if !running.contains_key(&cfg.name) {
                let e = self.spawn(cfg);
                running.insert(cfg.name.clone(), e);
            }
        }
    }

    /// Waits (after the master's cancel) until every scheduler has stopped.
    pub async fn stopped(&self) {
        let tasks: Vec<_> = self
            .write()
            .values_mut()
            .filter_map(|e| e.task.take())
            .collect();
        for t in tasks {
            if let Err(e) = t.await {
                tracing::warn!("a scheduler task failed: {e}");
            }
        }
    }

    /// The last change the scheduler `name` has handled (change-based
    /// schedulers, once they have started).
    pub fn handled_up_to(&self, name: &str) -> Option<i64> {
        crate::sync::lock(&self.shared.progress).get(name).copied()
    }

    /// Notified whenever a scheduler stores build requests.
    pub fn requests_added(&self) -> Arc<tokio::sync::Notify> {
        self.shared.requests_added.clone()
    }

    /// Tells `Dependent` schedulers (and waiting `Trigger` steps) that a
    /// buildset finished.
    pub fn buildset_done(&self, d: BuildsetDone) {
        let _ = self.done.send(d);
    }

    /// Finished buildsets from now on.
    pub fn subscribe_done(&self) -> broadcast::Receiver<BuildsetDone> {
        self.done.subscribe()
    }

    /// The ForceSchedulers, for the API.
    /// The script runtime the schedulers' callbacks run in now.
    pub fn runtime(&self) -> ScriptRuntime {
        crate::sync::read(&self.shared.runtime).clone()
    }

    pub fn force_schedulers(&self) -> Vec<SchedulerConfig> {
        let mut v: Vec<SchedulerConfig> = self
            .read()
            .values()
            .map(|e| &e.cfg)
            .filter(|c| matches!(c.kind, SchedulerKind::ForceScheduler { .. }))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    async fn ask(
        &self,
        name: &str,
        make: impl FnOnce(oneshot::Sender<anyhow::Result<BuildsetIds>>) -> Call,
    ) -> anyhow::Result<BuildsetIds> {
        let tx = self
            .read()
            .get(name)
            .map(|e| e.tx.clone())
            .ok_or_else(|| anyhow!("no scheduler named `{name}`"))?;
        let (reply, answer) = oneshot::channel();
        tx.send(make(reply))
            .await
            .map_err(|_| anyhow!("scheduler `{name}` has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow!("scheduler `{name}` stopped before answering"))?
    }

    /// A forced build through the ForceScheduler `name`.
    pub async fn force(&self, name: &str, req: ForceRequest) -> anyhow::Result<BuildsetIds> {
        match self.read().get(name).map(|e| &e.cfg.kind) {
            Some(SchedulerKind::ForceScheduler { .. }) => {}
            Some(_) => bail!("scheduler `{name}` is not a ForceScheduler"),
            None => bail!("no scheduler named `{name}`"),
        }
        self.ask(name, |reply| Call::Force(req, reply)).await
    }

    /// What a `Trigger` step does: a buildset from the Triggerable `name`.
    pub async fn trigger(
        &self,
        name: &str,
        sourcestamps: Vec<SourceStamp>,
        properties: Properties,
        parent_buildid: Option<i64>,
    ) -> anyhow::Result<BuildsetIds> {
        match self.read().get(name).map(|e| &e.cfg.kind) {
            Some(SchedulerKind::Triggerable) => {}
            Some(_) => bail!("scheduler `{name}` is not Triggerable"),
            None => bail!("no scheduler named `{name}`"),
        }
        self.ask(name, |reply| Call::Trigger {
            sourcestamps,
            properties,
            parent_buildid,
            reply,
        })
        .await
    }
}
