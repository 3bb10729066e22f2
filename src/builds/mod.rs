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

mod render;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmpv::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{
    Arg, BoolOrCallback, BuilderConfig, Command, Disconnect as DisconnectWhen, LockAccess,
    LockMode, LockScope, LogEval, MasterConfig, Results, Step, StepKind,
};
use crate::schedulers::{BuildsetDone, Schedulers};
use crate::script::ScriptRuntime;
use crate::store::buildsets::{BuildRequest, Collapse};
use crate::store::{Properties, Store};
use crate::workers::protocol::map_get;
use crate::workers::transfer::{self, Download, Upload, UploadKind};
use crate::workers::{protocol, CommandEvent, Registry, WorkerConn};

/// How long a stopped build waits for its interrupted command to end.
const INTERRUPT_GRACE: Duration = Duration::from_secs(30);

/// How often the distributor looks for work when nothing wakes it.
const IDLE_POLL: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Busy {
    /// worker → builders it is building now
    running: HashMap<String, HashSet<String>>,
    /// (lock name, worker for a WorkerLock) → holders
    locks: HashMap<(String, Option<String>), LockState>,
}

#[derive(Default)]
struct LockState {
    counting: u32,
    exclusive: bool,
}

fn lock_key(a: &LockAccess, worker: &str) -> (String, Option<String>) {
    match a.scope {
        LockScope::Master => (a.name.clone(), None),
        LockScope::Worker => (a.name.clone(), Some(worker.to_string())),
    }
}

impl Busy {
    /// Whether every lock of `accesses` can be taken on `worker` now
    /// (Buildbot's rules: counting up to maxCount holders; exclusive alone).
    fn can_lock(&self, accesses: &[LockAccess], worker: &str) -> bool {
        accesses.iter().all(|a| {
            let st = self.locks.get(&lock_key(a, worker));
            let (counting, exclusive) = st.map_or((0, false), |s| (s.counting, s.exclusive));
            match a.mode {
                LockMode::Counting => !exclusive && counting < a.max_count.max(1),
                LockMode::Exclusive => !exclusive && counting == 0,
            }
        })
    }

    fn take_locks(&mut self, accesses: &[LockAccess], worker: &str) {
        for a in accesses {
            let st = self.locks.entry(lock_key(a, worker)).or_default();
            match a.mode {
                LockMode::Counting => st.counting += 1,
                LockMode::Exclusive => st.exclusive = true,
            }
        }
    }

    fn release_locks(&mut self, accesses: &[LockAccess], worker: &str) {
        for a in accesses {
            if let Some(st) = self.locks.get_mut(&lock_key(a, worker)) {
                match a.mode {
                    LockMode::Counting => st.counting = st.counting.saturating_sub(1),
                    LockMode::Exclusive => st.exclusive = false,
                }
            }
        }
    }
}

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
            .map(|(i, b)| (b.name.clone(), i))
            .collect();
        Generation {
            config,
            runtime,
            builder_index,
        }
    }

    fn builder(&self, name: &str) -> Option<&BuilderConfig> {
        self.builder_index
            .get(name)
            .and_then(|&i| self.config.builders.get(i))
    }
}

pub struct Distributor {
    gen: std::sync::RwLock<Arc<Generation>>,
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
}

/// A running build's stop signal.
struct RunningBuild {
    worker: String,
    /// The requests it builds (collapsed ones too).
    requests: Vec<i64>,
    stop: CancellationToken,
    reason: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The outcome of one step.
struct StepOutcome {
    result: Results,
    /// The worker went away during the step.
    lost: bool,
    /// A property the step set (`SetProperty`).
    set_property: Option<(String, serde_json::Value)>,
    /// A `DisconnectStep` saw its worker go, or wants it gone: the build
    /// ends after this step, as it is.
    disconnect: Option<Disconnected>,
    /// The worker killed the command for `timeout` or `maxTime`.
    timed_out: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Disconnected {
    /// The worker went away during the step (it rebooted).
    Gone,
    /// The master is to drop the worker's connection once the build ends.
    Drop,
}

impl StepOutcome {
    fn of(result: Results) -> StepOutcome {
        StepOutcome {
            result,
            lost: false,
            set_property: None,
            disconnect: None,
            timed_out: false,
        }
    }
    fn lost() -> StepOutcome {
        StepOutcome {
            result: Results::Retry,
            lost: true,
            set_property: None,
            disconnect: None,
            timed_out: false,
        }
    }
}

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
        Arc::new(Distributor {
            gen: std::sync::RwLock::new(Arc::new(Generation::new(config, runtime))),
            registry,
            store,
            schedulers,
            masterid,
            master_dir,
            busy: Mutex::default(),
            wake: Notify::new(),
            warned: Mutex::default(),
            running_builds: Mutex::default(),
        })
    }

