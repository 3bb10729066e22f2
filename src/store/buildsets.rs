//! Buildsets, their sourcestamps, properties and changes, and build
//! requests with their lifecycle (unclaimed → claimed → complete, or
//! cancelled: complete with results CANCELLED, as Buildbot records it).
//! Over 800 lines on purpose: one table family's reads and writes (and the
//! tests of the lifecycle), which change together.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;

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
pub fn builder_id(c: &Connection, name: &str) -> anyhow::Result<i64> {
    c.prepare_cached("INSERT OR IGNORE INTO builders (name) VALUES (?1)")?
        .execute(params![name])?;
    Ok(c.prepare_cached("SELECT id FROM builders WHERE name = ?1")?
        .query_row(params![name], |r| r.get(0))?)
}

fn insert_sourcestamp(tx: &Transaction<'_>, ss: &SourceStamp) -> anyhow::Result<i64> {
    tx.prepare_cached(
        "INSERT INTO sourcestamps (branch, revision, repository, project, codebase, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        ss.branch,
        ss.revision,
        ss.repository,
        ss.project,
        ss.codebase,
        now()
    ])?;
    Ok(tx.last_insert_rowid())
}

/// Stores a buildset and its requests in `tx`.
pub fn insert_buildset(tx: &Transaction<'_>, bs: &NewBuildset) -> anyhow::Result<BuildsetIds> {
    let submitted = now();
    tx.prepare_cached(
        "INSERT INTO buildsets (external_idstring, reason, scheduler, submitted_at, parent_buildid)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        bs.external_idstring,
        bs.reason,
        bs.scheduler,
        submitted,
        bs.parent_buildid
    ])?;
    let bsid = tx.last_insert_rowid();
    let sourcestamps: Vec<i64> = match &bs.source {
        Source::Changes(ids) => {
            let mut ss = Vec::new();
            let newest = ids.iter().max();
            for id in ids {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO buildset_changes (buildsetid, changeid) VALUES (?1, ?2)",
                )?
                .execute(params![bsid, id])?;
            }
            if let Some(id) = newest {
                ss.push(
                    tx.prepare_cached("SELECT sourcestampid FROM changes WHERE changeid = ?1")?
                        .query_row(params![id], |r| r.get(0))?,
                );
            }
            ss
        }
        Source::SourceStamps(ids) => ids.clone(),
        Source::New(list) => list
            .iter()
            .map(|s| insert_sourcestamp(tx, s))
            .collect::<anyhow::Result<_>>()?,
    };
    for ss in &sourcestamps {
        tx.prepare_cached(
            "INSERT OR IGNORE INTO buildset_sourcestamps (buildsetid, sourcestampid) VALUES (?1, ?2)",
        )?
        .execute(params![bsid, ss])?;
    }
    for (name, (value, source)) in &bs.properties {
        tx.prepare_cached(
            "INSERT INTO buildset_properties (buildsetid, property_name, property_value) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![
            bsid,
            name,
            serde_json::json!([value, source]).to_string()
        ])?;
    }
    let mut brids = Vec::with_capacity(bs.builders.len());
    for name in &bs.builders {
        let builderid = builder_id(tx, name)?;
        tx.prepare_cached(
            "INSERT INTO buildrequests (buildsetid, builderid, priority, submitted_at) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![bsid, builderid, bs.priority, submitted])?;
        brids.push(RequestId {
            builder: name.clone(),
            builderid,
            brid: tx.last_insert_rowid(),
        });
    }
    Ok(BuildsetIds { bsid, brids })
}

