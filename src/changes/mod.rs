//! Change sources: the pollers that turn new commits into stored changes,
//! and the bus that publishes each stored change to the schedulers.
//!
//! Each poller is one task: poll, store what is new together with the
//! poller's state (one transaction), publish, sleep `pollInterval`. A failed
//! poll is logged with its repository and retried with a growing delay; it
//! never ends the task. Polls of one poller never overlap because the task
//! does one thing at a time.

pub mod git;
pub mod hg;
pub mod pushlog;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio_util::sync::CancellationToken;

use crate::config::ChangeSource;
use crate::store::{NewChange, ObjectId, Store};

/// How long one command or HTTP request of a poll may take.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait between retries of a failing poller.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

pub use crate::store::ChangeBus;

/// Pollers that can be asked to poll at once (Buildbot's `poller` change
/// hook): each registers the names it answers to and a wake-up.
#[derive(Clone, Default)]
pub struct PollNow(Arc<std::sync::Mutex<Vec<Wakeable>>>);

/// The names a poller answers to, and its wake-up.
type Wakeable = (Vec<String>, Arc<tokio::sync::Notify>);

/// A poller's place in [`PollNow`], given up when the poller stops.
struct Registered {
    poll_now: PollNow,
    notify: Arc<tokio::sync::Notify>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.poll_now
            .lock()
            .retain(|(_, n)| !Arc::ptr_eq(n, &self.notify));
    }
}

impl PollNow {
    fn register(&self, names: Vec<String>) -> Registered {
        let notify = Arc::new(tokio::sync::Notify::new());
        self.lock().push((names, notify.clone()));
        Registered {
            poll_now: self.clone(),
            notify,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Wakeable>> {
        crate::sync::lock(&self.0)
    }

    /// Wakes the pollers named (every poller when `names` is empty) and
    /// returns the names they answer to; a name no poller answers to is
    /// an error listing those, and then none is woken.
    pub fn poll(&self, names: &[String]) -> Result<Vec<String>, Vec<String>> {
        let pollers = self.lock();
        let unknown: Vec<String> = names
            .iter()
            .filter(|n| !pollers.iter().any(|(known, _)| known.contains(n)))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(unknown);
        }
        let mut woken = Vec::new();
        for (known, notify) in pollers.iter() {
            if names.is_empty() || names.iter().any(|n| known.contains(n)) {
                // A wake-up during a poll is kept: the next poll follows at once.
                notify.notify_one();
                woken.push(known[0].clone());
            }
        }
        Ok(woken)
    }
}

/// What every change source needs.
#[derive(Clone)]
pub struct Context {
    pub store: Store,
    /// Where the `poller` change hook wakes pollers up.
    pub poll_now: PollNow,
    /// Pollers keep their mirrors under `DIR/pollers/`.
    pub master_dir: PathBuf,
    pub http: reqwest::Client,
    pub timeout: Duration,
    /// Bounds how many hg/git processes polls run at once.
    commands: Arc<tokio::sync::Semaphore>,
    /// How each change source's polls go, for `/metrics` and the API.
    pub poll_health: PollHealth,
}

/// How each change source's polls go, since the master started: for
/// `/metrics` (failures counted) and the API's `changesources` (the last
/// error, when it began, when polling last worked).
#[derive(Clone, Default)]
pub struct PollHealth(Arc<std::sync::Mutex<std::collections::BTreeMap<String, SourceHealth>>>);

/// One change source's health.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SourceHealth {
    /// Failed polls since the master started.
    pub errors_total: u64,
    /// Failed polls since the last one that worked.
    pub failing_for: u32,
    /// What the last failed poll said, while polls fail.
    pub last_error: Option<String>,
    /// When the first of the failing polls ended (Unix seconds).
    pub failing_since: Option<i64>,
    /// When a poll last worked (Unix seconds).
    pub last_ok: Option<i64>,
    /// When the next poll is due after a failure (Unix seconds).
    pub retry_at: Option<i64>,
}

