//! Faults of the database while the master runs: a write it cannot take
//! now (a full disk, SQLite's `SQLITE_FULL`; the database locked by another
//! program past the busy timeout; an I/O error) is not an answer. The
//! transaction was rolled back whole, so the store is as it was; the call
//! waits and is tried again, whole, until it succeeds. What waits on the
//! store (a poller, the dispatcher, a build writing its log) pauses with
//! it, and goes on where it was when the fault clears: nothing is lost and
//! nothing is written twice.
//!
//! The fault is logged when it starts, once a minute while it lasts and
//! when it clears; `/metrics` counts the failed tries by kind and shows how
//! many calls wait now; `/health` says `failing`. Once the master stops,
//! a fault is returned instead of waited on (a restart recovers: pollers
//! fetch again from their stored position, unfinished builds are retried).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The kinds of fault a call waits out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No space for the database (`SQLITE_FULL`).
    Full,
    /// Another program holds the database's lock (`SQLITE_BUSY`,
    /// `SQLITE_LOCKED`) for longer than the busy timeout.
    Locked,
    /// The file system failed a read or write (`SQLITE_IOERR`).
    Io,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Full => "full",
            Kind::Locked => "locked",
            Kind::Io => "io",
        }
    }

    /// The fault an error is, if it is one a retry can outlast.
    pub fn of(e: &anyhow::Error) -> Option<Kind> {
        use rusqlite::ErrorCode as C;
        e.chain()
            .filter_map(|c| c.downcast_ref::<rusqlite::Error>())
            .find_map(|e| match e.sqlite_error_code()? {
                C::DiskFull => Some(Kind::Full),
                C::DatabaseBusy | C::DatabaseLocked => Some(Kind::Locked),
                C::SystemIoFailure => Some(Kind::Io),
                _ => None,
            })
    }
}

/// How the store's writes go, shared by every clone of the store.
#[derive(Debug, Default)]
pub struct Faults {
    full: AtomicU64,
    locked: AtomicU64,
    io: AtomicU64,
    waiting: AtomicU64,
    closing: AtomicBool,
    /// Whether `episode` is set (read on every call: no lock then).
    failing: AtomicBool,
    episode: Mutex<Option<Episode>>,
}

#[derive(Debug)]
struct Episode {
    since: Instant,
    said: Instant,
    last_error: String,
    retries: u64,
}

/// What `/metrics` and `/health` show.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Snapshot {
    /// Failed tries, by kind.
    pub full: u64,
    pub locked: u64,
    pub io: u64,
    /// Calls waiting for the database now.
    pub waiting: u64,
    /// Seconds since the fault began, while it lasts.
    pub failing_for_s: Option<u64>,
    pub last_error: Option<String>,
}

/// The first wait after a failed try; it doubles up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(250);
const MAX_WAIT: Duration = Duration::from_secs(5);
/// How often a lasting fault is said again.
const REMIND: Duration = Duration::from_secs(60);

impl Faults {
    pub fn snapshot(&self) -> Snapshot {
        let episode = crate::sync::lock(&self.episode);
        Snapshot {
            full: self.full.load(Relaxed),
            locked: self.locked.load(Relaxed),
            io: self.io.load(Relaxed),
            waiting: self.waiting.load(Relaxed),
            failing_for_s: episode.as_ref().map(|e| e.since.elapsed().as_secs()),
            last_error: episode.as_ref().map(|e| e.last_error.clone()),
        }
    }

    /// From now on a fault is returned, not waited on (the master stops).
    pub fn close(&self) {
        self.closing.store(true, Relaxed);
    }

    /// Whether a call that failed with `e` on its `attempt`th try (from 0)
    /// should wait and try again; if so, how long, and it is counted and
    /// said.
    pub(super) fn retry(&self, e: &anyhow::Error, attempt: u32) -> Option<Duration> {
        let kind = Kind::of(e)?;
        if self.closing.load(Relaxed) {
            return None;
        }
        match kind {
            Kind::Full => &self.full,
            Kind::Locked => &self.locked,
            Kind::Io => &self.io,
        }
        .fetch_add(1, Relaxed);
        let what = format!("{e:#}");
        let mut episode = crate::sync::lock(&self.episode);
        match episode.as_mut() {
            None => {
                tracing::error!(
                    "the database cannot take a write ({}): {what}; what waits on it pauses, and the write is tried again until it succeeds",
                    kind.name()
                );
                self.failing.store(true, Relaxed);
                *episode = Some(Episode {
                    since: Instant::now(),
                    said: Instant::now(),
                    last_error: what,
                    retries: 1,
                });
            }
            Some(ep) => {
                ep.retries += 1;
                if ep.said.elapsed() >= REMIND {
                    tracing::error!(
                        "the database has failed writes for {} s ({} tries; {} call(s) waiting): {what}",
                        ep.since.elapsed().as_secs(),
                        ep.retries,
                        self.waiting.load(Relaxed)
                    );
                    ep.said = Instant::now();
                }
                ep.last_error = what;
            }
        }
        Some(FIRST_WAIT.saturating_mul(1 << attempt.min(5)).min(MAX_WAIT))
    }

