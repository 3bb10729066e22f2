//! Keeping the database small: deleting old logs (the janitor's
//! `logHorizon`), compressing chunks stored raw or with another method
//! (`kiln cleanupdb`), and giving freed space back to the file system.
//!
//! Every pass works in batches, each its own short transaction, so that a
//! master's other store calls (dispatch, log appends) run between them.

use anyhow::Context;

use super::db::{args, Sql, Value};
use super::{logcodec, Backend, Store};

/// The `logs.type` of a log whose chunks were deleted (Buildbot's `d`).
pub const DELETED: &str = "d";

/// What a pruning pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Logs emptied and marked deleted.
    pub logs: u64,
    /// Chunks deleted.
    pub chunks: u64,
    /// Stored bytes of those chunks.
    pub bytes: u64,
}

impl std::ops::AddAssign for Pruned {
    fn add_assign(&mut self, o: Pruned) {
        self.logs += o.logs;
        self.chunks += o.chunks;
        self.bytes += o.bytes;
    }
}

/// What a compression pass changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recompressed {
    /// Chunks rewritten with the method asked for.
    pub chunks: u64,
    /// Their stored size before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// `?1, ?2, ...` for `n` arguments.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// Deletes the chunks of at most `batch` logs of builds that completed
    /// at or before `before` (Unix seconds) and marks those logs deleted; their
    /// rows stay, so builds and steps still list them. Call it until it
    /// deletes no log.
    pub async fn prune_logs(&self, before: i64, batch: u32) -> anyhow::Result<Pruned> {
        self.call(move |c| prune_logs(c, before, batch)).await
    }

    /// Rewrites at most `batch` chunks not stored with method `code` (a
    /// `logcodec` code) in that method; a chunk it would not shrink is
    /// stored raw. Returns what changed and the id of the last log looked
    /// at, from which the next batch goes on (`after`); none when done.
    pub async fn recompress_logs(
        &self,
        code: i64,
        after: (i64, i64),
        batch: u32,
    ) -> anyhow::Result<(Recompressed, Option<(i64, i64)>)> {
        self.call(move |c| recompress_logs(c, code, after, batch))
            .await
    }

    /// Gives free pages back to the file system, at most `pages` of them
    /// (SQLite created with incremental auto-vacuum; elsewhere the space
    /// is reused by new rows and this does nothing). Returns the pages
    /// freed.
    pub async fn reclaim_some(&self, pages: u32) -> anyhow::Result<u64> {
        let Backend::Sqlite(conn) = &self.backend else {
            return Ok(0);
        };
        let conn = conn.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let c = crate::sync::lock(&conn);
            let mode: i64 = c.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
            if mode != 2 {
                return Ok(0);
            }
            let before: i64 = c.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
            // The pragma gives one page back per step (a row each):
            // step it to its end.
            let mut stmt = c.prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
            drop(rows);
            drop(stmt);
            let after: i64 = c.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
            Ok(before.saturating_sub(after).max(0) as u64)
        })
        .await
        .context("database task failed")?
    }

    /// Rewrites the whole database without its free space (SQLite's
    /// `VACUUM`, which also turns incremental auto-vacuum on for the
    /// janitor's later passes; PostgreSQL's plain `VACUUM`, which makes the
    /// space reusable without locking the tables). For `kiln cleanupdb`:
    /// SQLite's holds the database for as long as it takes.
    pub async fn vacuum(&self) -> anyhow::Result<()> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                let conn = conn.clone();
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    let c = crate::sync::lock(&conn);
                    c.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
                        .context("VACUUM failed")
                })
                .await
                .context("database task failed")?
            }
            Backend::Postgres(pool) => {
                let client = super::connection(pool, &self.target).await?;
                client
                    .batch_execute("VACUUM (ANALYZE) logchunks, logs")
                    .await
                    .context("VACUUM failed")
            }
        }
    }

    /// The database's size in bytes: the SQLite file with its WAL, or
    /// PostgreSQL's `pg_database_size`.
    pub async fn size_on_disk(&self) -> anyhow::Result<u64> {
        match &*self.target {
            super::Target::Sqlite(path) => {
                // What is in the WAL belongs to the database until it is
                // checkpointed.
                let mut wal = path.as_os_str().to_owned();
                wal.push("-wal");
                let file = std::fs::metadata(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .len();
                Ok(file + std::fs::metadata(&wal).map_or(0, |m| m.len()))
            }
            super::Target::Postgres { .. } => {
                let n: i64 = self
                    .call(|c| c.value("SELECT pg_database_size(current_database())", &[]))
                    .await?;
                Ok(n.max(0) as u64)
            }
        }
    }

    /// Writes the WAL back into the SQLite file and truncates it, so that
    /// [`Store::size_on_disk`] tells what the data takes.
    pub async fn checkpoint(&self) -> anyhow::Result<()> {
        let Backend::Sqlite(conn) = &self.backend else {
            return Ok(());
        };
        let conn = conn.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let c = crate::sync::lock(&conn);
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            Ok(())
        })
        .await
        .context("database task failed")?
    }
}