impl PollHealth {
    fn failed(&self, source: &str, error: String, retry_in: Duration) {
        let now = crate::store::now();
        let mut all = crate::sync::lock(&self.0);
        let h = all.entry(source.to_string()).or_default();
        h.errors_total += 1;
        h.failing_for = h.failing_for.saturating_add(1);
        h.failing_since.get_or_insert(now);
        h.last_error = Some(error);
        h.retry_at = Some(now + i64::try_from(retry_in.as_secs()).unwrap_or(i64::MAX / 2));
    }

    fn succeeded(&self, source: &str) {
        let mut all = crate::sync::lock(&self.0);
        let h = all.entry(source.to_string()).or_default();
        h.failing_for = 0;
        h.failing_since = None;
        h.last_error = None;
        h.retry_at = None;
        h.last_ok = Some(crate::store::now());
    }

    pub fn snapshot(&self) -> std::collections::BTreeMap<String, SourceHealth> {
        crate::sync::lock(&self.0).clone()
    }
}

impl Context {
    pub fn new(store: Store, master_dir: &Path) -> anyhow::Result<Context> {
        let http = reqwest::Client::builder()
            .timeout(POLL_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(Context {
            store,
            poll_now: PollNow::default(),
            master_dir: master_dir.to_path_buf(),
            http,
            timeout: POLL_TIMEOUT,
            commands: Arc::new(tokio::sync::Semaphore::new(command_slots())),
            poll_health: PollHealth::default(),
        })
    }

    /// Waits for a turn to run VCS commands; the turn ends when dropped.
    pub async fn command_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // The semaphore is never closed, so this is always Some.
        self.commands.acquire().await.ok()
    }

    /// Stores `changes` with the poller's new state (the store publishes
    /// them).
    pub async fn commit(
        &self,
        source: &str,
        changes: Vec<NewChange>,
        state: Vec<(ObjectId, String, serde_json::Value)>,
    ) -> anyhow::Result<usize> {
        let fence = self.store.fence(format!("change_source:{source}"));
        Ok(self
            .store
            .add_changes_fenced(source, changes, state, fence)
            .await?
            .len())
    }

    /// A directory for a poller's mirror of `url`.
    pub fn mirror_dir(&self, kind: &str, url: &str) -> PathBuf {
        let name: String = url
            .trim_end_matches('/')
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.master_dir.join("pollers").join(kind).join(name)
    }
}

/// A running change source.
pub enum Poller {
    Hg(hg::HgPollerTask),
    Git(git::GitPollerTask),
}

impl Poller {
    pub fn new(source: &ChangeSource) -> Poller {
        match source {
            ChangeSource::HgPoller(p) => Poller::Hg(hg::HgPollerTask::new(p.clone())),
            ChangeSource::GitPoller(p) => Poller::Git(git::GitPollerTask::new(p.clone())),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Poller::Hg(p) => p.name(),
            Poller::Git(p) => p.name(),
        }
    }

    /// What the `poller` change hook may call it: its name, or its
    /// repository (Buildbot's default name for a poller).
    fn hook_names(&self) -> Vec<String> {
        match self {
            Poller::Hg(p) => vec![p.name(), p.cfg.repository()],
            Poller::Git(p) => vec![p.name(), p.cfg.repourl.clone()],
        }
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(match self {
            Poller::Hg(p) => p.cfg.poll_interval,
            Poller::Git(p) => p.cfg.poll_interval,
        })
    }

    /// One poll: fetch, store and publish what is new. Returns how many
    /// changes were stored.
    pub async fn poll(&mut self, ctx: &Context) -> anyhow::Result<usize> {
        match self {
            Poller::Hg(p) => p.poll(ctx).await,
            Poller::Git(p) => p.poll(ctx).await,
        }
    }

