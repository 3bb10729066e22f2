//! The state store: SQLite at `DIR/state.sqlite`, in WAL mode. Every SQL
//! statement kiln runs is in this module; the rest of kiln sees typed rows.
//!
//! The schema is versioned by SQLite's `user_version`: `MIGRATIONS[i]`
//! brings a database from version `i` to `i + 1`. Opening applies what is
//! missing, each step in its own transaction, and refuses a database whose
//! version is newer than this kiln knows. Database work is blocking, so the
//! async side goes through [`Store::call`], which runs it on tokio's
//! blocking pool.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub mod api;
pub mod builds;
pub mod buildsets;
pub mod grid;
pub mod query;
pub mod reloads;
pub mod workers;

use anyhow::{bail, Context};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;

/// File name of the store inside a master dir.
pub const DB_FILE: &str = "state.sqlite";

/// Schema steps, oldest first; see the module docs.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "changes and state",
        include_str!("migrations/0001_changes_and_state.sql"),
    ),
    ("builds", include_str!("migrations/0002_builds.sql")),
    (
        "buildset changes",
        include_str!("migrations/0003_buildset_changes.sql"),
    ),
    (
        "reload duration",
        include_str!("migrations/0004_reload_duration.sql"),
    ),
    (
        "grid indexes",
        include_str!("migrations/0005_grid_indexes.sql"),
    ),
];

/// The schema version this kiln writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// A property value and where it came from, as Buildbot stores them.
pub type Properties = BTreeMap<String, (serde_json::Value, String)>;

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

/// Named JSON state of one object (a poller, a scheduler).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectId(pub i64);

/// The store. Cheap to clone; one connection, used by one task at a time.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// What was written, for the event stream (published after commit).
    events: crate::events::Events,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.path.display())
    }
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) and migrates the store at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let mut conn = Connection::open(path)
            .with_context(|| format!("cannot open the database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrate(&mut conn, SCHEMA_VERSION)
            .with_context(|| format!("database {}", path.display()))?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
            events: crate::events::Events::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stream of what this store records.
    pub fn events(&self) -> &crate::events::Events {
        &self.events
    }

    /// Runs blocking database work off the async runtime. The closure runs
    /// to its end even if the caller stops waiting, so a transaction is
    /// never left half-written by a cancelled task.
    async fn call<R, F>(&self, f: F) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> anyhow::Result<R> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = crate::sync::lock(&conn);
            f(&mut c)
        })
        .await
        .context("database task failed")?
    }

    pub async fn object_id(&self, name: &str, class_name: &str) -> anyhow::Result<ObjectId> {
        let (name, class_name) = (name.to_string(), class_name.to_string());
        self.call(move |c| object_id(c, &name, &class_name)).await
    }

    pub async fn get_state(
        &self,
        object: ObjectId,
        name: &str,
    ) -> anyhow::Result<Option<serde_json::Value>> {
        let name = name.to_string();
        self.call(move |c| get_state(c, object, &name)).await
    }

    pub async fn set_state(
        &self,
        object: ObjectId,
        name: &str,
        value: serde_json::Value,
    ) -> anyhow::Result<()> {
        let name = name.to_string();
        self.call(move |c| {
            let tx = c.transaction()?;
            set_state(&tx, object, &name, &value)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Stores `changes` (in order) and, in the same transaction, the state
    /// that records them as seen: a crash leaves either both or neither.
    pub async fn add_changes(
        &self,
        source: &str,
        changes: Vec<NewChange>,
        state: Vec<(ObjectId, String, serde_json::Value)>,
    ) -> anyhow::Result<Vec<Change>> {
        let source = source.to_string();
        let stored = self
            .call(move |c| {
                let tx = c.transaction()?;
                let mut out = Vec::with_capacity(changes.len());
                for ch in changes {
                    out.push(insert_change(&tx, &source, ch)?);
                }
                for (object, name, value) in &state {
                    set_state(&tx, *object, name, value)?;
                }
                tx.commit()?;
                Ok(out)
            })
            .await?;
        for ch in &stored {
            self.events.emit("changes", ch.changeid, "new", || {
                serde_json::to_value(ch).unwrap_or_default()
            });
        }
        Ok(stored)
    }

    /// Records this master as active (Buildbot's `masters` row); returns its id.
    pub async fn master_started(&self, name: &str) -> anyhow::Result<i64> {
        let name = name.to_string();
        self.call(move |c| {
            c.execute(
                "INSERT INTO masters (name, active, last_active) VALUES (?1, 1, ?2)
                 ON CONFLICT (name) DO UPDATE SET active = 1, last_active = excluded.last_active",
                params![name, now()],
            )?;
            Ok(c.query_row(
                "SELECT id FROM masters WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )?)
        })
        .await
    }

    pub async fn master_stopped(&self, id: i64) -> anyhow::Result<()> {
        self.call(move |c| {
            c.execute(
                "UPDATE masters SET active = 0, last_active = ?2 WHERE id = ?1",
                params![id, now()],
            )?;
            Ok(())
        })
        .await
    }

    /// A master as Buildbot's data API shows it: `masterid`, `name`,
    /// `active`, `last_active`.
    pub async fn master(&self, id: i64) -> anyhow::Result<Option<serde_json::Value>> {
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT name, active, last_active FROM masters WHERE id = ?1",
                [id],
                |r| {
                    Ok(serde_json::json!({
                        "masterid": id,
                        "name": r.get::<_, String>(0)?,
                        "active": r.get::<_, i64>(1)? != 0,
                        "last_active": r.get::<_, i64>(2)?,
                    }))
                },
            )
            .optional()?)
        })
        .await
    }

    pub async fn get_change(&self, changeid: i64) -> anyhow::Result<Option<Change>> {
        self.call(move |c| get_change(c, changeid)).await
    }

    /// Changes in the order they were stored, from `after` (exclusive).
    pub async fn changes_since(&self, after: i64, limit: usize) -> anyhow::Result<Vec<Change>> {
        self.call(move |c| {
            let ids: Vec<i64> = c
                .prepare_cached(
                    "SELECT changeid FROM changes WHERE changeid > ?1 ORDER BY changeid LIMIT ?2",
                )?
                .query_map(params![after, limit as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            ids.into_iter()
                .filter_map(|id| get_change(c, id).transpose())
                .collect()
        })
        .await
    }
}

/// Brings the schema to `target`, one migration per transaction.
fn migrate(conn: &mut Connection, target: usize) -> anyhow::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > SCHEMA_VERSION {
        bail!(
            "it was written by a newer kiln (schema version {version}; this kiln knows versions up to {SCHEMA_VERSION}): \
             run that kiln, or move the file aside to start with an empty database"
        );
    }
    for (i, (what, sql)) in MIGRATIONS.iter().enumerate().take(target).skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("migration {} ({what}) failed", i + 1))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!("database schema migrated to version {} ({what})", i + 1);
    }
    Ok(())
}

