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
//! `Dependent` when an upstream buildset succeeds; `Periodic` on its timer.

pub mod cron;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::changes::ChangeBus;
use crate::config::{Callback, MasterConfig, SchedulerConfig, SchedulerKind};
use crate::script::ScriptRuntime;
use crate::store::buildsets::{BuildsetIds, NewBuildset, SchedulerWrite, Source, SourceStamp};
use crate::store::{Change, ObjectId, Properties, Store};

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
/// build requests; `Dependent` schedulers listen).
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
        bus: &ChangeBus,
        clock: Clock,
        cancel: &CancellationToken,
    ) -> Schedulers {
        let (done, _) = broadcast::channel(1024);
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
            bus: bus.clone(),
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
        self.running.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.running.write().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn(&self, cfg: &SchedulerConfig) -> Entry {
        let (tx, rx) = mpsc::channel(64);
        let task = Task {
            cfg: cfg.clone(),
            shared: self.shared.clone(),
            object: None,
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
        *self
            .shared
            .runtime
            .write()
            .unwrap_or_else(|e| e.into_inner()) = runtime;
        let wanted: HashMap<&str, &SchedulerConfig> = config
            .schedulers
            .iter()
            .map(|c| (c.name.as_str(), c))
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
        self.shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
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

/// A change as scripts see it (`fileIsImportant` gets this map).
pub fn change_map(c: &Change) -> rhai::Dynamic {
    let ch = &c.change;
    let props: serde_json::Map<String, Value> = ch
        .properties
        .iter()
        .map(|(k, (v, _))| (k.clone(), v.clone()))
        .collect();
    let v = json!({
        "changeid": c.changeid,
        "number": c.changeid,
        "author": ch.author,
        "who": ch.author,
        "committer": ch.committer,
        "comments": ch.comments,
        "files": ch.files,
        "branch": ch.branch,
        "revision": ch.revision,
        "revlink": ch.revlink,
        "when": ch.when_timestamp,
        "when_timestamp": ch.when_timestamp,
        "category": ch.category,
        "repository": ch.repository,
        "project": ch.project,
        "codebase": ch.codebase,
        "properties": props,
    });
    rhai::serde::to_dynamic(v).unwrap_or(rhai::Dynamic::UNIT)
}

/// What a scheduler's change filter and classification need.
struct Filter<'a> {
    branch: Option<&'a Option<String>>,
    branches: Option<&'a Vec<String>>,
    repository: Option<&'a str>,
    project: Option<&'a str>,
    file_is_important: Option<&'a Callback>,
    only_important: bool,
    tree_stable_timer: Option<u64>,
}

struct Task {
    cfg: SchedulerConfig,
    shared: Arc<Shared>,
    object: Option<ObjectId>,
}

const LAST_CHANGE: &str = "lastChangeId";
const TIMERS: &str = "timers";
const BATCH: usize = 500;

impl Task {
    fn filter(&self) -> Option<Filter<'_>> {
        filter_of(&self.cfg)
    }
}

/// The change filter of a change-based scheduler; `None` for the others.
fn filter_of(cfg: &SchedulerConfig) -> Option<Filter<'_>> {
    {
        match &cfg.kind {
            SchedulerKind::Scheduler {
                branch,
                repository,
                project,
                tree_stable_timer,
                file_is_important,
                only_important,
            } => Some(Filter {
                branch: Some(branch),
                branches: None,
                repository: repository.as_deref(),
                project: project.as_deref(),
                file_is_important: file_is_important.as_ref(),
                only_important: *only_important,
                tree_stable_timer: *tree_stable_timer,
            }),
            SchedulerKind::AnyBranchScheduler {
                branches,
                tree_stable_timer,
                file_is_important,
                only_important,
            } => Some(Filter {
                branch: None,
                branches: branches.as_ref(),
                repository: None,
                project: None,
                file_is_important: file_is_important.as_ref(),
                only_important: *only_important,
                tree_stable_timer: *tree_stable_timer,
            }),
            SchedulerKind::Nightly { branch, .. } => Some(Filter {
                branch: Some(branch),
                branches: None,
                repository: None,
                project: None,
                file_is_important: None,
                only_important: false,
                // Changes wait for the cron time, not for a quiet tree.
                tree_stable_timer: Some(u64::MAX),
            }),
            _ => None,
        }
    }
}

