//! The read API: Buildbot's data API collections under `/api/v2/`, with
//! its query conventions: `field=value` (repeated: any of them),
//! `field__ne|lt|le|gt|ge|contains=value`, `order=field` / `order=-field`,
//! `limit`, `offset`, and `field=name` projection; lists as
//! `{"<name>": [...], "meta": {"total": n}}` (total before paging); a JSON
//! 404 for what does not exist.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::store::api::Collection;
use crate::store::builds::LineKind;
use crate::store::query::{ListQuery, Row};

type Params = Query<Vec<(String, String)>>;

pub(super) fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": what }))).into_response()
}

fn bad(what: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": what }))).into_response()
}

fn internal(e: anyhow::Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({ "error": format!("{e:#}") })),
    )
        .into_response()
}

/// A collection's items, narrowed by `pre` (the path's own filter) and the
/// query.
async fn list(
    st: &AppState,
    c: Collection,
    pre: Option<(&'static str, Value)>,
    params: &[(String, String)],
) -> Response {
    let (key, _) = c.names();
    let columns = match st.store.api_columns(c).await {
        Ok(cols) => cols,
        Err(e) => return internal(e),
    };
    let known: Vec<String> = columns
        .iter()
        .map(|a| crate::store::api::field_of(a).to_string())
        .collect();
    let q = match ListQuery::parse(params, &known) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    match st.store.api_list(c, pre, &q).await {
        Ok((mut rows, total)) => {
            if c == Collection::Workers {
                latent_states(st, &mut rows);
            }
            let page: Vec<Value> = rows.into_iter().map(|r| q.project(r)).collect();
            Json(json!({ key: page, "meta": { "total": total } })).into_response()
        }
        Err(e) => internal(e),
    }
}

/// A latent worker's row gains `latent`: its state (stopped, starting,
/// idle, building, stopping, failed), the reason of a failed start, and
/// the seconds in that state. (Not a column: it lives in the master.)
fn latent_states(st: &AppState, rows: &mut [crate::store::query::Row]) {
    let statuses = st.builds.latent.statuses();
    if statuses.is_empty() {
        return;
    }
    for row in rows {
        let name = row.get("name").and_then(Value::as_str).unwrap_or_default();
        if let Some(s) = statuses.iter().find(|s| s.name == name) {
            row.insert(
                "latent".into(),
                json!({ "state": s.state, "reason": s.reason, "for_seconds": s.for_seconds }),
            );
        }
    }
}

/// One item by id (or, for builders and workers, by name).
async fn one(st: &AppState, c: Collection, ident: &str, params: &[(String, String)]) -> Response {
    match find(st, c, ident).await {
        Ok(Some(v)) => list(st, c, Some((c.names().1, v)), params).await,
        Ok(None) => not_found(format!("no {} `{ident}`", singular(c))),
        Err(e) => internal(e),
    }
}

fn singular(c: Collection) -> &'static str {
    let (key, _) = c.names();
    key.strip_suffix('s').unwrap_or(key)
}

/// The id value of the item `ident` names, if it exists.
async fn find(st: &AppState, c: Collection, ident: &str) -> anyhow::Result<Option<Value>> {
    let (_, id) = c.names();
    let by_name = matches!(
        c,
        Collection::Builders | Collection::Workers | Collection::Masters
    );
    if let Ok(n) = ident.parse::<i64>() {
        let (_, rows) = st.store.api_rows(c, Some((id, Value::from(n)))).await?;
        if let Some(v) = rows.first().and_then(|r| r.get(id)).cloned() {
            return Ok(Some(v));
        }
    }
    if !by_name {
        return Ok(None);
    }
    let (_, rows) = st
        .store
        .api_rows(c, Some(("name", Value::from(ident))))
        .await?;
    Ok(rows.first().and_then(|r| r.get(id)).cloned())
}

macro_rules! collection {
    ($list:ident, $one:ident, $c:expr) => {
        pub(super) async fn $list(State(st): State<Arc<AppState>>, Query(p): Params) -> Response {
            list(&st, $c, None, &p).await
        }
        pub(super) async fn $one(
            State(st): State<Arc<AppState>>,
            Path(ident): Path<String>,
            Query(p): Params,
        ) -> Response {
            one(&st, $c, &ident, &p).await
        }
    };
}

collection!(builders, builder, Collection::Builders);
collection!(builds, build, Collection::Builds);
collection!(steps, step, Collection::Steps);
collection!(logs, log, Collection::Logs);
collection!(buildrequests, buildrequest, Collection::BuildRequests);
collection!(buildsets, buildset, Collection::Buildsets);
collection!(changes, change, Collection::Changes);
collection!(workers, worker, Collection::Workers);
collection!(masters, master, Collection::Masters);

/// The configured schedulers as Buildbot's `schedulers` lists them (with
/// kiln's `type` and `builderNames` besides).
async fn scheduler_rows(st: &AppState) -> anyhow::Result<Vec<Row>> {
    let gen = st.builds.generation();
    let masterid = st.builds.masterid();
    let master = st.store.master(masterid).await?.unwrap_or(Value::Null);
    let mut rows = Vec::new();
    for s in &gen.config.schedulers {
        let class = match s.kind {
            crate::config::SchedulerKind::Scheduler { .. } => "SingleBranchScheduler",
            _ => s.kind.type_name(),
        };
        let id = st.store.object_id(&s.name, class).await?;
        let mut r = Row::new();
        r.insert("schedulerid".into(), json!(id.0));
        r.insert("name".into(), json!(s.name));
        r.insert("enabled".into(), json!(true));
        r.insert("master".into(), master.clone());
        r.insert("type".into(), json!(s.kind.type_name()));
        r.insert("builderNames".into(), json!(s.builder_names));
        rows.push(r);
    }
    Ok(rows)
}

