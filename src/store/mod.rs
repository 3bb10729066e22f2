//! The state store: SQLite at `DIR/state.sqlite` in WAL mode (the
//! default), or a PostgreSQL database that several masters share. Every SQL
//! statement kiln runs is in this module, written once against
//! [`db::Sql`]; the rest of kiln sees typed rows.
//!
//! The schema is versioned: `MIGRATIONS[i]` brings a database from
//! version `i` to `i + 1`, written for SQLite and read by [`postgres_ddl`]
//! into PostgreSQL's types for PostgreSQL. SQLite keeps the version in its
//! `user_version`, PostgreSQL in the table `kiln_schema`. Opening applies
//! what is missing and refuses a database whose version is newer than this
//! kiln knows. Database work is blocking, so the async side goes through
//! [`Store::call`], which runs it, as one transaction, on tokio's blocking
//! pool.
//!
//! Past 800 lines with its tests, which state the store's contract once
//! for both backends (`testing`); the code itself is under 600.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub mod api;
pub mod builds;
pub mod buildsets;
mod changes;
pub mod db;
pub mod faults;
pub mod grid;
pub mod janitor;
pub mod locks;
pub mod logcodec;
pub mod masters;
mod migrate;
pub mod notify;
pub mod pgtls;
mod rebuild;

pub use changes::{Change, ChangeBus, NewChange};
pub use migrate::{create_at_version, SCHEMA_VERSION};
use migrate::{migrate, migrate_pg};
pub mod query;
pub mod reloads;
pub mod upstream;
pub mod workers;

use anyhow::{bail, Context};
use rusqlite::Connection;

use crate::diagnostics::redact_url;
use db::{args, Sql};

/// File name of the store inside a master dir.
pub const DB_FILE: &str = "state.sqlite";

/// A property value and where it came from, as Buildbot stores them.
pub type Properties = BTreeMap<String, (serde_json::Value, String)>;

/// Named JSON state of one object (a poller, a scheduler).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectId(pub i64);

/// Where a store lives, as `db.db_url` names it.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database: its URL, and a password given apart from it.
    Postgres {
        url: String,
        password: Option<String>,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl std::fmt::Display for Target {
    /// The path, or the URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Sqlite(p) => write!(f, "{}", p.display()),
            Target::Postgres { url, .. } => f.write_str(&redact_url(url)),
        }
    }
}

impl Target {
    /// Reads `db.db_url`: `sqlite:///state.sqlite` is relative to the
    /// master dir, `sqlite:////abs/path` absolute; `postgresql://` (or
    /// `postgres://`) `USER[:PASSWORD]@HOST[:PORT]/DBNAME` is a PostgreSQL
    /// database, its password in the URL or given apart.
    pub fn parse(dir: &Path, db_url: &str, password: Option<String>) -> anyhow::Result<Target> {
        if let Some(rest) = db_url.strip_prefix("sqlite://") {
            let rest = rest.strip_prefix('/').unwrap_or(rest);
            let p = Path::new(rest);
            return Ok(Target::Sqlite(if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }));
        }
        if db_url.starts_with("postgresql://") || db_url.starts_with("postgres://") {
            let what = || format!("`db.db_url` {}", redact_url(db_url));
            let pg = pgtls::PgUrl::parse(db_url, Some(dir)).with_context(what)?;
            pg.url
                .parse::<tokio_postgres::Config>()
                .with_context(|| format!("{} is not a PostgreSQL URL", what()))?;
            return Ok(Target::Postgres {
                url: pg.to_db_url(),
                password,
            });
        }
        bail!(
            "`db.db_url` {} is not supported: write sqlite:///state.sqlite (relative to the master dir), \
             sqlite:////absolute/path, or postgresql://USER@HOST:PORT/DBNAME",
            redact_url(db_url)
        )
    }
}