/// Why the filter `f` turns the change `ch` away, or `None` if it takes it.
fn rejects(f: &Filter<'_>, ch: &crate::store::NewChange) -> Option<String> {
    let show = |b: &Option<String>| b.clone().unwrap_or_else(|| "the default branch".into());
    if let Some(b) = f.branch {
        if b != &ch.branch {
            return Some(format!("it takes {}, not {}", show(b), show(&ch.branch)));
        }
    }
    if let Some(bs) = f.branches {
        match &ch.branch {
            Some(b) if bs.contains(b) => {}
            _ => {
                return Some(format!(
                    "its branches are {bs:?}, which do not include {}",
                    show(&ch.branch)
                ))
            }
        }
    }
    if let Some(r) = f.repository {
        if r != ch.repository {
            return Some(format!("it takes repository {r}, not {}", ch.repository));
        }
    }
    if let Some(p) = f.project {
        if p != ch.project {
            return Some(format!("it takes project {p}, not {}", ch.project));
        }
    }
    None
}

/// What a scheduler would do with a change, as `kiln repl`'s `explain`
/// tells it.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// It builds (at once, or when its treeStableTimer fires).
    Builds { after_seconds: Option<u64> },
    /// It keeps the change (not important) for the next important one.
    Keeps(String),
    /// It does not take the change, and why.
    No(String),
}

/// What `cfg` would do with `change` (its filter, then `fileIsImportant`
/// run by `runtime`).
pub fn explain(cfg: &SchedulerConfig, change: &Change, runtime: &ScriptRuntime) -> Verdict {
    let Some(f) = filter_of(cfg) else {
        return Verdict::No(format!("a {} takes no changes", cfg.kind.type_name()));
    };
    if let Some(why) = rejects(&f, &change.change) {
        return Verdict::No(why);
    }
    let important = match f.file_is_important {
        None => true,
        Some(cb) => match runtime.call(cb, (change_map(change),)) {
            Ok(v) => v.as_bool().unwrap_or(true),
            // The master counts a failing function's change as important.
            Err(_) => true,
        },
    };
    match (important, f.only_important) {
        (true, _) => Verdict::Builds {
            after_seconds: match f.tree_stable_timer {
                None | Some(0) | Some(u64::MAX) => None,
                Some(s) => Some(s),
            },
        },
        (false, true) => Verdict::No(
            "fileIsImportant says the change is not important, and onlyImportant drops it".into(),
        ),
        (false, false) => Verdict::Keeps(
            "fileIsImportant says the change is not important: it builds with the next important change".into(),
        ),
    }
}

