//! `Dependent`: a buildset for the same sources once an upstream
//! scheduler's buildset completes with SUCCESS or WARNINGS.
//!
//! It follows the upstream's buildsets in the store, not the completions
//! this process hears of, so it acts on buildsets completed on any master
//! of a fleet and on those completed while it was not running (its master
//! was restarted, or it moved to another master with its lease). Its
//! position, stored with the buildsets it makes in one transaction, is the
//! upstream buildset below which all are handled, plus those above it
//! already handled (completed out of order).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::SchedulerKind;
use crate::store::buildsets::{SchedulerWrite, Source};
use crate::store::Properties;

use super::task::{Task, BATCH};

pub(super) const UPSTREAM: &str = "upstream";

/// How far a Dependent has followed its upstream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Followed {
    /// Every upstream buildset up to this one is handled.
    pub(super) after: i64,
    /// Upstream buildsets above `after` already handled.
    pub(super) done: BTreeSet<i64>,
}

impl Task {
    fn upstream(&self) -> Option<&str> {
        match &self.cfg.kind {
            SchedulerKind::Dependent { upstream } => Some(upstream),
            _ => None,
        }
    }

    /// The stored position; a new Dependent acts on the upstream
    /// buildsets that complete from the moment it started (to the second).
    pub(super) async fn load_followed(&mut self) -> anyhow::Result<Option<Followed>> {
        let Some(upstream) = self.upstream().map(str::to_string) else {
            return Ok(None);
        };
        let obj = self.object().await?;
        let store = &self.shared.store;
        if let Some(v) = store.get_state(obj, UPSTREAM).await? {
            if let Ok(f) = serde_json::from_value::<Followed>(v) {
                return Ok(Some(f));
            }
            tracing::warn!(scheduler = %self.cfg.name, "its stored position is unreadable; following from now on");
        }
        let mut f = Followed::default();
        let mut open = false;
        let mut cursor = 0;
        loop {
            let rows = store
                .buildsets_of_scheduler(&upstream, cursor, BATCH)
                .await?;
            for r in &rows {
                cursor = r.bsid;
                let before = r.complete && r.complete_at.is_some_and(|t| t < self.started_at);
                open |= !before;
                if !open {
                    f.after = r.bsid;
                } else if before {
                    f.done.insert(r.bsid);
                }
            }
            if rows.len() < BATCH {
                break;
            }
        }
        store.set_state(obj, UPSTREAM, json!(f)).await?;
        Ok(Some(f))
    }

    /// Makes a buildset for each upstream buildset completed well since
    /// the last call, and stores them with the new position.
    pub(super) async fn follow_upstream(&mut self, followed: &mut Followed) -> anyhow::Result<()> {
        let Some(upstream) = self.upstream().map(str::to_string) else {
            return Ok(());
        };
        let store = self.shared.store.clone();
        let mut next = followed.clone();
        let mut made = Vec::new();
        let mut prefix = true;
        let mut cursor = followed.after;
        loop {
            let rows = store
                .buildsets_of_scheduler(&upstream, cursor, BATCH)
                .await?;
            for r in &rows {
                cursor = r.bsid;
                if !r.complete {
                    prefix = false;
                    continue;
                }
                // SUCCESS or WARNINGS, as Buildbot's Dependent requires.
                let good = r.results.is_some_and(|x| x <= 1);
                if good && !next.done.contains(&r.bsid) {
                    if let Some(bs) = store.get_buildset(r.bsid).await? {
                        made.push(self.buildset(
                            Source::SourceStamps(bs.sourcestamps.clone()),
                            format!("downstream of buildset {} from '{upstream}'", bs.bsid),
                            Properties::new(),
                        ));
                    }
                }
                if prefix {
                    next.done.remove(&r.bsid);
                    next.after = r.bsid;
                } else {
                    next.done.insert(r.bsid);
                }
            }
            if rows.len() < BATCH {
                break;
            }
        }
        if next == *followed {
            return Ok(());
        }
        let obj = self.object().await?;
        let w = SchedulerWrite {
            buildsets: made,
            state: vec![(UPSTREAM.into(), json!(next))],
            fence: self.fence(),
            ..Default::default()
        };
        let ids = store.scheduler_write(obj, w).await?;
        self.log_made(&ids);
        *followed = next;
        Ok(())
    }
}
