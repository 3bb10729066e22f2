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

use super::db::args;
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
}

impl Store {
    /// The newest pushes, made of at most `buildsets` buildsets (older
    /// than `before`, a buildset id, when given).
    pub async fn grid(
        &self,
        buildsets: usize,
        before: Option<i64>,
    ) -> anyhow::Result<Vec<GridPush>> {
        self.call(move |c| {
            // A buildset of several sourcestamps is placed by its first.
            let rows = c.query(
                "SELECT b.id, b.reason, b.submitted_at, s.branch, s.revision, s.repository
                 FROM buildsets b
                 LEFT JOIN sourcestamps s ON s.id = (
                     SELECT min(bs.sourcestampid) FROM buildset_sourcestamps bs WHERE bs.buildsetid = b.id)
                 WHERE b.id < ?1 ORDER BY b.id DESC LIMIT ?2",
                args![before.unwrap_or(i64::MAX), buildsets],
            )?;
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
                let reqs = c.query(
                    "SELECT q.id, q.builderid, q.complete, q.results,
                            (SELECT b.id FROM builds b WHERE b.buildrequestid = q.id ORDER BY b.id DESC LIMIT 1)
                     FROM buildrequests q WHERE q.buildsetid = ?1 ORDER BY q.id",
                    args![bsid],
                )?;
                for r in reqs {
                    let (brid, builderid, complete): (i64, i64, bool) =
                        (r.get(0)?, r.get(1)?, r.get(2)?);
                    let (req_results, buildid): (Option<i64>, Option<i64>) = (r.get(3)?, r.get(4)?);
                    let (number, build_done, build_results) = match buildid {
                        Some(id) => {
                            let b = c.query_one(
                                "SELECT number, complete_at IS NOT NULL, results FROM builds WHERE id = ?1",
                                args![id],
                            )?;
                            (Some(b.get::<i64>(0)?), b.get::<bool>(1)?, b.get(2)?)
                        }
                        None => (None, false, None),
                    };
                    let (state, results) = if complete {
                        ("done", req_results)
                    } else if buildid.is_some() && !build_done {
                        ("running", None)
                    } else if build_done {
                        // A finished build whose request waits again (RETRY).
                        ("pending", build_results)
                    } else {
                        ("pending", None)
                    };
                    let cell = GridCell {
                        builderid,
                        buildrequestid: brid,
                        buildid,
                        number,
                        state,
                        results,
                    };
                    // The newest request of a builder wins the cell.
                    match push.cells.iter_mut().find(|x| x.builderid == builderid) {
                        Some(old) if old.buildrequestid < brid => *old = cell,
                        Some(_) => {}
                        None => push.cells.push(cell),
                    }
                }
            }
            for p in &mut pushes {
                p.changes.sort_by_key(|c| std::cmp::Reverse(c.changeid));
                p.cells.sort_by_key(|x| x.builderid);
            }
            Ok(pushes)
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
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::buildsets::{NewBuildset, Source, SourceStamp};

    fn buildset(builders: &[&str], revision: Option<&str>) -> NewBuildset {
        NewBuildset {
            scheduler: "s".into(),
            reason: "test".into(),
            external_idstring: None,
            source: Source::New(vec![SourceStamp {
                branch: Some("m-c".into()),
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
            let pushes = store.grid(10, None).await.expect("grid");
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
            let pushes = store.grid(10, None).await.expect("grid");
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
            let older = store.grid(10, Some(firefox.bsid + 1)).await.expect("grid");
            assert_eq!(older.len(), 1);
            assert_eq!(older[0].buildsets, [firefox.bsid]);
        }
    }
}
