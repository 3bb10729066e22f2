//! Buildsets, their sourcestamps, properties and changes, and build
//! requests with their lifecycle (unclaimed → claimed → complete, or
//! cancelled: complete with results CANCELLED, as Buildbot records it).
//! Over 800 lines on purpose: one table family's reads and writes (and the
//! tests of the lifecycle), which change together.

use serde::Serialize;

use super::db::{args, Dialect, Row, Sql, Value};
use super::{now, set_state, ObjectId, Properties, Store};

/// Buildbot's CANCELLED result.
pub const CANCELLED: i64 = 6;

/// A sourcestamp to build.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SourceStamp {
    pub branch: Option<String>,
    pub revision: Option<String>,
    pub repository: String,
    pub project: String,
    pub codebase: String,
}

/// Where a buildset's source comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// The newest of these changes (their sourcestamp), all linked.
    Changes(Vec<i64>),
    /// Existing sourcestamps (a Dependent reuses its upstream's).
    SourceStamps(Vec<i64>),
    /// New sourcestamps (force, trigger).
    New(Vec<SourceStamp>),
}

/// A buildset about to be stored, with one request per builder.
#[derive(Clone, Debug, PartialEq)]
pub struct NewBuildset {
    pub scheduler: String,
    pub reason: String,
    pub external_idstring: Option<String>,
    pub source: Source,
    pub properties: Properties,
    pub builders: Vec<String>,
    pub priority: i64,
    pub parent_buildid: Option<i64>,
}

/// One build request a buildset made.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestId {
    pub builder: String,
    pub builderid: i64,
    pub brid: i64,
}

/// What storing a buildset made.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BuildsetIds {
    pub bsid: i64,
    /// One request per builder, in the order the builders were given.
    pub brids: Vec<RequestId>,
}

/// A stored buildset.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Buildset {
    pub bsid: i64,
    pub scheduler: Option<String>,
    pub reason: String,
    pub external_idstring: Option<String>,
    pub submitted_at: i64,
    pub complete: bool,
    pub complete_at: Option<i64>,
    pub results: Option<i64>,
    pub sourcestamps: Vec<i64>,
    pub changeids: Vec<i64>,
    pub properties: Properties,
    pub parent_buildid: Option<i64>,
}

/// Which other requests a claim takes along (collapses).
#[derive(Clone, Debug, PartialEq)]
pub enum Collapse {
    /// None: the request builds alone.
    None,
    /// Buildbot's default rule (see [`collapsible`]).
    Default,
    /// These requests, as a `collapseRequests` function chose them.
    These(Vec<i64>),
}

/// A stored build request, as Buildbot's data API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BuildRequest {
    pub buildrequestid: i64,
    pub buildsetid: i64,
    pub builderid: i64,
    pub buildername: String,
    pub priority: i64,
    pub claimed: bool,
    pub claimed_by_masterid: Option<i64>,
    pub claimed_at: Option<i64>,
    pub complete: bool,
    pub results: Option<i64>,
    pub submitted_at: i64,
    pub complete_at: Option<i64>,
    pub waited_for: bool,
}

/// The id of a builder by name, created on first use.
pub fn builder_id(c: &mut dyn Sql, name: &str) -> anyhow::Result<i64> {
    c.execute(
        "INSERT INTO builders (name) VALUES (?1) ON CONFLICT DO NOTHING",
        args![name],
    )?;
    c.value("SELECT id FROM builders WHERE name = ?1", args![name])
}

pub(super) fn insert_sourcestamp(c: &mut dyn Sql, ss: &SourceStamp) -> anyhow::Result<i64> {
    c.value(
        "INSERT INTO sourcestamps (branch, revision, repository, project, codebase, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
        args![
            &ss.branch,
            &ss.revision,
            &ss.repository,
            &ss.project,
            &ss.codebase,
            now()
        ],
    )
}

