//! The push grid: pushes as rows (newest first), each with its changes and,
//! per builder, the state of its request and build, read in a few indexed
//! queries for a page of buildsets.
//!
//! A push is the buildsets made for the same branch and revision (the
//! seed's schedulers each make one buildset per product for one push);
//! a buildset with no revision (a forced build of the tip) is a row of
//! its own.

use std::collections::BTreeMap;

use serde::Serialize;

use super::db::{args, Sql};
use super::Store;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GridChange {
    pub changeid: i64,
    pub author: String,
    pub revision: Option<String>,
    pub revlink: Option<String>,
    pub comments: String,
    pub when_timestamp: i64,
}

/// One builder's cell of a push: its newest request and that request's
/// newest build (none yet while it waits).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GridCell {
    pub builderid: i64,
    pub buildrequestid: i64,
    pub buildid: Option<i64>,
    pub number: Option<i64>,
    /// `pending`, `running` or `done`.
    pub state: &'static str,
    pub results: Option<i64>,
}

/// One job of a push, as TBPL and Treeherder show them: every build of
/// every request (a retried build and its retry are two jobs), and a
/// request that waits for its first or next build, or ended without one
/// (cancelled).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GridJob {
    pub builderid: i64,
    pub buildrequestid: i64,
    pub buildid: Option<i64>,
    pub number: Option<i64>,
    /// `pending`, `running` or `done`.
    pub state: &'static str,
    pub results: Option<i64>,
    pub workerid: Option<i64>,
    pub started_at: Option<i64>,
    pub complete_at: Option<i64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GridPush {
    pub branch: Option<String>,
    pub revision: Option<String>,
    pub repository: String,
    pub submitted_at: i64,
    pub reason: String,
    pub buildsets: Vec<i64>,
    pub changes: Vec<GridChange>,
    pub cells: Vec<GridCell>,
    pub jobs: Vec<GridJob>,
}

/// Which pushes [`Store::grid`] reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GridQuery {
    /// At most this many buildsets make the page.
    pub buildsets: usize,
    /// Only buildsets older than this one.
    pub before: Option<i64>,
    /// Only pushes to this branch (`Some(None)`: those without a branch).
    pub branch: Option<Option<String>>,
}

/// A branch that has pushes, with its newest buildset.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PushBranch {
    pub branch: Option<String>,
    pub newest_buildset: i64,
}

/// A build request's row with its builds, as the grid reads them.
struct RequestBuilds {
    brid: i64,
    builderid: i64,
    complete: bool,
    results: Option<i64>,
    builds: Vec<BuildRow>,
}

struct BuildRow {
    id: i64,
    number: i64,
    results: Option<i64>,
    workerid: Option<i64>,
    started_at: Option<i64>,
    complete_at: Option<i64>,
}

impl RequestBuilds {
    fn job(&self, b: Option<&BuildRow>, state: &'static str, results: Option<i64>) -> GridJob {
        GridJob {
            builderid: self.builderid,
            buildrequestid: self.brid,
            buildid: b.map(|b| b.id),
            number: b.map(|b| b.number),
            state,
            results,
            workerid: b.and_then(|b| b.workerid),
            started_at: b.and_then(|b| b.started_at),
            complete_at: b.and_then(|b| b.complete_at),
        }
    }

    fn jobs(&self) -> Vec<GridJob> {
        let mut out: Vec<GridJob> = self
            .builds
            .iter()
            .map(|b| match b.complete_at {
                None => self.job(Some(b), "running", None),
                Some(_) => self.job(Some(b), "done", b.results),
            })
            .collect();
        let building = self.builds.iter().any(|b| b.complete_at.is_none());
        if self.complete && self.builds.is_empty() {
            out.push(self.job(None, "done", self.results));
        } else if !self.complete && !building {
            out.push(self.job(None, "pending", None));
        }
        out
    }

    fn cell(&self) -> GridCell {
        let newest = self.builds.last();
        let (state, results) = match newest {
            _ if self.complete => ("done", self.results),
            Some(b) if b.complete_at.is_none() => ("running", None),
            // A finished build whose request waits again (RETRY).
            Some(b) => ("pending", b.results),
            None => ("pending", None),
        };
        GridCell {
            builderid: self.builderid,
            buildrequestid: self.brid,
            buildid: newest.map(|b| b.id),
            number: newest.map(|b| b.number),
            state,
            results,
        }
    }
}

