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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmpv::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{
    Arg, BoolOrCallback, BuilderConfig, Command, LockAccess, LockMode, LockScope, MasterConfig,
    Results, Step,
};
use crate::schedulers::{BuildsetDone, Schedulers};
use crate::script::ScriptRuntime;
use crate::store::buildsets::BuildRequest;
use crate::store::{Properties, Store};
use crate::workers::{protocol, CommandEvent, Registry, WorkerConn};

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

pub struct Distributor {
    config: Arc<MasterConfig>,
    registry: Arc<Registry>,
    store: Store,
    schedulers: Schedulers,
    runtime: ScriptRuntime,
    masterid: i64,
    busy: Mutex<Busy>,
    /// Wakes the distributor (a build ended).
    pub wake: Notify,
    /// Builders whose collapseRequests function was reported as not run.
    warned: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The outcome of one step.
struct StepOutcome {
    result: Results,
    /// The worker went away during the step.
    lost: bool,
}

impl Distributor {
    pub fn new(
        config: Arc<MasterConfig>,
        registry: Arc<Registry>,
        store: Store,
        schedulers: Schedulers,
        runtime: ScriptRuntime,
        masterid: i64,
    ) -> Arc<Distributor> {
        Arc::new(Distributor {
            config,
            registry,
            store,
            schedulers,
            runtime,
            masterid,
            busy: Mutex::default(),
            wake: Notify::new(),
            warned: Mutex::default(),
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

    fn builder(&self, name: &str) -> Option<&BuilderConfig> {
        self.config.builders.iter().find(|b| b.name == name)
    }

    fn max_builds(&self, worker: &str) -> usize {
        self.config
            .workers
            .iter()
            .find(|w| w.name == worker)
            .and_then(|w| w.max_builds)
            .map_or(usize::MAX, |n| n as usize)
    }

    /// The connected workers that may build for `builder` now, least busy
    /// first.
    fn candidates(&self, builder: &BuilderConfig) -> Vec<Arc<WorkerConn>> {
        let busy = lock(&self.busy);
        let mut v: Vec<Arc<WorkerConn>> = builder
            .worker_names
            .iter()
            .filter_map(|w| self.registry.get(w))
            .filter(|conn| {
                let running = busy.running.get(&conn.name);
                let n = running.map_or(0, HashSet::len);
                n < self.max_builds(&conn.name)
                    && !running.is_some_and(|r| r.contains(&builder.name))
                    && busy.can_lock(&builder.locks, &conn.name)
            })
            .collect();
        v.sort_by_key(|conn| busy.running.get(&conn.name).map_or(0, HashSet::len));
        v
    }

    /// The worker for a request: `nextWorker` when the builder has one (it
    /// gets the builder's name, the candidate names least busy first, and
    /// the request, and returns a name or `()` for "not now"), else the
    /// least busy. A failing `nextWorker` is logged and the default used.
    async fn pick_worker(
        &self,
        builder: &BuilderConfig,
        req: &BuildRequest,
    ) -> Option<Arc<WorkerConn>> {
        let candidates = self.candidates(builder);
        if candidates.is_empty() {
            return None;
        }
        let Some(cb) = builder.next_worker.clone() else {
            return candidates.into_iter().next();
        };
        let names: rhai::Array = candidates.iter().map(|c| c.name.clone().into()).collect();
        let mut request = rhai::Map::new();
        request.insert("buildrequestid".into(), req.buildrequestid.into());
        request.insert("buildsetid".into(), req.buildsetid.into());
        request.insert("priority".into(), req.priority.into());
        request.insert("buildername".into(), req.buildername.clone().into());
        let rt = self.runtime.clone();
        let bname = builder.name.clone();
        let answer =
            tokio::task::spawn_blocking(move || rt.call(&cb, (bname, names, request))).await;
        match answer {
            Ok(Ok(v)) if v.is_unit() => None,
            Ok(Ok(v)) => {
                let name = v.clone().into_string().unwrap_or_default();
                match candidates.iter().find(|c| c.name == name) {
                    Some(c) => Some(c.clone()),
                    None => {
                        tracing::warn!(builder = %builder.name, "nextWorker returned {v:?}, which is not one of the workers offered; using the least busy");
                        candidates.into_iter().next()
                    }
                }
            }
            Ok(Err(msg)) => {
                tracing::warn!(builder = %builder.name, "{msg}; using the least busy worker");
                candidates.into_iter().next()
            }
            Err(e) => {
                tracing::warn!(builder = %builder.name, "nextWorker did not finish ({e}); using the least busy worker");
                candidates.into_iter().next()
            }
        }
    }

    /// Whether requests of `builder` collapse (Buildbot's default rule).
    fn collapses(&self, builder: &BuilderConfig) -> bool {
        match builder
            .collapse_requests
            .as_ref()
            .unwrap_or(&self.config.collapse_requests)
        {
            BoolOrCallback::Enabled(b) => *b,
            BoolOrCallback::Callback(cb) => {
                if lock(&self.warned).insert(builder.name.clone()) {
                    tracing::warn!(builder = %builder.name, "collapseRequests functions ({}) are not run yet: its requests are not collapsed", cb.describe());
                }
                false
            }
        }
    }

    async fn distribute(self: Arc<Self>) -> anyhow::Result<()> {
        let pending = self.store.unclaimed_requests(1000).await?;
        for req in pending {
            let Some(builder) = self.builder(&req.buildername) else {
                continue;
            };
            let Some(worker) = self.pick_worker(builder, &req).await else {
                continue;
            };
            let claimed = self
                .store
                .claim_with_collapsed(req.buildrequestid, self.masterid, self.collapses(builder))
                .await?;
            if claimed.is_empty() {
                continue;
            }
            {
                let mut busy = lock(&self.busy);
                busy.running
                    .entry(worker.name.clone())
                    .or_default()
                    .insert(builder.name.clone());
                busy.take_locks(&builder.locks, &worker.name);
            }
            let me = self.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let wname = worker.name.clone();
                let bname = builder.name.clone();
                if let Err(e) = me.run_build(&claimed, &req, &builder, &worker).await {
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
                me.wake.notify_one();
            });
        }
        Ok(())
    }

    /// Runs one build for the requests `claimed` (collapsed ones after the
    /// first). The newest request's buildset is the one built.
    async fn run_build(
        &self,
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
        let mut props: Properties = Properties::new();
        if let Some(bs) = self.store.get_buildset(req.buildsetid).await? {
            props.extend(bs.properties);
        }
        for (k, v) in &builder.properties {
            props.insert(k.clone(), (v.clone(), "Builder".into()));
        }
        props.insert(
            "buildername".into(),
            (builder.name.clone().into(), "Builder".into()),
        );
        props.insert(
            "workername".into(),
            (worker.name.clone().into(), "Worker".into()),
        );
        let (buildid, number) = self
            .store
            .new_build(
                req.builderid,
                req.buildrequestid,
                workerid,
                self.masterid,
                props,
            )
            .await?;
        tracing::info!(builder = %builder.name, worker = %worker.name, "build {number} started (request {})", req.buildrequestid);

        let basedir = worker
            .info
            .get()
            .and_then(|i| i["basedir"].as_str())
            .unwrap_or(".")
            .to_string();
        let builddir = join_path(&basedir, &builder.worker_builddir);
        let mut results = Results::Success;
        let mut halted = false;
        let mut lost = false;
        for (i, step) in builder.factory.steps.iter().enumerate() {
            let stepid = self.store.new_step(buildid, i as i64, &step.name).await?;
            if halted && !step.always_run {
                self.store
                    .finish_step(stepid, Results::Skipped as i64, "skipped")
                    .await?;
                continue;
            }
            let out = self
                .run_step(stepid, step, builder, worker, &builddir)
                .await?;
            self.store
                .finish_step(stepid, out.result as i64, out.result.name())
                .await?;
            if out.lost {
                lost = true;
                break;
            }
            results = combine(results, step, out.result);
            if out.result == Results::Failure && step.halt_on_failure
                || out.result == Results::Exception
            {
                halted = true;
            }
        }
        if lost {
            self.store
                .finish_build(buildid, Results::Retry as i64, "retry: the worker was lost")
                .await?;
            for brid in claimed {
                self.store.unclaim_request(*brid).await?;
            }
            tracing::warn!(builder = %builder.name, worker = %worker.name, "build {number}: worker lost; the request will run again");
            return Ok(());
        }
        self.store
            .finish_build(buildid, results as i64, results.name())
            .await?;
        tracing::info!(builder = %builder.name, "build {number}: {}", results.name());
        for (bsid, r) in self
            .store
            .complete_requests(claimed.to_vec(), results as i64)
            .await?
        {
            self.schedulers
                .buildset_done(BuildsetDone { bsid, results: r });
        }
        Ok(())
    }

    async fn run_step(
        &self,
        stepid: i64,
        step: &Step,
        builder: &BuilderConfig,
        worker: &WorkerConn,
        builddir: &str,
    ) -> anyhow::Result<StepOutcome> {
        let log = self.store.new_log(stepid, "stdio", "s").await?;
        let exception = |why: String| async move {
            let _ = self.store.append_log(log, vec![format!("h{why}")]).await;
            let _ = self.store.finish_log(log).await;
            Ok(StepOutcome {
                result: Results::Exception,
                lost: false,
            })
        };
        let Some(command) = &step.command else {
            return exception(format!(
                "step `{}` ({}) has no command; this kiln runs command steps only so far",
                step.name,
                step.kind.type_name()
            ))
            .await;
        };
        let command = match command_value(command) {
            Ok(c) => c,
            Err(why) => return exception(why).await,
        };
        let mut env = Vec::new();
        for (k, v) in builder.env.iter().chain(step.env.iter()) {
            match arg_text(v) {
                Ok(t) => env.push((Value::from(k.as_str()), Value::from(t))),
                Err(why) => return exception(why).await,
            }
        }
        let workdir = join_path(builddir, step.workdir.as_deref().unwrap_or("build"));
        let mut args = vec![
            ("workdir", Value::from(workdir.as_str())),
            ("command", command),
            ("env", Value::Map(env)),
            ("want_stdout", Value::Boolean(true)),
            ("want_stderr", Value::Boolean(true)),
            ("logEnviron", Value::Boolean(true)),
            ("timeout", Value::from(step.timeout.unwrap_or(1200))),
            ("usePTY", Value::Boolean(false)),
        ];
        if let Some(t) = step.max_time {
            args.push(("maxTime", Value::from(t)));
        }
        let (_, mut events) = match worker
            .start_command(&builder.name, "shell", protocol::map(args))
            .await
        {
            Ok(x) => x,
            Err(e) if worker.closed.is_cancelled() => {
                tracing::warn!("{e:#}");
                return Ok(StepOutcome {
                    result: Results::Retry,
                    lost: true,
                });
            }
            Err(e) => return exception(format!("cannot start the command: {e:#}")).await,
        };
        let mut rc: Option<i64> = None;
        let outcome = loop {
            let Some(ev) = events.recv().await else {
                break StepOutcome {
                    result: Results::Retry,
                    lost: true,
                };
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
                                for l in update_lines(&value) {
                                    lines.push(format!("{prefix}{l}"));
                                }
                            }
                            "rc" => rc = value.as_i64(),
                            _ => {}
                        }
                    }
                    self.store.append_log(log, lines).await?;
                }
                CommandEvent::Complete(None) => {
                    let result = match rc {
                        Some(0) => Results::Success,
                        Some(_) => Results::Failure,
                        None => Results::Exception,
                    };
                    break StepOutcome {
                        result,
                        lost: false,
                    };
                }
                CommandEvent::Complete(Some(why)) => {
                    if worker.closed.is_cancelled() {
                        break StepOutcome {
                            result: Results::Retry,
                            lost: true,
                        };
                    }
                    self.store.append_log(log, vec![format!("h{why}")]).await?;
                    break StepOutcome {
                        result: Results::Exception,
                        lost: false,
                    };
                }
            }
        };
        self.store.finish_log(log).await?;
        Ok(outcome)
    }
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
fn update_lines(v: &Value) -> Vec<String> {
    let text = match v {
        Value::Array(a) => a.first().and_then(protocol::str_of).unwrap_or_default(),
        other => protocol::str_of(other).unwrap_or_default(),
    };
    text.lines().map(String::from).collect()
}

fn join_path(base: &str, rel: &str) -> String {
    if rel.starts_with('/') {
        rel.to_string()
    } else {
        format!("{}/{}", base.trim_end_matches('/'), rel)
    }
}

fn arg_text(a: &Arg) -> Result<String, String> {
    match a {
        Arg::Literal(s) => Ok(s.clone()),
        Arg::Secret(s) => Ok(s.expose().to_string()),
        Arg::Render(r) => Err(format!(
            "`{r}` needs properties rendered, which this kiln does not do yet"
        )),
    }
}

fn command_value(c: &Command) -> Result<Value, String> {
    match c {
        Command::Shell(a) => Ok(Value::from(arg_text(a)?)),
        Command::Argv(v) => Ok(Value::Array(
            v.iter()
                .map(|a| arg_text(a).map(Value::from))
                .collect::<Result<_, _>>()?,
        )),
    }
}
