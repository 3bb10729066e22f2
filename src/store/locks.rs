//! MasterLocks as the masters of one database share them: taken with the
//! claim of the request whose build needs them (`lock_holders`), given
//! back when that build ends, dropped with a master that restarts or is
//! declared dead.

use super::db::{args, Dialect, Sql};
use super::Store;

impl Store {
    /// Gives back the shared locks taken for request `brid` (its build
    /// ended, or never started); the masters waiting for them hear it.
    pub async fn release_shared_locks(&self, brid: i64) -> anyhow::Result<()> {
        let n = self
            .call(move |c| c.execute("DELETE FROM lock_holders WHERE brid = ?1", args![brid]))
            .await?;
        if n > 0 {
            self.events().emit(
                "locks",
                brid,
                "released",
                || serde_json::json!({ "buildrequestid": brid }),
            );
        }
        Ok(())
    }
}

/// A MasterLock as several masters share it: taken for a build by the
/// master that claims its request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedLock {
    pub name: String,
    /// Exclusive: alone; counting: up to `max_count` holders.
    pub exclusive: bool,
    pub max_count: u32,
}

/// Whether every lock of `locks` can be taken now (Buildbot's rules:
/// counting up to maxCount holders, exclusive alone). On PostgreSQL the
/// transaction first takes an advisory lock per name, so that two masters
/// deciding at once decide one after the other.
pub(super) fn free(c: &mut dyn Sql, locks: &[SharedLock]) -> anyhow::Result<bool> {
    for l in locks {
        if c.dialect() == Dialect::Postgres {
            c.query(
                "SELECT count(*) FROM (SELECT pg_advisory_xact_lock(hashtext(?1))) AS taken",
                args![format!("kiln lock {}", l.name)],
            )?;
        }
        let row = c.query_one(
            "SELECT COUNT(*), COALESCE(MAX(exclusive), 0) FROM lock_holders WHERE name = ?1",
            args![&l.name],
        )?;
        let (holders, exclusive): (i64, i64) = (row.get(0)?, row.get(1)?);
        let free = if l.exclusive {
            holders == 0
        } else {
            exclusive == 0 && holders < i64::from(l.max_count.max(1))
        };
        if !free {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Notes `locks` as held for request `brid` by `masterid` (after [`free`]
/// said they could be, in the same transaction).
pub(super) fn take(
    c: &mut dyn Sql,
    locks: &[SharedLock],
    brid: i64,
    masterid: i64,
) -> anyhow::Result<()> {
    for l in locks {
        c.execute(
            "INSERT INTO lock_holders (name, brid, masterid, exclusive) VALUES (?1, ?2, ?3, ?4)",
            args![&l.name, brid, masterid, i64::from(l.exclusive)],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::buildsets::{Collapse, NewBuildset, Source, SourceStamp};

    /// Shared MasterLocks are taken with the claim: an exclusive one by one
    /// request at a time, a counting one by up to maxCount; given back,
    /// the next request takes it; a master's start drops what it held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_locks_are_taken_with_the_claim_and_given_back() {
        for (store, _db) in crate::store::testing::each_backend().await {
            let m1 = store.master_started("m1").await.unwrap();
            let m2 = store.master_started("m2").await.unwrap();
            let ids = store
                .add_buildset(NewBuildset {
                    scheduler: "force".into(),
                    reason: "test".into(),
                    external_idstring: None,
                    source: Source::New(vec![SourceStamp::default()]),
                    properties: Default::default(),
                    builders: vec!["a".into(), "b".into(), "c".into()],
                    priority: 0,
                    parent_buildid: None,
                })
                .await
                .unwrap();
            let [a, b, c] = [0, 1, 2].map(|i| ids.brids[i].brid);
            let lock = |exclusive, max_count| {
                vec![SharedLock {
                    name: "db".into(),
                    exclusive,
                    max_count,
                }]
            };
            let claim = |brid, master, locks| {
                let store = store.clone();
                async move {
                    store
                        .claim_with_collapsed(brid, master, Collapse::None, locks)
                        .await
                        .unwrap()
                }
            };
            assert_eq!(claim(a, m1, lock(true, 1)).await, [a]);
            assert_eq!(
                claim(b, m2, lock(true, 1)).await,
                Vec::<i64>::new(),
                "held by a"
            );
            assert_eq!(
                claim(b, m2, lock(false, 5)).await,
                Vec::<i64>::new(),
                "exclusive holder"
            );
            store.release_shared_locks(a).await.unwrap();
            // Counting, two at a time.
            assert_eq!(claim(b, m2, lock(false, 2)).await, [b]);
            assert_eq!(
                claim(c, m1, lock(true, 1)).await,
                Vec::<i64>::new(),
                "counted"
            );
            store.unclaim_request(a).await.unwrap();
            assert_eq!(claim(a, m1, lock(false, 2)).await, [a]);
            assert_eq!(
                claim(c, m1, lock(false, 2)).await,
                Vec::<i64>::new(),
                "two holders"
            );
            // m1 starts again: what it held is gone.
            store.retry_unfinished_builds(m1).await.unwrap();
            assert_eq!(claim(c, m1, lock(false, 2)).await, [c]);
        }
    }
}