/// Opens `path` at an older schema version (for tests of migration).
#[doc(hidden)]
pub fn create_at_version(path: &Path, version: usize) -> anyhow::Result<Connection> {
    let mut conn = Connection::open(path)?;
    migrate(&mut conn, version)?;
    Ok(conn)
}

pub fn object_id(c: &Connection, name: &str, class_name: &str) -> anyhow::Result<ObjectId> {
    c.execute(
        "INSERT OR IGNORE INTO objects (name, class_name) VALUES (?1, ?2)",
        params![name, class_name],
    )?;
    let id = c.query_row(
        "SELECT id FROM objects WHERE name = ?1 AND class_name = ?2",
        params![name, class_name],
        |r| r.get(0),
    )?;
    Ok(ObjectId(id))
}

pub fn get_state(
    c: &Connection,
    object: ObjectId,
    name: &str,
) -> anyhow::Result<Option<serde_json::Value>> {
    let text: Option<String> = c
        .query_row(
            "SELECT value_json FROM object_state WHERE objectid = ?1 AND name = ?2",
            params![object.0, name],
            |r| r.get(0),
        )
        .optional()?;
    match text {
        None => Ok(None),
        Some(t) => Ok(Some(serde_json::from_str(&t).with_context(|| {
            format!("stored state `{name}` of object {} is not JSON", object.0)
        })?)),
    }
}

pub(crate) fn set_state(
    tx: &Transaction<'_>,
    object: ObjectId,
    name: &str,
    value: &serde_json::Value,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO object_state (objectid, name, value_json) VALUES (?1, ?2, ?3)
         ON CONFLICT (objectid, name) DO UPDATE SET value_json = excluded.value_json",
        params![object.0, name, value.to_string()],
    )?;
    Ok(())
}