    /// A call that had waited succeeded: once none waits, the fault is
    /// over. (Other calls may succeed while it lasts: reads, and writes
    /// that fit in the pages the database already has.)
    pub(super) fn recovered(&self) {
        if self.waiting.load(Relaxed) > 0 || !self.failing.load(Relaxed) {
            return;
        }
        self.failing.store(false, Relaxed);
        let mut episode = crate::sync::lock(&self.episode);
        if let Some(ep) = episode.take() {
            tracing::info!(
                "the database takes writes again, after {} s ({} tries failed)",
                ep.since.elapsed().as_secs(),
                ep.retries
            );
        }
    }

    pub(super) fn waiting(&self) -> WaitingGuard<'_> {
        self.waiting.fetch_add(1, Relaxed);
        WaitingGuard(self)
    }
}

/// One call counted as waiting while it lives.
pub(super) struct WaitingGuard<'a>(&'a Faults);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// Waits (at most 10 s) until `f` holds.
    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not within 10 s: {what}");
    }

    /// A store in `dir` that may grow no page more than it has: the next
    /// write that needs one is refused with SQLITE_FULL. And an object.
    async fn full_store(dir: &std::path::Path) -> (Store, crate::store::ObjectId) {
        let store = Store::open(&dir.join("state.sqlite")).expect("open");
        let obj = store.object_id("poller", "HgPoller").await.expect("object");
        store
            .with_sqlite(|c| {
                let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
                c.pragma_update(None, "max_page_count", pages)
            })
            .expect("sqlite")
            .expect("max_page_count");
        (store, obj)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_database_holds_a_write_until_there_is_room_and_then_writes_it_once() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (store, obj) = full_store(tmp.path()).await;
        let big = serde_json::json!("x".repeat(200_000));
        let writer = {
            let (store, big) = (store.clone(), big.clone());
            tokio::spawn(async move { store.set_state(obj, "seen", big).await })
        };
        until("the write waiting on a full database", || {
            let s = store.faults().snapshot();
            s.full >= 2 && s.waiting == 1 && s.failing_for_s.is_some()
        })
        .await;
        let s = store.faults().snapshot();
        assert!(
            s.last_error.as_deref().unwrap_or("").contains("full"),
            "{s:?}"
        );
        // Reads go on meanwhile.
        assert_eq!(store.get_state(obj, "seen").await.expect("read"), None);

        store
            .with_sqlite(|c| c.pragma_update(None, "max_page_count", 1_000_000))
            .expect("sqlite")
            .expect("room");
        writer
            .await
            .expect("task")
            .expect("the write, once there is room");
        assert_eq!(store.get_state(obj, "seen").await.expect("read"), Some(big));
        let s = store.faults().snapshot();
        assert_eq!((s.waiting, s.failing_for_s), (0, None), "{s:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_locked_by_another_program_holds_a_write_until_it_lets_go() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("state.sqlite");
        let store = Store::open(&path).expect("open");
        let obj = store.object_id("poller", "HgPoller").await.expect("object");
        store
            .with_sqlite(|c| c.busy_timeout(Duration::from_millis(20)))
            .expect("sqlite")
            .expect("busy timeout");
        let other = rusqlite::Connection::open(&path).expect("other");
        other.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let writer = {
            let store = store.clone();
            tokio::spawn(async move { store.set_state(obj, "seen", serde_json::json!(7)).await })
        };
        until("the write waiting on the lock", || {
            let s = store.faults().snapshot();
            s.locked >= 1 && s.waiting == 1
        })
        .await;
        other.execute_batch("ROLLBACK").expect("unlock");
        writer
            .await
            .expect("task")
            .expect("the write, once the lock is gone");
        assert_eq!(
            store.get_state(obj, "seen").await.expect("read"),
            Some(serde_json::json!(7))
        );
        assert_eq!(store.faults().snapshot().failing_for_s, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn once_the_master_stops_a_fault_is_returned_not_waited_on() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (store, obj) = full_store(tmp.path()).await;
        store.faults().close();
        let e = store
            .set_state(obj, "seen", serde_json::json!("x".repeat(200_000)))
            .await
            .expect_err("full");
        assert_eq!(Kind::of(&e), Some(Kind::Full), "{e:#}");
    }

    #[test]
    fn other_errors_are_not_faults_to_wait_out() {
        let e = anyhow::Error::from(rusqlite::Error::QueryReturnedNoRows);
        assert_eq!(Kind::of(&e), None);
        let e = anyhow::anyhow!("malformed property");
        assert_eq!(Kind::of(&e), None);
        let faults = Faults::default();
        assert_eq!(faults.retry(&e, 0), None);
    }
}
