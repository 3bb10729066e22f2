//! Workers and their connections to this master.

use serde::Serialize;

use super::db::args;
use super::{now, Store};

/// A worker as the store knows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerRow {
    pub workerid: i64,
    pub name: String,
    pub info: serde_json::Value,
    /// Masters it is connected to now.
    pub connected_to: Vec<i64>,
}

impl Store {
    /// Records workers the config names (latent ones, which may never have
    /// connected), so that the API lists them from the start.
    pub async fn workers_known(&self, names: Vec<String>) -> anyhow::Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        self.call(move |c| {
            for name in &names {
                c.execute(
                    "INSERT INTO workers (name, info_json) VALUES (?1, '{}') ON CONFLICT (name) DO NOTHING",
                    args![name],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Records that `name` connected to `masterid` with `info`; returns its id.
    pub async fn worker_connected(
        &self,
        name: &str,
        info: serde_json::Value,
        masterid: i64,
    ) -> anyhow::Result<i64> {
        let name = name.to_string();
        let who = name.clone();
        let id = self.call(move |c| {
            let id: i64 = c.value(
                "INSERT INTO workers (name, info_json) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET info_json = excluded.info_json
                 RETURNING id",
                args![&name, info.to_string()],
            )?;
            c.execute(
                "INSERT INTO connected_workers (workerid, masterid, connected_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (workerid, masterid) DO UPDATE SET connected_at = excluded.connected_at",
                args![id, masterid, now()],
            )?;
            Ok(id)
        })
        .await?;
        self.events().emit("workers", id, "connected", || {
            serde_json::json!({ "workerid": id, "name": who, "connected": true, "masterid": masterid })
        });
        Ok(id)
    }

    pub async fn worker_disconnected(&self, workerid: i64, masterid: i64) -> anyhow::Result<()> {
        self.call(move |c| {
            c.execute(
                "DELETE FROM connected_workers WHERE workerid = ?1 AND masterid = ?2",
                args![workerid, masterid],
            )?;
            Ok(())
        })
        .await?;
        self.events().emit("workers", workerid, "disconnected", || {
            serde_json::json!({ "workerid": workerid, "connected": false, "masterid": masterid })
        });
        Ok(())
    }

    /// Forgets every connection of `masterid` (at start: none survive a restart).
    pub async fn master_connections_reset(&self, masterid: i64) -> anyhow::Result<()> {
        self.call(move |c| {
            c.execute(
                "DELETE FROM connected_workers WHERE masterid = ?1",
                args![masterid],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn workers(&self) -> anyhow::Result<Vec<WorkerRow>> {
        self.call(|c| {
            let rows = c.query(
                "SELECT id, name, info_json FROM workers ORDER BY name",
                args![],
            )?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let (id, name, info): (i64, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
                let connected_to: Vec<i64> = c.column(
                    "SELECT masterid FROM connected_workers WHERE workerid = ?1 ORDER BY masterid",
                    args![id],
                )?;
                out.push(WorkerRow {
                    workerid: id,
                    name,
                    info: serde_json::from_str(&info).unwrap_or(serde_json::Value::Null),
                    connected_to,
                });
            }
            Ok(out)
        })
        .await
    }
}