/// Stores a buildset and its requests in the caller's transaction.
pub fn insert_buildset(c: &mut dyn Sql, bs: &NewBuildset) -> anyhow::Result<BuildsetIds> {
    let submitted = now();
    let bsid: i64 = c.value(
        "INSERT INTO buildsets (external_idstring, reason, scheduler, submitted_at, parent_buildid)
         VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
        args![
            &bs.external_idstring,
            &bs.reason,
            &bs.scheduler,
            submitted,
            bs.parent_buildid
        ],
    )?;
    let sourcestamps: Vec<i64> = match &bs.source {
        Source::Changes(ids) => {
            let mut ss = Vec::new();
            let newest = ids.iter().max();
            for id in ids {
                c.execute(
                    "INSERT INTO buildset_changes (buildsetid, changeid) VALUES (?1, ?2)
                     ON CONFLICT DO NOTHING",
                    args![bsid, id],
                )?;
            }
            if let Some(id) = newest {
                ss.push(c.value(
                    "SELECT sourcestampid FROM changes WHERE changeid = ?1",
                    args![id],
                )?);
            }
            ss
        }
        Source::SourceStamps(ids) => ids.clone(),
        Source::New(list) => list
            .iter()
            .map(|s| insert_sourcestamp(c, s))
            .collect::<anyhow::Result<_>>()?,
    };
    for ss in &sourcestamps {
        c.execute(
            "INSERT INTO buildset_sourcestamps (buildsetid, sourcestampid) VALUES (?1, ?2)
             ON CONFLICT DO NOTHING",
            args![bsid, ss],
        )?;
    }
    for (name, (value, source)) in &bs.properties {
        c.execute(
            "INSERT INTO buildset_properties (buildsetid, property_name, property_value) VALUES (?1, ?2, ?3)",
            args![bsid, name, serde_json::json!([value, source]).to_string()],
        )?;
    }
    let mut brids = Vec::with_capacity(bs.builders.len());
    for name in &bs.builders {
        let builderid = builder_id(c, name)?;
        let brid: i64 = c.value(
            "INSERT INTO buildrequests (buildsetid, builderid, priority, submitted_at) VALUES (?1, ?2, ?3, ?4)
             RETURNING id",
            args![bsid, builderid, bs.priority, submitted],
        )?;
        brids.push(RequestId {
            builder: name.clone(),
            builderid,
            brid,
        });
    }
    Ok(BuildsetIds { bsid, brids })
}

pub fn get_buildset(c: &mut dyn Sql, bsid: i64) -> anyhow::Result<Option<Buildset>> {
    let Some(r) = c.query_opt(
        "SELECT scheduler, reason, external_idstring, submitted_at, complete, complete_at, results, parent_buildid
         FROM buildsets WHERE id = ?1",
        args![bsid],
    )?
    else {
        return Ok(None);
    };
    let mut bs = Buildset {
        bsid,
        scheduler: r.get(0)?,
        reason: r.get(1)?,
        external_idstring: r.get(2)?,
        submitted_at: r.get(3)?,
        complete: r.get(4)?,
        complete_at: r.get(5)?,
        results: r.get(6)?,
        sourcestamps: vec![],
        changeids: vec![],
        properties: Properties::new(),
        parent_buildid: r.get(7)?,
    };
    bs.sourcestamps = c.column(
        "SELECT sourcestampid FROM buildset_sourcestamps WHERE buildsetid = ?1 ORDER BY sourcestampid",
        args![bsid],
    )?;
    bs.changeids = c.column(
        "SELECT changeid FROM buildset_changes WHERE buildsetid = ?1 ORDER BY changeid",
        args![bsid],
    )?;
    bs.properties = super::read_properties(
        c,
        "SELECT property_name, property_value FROM buildset_properties WHERE buildsetid = ?1",
        bsid,
        "buildset",
    )?;
    Ok(Some(bs))
}

const REQUEST_COLUMNS: &str =
    "r.id, r.buildsetid, r.builderid, b.name, r.priority, c.masterid, c.claimed_at,
     r.complete, r.results, r.submitted_at, r.complete_at, r.waited_for";

fn request_row(r: &Row) -> anyhow::Result<BuildRequest> {
    let masterid: Option<i64> = r.get(5)?;
    Ok(BuildRequest {
        buildrequestid: r.get(0)?,
        buildsetid: r.get(1)?,
        builderid: r.get(2)?,
        buildername: r.get(3)?,
        priority: r.get(4)?,
        claimed: masterid.is_some(),
        claimed_by_masterid: masterid,
        claimed_at: r.get(6)?,
        complete: r.get(7)?,
        results: r.get(8)?,
        submitted_at: r.get(9)?,
        complete_at: r.get(10)?,
        waited_for: r.get(11)?,
    })
}

fn request_rows(c: &mut dyn Sql, sql: &str, args: &[Value]) -> anyhow::Result<Vec<BuildRequest>> {
    c.query(sql, args)?.iter().map(request_row).collect()
}