#[derive(Clone)]
enum Backend {
    /// One connection, used by one call at a time.
    Sqlite(Arc<Mutex<Connection>>),
    /// A pool of connections.
    Postgres(deadpool_postgres::Pool),
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    target: Arc<Target>,
    /// What was written, for the event stream (published after commit).
    events: crate::events::Events,
    /// What the other masters of a shared database wrote.
    remote: Option<tokio::sync::broadcast::Sender<notify::Remote>>,
    /// The changes it records.
    bus: ChangeBus,
    /// How new log chunks are compressed (a `logcodec` code; the config's
    /// `logCompressionMethod`).
    log_compression: Arc<std::sync::atomic::AtomicI64>,
    /// Writes the database cannot take now, waited out (see [`faults`]).
    faults: Arc<faults::Faults>,
    /// In a fleet, this master's id: leased services' writes stand on
    /// their lease (see [`masters::Fence`]).
    fence_master: Option<i64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.target)
    }
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// How many connections a master keeps to PostgreSQL.
const PG_POOL_SIZE: usize = 16;

/// How long a connection to PostgreSQL may take before it fails.
const PG_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Store {
    /// How new log chunks are compressed from now on (a `logcodec` code).
    pub fn set_log_compression(&self, code: i64) {
        self.log_compression
            .store(code, std::sync::atomic::Ordering::Relaxed);
    }

    /// Opens (creating if needed) and migrates the SQLite store at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let mut conn = Connection::open(path)
            .with_context(|| format!("cannot open the database {}", path.display()))?;
        // SQLite reads the file at the first statement: a damaged or
        // foreign file is said as such, with what to do.
        if let Err(e) = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        }) {
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) {
                bail!(
                    "the database {} is not an SQLite database (damaged, or another program's file): \
                     restore it from a backup, or move it aside to start with an empty one",
                    path.display()
                );
            }
            return Err(e).with_context(|| format!("cannot read the database {}", path.display()));
        }
        // Before the first table: a new database gives the space of deleted
        // logs back to the file system when the janitor asks (an existing
        // one ignores this until `kiln cleanupdb` rewrites it).
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrate(&mut conn, SCHEMA_VERSION)
            .with_context(|| format!("database {}", path.display()))?;
        Ok(Store {
            backend: Backend::Sqlite(Arc::new(Mutex::new(conn))),
            target: Arc::new(Target::Sqlite(path.to_path_buf())),
            events: crate::events::Events::new(),
            remote: None,
            bus: ChangeBus::default(),
            log_compression: Arc::new(logcodec::ZSTD.into()),
            faults: Arc::default(),
            fence_master: None,
        })
    }

    /// Opens and migrates the store at `target`. A PostgreSQL database is
    /// reached through the current tokio runtime, which must be a
    /// multi-threaded one as long as the store is used.
    pub async fn connect(target: &Target) -> anyhow::Result<Store> {
        Store::connect_at(target, SCHEMA_VERSION).await
    }

    /// [`Store::connect`], migrating to `version` only (tests of migration).
    async fn connect_at(target: &Target, version: usize) -> anyhow::Result<Store> {
        let (url, password) = match target {
            Target::Sqlite(path) => {
                let path = path.clone();
                return tokio::task::spawn_blocking(move || Store::open(&path))
                    .await
                    .context("database task failed")?;
            }
            Target::Postgres { url, password } => (url, password),
        };
        let pg = pgtls::PgUrl::parse(url, None).with_context(|| format!("`db.db_url` {target}"))?;
        let mut config: tokio_postgres::Config = pg
            .url
            .parse()
            .with_context(|| format!("`db.db_url` {target} is not a PostgreSQL URL"))?;
        let tls = match &pg.tls {
            None => None,
            Some(root) => Some(
                pgtls::connector(root.as_deref()).with_context(|| format!("database {target}"))?,
            ),
        };
        if let Some(p) = password {
            config.password(p.as_bytes());
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(PG_CONNECT_TIMEOUT);
        }
        config.application_name("kiln");
        let listen_config = config.clone();
        let manager_config = deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let manager = match &tls {
            None => deadpool_postgres::Manager::from_config(
                config,
                tokio_postgres::NoTls,
                manager_config,
            ),
            Some(tls) => {
                deadpool_postgres::Manager::from_config(config, tls.clone(), manager_config)
            }
        };
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(PG_POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(PG_CONNECT_TIMEOUT * 3))
            .create_timeout(Some(PG_CONNECT_TIMEOUT))
            .build()
            .context("cannot make the PostgreSQL connection pool")?;
        // Reachable first, so that a wrong address or password is said as
        // such, before any migration.
        drop(pool.get().await.map_err(|e| unreachable(target, e))?);
        // Events go to the other masters too, and theirs come here.
        let origin = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let (notes_tx, notes_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(notify::notifier(pool.clone(), origin.clone(), notes_rx));
        let (remote, _) = tokio::sync::broadcast::channel(4096);
        let store = Store {
            backend: Backend::Postgres(pool),
            target: Arc::new(target.clone()),
            events: crate::events::Events::with_fanout(notes_tx),
            remote: Some(remote.clone()),
            bus: ChangeBus::default(),
            log_compression: Arc::new(logcodec::ZSTD.into()),
            faults: Arc::default(),
            fence_master: None,
        };
        tokio::spawn(notify::listener(
            listen_config,
            tls,
            origin,
            store.clone(),
            remote,
        ));
        store
            .call(move |c| migrate_pg(c, version))
            .await
            .with_context(|| format!("database {target}"))?;
        Ok(store)
    }

    /// Where the store lives.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Which SQL the store's database speaks.
    pub fn dialect(&self) -> db::Dialect {
        match self.backend {
            Backend::Sqlite(_) => db::Dialect::Sqlite,
            Backend::Postgres(_) => db::Dialect::Postgres,
        }
    }

    /// The stream of what this store records.
    pub fn events(&self) -> &crate::events::Events {
        &self.events
    }

    /// The changes this store records, as it records them.
    pub fn change_bus(&self) -> &ChangeBus {
        &self.bus
    }

    /// This store as master `masterid` of a fleet uses it: the writes of
    /// its leased services (pollers, schedulers) are made only while it
    /// holds their lease.
    pub fn fenced(&self, masterid: i64) -> Store {
        Store {
            fence_master: Some(masterid),
            ..self.clone()
        }
    }

    /// The fence of lease `lease` (`change_source:NAME`,
    /// `scheduler:NAME`), in a fleet.
    pub fn fence(&self, lease: String) -> Option<masters::Fence> {
        self.fence_master
            .map(|masterid| masters::Fence { masterid, lease })
    }

    /// How the database's writes go (faults waited out, calls waiting).
    pub fn faults(&self) -> &faults::Faults {
        &self.faults
    }

    /// Runs `f` on the SQLite connection itself, outside any transaction
    /// (the fault tests set its limits).
    #[cfg(test)]
    pub(crate) fn with_sqlite<R>(&self, f: impl FnOnce(&Connection) -> R) -> Option<R> {
        match &self.backend {
            Backend::Sqlite(conn) => Some(f(&crate::sync::lock(conn))),
            Backend::Postgres(_) => None,
        }
    }

    /// Runs blocking database work off the async runtime, as one
    /// transaction: committed when `f` returns `Ok`, rolled back when it
    /// returns `Err`. The closure runs to its end even if the caller stops
    /// waiting, so a transaction is never left half-written by a cancelled
    /// task. A fault of SQLite's that a wait can outlast (a full disk, a
    /// lock held by another program, an I/O error) is waited out and the
    /// whole transaction run again (see [`faults`]).
    async fn call<R, F>(&self, f: F) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnMut(&mut dyn Sql) -> anyhow::Result<R> + Send + 'static,
    {
        match &self.backend {
            Backend::Sqlite(conn) => {
                let mut f = f;
                let mut attempt = 0u32;
                let mut waiting = None;
                loop {
                    let conn = conn.clone();
                    let (back, r) = tokio::task::spawn_blocking(move || {
                        let r = (|| {
                            let mut c = crate::sync::lock(&conn);
                            let tx = c.transaction()?;
                            let r = f(&mut db::Lite(&tx))?;
                            tx.commit()?;
                            Ok(r)
                        })();
                        (f, r)
                    })
                    .await
                    .context("database task failed")?;
                    f = back;
                    let e = match r {
                        Ok(r) => {
                            if waiting.take().is_some() {
                                self.faults.recovered();
                            }
                            return Ok(r);
                        }
                        Err(e) => e,
                    };
                    let Some(wait) = self.faults.retry(&e, attempt) else {
                        return Err(e);
                    };
                    waiting.get_or_insert_with(|| self.faults.waiting());
                    tokio::time::sleep(wait).await;
                    attempt = attempt.saturating_add(1);
                }
            }
            Backend::Postgres(pool) => {
                let pool = pool.clone();
                let target = self.target.clone();
                let rt = tokio::runtime::Handle::current();
                let mut f = f;
                tokio::task::spawn_blocking(move || {
                    let mut client = rt.block_on(connection(&pool, &target))?;
                    let tx = rt.block_on(client.transaction())?;
                    let r = f(&mut db::Pg { tx: &tx, rt: &rt })?;
                    rt.block_on(tx.commit())?;
                    Ok(r)
                })
                .await
                .context("database task failed")?
            }
        }
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
        self.call(move |c| set_state(c, object, &name, &value))
            .await
    }
}

