//! Reconfigurations: every reload the master tried, applied or not.

use serde::Serialize;

use super::db::{args, Row};
use super::{now, Store};

/// One reload as the store keeps it: its id and end, and what happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reload {
    pub reloadid: i64,
    pub finished_at: Option<i64>,
    #[serde(flatten)]
    pub record: NewReload,
}

/// What a finished reload did, about to be stored.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NewReload {
    pub started_at: i64,
    /// What asked for it: `file change: PATH`, `SIGHUP`, `api (user)`, ...
    pub trigger: String,
    pub applied: bool,
    /// What changed, one line each (empty when nothing did).
    pub diff: String,
    /// Why it was not applied: diagnostics as `kiln checkconfig` prints them.
    pub errors: String,
    /// Every file the new config was read from.
    pub files: Vec<String>,
    pub duration_ms: f64,
}

fn reload(r: &Row) -> anyhow::Result<Reload> {
    let files: String = r.get(7)?;
    Ok(Reload {
        reloadid: r.get(0)?,
        finished_at: r.get(2)?,
        record: NewReload {
            started_at: r.get(1)?,
            trigger: r.get(3)?,
            applied: r.get(4)?,
            diff: r.get(5)?,
            errors: r.get(6)?,
            files: serde_json::from_str(&files).unwrap_or_default(),
            duration_ms: r.get(8)?,
        },
    })
}

const COLUMNS: &str =
    "id, started_at, finished_at, trigger, applied, diff, errors, files_json, duration_ms";

impl Store {
    /// Stores a finished reload; returns its id.
    pub async fn add_reload(&self, r: NewReload) -> anyhow::Result<i64> {
        let id = self.call(move |c| {
            c.value(
                "INSERT INTO reloads (started_at, finished_at, trigger, applied, diff, errors, files_json, duration_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
                args![
                    r.started_at,
                    now(),
                    &r.trigger,
                    r.applied,
                    &r.diff,
                    &r.errors,
                    serde_json::to_string(&r.files)?,
                    r.duration_ms
                ],
            )
        })
        .await?;
        if let Ok(Some(r)) = self.reload(id).await {
            self.events().emit(
                "reloads",
                id,
                if r.record.applied {
                    "applied"
                } else {
                    "failed"
                },
                || serde_json::to_value(&r).unwrap_or_default(),
            );
        }
        Ok(id)
    }

    /// The newest reloads first.
    pub async fn reloads(&self, limit: usize) -> anyhow::Result<Vec<Reload>> {
        self.call(move |c| {
            c.query(
                &format!("SELECT {COLUMNS} FROM reloads ORDER BY id DESC LIMIT ?1"),
                args![limit],
            )?
            .iter()
            .map(reload)
            .collect()
        })
        .await
    }

    pub async fn reload(&self, id: i64) -> anyhow::Result<Option<Reload>> {
        self.call(move |c| {
            c.query_opt(
                &format!("SELECT {COLUMNS} FROM reloads WHERE id = ?1"),
                args![id],
            )?
            .as_ref()
            .map(reload)
            .transpose()
        })
        .await
    }
}