pub fn requests_of_buildset(c: &mut dyn Sql, bsid: i64) -> anyhow::Result<Vec<BuildRequest>> {
    let sql = format!(
        "SELECT {REQUEST_COLUMNS} FROM buildrequests r JOIN builders b ON b.id = r.builderid
         LEFT JOIN buildrequest_claims c ON c.brid = r.id WHERE r.buildsetid = ?1 ORDER BY r.id"
    );
    request_rows(c, &sql, args![bsid])
}

/// Requests neither complete nor claimed, highest priority first, then
/// oldest: of the builders master `of` has (`None`: of every builder).
pub fn unclaimed_requests(
    c: &mut dyn Sql,
    of: Option<i64>,
    limit: usize,
) -> anyhow::Result<Vec<BuildRequest>> {
    let mine = if of.is_some() {
        "JOIN builder_masters bm ON bm.builderid = r.builderid AND bm.masterid = ?2"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {REQUEST_COLUMNS} FROM buildrequests r JOIN builders b ON b.id = r.builderid
         {mine}
         LEFT JOIN buildrequest_claims c ON c.brid = r.id
         WHERE r.complete = 0 AND c.brid IS NULL
         ORDER BY r.priority DESC, r.submitted_at, r.id LIMIT ?1"
    );
    match of {
        Some(m) => request_rows(c, &sql, args![limit, m]),
        None => request_rows(c, &sql, args![limit]),
    }
}

/// Unclaimed requests that may be built together with `brid` (Buildbot's
/// default collapse rule): the same builder, and buildsets whose
/// sourcestamps are on the same branch, repository, project and codebase.
pub fn collapsible(c: &mut dyn Sql, brid: i64) -> anyhow::Result<Vec<i64>> {
    c.column(
        "WITH me AS (
             SELECT r.builderid, s.branch, s.repository, s.project, s.codebase
             FROM buildrequests r
             JOIN buildset_sourcestamps bs ON bs.buildsetid = r.buildsetid
             JOIN sourcestamps s ON s.id = bs.sourcestampid
             WHERE r.id = ?1)
         SELECT r.id FROM buildrequests r
         JOIN buildset_sourcestamps bs ON bs.buildsetid = r.buildsetid
         JOIN sourcestamps s ON s.id = bs.sourcestampid
         JOIN me ON me.builderid = r.builderid
                AND s.branch IS NOT DISTINCT FROM me.branch AND s.repository = me.repository
                AND s.project = me.project AND s.codebase = me.codebase
         LEFT JOIN buildrequest_claims cl ON cl.brid = r.id
         WHERE r.id != ?1 AND r.complete = 0 AND cl.brid IS NULL
           AND (SELECT count(*) FROM buildset_sourcestamps x WHERE x.buildsetid = r.buildsetid) = 1
         ORDER BY r.id",
        args![brid],
    )
}

/// The sourcestamps a buildset builds, in id order.
pub fn buildset_sourcestamps(c: &mut dyn Sql, bsid: i64) -> anyhow::Result<Vec<SourceStamp>> {
    c.query(
        "SELECT s.branch, s.revision, s.repository, s.project, s.codebase
         FROM buildset_sourcestamps bs JOIN sourcestamps s ON s.id = bs.sourcestampid
         WHERE bs.buildsetid = ?1 ORDER BY s.id",
        args![bsid],
    )?
    .iter()
    .map(|r| {
        Ok(SourceStamp {
            branch: r.get(0)?,
            revision: r.get(1)?,
            repository: r.get(2)?,
            project: r.get(3)?,
            codebase: r.get(4)?,
        })
    })
    .collect()
}

/// Unclaimed, incomplete requests of a builder other than `brid`, oldest
/// first: the candidates a `collapseRequests` function is asked about.
pub fn unclaimed_of_builder(c: &mut dyn Sql, brid: i64) -> anyhow::Result<Vec<BuildRequest>> {
    let sql = format!(
        "SELECT {REQUEST_COLUMNS} FROM buildrequests r JOIN builders b ON b.id = r.builderid
         LEFT JOIN buildrequest_claims c ON c.brid = r.id
         WHERE r.builderid = (SELECT builderid FROM buildrequests WHERE id = ?1)
           AND r.id != ?1 AND r.complete = 0 AND c.brid IS NULL
         ORDER BY r.id"
    );
    request_rows(c, &sql, args![brid])
}

