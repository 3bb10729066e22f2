//! The read API: Buildbot's data API collections under `/api/v2/`, with
//! its query conventions: `field=value` (repeated: any of them),
//! `field__ne|lt|le|gt|ge|contains=value`, `order=field` / `order=-field`,
//! `limit`, `offset`, and `field=name` projection; lists as
//! `{"<name>": [...], "meta": {"total": n}}` (total before paging); a JSON
//! 404 for what does not exist.

use std::cmp::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rusqlite::types::Value as SqlValue;
use serde_json::{json, Map, Value};

use super::AppState;
use crate::store::api::Collection;

type Params = Query<Vec<(String, String)>>;
type Row = Map<String, Value>;

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

/// How `value` compares with a query's text.
fn compare(value: &Value, text: &str) -> Option<Ordering> {
    match value {
        Value::Number(n) => n.as_f64()?.partial_cmp(&text.parse::<f64>().ok()?),
        Value::Bool(b) => {
            let t = match text {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return None,
            };
            Some(b.cmp(&t))
        }
        Value::String(s) => Some(s.as_str().cmp(text)),
        Value::Null => (text == "null" || text.is_empty()).then_some(Ordering::Equal),
        _ => None,
    }
}

fn contains(value: &Value, text: &str) -> bool {
    match value {
        Value::String(s) => s.contains(text),
        Value::Array(a) => a.iter().any(|v| compare(v, text) == Some(Ordering::Equal)),
        _ => false,
    }
}

/// What a query asks of a list.
struct Ask {
    filters: Vec<(String, String, Vec<String>)>,
    order: Vec<(String, bool)>,
    limit: Option<usize>,
    offset: usize,
    fields: Vec<String>,
}

fn parse(params: &[(String, String)], known: &[String]) -> Result<Ask, String> {
    let mut q = Ask {
        filters: Vec::new(),
        order: Vec::new(),
        limit: None,
        offset: 0,
        fields: Vec::new(),
    };
    let check = |f: &str| {
        if known.iter().any(|k| k == f) {
            Ok(())
        } else {
            Err(format!(
                "unknown field `{f}`; the fields are {}",
                known.join(", ")
            ))
        }
    };
    for (k, v) in params {
        match k.as_str() {
            "order" => {
                for part in v.split(',').filter(|p| !p.is_empty()) {
                    let (name, desc) = match part.strip_prefix('-') {
                        Some(n) => (n, true),
                        None => (part, false),
                    };
                    check(name)?;
                    q.order.push((name.to_string(), desc));
                }
            }
            "limit" => {
                q.limit = Some(
                    v.parse()
                        .map_err(|_| format!("`limit` must be a number, not {v:?}"))?,
                )
            }
            "offset" => {
                q.offset = v
                    .parse()
                    .map_err(|_| format!("`offset` must be a number, not {v:?}"))?
            }
            "field" => {
                for f in v.split(',').filter(|p| !p.is_empty()) {
                    check(f)?;
                    q.fields.push(f.to_string());
                }
            }
            _ => {
                let (name, op) = match k.rsplit_once("__") {
                    Some((n, op)) => (n, op),
                    None => (k.as_str(), "eq"),
                };
                if !["eq", "ne", "lt", "le", "gt", "ge", "contains"].contains(&op) {
                    return Err(format!(
                        "unknown operator `__{op}`; use __eq, __ne, __lt, __le, __gt, __ge or __contains"
                    ));
                }
                check(name)?;
                match q
                    .filters
                    .iter_mut()
                    .find(|(n, o, _)| n == name && o == op && (op == "eq" || op == "contains"))
                {
                    Some((_, _, values)) => values.push(v.clone()),
                    None => q
                        .filters
                        .push((name.to_string(), op.to_string(), vec![v.clone()])),
                }
            }
        }
    }
    Ok(q)
}

fn keep(row: &Row, (name, op, values): &(String, String, Vec<String>)) -> bool {
    let v = row.get(name).unwrap_or(&Value::Null);
    values.iter().any(|text| match op.as_str() {
        "contains" => contains(v, text),
        op => {
            let Some(o) = compare(v, text) else {
                return op == "ne";
            };
            match op {
                "eq" => o == Ordering::Equal,
                "ne" => o != Ordering::Equal,
                "lt" => o == Ordering::Less,
                "le" => o != Ordering::Greater,
                "gt" => o == Ordering::Greater,
                _ => o != Ordering::Less,
            }
        }
    })
}