    /// Distributes until `cancel` fires; running builds are left to end
    /// (or to be retried at the next start).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let added = self.schedulers.requests_added();
        loop {
            if let Err(e) = self.clone().distribute().await {
                tracing::error!("distributing build requests failed: {e:#}");
            }
            tokio::select! {
                _ = self.registry.changed.notified() => {}
                _ = self.wake.notified() => {}
                _ = added.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// The config new builds start with.
    /// This master's id in the store.
    pub fn masterid(&self) -> i64 {
        self.masterid
    }

    pub fn generation(&self) -> Arc<Generation> {
        self.gen.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies a reload: the next builds use `config`; running builds
    /// finish with the generation they started with.
    pub fn reconfigure(&self, config: Arc<MasterConfig>, runtime: ScriptRuntime) {
        *self.gen.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Generation::new(config, runtime));
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

    fn max_builds(gen: &Generation, worker: &str) -> usize {
        gen.config
            .workers
            .iter()
            .find(|w| w.name == worker)
            .and_then(|w| w.max_builds)
            .map_or(usize::MAX, |n| n as usize)
    }

    /// The connected workers that may build for `builder` now, least busy
    /// first.
    fn candidates(&self, gen: &Generation, builder: &BuilderConfig) -> Vec<Arc<WorkerConn>> {
        let busy = lock(&self.busy);
        let mut v: Vec<Arc<WorkerConn>> = builder
            .worker_names
            .iter()
            .filter_map(|w| self.registry.get(w.as_str()))
            .filter(|conn| !conn.draining.load(std::sync::atomic::Ordering::SeqCst))
            // A connection being closed (a DisconnectStep, a changed
            // password) is still registered until its tasks end.
            .filter(|conn| !conn.closed.is_cancelled())
            .filter(|conn| {
                let running = busy.running.get(&conn.name);
                let n = running.map_or(0, HashSet::len);
                n < Self::max_builds(gen, &conn.name)
                    && !running.is_some_and(|r| r.contains(&builder.name))
                    && busy.can_lock(&builder.locks, &conn.name)
            })
            .collect();
        v.sort_by_key(|conn| busy.running.get(&conn.name).map_or(0, HashSet::len));
        v
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

    /// A request as the script sees it: ids, priority, submission time,
    /// its sourcestamps and its buildset's properties.
    async fn request_map(&self, req: &BuildRequest) -> anyhow::Result<rhai::Map> {
        let mut m = rhai::Map::new();
        m.insert("buildrequestid".into(), req.buildrequestid.into());
        m.insert("buildsetid".into(), req.buildsetid.into());
        m.insert("buildername".into(), req.buildername.clone().into());
        m.insert("priority".into(), req.priority.into());
        m.insert("submitted_at".into(), req.submitted_at.into());
        let sources: rhai::Array = self
            .store
            .buildset_sourcestamps(req.buildsetid)
            .await?
            .iter()
            .map(|ss| rhai::serde::to_dynamic(ss).unwrap_or(rhai::Dynamic::UNIT))
            .collect();
        m.insert("sources".into(), sources.into());
        let mut props = rhai::Map::new();
        if let Some(bs) = self.store.get_buildset(req.buildsetid).await? {
            for (k, (v, _)) in bs.properties {
                props.insert(
                    k.into(),
                    rhai::serde::to_dynamic(&v).unwrap_or(rhai::Dynamic::UNIT),
                );
            }
        }
        m.insert("properties".into(), props.into());
        Ok(m)
    }

    /// The worker for a request, or `None` for "not now".
    ///
    /// `nextWorker` (when the builder has one) gets the builder's name, the
    /// candidate names least busy first, and the request, and returns a
    /// name or `()`; without it the least busy candidate is taken. The
    /// builder's `canStartBuild` (builder name, worker name, request →
    /// bool) may then veto that worker, and the choice is made again among
    /// the rest. A failing callback is logged and its default used: the
    /// least busy worker, and "yes, it can start".
    async fn pick_worker(
        &self,
        gen: &Generation,
        builder: &BuilderConfig,
        req: &BuildRequest,
        mut candidates: Vec<Arc<WorkerConn>>,
    ) -> anyhow::Result<Option<Arc<WorkerConn>>> {
        let mut request: Option<rhai::Map> = None;
        while !candidates.is_empty() {
            if request.is_none()
                && (builder.next_worker.is_some() || builder.can_start_build.is_some())
            {
                request = Some(self.request_map(req).await?);
            }
            let chosen = match &builder.next_worker {
                None => 0,
                Some(cb) => {
                    let names: rhai::Array =
                        candidates.iter().map(|c| c.name.clone().into()).collect();
                    let args = (
                        builder.name.clone(),
                        names,
                        request.clone().unwrap_or_default(),
                    );
                    match self.call(gen, cb, args).await {
                        Ok(v) if v.is_unit() => return Ok(None),
                        Ok(v) => {
                            let name = v.clone().into_string().unwrap_or_default();
                            match candidates.iter().position(|c| c.name == name) {
                                Some(i) => i,
                                None => {
                                    self.warn_once(&builder.name, format!("nextWorker returned {v:?}, which is not one of the workers offered; using the least busy"));
                                    0
                                }
                            }
                        }
                        Err(msg) => {
                            self.warn_once(
                                &builder.name,
                                format!("{msg}; using the least busy worker"),
                            );
                            0
                        }
                    }
                }
            };
            let worker = candidates.remove(chosen);
            let Some(cb) = &builder.can_start_build else {
                return Ok(Some(worker));
            };
            let args = (
                builder.name.clone(),
                worker.name.clone(),
                request.clone().unwrap_or_default(),
            );
            match self.call(gen, cb, args).await {
                Ok(v) => match v.as_bool() {
                    Ok(true) => return Ok(Some(worker)),
                    Ok(false) => continue,
                    Err(t) => {
                        self.warn_once(
                            &builder.name,
                            format!("canStartBuild returned a {t}, not a bool; starting the build"),
                        );
                        return Ok(Some(worker));
                    }
                },
                Err(msg) => {
                    self.warn_once(&builder.name, format!("{msg}; starting the build"));
                    return Ok(Some(worker));
                }
            }
        }
        Ok(None)
    }

    /// Which other requests collapse into `req`: Buildbot's default rule
    /// when `collapseRequests` is true (the builder's, else the global
    /// one), none when false, or those for which the function answers
    /// true. The function gets the builder's name, `req` and another
    /// unclaimed request of the builder; a failing function means "do not
    /// collapse" (every request still builds).
    async fn collapse_for(
        &self,
        gen: &Generation,
        builder: &BuilderConfig,
        req: &BuildRequest,
    ) -> anyhow::Result<Collapse> {
        let rule = builder
            .collapse_requests
            .as_ref()
            .unwrap_or(&gen.config.collapse_requests);
        let cb = match rule {
            BoolOrCallback::Enabled(true) => return Ok(Collapse::Default),
            BoolOrCallback::Enabled(false) => return Ok(Collapse::None),
            BoolOrCallback::Callback(cb) => cb,
        };
        let others = self.store.unclaimed_of_builder(req.buildrequestid).await?;
        if others.is_empty() {
            return Ok(Collapse::None);
        }
        let mine = self.request_map(req).await?;
        let mut chosen = Vec::new();
        for other in others {
            let theirs = self.request_map(&other).await?;
            match self
                .call(gen, cb, (builder.name.clone(), mine.clone(), theirs))
                .await
            {
                Ok(v) => match v.as_bool() {
                    Ok(true) => chosen.push(other.buildrequestid),
                    Ok(false) => {}
                    Err(t) => self.warn_once(
                        &builder.name,
                        format!("collapseRequests returned a {t}, not a bool; not collapsing"),
                    ),
                },
                Err(msg) => {
                    self.warn_once(&builder.name, format!("{msg}; not collapsing"));
                }
            }
        }
        Ok(Collapse::These(chosen))
    }

    /// The order in which builders with pending requests are served:
    /// `prioritizeBuilders` when the config has one (it gets an array of
    /// `#{name, oldest, priority, pending, tags, category}` and returns
    /// the names, or those maps, in the order to serve; a builder it
    /// leaves out waits for the next round), else oldest request first,
    /// then highest priority. A failing function means the default order.
    async fn prioritize(&self, gen: &Generation, pending: &[BuilderQueue<'_>]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..pending.len()).collect();
        order.sort_by_key(|&i| {
            let q = &pending[i];
            (
                q.oldest,
                std::cmp::Reverse(q.priority),
                q.builder.name.as_str(),
            )
        });
        let Some(cb) = &gen.config.prioritize_builders else {
            return order;
        };
        let offered: rhai::Array = order
            .iter()
            .map(|&i| {
                let q = &pending[i];
                let mut m = rhai::Map::new();
                m.insert("name".into(), q.builder.name.clone().into());
                m.insert("oldest".into(), q.oldest.into());
                m.insert("priority".into(), q.priority.into());
                m.insert("pending".into(), (q.requests.len() as i64).into());
                let tags: rhai::Array = q.builder.tags.iter().map(|t| t.clone().into()).collect();
                m.insert("tags".into(), tags.into());
                m.insert(
                    "category".into(),
                    q.builder
                        .category
                        .clone()
                        .map_or(rhai::Dynamic::UNIT, Into::into),
                );
                m.into()
            })
            .collect();
        let answer = match self.call(gen, cb, (offered,)).await {
            Ok(v) => v,
            Err(msg) => {
                self.warn_once("", format!("{msg}; using the default builder order"));
                return order;
            }
        };
        let Some(list) = answer.clone().try_cast::<rhai::Array>() else {
            self.warn_once(
                "",
                format!(
                    "prioritizeBuilders returned a {}, not an array; using the default builder order",
                    answer.type_name()
                ),
            );
            return order;
        };
        let mut chosen = Vec::new();
        for item in list {
            let name = match item.clone().try_cast::<rhai::Map>() {
                Some(m) => m.get("name").and_then(|n| n.clone().into_string().ok()),
                None => item.clone().into_string().ok(),
            };
            match name.and_then(|n| pending.iter().position(|q| q.builder.name == n)) {
                Some(i) if !chosen.contains(&i) => chosen.push(i),
                Some(_) => {}
                None => self.warn_once(
                    "",
                    format!("prioritizeBuilders returned {item:?}, which is not a builder with pending requests; ignored"),
                ),
            }
        }
        chosen
    }

    async fn distribute(self: Arc<Self>) -> anyhow::Result<()> {
        let gen = self.generation();
        let pending = self.store.unclaimed_requests(1000).await?;
        // The pending requests of each builder, in the store's order
        // (highest priority, then oldest, first). Builders and queues are
        // found through maps: this runs on every wake, for up to 1000
        // requests against thousands of builders.
        let mut queues: Vec<BuilderQueue<'_>> = Vec::new();
        let mut queue_of: HashMap<&str, usize> = HashMap::new();
        for req in pending {
            // A removed builder's requests stay in the store, unclaimed.
            let Some(builder) = gen.builder(&req.buildername) else {
                continue;
            };
            match queue_of.get(builder.name.as_str()) {
                Some(&i) => {
                    let q = &mut queues[i];
                    q.oldest = q.oldest.min(req.submitted_at);
                    q.priority = q.priority.max(req.priority);
                    q.requests.push(req);
                }
                None => {
                    queue_of.insert(&builder.name, queues.len());
                    queues.push(BuilderQueue {
                        builder,
                        oldest: req.submitted_at,
                        priority: req.priority,
                        requests: vec![req],
                    });
                }
            }
        }
        if queues.is_empty() {
            return Ok(());
        }
        for i in self.prioritize(&gen, &queues).await {
            let builder = queues[i].builder;
            for req in &queues[i].requests {
                let candidates = self.candidates(&gen, builder);
                if candidates.is_empty() {
                    break;
                }
                let Some(worker) = self.pick_worker(&gen, builder, req, candidates).await? else {
                    continue;
                };
                let collapse = self.collapse_for(&gen, builder, req).await?;
                let claimed = self
                    .store
                    .claim_with_collapsed(req.buildrequestid, self.masterid, collapse)
                    .await?;
                if claimed.is_empty() {
                    continue;
                }
                self.start(gen.clone(), claimed, req.clone(), builder.clone(), worker);
            }
        }
        Ok(())
    }

    /// Marks the worker busy, takes the builder's locks, and runs the build
    /// in its own task.
    fn start(
        self: &Arc<Self>,
        gen: Arc<Generation>,
        claimed: Vec<i64>,
        req: BuildRequest,
        builder: BuilderConfig,
        worker: Arc<WorkerConn>,
    ) {
        {
            let mut busy = lock(&self.busy);
            busy.running
                .entry(worker.name.clone())
                .or_default()
                .insert(builder.name.clone());
            busy.take_locks(&builder.locks, &worker.name);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let wname = worker.name.clone();
            let bname = builder.name.clone();
            if let Err(e) = me.run_build(&gen, &claimed, &req, &builder, &worker).await {
                tracing::error!(builder = %bname, worker = %wname, "build of request {} failed: {e:#}", req.buildrequestid);
                // Give the requests back rather than lose them.
                for brid in &claimed {
                    let _ = me.store.unclaim_request(*brid).await;
                }
            }
            {
                let mut busy = lock(&me.busy);
                if let Some(set) = busy.running.get_mut(&wname) {
                    set.remove(&bname);
                }
                busy.release_locks(&builder.locks, &wname);
            }
            me.shutdown_if_drained(&wname).await;
            me.wake.notify_one();
        });
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

    /// Cancels a build request, as Buildbot's `cancel` does: one that waits
    /// completes CANCELLED at once; one being built has its build stopped
    /// (which completes it CANCELLED). An error says why it cannot be.
    pub async fn cancel_request(&self, brid: i64, reason: &str) -> anyhow::Result<String> {
        use crate::store::buildsets::Cancel;
        match self.store.cancel_request(brid).await? {
            Cancel::Cancelled => {
                tracing::info!("build request {brid} cancelled: {reason}");
                self.wake.notify_one();
                Ok(format!("build request {brid} cancelled"))
            }
            Cancel::Missing => anyhow::bail!("there is no build request {brid}"),
            Cancel::Complete => anyhow::bail!("build request {brid} is complete already"),
            Cancel::Claimed => {
                let building = lock(&self.running_builds)
                    .iter()
                    .find(|(_, b)| b.requests.contains(&brid))
                    .map(|(id, _)| *id);
                match building {
                    Some(buildid) if self.stop_build(buildid, reason) => Ok(format!(
                        "build request {brid} is being built: build {buildid} was stopped"
                    )),
                    _ => anyhow::bail!(
                        "build request {brid} is claimed and its build is not running on this master yet; stop its build"
                    ),
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

    /// Runs one build for the requests `claimed` (collapsed ones after the
    /// first). The newest request's buildset is the one built.
    async fn run_build(
        &self,
        gen: &Generation,
        claimed: &[i64],
        first: &BuildRequest,
        builder: &BuilderConfig,
        worker: &Arc<WorkerConn>,
    ) -> anyhow::Result<()> {
        let newest = claimed
            .iter()
            .copied()
            .max()
            .unwrap_or(first.buildrequestid);
        let req = &self
            .store
            .request(newest)
            .await?
            .unwrap_or_else(|| first.clone());
        if claimed.len() > 1 {
            tracing::info!(builder = %builder.name, "requests {claimed:?} collapsed into one build of request {newest}");
        }
        let workerid = self.store.worker_id(&worker.name).await?;
        let basedir = worker
            .info
            .get()
            .and_then(|i| i["basedir"].as_str())
            .unwrap_or(".")
            .to_string();
        let builddir = join_path(&basedir, &builder.worker_builddir);
        // Buildbot's layering, later ones winning: global, builder, the
        // buildset's (scheduler, change, force), worker, then the build's own.
        let mut props: Properties = Properties::new();
        let layer = |props: &mut Properties, from: &crate::config::Properties, source: &str| {
            for (k, v) in from {
                props.insert(k.clone(), (v.clone(), source.to_string()));
            }
        };
        layer(&mut props, &gen.config.properties, "Global");
        layer(&mut props, &builder.properties, "Builder");
        if let Some(bs) = self.store.get_buildset(req.buildsetid).await? {
            props.extend(bs.properties);
        }
        if let Some(w) = gen.config.workers.iter().find(|w| w.name == worker.name) {
            layer(&mut props, &w.properties, "Worker");
        }
        let mut own = |k: &str, v: serde_json::Value, source: &str| {
            props.insert(k.to_string(), (v, source.to_string()));
        };
        own("buildername", builder.name.clone().into(), "Builder");
        own("workername", worker.name.clone().into(), "Worker");
        own("builddir", builddir.clone().into(), "Worker");
        if let Some(ss) = self
            .store
            .buildset_sourcestamps(req.buildsetid)
            .await?
            .into_iter()
            .next()
        {
            own(
                "branch",
                ss.branch.map_or(serde_json::Value::Null, Into::into),
                "Build",
            );
            own(
                "revision",
                ss.revision.map_or(serde_json::Value::Null, Into::into),
                "Build",
            );
            own("repository", ss.repository.into(), "Build");
            own("project", ss.project.into(), "Build");
            own("codebase", ss.codebase.into(), "Build");
        }
        let (buildid, number) = self
            .store
            .new_build(
                req.builderid,
                req.buildrequestid,
                workerid,
                self.masterid,
                props.clone(),
            )
            .await?;
        props.insert("buildnumber".into(), (number.into(), "Build".into()));
        tracing::info!(builder = %builder.name, worker = %worker.name, "build {number} started (request {})", req.buildrequestid);
        let running = Arc::new(RunningBuild {
            worker: worker.name.clone(),
            requests: claimed.to_vec(),
            stop: CancellationToken::new(),
            reason: Mutex::new(String::new()),
        });
        lock(&self.running_builds).insert(buildid, running.clone());
        let outcome = self
            .run_steps(&Build {
                gen,
                id: buildid,
                number,
                buildsetid: req.buildsetid,
                claimed,
                builder,
                worker,
                running: &running,
                builddir: &builddir,
                props: &props,
            })
            .await;
        lock(&self.running_builds).remove(&buildid);
        outcome
    }

    /// The config's status handlers hear that a build finished: each
    /// `QueuedCommandHandler` queues its command (rendered with the build's
    /// properties) followed by the builder's name and the build number,
    /// with the build's details in the environment (`KILN_BUILDID`,
    /// `KILN_BUILDER`, `KILN_BUILD_NUMBER`, `KILN_RESULTS`,
    /// `KILN_MASTER_DIR`). A handler that cannot queue is logged; the build
    /// is not affected.
    async fn queue_status(&self, b: &Build<'_>, results: Results, props: &Properties) {
        use crate::config::{Arg, StatusTarget};
        for target in &b.gen.config.status {
            let StatusTarget::QueuedCommandHandler {
                command, queuedir, ..
            } = target;
            let scope = render::Scope::of(props);
            let mut argv = Vec::with_capacity(command.len() + 2);
            let mut failed = None;
            for arg in command {
                match arg {
                    Arg::Literal(s) => argv.push(s.to_string()),
                    Arg::Secret(s) => argv.push(s.expose().to_string()),
                    Arg::Render(r) => match render::render(r, &scope) {
                        Ok(s) => argv.push(s),
                        Err(e) => failed = Some(e.to_string()),
                    },
                }
            }
            if let Some(e) = failed {
                tracing::error!(queue = %queuedir.name, "build {} of {}: the QueuedCommandHandler's command cannot be rendered: {e}", b.number, b.builder.name);
                continue;
            }
            argv.push(b.builder.name.clone());
            argv.push(b.number.to_string());
            let env = [
                ("KILN_BUILDID", b.id.to_string()),
                ("KILN_BUILDER", b.builder.name.clone()),
                ("KILN_BUILD_NUMBER", b.number.to_string()),
                ("KILN_RESULTS", (results as i64).to_string()),
                ("KILN_MASTER_DIR", self.master_dir.display().to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let item = crate::queuedir::Item {
                command: argv,
                env,
                created: crate::store::now(),
            };
            let root = self.master_dir.join(&queuedir.path);
            let queued = tokio::task::spawn_blocking(move || {
                crate::queuedir::QueueDir::open(&root)?.add(&item)
            })
            .await;
            match queued {
                Ok(Ok(id)) => {
                    tracing::info!(queue = %queuedir.name, "build {} of {} queued as {id}", b.number, b.builder.name)
                }
                Ok(Err(e)) => {
                    tracing::error!(queue = %queuedir.name, "build {} of {}: cannot queue its command: {e:#}", b.number, b.builder.name)
                }
                Err(e) => tracing::error!(queue = %queuedir.name, "cannot queue: {e}"),
            }
        }
    }

    async fn run_steps(&self, b: &Build<'_>) -> anyhow::Result<()> {
        let Build {
            id: buildid,
            number,
            claimed,
            builder,
            worker,
            running,
            ..
        } = *b;
        let mut props = b.props.clone();
        let mut results = Results::Success;
        let mut halted = false;
        let mut lost = false;
        let mut disconnected: Option<Disconnected> = None;
        for (i, step) in builder.factory.steps.iter().enumerate() {
            let stepid = self.store.new_step(buildid, i as i64, &step.name).await?;
            let stopped = running.stop.is_cancelled();
            // As Buildbot: after a failure that halts, or a stop, only
            // `alwaysRun` steps run (cleanup), and a stop interrupts only
            // the step running when it came.
            // After a DisconnectStep the worker is gone (or going): nothing
            // more runs on it.
            if disconnected.is_some() || (stopped || halted) && !step.always_run {
                self.store
                    .finish_step(stepid, Results::Skipped as i64, "skipped")
                    .await?;
                continue;
            }
            let stop = if stopped {
                CancellationToken::new()
            } else {
                running.stop.clone()
            };
            let out = match self.do_step_if(b.gen, step, &props).await {
                Ok(true) => self.run_step(b, stepid, step, &stop, &props).await?,
                Ok(false) => StepOutcome::of(Results::Skipped),
                Err(why) => {
                    let log = self.store.new_log(stepid, "stdio", "s").await?;
                    self.store.append_log(log, vec![format!("h{why}")]).await?;
                    self.store.finish_log(log).await?;
                    StepOutcome::of(Results::Exception)
                }
            };
            if let Some((name, value)) = &out.set_property {
                self.store
                    .set_build_property(buildid, name, value, "SetProperty")
                    .await?;
                props.insert(name.clone(), (value.clone(), "SetProperty".into()));
            }
            let state = if out.timed_out {
                format!("{} (timed out)", out.result.name())
            } else {
                out.result.name().to_string()
            };
            self.store
                .finish_step(stepid, out.result as i64, &state)
                .await?;
            if out.lost {
                lost = true;
                break;
            }
            if out.disconnect.is_some() {
                disconnected = out.disconnect;
            }
            results = combine(results, step, out.result);
            // Buildbot's termination rule: a failure that halts, or
            // EXCEPTION, RETRY or CANCELLED.
            if out.result == Results::Failure && step.halt_on_failure
                || matches!(
                    out.result,
                    Results::Exception | Results::Retry | Results::Cancelled
                )
            {
                halted = true;
            }
        }
        if lost {
            self.store
                .finish_build(buildid, Results::Retry as i64, "retry: the worker was lost")
                .await?;
            self.queue_status(b, Results::Retry, &props).await;
            for brid in claimed {
                self.store.unclaim_request(*brid).await?;
            }
            tracing::warn!(builder = %builder.name, worker = %worker.name, "build {number}: worker lost; the request will run again");
            return Ok(());
        }
        let state = if running.stop.is_cancelled() {
            results = Results::Cancelled;
            format!("cancelled: {}", lock(&running.reason))
        } else {
            results.name().to_string()
        };
        self.store
            .finish_build(buildid, results as i64, &state)
            .await?;
        self.queue_status(b, results, &props).await;
        tracing::info!(builder = %builder.name, "build {number}: {}", results.name());
        if results == Results::Retry {
            // As Buildbot: a build that ends RETRY (a step's log rules said
            // so) gives its requests back to run again.
            for brid in claimed {
                self.store.unclaim_request(*brid).await?;
            }
            tracing::warn!(builder = %builder.name, "build {number} ended RETRY; its request(s) will run again");
            return Ok(());
        }
        for (bsid, r) in self
            .store
            .complete_requests(claimed.to_vec(), results as i64)
            .await?
        {
            self.schedulers
                .buildset_done(BuildsetDone { bsid, results: r });
        }
        if disconnected == Some(Disconnected::Drop) {
            tracing::info!(worker = %worker.name, "disconnecting the worker, as build {number}'s DisconnectStep asked");
            worker.closed.cancel();
        }
        Ok(())
    }

    async fn run_step(
        &self,
        b: &Build<'_>,
        stepid: i64,
        step: &Step,
        stop: &CancellationToken,
        props: &Properties,
    ) -> anyhow::Result<StepOutcome> {
        let (builder, worker, builddir) = (b.builder, b.worker, b.builddir);
        let log = self.store.new_log(stepid, "stdio", "s").await?;
        let secrets_dir = self.master_dir.join(crate::script::SECRETS_DIR);
        let scope = render::Scope::of(props)
            .with_worker(worker.info.get())
            .with_secrets(&secrets_dir);
        let exception = |why: String| async move {
            let _ = self.store.append_log(log, vec![format!("h{why}")]).await;
            let _ = self.store.finish_log(log).await;
            Ok(StepOutcome::of(Results::Exception))
        };
        if let (
            StepKind::SetProperty {
                property,
                value: Some(value),
            },
            None,
        ) = (&step.kind, &step.command)
        {
            return match arg_text(value, &scope) {
                Ok(v) => {
                    self.store
                        .append_log(log, vec![format!("h{property} = {v:?}")])
                        .await?;
                    self.store.finish_log(log).await?;
                    Ok(StepOutcome {
                        set_property: Some((property.to_string(), v.into())),
                        ..StepOutcome::of(Results::Success)
                    })
                }
                Err(why) => exception(why).await,
            };
        }
        if let StepKind::Trigger {
            scheduler_names,
            wait_for_finish,
            set_properties,
        } = &step.kind
        {
            let result = match self
                .trigger(
                    b,
                    log,
                    scheduler_names,
                    *wait_for_finish,
                    set_properties,
                    stop,
                )
                .await?
            {
                Ok(r) => r,
                Err(why) => {
                    self.store.append_log(log, vec![format!("h{why}")]).await?;
                    Results::Exception
                }
            };
            self.store.finish_log(log).await?;
            return Ok(StepOutcome::of(result));
        }
        let workdir = join_path(builddir, step.workdir.as_deref().unwrap_or("build"));
        let git_step = matches!(step.kind, StepKind::Git { .. }) && step.command.is_none();
        // Secrets given as they are (env, command) are hidden from the
        // start; rendered `%(secret:...)s` ones as they are rendered.
        for arg in builder
            .env
            .values()
            .chain(step.env.values())
            .chain(match &step.command {
                Some(Command::Argv(v)) => v.iter().collect::<Vec<_>>(),
                Some(Command::Shell(a)) => vec![a],
                None => vec![],
            })
        {
            if let Arg::Secret(secret) = arg {
                scope.add_secret(secret.expose());
            }
        }
        let mut sink = LogSink::new(log, stop.clone(), scope.secrets());
        let run = if git_step {
            match self
                .git_checkout(b, &mut sink, step, &workdir, &scope)
                .await?
            {
                Ok(run) => run,
                Err(why) => return exception(why).await,
            }
        } else {
            // JSONPropertiesDownload is a StringDownload of the build's
            // properties and sourcestamp as they are now.
            let props_step;
            let step = match &step.kind {
                StepKind::JsonPropertiesDownload {
                    workerdest,
                    transfer,
                } => {
                    props_step = Step {
                        kind: StepKind::StringDownload {
                            s: Arg::Literal(self.properties_json(b, props).await?.into()),
                            workerdest: workerdest.clone(),
                            transfer: transfer.clone(),
                        },
                        ..step.clone()
                    };
                    &props_step
                }
                _ => step,
            };
            let prepared = match self.prepare_command(step, builder, &workdir, &scope) {
                Ok(p) => p,
                Err(Prepared::Exception(why)) => return exception(why).await,
                Err(Prepared::Failure(why)) => {
                    self.store.append_log(log, vec![format!("h{why}")]).await?;
                    self.store.finish_log(log).await?;
                    return Ok(StepOutcome::of(Results::Failure));
                }
            };
            let (command_name, args, transfer) = prepared;
            let capture = matches!(
                step.kind,
                StepKind::SetProperty { .. } | StepKind::DisconnectStep { .. }
            );
            let hg = match (&step.kind, &args) {
                (StepKind::MercurialCloneCommand { .. }, _) if command_name == "shell" => {
                    let argv: Option<Vec<String>> = match map_get(&args, "command") {
                        Some(Value::Array(a)) => a
                            .iter()
                            .map(|v| protocol::str_of(v).map(String::from))
                            .collect(),
                        _ => None,
                    };
                    match argv {
                        Some(argv) => {
                            self.hg_clone(b, &mut sink, step, &argv, &workdir, &scope)
                                .await?
                        }
                        None => None,
                    }
                }
                _ => None,
            };
            match hg {
                Some(run) => run,
                None => {
                    self.run_command(b, &mut sink, command_name, args, transfer, capture)
                        .await?
                }
            }
        };
        let command_id = run.command_id.clone();
        let mut outcome = match run.ended {
            Ended::Lost if matches!(step.kind, StepKind::DisconnectStep { .. }) => {
                self.store
                    .append_log(
                        log,
                        vec!["hthe worker went away, as this step expects".into()],
                    )
                    .await?;
                StepOutcome {
                    disconnect: Some(Disconnected::Gone),
                    ..StepOutcome::of(Results::Success)
                }
            }
            Ended::Lost => StepOutcome::lost(),
            Ended::Cancelled => StepOutcome::of(Results::Cancelled),
            Ended::Failed(why) => {
                self.store.append_log(log, vec![format!("h{why}")]).await?;
                StepOutcome::of(Results::Exception)
            }
            Ended::Done { rc } => {
                let timed_out = match run.failure_reason.as_deref() {
                    Some("timeout") => Some(format!(
                        "it ran longer than maxTime ({} s)",
                        step.max_time.unwrap_or_default()
                    )),
                    Some("timeout_without_output") => Some(format!(
                        "it printed nothing for timeout ({} s)",
                        step.timeout.unwrap_or(DEFAULT_TIMEOUT)
                    )),
                    _ => None,
                };
                if let Some(why) = &timed_out {
                    self.store
                        .append_log(
                            log,
                            vec![format!("h[kiln] the worker killed the command: {why}")],
                        )
                        .await?;
                }
                let mut o =
                    StepOutcome::of(match self.evaluate(b.gen, step, rc, log, props).await {
                        Ok(r) => r,
                        Err(why) => {
                            self.store.append_log(log, vec![format!("h{why}")]).await?;
                            Results::Exception
                        }
                    });
                o.timed_out = timed_out.is_some();
                if let (StepKind::Git { .. }, Results::Success) = (&step.kind, o.result) {
                    let v = run.captured.trim().to_string();
                    if !v.is_empty() {
                        o.set_property = Some(("got_revision".into(), v.into()));
                    }
                }
                if let (StepKind::SetProperty { property, .. }, Results::Success) =
                    (&step.kind, o.result)
                {
                    let v = run.captured.trim().to_string();
                    self.store
                        .append_log(log, vec![format!("h{property} = {v:?}")])
                        .await?;
                    o.set_property = Some((property.to_string(), v.into()));
                }
                if let StepKind::DisconnectStep { force_disconnect } = &step.kind {
                    let wanted = match force_disconnect {
                        DisconnectWhen::Always(b) => Ok(*b),
                        DisconnectWhen::OutputContains(text) => {
                            Ok(run.captured.contains(text.as_str()))
                        }
                        DisconnectWhen::Callback(cb) => self
                            .call(b.gen, cb, (step_map(step, props), run.captured.clone()))
                            .await
                            .and_then(|v| {
                                v.as_bool().map_err(|t| {
                                    format!("force_disconnect returned a {t}, not a bool")
                                })
                            }),
                    };
                    match wanted {
                        Ok(true) => {
                            self.store
                                .append_log(
                                    log,
                                    vec!["hthe worker will be disconnected when the build ends"
                                        .into()],
                                )
                                .await?;
                            o.disconnect = Some(Disconnected::Drop);
                        }
                        Ok(false) => {}
                        Err(why) => {
                            self.store.append_log(log, vec![format!("h{why}")]).await?;
                        }
                    }
                }
                o
            }
        };
        // A transfer ends here: an upload lands only if the command
        // succeeded.
        if let Some(transfer::Transfer::Upload(u)) = worker.take_transfer(&command_id) {
            match u.finish(outcome.result == Results::Success) {
                Ok(what) => {
                    self.store
                        .append_log(log, vec![format!("huploaded {what}")])
                        .await?
                }
                Err(why) if outcome.result == Results::Success => {
                    self.store.append_log(log, vec![format!("h{why}")]).await?;
                    outcome.result = Results::Failure;
                }
                Err(why) => self.store.append_log(log, vec![format!("h{why}")]).await?,
            }
        }
        self.store.finish_log(log).await?;
        Ok(outcome)
    }

    /// `Trigger`: a buildset from each Triggerable scheduler named, on this
    /// build's sourcestamps with `set_properties`, linked to this build;
    /// with `waitForFinish`, the step waits for them and takes the worst
    /// of their results (a stop cancels the wait).
    async fn trigger(
        &self,
        b: &Build<'_>,
        log: i64,
        names: &[String],
        wait: bool,
        set_properties: &crate::config::Properties,
        stop: &CancellationToken,
    ) -> anyhow::Result<Result<Results, String>> {
        let sourcestamps = self.store.buildset_sourcestamps(b.buildsetid).await?;
        let props: Properties = set_properties
            .iter()
            .map(|(k, v)| (k.clone(), (v.clone(), "Trigger".to_string())))
            .collect();
        let mut done = self.schedulers.subscribe_done();
        let mut waiting = HashSet::new();
        for name in names {
            match self
                .schedulers
                .trigger(name, sourcestamps.clone(), props.clone(), Some(b.id))
                .await
            {
                Ok(ids) => {
                    self.store
                        .append_log(
                            log,
                            vec![format!(
                                "htriggered {name}: buildset {} ({} request(s))",
                                ids.bsid,
                                ids.brids.len()
                            )],
                        )
                        .await?;
                    waiting.insert(ids.bsid);
                }
                Err(e) => return Ok(Err(format!("cannot trigger `{name}`: {e:#}"))),
            }
        }
        if !wait {
            return Ok(Ok(Results::Success));
        }
        let mut worst = Results::Success;
        while !waiting.is_empty() {
            let d = tokio::select! {
                d = done.recv() => d,
                _ = stop.cancelled() => return Ok(Ok(Results::Cancelled)),
            };
            match d {
                Ok(d) => {
                    if waiting.remove(&d.bsid) {
                        let r = Results::from_code(d.results).unwrap_or(Results::Exception);
                        self.store
                            .append_log(
                                log,
                                vec![format!("hbuildset {} finished: {}", d.bsid, r.name())],
                            )
                            .await?;
                        if severity(r) > severity(worst) {
                            worst = r;
                        }
                    }
                }
                // Missed notices: look the buildsets up instead.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for bsid in waiting.clone() {
                        if let Some(bs) = self.store.get_buildset(bsid).await? {
                            if bs.complete {
                                waiting.remove(&bsid);
                                let r = bs
                                    .results
                                    .and_then(Results::from_code)
                                    .unwrap_or(Results::Exception);
                                if severity(r) > severity(worst) {
                                    worst = r;
                                }
                            }
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Ok(Err("the master is stopping".into()))
                }
            }
        }
        Ok(Ok(worst))
    }

    /// Whether a step runs (`doStepIf`): a bool, or a function given
    /// `#{ name, properties }` that returns one. A failing function is the
    /// step's EXCEPTION, as in Buildbot.
    async fn do_step_if(
        &self,
        gen: &Generation,
        step: &Step,
        props: &Properties,
    ) -> Result<bool, String> {
        match step.do_step_if.as_deref() {
            None => Ok(true),
            Some(BoolOrCallback::Enabled(b)) => Ok(*b),
            Some(BoolOrCallback::Callback(cb)) => {
                let v = self.call(gen, cb, (step_map(step, props),)).await?;
                v.as_bool().map_err(|t| {
                    format!(
                        "doStepIf of step `{}` returned a {t}, not a bool",
                        step.name
                    )
                })
            }
        }
    }

    /// A finished command's result: the step's `log_eval_func` (an rc map,
    /// or a function given `#{ name, properties }`, the exit code and the
    /// command's output, returning a result), else Buildbot's rule (0 is
    /// SUCCESS, anything else FAILURE).
    async fn evaluate(
        &self,
        gen: &Generation,
        step: &Step,
        rc: Option<i64>,
        log: i64,
        props: &Properties,
    ) -> Result<Results, String> {
        let by_rc = self.evaluate_rc(gen, step, rc, log, props).await?;
        if step.log_rules.is_empty() {
            return Ok(by_rc);
        }
        let text = self.output_text(log).await?;
        let mut result = by_rc;
        for rule in &step.log_rules {
            // Checked when the config was loaded.
            let Ok(re) = regex::Regex::new(&rule.pattern) else {
                continue;
            };
            let hit = text.lines().find(|l| re.is_match(l));
            if let Some(line) = hit {
                if severity(rule.result) > severity(result) {
                    self.store
                        .append_log(
                            log,
                            vec![format!(
                                "h[kiln] log rule {:?} matched {line:?}: {}",
                                rule.pattern,
                                rule.result.name()
                            )],
                        )
                        .await
                        .map_err(|e| format!("{e:#}"))?;
                    result = rule.result;
                }
            }
        }
        Ok(result)
    }

    async fn evaluate_rc(
        &self,
        gen: &Generation,
        step: &Step,
        rc: Option<i64>,
        log: i64,
        props: &Properties,
    ) -> Result<Results, String> {
        let plain = |rc: Option<i64>| match rc {
            Some(0) => Ok(Results::Success),
            Some(_) => Ok(Results::Failure),
            None => Err("the worker reported no exit code".to_string()),
        };
        match step.log_eval.as_deref() {
            None => plain(rc),
            Some(LogEval::RcMap { codes, default }) => {
                match (rc.and_then(|rc| codes.get(&rc)), default) {
                    (Some(r), _) => Ok(*r),
                    (None, Some(d)) => Ok(*d),
                    (None, None) => plain(rc),
                }
            }
            Some(LogEval::Callback(cb)) => {
                let output = self.output_text(log).await?;
                let rc = rc.map_or(rhai::Dynamic::UNIT, rhai::Dynamic::from);
                let v = self
                    .call(gen, cb, (step_map(step, props), rc, output))
                    .await?;
                v.as_int().ok().and_then(Results::from_code).ok_or_else(|| {
                    format!(
                        "log_eval_func of step `{}` returned {v:?}, not a result such as SUCCESS",
                        step.name
                    )
                })
            }
        }
    }

    /// The worker command a step runs: its name, its arguments and, for a
    /// transfer, the master's end of it.
    /// What `JSONPropertiesDownload` writes: Buildbot 0.8's
    /// `{"properties": {name: value}, "sourcestamp": {..., "changes": [...]}}`,
    /// the shape mozharness reads from `buildprops.json`.
    async fn properties_json(&self, b: &Build<'_>, props: &Properties) -> anyhow::Result<String> {
        let properties: serde_json::Map<String, serde_json::Value> = props
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        let changeids = self
            .store
            .get_buildset(b.buildsetid)
            .await?
            .map(|bs| bs.changeids)
            .unwrap_or_default();
        let mut changes = Vec::with_capacity(changeids.len());
        for id in changeids {
            let Some(c) = self.store.get_change(id).await? else {
                continue;
            };
            let ch = &c.change;
            changes.push(serde_json::json!({
                "number": c.changeid,
                "who": ch.author,
                "comments": ch.comments,
                "branch": ch.branch,
                "revision": ch.revision,
                "revlink": ch.revlink,
                "when": ch.when_timestamp,
                "category": ch.category,
                "repository": ch.repository,
                "project": ch.project,
                "files": ch.files.iter().map(|f| serde_json::json!({"name": f})).collect::<Vec<_>>(),
            }));
        }
        let sourcestamp = match self
            .store
            .buildset_sourcestamps(b.buildsetid)
            .await?
            .into_iter()
            .next()
        {
            Some(ss) => serde_json::json!({
                "branch": ss.branch,
                "revision": ss.revision,
                "repository": ss.repository,
                "project": ss.project,
                "codebase": ss.codebase,
                "changes": changes,
            }),
            None => serde_json::json!({ "changes": changes }),
        };
        Ok(serde_json::to_string_pretty(&serde_json::json!({
            "properties": properties,
            "sourcestamp": sourcestamp,
        }))?)
    }

    fn prepare_command(
        &self,
        step: &Step,
        builder: &BuilderConfig,
        workdir: &str,
        props: &render::Scope<'_>,
    ) -> Result<(&'static str, Value, Option<transfer::Transfer>), Prepared> {
        let arg_text = |a: &Arg| arg_text(a, props);
        let exception = Prepared::Exception;
        let opt_u64 = |v: Option<u64>| v.map_or(Value::Nil, Value::from);
        let master_path = |p: &str| self.master_dir.join(p);
        match &step.kind {
            StepKind::FileUpload {
                workersrc,
                masterdest,
                transfer,
                keepstamp,
            } => {
                let src = join_path(workdir, &arg_text(workersrc).map_err(exception)?);
                let dest = master_path(masterdest);
                let upload = Upload::new(
                    dest.clone(),
                    transfer.maxsize,
                    UploadKind::File {
                        mode: transfer.mode,
                    },
                )
                .map_err(|e| exception(format!("cannot write {}: {e}", dest.display())))?;
                let args = protocol::map(vec![
                    ("path", Value::from(src)),
                    ("maxsize", opt_u64(transfer.maxsize)),
                    ("blocksize", Value::from(transfer.blocksize)),
                    ("keepstamp", Value::Boolean(*keepstamp)),
                ]);
                Ok((
                    "upload_file",
                    args,
                    Some(transfer::Transfer::Upload(upload)),
                ))
            }
            StepKind::DirectoryUpload {
                workersrc,
                masterdest,
                transfer,
                compress,
            } => {
                let src = join_path(workdir, &arg_text(workersrc).map_err(exception)?);
                let dest = master_path(masterdest);
                let upload = Upload::new(
                    dest.clone(),
                    transfer.maxsize,
                    UploadKind::Directory {
                        compress: compress.as_ref().map(|c| c.to_string()),
                    },
                )
                .map_err(|e| exception(format!("cannot write into {}: {e}", dest.display())))?;
                let args = protocol::map(vec![
                    ("path", Value::from(src)),
                    ("maxsize", opt_u64(transfer.maxsize)),
                    ("blocksize", Value::from(transfer.blocksize)),
                    (
                        "compress",
                        compress.as_deref().map_or(Value::Nil, Value::from),
                    ),
                ]);
                Ok((
                    "upload_directory",
                    args,
                    Some(transfer::Transfer::Upload(upload)),
                ))
            }
            StepKind::FileDownload {
                mastersrc,
                workerdest,
                transfer,
            } => {
                let src = master_path(mastersrc);
                let file = std::fs::File::open(&src).map_err(|e| {
                    Prepared::Failure(format!(
                        "{} is not available on the master: {e}",
                        src.display()
                    ))
                })?;
                let dest = join_path(workdir, &arg_text(workerdest).map_err(exception)?);
                Ok((
                    "download_file",
                    download_args(&dest, transfer),
                    Some(transfer::Transfer::Download(Download::new(Box::new(file)))),
                ))
            }
            StepKind::StringDownload {
                s,
                workerdest,
                transfer,
            } => {
                let text = arg_text(s).map_err(exception)?;
                let dest = join_path(workdir, &arg_text(workerdest).map_err(exception)?);
                Ok((
                    "download_file",
                    download_args(&dest, transfer),
                    Some(transfer::Transfer::Download(Download::new(Box::new(
                        std::io::Cursor::new(text.into_bytes()),
                    )))),
                ))
            }
            _ => {
                let Some(command) = &step.command else {
                    return Err(exception(format!(
                        "step `{}` ({}) has no command; this kiln runs command and transfer steps only so far",
                        step.name,
                        step.kind.type_name()
                    )));
                };
                let mut command = command_value(command, props).map_err(exception)?;
                if let StepKind::MockCommand {
                    use_mock: true,
                    target,
                } = &step.kind
                {
                    let Some(target) = target else {
                        return Err(exception(format!(
                            "step `{}`: MockCommand with mock: true needs a `target`",
                            step.name
                        )));
                    };
                    command =
                        mock_command(&command, target, workdir, step, props).map_err(exception)?;
                }
                let args = shell_args(step, builder, workdir, command, props).map_err(exception)?;
                Ok(("shell", args, None))
            }
        }
    }

    /// Runs one command of a step on the worker, streaming its output into
    /// `sink`'s log, until it completes, fails, is cancelled by `stop`
    /// (interrupted, with a grace period) or its worker is lost. With
    /// `capture`, its stdout is also returned (bounded).
    async fn run_command(
        &self,
        b: &Build<'_>,
        sink: &mut LogSink,
        command_name: &str,
        args: Value,
        transfer: Option<transfer::Transfer>,
        capture: bool,
    ) -> anyhow::Result<CommandRun> {
        let (builder, worker, log) = (b.builder, b.worker, sink.log);
        let stop = sink.stop.clone();
        let mut run = CommandRun {
            ended: Ended::Lost,
            captured: String::new(),
            command_id: String::new(),
            failure_reason: None,
        };
        let (command_id, mut events) = match worker
            .start_transfer(&builder.name, command_name, args, transfer)
            .await
        {
            Ok(x) => x,
            Err(e) if worker.closed.is_cancelled() => {
                tracing::warn!("{e:#}");
                return Ok(run);
            }
            Err(e) => {
                run.ended = Ended::Failed(format!("cannot start the command: {e:#}"));
                return Ok(run);
            }
        };
        run.command_id = command_id.clone();
        let mut rc: Option<i64> = None;
        // When the build is stopped: the command is interrupted, and if the
        // worker does not report it ended within this time, the step ends
        // anyway.
        let mut interrupted: Option<tokio::time::Instant> = None;
        run.ended = loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = stop.cancelled(), if interrupted.is_none() => {
                    interrupted = Some(tokio::time::Instant::now() + INTERRUPT_GRACE);
                    // In its own task: the answer comes through the same
                    // connection as the updates this loop must keep taking.
                    let (w, bname, id) = (worker.clone(), builder.name.clone(), command_id.clone());
                    tokio::spawn(async move {
                        if let Err(e) = w.interrupt_command(&bname, &id, "the build was stopped").await {
                            tracing::warn!(builder = %bname, "interrupting the command: {e:#}");
                        }
                    });
                    continue;
                }
                _ = tokio::time::sleep_until(interrupted.unwrap_or_else(tokio::time::Instant::now)), if interrupted.is_some() => {
                    self.store
                        .append_log(log, vec![format!("hthe worker did not end the command within {} s of the interrupt", INTERRUPT_GRACE.as_secs())])
                        .await?;
                    break Ended::Cancelled;
                }
            };
            let Some(ev) = ev else {
                break Ended::Lost;
            };
            match ev {
                CommandEvent::Update(pairs) => {
                    let mut lines = Vec::new();
                    for (key, value) in pairs {
                        match key.as_str() {
                            "stdout" | "stderr" | "header" => {
                                let prefix = match key.as_str() {
                                    "stdout" => 'o',
                                    "stderr" => 'e',
                                    _ => 'h',
                                };
                                for l in sink.split(prefix, update_text(&value)) {
                                    if capture
                                        && prefix == 'o'
                                        && run.captured.len() < CAPTURE_LIMIT
                                    {
                                        run.captured.push_str(&l);
                                        run.captured.push('\n');
                                    }
                                    if let Some(line) =
                                        sink.keep(prefix, &l, b.gen.config.log_max_size)
                                    {
                                        lines.push(line);
                                    }
                                }
                            }
                            "rc" => rc = value.as_i64(),
                            "failure_reason" => {
                                run.failure_reason = protocol::str_of(&value).map(String::from)
                            }
                            _ => {}
                        }
                    }
                    if !lines.is_empty() {
                        self.store.append_log(log, lines).await?;
                    }
                }
                CommandEvent::Complete(_) if interrupted.is_some() => break Ended::Cancelled,
                CommandEvent::Complete(None) => break Ended::Done { rc },
                CommandEvent::Complete(Some(why)) => {
                    if worker.closed.is_cancelled() {
                        break Ended::Lost;
                    }
                    break Ended::Failed(why);
                }
            }
        };
        // Output that ended without a newline is a line of its own.
        let mut lines = Vec::new();
        for (prefix, l) in sink.take_partial() {
            if capture && prefix == 'o' && run.captured.len() < CAPTURE_LIMIT {
                run.captured.push_str(&l);
                run.captured.push('\n');
            }
            if let Some(line) = sink.keep(prefix, &l, b.gen.config.log_max_size) {
                lines.push(line);
            }
        }
        self.store.append_log(log, lines).await?;
        Ok(run)
    }

    /// `Git` (without a command of its own): when the workdir is a clone
    /// and `mode` is incremental, `git fetch REPOURL BRANCH` there;
    /// otherwise the workdir is removed and cloned afresh. Then the build's
    /// revision (or what was fetched) is checked out, and `git rev-parse
    /// HEAD` becomes the `got_revision` property.
    async fn git_checkout(
        &self,
        b: &Build<'_>,
        sink: &mut LogSink,
        step: &Step,
        workdir: &str,
        props: &render::Scope<'_>,
    ) -> anyhow::Result<Result<CommandRun, String>> {
        let StepKind::Git {
            repourl,
            branch,
            mode,
        } = &step.kind
        else {
            return Ok(Err("not a Git step".into()));
        };
        let repourl = match arg_text(repourl, props) {
            Ok(r) => r,
            Err(why) => return Ok(Err(why)),
        };
        let branch = match branch.as_ref().map(|a| arg_text(a, props)).transpose() {
            Ok(b) => b,
            Err(why) => return Ok(Err(why)),
        };
        let revision = props
            .props
            .get("revision")
            .and_then(|(v, _)| v.as_str())
            .filter(|r| !r.is_empty())
            .map(String::from);
        let shell = |cmd: Vec<&str>| {
            let command = Value::Array(cmd.into_iter().map(Value::from).collect());
            shell_args(step, b.builder, workdir, command, props)
        };
        macro_rules! run_ok {
            ($args:expr, $capture:expr) => {{
                let args = match $args {
                    Ok(a) => a,
                    Err(why) => return Ok(Err(why)),
                };
                let run = self
                    .run_command(b, sink, "shell", args, None, $capture)
                    .await?;
                if !matches!(run.ended, Ended::Done { rc: Some(0) }) {
                    return Ok(Ok(run));
                }
                run
            }};
        }
        let stat = self.stat(b, sink, &join_path(workdir, ".git")).await?;
        if !matches!(stat.ended, Ended::Done { .. }) {
            return Ok(Ok(stat));
        }
        let is_clone = matches!(stat.ended, Ended::Done { rc: Some(0) });
        let fetched = if is_clone && mode == "incremental" {
            let mut cmd = vec!["git", "fetch", repourl.as_str()];
            if let Some(br) = &branch {
                cmd.push(br);
            }
            run_ok!(shell(cmd), false);
            "FETCH_HEAD".to_string()
        } else {
            let rm = self.remove_dir(b, sink, workdir).await?;
            if !matches!(rm.ended, Ended::Done { .. }) {
                return Ok(Ok(rm));
            }
            let mut cmd = vec!["git", "clone"];
            if let Some(br) = &branch {
                cmd.extend(["--branch", br.as_str()]);
            }
            cmd.extend([repourl.as_str(), "."]);
            run_ok!(shell(cmd), false);
            "HEAD".to_string()
        };
        let target = revision.unwrap_or(fetched);
        run_ok!(shell(vec!["git", "checkout", "-f", target.as_str()]), false);
        let rev = run_ok!(shell(vec!["git", "rev-parse", "HEAD"]), true);
        Ok(Ok(rev))
    }

    /// The protocol's `stat` of `path`: done with rc 0 when it exists.
    async fn stat(
        &self,
        b: &Build<'_>,
        sink: &mut LogSink,
        path: &str,
    ) -> anyhow::Result<CommandRun> {
        let args = protocol::map(vec![("path", Value::from(path))]);
        self.run_command(b, sink, "stat", args, None, false).await
    }

    /// The protocol's `rmdir` of `path` (and what is in it).
    async fn remove_dir(
        &self,
        b: &Build<'_>,
        sink: &mut LogSink,
        path: &str,
    ) -> anyhow::Result<CommandRun> {
        let args = protocol::map(vec![("paths", Value::Array(vec![Value::from(path)]))]);
        self.run_command(b, sink, "rmdir", args, None, false).await
    }

    /// A step log's stdout and stderr text, without the header lines.
    async fn output_text(&self, log: i64) -> Result<String, String> {
        let text = self
            .store
            .log_text(log)
            .await
            .map_err(|e| format!("cannot read the log: {e:#}"))?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix('o').or_else(|| l.strip_prefix('e')))
            .flat_map(|l| [l, "\n"])
            .collect())
    }

    /// `MercurialCloneCommand` (`hg clone SRC [DEST]`): when DEST already
    /// holds a repository (a `stat` of DEST/.hg), `hg pull SRC` and
    /// `hg update --clean` there instead of cloning; with `retry`, a clone
    /// that fails is tried once more into a removed DEST.
    async fn hg_clone(
        &self,
        b: &Build<'_>,
        sink: &mut LogSink,
        step: &Step,
        argv: &[String],
        workdir: &str,
        props: &render::Scope<'_>,
    ) -> anyhow::Result<Option<CommandRun>> {
        let retry = matches!(step.kind, StepKind::MercurialCloneCommand { retry: true });
        let Some(at) = argv.iter().position(|a| a == "clone") else {
            return Ok(None);
        };
        let positional: Vec<&String> = argv[at + 1..]
            .iter()
            .filter(|a| !a.starts_with('-'))
            .collect();
        let Some(src) = positional.first() else {
            return Ok(None);
        };
        let dest = match positional.get(1) {
            Some(d) => d.to_string(),
            None => src
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("repo")
                .to_string(),
        };
        let dest_path = join_path(workdir, &dest);
        let stat = self.stat(b, sink, &join_path(&dest_path, ".hg")).await?;
        let hg = argv[0].as_str();
        let shell = |cmd: Vec<&str>, dir: &str| {
            let command = Value::Array(cmd.into_iter().map(Value::from).collect());
            shell_args(step, b.builder, dir, command, props)
        };
        if matches!(stat.ended, Ended::Done { rc: Some(0) }) {
            self.store
                .append_log(
                    sink.log,
                    vec![format!(
                        "h{dest} is a repository already: pulling and updating it"
                    )],
                )
                .await?;
            let args =
                shell(vec![hg, "pull", src.as_str()], &dest_path).map_err(anyhow::Error::msg)?;
            let pull = self
                .run_command(b, sink, "shell", args, None, false)
                .await?;
            if !matches!(pull.ended, Ended::Done { rc: Some(0) }) {
                return Ok(Some(pull));
            }
            let args =
                shell(vec![hg, "update", "--clean"], &dest_path).map_err(anyhow::Error::msg)?;
            return Ok(Some(
                self.run_command(b, sink, "shell", args, None, false)
                    .await?,
            ));
        }
        if !matches!(stat.ended, Ended::Done { .. }) {
            return Ok(Some(stat));
        }
        let argv_refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let args = shell(argv_refs.clone(), workdir).map_err(anyhow::Error::msg)?;
        let clone = self
            .run_command(b, sink, "shell", args, None, false)
            .await?;
        if !retry || !matches!(clone.ended, Ended::Done { rc: Some(rc) } if rc != 0) {
            return Ok(Some(clone));
        }
        self.store
            .append_log(
                sink.log,
                vec![format!(
                    "hthe clone failed: removing {dest} and cloning again"
                )],
            )
            .await?;
        let rm = self.remove_dir(b, sink, dest_path.as_str()).await?;
        if !matches!(rm.ended, Ended::Done { .. }) {
            return Ok(Some(rm));
        }
        let args = shell(argv_refs, workdir).map_err(anyhow::Error::msg)?;
        Ok(Some(
            self.run_command(b, sink, "shell", args, None, false)
                .await?,
        ))
    }
}

/// How one worker command ended.
enum Ended {
    /// It completed, with this exit code (if the worker sent one).
    Done { rc: Option<i64> },
    /// The worker could not run it.
    Failed(String),
    /// The build was stopped.
    Cancelled,
    /// The worker went away.
    Lost,
}

struct CommandRun {
    ended: Ended,
    /// Its stdout, when asked for.
    captured: String,
    command_id: String,
    /// Why the worker ended it, when it did (`timeout` for maxTime,
    /// `timeout_without_output` for timeout).
    failure_reason: Option<String>,
}

/// Buildbot's default `timeout`: seconds without output before the worker
/// kills a command.
const DEFAULT_TIMEOUT: u32 = 1200;

/// A step's log and how much of it is kept (`logMaxSize`).
struct LogSink {
    log: i64,
    /// Fires when the build is stopped.
    stop: CancellationToken,
    kept: u64,
    truncated: bool,
    /// Secret values the step was given: shown as `<secret>` (a stock
    /// worker writes the command and its environment into the header).
    secrets: std::sync::Arc<Mutex<Vec<String>>>,
    /// Per stream (`o`, `e`, `h`), the start of a line not yet ended.
    partial: Vec<(char, String)>,
}

impl LogSink {
    fn new(
        log: i64,
        stop: CancellationToken,
        secrets: std::sync::Arc<Mutex<Vec<String>>>,
    ) -> LogSink {
        LogSink {
            log,
            stop,
            kept: 0,
            truncated: false,
            secrets,
            partial: Vec::new(),
        }
    }

    /// Splits a stream's text into whole lines (without `\r\n`/`\n`). A
    /// last line without its newline waits for the rest of it, which the
    /// next update of the same stream brings (workers cut output where
    /// their reads end, not at newlines).
    fn split(&mut self, prefix: char, text: &str) -> Vec<String> {
        let slot = match self.partial.iter().position(|(p, _)| *p == prefix) {
            Some(i) => i,
            None => {
                self.partial.push((prefix, String::new()));
                self.partial.len() - 1
            }
        };
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find('\n') {
            let mut line = std::mem::take(&mut self.partial[slot].1);
            line.push_str(&rest[..i]);
            if line.ends_with('\r') {
                line.pop();
            }
            out.push(line);
            rest = &rest[i + 1..];
        }
        self.partial[slot].1.push_str(rest);
        out
    }

    /// The lines still waiting for their newline, once the command ended.
    fn take_partial(&mut self) -> Vec<(char, String)> {
        std::mem::take(&mut self.partial)
            .into_iter()
            .filter(|(_, l)| !l.is_empty())
            .collect()
    }

    fn redact(&self, line: &str) -> String {
        let secrets = lock(&self.secrets);
        let mut out = line.to_string();
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "<secret>");
            }
        }
        out
    }

    /// The stored form of an output line, or `None` once the log is full
    /// (the first dropped line becomes the marker).
    fn keep(&mut self, prefix: char, line: &str, max: u64) -> Option<String> {
        if self.truncated {
            return None;
        }
        self.kept += line.len() as u64 + 1;
        if self.kept > max {
            self.truncated = true;
            return Some(format!(
                "h[kiln] this log reached logMaxSize ({max} bytes): the rest of the output is not kept"
            ));
        }
        Some(format!("{prefix}{}", self.redact(line)))
    }
}

/// A command run inside Mozilla's mock chroot, as its MockCommand did:
/// `mock_mozilla -r TARGET --cwd WORKDIR --unpriv --shell "/usr/bin/env
/// K=V ... CMD"`, the step's env passed inside.
fn mock_command(
    command: &Value,
    target: &str,
    workdir: &str,
    step: &Step,
    props: &render::Scope<'_>,
) -> Result<Value, String> {
    let quote = |s: &str| {
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
        {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let cmd = match command {
        Value::Array(a) => a
            .iter()
            .map(|v| protocol::str_of(v).map(quote).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(" "),
        other => protocol::str_of(other).unwrap_or_default().to_string(),
    };
    let mut inner = vec!["/usr/bin/env".to_string()];
    for (k, v) in &step.env {
        inner.push(quote(&format!("{k}={}", arg_text(v, props)?)));
    }
    inner.push(cmd);
    Ok(Value::Array(
        [
            "mock_mozilla",
            "-r",
            target,
            "--cwd",
            workdir,
            "--unpriv",
            "--shell",
            &inner.join(" "),
        ]
        .into_iter()
        .map(Value::from)
        .collect(),
    ))
}

/// The arguments of a `shell` command for a step.
fn shell_args(
    step: &Step,
    builder: &BuilderConfig,
    workdir: &str,
    command: Value,
    props: &render::Scope<'_>,
) -> Result<Value, String> {
    let mut env = Vec::new();
    for (k, v) in builder.env.iter().chain(step.env.iter()) {
        let t = arg_text(v, props)?;
        env.push((Value::from(k.as_str()), Value::from(t)));
    }
    let mut args = vec![
        ("workdir", Value::from(workdir)),
        ("command", command),
        ("env", Value::Map(env)),
        ("want_stdout", Value::Boolean(true)),
        ("want_stderr", Value::Boolean(true)),
        ("logEnviron", Value::Boolean(true)),
        (
            "timeout",
            Value::from(step.timeout.unwrap_or(DEFAULT_TIMEOUT)),
        ),
        ("usePTY", Value::Boolean(false)),
    ];
    if let Some(t) = step.max_time {
        args.push(("maxTime", Value::from(t)));
    }
    Ok(protocol::map(args))
}

/// Why a step's command could not be prepared.
enum Prepared {
    /// A fault in the config or the master: EXCEPTION.
    Exception(String),
    /// What the step was asked to do cannot be done (a missing master
    /// file): FAILURE, as Buildbot's transfer steps report it.
    Failure(String),
}

fn download_args(dest: &str, t: &crate::config::TransferOptions) -> Value {
    protocol::map(vec![
        ("path", Value::from(dest)),
        ("maxsize", t.maxsize.map_or(Value::Nil, Value::from)),
        ("blocksize", Value::from(t.blocksize)),
        ("mode", t.mode.map_or(Value::Nil, Value::from)),
    ])
}

/// Buildbot's `worst_status` order: SKIPPED < SUCCESS < WARNINGS <
/// FAILURE < EXCEPTION < RETRY < CANCELLED.
fn severity(r: Results) -> i64 {
    match r {
        Results::Skipped => -1,
        other => other as i64,
    }
}

/// The most of a command's stdout a `SetProperty` keeps.
const CAPTURE_LIMIT: usize = 1 << 20;

/// A step as a callback sees it.
fn step_map(step: &Step, props: &Properties) -> rhai::Map {
    let mut m = rhai::Map::new();
    m.insert("name".into(), step.name.clone().into());
    let mut p = rhai::Map::new();
    for (k, (v, _)) in props {
        p.insert(
            k.into(),
            rhai::serde::to_dynamic(v).unwrap_or(rhai::Dynamic::UNIT),
        );
    }
    m.insert("properties".into(), p.into());
    m
}

/// One running build, as its steps see it.
#[derive(Clone, Copy)]
struct Build<'a> {
    /// The config the build started with; it keeps it to its end.
    gen: &'a Generation,
    id: i64,
    number: i64,
    /// The buildset built (the newest request's).
    buildsetid: i64,
    /// The requests it builds (collapsed ones after the first).
    claimed: &'a [i64],
    builder: &'a BuilderConfig,
    worker: &'a Arc<WorkerConn>,
    running: &'a RunningBuild,
    /// The build's directory on the worker.
    builddir: &'a str,
    props: &'a Properties,
}

/// A builder's pending requests, as the distributor serves them.
struct BuilderQueue<'a> {
    builder: &'a BuilderConfig,
    /// When its oldest pending request was submitted.
    oldest: i64,
    /// The highest priority among its pending requests.
    priority: i64,
    requests: Vec<BuildRequest>,
}

/// Buildbot's way of folding a step's result into the build's.
fn combine(build: Results, step: &Step, r: Results) -> Results {
    let contribution = match r {
        Results::Failure if step.flunk_on_failure => Results::Failure,
        Results::Failure if step.warn_on_failure => Results::Warnings,
        Results::Failure => Results::Success,
        Results::Warnings if step.flunk_on_warnings => Results::Failure,
        Results::Warnings if step.warn_on_warnings => Results::Warnings,
        Results::Warnings => Results::Success,
        Results::Skipped => Results::Success,
        other => other,
    };
    if (contribution as i64) > (build as i64) {
        contribution
    } else {
        build
    }
}

/// The lines of a `stdout`/`stderr`/`header` update: `[text, [newline
/// positions], [times]]`, or plain text.
/// The text of a stdio update: Buildbot's `[text, newlines, times]` or a
/// plain string.
fn update_text(v: &Value) -> &str {
    match v {
        Value::Array(a) => a.first().and_then(protocol::str_of).unwrap_or_default(),
        other => protocol::str_of(other).unwrap_or_default(),
    }
}

fn join_path(base: &str, rel: &str) -> String {
    if rel.starts_with('/') {
        rel.to_string()
    } else if rel.is_empty() || rel == "." {
        base.to_string()
    } else {
        format!("{}/{}", base.trim_end_matches('/'), rel)
    }
}

fn arg_text(a: &Arg, props: &render::Scope<'_>) -> Result<String, String> {
    match a {
        Arg::Literal(s) => Ok(s.to_string()),
        Arg::Secret(s) => Ok(s.expose().to_string()),
        Arg::Render(r) => render::render(r, props).map_err(|e| e.message),
    }
}

fn command_value(c: &Command, props: &render::Scope<'_>) -> Result<Value, String> {
    match c {
        Command::Shell(a) => Ok(Value::from(arg_text(a, props)?)),
        Command::Argv(v) => Ok(Value::Array(
            v.iter()
                .map(|a| arg_text(a, props).map(Value::from))
                .collect::<Result<_, _>>()?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(flags: &[&str]) -> Step {
        let on = |f: &str| flags.contains(&f);
        Step {
            name: "s".into(),
            kind: StepKind::ShellCommand,
            description: None,
            command: None,
            workdir: None,
            env: Default::default(),
            timeout: None,
            max_time: None,
            halt_on_failure: on("haltOnFailure"),
            flunk_on_failure: !on("!flunkOnFailure"),
            flunk_on_warnings: on("flunkOnWarnings"),
            warn_on_failure: on("warnOnFailure"),
            warn_on_warnings: on("warnOnWarnings"),
            always_run: false,
            do_step_if: None,
            log_eval: None,
            log_rules: vec![],
            origin: None,
        }
    }

    #[test]
    fn log_lines_cut_anywhere_are_joined_per_stream() {
        let mut sink = LogSink::new(1, CancellationToken::new(), Default::default());
        assert_eq!(sink.split('o', "ab"), Vec::<String>::new());
        assert_eq!(sink.split('e', "err"), Vec::<String>::new());
        assert_eq!(sink.split('o', "c\r\nd\n\ne"), ["abc", "d", ""]);
        assert_eq!(sink.split('e', "or\n"), ["error"]);
        assert_eq!(sink.take_partial(), [('o', "e".to_string())]);
        assert!(sink.take_partial().is_empty());
    }

    #[test]
    fn step_results_fold_into_the_build_as_buildbot_folds_them() {
        use Results::*;
        let fold = |flags: &[&str], r| combine(Success, &step(flags), r);
        assert_eq!(fold(&[], Failure), Failure);
        assert_eq!(fold(&["!flunkOnFailure"], Failure), Success);
        assert_eq!(
            fold(&["!flunkOnFailure", "warnOnFailure"], Failure),
            Warnings
        );
        // flunkOnFailure wins over warnOnFailure, as in Buildbot.
        assert_eq!(fold(&["warnOnFailure"], Failure), Failure);
        assert_eq!(fold(&[], Warnings), Success);
        assert_eq!(fold(&["warnOnWarnings"], Warnings), Warnings);
        assert_eq!(fold(&["flunkOnWarnings"], Warnings), Failure);
        assert_eq!(fold(&[], Skipped), Success);
        assert_eq!(fold(&[], Retry), Retry);
        assert_eq!(combine(Exception, &step(&[]), Failure), Exception);
        assert_eq!(combine(Warnings, &step(&[]), Success), Warnings);
        assert!(severity(Skipped) < severity(Success));
        assert!(severity(Retry) < severity(Cancelled));
    }
}