/// Holds request `brid` until the transaction ends, so that a claim and a
/// cancel of it happen one after the other. (SQLite has one writer at a
/// time already; PostgreSQL locks the row.)
fn lock_request(c: &mut dyn Sql, brid: i64) -> anyhow::Result<()> {
    if c.dialect() == Dialect::Postgres {
        c.execute(
            "SELECT id FROM buildrequests WHERE id = ?1 FOR UPDATE",
            args![brid],
        )?;
    }
    Ok(())
}

/// Claims `brid` for `masterid`; false if it was claimed or complete already.
pub fn claim_request(c: &mut dyn Sql, brid: i64, masterid: i64) -> anyhow::Result<bool> {
    lock_request(c, brid)?;
    let n = c.execute(
        "INSERT INTO buildrequest_claims (brid, masterid, claimed_at)
         SELECT id, ?2, ?3 FROM buildrequests WHERE id = ?1 AND complete = 0
         ON CONFLICT DO NOTHING",
        args![brid, masterid, now()],
    )?;
    Ok(n == 1)
}

/// Completes requests; when every request of a buildset is complete, the
/// buildset completes with the worst result. Returns the buildsets that
/// completed, with their results.
pub fn complete_requests(
    c: &mut dyn Sql,
    brids: &[i64],
    results: i64,
) -> anyhow::Result<Vec<(i64, i64)>> {
    let t = now();
    let mut done = Vec::new();
    for brid in brids {
        let n = c.execute(
            "UPDATE buildrequests SET complete = 1, results = ?2, complete_at = ?3
             WHERE id = ?1 AND complete = 0",
            args![brid, results, t],
        )?;
        if n == 0 {
            continue;
        }
        let bsid: i64 = c.value(
            "SELECT buildsetid FROM buildrequests WHERE id = ?1",
            args![brid],
        )?;
        let r = c.query_one(
            "SELECT sum(CASE WHEN complete = 0 THEN 1 ELSE 0 END),
                    max(CASE WHEN complete = 1 THEN results END)
             FROM buildrequests WHERE buildsetid = ?1",
            args![bsid],
        )?;
        let (open, worst): (i64, Option<i64>) = (r.get(0)?, r.get(1)?);
        if open == 0 {
            let worst = worst.unwrap_or(results);
            let n = c.execute(
                "UPDATE buildsets SET complete = 1, complete_at = ?2, results = ?3
                 WHERE id = ?1 AND complete = 0",
                args![bsid, t, worst],
            )?;
            if n == 1 {
                done.push((bsid, worst));
            }
        }
    }
    Ok(done)
}

/// What cancelling a build request found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancel {
    Cancelled,
    /// A master claimed it: its build must be stopped instead.
    Claimed,
    Complete,
    Missing,
}

/// A change a scheduler has classified and not yet built.
#[derive(Clone, Debug, PartialEq)]
pub struct Classified {
    pub changeid: i64,
    pub important: bool,
    pub branch: Option<String>,
}

pub fn classified(c: &mut dyn Sql, scheduler: ObjectId) -> anyhow::Result<Vec<Classified>> {
    c.query(
        "SELECT s.changeid, s.important, ch.branch FROM scheduler_changes s
             JOIN changes ch ON ch.changeid = s.changeid
             WHERE s.schedulerid = ?1 ORDER BY s.changeid",
        args![scheduler.0],
    )?
    .iter()
    .map(|r| {
        Ok(Classified {
            changeid: r.get(0)?,
            important: r.get(1)?,
            branch: r.get(2)?,
        })
    })
    .collect()
}

/// One scheduler step, stored atomically: classify changes, forget the
/// classifications a buildset now covers, add buildsets, set state.
#[derive(Clone, Debug, Default)]
pub struct SchedulerWrite {
    pub classify: Vec<(i64, bool)>,
    pub flush: Vec<i64>,
    pub buildsets: Vec<NewBuildset>,
    pub state: Vec<(String, serde_json::Value)>,
    /// In a fleet, the lease the write stands on.
    pub fence: Option<super::masters::Fence>,
}