/// How long a store call waits for a database that cannot be reached.
const PG_OUTAGE_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// A connection from the pool. While the database cannot be reached (down,
/// restarting, the network gone) it tries again with backoff, logging
/// each try, for up to [`PG_OUTAGE_LIMIT`]: the caller (the distributor, a
/// build writing its steps, a poller storing its changes) waits and then
/// goes on, rather than fail with its work half-done. Nothing was sent, so
/// trying again cannot write anything twice. A refusal that waiting will
/// not mend (a wrong password, a database that does not exist) is an error
/// at once.
async fn connection(
    pool: &deadpool_postgres::Pool,
    target: &Target,
) -> anyhow::Result<deadpool_postgres::Object> {
    let started = std::time::Instant::now();
    let mut backoff = std::time::Duration::from_millis(250);
    let mut tries = 0u32;
    loop {
        let e = match pool.get().await {
            Ok(c) => {
                if tries > 0 {
                    tracing::info!(
                        "the database {target} can be reached again (after {:.1} s)",
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(c);
            }
            Err(e) => e,
        };
        let lasting = matches!(
            &e,
            deadpool_postgres::PoolError::Backend(b)
                if b.code().is_some_and(|c| c.code().starts_with("28") || c.code().starts_with("3D"))
        );
        if lasting || started.elapsed() >= PG_OUTAGE_LIMIT {
            return Err(unreachable(target, e));
        }
        tracing::warn!(
            "the database {target} cannot be reached ({e}); trying again in {:.1} s (waiting for {:.0} s so far)",
            backoff.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(backoff).await;
        tries += 1;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
    }
}

/// A connection that could not be made, with the driver's reason.
fn unreachable(target: &Target, e: deadpool_postgres::PoolError) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("cannot reach the database {target}"))
}

pub fn object_id(c: &mut dyn Sql, name: &str, class_name: &str) -> anyhow::Result<ObjectId> {
    let known = c.value_opt(
        "SELECT id FROM objects WHERE name = ?1 AND class_name = ?2",
        args![name, class_name],
    )?;
    if let Some(id) = known {
        return Ok(ObjectId(id));
    }
    c.execute(
        "INSERT INTO objects (name, class_name) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        args![name, class_name],
    )?;
    let id = c.value(
        "SELECT id FROM objects WHERE name = ?1 AND class_name = ?2",
        args![name, class_name],
    )?;
    Ok(ObjectId(id))
}

pub fn get_state(
    c: &mut dyn Sql,
    object: ObjectId,
    name: &str,
) -> anyhow::Result<Option<serde_json::Value>> {
    let text: Option<String> = c.value_opt(
        "SELECT value_json FROM object_state WHERE objectid = ?1 AND name = ?2",
        args![object.0, name],
    )?;
    match text {
        None => Ok(None),
        Some(t) => Ok(Some(serde_json::from_str(&t).with_context(|| {
            format!("stored state `{name}` of object {} is not JSON", object.0)
        })?)),
    }
}

pub(crate) fn set_state(
    c: &mut dyn Sql,
    object: ObjectId,
    name: &str,
    value: &serde_json::Value,
) -> anyhow::Result<()> {
    c.execute(
        "INSERT INTO object_state (objectid, name, value_json) VALUES (?1, ?2, ?3)
         ON CONFLICT (objectid, name) DO UPDATE SET value_json = excluded.value_json",
        args![object.0, name, value.to_string()],
    )?;
    Ok(())
}

/// The properties (name, `[value, source]` as JSON) that `sql` selects for
/// the item `id`; `what` names the item in the error for a malformed one.
pub(crate) fn read_properties(
    c: &mut dyn Sql,
    sql: &str,
    id: i64,
    what: &str,
) -> anyhow::Result<Properties> {
    let mut properties = Properties::new();
    for p in c.query(sql, args![id])? {
        let (name, text): (String, String) = (p.get(0)?, p.get(1)?);
        let value: (serde_json::Value, String) = serde_json::from_str(&text)
            .with_context(|| format!("property `{name}` of {what} {id} is malformed"))?;
        properties.insert(name, value);
    }
    Ok(properties)
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_and_state_round_trip_in_one_transaction() {
        for (store, _db) in crate::store::testing::each_backend().await {
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

    fn pg_target(url: String, password: Option<&str>) -> Target {
        Target::Postgres {
            url,
            password: password.map(String::from),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_to_postgresql_checks_the_servers_certificate_and_name() {
        let server = kiln_testpg::PgServer::start();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        server
            .enable_tls(&cert.cert.pem(), &cert.key_pair.serialize_pem())
            .unwrap();
        server.create_db("kiln");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.cert.pem()).unwrap();
        let url = |host: &str, query: &str| {
            format!(
                "postgresql://{}:{}@{host}:{}/kiln?{query}",
                kiln_testpg::USER,
                kiln_testpg::PASSWORD,
                server.port()
            )
        };

        // Trusting the certificate (a path relative to the master dir),
        // by the name it was made for: connected, over TLS.
        let target = Target::parse(
            dir.path(),
            &url("localhost", "sslmode=verify-full&sslrootcert=ca.pem"),
            None,
        )
        .unwrap();
        let store = Store::connect(&target).await.unwrap();
        store.object_id("x", "HgPoller").await.unwrap();
        let over_tls = server.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'kiln' AND ssl",
        );
        assert_ne!(over_tls.trim(), "0", "kiln's connections use TLS");

        // The public authorities do not know a self-signed certificate, and
        // 127.0.0.1 is not a name it was made for.
        for (host, query, says) in [
            ("localhost", "sslmode=require", "UnknownIssuer"),
            (
                "127.0.0.1",
                "sslmode=require&sslrootcert=ca.pem",
                "not valid for name",
            ),
        ] {
            let target = Target::parse(dir.path(), &url(host, query), None).unwrap();
            let err = format!("{:#}", Store::connect(&target).await.unwrap_err());
            assert!(err.contains(says), "{host} {query}: {err}");
            assert!(!err.contains(kiln_testpg::PASSWORD), "{err}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_postgresql_schema_is_migrated_keeps_its_rows_and_refuses_a_newer_version() {
        let server = kiln_testpg::PgServer::start();
        let target = pg_target(server.create_db("kiln"), None);
        drop(Store::connect_at(&target, 1).await.unwrap());
        assert_eq!(
            server.psql("kiln", "SELECT version FROM kiln_schema"),
            "1\n"
        );
        server.psql(
            "kiln",
            "INSERT INTO objects (name, class_name) VALUES ('p', 'HgPoller')",
        );
        let store = Store::connect(&target).await.unwrap();
        assert_eq!(
            server.psql("kiln", "SELECT version FROM kiln_schema"),
            format!("{SCHEMA_VERSION}\n")
        );
        assert_eq!(
            store.object_id("p", "HgPoller").await.unwrap(),
            ObjectId(1),
            "the row of version 1 is kept"
        );
        // A table of a later migration exists, and one of the identity
        // columns counts on from the row that was there.
        assert_eq!(
            server.psql("kiln", "SELECT count(*) FROM buildrequests"),
            "0\n"
        );
        assert_eq!(store.object_id("q", "HgPoller").await.unwrap(), ObjectId(2));
        drop(store);
        server.psql("kiln", "UPDATE kiln_schema SET version = 99");
        let err = format!("{:#}", Store::connect(&target).await.unwrap_err());
        assert!(err.contains("newer kiln"), "{err}");
        assert!(err.contains("schema version 99"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_password_or_a_stopped_server_is_a_clear_error_that_hides_the_password() {
        let server = kiln_testpg::PgServer::start();
        server.create_db("kiln");
        let url = server.url_without_password("kiln");
        let err = Store::connect(&pg_target(url.clone(), Some("not-the-password")))
            .await
            .unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("password authentication failed"), "{err}");
        assert!(err.contains(&url), "the database is named: {err}");
        assert!(!err.contains("not-the-password"), "{err}");
        // The password given apart from the URL, as `secret(...)` gives it.
        let store = Store::connect(&pg_target(url.clone(), Some(kiln_testpg::PASSWORD)))
            .await
            .unwrap();
        assert_eq!(store.max_changeid().await.unwrap(), 0);
        drop(store);
        let with_password = server.url("kiln");
        let port = server.port();
        drop(server);
        let err = Store::connect(&pg_target(with_password, None))
            .await
            .unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains(&format!(
                "cannot reach the database postgresql://kiln:***@127.0.0.1:{port}/kiln"
            )),
            "{err}"
        );
        assert!(!err.contains(kiln_testpg::PASSWORD), "{err}");
    }

    #[test]
    fn a_database_url_is_sqlite_or_postgresql_and_its_password_is_never_shown() {
        let dir = Path::new("/m");
        assert_eq!(
            Target::parse(dir, "sqlite:///state.sqlite", None).unwrap(),
            Target::Sqlite("/m/state.sqlite".into())
        );
        assert_eq!(
            Target::parse(dir, "sqlite:////var/kiln.sqlite", None).unwrap(),
            Target::Sqlite("/var/kiln.sqlite".into())
        );
        for url in ["postgresql://k:pw@db:5433/kiln", "postgres://k:pw@db/kiln"] {
            let t = Target::parse(dir, url, None).unwrap();
            assert!(!t.to_string().contains("pw"), "{t}");
            assert!(t.to_string().contains("k:***@db"), "{t}");
        }
        let err = Target::parse(dir, "mysql://u:secretpw@h/db", None).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("not supported"), "{err}");
        assert!(!err.contains("secretpw"), "{err}");
        assert_eq!(redact_url("postgresql://u@h/db"), "postgresql://u@h/db");
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

/// Stores for tests: the same test runs against each backend.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Store, Target, DB_FILE};

    /// What keeps a test store's database alive.
    pub enum Backing {
        Sqlite(#[allow(dead_code)] tempfile::TempDir),
        Postgres(#[allow(dead_code)] kiln_testpg::PgServer),
    }

    /// An empty store of each backend: SQLite in a temp dir, then
    /// PostgreSQL on a server of its own. Each says which it is on stderr,
    /// so that a failing test's output names the backend.
    pub async fn each_backend() -> impl Iterator<Item = (Store, Backing)> {
        let dir = tempfile::tempdir().expect("tmp");
        let sqlite = Store::open(&dir.path().join(DB_FILE)).expect("SQLite store");
        let server = kiln_testpg::PgServer::start();
        let url = server.create_db("kiln");
        let pg = Store::connect(&Target::Postgres {
            url,
            password: None,
        })
        .await
        .expect("PostgreSQL store");
        [
            (sqlite, Backing::Sqlite(dir)),
            (pg, Backing::Postgres(server)),
        ]
        .into_iter()
        .inspect(|(s, _)| eprintln!("backend: {}", s.dialect()))
    }
}