fn insert_change(tx: &Transaction<'_>, source: &str, ch: NewChange) -> anyhow::Result<Change> {
    tx.prepare_cached(
        "INSERT INTO sourcestamps (branch, revision, repository, project, codebase, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        ch.branch,
        ch.revision,
        ch.repository,
        ch.project,
        ch.codebase,
        now()
    ])?;
    let ssid = tx.last_insert_rowid();
    tx.prepare_cached(
        "INSERT INTO changes (author, committer, comments, branch, revision, revlink, when_timestamp,
                              category, repository, codebase, project, sourcestampid, source)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        ch.author,
        ch.committer,
        ch.comments,
        ch.branch,
        ch.revision,
        ch.revlink,
        ch.when_timestamp,
        ch.category,
        ch.repository,
        ch.codebase,
        ch.project,
        ssid,
        source
    ])?;
    let id = tx.last_insert_rowid();
    {
        let mut files = tx.prepare_cached(
            "INSERT INTO change_files (changeid, position, filename) VALUES (?1, ?2, ?3)",
        )?;
        for (i, f) in ch.files.iter().enumerate() {
            files.execute(params![id, i as i64, f])?;
        }
        let mut props = tx.prepare_cached(
            "INSERT INTO change_properties (changeid, property_name, property_value) VALUES (?1, ?2, ?3)",
        )?;
        for (name, (value, src)) in &ch.properties {
            props.execute(params![
                id,
                name,
                serde_json::json!([value, src]).to_string()
            ])?;
        }
    }
    Ok(Change {
        changeid: id,
        sourcestampid: ssid,
        source: source.to_string(),
        change: ch,
    })
}

fn get_change(c: &Connection, changeid: i64) -> anyhow::Result<Option<Change>> {
    let row = c
        .prepare_cached(
            "SELECT author, committer, comments, branch, revision, revlink, when_timestamp, category,
                    repository, codebase, project, sourcestampid, source
             FROM changes WHERE changeid = ?1",
        )?
        .query_row(params![changeid], |r| {
            Ok((
                NewChange {
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
                },
                r.get::<_, i64>(11)?,
                r.get::<_, String>(12)?,
            ))
        })
        .optional()?;
    let Some((mut ch, ssid, source)) = row else {
        return Ok(None);
    };
    ch.files = c
        .prepare_cached("SELECT filename FROM change_files WHERE changeid = ?1 ORDER BY position")?
        .query_map(params![changeid], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let props: Vec<(String, String)> = c
        .prepare_cached(
            "SELECT property_name, property_value FROM change_properties WHERE changeid = ?1",
        )?
        .query_map(params![changeid], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (name, text) in props {
        let (value, src): (serde_json::Value, String) = serde_json::from_str(&text)
            .with_context(|| format!("property `{name}` of change {changeid} is malformed"))?;
        ch.properties.insert(name, (value, src));
    }
    Ok(Some(Change {
        changeid,
        sourcestampid: ssid,
        source,
        change: ch,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(rev: &str) -> NewChange {
        NewChange {
            author: "alice".into(),
            comments: "fix".into(),
            branch: Some("mozilla-central".into()),
            revision: Some(rev.into()),
            when_timestamp: 1_700_000_000,
            repository: "https://hg.example.org/mozilla-central".into(),
            files: vec!["b.c".into(), "a.c".into()],
            properties: [(
                "pushid".to_string(),
                (serde_json::json!(7), "Change".to_string()),
            )]
            .into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn changes_and_state_round_trip_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join(DB_FILE)).unwrap();
        let obj = store.object_id("HgPoller:x", "HgPoller").await.unwrap();
        assert_eq!(
            store.object_id("HgPoller:x", "HgPoller").await.unwrap(),
            obj
        );
        let stored = store
            .add_changes(
                "HgPoller:x",
                vec![change("aaa"), change("bbb")],
                vec![(obj, "lastChangeset".into(), serde_json::json!("bbb"))],
            )
            .await
            .unwrap();
        assert_eq!(stored.len(), 2);
        let back = store.get_change(stored[1].changeid).await.unwrap().unwrap();
        assert_eq!(back, stored[1]);
        assert_eq!(back.change.files, vec!["b.c", "a.c"]);
        assert_eq!(
            store.get_state(obj, "lastChangeset").await.unwrap(),
            Some(serde_json::json!("bbb"))
        );
        let since = store.changes_since(stored[0].changeid, 10).await.unwrap();
        assert_eq!(since.len(), 1);
        assert_eq!(since[0].change.revision.as_deref(), Some("bbb"));
    }

    #[test]
    fn an_older_database_is_migrated_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            let conn = create_at_version(&path, 1).unwrap();
            conn.execute(
                "INSERT INTO objects (name, class_name) VALUES ('p', 'HgPoller')",
                [],
            )
            .unwrap();
            let v: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(v, 1);
        }
        drop(Store::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, SCHEMA_VERSION);
        let n: i64 = c
            .query_row("SELECT count(*) FROM objects", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        // A table from the second migration exists.
        let n: i64 = c
            .query_row("SELECT count(*) FROM buildrequests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn a_newer_database_is_refused_with_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = format!("{:#}", Store::open(&path).unwrap_err());
        assert!(err.contains("newer kiln"), "{err}");
        assert!(err.contains("schema version 99"), "{err}");
        assert!(err.contains(&format!("up to {SCHEMA_VERSION}")), "{err}");
    }
}