impl Store {
    pub async fn scheduler_write(
        &self,
        scheduler: ObjectId,
        w: SchedulerWrite,
    ) -> anyhow::Result<Vec<BuildsetIds>> {
        let ids = self.call(move |c| {
            if let Some(f) = &w.fence {
                f.check(c)?;
            }
            for (changeid, important) in &w.classify {
                c.execute(
                    "INSERT INTO scheduler_changes (schedulerid, changeid, important) VALUES (?1, ?2, ?3)
                     ON CONFLICT (schedulerid, changeid) DO UPDATE SET important = excluded.important",
                    args![scheduler.0, changeid, *important],
                )?;
            }
            for changeid in &w.flush {
                c.execute(
                    "DELETE FROM scheduler_changes WHERE schedulerid = ?1 AND changeid = ?2",
                    args![scheduler.0, changeid],
                )?;
            }
            let ids = w
                .buildsets
                .iter()
                .map(|bs| insert_buildset(c, bs))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for (name, value) in &w.state {
                set_state(c, scheduler, name, value)?;
            }
            Ok(ids)
        })
        .await?;
        for bs in &ids {
            self.buildset_added(bs);
        }
        Ok(ids)
    }

    pub(super) fn buildset_added(&self, ids: &BuildsetIds) {
        let ev = self.events();
        ev.emit(
            "buildsets",
            ids.bsid,
            "new",
            || serde_json::json!({ "bsid": ids.bsid, "complete": false }),
        );
        for r in &ids.brids {
            ev.emit("buildrequests", r.brid, "new", || {
                serde_json::json!({ "buildrequestid": r.brid, "buildsetid": ids.bsid,
                                    "builderid": r.builderid, "claimed": false, "complete": false })
            });
        }
    }

    pub async fn classified(&self, scheduler: ObjectId) -> anyhow::Result<Vec<Classified>> {
        self.call(move |c| classified(c, scheduler)).await
    }

    pub async fn add_buildset(&self, bs: NewBuildset) -> anyhow::Result<BuildsetIds> {
        let ids = self.call(move |c| insert_buildset(c, &bs)).await?;
        self.buildset_added(&ids);
        Ok(ids)
    }

    pub async fn get_buildset(&self, bsid: i64) -> anyhow::Result<Option<Buildset>> {
        self.call(move |c| get_buildset(c, bsid)).await
    }

    pub async fn requests_of_buildset(&self, bsid: i64) -> anyhow::Result<Vec<BuildRequest>> {
        self.call(move |c| requests_of_buildset(c, bsid)).await
    }

    pub async fn request(&self, brid: i64) -> anyhow::Result<Option<BuildRequest>> {
        self.call(move |c| {
            let sql = format!(
                "SELECT {REQUEST_COLUMNS} FROM buildrequests r JOIN builders b ON b.id = r.builderid
                 LEFT JOIN buildrequest_claims c ON c.brid = r.id WHERE r.id = ?1"
            );
            Ok(request_rows(c, &sql, args![brid])?.into_iter().next())
        })
        .await
    }

    /// Unclaimed requests of every builder.
    pub async fn unclaimed_requests(&self, limit: usize) -> anyhow::Result<Vec<BuildRequest>> {
        self.call(move |c| unclaimed_requests(c, None, limit)).await
    }