pub fn get_buildset(c: &Connection, bsid: i64) -> anyhow::Result<Option<Buildset>> {
    let row = c
        .prepare_cached(
            "SELECT scheduler, reason, external_idstring, submitted_at, complete, complete_at, results, parent_buildid
             FROM buildsets WHERE id = ?1",
        )?
        .query_row(params![bsid], |r| {
            Ok(Buildset {
                bsid,
                scheduler: r.get(0)?,
                reason: r.get(1)?,
                external_idstring: r.get(2)?,
                submitted_at: r.get(3)?,
                complete: r.get::<_, i64>(4)? != 0,
                complete_at: r.get(5)?,
                results: r.get(6)?,
                sourcestamps: vec![],
                changeids: vec![],
                properties: Properties::new(),
                parent_buildid: r.get(7)?,
            })
        })
        .optional()?;
    let Some(mut bs) = row else { return Ok(None) };
    bs.sourcestamps = c
        .prepare_cached(
            "SELECT sourcestampid FROM buildset_sourcestamps WHERE buildsetid = ?1 ORDER BY sourcestampid",
        )?
        .query_map(params![bsid], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    bs.changeids = c
        .prepare_cached(
            "SELECT changeid FROM buildset_changes WHERE buildsetid = ?1 ORDER BY changeid",
        )?
        .query_map(params![bsid], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let props: Vec<(String, String)> = c
        .prepare_cached(
            "SELECT property_name, property_value FROM buildset_properties WHERE buildsetid = ?1",
        )?
        .query_map(params![bsid], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (name, text) in props {
        let (v, s): (serde_json::Value, String) = serde_json::from_str(&text)?;
        bs.properties.insert(name, (v, s));
    }
    Ok(Some(bs))
}

const REQUEST_COLUMNS: &str =
    "r.id, r.buildsetid, r.builderid, b.name, r.priority, c.masterid, c.claimed_at,
     r.complete, r.results, r.submitted_at, r.complete_at, r.waited_for";

fn request_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BuildRequest> {
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
        complete: r.get::<_, i64>(7)? != 0,
        results: r.get(8)?,
        submitted_at: r.get(9)?,
        complete_at: r.get(10)?,
        waited_for: r.get::<_, i64>(11)? != 0,
    })
}

pub fn requests_of_buildset(c: &Connection, bsid: i64) -> anyhow::Result<Vec<BuildRequest>> {
    let sql = format!(
        "SELECT {REQUEST_COLUMNS} FROM buildrequests r JOIN builders b ON b.id = r.builderid
         LEFT JOIN buildrequest_claims c ON c.brid = r.id WHERE r.buildsetid = ?1 ORDER BY r.id"
    );
    Ok(c.prepare_cached(&sql)?
        .query_map(params![bsid], request_row)?
        .collect::<Result<_, _>>()?)
}

/// Requests neither complete nor claimed, highest priority first, then oldest.
pub fn unclaimed_requests(c: &Connection, limit: usize) -> anyhow::Result<Vec<BuildRequest>> {
    let sql = format!(
        "SELECT {REQUEST_COLUMNS} FROM buildrequests r JOIN builders b ON b.id = r.builderid
         LEFT JOIN buildrequest_claims c ON c.brid = r.id
         WHERE r.complete = 0 AND c.brid IS NULL
         ORDER BY r.priority DESC, r.submitted_at, r.id LIMIT ?1"
    );
    Ok(c.prepare_cached(&sql)?
        .query_map(params![limit as i64], request_row)?
        .collect::<Result<_, _>>()?)
}

/// Unclaimed requests that may be built together with `brid` (Buildbot's
/// default collapse rule): the same builder, and buildsets whose
/// sourcestamps are on the same branch, repository, project and codebase.
pub fn collapsible(c: &Connection, brid: i64) -> anyhow::Result<Vec<i64>> {
    Ok(c
        .prepare_cached(
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
                    AND s.branch IS me.branch AND s.repository = me.repository
                    AND s.project = me.project AND s.codebase = me.codebase
             LEFT JOIN buildrequest_claims cl ON cl.brid = r.id
             WHERE r.id != ?1 AND r.complete = 0 AND cl.brid IS NULL
               AND (SELECT count(*) FROM buildset_sourcestamps x WHERE x.buildsetid = r.buildsetid) = 1
             ORDER BY r.id",
        )?
        .query_map(params![brid], |r| r.get(0))?
        .collect::<Result<_, _>>()?)
}

/// The sourcestamps a buildset builds, in id order.
pub fn buildset_sourcestamps(c: &Connection, bsid: i64) -> anyhow::Result<Vec<SourceStamp>> {
    Ok(c.prepare_cached(
        "SELECT s.branch, s.revision, s.repository, s.project, s.codebase
         FROM buildset_sourcestamps bs JOIN sourcestamps s ON s.id = bs.sourcestampid
         WHERE bs.buildsetid = ?1 ORDER BY s.id",
    )?
    .query_map(params![bsid], |r| {
        Ok(SourceStamp {
            branch: r.get(0)?,
            revision: r.get(1)?,
            repository: r.get(2)?,
            project: r.get(3)?,
            codebase: r.get(4)?,
        })
    })?
    .collect::<Result<_, _>>()?)
}

/// Unclaimed, incomplete requests of a builder other than `brid`, oldest
/// first: the candidates a `collapseRequests` function is asked about.
pub fn unclaimed_of_builder(c: &Connection, brid: i64) -> anyhow::Result<Vec<BuildRequest>> {
    let sql = format!(
        "SELECT {REQUEST_COLUMNS} FROM buildrequests r JOIN builders b ON b.id = r.builderid
         LEFT JOIN buildrequest_claims c ON c.brid = r.id
         WHERE r.builderid = (SELECT builderid FROM buildrequests WHERE id = ?1)
           AND r.id != ?1 AND r.complete = 0 AND c.brid IS NULL
         ORDER BY r.id"
    );
    Ok(c.prepare_cached(&sql)?
        .query_map(params![brid], request_row)?
        .collect::<Result<_, _>>()?)
}

/// Claims `brid` for `masterid`; false if it was claimed or complete already.
pub fn claim_request(c: &Connection, brid: i64, masterid: i64) -> anyhow::Result<bool> {
    let n = c
        .prepare_cached(
            "INSERT OR IGNORE INTO buildrequest_claims (brid, masterid, claimed_at)
             SELECT id, ?2, ?3 FROM buildrequests WHERE id = ?1 AND complete = 0",
        )?
        .execute(params![brid, masterid, now()])?;
    Ok(n == 1)
}

/// Completes requests; when every request of a buildset is complete, the
/// buildset completes with the worst result. Returns the buildsets that
/// completed, with their results.
pub fn complete_requests(
    tx: &Transaction<'_>,
    brids: &[i64],
    results: i64,
) -> anyhow::Result<Vec<(i64, i64)>> {
    let t = now();
    let mut done = Vec::new();
    for brid in brids {
        let n = tx
            .prepare_cached(
                "UPDATE buildrequests SET complete = 1, results = ?2, complete_at = ?3
                 WHERE id = ?1 AND complete = 0",
            )?
            .execute(params![brid, results, t])?;
        if n == 0 {
            continue;
        }
        let bsid: i64 = tx
            .prepare_cached("SELECT buildsetid FROM buildrequests WHERE id = ?1")?
            .query_row(params![brid], |r| r.get(0))?;
        let (open, worst): (i64, Option<i64>) = tx
            .prepare_cached(
                "SELECT sum(complete = 0), max(CASE WHEN complete = 1 THEN results END)
                 FROM buildrequests WHERE buildsetid = ?1",
            )?
            .query_row(params![bsid], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if open == 0 {
            let worst = worst.unwrap_or(results);
            let n = tx
                .prepare_cached(
                    "UPDATE buildsets SET complete = 1, complete_at = ?2, results = ?3
                     WHERE id = ?1 AND complete = 0",
                )?
                .execute(params![bsid, t, worst])?;
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

pub fn classified(c: &Connection, scheduler: ObjectId) -> anyhow::Result<Vec<Classified>> {
    Ok(c.prepare_cached(
        "SELECT s.changeid, s.important, ch.branch FROM scheduler_changes s
             JOIN changes ch ON ch.changeid = s.changeid
             WHERE s.schedulerid = ?1 ORDER BY s.changeid",
    )?
    .query_map(params![scheduler.0], |r| {
        Ok(Classified {
            changeid: r.get(0)?,
            important: r.get::<_, i64>(1)? != 0,
            branch: r.get(2)?,
        })
    })?
    .collect::<Result<_, _>>()?)
}

/// One scheduler step, stored atomically: classify changes, forget the
/// classifications a buildset now covers, add buildsets, set state.
#[derive(Clone, Debug, Default)]
pub struct SchedulerWrite {
    pub classify: Vec<(i64, bool)>,
    pub flush: Vec<i64>,
    pub buildsets: Vec<NewBuildset>,
    pub state: Vec<(String, serde_json::Value)>,
}

impl Store {
    pub async fn scheduler_write(
        &self,
        scheduler: ObjectId,
        w: SchedulerWrite,
    ) -> anyhow::Result<Vec<BuildsetIds>> {
        let ids = self.call(move |c| {
            let tx = c.transaction()?;
            for (changeid, important) in &w.classify {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO scheduler_changes (schedulerid, changeid, important) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![scheduler.0, changeid, *important as i64])?;
            }
            for changeid in &w.flush {
                tx.prepare_cached(
                    "DELETE FROM scheduler_changes WHERE schedulerid = ?1 AND changeid = ?2",
                )?
                .execute(params![scheduler.0, changeid])?;
            }
            let ids = w
                .buildsets
                .iter()
                .map(|bs| insert_buildset(&tx, bs))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for (name, value) in &w.state {
                set_state(&tx, scheduler, name, value)?;
            }
            tx.commit()?;
            Ok(ids)
        })
        .await?;
        for bs in &ids {
            self.buildset_added(bs);
        }
        Ok(ids)
    }

    fn buildset_added(&self, ids: &BuildsetIds) {
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
        let ids = self
            .call(move |c| {
                let tx = c.transaction()?;
                let ids = insert_buildset(&tx, &bs)?;
                tx.commit()?;
                Ok(ids)
            })
            .await?;
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
            Ok(c.prepare_cached(&sql)?
                .query_row(params![brid], request_row)
                .optional()?)
        })
        .await
    }

    pub async fn unclaimed_requests(&self, limit: usize) -> anyhow::Result<Vec<BuildRequest>> {
        self.call(move |c| unclaimed_requests(c, limit)).await
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
    pub async fn claim_with_collapsed(
        &self,
        brid: i64,
        masterid: i64,
        collapse: Collapse,
    ) -> anyhow::Result<Vec<i64>> {
        let ids = self
            .call(move |c| {
                let tx = c.transaction()?;
                if !claim_request(&tx, brid, masterid)? {
                    return Ok(vec![]);
                }
                let mut ids = vec![brid];
                let others = match collapse {
                    Collapse::None => vec![],
                    Collapse::Default => collapsible(&tx, brid)?,
                    Collapse::These(v) => v,
                };
                for other in others {
                    // Another master may have claimed it meanwhile: then it is
                    // not ours to complete.
                    if claim_request(&tx, other, masterid)? {
                        ids.push(other);
                    }
                }
                tx.commit()?;
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
            .call(move |c| {
                let tx = c.transaction()?;
                let done = complete_requests(&tx, &brids, results)?;
                tx.commit()?;
                Ok(done)
            })
            .await?;
        self.requests_completed(&brids_done, results, &done);
        Ok(done)
    }

    /// Records the configured builders (name, description, tags), so that
    /// the API lists every one of them from the start, as Buildbot's does.
    pub async fn register_builders(
        &self,
        builders: Vec<(String, Option<String>, Vec<String>)>,
    ) -> anyhow::Result<()> {
        self.call(move |c| {
            let tx = c.transaction()?;
            for (name, description, tags) in &builders {
                builder_id(&tx, name)?;
                tx.prepare_cached(
                    "UPDATE builders SET description = ?2, tags_json = ?3 WHERE name = ?1",
                )?
                .execute(params![
                    name,
                    description,
                    serde_json::to_string(tags)?
                ])?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Cancels a request that no master has claimed (in one immediate
    /// transaction, so that no claim can slip in between).
    pub async fn cancel_request(&self, brid: i64) -> anyhow::Result<Cancel> {
        let (verdict, done) = self
            .call(move |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let row: Option<(bool, bool)> = tx
                    .query_row(
                        "SELECT r.complete, c.brid IS NOT NULL FROM buildrequests r
                         LEFT JOIN buildrequest_claims c ON c.brid = r.id WHERE r.id = ?1",
                        params![brid],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let verdict = match row {
                    None => Cancel::Missing,
                    Some((true, _)) => Cancel::Complete,
                    Some((false, true)) => Cancel::Claimed,
                    Some((false, false)) => Cancel::Cancelled,
                };
                let done = if verdict == Cancel::Cancelled {
                    complete_requests(&tx, &[brid], CANCELLED)?
                } else {
                    vec![]
                };
                tx.commit()?;
                Ok((verdict, done))
            })
            .await?;
        if verdict == Cancel::Cancelled {
            self.requests_completed(&[brid], CANCELLED, &done);
        }
        Ok(verdict)
    }

    fn requests_completed(&self, brids: &[i64], results: i64, buildsets: &[(i64, i64)]) {
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
            let ids: Vec<i64> = c
                .prepare_cached("SELECT id FROM buildsets ORDER BY id LIMIT ?1")?
                .query_map(params![limit as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            ids.into_iter()
                .filter_map(|id| get_buildset(c, id).transpose())
                .collect()
        })
        .await
    }

    /// The newest change id (0 when there is none).
    pub async fn max_changeid(&self) -> anyhow::Result<i64> {
        self.call(|c| {
            Ok(
                c.query_row("SELECT coalesce(max(changeid), 0) FROM changes", [], |r| {
                    r.get(0)
                })?,
            )
        })
        .await
    }

    /// How many build requests exist (for benchmarks and tests).
    pub async fn count_requests(&self) -> anyhow::Result<i64> {
        self.call(|c| Ok(c.query_row("SELECT count(*) FROM buildrequests", [], |r| r.get(0))?))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewChange, Store, DB_FILE};

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

    #[tokio::test]
    async fn a_request_is_unclaimed_then_claimed_once_then_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join(DB_FILE)).unwrap();
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

    #[tokio::test]
    async fn a_buildset_for_changes_links_them_and_uses_the_newest_sourcestamp() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join(DB_FILE)).unwrap();
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
