//! A scheduler's task: it reads the changes stored after the last one it
//! handled, classifies them, and stores classifications, buildsets, its
//! position and its timers (treeStableTimer, Nightly, Periodic) in one
//! transaction; it answers force and trigger calls, and Dependent ones
//! listen for upstream buildsets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{Callback, SchedulerConfig, SchedulerKind};
use crate::store::buildsets::{BuildsetIds, NewBuildset, SchedulerWrite, Source, SourceStamp};
use crate::store::{Change, ObjectId, Properties};

use super::{
    filter::{change_map, filter_of, rejects, Filter},
    BuildsetDone, Call, ForceRequest, Shared,
};

pub(super) struct Task {
    pub(super) cfg: SchedulerConfig,
    pub(super) shared: Arc<Shared>,
    pub(super) object: Option<ObjectId>,
    /// When this task was made (Unix seconds).
    pub(super) started_at: i64,
}

pub(super) const LAST_CHANGE: &str = "lastChangeId";
pub(super) const TIMERS: &str = "timers";
pub(super) const BATCH: usize = 500;

impl Task {
    pub(super) fn filter(&self) -> Option<Filter<'_>> {
        filter_of(&self.cfg)
    }
}

impl Task {
    pub(super) fn kind_name(&self) -> &'static str {
        match self.cfg.kind {
            SchedulerKind::Scheduler { .. } => "SingleBranchScheduler",
            _ => self.cfg.kind.type_name(),
        }
    }

    /// In a fleet, the lease this scheduler's writes stand on.
    pub(super) fn fence(&self) -> Option<crate::store::masters::Fence> {
        self.shared
            .store
            .fence(format!("scheduler:{}", self.cfg.name))
    }

    pub(super) async fn object(&mut self) -> anyhow::Result<ObjectId> {
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

    pub(super) fn base_properties(&self) -> Properties {
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

    pub(super) fn buildset(
        &self,
        source: Source,
        reason: String,
        mut properties: Properties,
    ) -> NewBuildset {
        for (k, v) in self.base_properties() {
            properties.entry(k).or_insert(v);
        }
        NewBuildset {
            scheduler: self.cfg.name.clone(),
            reason,
            external_idstring: None,
            source,
            properties,
            builders: self
                .cfg
                .builder_names
                .iter()
                .map(|b| b.to_string())
                .collect(),
            priority: self.cfg.priority.unwrap_or(0),
            parent_buildid: None,
        }
    }

    pub(super) fn reason(&self) -> String {
        format!(
            "The {} scheduler named '{}' triggered this build",
            self.kind_name(),
            self.cfg.name
        )
    }

    pub(super) async fn run(
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
        // A Dependent catches up with its upstream at start, then after
        // every buildset completed anywhere.
        let mut follow = state.followed.is_some();
        let mut hears_done = follow;
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
            if let (true, Some(mut followed)) = (follow, state.followed.take()) {
                let r = self.follow_upstream(&mut followed).await;
                state.followed = Some(followed);
                match r {
                    Ok(()) => follow = false,
                    Err(e) => {
                        tracing::error!(scheduler = %name, "cannot follow the upstream's buildsets: {e:#}; retrying in 1 s");
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
                r = done.recv(), if hears_done => match r {
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => follow = true,
                    Err(broadcast::error::RecvError::Closed) => hears_done = false,
                },
                Some(cmd) = commands.recv() => self.command(cmd).await,
                _ = sleep => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    pub(super) async fn load_state(&mut self) -> anyhow::Result<State> {
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
            followed: self.load_followed().await?,
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

    pub(super) fn next_cron(&self, after: f64) -> Option<f64> {
        let SchedulerKind::Nightly { when, .. } = &self.cfg.kind else {
            return None;
        };
        let at = chrono::DateTime::from_timestamp(after as i64, 0)?.with_timezone(&chrono::Local);
        when.next_after(&at).map(|t| t.timestamp() as f64)
    }

    /// Handles the changes after `state.last`: those just published when
    /// they follow on without a gap, otherwise (a restart, a lagging
    /// receiver, publishers out of order) whatever the store has.
    pub(super) async fn handle_new_changes(
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
    pub(super) async fn process(
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
            w.fence = self.fence();
            let made = self.shared.store.scheduler_write(obj, w).await?;
            self.log_made(&made);
            state.persisted = last;
        }
        state.last = last;
        state.timers = timers;
        self.report_progress(last);
        Ok(())
    }

    pub(super) fn report_progress(&self, last: i64) {
        crate::sync::lock(&self.shared.progress).insert(self.cfg.name.clone(), last);
    }

    pub(super) fn log_made(&self, made: &[BuildsetIds]) {
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
    pub(super) async fn classify(&self, cb: &Callback, c: &Change) -> bool {
        let rt = crate::sync::read(&self.shared.runtime).clone();
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
    pub(super) async fn fire_due(&mut self, state: &mut State) -> anyhow::Result<()> {
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
            w.fence = self.fence();
            let made = self.shared.store.scheduler_write(obj, w).await?;
            self.log_made(&made);
            state.timers = timers;
        }
        Ok(())
    }

    pub(super) async fn load_changes(&self, ids: &[i64]) -> anyhow::Result<Vec<Change>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(c) = self.shared.store.get_change(*id).await? {
                out.push(c);
            }
        }
        Ok(out)
    }

    pub(super) async fn command(&mut self, cmd: Call) {
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

    pub(super) async fn force(&mut self, req: ForceRequest) -> anyhow::Result<BuildsetIds> {
        let builders: Vec<String> = if req.builders.is_empty() {
            self.cfg
                .builder_names
                .iter()
                .map(|b| b.to_string())
                .collect()
        } else {
            for b in &req.builders {
                if !self.cfg.builder_names.iter().any(|n| n.as_str() == b) {
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

pub(super) const NIGHTLY: &str = "nightly";
pub(super) const PERIODIC: &str = "periodic";

/// The timer key of a branch (`()` is the default branch).
pub(super) fn branch_key(b: &Option<String>) -> String {
    match b {
        None => "branch:".to_string(),
        Some(b) => format!("branch:{b}"),
    }
}

/// The change properties a buildset carries (the newest change wins).
pub(super) fn change_properties(changes: &[Change]) -> Properties {
    let mut p = Properties::new();
    for c in changes {
        for (k, (v, _)) in &c.change.properties {
            p.insert(k.clone(), (v.clone(), "Change".to_string()));
        }
    }
    p
}

pub(super) struct State {
    /// The last change handled.
    pub(super) last: i64,
    /// The last change whose handling is stored.
    pub(super) persisted: i64,
    /// Deadlines (Unix seconds) by key: `branch:<name>`, `nightly`, `periodic`.
    pub(super) timers: BTreeMap<String, f64>,
    /// A Dependent's position in its upstream's buildsets.
    pub(super) followed: Option<super::dependent::Followed>,
}

impl State {
    pub(super) fn next_deadline(&self) -> Option<f64> {
        self.timers.values().copied().reduce(f64::min)
    }

    /// After a failed timer write, try again in a few seconds.
    pub(super) fn retry_soon(&mut self, now: f64) {
        for t in self.timers.values_mut() {
            if *t <= now {
                *t = now + 5.0;
            }
        }
    }
}
