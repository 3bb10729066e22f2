//! Masters: each registers under its name, heart-beats when several share
//! the database (`multiMaster`), and is declared dead by another once it
//! has been silent too long: its builds end RETRY, its claims go back to
//! the queue and its workers' connections are forgotten.

use serde_json::json;

use super::db::args;
use super::{now, Store};

/// What declaring a master dead did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaped {
    pub masterid: i64,
    pub name: String,
    /// Its builds that were running, now ended RETRY.
    pub builds: Vec<i64>,
    /// Its claimed requests, given back to the queue.
    pub requests: Vec<i64>,
}

/// Buildbot's RETRY result.
const RETRY: i64 = 5;

impl Store {
    /// Records this master as active (Buildbot's `masters` row); returns its id.
    pub async fn master_started(&self, name: &str) -> anyhow::Result<i64> {
        let name = name.to_string();
        let id = self
            .call(move |c| {
                c.value(
                    "INSERT INTO masters (name, active, last_active) VALUES (?1, 1, ?2)
                     ON CONFLICT (name) DO UPDATE SET active = 1, last_active = excluded.last_active
                     RETURNING id",
                    args![&name, now()],
                )
            })
            .await?;
        self.master_event(id, "started").await;
        Ok(id)
    }

    /// Records a clean stop: the master is inactive at once, and its leases
    /// free for the others.
    pub async fn master_stopped(&self, id: i64) -> anyhow::Result<()> {
        self.call(move |c| {
            c.execute("DELETE FROM leases WHERE masterid = ?1", args![id])?;
            c.execute("DELETE FROM builder_masters WHERE masterid = ?1", args![id])?;
            c.execute(
                "UPDATE masters SET active = 0, last_active = ?2 WHERE id = ?1",
                args![id, now()],
            )?;
            Ok(())
        })
        .await?;
        self.master_event(id, "stopped").await;
        Ok(())
    }

