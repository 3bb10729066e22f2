//! Latent workers (Buildbot's meaning): defined like any worker, started
//! ("substantiated") when requests wait that one could build, stopped
//! ("insubstantiated") after `build_wait_timeout` seconds without a build.
//!
//! The pool keeps one slot per latent worker of the config and its state:
//!
//! ```text
//! stopped ─start─► starting ─connects─► idle ◄──► building
//!    ▲                │ fails, refused,    │ idle too long, removed,
//!    │                ▼ missing_timeout    ▼ master stops
//!    └──────────── failed (backoff)     stopping ─► stopped
//! ```
//!
//! `LocalLatentWorker` runs kiln's worker as a child process (it dies with
//! the master, and a pid file in its basedir lets the next start stop one
//! that outlived a crash); `CommandLatentWorker` runs the user's start and
//! stop commands (a marker file says which ones were started, so the next
//! start stops what a crash left). Requests are never claimed for a worker
//! that is not connected, so a failed start loses nothing: the request
//! waits, and the next round starts another latent worker.

mod process;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::config::{Latent, LatentKind, Worker};
use crate::events::Events;
use crate::sync::lock;
use process::{die_with_the_master, end_child, end_pid, is_worker_process, run_command};

use super::Presence;

/// Where a latent worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Stopped,
    Starting,
    Idle,
    Building,
    Stopping,
    Failed,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Idle => "idle",
            State::Building => "building",
            State::Stopping => "stopping",
            State::Failed => "failed",
        }
    }
}

/// What the API and the page show of one latent worker.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub name: String,
    pub state: State,
    /// Why the last start failed (empty otherwise).
    pub reason: String,
    /// Seconds in this state.
    pub for_seconds: u64,
}

struct Slot {
    worker: Worker,
    latent: Latent,
    state: State,
    since: Instant,
    reason: String,
    /// The running worker process of a LocalLatentWorker.
    child: Option<tokio::process::Child>,
    /// Failed starts in a row (the backoff grows with them).
    failures: u32,
    /// A failed worker is not started again before this.
    retry_at: Option<Instant>,
    /// Removed or changed by a reload: stopped once idle; `next` is the
    /// config it takes then (none: removed).
    retire: bool,
    next: Option<Worker>,
    /// Builds running on it.
    running: usize,
    /// Bumped at each start, so that a stale start task's result is
    /// ignored.
    epoch: u64,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub starts: AtomicU64,
    pub failed_starts: AtomicU64,
    /// Sum of the times from start to connection, in milliseconds.
    pub start_ms: AtomicU64,
    pub connected_starts: AtomicU64,
}

/// Every latent worker of the master and what it is doing.
pub struct LatentPool {
    slots: Mutex<BTreeMap<String, Slot>>,
    master_dir: PathBuf,
    /// Where latent workers find the master's worker listener.
    master_addr: Mutex<MasterAddr>,
    concurrency: AtomicU32,
    events: Events,
    pub counters: Counters,
    /// Notified at every change of a latent worker's state (the
    /// distributor looks at the queue again: a start failed, a stop ended).
    pub changed: tokio::sync::Notify,
}

/// Where a latent worker connects: `HOST:PORT`, or `wss://HOST:PORT` and
/// the master's certificate file to trust when the port has TLS.
#[derive(Clone, Debug, Default)]
pub struct MasterAddr {
    pub addr: String,
    pub ca: Option<PathBuf>,
}

/// How long a stop command or a worker's exit may take.
const STOP_LIMIT: Duration = Duration::from_secs(120);

/// The file in a LocalLatentWorker's basedir naming its process.
const PID_FILE: &str = "latent.pid";

