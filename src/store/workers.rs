//! Workers and their connections to this master.

use rusqlite::params;
use serde::Serialize;

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
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO workers (name, info_json) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET info_json = excluded.info_json",
                params![name, info.to_string()],
            )?;
            let id: i64 = tx.query_row("SELECT id FROM workers WHERE name = ?1", params![name], |r| {
                r.get(0)
            })?;
            tx.execute(
                "INSERT OR REPLACE INTO connected_workers (workerid, masterid, connected_at) VALUES (?1, ?2, ?3)",
                params![id, masterid, now()],
            )?;
            tx.commit()?;
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
                params![workerid, masterid],
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
                params![masterid],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn workers(&self) -> anyhow::Result<Vec<WorkerRow>> {
        self.call(|c| {
            let rows: Vec<(i64, String, String)> = c
                .prepare_cached("SELECT id, name, info_json FROM workers ORDER BY name")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let mut out = Vec::with_capacity(rows.len());
            for (id, name, info) in rows {
                let connected_to: Vec<i64> = c
                    .prepare_cached("SELECT masterid FROM connected_workers WHERE workerid = ?1 ORDER BY masterid")?
                    .query_map(params![id], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
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
