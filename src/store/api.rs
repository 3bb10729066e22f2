//! The read API's rows: each of Buildbot's data API collections as SQL
//! that names its columns as Buildbot names its fields. A column alias
//! ending in `__bool` is a 0/1 shown as a boolean, one ending in `__json`
//! is JSON text shown as JSON; the suffix is dropped.

use serde_json::{Map, Value};

use super::db::{args, Dialect, Value as SqlValue};
use super::query::{ListQuery, Row};
use super::Store;

/// One of the data API's collections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collection {
    Builders,
    Builds,
    Steps,
    Logs,
    BuildRequests,
    Buildsets,
    Changes,
    Workers,
    Masters,
}

impl Collection {
    /// The list's key in a response, and the id field of one item.
    pub fn names(self) -> (&'static str, &'static str) {
        match self {
            Collection::Builders => ("builders", "builderid"),
            Collection::Builds => ("builds", "buildid"),
            Collection::Steps => ("steps", "stepid"),
            Collection::Logs => ("logs", "logid"),
            Collection::BuildRequests => ("buildrequests", "buildrequestid"),
            Collection::Buildsets => ("buildsets", "bsid"),
            Collection::Changes => ("changes", "changeid"),
            Collection::Workers => ("workers", "workerid"),
            Collection::Masters => ("masters", "masterid"),
        }
    }

    fn sql(self, dialect: Dialect) -> &'static str {
        // JSON arrays built in SQL: the one place the dialects differ here.
        let pg = dialect == Dialect::Postgres;
        match self {
            Collection::Builders => {
                "SELECT id AS builderid, name, description, tags_json AS tags__json FROM builders"
            }
            Collection::Builds => {
                "SELECT b.id AS buildid, b.number, b.builderid, b.buildrequestid, b.workerid,
                        b.masterid, b.started_at, b.complete_at,
                        (b.complete_at IS NOT NULL) AS complete__bool, b.state_string, b.results
                 FROM builds b"
            }
            Collection::Steps => {
                "SELECT id AS stepid, number, name, buildid, started_at, complete_at,
                        (complete_at IS NOT NULL) AS complete__bool, state_string, results,
                        urls_json AS urls__json, hidden AS hidden__bool
                 FROM steps"
            }
            Collection::Logs => {
                "SELECT id AS logid, name, slug, stepid, complete AS complete__bool, num_lines,
                        type, truncated AS truncated__bool
                 FROM logs"
            }
            Collection::BuildRequests => {
                "SELECT q.id AS buildrequestid, q.buildsetid, q.builderid, r.name AS buildername,
                        q.priority, (c.brid IS NOT NULL) AS claimed__bool, c.claimed_at,
                        c.masterid AS claimed_by_masterid, q.complete AS complete__bool,
                        q.results, q.submitted_at, q.complete_at, q.waited_for AS waited_for__bool
                 FROM buildrequests q JOIN builders r ON r.id = q.builderid
                 LEFT JOIN buildrequest_claims c ON c.brid = q.id"
            }
            Collection::Buildsets => {
                "SELECT id AS bsid, external_idstring, reason, scheduler, submitted_at,
                        complete AS complete__bool, complete_at, results, parent_buildid,
                        parent_relationship
                 FROM buildsets"
            }
            Collection::Changes if pg => {
                "SELECT c.changeid, c.author, c.committer, c.comments, c.branch, c.revision,
                        c.revlink, c.when_timestamp, c.category, c.repository, c.codebase,
                        c.project, c.sourcestampid,
                        (SELECT coalesce(json_agg(f.filename ORDER BY f.position), '[]'::json)::text
                            FROM change_files f WHERE f.changeid = c.changeid)
                            AS files__json
                 FROM changes c"
            }
            Collection::Changes => {
                "SELECT c.changeid, c.author, c.committer, c.comments, c.branch, c.revision,
                        c.revlink, c.when_timestamp, c.category, c.repository, c.codebase,
                        c.project, c.sourcestampid,
                        (SELECT json_group_array(filename) FROM
                            (SELECT filename FROM change_files f WHERE f.changeid = c.changeid ORDER BY position))
                            AS files__json
                 FROM changes c"
            }
            Collection::Workers if pg => {
                "SELECT w.id AS workerid, w.name, w.info_json AS workerinfo__json,
                        w.paused AS paused__bool, w.graceful AS graceful__bool,
                        (SELECT coalesce(json_agg(json_build_object('masterid', c.masterid) ORDER BY c.masterid),
                                         '[]'::json)::text
                            FROM connected_workers c WHERE c.workerid = w.id) AS connected_to__json
                 FROM workers w"
            }
            Collection::Masters => {
                "SELECT id AS masterid, name, active AS active__bool, last_active FROM masters"
            }
            Collection::Workers => {
                "SELECT w.id AS workerid, w.name, w.info_json AS workerinfo__json,
                        w.paused AS paused__bool, w.graceful AS graceful__bool,
                        (SELECT json_group_array(json_object('masterid', masterid))
                            FROM connected_workers c WHERE c.workerid = w.id) AS connected_to__json
                 FROM workers w"
            }
        }
    }
}

