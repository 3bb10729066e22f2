//! Changes: what pollers, change hooks and `sendchange` record, stored
//! with the poller's state in one transaction, and the bus that tells the
//! schedulers of each one after its commit.

use std::sync::Arc;

use serde::Serialize;

use super::db::{args, Sql};
use super::{buildsets, masters, read_properties, set_state, ObjectId, Properties, Store};

/// A change about to be stored.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NewChange {
    pub author: String,
    pub committer: Option<String>,
    pub comments: String,
    pub branch: Option<String>,
    pub revision: Option<String>,
    pub revlink: Option<String>,
    pub when_timestamp: i64,
    pub category: Option<String>,
    pub repository: String,
    pub codebase: String,
    pub project: String,
    pub files: Vec<String>,
    pub properties: Properties,
}

/// A stored change, with the fields of Buildbot's `changes` data API.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Change {
    pub changeid: i64,
    pub sourcestampid: i64,
    /// The change source that made it.
    #[serde(skip)]
    pub source: String,
    #[serde(flatten)]
    pub change: NewChange,
}

/// Every change the store records, in the order stored, this master's and
/// (on a shared database) the other masters': the store is its one
/// publisher, after the commit. Subscribers that fall behind lose messages
/// (and are told so by `broadcast`); the store is the record.
#[derive(Clone)]
pub struct ChangeBus(tokio::sync::broadcast::Sender<Arc<Change>>);

impl Default for ChangeBus {
    fn default() -> Self {
        ChangeBus(tokio::sync::broadcast::channel(4096).0)
    }
}

impl ChangeBus {
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<Change>> {
        self.0.subscribe()
    }

    pub(super) fn publish(&self, changes: &[Change]) {
        for c in changes {
            // No subscriber is not an error: the changes are stored.
            let _ = self.0.send(Arc::new(c.clone()));
        }
    }
}

impl Store {
    /// Stores `changes` (in order) and, in the same transaction, the state
    /// that records them as seen: a crash leaves either both or neither.
    pub async fn add_changes(
        &self,
        source: &str,
        changes: Vec<NewChange>,
        state: Vec<(ObjectId, String, serde_json::Value)>,
    ) -> anyhow::Result<Vec<Change>> {
        self.add_changes_fenced(source, changes, state, None).await
    }

    /// [`Store::add_changes`] of a poller of a fleet: made only while its
    /// master holds `fence`'s lease.
    pub async fn add_changes_fenced(
        &self,
        source: &str,
        changes: Vec<NewChange>,
        state: Vec<(ObjectId, String, serde_json::Value)>,
        fence: Option<masters::Fence>,
    ) -> anyhow::Result<Vec<Change>> {
        let source = source.to_string();
        let stored = self
            .call(move |c| {
                if let Some(f) = &fence {
                    f.check(c)?;
                }
                let mut out = Vec::with_capacity(changes.len());
                for ch in &changes {
                    out.push(insert_change(c, &source, ch.clone())?);
                }
                for (object, name, value) in &state {
                    set_state(c, *object, name, value)?;
                }
                Ok(out)
            })
            .await?;
        self.bus.publish(&stored);
        for ch in &stored {
            self.events.emit("changes", ch.changeid, "new", || {
                serde_json::to_value(ch).unwrap_or_default()
            });
        }
        Ok(stored)
    }

    pub async fn get_change(&self, changeid: i64) -> anyhow::Result<Option<Change>> {
        self.call(move |c| get_change(c, changeid)).await
    }

    /// Changes in the order they were stored, from `after` (exclusive).
    pub async fn changes_since(&self, after: i64, limit: usize) -> anyhow::Result<Vec<Change>> {
        self.call(move |c| {
            let ids: Vec<i64> = c.column(
                "SELECT changeid FROM changes WHERE changeid > ?1 ORDER BY changeid LIMIT ?2",
                args![after, limit],
            )?;
            ids.into_iter()
                .filter_map(|id| get_change(c, id).transpose())
                .collect()
        })
        .await
    }
}

fn insert_change(c: &mut dyn Sql, source: &str, ch: NewChange) -> anyhow::Result<Change> {
    let ssid = buildsets::insert_sourcestamp(
        c,
        &buildsets::SourceStamp {
            branch: ch.branch.clone(),
            revision: ch.revision.clone(),
            repository: ch.repository.clone(),
            project: ch.project.clone(),
            codebase: ch.codebase.clone(),
        },
    )?;
    let id: i64 = c.value(
        "INSERT INTO changes (author, committer, comments, branch, revision, revlink, when_timestamp,
                              category, repository, codebase, project, sourcestampid, source)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) RETURNING changeid",
        args![
            &ch.author,
            &ch.committer,
            &ch.comments,
            &ch.branch,
            &ch.revision,
            &ch.revlink,
            ch.when_timestamp,
            &ch.category,
            &ch.repository,
            &ch.codebase,
            &ch.project,
            ssid,
            source
        ],
    )?;
    for (i, f) in ch.files.iter().enumerate() {
        c.execute(
            "INSERT INTO change_files (changeid, position, filename) VALUES (?1, ?2, ?3)",
            args![id, i, f],
        )?;
    }
    for (name, (value, src)) in &ch.properties {
        c.execute(
            "INSERT INTO change_properties (changeid, property_name, property_value) VALUES (?1, ?2, ?3)",
            args![id, name, serde_json::json!([value, src]).to_string()],
        )?;
    }
    Ok(Change {
        changeid: id,
        sourcestampid: ssid,
        source: source.to_string(),
        change: ch,
    })
}

fn get_change(c: &mut dyn Sql, changeid: i64) -> anyhow::Result<Option<Change>> {
    let Some(r) = c.query_opt(
        "SELECT author, committer, comments, branch, revision, revlink, when_timestamp, category,
                repository, codebase, project, sourcestampid, source
         FROM changes WHERE changeid = ?1",
        args![changeid],
    )?
    else {
        return Ok(None);
    };
    let mut ch = NewChange {
        author: r.get(0)?,
        committer: r.get(1)?,
        comments: r.get(2)?,
        branch: r.get(3)?,
        revision: r.get(4)?,
        revlink: r.get(5)?,
        when_timestamp: r.get(6)?,
        category: r.get(7)?,
        repository: r.get(8)?,
        codebase: r.get(9)?,
        project: r.get(10)?,
        files: vec![],
        properties: Properties::new(),
    };
    ch.files = c.column(
        "SELECT filename FROM change_files WHERE changeid = ?1 ORDER BY position",
        args![changeid],
    )?;
    ch.properties = read_properties(
        c,
        "SELECT property_name, property_value FROM change_properties WHERE changeid = ?1",
        changeid,
        "change",
    )?;
    Ok(Some(Change {
        changeid,
        sourcestampid: r.get(11)?,
        source: r.get(12)?,
        change: ch,
    }))
}