impl LatentPool {
    pub fn new(master_dir: &Path, events: Events) -> Arc<LatentPool> {
        // Absolute, so that a worker's command line names its basedir in
        // full (the sweep of a previous run's workers matches on it).
        let master_dir =
            std::fs::canonicalize(master_dir).unwrap_or_else(|_| master_dir.to_path_buf());
        Arc::new(LatentPool {
            slots: Mutex::default(),
            master_dir,
            master_addr: Mutex::default(),
            concurrency: AtomicU32::new(4),
            events,
            counters: Counters::default(),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// The address latent workers are given to connect to; with TLS,
    /// `cert` (relative to the master dir) is what they trust.
    pub fn set_master_addr(&self, addr: std::net::SocketAddr, cert: Option<&str>) {
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        *lock(&self.master_addr) = match cert {
            None => MasterAddr {
                addr: format!("{host}:{}", addr.port()),
                ca: None,
            },
            Some(cert) => MasterAddr {
                addr: format!("wss://{host}:{}/", addr.port()),
                ca: Some(self.master_dir.join(cert)),
            },
        };
    }

    /// Takes the latent workers of a (new) config. A new one starts
    /// stopped; one that is gone or changed keeps running its build and is
    /// stopped when idle (a changed one then takes its new config).
    pub fn configure(self: &Arc<Self>, workers: &[Worker], concurrency: u32) {
        self.concurrency.store(concurrency.max(1), Ordering::SeqCst);
        let mut to_stop = Vec::new();
        {
            let mut slots = lock(&self.slots);
            let wanted: BTreeMap<&str, &Worker> = workers
                .iter()
                .filter(|w| w.latent.is_some())
                .map(|w| (w.name.as_str(), w))
                .collect();
            for (name, slot) in slots.iter_mut() {
                match wanted.get(name.as_str()) {
                    Some(w) if **w == slot.worker => {
                        slot.retire = false;
                        slot.next = None;
                    }
                    other => {
                        slot.retire = true;
                        slot.next = other.map(|w| (*w).clone());
                        // A worker with a build keeps it; it stops when the
                        // build ends (`build_ended`).
                        if slot.running == 0 && slot.state != State::Stopping {
                            to_stop.push(name.clone());
                        }
                    }
                }
            }
            for (name, w) in wanted {
                if !slots.contains_key(name) {
                    if let Some(latent) = w.latent.as_deref() {
                        slots.insert(name.to_string(), Slot::new(w.clone(), latent.clone()));
                    }
                }
            }
        }
        for name in to_stop {
            self.retire_now(&name);
        }
    }

    /// A retired worker that is not building: stopped if it runs, then
    /// removed or given its new config.
    fn retire_now(self: &Arc<Self>, name: &str) {
        let running = {
            let slots = lock(&self.slots);
            slots
                .get(name)
                .is_some_and(|s| !matches!(s.state, State::Stopped | State::Failed))
        };
        if running {
            self.stop(name, "its config changed");
        } else {
            self.settle_retired(name);
        }
    }

    fn settle_retired(&self, name: &str) {
        let mut slots = lock(&self.slots);
        let Some(slot) = slots.get_mut(name) else {
            return;
        };
        if !slot.retire || !matches!(slot.state, State::Stopped | State::Failed) {
            return;
        }
        match slot.next.take() {
            None => {
                slots.remove(name);
            }
            Some(w) => {
                if let Some(latent) = w.latent.as_deref() {
                    *slot = Slot::new(w.clone(), latent.clone());
                }
            }
        }
    }

    /// Whether the config has latent workers at all.
    pub fn is_configured(&self) -> bool {
        !lock(&self.slots).is_empty()
    }

    /// Whether a connected worker of this name may take a build: not a
    /// latent worker being stopped or retired.
    pub fn accepts(&self, name: &str) -> bool {
        lock(&self.slots)
            .get(name)
            .map_or(true, |s| !s.retire && s.state != State::Stopping)
    }

    /// Requests wait for a builder whose workers are `names` and none of
    /// them can take one now: starts stopped latent workers among them,
    /// never more starting for these names than `waiting`, nor more
    /// starting in all than `latentStartConcurrency`.
    pub fn demand(self: &Arc<Self>, names: &[rhai::ImmutableString], waiting: usize) {
        let now = Instant::now();
        let mut starts = Vec::new();
        {
            let mut slots = lock(&self.slots);
            // Most masters have no latent worker: this runs for every
            // builder that waits, every round.
            if slots.is_empty() {
                return;
            }
            let starting_all = slots
                .values()
                .filter(|s| s.state == State::Starting)
                .count();
            let limit = self.concurrency.load(Ordering::SeqCst) as usize;
            let mut budget = limit.saturating_sub(starting_all);
            let starting_here = names
                .iter()
                .filter(|n| {
                    slots
                        .get(n.as_str())
                        .is_some_and(|s| s.state == State::Starting)
                })
                .count();
            let mut want = waiting.saturating_sub(starting_here);
            for n in names {
                if want == 0 || budget == 0 {
                    break;
                }
                let Some(slot) = slots.get_mut(n.as_str()) else {
                    continue;
                };
                let ready = match slot.state {
                    State::Stopped => true,
                    State::Failed => slot.retry_at.map_or(true, |t| t <= now),
                    _ => false,
                };
                if !ready || slot.retire {
                    continue;
                }
                slot.set(State::Starting, "");
                slot.epoch += 1;
                starts.push((n.to_string(), slot.epoch));
                want -= 1;
                budget -= 1;
            }
        }
        for (name, epoch) in starts {
            self.announce(&name);
            self.counters.starts.fetch_add(1, Ordering::Relaxed);
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(why) = me.start(&name).await {
                    me.failed(&name, epoch, &why).await;
                }
            });
        }
    }

    /// When the first latent worker whose start failed may be started
    /// again, if that is still to come.
    pub fn next_retry(&self) -> Option<Instant> {
        let now = Instant::now();
        lock(&self.slots)
            .values()
            .filter(|s| s.state == State::Failed)
            .filter_map(|s| s.retry_at)
            .filter(|t| *t > now)
            .min()
    }

    /// Starts the instance; it counts as started when it connects.
    async fn start(&self, name: &str) -> Result<(), String> {
        let (worker, latent) = {
            let slots = lock(&self.slots);
            let slot = slots.get(name).ok_or("removed by a reload")?;
            (slot.worker.clone(), slot.latent.clone())
        };
        let addr = lock(&self.master_addr).clone();
        tracing::info!(worker = %name, "starting latent worker");
        match &latent.kind {
            LatentKind::Local { basedir } => {
                let dir = self.master_dir.join(basedir);
                let config = dir.join(kiln_worker::CONFIG_FILE);
                if config.exists() {
                    std::fs::remove_file(&config)
                        .map_err(|e| format!("cannot replace {}: {e}", config.display()))?;
                }
                kiln_worker::create(
                    &dir,
                    &addr.addr,
                    name,
                    worker.password.expose(),
                    addr.ca.as_deref(),
                )
                .map_err(|e| format!("{e:#}"))?;
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("worker.log"))
                    .map_err(|e| {
                        format!("cannot open {}: {e}", dir.join("worker.log").display())
                    })?;
                let exe = std::env::current_exe()
                    .map_err(|e| format!("cannot find the kiln executable: {e}"))?;
                let mut cmd = Command::new(exe);
                cmd.arg("worker")
                    .arg("start")
                    .arg(&dir)
                    .stdin(std::process::Stdio::null())
                    .stdout(log.try_clone().map_err(|e| e.to_string())?)
                    .stderr(log)
                    .kill_on_drop(true);
                die_with_the_master(&mut cmd);
                let child = cmd
                    .spawn()
                    .map_err(|e| format!("cannot start kiln's worker: {e}"))?;
                if let Some(pid) = child.id() {
                    let _ = std::fs::write(dir.join(PID_FILE), pid.to_string());
                }
                let mut slots = lock(&self.slots);
                match slots.get_mut(name) {
                    Some(slot) if slot.state == State::Starting => slot.child = Some(child),
                    // Stopped or removed meanwhile: the child is killed as it drops.
                    _ => {}
                }
                Ok(())
            }
            LatentKind::Command { start, env, .. } => {
                let marker = self.marker(name);
                if let Some(parent) = marker.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let _ = std::fs::write(&marker, "");
                let limit = Duration::from_secs(worker.missing_timeout.max(1));
                run_command(start, env, &worker, &addr, limit).await
            }
        }
    }