fn prune_logs(c: &mut dyn Sql, before: i64, batch: u32) -> anyhow::Result<Pruned> {
    let ids: Vec<i64> = c.column(
        "SELECT l.id FROM logs l
         JOIN steps s ON s.id = l.stepid
         JOIN builds b ON b.id = s.buildid
         WHERE b.complete_at IS NOT NULL AND b.complete_at <= ?1 AND l.type <> 'd'
         ORDER BY l.id LIMIT ?2",
        args![before, i64::from(batch)],
    )?;
    if ids.is_empty() {
        return Ok(Pruned::default());
    }
    let list = placeholders(ids.len());
    let ids: Vec<Value> = ids.into_iter().map(Value::from).collect();
    let row = c.query_one(
        &format!(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(content)), 0) FROM logchunks WHERE logid IN ({list})"
        ),
        &ids,
    )?;
    let (chunks, bytes): (i64, i64) = (row.get(0)?, row.get(1)?);
    c.execute(
        &format!("DELETE FROM logchunks WHERE logid IN ({list})"),
        &ids,
    )?;
    let logs = c.execute(
        &format!("UPDATE logs SET type = 'd' WHERE id IN ({list})"),
        &ids,
    )?;
    Ok(Pruned {
        logs,
        chunks: chunks.max(0) as u64,
        bytes: bytes.max(0) as u64,
    })
}

fn recompress_logs(
    c: &mut dyn Sql,
    code: i64,
    after: (i64, i64),
    batch: u32,
) -> anyhow::Result<(Recompressed, Option<(i64, i64)>)> {
    // In key order, so that a chunk kept raw (it would not shrink) is not
    // looked at again.
    let rows = c.query(
        "SELECT logid, first_line, compressed, content FROM logchunks
         WHERE (logid > ?1 OR (logid = ?1 AND first_line > ?2))
         ORDER BY logid, first_line LIMIT ?3",
        args![after.0, after.1, i64::from(batch)],
    )?;
    let mut done = Recompressed::default();
    let mut last = None;
    for r in &rows {
        let (logid, first, old): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        last = Some((logid, first));
        if old == code {
            continue;
        }
        let bytes: Vec<u8> = r.get(3)?;
        // A chunk that does not decompress is left as it is: it reads as
        // damaged, and rewriting it would lose what is left of it.
        let Ok(text) = logcodec::decompress(old, &bytes) else {
            continue;
        };
        let (new_code, new_bytes) = logcodec::compress(code, &text);
        if new_code == old || new_bytes.len() >= bytes.len() {
            continue;
        }
        c.execute(
            "UPDATE logchunks SET compressed = ?3, content = ?4 WHERE logid = ?1 AND first_line = ?2",
            args![logid, first, new_code, new_bytes.clone()],
        )?;
        done.chunks += 1;
        done.bytes_before += bytes.len() as u64;
        done.bytes_after += new_bytes.len() as u64;
    }
    Ok((done, last))
}

#[cfg(test)]
mod tests {
    use crate::store::builds::Claimed;
    use crate::store::buildsets::{NewBuildset, Source, SourceStamp};
    use crate::store::logcodec;
    use crate::store::Store;

