//! The janitor (`configurators: [JanitorConfigurator(...)]`): at the times
//! its cron fields match, the logs of builds that ended more than
//! `logHorizon` ago are deleted, a batch per transaction so that dispatch
//! and running builds go on between batches, and the space is given back
//! to the file system. `kiln cleanupdb` runs the same pass at once.

use std::time::Duration;

use chrono::{Local, TimeZone};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Janitor;
use crate::store::janitor::Pruned;
use crate::store::Store;

/// Logs per transaction.
const BATCH: u32 = 200;
/// Free pages handed back to the file system per transaction.
const RECLAIM_PAGES: u32 = 2048;

/// What one pass of the janitor did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Swept {
    pub pruned: Pruned,
    /// Pages of the SQLite file given back to the file system.
    pub pages_reclaimed: u64,
    /// The longest of its transactions: the longest any other write of
    /// the master (a claim, a log chunk) waited behind it.
    pub longest: Duration,
}

/// Deletes the logs of builds that ended at or before `before` (Unix seconds),
/// in batches, then gives the freed pages back to the file system.
pub async fn sweep(store: &Store, before: i64) -> anyhow::Result<Swept> {
    let mut swept = Swept::default();
    loop {
        let started = std::time::Instant::now();
        let p = store.prune_logs(before, BATCH).await?;
        tracing::debug!(
            logs = p.logs,
            chunks = p.chunks,
            ms = started.elapsed().as_millis() as u64,
            "janitor: pruned a batch"
        );
        swept.longest = swept.longest.max(started.elapsed());
        if p.logs == 0 {
            break;
        }
        swept.pruned += p;
        // Let the master's other store calls in between batches.
        tokio::task::yield_now().await;
    }
    loop {
        let started = std::time::Instant::now();
        let pages = store.reclaim_some(RECLAIM_PAGES).await?;
        tracing::debug!(
            pages,
            ms = started.elapsed().as_millis() as u64,
            "janitor: gave pages back"
        );
        swept.longest = swept.longest.max(started.elapsed());
        if pages == 0 {
            break;
        }
        swept.pages_reclaimed += pages;
        tokio::task::yield_now().await;
    }
    Ok(swept)
}

/// Runs the janitor the config names at its times until `cancel`; a
/// reload sends the new config's janitor (or none) on `config`.
pub async fn run(
    store: Store,
    mut config: watch::Receiver<Option<Janitor>>,
    cancel: CancellationToken,
) {
    loop {
        let janitor = config.borrow_and_update().clone();
        let next = janitor
            .as_ref()
            .and_then(|j| j.when.next_after(&Local::now()));
        let wait = async {
            match next {
                // Never more than an hour at a time: a clock changed under
                // the master (suspend, NTP) is seen within the hour.
                Some(t) => {
                    let left = (t - Local::now()).to_std().unwrap_or(Duration::ZERO);
                    tokio::time::sleep(left.min(Duration::from_secs(3600))).await;
                    Local::now() >= t
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            due = wait => {
                let (true, Some(j)) = (due, janitor) else { continue };
                let before = crate::store::now() - i64::try_from(j.log_horizon).unwrap_or(i64::MAX);
                let started = std::time::Instant::now();
                let when = Local
                    .timestamp_opt(before, 0)
                    .single()
                    .map_or_else(|| before.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string());
                match sweep(&store, before).await {
                    Ok(s) => tracing::info!(
                        "janitor: deleted the logs of builds that ended before {when}: {} logs, {} chunks, {:.1} MB stored; {} pages given back to the file system ({:.1} s; its longest transaction {} ms)",
                        s.pruned.logs,
                        s.pruned.chunks,
                        s.pruned.bytes as f64 / 1e6,
                        s.pages_reclaimed,
                        started.elapsed().as_secs_f64(),
                        s.longest.as_millis()
                    ),
                    // The store already retried; the next time comes round.
                    Err(e) => tracing::error!("janitor: {e:#}; it tries again at its next time"),
                }
            }
            r = config.changed() => if r.is_err() { return },
            _ = cancel.cancelled() => return,
        }
    }
}

/// What `kiln cleanupdb` did.
#[derive(Clone, Debug, Default)]
pub struct Cleaned {
    /// The horizon logs were pruned by, if any.
    pub log_horizon: Option<u64>,
    pub swept: Swept,
    pub recompressed: crate::store::janitor::Recompressed,
    /// The database's size before and after.
    pub size_before: u64,
    pub size_after: u64,
}

/// Chunks per transaction when compressing.
const RECOMPRESS_BATCH: u32 = 500;

/// `kiln cleanupdb`: deletes the logs older than `log_horizon` (the
/// janitor's unless given), compresses every chunk with the config's
/// `logCompressionMethod`, and rewrites the database without its free
/// space. A master running on an SQLite database is refused: the rewrite
/// would hold its database for as long as it takes.
pub fn cleanupdb(
    dir: &std::path::Path,
    config: &crate::config::MasterConfig,
    log_horizon: Option<u64>,
) -> anyhow::Result<Cleaned> {
    use anyhow::{bail, Context};
    let target = super::db_target(dir, &config.db)?;
    if let (crate::store::Target::Sqlite(_), Some(info)) =
        (&target, super::pidfile::PidInfo::read(dir))
    {
        if info.is_running() {
            bail!(
                "a master is running in {} (pid {}): stop it first (`kiln stop {}`); cleanupdb rewrites its SQLite database",
                dir.display(),
                info.pid,
                dir.display()
            );
        }
    }
    let log_horizon = log_horizon.or(config.janitor.as_ref().map(|j| j.log_horizon));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let store = Store::connect(&target).await?;
        store.checkpoint().await?;
        let mut done = Cleaned {
            log_horizon,
            size_before: store.size_on_disk().await?,
            ..Cleaned::default()
        };
        if let Some(h) = log_horizon {
            let before = crate::store::now() - i64::try_from(h).unwrap_or(i64::MAX);
            done.swept = sweep(&store, before).await?;
        }
        let code = config.log_compression.code();
        let mut after = (i64::MIN, i64::MIN);
        loop {
            let (r, last) = store.recompress_logs(code, after, RECOMPRESS_BATCH).await?;
            done.recompressed.chunks += r.chunks;
            done.recompressed.bytes_before += r.bytes_before;
            done.recompressed.bytes_after += r.bytes_after;
            match last {
                Some(l) => after = l,
                None => break,
            }
        }
        store.vacuum().await?;
        store.checkpoint().await?;
        done.size_after = store.size_on_disk().await?;
        Ok(done)
    })
}
