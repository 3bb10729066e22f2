//! The schema's versions: each step of `migrations/000N_*.sql` brings a
//! database from version N-1 to N. SQLite keeps the version in its
//! `user_version` and runs each step in a transaction of its own;
//! PostgreSQL keeps it in the table `kiln_schema` and runs the steps, read
//! into its types by [`postgres_ddl`], in one transaction under an
//! advisory lock. A database newer than this kiln is refused.

use std::path::Path;

use anyhow::{bail, Context};
use rusqlite::{Connection, OptionalExtension};

use super::db::{args, Sql};

/// Schema steps, oldest first; see the module docs.
pub(super) const MIGRATIONS: &[(&str, &str)] = &[
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
    ("leases", include_str!("migrations/0006_leases.sql")),
    (
        "builder masters",
        include_str!("migrations/0007_builder_masters.sql"),
    ),
    (
        "buildsets by scheduler",
        include_str!("migrations/0008_buildsets_scheduler.sql"),
    ),
    (
        "lock holders",
        include_str!("migrations/0009_lock_holders.sql"),
    ),
];

/// The schema version this kiln writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Brings the schema to `target`, one migration per transaction.
pub(super) fn migrate(conn: &mut Connection, target: usize) -> anyhow::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    refuse_newer(version)?;
    if version == 0 {
        // A file with tables but no kiln schema version is another
        // program's: writing kiln's tables into it would mix the two.
        let theirs: Option<String> = conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(table) = theirs {
            bail!(
                "it holds tables of another program (`{table}`, ...) and no kiln schema version: kiln will not write into it; \
                 give `db.db_url` a file of its own, or move this one aside"
            );
        }
    }
    for (i, (what, sql)) in MIGRATIONS.iter().enumerate().take(target).skip(version) {
        let tx = conn.transaction()?;
        // SQLite's message ends with the whole script: its first line says it.
        tx.execute_batch(sql).map_err(|e| {
            let msg = e.to_string();
            anyhow::anyhow!(
                "migration {} ({what}) failed: {}",
                i + 1,
                msg.lines().next().unwrap_or_default()
            )
        })?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!("database schema migrated to version {} ({what})", i + 1);
    }
    Ok(())
}

fn refuse_newer(version: usize) -> anyhow::Result<()> {
    if version > SCHEMA_VERSION {
        bail!(
            "it was written by a newer kiln (schema version {version}; this kiln knows versions up to {SCHEMA_VERSION}): \
             run that kiln, or move the database aside to start with an empty one"
        );
    }
    Ok(())
}

/// An arbitrary number that names kiln's migration lock among PostgreSQL's
/// advisory locks: masters that start together migrate one after another.
const PG_MIGRATION_LOCK: i64 = 0x6b696c6e;

/// Brings a PostgreSQL schema to `target`, in the caller's transaction
/// (PostgreSQL's DDL is transactional: all of it happens or none).
pub(super) fn migrate_pg(c: &mut dyn Sql, target: usize) -> anyhow::Result<()> {
    c.execute("SELECT pg_advisory_xact_lock(?1)", args![PG_MIGRATION_LOCK])?;
    if c.value::<Option<String>>("SELECT CAST(to_regclass('kiln_schema') AS TEXT)", args![])?
        .is_none()
    {
        c.batch("CREATE TABLE kiln_schema (version BIGINT NOT NULL)")?;
    }
    let version = match c.value_opt::<i64>("SELECT version FROM kiln_schema", args![])? {
        Some(v) => v,
        None => {
            c.execute("INSERT INTO kiln_schema (version) VALUES (0)", args![])?;
            0
        }
    };
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    refuse_newer(version)?;
    for (i, (what, sql)) in MIGRATIONS.iter().enumerate().take(target).skip(version) {
        c.batch(&postgres_ddl(sql))
            .with_context(|| format!("migration {} ({what}) failed", i + 1))?;
        c.execute("UPDATE kiln_schema SET version = ?1", args![i + 1])?;
        tracing::info!("database schema migrated to version {} ({what})", i + 1);
    }
    Ok(())
}

/// A migration's SQLite DDL in PostgreSQL's types: a row id column
/// (`x INTEGER PRIMARY KEY,`) becomes an identity column, `INTEGER`
/// becomes `BIGINT` (the store reads every integer as 64 bits), `BLOB`
/// `BYTEA` and `REAL` `DOUBLE PRECISION`. The migrations use nothing else
/// that the two read differently.
fn postgres_ddl(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 256);
    for line in sql.lines() {
        let line = match line.strip_suffix(" INTEGER PRIMARY KEY,") {
            Some(column) => {
                format!("{column} BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,")
            }
            None => line
                .replace("INTEGER", "BIGINT")
                .replace("BLOB", "BYTEA")
                .replace(" REAL ", " DOUBLE PRECISION "),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Opens `path` at an older schema version (for tests of migration).
#[doc(hidden)]
pub fn create_at_version(path: &Path, version: usize) -> anyhow::Result<Connection> {
    let mut conn = Connection::open(path)?;
    migrate(&mut conn, version)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_read_in_postgresql_types() {
        let ddl = postgres_ddl(
            "CREATE TABLE t (\n    id INTEGER PRIMARY KEY,\n    brid INTEGER PRIMARY KEY REFERENCES x(id),\n    \
             n INTEGER NOT NULL,\n    b BLOB NOT NULL,\n    d REAL NOT NULL\n);",
        );
        assert_eq!(
            ddl,
            "CREATE TABLE t (\n    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,\n    \
             brid BIGINT PRIMARY KEY REFERENCES x(id),\n    n BIGINT NOT NULL,\n    b BYTEA NOT NULL,\n    \
             d DOUBLE PRECISION NOT NULL\n);\n"
        );
    }
}