    /// Polls until `cancel` fires (which ends a poll in flight) or
    /// `retire` does (which lets a poll in flight finish: a reload
    /// replacing this poller must not lose what it has fetched).
    pub async fn run(mut self, ctx: Context, cancel: CancellationToken, retire: CancellationToken) {
        let name = self.name();
        let registered = ctx.poll_now.register(self.hook_names());
        let wake = registered.notify.clone();
        let mut failures: u32 = 0;
        while !retire.is_cancelled() {
            let outcome = tokio::select! {
                r = self.poll(&ctx) => r,
                _ = cancel.cancelled() => break,
            };
            let wait = match outcome {
                Ok(n) => {
                    ctx.poll_health.succeeded(&name);
                    if failures > 0 {
                        tracing::info!(poller = %name, "polling works again");
                    }
                    failures = 0;
                    if n > 0 {
                        tracing::info!(poller = %name, "{n} new change(s)");
                    }
                    self.interval()
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = self
                        .interval()
                        .saturating_mul(1 << failures.min(10))
                        .min(MAX_BACKOFF)
                        .max(Duration::from_secs(1));
                    ctx.poll_health.failed(&name, format!("{e:#}"), wait);
                    tracing::warn!(
                        poller = %name,
                        "poll failed: {e:#}; retrying in {} s",
                        wait.as_secs()
                    );
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wake.notified() => {
                    tracing::info!(poller = %name, "polling now, as asked");
                }
                _ = cancel.cancelled() => break,
                _ = retire.cancelled() => break,
            }
        }
        drop(registered);
        tracing::debug!(poller = %name, "stopped");
    }
}

/// Runs a command (hg, git) with a time limit, returning its stdout. The
/// child is killed if the limit passes or the poll is cancelled.
pub async fn run_command(
    program: &str,
    args: &[&str],
    cwd: Option<&Path>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        // Output that does not depend on the user's configuration.
        .env("HGPLAIN", "1")
        .env("HGRCPATH", "")
        .env("LC_ALL", "C")
        .env("GIT_TERMINAL_PROMPT", "0");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let shown = format!("{program} {}", args.join(" "));
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => bail!("`{shown}` took more than {} s", timeout.as_secs()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("`{program}` is not installed (not found on PATH)")
        }
        Ok(r) => r.with_context(|| format!("cannot run `{shown}`"))?,
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("`{shown}` failed ({}): {}", out.status, err.trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

/// The running change sources, by name.
pub struct Pollers {
    running: Vec<RunningPoller>,
    ctx: Context,
    cancel: CancellationToken,
}

struct RunningPoller {
    name: String,
    source: ChangeSource,
    retire: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// How long a reload waits for a replaced poller's poll in flight.
const RETIRE_WAIT: Duration = Duration::from_secs(120);

impl Pollers {
    /// Starts one task per change source; they stop when `cancel` fires.
    pub fn start(sources: &[ChangeSource], ctx: &Context, cancel: &CancellationToken) -> Pollers {
        let mut me = Pollers {
            running: Vec::new(),
            ctx: ctx.clone(),
            cancel: cancel.clone(),
        };
        for s in sources {
            me.spawn(s);
        }
        me
    }

    fn spawn(&mut self, source: &ChangeSource) {
        let poller = Poller::new(source);
        let retire = self.cancel.child_token();
        let task = tokio::spawn(poller.run(self.ctx.clone(), self.cancel.clone(), retire.clone()));
        self.running.push(RunningPoller {
            name: source.name(),
            source: source.clone(),
            retire,
            task,
        });
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Applies a reload: sources that are gone or changed stop once their
    /// poll in flight is stored; changed and new ones start from the state
    /// stored (the last push seen), so no push is missed or seen twice. An
    /// unchanged source is not touched.
    pub async fn reload(&mut self, sources: &[ChangeSource]) {
        let (keep, retired): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| {
                sources
                    .iter()
                    .any(|s| s.name() == r.name && crate::config::diff::same_printed(s, &r.source))
            });
        self.running = keep;
        for r in &retired {
            r.retire.cancel();
        }
        for r in retired {
            if tokio::time::timeout(RETIRE_WAIT, r.task).await.is_err() {
                tracing::warn!(poller = %r.name, "did not stop within {} s", RETIRE_WAIT.as_secs());
            }
        }
        for s in sources {
            if !self.running.iter().any(|r| r.name == s.name()) {
                self.spawn(s);
            }
        }
    }

    /// Waits (after the master's cancel) until every poller has stopped.
    pub async fn stopped(self) {
        for r in self.running {
            let _ = r.task.await;
        }
    }
}

/// hg and git are mostly CPU: two per core keeps the machine busy without
/// hundreds of pollers starting hundreds of processes at once.
fn command_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