fn json_of(v: &SqlValue) -> Value {
    match v {
        SqlValue::Null => Value::Null,
        SqlValue::Int(i) => (*i).into(),
        SqlValue::Real(f) => (*f).into(),
        SqlValue::Text(t) => t.clone().into(),
        SqlValue::Blob(b) => String::from_utf8_lossy(b).into_owned().into(),
    }
}

/// A read of a collection that the database does whole: conditions (SQL over the
/// collection's column aliases, with their arguments), order (alias,
/// descending), and a page. `Query::select` makes one when every part of
/// a query can be said in SQL with the meaning the API gives it.
#[derive(Clone, Debug, Default)]
pub(super) struct Select {
    pub(super) conditions: Vec<(String, Vec<SqlValue>)>,
    pub(super) order: Vec<(String, bool)>,
    pub(super) limit: Option<usize>,
    pub(super) offset: usize,
}

/// Rows as the API shows them: the suffixes of `names` say how.
fn api_row(names: &[String], row: &super::db::Row) -> Map<String, Value> {
    let mut m = Map::new();
    for (name, v) in names.iter().zip(&row.0) {
        let v = json_of(v);
        if let Some(n) = name.strip_suffix("__bool") {
            m.insert(n.to_string(), Value::Bool(v.as_i64().unwrap_or(0) != 0));
        } else if let Some(n) = name.strip_suffix("__json") {
            let parsed = v
                .as_str()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or(Value::Null);
            m.insert(n.to_string(), parsed);
        } else {
            m.insert(name.clone(), v);
        }
    }
    m
}

/// A column alias without its suffix: the API's field name.
pub fn field_of(alias: &str) -> &str {
    alias.trim_end_matches("__bool").trim_end_matches("__json")
}

impl Store {
    /// The column aliases of `c` (suffixes included), in order.
    pub async fn api_columns(&self, c: Collection) -> anyhow::Result<Vec<String>> {
        self.call(move |conn| {
            let sql = format!("SELECT * FROM ({}) AS q LIMIT 0", c.sql(conn.dialect()));
            Ok(conn.query_named(&sql, args![])?.0)
        })
        .await
    }