/// The requests of a buildset, each with its builds (oldest first).
fn requests_with_builds(c: &mut dyn Sql, bsid: i64) -> anyhow::Result<Vec<RequestBuilds>> {
    let rows = c.query(
        "SELECT q.id, q.builderid, q.complete, q.results,
                b.id, b.number, b.results, b.workerid, b.started_at, b.complete_at
         FROM buildrequests q LEFT JOIN builds b ON b.buildrequestid = q.id
         WHERE q.buildsetid = ?1 ORDER BY q.id, b.id",
        args![bsid],
    )?;
    let mut out: Vec<RequestBuilds> = Vec::new();
    for r in rows {
        let brid: i64 = r.get(0)?;
        if out.last().map(|x| x.brid) != Some(brid) {
            out.push(RequestBuilds {
                brid,
                builderid: r.get(1)?,
                complete: r.get(2)?,
                results: r.get(3)?,
                builds: vec![],
            });
        }
        if let Some(id) = r.get::<Option<i64>>(4)? {
            let build = BuildRow {
                id,
                number: r.get(5)?,
                results: r.get(6)?,
                workerid: r.get(7)?,
                started_at: r.get(8)?,
                complete_at: r.get(9)?,
            };
            if let Some(req) = out.last_mut() {
                req.builds.push(build);
            }
        }
    }
    Ok(out)
}

impl Store {
    /// The newest pushes the query asks for, newest first.
    pub async fn grid(&self, q: GridQuery) -> anyhow::Result<Vec<GridPush>> {
        self.call(move |c| {
            // A buildset of several sourcestamps is placed by its first.
            const SELECT: &str = "SELECT b.id, b.reason, b.submitted_at, s.branch, s.revision, s.repository
                 FROM buildsets b
                 LEFT JOIN sourcestamps s ON s.id = (
                     SELECT min(bs.sourcestampid) FROM buildset_sourcestamps bs WHERE bs.buildsetid = b.id)
                 WHERE b.id < ?1";
            let before = q.before.unwrap_or(i64::MAX);
            let rows = match &q.branch {
                None => c.query(
                    &format!("{SELECT} ORDER BY b.id DESC LIMIT ?2"),
                    args![before, q.buildsets],
                )?,
                Some(None) => c.query(
                    &format!("{SELECT} AND s.branch IS NULL ORDER BY b.id DESC LIMIT ?2"),
                    args![before, q.buildsets],
                )?,
                Some(Some(branch)) => c.query(
                    &format!("{SELECT} AND s.branch = ?3 ORDER BY b.id DESC LIMIT ?2"),
                    args![before, q.buildsets, branch],
                )?,
            };
            let mut pushes: Vec<GridPush> = Vec::new();
            let mut by_key: BTreeMap<(Option<String>, String, String), usize> = BTreeMap::new();
            let mut push_of: BTreeMap<i64, usize> = BTreeMap::new();
            for r in rows {
                let (bsid, reason, submitted_at): (i64, String, i64) =
                    (r.get(0)?, r.get(1)?, r.get(2)?);
                let (branch, revision): (Option<String>, Option<String>) = (r.get(3)?, r.get(4)?);
                let repository = r.get::<Option<String>>(5)?.unwrap_or_default();
                let at = match &revision {
                    Some(rev) => *by_key
                        .entry((branch.clone(), repository.clone(), rev.clone()))
                        .or_insert_with(|| {
                            pushes.push(GridPush::new(&branch, &revision, &repository, submitted_at, &reason));
                            pushes.len() - 1
                        }),
                    None => {
                        pushes.push(GridPush::new(&branch, &revision, &repository, submitted_at, &reason));
                        pushes.len() - 1
                    }
                };
                pushes[at].buildsets.push(bsid);
                push_of.insert(bsid, at);
            }
            for (bsid, at) in &push_of {
                let push = &mut pushes[*at];
                let changes = c.query(
                    "SELECT c.changeid, c.author, c.revision, c.revlink, c.comments, c.when_timestamp
                     FROM buildset_changes x JOIN changes c ON c.changeid = x.changeid
                     WHERE x.buildsetid = ?1 ORDER BY c.changeid DESC",
                    args![bsid],
                )?;
                for r in changes {
                    let ch = GridChange {
                        changeid: r.get(0)?,
                        author: r.get(1)?,
                        revision: r.get(2)?,
                        revlink: r.get(3)?,
                        comments: r.get(4)?,
                        when_timestamp: r.get(5)?,
                    };
                    if !push.changes.iter().any(|x| x.changeid == ch.changeid) {
                        push.changes.push(ch);
                    }
                }
                for req in requests_with_builds(c, *bsid)? {
                    push.jobs.extend(req.jobs());
                    let cell = req.cell();
                    // The newest request of a builder wins the cell.
                    match push.cells.iter_mut().find(|x| x.builderid == cell.builderid) {
                        Some(old) if old.buildrequestid < cell.buildrequestid => *old = cell,
                        Some(_) => {}
                        None => push.cells.push(cell),
                    }
                }
            }
            for p in &mut pushes {
                p.changes.sort_by_key(|c| std::cmp::Reverse(c.changeid));
                p.cells.sort_by_key(|x| x.builderid);
                p.jobs.sort_by_key(|j| (j.builderid, j.buildrequestid, j.buildid.is_none(), j.buildid));
            }
            Ok(pushes)
        })
        .await
    }

