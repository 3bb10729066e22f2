//! What a Dependent scheduler reads of its upstream: the buildsets the
//! upstream scheduler made, in order, whichever master made or completed
//! them.

use super::db::args;
use super::Store;

/// One of a scheduler's buildsets, as a Dependent downstream sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamBuildset {
    pub bsid: i64,
    pub complete: bool,
    pub results: Option<i64>,
    pub complete_at: Option<i64>,
}

impl Store {
    /// The buildsets scheduler `scheduler` made after buildset `after`,
    /// oldest first, at most `limit`: what a Dependent downstream of it
    /// follows, whichever master made or completed them.
    pub async fn buildsets_of_scheduler(
        &self,
        scheduler: &str,
        after: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<UpstreamBuildset>> {
        let scheduler = scheduler.to_string();
        self.call(move |c| {
            c.query(
                "SELECT id, complete, results, complete_at FROM buildsets
                 WHERE scheduler = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                args![&scheduler, after, limit as i64],
            )?
            .iter()
            .map(|r| {
                Ok(UpstreamBuildset {
                    bsid: r.get(0)?,
                    complete: r.get(1)?,
                    results: r.get(2)?,
                    complete_at: r.get(3)?,
                })
            })
            .collect()
        })
        .await
    }
}