    /// A heartbeat: false when another master has declared this one dead
    /// meanwhile (then its builds were ended and its claims given back,
    /// and it must not go on as if they were its own).
    pub async fn master_heartbeat(&self, id: i64) -> anyhow::Result<bool> {
        self.call(move |c| {
            let n = c.execute(
                "UPDATE masters SET last_active = ?2 WHERE id = ?1 AND active = 1",
                args![id, now()],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Declares dead every other active master silent for longer than
    /// `dead_after` seconds, each in one transaction that only one of the
    /// live masters can win.
    pub async fn reap_dead_masters(&self, me: i64, dead_after: u64) -> anyhow::Result<Vec<Reaped>> {
        let reaped = self
            .call(move |c| {
                let cutoff = now() - i64::try_from(dead_after).unwrap_or(i64::MAX);
                let silent = c.query(
                    "SELECT id, name FROM masters WHERE active = 1 AND id != ?1 AND last_active < ?2
                     ORDER BY id",
                    args![me, cutoff],
                )?;
                let mut out = Vec::new();
                for r in silent {
                    let (masterid, name): (i64, String) = (r.get(0)?, r.get(1)?);
                    // The row lock decides between masters reaping at once.
                    let won = c.execute(
                        "UPDATE masters SET active = 0 WHERE id = ?1 AND active = 1 AND last_active < ?2",
                        args![masterid, cutoff],
                    )?;
                    if won != 1 {
                        continue;
                    }
                    let state = format!("retry: master {name} stopped answering");
                    let builds: Vec<i64> = c.column(
                        "UPDATE builds SET complete_at = ?2, results = ?3, state_string = ?4
                         WHERE masterid = ?1 AND complete_at IS NULL RETURNING id",
                        args![masterid, now(), RETRY, state],
                    )?;
                    let requests: Vec<i64> = c.column(
                        "DELETE FROM buildrequest_claims WHERE masterid = ?1
                           AND brid IN (SELECT id FROM buildrequests WHERE complete = 0)
                         RETURNING brid",
                        args![masterid],
                    )?;
                    c.execute(
                        "DELETE FROM connected_workers WHERE masterid = ?1",
                        args![masterid],
                    )?;
                    c.execute("DELETE FROM leases WHERE masterid = ?1", args![masterid])?;
                    c.execute(
                        "DELETE FROM lock_holders WHERE masterid = ?1",
                        args![masterid],
                    )?;
                    c.execute(
                        "DELETE FROM builder_masters WHERE masterid = ?1",
                        args![masterid],
                    )?;
                    out.push(Reaped {
                        masterid,
                        name,
                        builds,
                        requests,
                    });
                }
                Ok(out)
            })
            .await?;
        for r in &reaped {
            self.master_event(r.masterid, "dead").await;
            for b in &r.builds {
                self.events.emit("builds", *b, "finished", || {
                    json!({ "buildid": b, "complete": true, "results": RETRY,
                            "state_string": format!("retry: master {} stopped answering", r.name) })
                });
            }
            for brid in &r.requests {
                self.events.emit(
                    "buildrequests",
                    *brid,
                    "unclaimed",
                    || json!({ "buildrequestid": brid, "claimed": false }),
                );
            }
        }
        Ok(reaped)
    }

    /// Takes or renews, for `ttl` seconds, the lease of each of `names`
    /// that no other master holds (or whose holder let it expire), and
    /// gives up this master's other leases. Returns the names it holds.
    pub async fn hold_leases(
        &self,
        me: i64,
        names: Vec<String>,
        ttl: u64,
    ) -> anyhow::Result<Vec<String>> {
        self.call(move |c| {
            let t = now();
            let until = t + i64::try_from(ttl).unwrap_or(i64::MAX / 2);
            let mut held = Vec::new();
            for name in &names {
                let got = c.value_opt::<String>(
                    "INSERT INTO leases (name, masterid, expires_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET masterid = excluded.masterid, expires_at = excluded.expires_at
                     WHERE leases.masterid = excluded.masterid OR leases.expires_at < ?4
                     RETURNING name",
                    args![name, me, until, t],
                )?;
                held.extend(got);
            }
            let mine: Vec<String> =
                c.column("SELECT name FROM leases WHERE masterid = ?1", args![me])?;
            for name in mine.iter().filter(|n| !names.contains(n)) {
                c.execute(
                    "DELETE FROM leases WHERE name = ?1 AND masterid = ?2",
                    args![name, me],
                )?;
            }
            Ok(held)
        })
        .await
    }

    /// Every lease: (name, holder's master name).
    pub async fn leases(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.call(|c| {
            c.query(
                "SELECT l.name, m.name FROM leases l JOIN masters m ON m.id = l.masterid ORDER BY l.name",
                args![],
            )?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .collect()
        })
        .await
    }

    /// A master as Buildbot's data API shows it: `masterid`, `name`,
    /// `active`, `last_active`.
    pub async fn master(&self, id: i64) -> anyhow::Result<Option<serde_json::Value>> {
        self.call(move |c| {
            let Some(r) = c.query_opt(
                "SELECT name, active, last_active FROM masters WHERE id = ?1",
                args![id],
            )?
            else {
                return Ok(None);
            };
            Ok(Some(json!({
                "masterid": id,
                "name": r.get::<String>(0)?,
                "active": r.get::<bool>(1)?,
                "last_active": r.get::<i64>(2)?,
            })))
        })
        .await
    }

    async fn master_event(&self, id: i64, kind: &'static str) {
        if self.events.subscribers() == 0 {
            return;
        }
        if let Ok(Some(m)) = self.master(id).await {
            self.events.emit("masters", id, kind, || m);
        }
    }
}

/// What a leased service's writes stand on in a fleet: the master that
/// runs it still holds its lease. Checked in the write's own transaction
/// (on PostgreSQL the lease's row is locked until the write commits, so a
/// master taking the lease over waits for it), a write of a master that
/// lost the lease while it was paused or cut off is not made, whatever it
/// believes it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub masterid: i64,
    /// `change_source:NAME` or `scheduler:NAME`.
    pub lease: String,
}

impl Fence {
    pub(super) fn check(&self, c: &mut dyn super::db::Sql) -> anyhow::Result<()> {
        let lock = match c.dialect() {
            super::db::Dialect::Postgres => " FOR UPDATE",
            super::db::Dialect::Sqlite => "",
        };
        let expires: Option<i64> = c.value_opt(
            &format!("SELECT expires_at FROM leases WHERE name = ?1 AND masterid = ?2{lock}"),
            args![&self.lease, self.masterid],
        )?;
        match expires {
            Some(t) if t >= now() => Ok(()),
            _ => anyhow::bail!(
                "this master no longer holds the lease of {} (another master has it, or it lapsed): the write was not made",
                self.lease
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::buildsets::SchedulerWrite;

    fn write(fence: Fence) -> SchedulerWrite {
        SchedulerWrite {
            state: vec![("position".into(), json!(1))],
            fence: Some(fence),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leased_services_write_is_made_only_while_its_master_holds_the_lease() {
        for (store, _db) in crate::store::testing::each_backend().await {
            let a = store.master_started("a").await.unwrap();
            let b = store.master_started("b").await.unwrap();
            let (sa, sb) = (store.fenced(a), store.fenced(b));
            let lease = "scheduler:s".to_string();
            let obj = store.object_id("s", "Scheduler").await.unwrap();
            assert_eq!(
                store.hold_leases(a, vec![lease.clone()], 60).await.unwrap(),
                vec![lease.clone()]
            );
            assert!(store
                .hold_leases(b, vec![lease.clone()], 60)
                .await
                .unwrap()
                .is_empty());

            sa.scheduler_write(obj, write(sa.fence(lease.clone()).unwrap()))
                .await
                .expect("the holder writes");
            let e = sb
                .scheduler_write(obj, write(sb.fence(lease.clone()).unwrap()))
                .await
                .expect_err("not the holder");
            assert!(
                format!("{e:#}").contains("no longer holds the lease of scheduler:s"),
                "{e:#}"
            );

            // Master a stalls past its lease (paused, cut off): b takes it
            // over, and a's late write is not made, though a still thinks
            // it runs the scheduler.
            store
                .call(|c| {
                    c.execute("UPDATE leases SET expires_at = ?1", args![now() - 10])?;
                    Ok(())
                })
                .await
                .unwrap();
            assert!(sa
                .scheduler_write(obj, write(sa.fence(lease.clone()).unwrap()))
                .await
                .is_err());
            assert_eq!(
                store.hold_leases(b, vec![lease.clone()], 60).await.unwrap(),
                vec![lease.clone()]
            );
            sb.scheduler_write(obj, write(sb.fence(lease.clone()).unwrap()))
                .await
                .expect("the new holder writes");
            assert!(sa
                .scheduler_write(obj, write(sa.fence(lease.clone()).unwrap()))
                .await
                .is_err());

            // A poller's changes, the same way; outside a fleet nothing is
            // fenced.
            let poller = "change_source:HgPoller:r".to_string();
            store
                .hold_leases(b, vec![lease, poller.clone()], 60)
                .await
                .unwrap();
            let change = crate::store::NewChange {
                revision: Some("abc".into()),
                ..Default::default()
            };
            assert!(sa
                .add_changes_fenced(
                    "HgPoller:r",
                    vec![change.clone()],
                    vec![],
                    sa.fence(poller.clone())
                )
                .await
                .is_err());
            let stored = sb
                .add_changes_fenced("HgPoller:r", vec![change], vec![], sb.fence(poller))
                .await
                .unwrap();
            assert_eq!(stored.len(), 1);
            assert_eq!(store.fence("scheduler:s".into()), None);
        }
    }
}