    /// A start failed: the worker is stopped (what was started of it) and
    /// waits out a backoff before it is started again.
    async fn failed(self: &Arc<Self>, name: &str, epoch: u64, why: &str) {
        {
            let slots = lock(&self.slots);
            match slots.get(name) {
                Some(s) if s.epoch == epoch && s.state == State::Starting => {}
                _ => return,
            }
        }
        tracing::warn!(worker = %name, "latent worker did not start: {why}");
        self.counters.failed_starts.fetch_add(1, Ordering::Relaxed);
        self.teardown(name).await;
        {
            let mut slots = lock(&self.slots);
            if let Some(slot) = slots.get_mut(name) {
                slot.failures += 1;
                // 5 s, doubling, at most 5 minutes.
                let backoff =
                    Duration::from_secs(5 << slot.failures.min(6)).min(Duration::from_secs(300));
                slot.retry_at = Some(Instant::now() + backoff);
                slot.set(State::Failed, why);
            }
        }
        self.announce(name);
        self.settle_retired(name);
    }

    /// Stops a running latent worker (`why` is logged).
    pub fn stop(self: &Arc<Self>, name: &str, why: &str) {
        {
            let mut slots = lock(&self.slots);
            let Some(slot) = slots.get_mut(name) else {
                return;
            };
            if matches!(slot.state, State::Stopped | State::Failed | State::Stopping) {
                return;
            }
            slot.set(State::Stopping, "");
        }
        tracing::info!(worker = %name, "stopping latent worker: {why}");
        self.announce(name);
        let me = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            me.teardown(&name).await;
            me.stopped(&name);
        });
    }

    /// What stops an instance: the child process, or the stop command.
    async fn teardown(&self, name: &str) {
        let (child, worker, latent) = {
            let mut slots = lock(&self.slots);
            let Some(slot) = slots.get_mut(name) else {
                return;
            };
            (slot.child.take(), slot.worker.clone(), slot.latent.clone())
        };
        match &latent.kind {
            LatentKind::Local { basedir } => {
                if let Some(child) = child {
                    end_child(name, child).await;
                }
                let _ = std::fs::remove_file(self.master_dir.join(basedir).join(PID_FILE));
            }
            LatentKind::Command { stop, env, .. } => {
                let addr = lock(&self.master_addr).clone();
                if let Err(e) = run_command(stop, env, &worker, &addr, STOP_LIMIT).await {
                    tracing::error!(worker = %name, "the stop command of latent worker failed: {e}");
                }
                let _ = std::fs::remove_file(self.marker(name));
            }
        }
    }

    fn stopped(&self, name: &str) {
        {
            let mut slots = lock(&self.slots);
            if let Some(slot) = slots.get_mut(name) {
                if slot.state == State::Stopping {
                    slot.set(State::Stopped, "");
                    slot.running = 0;
                }
            }
        }
        self.announce(name);
        self.settle_retired(name);
    }

    /// Follows workers connecting, leaving and being refused.
    pub fn presence(self: &Arc<Self>, p: &Presence) {
        match p {
            Presence::Connected(name) => {
                let latency = {
                    let mut slots = lock(&self.slots);
                    let Some(slot) = slots.get_mut(name) else {
                        return;
                    };
                    let latency = (slot.state == State::Starting).then(|| slot.since.elapsed());
                    if matches!(slot.state, State::Starting | State::Stopped | State::Failed) {
                        slot.failures = 0;
                        slot.retry_at = None;
                        // A build may have started on it already.
                        let now = if slot.running > 0 {
                            State::Building
                        } else {
                            State::Idle
                        };
                        slot.set(now, "");
                    }
                    latency
                };
                if let Some(l) = latency {
                    tracing::info!(worker = %name, "latent worker connected {:.1} s after its start", l.as_secs_f64());
                    self.counters
                        .start_ms
                        .fetch_add(l.as_millis() as u64, Ordering::Relaxed);
                    self.counters
                        .connected_starts
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.announce(name);
            }
            Presence::Disconnected(name) => {
                let gone = {
                    let mut slots = lock(&self.slots);
                    let Some(slot) = slots.get_mut(name) else {
                        return;
                    };
                    if matches!(slot.state, State::Idle | State::Building) {
                        slot.set(State::Stopping, "");
                        true
                    } else {
                        false
                    }
                };
                if gone {
                    // It went away by itself: make sure it is gone for good.
                    tracing::warn!(worker = %name, "latent worker disconnected; stopping what is left of it");
                    let me = self.clone();
                    let name = name.clone();
                    tokio::spawn(async move {
                        me.teardown(&name).await;
                        me.stopped(&name);
                    });
                }
            }
            Presence::Refused { name, why } => {
                let epoch = {
                    let slots = lock(&self.slots);
                    match slots.get(name) {
                        Some(s) if s.state == State::Starting => s.epoch,
                        _ => return,
                    }
                };
                let me = self.clone();
                let (name, why) = (name.clone(), format!("the master refused it: {why}"));
                tokio::spawn(async move { me.failed(&name, epoch, &why).await });
            }
        }
    }

    /// A build started on worker `name`.
    pub fn build_started(&self, name: &str) {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get_mut(name) {
            slot.running += 1;
            if slot.state == State::Idle {
                slot.set(State::Building, "");
            }
        }
        drop(slots);
        self.announce(name);
    }

    /// A build ended on worker `name`; with `build_wait_timeout: 0` (or
    /// retired by a reload) an idle worker stops now.
    pub fn build_ended(self: &Arc<Self>, name: &str) {
        let stop_now = {
            let mut slots = lock(&self.slots);
            let Some(slot) = slots.get_mut(name) else {
                return;
            };
            slot.running = slot.running.saturating_sub(1);
            if slot.running == 0 && slot.state == State::Building {
                slot.set(State::Idle, "");
            }
            slot.state == State::Idle && (slot.latent.build_wait_timeout == 0 || slot.retire)
        };
        self.announce(name);
        if stop_now {
            self.stop(name, "its build ended");
        }
    }

    /// The timeouts: a start that has not connected within
    /// `missing_timeout` fails; an idle worker past `build_wait_timeout`
    /// stops.
    pub fn tick(self: &Arc<Self>) {
        let mut missing = Vec::new();
        let mut idle = Vec::new();
        {
            let slots = lock(&self.slots);
            for (name, s) in slots.iter() {
                let age = s.since.elapsed();
                match s.state {
                    State::Starting if age > Duration::from_secs(s.worker.missing_timeout) => {
                        missing.push((name.clone(), s.epoch, s.worker.missing_timeout));
                    }
                    State::Idle if s.running == 0 && (s.retire || idle_too_long(s, age)) => {
                        idle.push(name.clone());
                    }
                    _ => {}
                }
            }
        }
        for (name, epoch, secs) in missing {
            let me = self.clone();
            tokio::spawn(async move {
                let why = format!("it did not connect within missing_timeout ({secs} s)");
                me.failed(&name, epoch, &why).await;
            });
        }
        for name in idle {
            self.stop(&name, "idle for build_wait_timeout");
        }
    }

    /// Runs `tick` every second until `cancel`, then stops every latent
    /// worker this master started.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        self.sweep().await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => self.tick(),
                _ = cancel.cancelled() => break,
            }
        }
        self.stop_all().await;
    }

    /// Stops every latent worker that runs (the master is stopping).
    pub async fn stop_all(&self) {
        // Marked stopping here, under the lock, so that a disconnection
        // seen meanwhile does not stop one a second time; one another path
        // is already stopping is waited for instead.
        let (mut names, mut already) = (Vec::new(), Vec::new());
        for (n, s) in lock(&self.slots).iter_mut() {
            match s.state {
                State::Stopped | State::Failed => {}
                State::Stopping => already.push(n.clone()),
                _ => {
                    s.set(State::Stopping, "");
                    names.push(n.clone());
                }
            }
        }
        let all = names.iter().map(|n| async move {
            self.teardown(n).await;
            let mut slots = lock(&self.slots);
            if let Some(s) = slots.get_mut(n) {
                s.set(State::Stopped, "");
            }
        });
        futures_util::future::join_all(all).await;
        let deadline = std::time::Instant::now() + STOP_LIMIT;
        while std::time::Instant::now() < deadline
            && already.iter().any(|n| {
                lock(&self.slots)
                    .get(n)
                    .is_some_and(|s| s.state == State::Stopping)
            })
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        names.append(&mut already);
        if !names.is_empty() {
            tracing::info!("stopped {} latent worker(s)", names.len());
        }
    }

    /// What a previous run left (the master was killed): a local worker
    /// whose pid file names a live process of it is stopped; a command
    /// worker whose marker is there gets its stop command.
    async fn sweep(&self) {
        let slots: Vec<(String, Worker, Latent)> = lock(&self.slots)
            .iter()
            .map(|(n, s)| (n.clone(), s.worker.clone(), s.latent.clone()))
            .collect();
        for (name, worker, latent) in slots {
            match &latent.kind {
                LatentKind::Local { basedir } => {
                    let dir = self.master_dir.join(basedir);
                    let pidfile = dir.join(PID_FILE);
                    let Ok(text) = std::fs::read_to_string(&pidfile) else {
                        continue;
                    };
                    if let Ok(pid) = text.trim().parse::<i32>() {
                        if is_worker_process(pid, &dir) {
                            tracing::warn!(worker = %name, pid, "stopping the latent worker a previous run left");
                            end_pid(pid).await;
                        }
                    }
                    let _ = std::fs::remove_file(&pidfile);
                }
                LatentKind::Command { stop, env, .. } => {
                    let marker = self.marker(&name);
                    if !marker.exists() {
                        continue;
                    }
                    tracing::warn!(worker = %name, "a previous run started this latent worker: running its stop command");
                    let addr = lock(&self.master_addr).clone();
                    if let Err(e) = run_command(stop, env, &worker, &addr, STOP_LIMIT).await {
                        tracing::error!(worker = %name, "the stop command of latent worker failed: {e}");
                    }
                    let _ = std::fs::remove_file(&marker);
                }
            }
        }
    }

    fn marker(&self, name: &str) -> PathBuf {
        let file: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.master_dir.join("latent/.started").join(file)
    }

    /// Every latent worker's state, by name.
    pub fn statuses(&self) -> Vec<Status> {
        lock(&self.slots).iter().map(|(n, s)| s.status(n)).collect()
    }

    /// How many latent workers are in each state.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for s in lock(&self.slots).values() {
            *m.entry(s.state.name()).or_insert(0) += 1;
        }
        m
    }

    fn announce(&self, name: &str) {
        self.changed.notify_one();
        let status = lock(&self.slots).get(name).map(|s| s.status(name));
        if let Some(st) = status {
            self.events.emit(
                "workers",
                0,
                "latent",
                || json!({ "name": st.name, "latent": { "state": st.state, "reason": st.reason } }),
            );
        }
    }
}

/// Whether an idle worker has waited out its `build_wait_timeout` (-1:
/// never).
fn idle_too_long(s: &Slot, idle: Duration) -> bool {
    u64::try_from(s.latent.build_wait_timeout).is_ok_and(|t| idle >= Duration::from_secs(t))
}

impl Slot {
    fn new(worker: Worker, latent: Latent) -> Slot {
        Slot {
            worker,
            latent,
            state: State::Stopped,
            since: Instant::now(),
            reason: String::new(),
            child: None,
            failures: 0,
            retry_at: None,
            retire: false,
            next: None,
            running: 0,
            epoch: 0,
        }
    }

    fn set(&mut self, state: State, reason: &str) {
        self.state = state;
        self.since = Instant::now();
        self.reason = reason.to_string();
    }

    fn status(&self, name: &str) -> Status {
        Status {
            name: name.to_string(),
            state: self.state,
            reason: self.reason.clone(),
            for_seconds: self.since.elapsed().as_secs(),
        }
    }
}