    /// The branches that have pushes, the one pushed to last first (at
    /// most `limit`).
    pub async fn push_branches(&self, limit: usize) -> anyhow::Result<Vec<PushBranch>> {
        self.call(move |c| {
            c.query(
                "SELECT s.branch, max(x.buildsetid) FROM buildset_sourcestamps x
                 JOIN sourcestamps s ON s.id = x.sourcestampid
                 GROUP BY s.branch ORDER BY 2 DESC LIMIT ?1",
                args![limit],
            )?
            .iter()
            .map(|r| {
                Ok(PushBranch {
                    branch: r.get(0)?,
                    newest_buildset: r.get(1)?,
                })
            })
            .collect()
        })
        .await
    }
}

impl GridPush {
    fn new(
        branch: &Option<String>,
        revision: &Option<String>,
        repository: &str,
        submitted_at: i64,
        reason: &str,
    ) -> GridPush {
        GridPush {
            branch: branch.clone(),
            revision: revision.clone(),
            repository: repository.to_string(),
            submitted_at,
            reason: reason.to_string(),
            buildsets: vec![],
            changes: vec![],
            cells: vec![],
            jobs: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GridQuery;
    use crate::store::builds::Claimed;
    use crate::store::buildsets::{NewBuildset, Source, SourceStamp};

    fn q(buildsets: usize, before: Option<i64>) -> GridQuery {
        GridQuery {
            buildsets,
            before,
            branch: None,
        }
    }

    fn buildset(builders: &[&str], revision: Option<&str>) -> NewBuildset {
        on_branch("m-c", builders, revision)
    }

    fn on_branch(branch: &str, builders: &[&str], revision: Option<&str>) -> NewBuildset {
        NewBuildset {
            scheduler: "s".into(),
            reason: "test".into(),
            external_idstring: None,
            source: Source::New(vec![SourceStamp {
                branch: Some(branch.into()),
                revision: revision.map(String::from),
                ..SourceStamp::default()
            }]),
            properties: Default::default(),
            builders: builders.iter().map(|b| b.to_string()).collect(),
            priority: 0,
            parent_buildid: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buildsets_of_one_revision_are_one_push_and_cells_follow_their_requests() {
        for (store, _db) in crate::store::testing::each_backend().await {
            let master = store.master_started("m").await.expect("master");
            // Two product schedulers' buildsets for push `aaa`, then `bbb`, then
            // a forced build of the tip.
            let firefox = store
                .add_buildset(buildset(&["linux", "mac"], Some("aaa")))
                .await
                .expect("bs");
            store
                .add_buildset(buildset(&["mobile"], Some("aaa")))
                .await
                .expect("bs");
            store
                .add_buildset(buildset(&["linux"], Some("bbb")))
                .await
                .expect("bs");
            store
                .add_buildset(buildset(&["linux"], None))
                .await
                .expect("bs");
            // linux of `aaa` is built and fails; mac was cancelled.
            let linux = firefox.brids[0].clone();
            assert!(store
                .claim_request(linux.brid, master)
                .await
                .expect("claim"));
            let (buildid, _) = store
                .new_build(
                    linux.builderid,
                    linux.brid,
                    None,
                    master,
                    Default::default(),
                )
                .await
                .expect("build");
            let pushes = store.grid(q(10, None)).await.expect("grid");
            let revs: Vec<Option<&str>> = pushes.iter().map(|p| p.revision.as_deref()).collect();
            assert_eq!(revs, [None, Some("bbb"), Some("aaa")], "newest first");
            assert_eq!(pushes[2].buildsets.len(), 2);
            let states: Vec<&str> = pushes[2].cells.iter().map(|c| c.state).collect();
            assert_eq!(states, ["running", "pending", "pending"]);

            store
                .finish_build(
                    buildid,
                    2,
                    "failed",
                    crate::store::builds::Claimed::Complete(vec![]),
                )
                .await
                .expect("finish");
            store
                .complete_requests(vec![linux.brid], 2)
                .await
                .expect("complete");
            store
                .cancel_request(firefox.brids[1].brid)
                .await
                .expect("cancel");
            let pushes = store.grid(q(10, None)).await.expect("grid");
            let aaa = &pushes[2];
            let cells: Vec<(&str, Option<i64>, Option<i64>)> = aaa
                .cells
                .iter()
                .map(|c| (c.state, c.results, c.number))
                .collect();
            assert_eq!(
                cells,
                [
                    ("done", Some(2), Some(1)),
                    ("done", Some(6), None),
                    ("pending", None, None)
                ]
            );
            // Paging: only what is older than a buildset.
            let older = store
                .grid(q(10, Some(firefox.bsid + 1)))
                .await
                .expect("grid");
            assert_eq!(older.len(), 1);
            assert_eq!(older[0].buildsets, [firefox.bsid]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_show_every_build_branches_filter_and_a_rebuild_joins_its_push() {
        for (store, _db) in crate::store::testing::each_backend().await {
            let master = store.master_started("m").await.expect("master");
            let mut props = crate::store::Properties::new();
            props.insert("who".into(), (serde_json::json!("dev"), "test".into()));
            let mut central = on_branch("central", &["linux", "mac"], Some("aaa"));
            central.properties = props;
            let central = store.add_buildset(central).await.expect("bs");
            let _try = store
                .add_buildset(on_branch("try", &["linux"], Some("ccc")))
                .await
                .expect("bs");
            // linux of `aaa` is built, ends RETRY (its request waits
            // again), is built again and fails.
            let linux = central.brids[0].clone();
            let build = |n: i64| {
                let store = store.clone();
                let linux = linux.clone();
                async move {
                    assert!(store
                        .claim_request(linux.brid, master)
                        .await
                        .expect("claim"));
                    let (id, _) = store
                        .new_build(
                            linux.builderid,
                            linux.brid,
                            None,
                            master,
                            Default::default(),
                        )
                        .await
                        .expect("build");
                    let claimed = if n == 1 {
                        Claimed::GiveBack(vec![linux.brid])
                    } else {
                        Claimed::Complete(vec![linux.brid])
                    };
                    store
                        .finish_build(id, if n == 1 { 5 } else { 2 }, "x", claimed)
                        .await
                        .expect("finish");
                    id
                }
            };
            let first = build(1).await;
            let all = store.grid(q(10, None)).await.expect("grid");
            let aaa = all
                .iter()
                .find(|p| p.branch.as_deref() == Some("central"))
                .expect("push");
            let jobs: Vec<(&str, Option<i64>, Option<i64>)> = aaa
                .jobs
                .iter()
                .map(|j| (j.state, j.results, j.buildid))
                .collect();
            assert_eq!(
                jobs,
                [
                    ("done", Some(5), Some(first)),
                    ("pending", None, None),
                    ("pending", None, None)
                ],
                "the retried build, its request waiting again, and mac"
            );
            let second = build(2).await;

            // Only one branch's pushes; the branches, newest push first.
            let only = store
                .grid(GridQuery {
                    branch: Some(Some("central".into())),
                    ..q(10, None)
                })
                .await
                .expect("grid");
            assert_eq!(only.len(), 1);
            let jobs: Vec<(&str, Option<i64>)> =
                only[0].jobs.iter().map(|j| (j.state, j.results)).collect();
            assert_eq!(
                jobs,
                [("done", Some(5)), ("done", Some(2)), ("pending", None)]
            );
            let none = store
                .grid(GridQuery {
                    branch: Some(None),
                    ..q(10, None)
                })
                .await
                .expect("grid");
            assert!(none.is_empty(), "{none:?}");
            let branches: Vec<Option<String>> = store
                .push_branches(10)
                .await
                .expect("branches")
                .into_iter()
                .map(|b| b.branch)
                .collect();
            assert_eq!(branches, [Some("try".into()), Some("central".into())]);

            // A rebuild of the failed build: a new request of linux in the
            // same push, with the first buildset's properties.
            let ids = store
                .rebuild(second, "rebuild".into())
                .await
                .expect("rebuild")
                .expect("the build exists");
            assert_eq!(ids.brids.len(), 1);
            assert_eq!(ids.brids[0].builder, "linux");
            let bs = store
                .get_buildset(ids.bsid)
                .await
                .expect("get")
                .expect("bs");
            assert_eq!(
                bs.properties.get("who").map(|p| &p.0),
                Some(&serde_json::json!("dev"))
            );
            let only = store
                .grid(GridQuery {
                    branch: Some(Some("central".into())),
                    ..q(10, None)
                })
                .await
                .expect("grid");
            assert_eq!(only.len(), 1, "the rebuild is part of the push");
            assert_eq!(only[0].buildsets, [ids.bsid, central.bsid]);
            let linux_jobs = only[0]
                .jobs
                .iter()
                .filter(|j| j.builderid == linux.builderid)
                .count();
            assert_eq!(linux_jobs, 3);
            assert_eq!(
                store.rebuild(9999, "r".into()).await.expect("rebuild"),
                None
            );
        }
    }
}