/// `GET /api/v2/schedulers` and `/schedulers/{id or name}`, with the
/// query conventions of the other lists.
pub(super) async fn schedulers(State(st): State<Arc<AppState>>, Query(p): Params) -> Response {
    scheduler_list(&st, None, &p).await
}

pub(super) async fn scheduler(
    State(st): State<Arc<AppState>>,
    Path(ident): Path<String>,
    Query(p): Params,
) -> Response {
    scheduler_list(&st, Some(ident), &p).await
}

async fn scheduler_list(
    st: &AppState,
    ident: Option<String>,
    params: &[(String, String)],
) -> Response {
    let mut rows = match scheduler_rows(st).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    if let Some(ident) = &ident {
        rows.retain(|r| {
            r["name"].as_str() == Some(ident.as_str())
                || r["schedulerid"].as_i64().map(|i| i.to_string()).as_deref()
                    == Some(ident.as_str())
        });
        if rows.is_empty() {
            return not_found(format!("no scheduler `{ident}`"));
        }
    }
    let known: Vec<String> = [
        "schedulerid",
        "name",
        "enabled",
        "master",
        "type",
        "builderNames",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let q = match ListQuery::parse(params, &known) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    let (page, total) = q.apply(rows, "schedulerid");
    let page: Vec<Value> = page.into_iter().map(|r| q.project(r)).collect();
    Json(json!({ "schedulers": page, "meta": { "total": total } })).into_response()
}

/// `/builders/{id or name}/builds`, `/builds/{id}/steps`, `/steps/{id}/logs`.
async fn children(
    st: &AppState,
    parent: Collection,
    ident: &str,
    child: Collection,
    params: &[(String, String)],
) -> Response {
    match find(st, parent, ident).await {
        Ok(Some(v)) => list(st, child, Some((parent.names().1, v)), params).await,
        Ok(None) => not_found(format!("no {} `{ident}`", singular(parent))),
        Err(e) => internal(e),
    }
}

/// `/PARENTS/{id}/CHILDREN`: the children of one item, with the list's
/// query conventions.
macro_rules! nested {
    ($name:ident, $parent:ident, $child:ident) => {
        pub(super) async fn $name(
            State(st): State<Arc<AppState>>,
            Path(ident): Path<String>,
            Query(p): Params,
        ) -> Response {
            children(&st, Collection::$parent, &ident, Collection::$child, &p).await
        }
    };
}

nested!(builder_builds, Builders, Builds);
nested!(build_steps, Builds, Steps);
nested!(step_logs, Steps, Logs);

/// `/logs/{id}/contents`: Buildbot's log chunks.
pub(super) async fn log_contents(
    State(st): State<Arc<AppState>>,
    Path(ident): Path<String>,
) -> Response {
    let logid = match find(&st, Collection::Logs, &ident).await {
        Ok(Some(v)) => v.as_i64().unwrap_or(0),
        Ok(None) => return not_found(format!("no log `{ident}`")),
        Err(e) => return internal(e),
    };
    match st.store.log_chunks(logid).await {
        Ok(chunks) => {
            let list: Vec<Value> = chunks
                .into_iter()
                .map(|(first, content)| json!({ "logid": logid, "firstline": first, "content": content }))
                .collect();
            let n = list.len();
            Json(json!({ "logchunks": list, "meta": { "total": n } })).into_response()
        }
        Err(e) => internal(e),
    }
}

/// What `/raw` says of a log the janitor deleted (its `type` is `d`).
pub const DELETED_LOG_TEXT: &str =
    "[kiln] this log was deleted by the janitor: its build ended longer ago than the JanitorConfigurator's logHorizon\n";

/// `/logs/{id}/raw`: the log as text; a stdio log's lines without their
/// stream prefix, as Buildbot serves them.
pub(super) async fn log_raw(
    State(st): State<Arc<AppState>>,
    Path(ident): Path<String>,
) -> Response {
    let Ok(n) = ident.parse::<i64>() else {
        return not_found(format!("no log `{ident}`"));
    };
    let only = Some(("logid", Value::from(n)));
    let (_, rows) = match st.store.api_rows(Collection::Logs, only).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let Some(row) = rows.into_iter().next() else {
        return not_found(format!("no log `{ident}`"));
    };
    let logid = row.get("logid").and_then(Value::as_i64).unwrap_or(0);
    let kind = row.get("type").and_then(Value::as_str);
    if kind == Some(crate::store::janitor::DELETED) {
        return (
            [("content-type", "text/plain; charset=utf-8")],
            DELETED_LOG_TEXT,
        )
            .into_response();
    }
    let stdio = kind == Some("s");
    match st.store.log_text(logid).await {
        Ok(text) => {
            let text = if stdio {
                text.lines()
                    .map(|l| LineKind::parse(l).map_or(l, |(_, text)| text))
                    .collect::<Vec<_>>()
                    .join("\n")
                    + if text.is_empty() { "" } else { "\n" }
            } else {
                text
            };
            ([("content-type", "text/plain; charset=utf-8")], text).into_response()
        }
        Err(e) => internal(e),
    }
}
