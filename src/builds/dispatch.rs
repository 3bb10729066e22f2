//! Dispatch: which pending request builds next, and where. Builders are
//! served in `prioritizeBuilders` order, each builder's requests by
//! priority then age; a worker is chosen among the idle connected ones
//! (`nextWorker`, else the least busy; `canStartBuild` may veto), requests
//! are collapsed (`collapseRequests`) and claimed in the store, and the
//! build is started.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::config::{BoolOrCallback, BuilderConfig};
use crate::store::buildsets::{BuildRequest, Collapse};
use crate::workers::WorkerConn;

use super::{lock, Distributor, Generation};

/// What a round of dispatch left to a later one.
#[derive(Default)]
pub(super) struct Round {
    /// A request was held back by a script's callback (`nextWorker`,
    /// `canStartBuild`, `prioritizeBuilders`), which no event announces
    /// the change of its mind: the distributor looks again after
    /// [`super::DEFERRED_RETRY`].
    pub(super) deferred: bool,
}

/// A builder's pending requests, as the distributor serves them.
pub(super) struct BuilderQueue<'a> {
    pub(super) builder: &'a Arc<BuilderConfig>,
    /// When its oldest pending request was submitted.
    pub(super) oldest: i64,
    /// The highest priority among its pending requests.
    pub(super) priority: i64,
    pub(super) requests: Vec<BuildRequest>,
}

impl Distributor {
    pub(super) fn max_builds(gen: &Generation, worker: &str) -> usize {
        gen.config
            .workers
            .iter()
            .find(|w| w.name == worker)
            .and_then(|w| w.max_builds)
            .map_or(usize::MAX, |n| n as usize)
    }

    /// The connected workers that may build for `builder` now, least busy
    /// first.
    pub(super) fn candidates(
        &self,
        gen: &Generation,
        builder: &BuilderConfig,
    ) -> Vec<Arc<WorkerConn>> {
        let busy = lock(&self.busy);
        let mut v: Vec<Arc<WorkerConn>> = builder
            .worker_names
            .iter()
            .filter_map(|w| self.registry.get(w.as_str()))
            .filter(|conn| !conn.draining.load(std::sync::atomic::Ordering::SeqCst))
            // A connection being closed (a DisconnectStep, a changed
            // password) is still registered until its tasks end.
            .filter(|conn| !conn.closed.is_cancelled())
            // A latent worker being stopped takes nothing new.
            .filter(|conn| self.latent.accepts(&conn.name))
            .filter(|conn| {
                let running = busy.running.get(&conn.name);
                let n = running.map_or(0, HashSet::len);
                n < Self::max_builds(gen, &conn.name)
                    && !running.is_some_and(|r| r.contains(builder.name.as_str()))
                    && busy.can_lock(&builder.locks, &conn.name)
            })
            .collect();
        v.sort_by_key(|conn| busy.running.get(&conn.name).map_or(0, HashSet::len));
        v
    }

    /// A request as the script sees it: ids, priority, submission time,
    /// its sourcestamps and its buildset's properties.
    pub(super) async fn request_map(&self, req: &BuildRequest) -> anyhow::Result<rhai::Map> {
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
    pub(super) async fn pick_worker(
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
    pub(super) async fn collapse_for(
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
    pub(super) async fn prioritize(
        &self,
        gen: &Generation,
        pending: &[BuilderQueue<'_>],
    ) -> Vec<usize> {
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

    /// One round over the queue. Nothing polls it: a round runs when
    /// something that can change its answer happens (a request added or
    /// given back, a worker come or gone, a build ended, a lock released
    /// here or on another master, a latent worker's state, a reload).
    pub(super) async fn distribute(self: Arc<Self>) -> anyhow::Result<Round> {
        let gen = self.generation();
        // The queue of this master's builders only: with many masters on
        // one database, the others' requests are not its to look at.
        let pending = self
            .store
            .unclaimed_requests_of(self.masterid, 1000)
            .await?;
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
        let mut round = Round::default();
        if queues.is_empty() {
            return Ok(round);
        }
        let order = self.prioritize(&gen, &queues).await;
        // A builder prioritizeBuilders left out waits for the next round,
        // which nothing else may bring soon.
        round.deferred |= order.len() < queues.len();
        for i in order {
            let builder = queues[i].builder;
            let waiting = queues[i].requests.len();
            for (n, req) in queues[i].requests.iter().enumerate() {
                let candidates = self.candidates(&gen, builder);
                if candidates.is_empty() {
                    // Latent workers of the builder start for the requests
                    // still waiting (they build once connected).
                    self.latent.demand(&builder.worker_names, waiting - n);
                    break;
                }
                let Some(worker) = self.pick_worker(&gen, builder, req, candidates).await? else {
                    // nextWorker said "not now", or canStartBuild refused
                    // every candidate: what they look at is the script's
                    // business, so the request is offered again later.
                    round.deferred = true;
                    continue;
                };
                let collapse = self.collapse_for(&gen, builder, req).await?;
                let claimed = self
                    .store
                    .claim_with_collapsed(
                        req.buildrequestid,
                        self.masterid,
                        collapse,
                        shared_locks(&gen, builder),
                    )
                    .await?;
                if claimed.is_empty() {
                    continue;
                }
                self.start(gen.clone(), claimed, req.clone(), builder.clone(), worker);
            }
        }
        Ok(round)
    }

    /// Marks the worker busy, takes the builder's locks, and runs the build
    /// in its own task.
    pub(super) fn start(
        self: &Arc<Self>,
        gen: Arc<Generation>,
        claimed: Vec<i64>,
        req: BuildRequest,
        builder: Arc<BuilderConfig>,
        worker: Arc<WorkerConn>,
    ) {
        {
            let mut busy = lock(&self.busy);
            busy.running
                .entry(worker.name.clone())
                .or_default()
                .insert(builder.name.to_string());
            busy.take_locks(&builder.locks, &worker.name);
        }
        self.latent.build_started(&worker.name);
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
            if !shared_locks(&gen, &builder).is_empty() {
                if let Err(e) = me.store.release_shared_locks(req.buildrequestid).await {
                    // They go at this master's next start, or when the
                    // others declare it dead.
                    tracing::error!(builder = %bname, "cannot give back the build's MasterLocks: {e:#}");
                }
            }
            {
                let mut busy = lock(&me.busy);
                if let Some(set) = busy.running.get_mut(&wname) {
                    set.remove(bname.as_str());
                }
                busy.release_locks(&builder.locks, &wname);
            }
            me.latent.build_ended(&wname);
            me.shutdown_if_drained(&wname).await;
            me.wake.notify_one();
        });
    }
}

/// The builder's MasterLocks as the masters of a fleet share them (none
/// for a master alone: its own count is the whole count).
fn shared_locks(gen: &Generation, builder: &BuilderConfig) -> Vec<crate::store::locks::SharedLock> {
    if gen.config.multi_master.is_none() {
        return vec![];
    }
    builder
        .locks
        .iter()
        .filter(|a| a.scope == crate::config::LockScope::Master)
        .map(|a| crate::store::locks::SharedLock {
            name: a.name.clone(),
            exclusive: a.mode == crate::config::LockMode::Exclusive,
            max_count: a.max_count,
        })
        .collect()
}