    /// The items of `c` that `q` asks for (narrowed by `pre`, a path's own
    /// filter such as a build's steps), and their number before paging.
    pub async fn api_list(
        &self,
        c: Collection,
        pre: Option<(&'static str, Value)>,
        q: &ListQuery,
    ) -> anyhow::Result<(Vec<Row>, usize)> {
        let columns = self.api_columns(c).await?;
        if let Some(sel) = q.select(&columns, &pre, self.dialect()) {
            let (_, rows, total) = self.api_select(c, sel).await?;
            return Ok((rows, total));
        }
        let (_, rows) = self.api_rows(c, pre).await?;
        Ok(q.apply(rows, c.names().1))
    }

    /// The items of `c` that `sel` asks for, with the number of items
    /// before paging; field names first.
    pub(super) async fn api_select(
        &self,
        c: Collection,
        sel: Select,
    ) -> anyhow::Result<(Vec<String>, Vec<Map<String, Value>>, usize)> {
        self.call(move |conn| {
            let mut filter = String::new();
            let mut args: Vec<SqlValue> = Vec::new();
            for (i, (cond, a)) in sel.conditions.iter().enumerate() {
                filter.push_str(if i == 0 { " WHERE " } else { " AND " });
                filter.push('(');
                filter.push_str(cond);
                filter.push(')');
                args.extend(a.iter().cloned());
            }
            let (_, id) = c.names();
            let mut order: Vec<String> = sel
                .order
                .iter()
                // NULL sorts first, as the in-memory order has it (PostgreSQL's
                // default puts it last).
                .map(|(a, desc)| {
                    format!(
                        "\"{a}\" {}",
                        if *desc {
                            "DESC NULLS LAST"
                        } else {
                            "ASC NULLS FIRST"
                        }
                    )
                })
                .collect();
            order.push(format!("\"{id}\""));
            let paged = sel.limit.is_some() || sel.offset > 0;
            let sql = format!(
                "SELECT * FROM ({}) AS q{filter} ORDER BY {} LIMIT {} OFFSET {}",
                c.sql(conn.dialect()),
                order.join(", "),
                sel.limit
                    .map_or(i64::MAX, |l| l.min(i64::MAX as usize) as i64),
                sel.offset
            );
            let (names, rows) = conn.query_named(&sql, &args)?;
            let rows: Vec<_> = rows.iter().map(|r| api_row(&names, r)).collect();
            let total = if paged {
                let count = format!(
                    "SELECT count(*) FROM ({}) AS q{filter}",
                    c.sql(conn.dialect())
                );
                let n: i64 = conn.value(&count, &args)?;
                n as usize
            } else {
                rows.len()
            };
            let fields = names.iter().map(|n| field_of(n).to_string()).collect();
            Ok((fields, rows, total))
        })
        .await
    }

    /// The field names of `c`, and every item of it (or, with `only`, the
    /// items whose field has this value: a plain column, an id or `name`,
    /// read through the table's index).
    pub async fn api_rows(
        &self,
        c: Collection,
        only: Option<(&'static str, Value)>,
    ) -> anyhow::Result<(Vec<String>, Vec<Map<String, Value>>)> {
        let mut sel = Select::default();
        if let Some((field, v)) = only {
            let arg = match v {
                Value::Number(n) => SqlValue::Int(n.as_i64().unwrap_or(-1)),
                Value::String(s) => SqlValue::Text(s),
                other => SqlValue::Text(other.to_string()),
            };
            sel.conditions.push((format!("\"{field}\" = ?"), vec![arg]));
        }
        let (fields, rows, _) = self.api_select(c, sel).await?;
        Ok((fields, rows))
    }

    /// A log's chunks: (first line, content) in order.
    pub async fn log_chunks(&self, logid: i64) -> anyhow::Result<Vec<(i64, String)>> {
        self.call(move |conn| {
            conn.query(
                "SELECT first_line, compressed, content FROM logchunks WHERE logid = ?1 ORDER BY first_line",
                args![logid],
            )?
            .iter()
            .map(|r| {
                let content: Vec<u8> = r.get(2)?;
                Ok((r.get(0)?, super::logcodec::text_of(r.get(1)?, &content)))
            })
            .collect()
        })
        .await
    }
}

/// What `/metrics` reads from the store.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// (builder, results or None while running, count)
    pub builds: Vec<(String, Option<i64>, i64)>,
    /// (builder, requests waiting for a worker)
    pub pending: Vec<(String, i64)>,
    /// Seconds from request to build start, summed, and how many builds.
    pub wait_sum: f64,
    pub wait_count: i64,
    pub workers_connected: i64,
    /// (applied, count, summed duration in ms)
    pub reloads: Vec<(bool, i64, f64)>,
}

impl Store {
    pub async fn metrics(&self) -> anyhow::Result<StoreMetrics> {
        self.call(|c| {
            let builds = c
                .query(
                    "SELECT r.name, b.results, count(*) FROM builds b JOIN builders r ON r.id = b.builderid
                     GROUP BY r.name, b.results ORDER BY r.name, b.results",
                    args![],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .collect::<anyhow::Result<_>>()?;
            let pending = c
                .query(
                    "SELECT r.name, count(*) FROM buildrequests q JOIN builders r ON r.id = q.builderid
                     LEFT JOIN buildrequest_claims c ON c.brid = q.id
                     WHERE q.complete = 0 AND c.brid IS NULL GROUP BY r.name ORDER BY r.name",
                    args![],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?)))
                .collect::<anyhow::Result<_>>()?;
            let wait = c.query_one(
                "SELECT CAST(coalesce(sum(b.started_at - q.submitted_at), 0) AS BIGINT), count(*)
                 FROM builds b JOIN buildrequests q ON q.id = b.buildrequestid",
                args![],
            )?;
            let workers_connected = c.value(
                "SELECT count(DISTINCT workerid) FROM connected_workers",
                args![],
            )?;
            let reloads = c
                .query(
                    "SELECT applied, count(*), coalesce(sum(duration_ms), 0) FROM reloads
                     GROUP BY applied ORDER BY applied",
                    args![],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .collect::<anyhow::Result<_>>()?;
            let m = StoreMetrics {
                builds,
                pending,
                wait_sum: wait.get(0)?,
                wait_count: wait.get(1)?,
                workers_connected,
                reloads,
            };
            Ok(m)
        })
        .await
    }
}