    /// A build of `b` with one step whose stdio log holds `lines` lines
    /// (stored raw); finished FAILURE when `finish`. Its build and log ids.
    async fn build_with_log(store: &Store, master: i64, lines: usize, finish: bool) -> (i64, i64) {
        let bs = store
            .add_buildset(NewBuildset {
                scheduler: "s".into(),
                reason: "test".into(),
                external_idstring: None,
                source: Source::New(vec![SourceStamp::default()]),
                properties: Default::default(),
                builders: vec!["b".into()],
                priority: 0,
                parent_buildid: None,
            })
            .await
            .expect("buildset");
        let req = bs.brids[0].clone();
        assert!(store.claim_request(req.brid, master).await.expect("claim"));
        let (buildid, _) = store
            .new_build(req.builderid, req.brid, None, master, Default::default())
            .await
            .expect("build");
        let stepid = store.new_step(buildid, 0, "compile").await.expect("step");
        let logid = store.new_log(stepid, "stdio", "s").await.expect("log");
        store.set_log_compression(logcodec::RAW);
        let text: Vec<String> = (0..lines)
            .map(|i| format!("ocompiling dom/file{i}.cpp"))
            .collect();
        for chunk in text.chunks(100) {
            store
                .append_log(logid, chunk.to_vec())
                .await
                .expect("append");
        }
        store.finish_log(logid).await.expect("finish log");
        if finish {
            store.finish_step(stepid, 2, "failed").await.expect("step");
            store
                .finish_build(buildid, 2, "failed", Claimed::Complete(vec![req.brid]))
                .await
                .expect("finish");
        }
        (buildid, logid)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn freed_pages_go_back_to_the_file_system_as_many_as_asked_per_call() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = Store::open(&tmp.path().join("state.sqlite")).expect("open");
        let master = store.master_started("m").await.expect("master");
        for _ in 0..4 {
            build_with_log(&store, master, 3000, true).await;
        }
        store
            .prune_logs(crate::store::now() + 10, 100)
            .await
            .expect("prune");
        let free = || {
            store
                .with_sqlite(|c| {
                    c.pragma_query_value(None, "freelist_count", |r| r.get::<_, i64>(0))
                })
                .expect("sqlite")
                .expect("freelist")
        };
        let before = free();
        assert!(before > 40, "{before} free pages after the prune");
        assert_eq!(store.reclaim_some(20).await.expect("reclaim"), 20);
        assert_eq!(free(), before - 20);
        let mut rest = 0;
        for _ in 0..100 {
            let n = store.reclaim_some(2048).await.expect("reclaim");
            if n == 0 {
                break;
            }
            rest += n;
        }
        assert_eq!((rest, free()), ((before - 20) as u64, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_logs_are_pruned_in_batches_and_read_as_deleted_and_others_are_compressed() {
        for (store, _db) in crate::store::testing::each_backend().await {
            let master = store.master_started("m").await.expect("master");
            let (old_a, log_a) = build_with_log(&store, master, 300, true).await;
            let (_, log_b) = build_with_log(&store, master, 300, true).await;
            let (_, running) = build_with_log(&store, master, 500, false).await;
            let before = crate::store::now() + 10;

            // One log per batch: two batches, then nothing is left to do;
            // the running build's log is kept.
            let first = store.prune_logs(before, 1).await.expect("prune");
            assert_eq!((first.logs, first.chunks), (1, 3));
            assert!(first.bytes > 300 * 20, "{first:?}");
            let second = store.prune_logs(before, 1).await.expect("prune");
            assert_eq!((second.logs, second.chunks), (1, 3));
            assert_eq!(store.prune_logs(before, 1).await.expect("prune").logs, 0);

            for logid in [log_a, log_b] {
                assert_eq!(store.log_text(logid).await.expect("text"), "");
            }
            let failure = store
                .failure_summary(old_a, 30)
                .await
                .expect("summary")
                .expect("a failed step");
            assert!(failure.deleted && failure.lines.is_empty(), "{failure:?}");
            let kinds: Vec<String> = store
                .call(move |c| c.column("SELECT type FROM logs ORDER BY id", &[]))
                .await
                .expect("types");
            assert_eq!(kinds, ["d", "d", "s"]);

            // The kept log is rewritten with zstd, a batch of 2 chunks at a
            // time, and reads the same.
            let text = store.log_text(running).await.expect("text");
            let mut after = (i64::MIN, i64::MIN);
            let mut total = super::Recompressed::default();
            let mut batches = 0;
            while let (r, Some(last)) = store
                .recompress_logs(logcodec::ZSTD, after, 2)
                .await
                .expect("recompress")
            {
                (total.chunks, total.bytes_before, total.bytes_after) = (
                    total.chunks + r.chunks,
                    total.bytes_before + r.bytes_before,
                    total.bytes_after + r.bytes_after,
                );
                after = last;
                batches += 1;
                assert!(batches < 10, "recompression does not end");
            }
            assert_eq!(total.chunks, 5, "{total:?}");
            assert!(total.bytes_after * 4 < total.bytes_before, "{total:?}");
            assert_eq!(store.log_text(running).await.expect("text"), text);
            let codes: Vec<i64> = store
                .call(|c| c.column("SELECT DISTINCT compressed FROM logchunks", &[]))
                .await
                .expect("codes");
            assert_eq!(codes, [logcodec::ZSTD]);
        }
    }
}