    /// Unclaimed requests of the builders master `masterid` has (those it
    /// registered last).
    pub async fn unclaimed_requests_of(
        &self,
        masterid: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<BuildRequest>> {
        self.call(move |c| unclaimed_requests(c, Some(masterid), limit))
            .await
    }

    pub async fn buildset_sourcestamps(&self, bsid: i64) -> anyhow::Result<Vec<SourceStamp>> {
        self.call(move |c| buildset_sourcestamps(c, bsid)).await
    }

    pub async fn unclaimed_of_builder(&self, brid: i64) -> anyhow::Result<Vec<BuildRequest>> {
        self.call(move |c| unclaimed_of_builder(c, brid)).await
    }

    pub async fn claim_request(&self, brid: i64, masterid: i64) -> anyhow::Result<bool> {
        self.call(move |c| claim_request(c, brid, masterid)).await
    }

    /// Claims `brid` and, in the same transaction, every request that
    /// collapses into it (when `collapse`). Returns the claimed ids, `brid`
    /// first; empty if `brid` itself could not be claimed.
    ///
    /// `locks` are MasterLocks counted across every master of the database
    /// (several masters): they are taken in the same transaction, for
    /// `brid`, and when one is not free nothing is claimed.
    pub async fn claim_with_collapsed(
        &self,
        brid: i64,
        masterid: i64,
        collapse: Collapse,
        locks: Vec<super::locks::SharedLock>,
    ) -> anyhow::Result<Vec<i64>> {
        let ids = self
            .call(move |c| {
                if !super::locks::free(c, &locks)? {
                    return Ok(vec![]);
                }
                if !claim_request(c, brid, masterid)? {
                    return Ok(vec![]);
                }
                super::locks::take(c, &locks, brid, masterid)?;
                let mut ids = vec![brid];
                let others = match collapse.clone() {
                    Collapse::None => vec![],
                    Collapse::Default => collapsible(c, brid)?,
                    Collapse::These(v) => v,
                };
                for other in others {
                    // Another master may have claimed it meanwhile: then it is
                    // not ours to complete.
                    if claim_request(c, other, masterid)? {
                        ids.push(other);
                    }
                }
                Ok(ids)
            })
            .await?;
        for brid in &ids {
            self.events().emit("buildrequests", *brid, "claimed", || {
                serde_json::json!({ "buildrequestid": brid, "claimed": true, "claimed_by_masterid": masterid })
            });
        }
        Ok(ids)
    }

    /// Completes requests (cancel: `results` = CANCELLED); returns the
    /// buildsets that completed with them.
    pub async fn complete_requests(
        &self,
        brids: Vec<i64>,
        results: i64,
    ) -> anyhow::Result<Vec<(i64, i64)>> {
        let brids_done = brids.clone();
        let done = self
            .call(move |c| complete_requests(c, &brids, results))
            .await?;
        self.requests_completed(&brids_done, results, &done);
        Ok(done)
    }

    /// Records the configured builders (name, description, tags) of
    /// master `masterid`, so that the API lists every one of them from the
    /// start, as Buildbot's does, and the master reads the queue of these
    /// builders only.
    pub async fn register_builders(
        &self,
        masterid: i64,
        builders: Vec<(String, Option<String>, Vec<String>)>,
    ) -> anyhow::Result<()> {
        self.call(move |c| {
            c.execute(
                "DELETE FROM builder_masters WHERE masterid = ?1",
                args![masterid],
            )?;
            for (name, description, tags) in &builders {
                let id = builder_id(c, name)?;
                c.execute(
                    "UPDATE builders SET description = ?2, tags_json = ?3 WHERE id = ?1",
                    args![id, description, serde_json::to_string(tags)?],
                )?;
                c.execute(
                    "INSERT INTO builder_masters (builderid, masterid) VALUES (?1, ?2)
                     ON CONFLICT DO NOTHING",
                    args![id, masterid],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Cancels a request that no master has claimed (with the request
    /// locked, so that no claim can slip in between).
    pub async fn cancel_request(&self, brid: i64) -> anyhow::Result<Cancel> {
        let (verdict, done) = self
            .call(move |c| {
                lock_request(c, brid)?;
                let row = c.query_opt(
                    "SELECT r.complete, c.brid IS NOT NULL FROM buildrequests r
                     LEFT JOIN buildrequest_claims c ON c.brid = r.id WHERE r.id = ?1",
                    args![brid],
                )?;
                let row: Option<(bool, bool)> = match row {
                    Some(r) => Some((r.get(0)?, r.get(1)?)),
                    None => None,
                };
                let verdict = match row {
                    None => Cancel::Missing,
                    Some((true, _)) => Cancel::Complete,
                    Some((false, true)) => Cancel::Claimed,
                    Some((false, false)) => Cancel::Cancelled,
                };
                let done = if verdict == Cancel::Cancelled {
                    complete_requests(c, &[brid], CANCELLED)?
                } else {
                    vec![]
                };
                Ok((verdict, done))
            })
            .await?;
        if verdict == Cancel::Cancelled {
            self.requests_completed(&[brid], CANCELLED, &done);
        }
        Ok(verdict)
    }

    pub(super) fn requests_completed(&self, brids: &[i64], results: i64, buildsets: &[(i64, i64)]) {
        let ev = self.events();
        for brid in brids {
            ev.emit("buildrequests", *brid, "complete", || {
                serde_json::json!({ "buildrequestid": brid, "complete": true, "results": results })
            });
        }
        for (bsid, worst) in buildsets {
            ev.emit(
                "buildsets",
                *bsid,
                "complete",
                || serde_json::json!({ "bsid": bsid, "complete": true, "results": worst }),
            );
        }
    }

    /// Every buildset, oldest first (for tests and small masters; the API
    /// pages).
    pub async fn buildsets(&self, limit: usize) -> anyhow::Result<Vec<Buildset>> {
        self.call(move |c| {
            let ids: Vec<i64> = c.column(
                "SELECT id FROM buildsets ORDER BY id LIMIT ?1",
                args![limit],
            )?;
            ids.into_iter()
                .filter_map(|id| get_buildset(c, id).transpose())
                .collect()
        })
        .await
    }

    /// The newest change id (0 when there is none).
    pub async fn max_changeid(&self) -> anyhow::Result<i64> {
        self.call(|c| c.value("SELECT coalesce(max(changeid), 0) FROM changes", args![]))
            .await
    }

    /// How many build requests exist (for benchmarks and tests).
    pub async fn count_requests(&self) -> anyhow::Result<i64> {
        self.call(|c| c.value("SELECT count(*) FROM buildrequests", args![]))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewChange;

    fn buildset(builders: &[&str]) -> NewBuildset {
        NewBuildset {
            scheduler: "force".into(),
            reason: "test".into(),
            external_idstring: None,
            source: Source::New(vec![SourceStamp {
                branch: Some("m-c".into()),
                revision: Some("abc".into()),
                ..SourceStamp::default()
            }]),
            properties: [("p".to_string(), (serde_json::json!(1), "Force".to_string()))].into(),
            builders: builders.iter().map(|b| b.to_string()).collect(),
            priority: 5,
            parent_buildid: None,
        }
    }

    /// Master `m`, and a buildset for linux and win32 whose two requests
    /// it has claimed.
    async fn two_claimed(store: &Store) -> (i64, BuildsetIds) {
        let master = store.master_started("m").await.unwrap();
        let ids = store
            .add_buildset(buildset(&["linux", "win32"]))
            .await
            .unwrap();
        for r in &ids.brids {
            assert!(store.claim_request(r.brid, master).await.unwrap());
        }
        (master, ids)
    }

    /// A build of the claimed request `r`; its id.
    async fn start(store: &Store, r: &RequestId, master: i64) -> i64 {
        store
            .new_build(r.builderid, r.brid, None, master, Properties::new())
            .await
            .unwrap()
            .0
    }

    /// A finished build settles its requests in the same call: complete
    /// with its result, or given back (RETRY) to be claimed again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finished_build_completes_or_gives_back_its_requests_at_once() {
        use crate::store::builds::Claimed;
        for (store, _db) in crate::store::testing::each_backend().await {
            let (master, ids) = two_claimed(&store).await;
            let (a, b) = (&ids.brids[0], &ids.brids[1]);
            let build_a = start(&store, a, master).await;
            let build_b = start(&store, b, master).await;

            // b ends RETRY: its request is unclaimed, not complete.
            let done = store
                .finish_build(build_b, 5, "retry", Claimed::GiveBack(vec![b.brid]))
                .await
                .unwrap();
            assert_eq!(done, []);
            let waiting = store.unclaimed_requests(10).await.unwrap();
            assert_eq!(
                waiting.iter().map(|r| r.buildrequestid).collect::<Vec<_>>(),
                [b.brid]
            );

            // a ends SUCCESS: its request is complete; the buildset waits for b.
            let done = store
                .finish_build(build_a, 0, "success", Claimed::Complete(vec![a.brid]))
                .await
                .unwrap();
            assert_eq!(done, []);
            let reqs = store.requests_of_buildset(ids.bsid).await.unwrap();
            assert!(reqs[0].complete && reqs[0].results == Some(0));
            assert!(!reqs[1].complete);

            // b's second build completes the buildset.
            assert!(store.claim_request(b.brid, master).await.unwrap());
            let again = start(&store, b, master).await;
            let done = store
                .finish_build(again, 2, "failure", Claimed::Complete(vec![b.brid]))
                .await
                .unwrap();
            assert_eq!(done, [(ids.bsid, 2)]);
        }
    }

    /// A master killed between claiming a request and starting its build
    /// leaves a claim and no build: its next start gives it back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_master_gives_back_the_claims_it_left_without_a_build() {
        for (store, _db) in crate::store::testing::each_backend().await {
            let (master, ids) = two_claimed(&store).await;
            let (a, b) = (&ids.brids[0], &ids.brids[1]);
            start(&store, a, master).await;
            assert!(store.unclaimed_requests(10).await.unwrap().is_empty());

            // The master starts again: a's build ends RETRY, and both
            // requests wait again.
            let again = store.master_started("m").await.unwrap();
            assert_eq!(again, master);
            assert_eq!(
                store.retry_unfinished_builds(master).await.unwrap().len(),
                1
            );
            let waiting = store.unclaimed_requests(10).await.unwrap();
            assert_eq!(
                waiting.iter().map(|r| r.buildrequestid).collect::<Vec<_>>(),
                [a.brid, b.brid]
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_is_unclaimed_then_claimed_once_then_complete() {
        for (store, _db) in crate::store::testing::each_backend().await {
            let master = store.master_started("host:/m").await.unwrap();
            let ids = store
                .add_buildset(buildset(&["linux", "win32"]))
                .await
                .unwrap();
            assert_eq!(ids.brids.len(), 2);
            let pending = store.unclaimed_requests(10).await.unwrap();
            assert_eq!(pending.len(), 2);
            assert!(pending
                .iter()
                .all(|r| r.priority == 5 && !r.claimed && !r.complete));

            let (a, b) = (ids.brids[0].brid, ids.brids[1].brid);
            assert!(store.claim_request(a, master).await.unwrap());
            assert!(
                !store.claim_request(a, master).await.unwrap(),
                "claimed once"
            );
            let pending = store.unclaimed_requests(10).await.unwrap();
            assert_eq!(
                pending.iter().map(|r| r.buildrequestid).collect::<Vec<_>>(),
                [b]
            );

            // One finishes with WARNINGS: the buildset is not complete yet.
            assert_eq!(store.complete_requests(vec![a], 1).await.unwrap(), []);
            // The other is cancelled: the buildset completes with the worst result.
            assert_eq!(
                store.complete_requests(vec![b], CANCELLED).await.unwrap(),
                [(ids.bsid, CANCELLED)]
            );
            assert!(
                !store.claim_request(b, master).await.unwrap(),
                "a complete request cannot be claimed"
            );
            let reqs = store.requests_of_buildset(ids.bsid).await.unwrap();
            assert_eq!(reqs[0].results, Some(1));
            assert!(reqs[0].claimed && reqs[0].claimed_by_masterid == Some(master));
            assert_eq!(reqs[1].results, Some(CANCELLED));
            let bs = store.get_buildset(ids.bsid).await.unwrap().unwrap();
            assert!(bs.complete);
            assert_eq!(bs.results, Some(CANCELLED));
            assert_eq!(bs.properties["p"].0, 1);
            // Completing again changes nothing.
            assert_eq!(store.complete_requests(vec![a, b], 0).await.unwrap(), []);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_master_reads_the_queue_of_its_own_builders() {
        for (store, _db) in crate::store::testing::each_backend().await {
            let m1 = store.master_started("m1").await.unwrap();
            let m2 = store.master_started("m2").await.unwrap();
            let rows = |names: &[&str]| -> Vec<(String, Option<String>, Vec<String>)> {
                names
                    .iter()
                    .map(|n| (n.to_string(), None, vec![]))
                    .collect()
            };
            store.register_builders(m1, rows(&["linux"])).await.unwrap();
            store
                .register_builders(m2, rows(&["linux", "win32"]))
                .await
                .unwrap();
            store
                .add_buildset(buildset(&["linux", "win32"]))
                .await
                .unwrap();
            let names = |v: Vec<BuildRequest>| -> Vec<String> {
                v.into_iter().map(|r| r.buildername).collect()
            };
            assert_eq!(
                names(store.unclaimed_requests_of(m1, 10).await.unwrap()),
                ["linux"]
            );
            assert_eq!(
                names(store.unclaimed_requests_of(m2, 10).await.unwrap()),
                ["linux", "win32"]
            );
            // A reload that drops a builder drops it from the master's queue.
            store.register_builders(m2, rows(&["win32"])).await.unwrap();
            assert_eq!(
                names(store.unclaimed_requests_of(m2, 10).await.unwrap()),
                ["win32"]
            );
            assert_eq!(store.unclaimed_requests(10).await.unwrap().len(), 2);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_buildset_for_changes_links_them_and_uses_the_newest_sourcestamp() {
        for (store, _db) in crate::store::testing::each_backend().await {
            let change = |rev: &str| NewChange {
                author: "a".into(),
                revision: Some(rev.into()),
                ..NewChange::default()
            };
            let stored = store
                .add_changes("t", vec![change("one"), change("two")], vec![])
                .await
                .unwrap();
            let mut bs = buildset(&["linux"]);
            bs.source = Source::Changes(stored.iter().map(|c| c.changeid).collect());
            let ids = store.add_buildset(bs).await.unwrap();
            let got = store.get_buildset(ids.bsid).await.unwrap().unwrap();
            assert_eq!(got.changeids, [stored[0].changeid, stored[1].changeid]);
            assert_eq!(got.sourcestamps, [stored[1].sourcestampid]);
        }
    }
}