impl Task {
    fn kind_name(&self) -> &'static str {
        match self.cfg.kind {
            SchedulerKind::Scheduler { .. } => "SingleBranchScheduler",
            _ => self.cfg.kind.type_name(),
        }
    }

    async fn object(&mut self) -> anyhow::Result<ObjectId> {
        if let Some(o) = self.object {
            return Ok(o);
        }
        let o = self
            .shared
            .store
            .object_id(&self.cfg.name, self.kind_name())
            .await?;
        self.object = Some(o);
        Ok(o)
    }

    fn base_properties(&self) -> Properties {
        let mut p: Properties = self
            .cfg
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), (v.clone(), "Scheduler".to_string())))
            .collect();
        p.insert(
            "scheduler".into(),
            (Value::String(self.cfg.name.clone()), "Scheduler".into()),
        );
        p
    }

    fn buildset(&self, source: Source, reason: String, mut properties: Properties) -> NewBuildset {
        for (k, v) in self.base_properties() {
            properties.entry(k).or_insert(v);
        }
        NewBuildset {
            scheduler: self.cfg.name.clone(),
            reason,
            external_idstring: None,
            source,
            properties,
            builders: self.cfg.builder_names.clone(),
            priority: self.cfg.priority.unwrap_or(0),
            parent_buildid: None,
        }
    }

    fn reason(&self) -> String {
        format!(
            "The {} scheduler named '{}' triggered this build",
            self.kind_name(),
            self.cfg.name
        )
    }

    async fn run(
        mut self,
        mut wake: broadcast::Receiver<Arc<Change>>,
        mut done: broadcast::Receiver<BuildsetDone>,
        mut commands: mpsc::Receiver<Call>,
        cancel: CancellationToken,
    ) {
        let name = self.cfg.name.clone();
        let mut failures = 0u32;
        let mut state = loop {
            match self.load_state().await {
                Ok(s) => break s,
                Err(e) => {
                    failures += 1;
                    tracing::error!(scheduler = %name, "cannot read the scheduler's state: {e:#}");
                    let wait = Duration::from_secs(1 << failures.min(6));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => return,
                    }
                }
            }
        };
        let mut change_based = self.filter().is_some();
        // Catch up with what was stored while this scheduler was not running.
        let mut scan = true;
        let mut incoming: Vec<Arc<Change>> = Vec::new();
        loop {
            if change_based && (scan || !incoming.is_empty()) {
                let batch = std::mem::take(&mut incoming);
                match self.handle_new_changes(&mut state, batch, scan).await {
                    Ok(()) => {
                        scan = false;
                        self.report_progress(state.last);
                    }
                    Err(e) => {
                        tracing::error!(scheduler = %name, "handling new changes failed: {e:#}; retrying in 1 s");
                        scan = true;
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = cancel.cancelled() => return,
                        }
                        continue;
                    }
                }
            }
            if let Err(e) = self.fire_due(&mut state).await {
                tracing::error!(scheduler = %name, "a timer's buildset failed: {e:#}; retrying");
                state.retry_soon(self.shared.clock.now());
            }
            let next = state.next_deadline();
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(self.shared.clock.instant(t)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = wake.recv(), if change_based => match r {
                    Ok(c) => {
                        incoming.push(c);
                        while incoming.len() < BATCH {
                            match wake.try_recv() {
                                Ok(c) => incoming.push(c),
                                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                                    scan = true;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => scan = true,
                    // No more changes will come; keep serving timers and commands.
                    Err(broadcast::error::RecvError::Closed) => change_based = false,
                },
                r = done.recv() => {
                    if let Ok(d) = r {
                        if let Err(e) = self.upstream_done(d).await {
                            tracing::error!(scheduler = %name, "cannot start after buildset {}: {e:#}", d.bsid);
                        }
                    }
                }
                Some(cmd) = commands.recv() => self.command(cmd).await,
                _ = sleep => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    async fn load_state(&mut self) -> anyhow::Result<State> {
        let obj = self.object().await?;
        let store = &self.shared.store;
        let last = match store.get_state(obj, LAST_CHANGE).await? {
            Some(v) => v.as_i64().unwrap_or(0),
            None => {
                // A new scheduler sees the changes that arrive from now on.
                let max = store.max_changeid().await?;
                store.set_state(obj, LAST_CHANGE, json!(max)).await?;
                max
            }
        };
        let timers: BTreeMap<String, f64> = match store.get_state(obj, TIMERS).await? {
            Some(v) => serde_json::from_value(v).unwrap_or_default(),
            None => BTreeMap::new(),
        };
        let resumed = timers.len();
        let mut state = State {
            last,
            persisted: last,
            timers,
        };
        let now = self.shared.clock.now();
        match &self.cfg.kind {
            SchedulerKind::Nightly { .. } if !state.timers.contains_key(NIGHTLY) => {
                if let Some(t) = self.next_cron(now) {
                    state.timers.insert(NIGHTLY.into(), t);
                }
            }
            SchedulerKind::Periodic {
                periodic_build_timer,
            } => {
                // As Buildbot: the first build at once, then every period.
                state.timers.entry(PERIODIC.into()).or_insert(now);
                let _ = periodic_build_timer;
            }
            _ => {}
        }
        if resumed > 0 {
            tracing::info!(scheduler = %self.cfg.name, "resuming {resumed} stored timer(s)");
        }
        Ok(state)
    }

    fn next_cron(&self, after: f64) -> Option<f64> {
        let SchedulerKind::Nightly {
            minute,
            hour,
            day_of_month,
            month,
            day_of_week,
            ..
        } = &self.cfg.kind
        else {
            return None;
        };
        let c = cron::Cron {
            minute: minute.clone(),
            hour: hour.clone(),
            day_of_month: day_of_month.clone(),
            month: month.clone(),
            day_of_week: day_of_week.clone(),
        };
        let at = chrono::DateTime::from_timestamp(after as i64, 0)?.with_timezone(&chrono::Local);
        c.next_after(&at).map(|t| t.timestamp() as f64)
    }

    /// Handles the changes after `state.last`: those just published when
    /// they follow on without a gap, otherwise (a restart, a lagging
    /// receiver, publishers out of order) whatever the store has.
    async fn handle_new_changes(
        &mut self,
        state: &mut State,
        incoming: Vec<Arc<Change>>,
        scan: bool,
    ) -> anyhow::Result<()> {
        let obj = self.object().await?;
        if !scan {
            let fresh: Vec<&Change> = incoming
                .iter()
                .filter(|c| c.changeid > state.last)
                .map(|c| &**c)
                .collect();
            let contiguous = fresh
                .iter()
                .enumerate()
                .all(|(i, c)| c.changeid == state.last + 1 + i as i64);
            if contiguous {
                return self.process(obj, state, &fresh).await;
            }
        }
        loop {
            let batch = self.shared.store.changes_since(state.last, BATCH).await?;
            if batch.is_empty() {
                return Ok(());
            }
            let refs: Vec<&Change> = batch.iter().collect();
            self.process(obj, state, &refs).await?;
        }
    }

    /// Classifies `changes` (consecutive, after `state.last`) and stores
    /// what that makes. Changes that are not this scheduler's cost no
    /// write; the position is stored with the next write, or every
    /// thousand changes.
    async fn process(
        &mut self,
        obj: ObjectId,
        state: &mut State,
        changes: &[&Change],
    ) -> anyhow::Result<()> {
        let Some(last) = changes.last().map(|c| c.changeid) else {
            return Ok(());
        };
        let mut w = SchedulerWrite::default();
        let mut timers = state.timers.clone();
        for c in changes {
            let Some(f) = self.filter() else { break };
            if rejects(&f, &c.change).is_some() {
                continue;
            }
            let important = match f.file_is_important {
                None => true,
                Some(cb) => self.classify(cb, c).await,
            };
            if !important && f.only_important {
                continue;
            }
            match f.tree_stable_timer {
                None | Some(0) => {
                    if important {
                        w.buildsets.push(self.buildset(
                            Source::Changes(vec![c.changeid]),
                            self.reason(),
                            change_properties(std::slice::from_ref(*c)),
                        ));
                    }
                }
                Some(secs) => {
                    w.classify.push((c.changeid, important));
                    if important && secs != u64::MAX {
                        let key = branch_key(&c.change.branch);
                        timers.insert(key, self.shared.clock.now() + secs as f64);
                    }
                }
            }
        }
        let dirty = !w.classify.is_empty()
            || !w.buildsets.is_empty()
            || timers != state.timers
            || last - state.persisted >= 1000;
        if dirty {
            w.state = vec![
                (LAST_CHANGE.into(), json!(last)),
                (TIMERS.into(), json!(timers)),
            ];
            let made = self.shared.store.scheduler_write(obj, w).await?;
            self.log_made(&made);
            state.persisted = last;
        }
        state.last = last;
        state.timers = timers;
        self.report_progress(last);
        Ok(())
    }

    fn report_progress(&self, last: i64) {
        self.shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.cfg.name.clone(), last);
    }

    fn log_made(&self, made: &[BuildsetIds]) {
        if !made.is_empty() {
            self.shared.requests_added.notify_one();
        }
        for ids in made {
            tracing::info!(
                scheduler = %self.cfg.name,
                "buildset {} with {} build request(s)",
                ids.bsid,
                ids.brids.len()
            );
        }
    }

    /// `fileIsImportant`, off the async runtime; any failure counts the
    /// change as important (the safe default) and is logged.
    async fn classify(&self, cb: &Callback, c: &Change) -> bool {
        let rt = self
            .shared
            .runtime
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let cb = cb.clone();
        let arg = change_map(c);
        let r = tokio::task::spawn_blocking(move || rt.call(&cb, (arg,))).await;
        let name = &self.cfg.name;
        match r {
            Ok(Ok(v)) => match v.as_bool() {
                Ok(b) => b,
                Err(t) => {
                    tracing::warn!(
                        scheduler = %name,
                        "fileIsImportant returned a {t}, not a bool, for change {}; counting it as important",
                        c.changeid
                    );
                    true
                }
            },
            Ok(Err(msg)) => {
                tracing::warn!(
                    scheduler = %name,
                    "{msg}; counting change {} as important",
                    c.changeid
                );
                true
            }
            Err(e) => {
                tracing::warn!(scheduler = %name, "fileIsImportant did not finish ({e}); counting change {} as important", c.changeid);
                true
            }
        }
    }

    /// Fires every timer that is due.
    async fn fire_due(&mut self, state: &mut State) -> anyhow::Result<()> {
        let now = self.shared.clock.now();
        let due: Vec<(String, f64)> = state
            .timers
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, t)| (k.clone(), *t))
            .collect();
        for (key, at) in due {
            let obj = self.object().await?;
            let mut timers = state.timers.clone();
            timers.remove(&key);
            let mut w = SchedulerWrite::default();
            match &self.cfg.kind {
                SchedulerKind::Nightly {
                    only_if_changed,
                    branch,
                    ..
                } => {
                    let pending = self.shared.store.classified(obj).await?;
                    let ids: Vec<i64> = pending.iter().map(|c| c.changeid).collect();
                    let important = pending.iter().any(|c| c.important);
                    if !ids.is_empty() && important {
                        w.flush = ids.clone();
                        let changes = self.load_changes(&ids).await?;
                        w.buildsets.push(self.buildset(
                            Source::Changes(ids),
                            self.reason(),
                            change_properties(&changes),
                        ));
                    } else if !only_if_changed {
                        w.flush = ids;
                        w.buildsets.push(self.buildset(
                            Source::New(vec![SourceStamp {
                                branch: branch.clone(),
                                ..SourceStamp::default()
                            }]),
                            self.reason(),
                            Properties::new(),
                        ));
                    } else {
                        tracing::info!(scheduler = %self.cfg.name, "no changes since the last build: not building (onlyIfChanged)");
                    }
                    if let Some(next) = self.next_cron(now.max(at)) {
                        timers.insert(NIGHTLY.into(), next);
                    }
                }
                SchedulerKind::Periodic {
                    periodic_build_timer,
                } => {
                    w.buildsets.push(self.buildset(
                        Source::New(vec![SourceStamp::default()]),
                        self.reason(),
                        Properties::new(),
                    ));
                    timers.insert(PERIODIC.into(), now + (*periodic_build_timer).max(1) as f64);
                }
                _ => {
                    // A treeStableTimer: the branch has been quiet long enough.
                    let pending = self.shared.store.classified(obj).await?;
                    let on_branch: Vec<_> = pending
                        .into_iter()
                        .filter(|c| branch_key(&c.branch) == key)
                        .collect();
                    let ids: Vec<i64> = on_branch.iter().map(|c| c.changeid).collect();
                    w.flush = ids.clone();
                    if on_branch.iter().any(|c| c.important) {
                        let changes = self.load_changes(&ids).await?;
                        w.buildsets.push(self.buildset(
                            Source::Changes(ids),
                            self.reason(),
                            change_properties(&changes),
                        ));
                    }
                }
            }
            w.state = vec![(TIMERS.into(), json!(timers))];
            let made = self.shared.store.scheduler_write(obj, w).await?;
            self.log_made(&made);
            state.timers = timers;
        }
        Ok(())
    }

    async fn load_changes(&self, ids: &[i64]) -> anyhow::Result<Vec<Change>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(c) = self.shared.store.get_change(*id).await? {
                out.push(c);
            }
        }
        Ok(out)
    }

    async fn upstream_done(&mut self, d: BuildsetDone) -> anyhow::Result<()> {
        let SchedulerKind::Dependent { upstream } = &self.cfg.kind else {
            return Ok(());
        };
        // SUCCESS or WARNINGS, as Buildbot's Dependent requires.
        if d.results > 1 {
            return Ok(());
        }
        let Some(bs) = self.shared.store.get_buildset(d.bsid).await? else {
            return Ok(());
        };
        if bs.scheduler.as_deref() != Some(upstream.as_str()) {
            return Ok(());
        }
        let ids = self
            .shared
            .store
            .add_buildset(self.buildset(
                Source::SourceStamps(bs.sourcestamps.clone()),
                format!("downstream of buildset {} from '{upstream}'", bs.bsid),
                Properties::new(),
            ))
            .await?;
        self.log_made(std::slice::from_ref(&ids));
        Ok(())
    }

    async fn command(&mut self, cmd: Call) {
        match cmd {
            Call::Force(req, reply) => {
                let _ = reply.send(self.force(req).await);
            }
            Call::Trigger {
                sourcestamps,
                properties,
                parent_buildid,
                reply,
            } => {
                let mut bs = self.buildset(Source::New(sourcestamps), self.reason(), properties);
                bs.parent_buildid = parent_buildid;
                let r = self.shared.store.add_buildset(bs).await;
                if let Ok(ids) = &r {
                    self.log_made(std::slice::from_ref(ids));
                }
                let _ = reply.send(r);
            }
        }
    }

    async fn force(&mut self, req: ForceRequest) -> anyhow::Result<BuildsetIds> {
        let builders = if req.builders.is_empty() {
            self.cfg.builder_names.clone()
        } else {
            for b in &req.builders {
                if !self.cfg.builder_names.contains(b) {
                    bail!(
                        "ForceScheduler `{}` cannot build `{b}`; it builds: {}",
                        self.cfg.name,
                        self.cfg.builder_names.join(", ")
                    );
                }
            }
            req.builders.clone()
        };
        let props: Properties = req
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), (v.clone(), "Force Build Form".to_string())))
            .collect();
        let owner = if req.owner.is_empty() {
            "<unknown>"
        } else {
            &req.owner
        };
        let reason = if req.reason.is_empty() {
            format!("A build was forced by '{owner}'")
        } else {
            format!("A build was forced by '{owner}': {}", req.reason)
        };
        let mut bs = self.buildset(
            Source::New(vec![SourceStamp {
                branch: req.branch.clone(),
                revision: req.revision.clone(),
                repository: req.repository.clone(),
                project: req.project.clone(),
                codebase: String::new(),
            }]),
            reason,
            props,
        );
        bs.builders = builders;
        let ids = self.shared.store.add_buildset(bs).await?;
        self.log_made(std::slice::from_ref(&ids));
        Ok(ids)
    }
}

const NIGHTLY: &str = "nightly";
const PERIODIC: &str = "periodic";

/// The timer key of a branch (`()` is the default branch).
fn branch_key(b: &Option<String>) -> String {
    match b {
        None => "branch:".to_string(),
        Some(b) => format!("branch:{b}"),
    }
}

/// The change properties a buildset carries (the newest change wins).
fn change_properties(changes: &[Change]) -> Properties {
    let mut p = Properties::new();
    for c in changes {
        for (k, (v, _)) in &c.change.properties {
            p.insert(k.clone(), (v.clone(), "Change".to_string()));
        }
    }
    p
}

struct State {
    /// The last change handled.
    last: i64,
    /// The last change whose handling is stored.
    persisted: i64,
    /// Deadlines (Unix seconds) by key: `branch:<name>`, `nightly`, `periodic`.
    timers: BTreeMap<String, f64>,
}

impl State {
    fn next_deadline(&self) -> Option<f64> {
        self.timers.values().copied().reduce(f64::min)
    }

    /// After a failed timer write, try again in a few seconds.
    fn retry_soon(&mut self, now: f64) {
        for t in self.timers.values_mut() {
            if *t <= now {
                *t = now + 5.0;
            }
        }
    }
}