fn order_values(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Null, _) => Ordering::Less,
        (_, Value::Null) => Ordering::Greater,
        _ => Ordering::Equal,
    }
}

/// A query argument as SQLite should compare it: an integer or a real
/// when the text is a number (so a numeric column compares numerically
/// and a text column as text, as the API does), else text.
fn sql_arg(text: &str) -> SqlValue {
    if let Ok(i) = text.parse::<i64>() {
        SqlValue::Integer(i)
    } else if let Ok(f) = text.parse::<f64>() {
        SqlValue::Real(f)
    } else {
        SqlValue::Text(text.to_string())
    }
}

fn bool_text(text: &str) -> Option<bool> {
    match text {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// One filter as SQL with exactly the meaning [`keep`] gives it, or `None`
/// when SQL would mean something else (then the rows are filtered here).
fn filter_sql(
    alias: &str,
    (_, op, values): &(String, String, Vec<String>),
) -> Option<(String, Vec<SqlValue>)> {
    if alias.ends_with("__json") {
        return None;
    }
    let is_bool = alias.ends_with("__bool");
    let col = format!("\"{alias}\"");
    let mut parts = Vec::new();
    let mut args = Vec::new();
    for text in values {
        let numeric = text.parse::<f64>().is_ok();
        let arg = if is_bool {
            SqlValue::Integer(bool_text(text)? as i64)
        } else {
            sql_arg(text)
        };
        let null_text = !is_bool && (text.is_empty() || text == "null");
        let part = match op.as_str() {
            "contains" if is_bool || numeric => return None,
            "contains" => format!("instr({col}, ?) > 0"),
            "eq" if null_text => format!("({col} IS NULL OR {col} = ?)"),
            "eq" => format!("{col} = ?"),
            "ne" if null_text => format!("({col} IS NOT NULL AND {col} != ?)"),
            "ne" => format!("({col} IS NULL OR {col} != ?)"),
            _ if !numeric && !is_bool => return None,
            "lt" => format!("{col} < ?"),
            "le" => format!("{col} <= ?"),
            "gt" => format!("{col} > ?"),
            _ => format!("{col} >= ?"),
        };
        parts.push(part);
        args.push(arg);
    }
    Some((parts.join(" OR "), args))
}

/// The whole query as one SQL read, when every filter and order can be.
fn select_of(
    columns: &[String],
    pre: &Option<(&'static str, Value)>,
    q: &Ask,
) -> Option<crate::store::api::Select> {
    let alias = |field: &str| {
        columns
            .iter()
            .find(|a| crate::store::api::field_of(a) == field)
            .cloned()
    };
    let mut sel = crate::store::api::Select {
        limit: q.limit,
        offset: q.offset,
        ..Default::default()
    };
    if let Some((field, v)) = pre {
        let arg = match v {
            Value::Number(n) => SqlValue::Integer(n.as_i64()?),
            Value::String(s) => SqlValue::Text(s.clone()),
            _ => return None,
        };
        sel.conditions
            .push((format!("\"{}\" = ?", alias(field)?), vec![arg]));
    }
    for f in &q.filters {
        sel.conditions.push(filter_sql(&alias(&f.0)?, f)?);
    }
    for (field, desc) in &q.order {
        let a = alias(field)?;
        if a.ends_with("__json") {
            return None;
        }
        sel.order.push((a, *desc));
    }
    Some(sel)
}

/// A collection's items, narrowed by `pre` (the path's own filter) and the
/// query: in SQL when it can be said there (an index answers
/// `builds?order=-buildid&limit=100` without reading every build), else by
/// reading the rows and filtering, ordering and paging them here.
async fn list(
    st: &AppState,
    c: Collection,
    pre: Option<(&'static str, Value)>,
    params: &[(String, String)],
) -> Response {
    let (key, id) = c.names();
    let columns = match st.store.api_columns(c).await {
        Ok(cols) => cols,
        Err(e) => return internal(e),
    };
    let known: Vec<String> = columns
        .iter()
        .map(|a| crate::store::api::field_of(a).to_string())
        .collect();
    let q = match parse(params, &known) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    let project = |mut r: Row| {
        if !q.fields.is_empty() {
            r.retain(|k, _| q.fields.contains(k));
        }
        Value::Object(r)
    };
    if let Some(sel) = select_of(&columns, &pre, &q) {
        return match st.store.api_select(c, sel).await {
            Ok((_, rows, total)) => {
                let page: Vec<Value> = rows.into_iter().map(project).collect();
                Json(json!({ key: page, "meta": { "total": total } })).into_response()
            }
            Err(e) => internal(e),
        };
    }
    let rows = match st.store.api_rows(c, pre).await {
        Ok((_, rows)) => rows,
        Err(e) => return internal(e),
    };
    let (page, total) = in_memory(rows, &q, id);
    let page: Vec<Value> = page.into_iter().map(project).collect();
    Json(json!({ key: page, "meta": { "total": total } })).into_response()
}

/// Filters, orders and pages rows here (what SQL cannot say as the API
/// means it); returns the page and the total before paging.
fn in_memory(rows: Vec<Row>, q: &Ask, id: &str) -> (Vec<Row>, usize) {
    let mut rows: Vec<Row> = rows
        .into_iter()
        .filter(|r| q.filters.iter().all(|f| keep(r, f)))
        .collect();
    let order = if q.order.is_empty() {
        vec![(id.to_string(), false)]
    } else {
        q.order.clone()
    };
    rows.sort_by(|a, b| {
        for (name, desc) in &order {
            let o = order_values(
                a.get(name).unwrap_or(&Value::Null),
                b.get(name).unwrap_or(&Value::Null),
            );
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    });
    let total = rows.len();
    let page = rows
        .into_iter()
        .skip(q.offset)
        .take(q.limit.unwrap_or(usize::MAX))
        .collect();
    (page, total)
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
    let by_name = matches!(c, Collection::Builders | Collection::Workers);
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

/// The configured schedulers as Buildbot's `schedulers` lists them (with
/// kiln's `type` and `builderNames` besides).
async fn scheduler_rows(st: &AppState) -> anyhow::Result<Vec<Row>> {
    let gen = st.builds.generation();
    let masterid = st.builds.masterid();
    let master = st
        .store
        .call(move |c| {
            Ok(c.query_row(
                "SELECT name, active, last_active FROM masters WHERE id = ?1",
                [masterid],
                |r| {
                    Ok(json!({ "masterid": masterid, "name": r.get::<_, String>(0)?,
                               "active": r.get::<_, i64>(1)? != 0, "last_active": r.get::<_, i64>(2)? }))
                },
            )?)
        })
        .await?;
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
    let q = match parse(params, &known) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    let (page, total) = in_memory(rows, &q, "schedulerid");
    let page: Vec<Value> = page
        .into_iter()
        .map(|mut r| {
            if !q.fields.is_empty() {
                r.retain(|k, _| q.fields.contains(k));
            }
            Value::Object(r)
        })
        .collect();
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

pub(super) async fn builder_builds(
    State(st): State<Arc<AppState>>,
    Path(ident): Path<String>,
    Query(p): Params,
) -> Response {
    children(&st, Collection::Builders, &ident, Collection::Builds, &p).await
}

pub(super) async fn build_steps(
    State(st): State<Arc<AppState>>,
    Path(ident): Path<String>,
    Query(p): Params,
) -> Response {
    children(&st, Collection::Builds, &ident, Collection::Steps, &p).await
}

pub(super) async fn step_logs(
    State(st): State<Arc<AppState>>,
    Path(ident): Path<String>,
    Query(p): Params,
) -> Response {
    children(&st, Collection::Steps, &ident, Collection::Logs, &p).await
}

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
    let stdio = row.get("type").and_then(Value::as_str) == Some("s");
    match st.store.log_text(logid).await {
        Ok(text) => {
            let text = if stdio {
                text.lines()
                    .map(|l| l.get(1..).unwrap_or(""))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::buildsets::{NewBuildset, Source, SourceStamp};
    use crate::store::{NewChange, Store};

    /// Every query below, read in SQL and filtered here, gives the same
    /// items in the same order and the same total.
    #[tokio::test]
    async fn sql_reads_mean_what_the_in_memory_filters_mean() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = Store::open(&tmp.path().join("s.sqlite")).expect("store");
        let master = store.master_started("m").await.expect("master");
        for (i, author) in ["ann <a@x>", "bob <b@x>", "ann <a@x>", "cy"]
            .iter()
            .enumerate()
        {
            let ch = NewChange {
                author: author.to_string(),
                comments: format!("change {i}"),
                branch: (i != 3).then(|| "main".to_string()),
                revision: Some(format!("{}", 100 + i)),
                when_timestamp: 1000 + i as i64,
                ..NewChange::default()
            };
            store
                .add_changes("test", vec![ch], vec![])
                .await
                .expect("change");
        }
        for i in 0..7 {
            let bs = store
                .add_buildset(NewBuildset {
                    scheduler: "s".into(),
                    reason: "r".into(),
                    external_idstring: None,
                    source: Source::New(vec![SourceStamp::default()]),
                    properties: Default::default(),
                    builders: vec![if i % 2 == 0 { "linux" } else { "win" }.to_string()],
                    priority: 0,
                    parent_buildid: None,
                })
                .await
                .expect("buildset");
            let r = &bs.brids[0];
            store.claim_request(r.brid, master).await.expect("claim");
            let (id, _) = store
                .new_build(r.builderid, r.brid, None, master, Default::default())
                .await
                .expect("build");
            if i < 5 {
                store
                    .finish_build(id, (i % 3) as i64, "done")
                    .await
                    .expect("finish");
            }
        }
        let queries: &[(Collection, &str)] = &[
            (Collection::Builds, "limit=3"),
            (Collection::Builds, "order=-buildid&limit=2&offset=1"),
            (Collection::Builds, "results=1"),
            (Collection::Builds, "results=0&results=2&order=-number"),
            (Collection::Builds, "results__ne=0"),
            (Collection::Builds, "results=null"),
            (Collection::Builds, "results__lt=2&order=builderid,-buildid"),
            (Collection::Builds, "complete=false"),
            (Collection::Builds, "complete=true&limit=2"),
            (Collection::Builds, "buildid__gt=2&buildid__le=6"),
            (Collection::Builds, "state_string__contains=on"),
            (Collection::Builds, "order=-results"),
            (Collection::Changes, "author__contains=ann"),
            (Collection::Changes, "branch=null"),
            (Collection::Changes, "branch__ne=main"),
            (Collection::Changes, "revision=101"),
            (Collection::Changes, "revision__gt=101&order=-changeid"),
            (Collection::Changes, "comments=change 2"),
            (
                Collection::BuildRequests,
                "claimed=true&order=-buildrequestid&limit=4",
            ),
        ];
        for (c, query) in queries {
            let params: Vec<(String, String)> = query
                .split('&')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("k=v");
                    (k.to_string(), v.to_string())
                })
                .collect();
            let columns = store.api_columns(*c).await.expect("columns");
            let known: Vec<String> = columns
                .iter()
                .map(|a| crate::store::api::field_of(a).to_string())
                .collect();
            let q = parse(&params, &known).expect("query");
            let sel =
                select_of(&columns, &None, &q).unwrap_or_else(|| panic!("{query} is said in SQL"));
            let (_, sql_rows, sql_total) = store.api_select(*c, sel).await.expect("select");
            let (_, all) = store.api_rows(*c, None).await.expect("rows");
            let (mem_rows, mem_total) = in_memory(all, &q, c.names().1);
            assert_eq!(sql_total, mem_total, "{query}: total");
            assert_eq!(sql_rows, mem_rows, "{query}: rows");
            assert!(
                sql_total > 0 || query.contains("null"),
                "{query} finds something"
            );
        }
        // What SQL would mean differently stays here.
        let cols = store
            .api_columns(Collection::Builds)
            .await
            .expect("columns");
        let known: Vec<String> = cols
            .iter()
            .map(|a| crate::store::api::field_of(a).to_string())
            .collect();
        for query in ["results__lt=abc", "complete=maybe", "results__contains=1"] {
            let (k, v) = query.split_once('=').expect("k=v");
            let q = parse(&[(k.to_string(), v.to_string())], &known).expect("query");
            assert!(select_of(&cols, &None, &q).is_none(), "{query}");
        }
    }
}
