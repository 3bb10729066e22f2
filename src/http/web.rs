//! The web page: one HTML page with its script and style, built into the
//! binary (no build step, nothing to install), reading the API and the
//! event stream. `GET /api/v2/grid` gives it the push grid in one call.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::config::BuilderConfig;
use crate::store::api::Collection;
use crate::store::grid::{GridJob, GridPush, GridQuery};

const INDEX: &str = include_str!("web/index.html");
const SCRIPT: &str = include_str!("web/kiln.js");
const STYLE: &str = include_str!("web/kiln.css");

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

pub(super) async fn index() -> Response {
    let mut r = asset("text/html; charset=utf-8", INDEX);
    // The page runs only its own script and style, and is never framed.
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    r
}

pub(super) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub(super) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /api/v2/grid?buildsets=N&before=BSID&branch=NAME`: the configured
/// builders (in the grid's column order: by category, then name; each
/// with the platform row and job symbol the push page shows it under),
/// the branches that have pushes (the one pushed to last first, each with
/// the state of its newest push), and the newest pushes made of at most N
/// buildsets (default 60), of one branch when `branch` is given (empty:
/// pushes without a branch), each with its changes, its jobs and a cell
/// per builder it asked for.
pub(super) async fn grid(
    State(st): State<Arc<AppState>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let number = |k: &str| {
        q.get(k)
            .map(|v| v.parse::<i64>().map_err(|_| k.to_string()))
    };
    let buildsets = match number("buildsets").transpose() {
        Ok(n) => n.unwrap_or(60).clamp(1, 1000) as usize,
        Err(k) => return bad(&k),
    };
    let before = match number("before").transpose() {
        Ok(b) => b,
        Err(k) => return bad(&k),
    };
    let branch = q
        .get("branch")
        .map(|b| Some(b.clone()).filter(|b| !b.is_empty()));
    let ids: BTreeMap<String, i64> = match st.store.api_rows(Collection::Builders, None).await {
        Ok((_, rows)) => rows
            .iter()
            .filter_map(|r| {
                Some((
                    r.get("name")?.as_str()?.to_string(),
                    r.get("builderid")?.as_i64()?,
                ))
            })
            .collect(),
        Err(e) => return super::internal(e),
    };
    let gen = st.builds.generation();
    let mut builders: Vec<Value> = gen
        .config
        .builders
        .iter()
        .filter_map(|b| {
            let (platform, symbol) = platform_and_symbol(b);
            Some(json!({
                "builderid": ids.get(b.name.as_str())?,
                "name": b.name,
                "category": b.category,
                "tags": b.tags,
                "platform": platform,
                "symbol": symbol,
            }))
        })
        .collect();
    builders.sort_by(|a, b| {
        let key = |v: &Value| {
            (
                v["category"].as_str().unwrap_or("").to_string(),
                v["name"].as_str().unwrap_or("").to_string(),
            )
        };
        key(a).cmp(&key(b))
    });
    let branches = match branches(&st).await {
        Ok(b) => b,
        Err(e) => return super::internal(e),
    };
    let query = GridQuery {
        buildsets,
        before,
        branch,
    };
    match st.store.grid(query).await {
        Ok(pushes) => Json(json!({
            "title": gen.config.title,
            "builders": builders,
            "branches": branches,
            "pushes": pushes,
            "meta": { "total": pushes.len() },
        }))
        .into_response(),
        Err(e) => super::internal(e),
    }
}

/// Where the push page shows a builder's jobs: its platform row (the tag
/// `platform:NAME`, else the property `platform`, else the builder's own
/// row) and its symbol (the tag `symbol:S`, else the property `symbol`,
/// else the first letter of the name's last word: `B` for a "... build").
pub(crate) fn platform_and_symbol(b: &BuilderConfig) -> (String, String) {
    let tagged = |prefix: &str| {
        b.tags
            .iter()
            .find_map(|t| t.strip_prefix(prefix))
            .filter(|v| !v.is_empty())
            .map(String::from)
    };
    let property = |name: &str| {
        b.properties
            .get(name)
            .and_then(crate::config::PropValue::as_str)
            .filter(|v| !v.is_empty())
            .map(String::from)
    };
    let platform = tagged("platform:")
        .or_else(|| property("platform"))
        .unwrap_or_else(|| b.name.to_string());
    let symbol = tagged("symbol:")
        .or_else(|| property("symbol"))
        .unwrap_or_else(|| {
            b.name
                .split_whitespace()
                .last()
                .and_then(|w| w.chars().find(|c| c.is_alphanumeric()))
                .map_or_else(|| "?".to_string(), |c| c.to_uppercase().collect())
        });
    (platform, symbol)
}

/// How many branches the push page lists.
const BRANCHES: usize = 50;

/// The branches with pushes, each with the state of its newest push.
async fn branches(st: &AppState) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for b in st.store.push_branches(BRANCHES).await? {
        let newest = st
            .store
            .grid(GridQuery {
                buildsets: 20,
                before: None,
                branch: Some(b.branch.clone()),
            })
            .await?;
        let Some(push) = newest.first() else { continue };
        out.push(json!({
            "branch": b.branch,
            "revision": push.revision,
            "submitted_at": push.submitted_at,
            "state": push_state(push),
            "counts": counts(push),
        }));
    }
    Ok(out)
}

/// A results code as the page says it (`None` for a code kiln does not
/// know).
fn result_word(code: i64) -> Option<&'static str> {
    crate::config::Results::from_code(code).map(crate::config::Results::word)
}

fn job_state(j: &GridJob) -> &'static str {
    match j.state {
        "done" => j.results.and_then(result_word).unwrap_or("exception"),
        other => other,
    }
}

/// A push's jobs counted by state (`pending`, `running`) or result.
fn counts(push: &GridPush) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for j in &push.jobs {
        *out.entry(job_state(j)).or_insert(0) += 1;
    }
    out
}

/// A push in one word: `running` while a job waits or runs, else its worst
/// result (a retried build does not count once its retry has ended).
fn push_state(push: &GridPush) -> &'static str {
    if push.jobs.iter().any(|j| j.state != "done") {
        return "running";
    }
    let worst = push
        .cells
        .iter()
        .filter_map(|c| c.results)
        .max_by_key(|r| crate::store::builds::badness(*r));
    worst.and_then(result_word).unwrap_or("success")
}

/// How many lines of output a failure summary shows when no log rule
/// flagged any.
const TAIL_LINES: usize = 30;

/// `GET /api/v2/builds/{id}/failure`: what made a build fail, for the push
/// page's job panel: `{"failure": {stepid, number, name, results, logs,
/// flagged, lines, deleted}}`, or `{"failure": null}` when every step succeeded.
pub(super) async fn failure(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(buildid) = id.parse::<i64>() else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("`{id}` is not a build id") })),
        )
            .into_response();
    };
    match st.store.failure_summary(buildid, TAIL_LINES).await {
        Ok(summary) => Json(json!({ "failure": summary })).into_response(),
        Err(e) => super::internal(e),
    }
}

/// `GET /api/v2/access`: who the caller is (`user`, null when anonymous
/// or when no users are configured) and which `www.authz` actions it may
/// do now (`may`), so that the page offers the controls that would work.
/// Wrong credentials answer 401.
pub(super) async fn access(
    State(st): State<Arc<AppState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Response {
    let verdict = {
        let access = crate::sync::read(&st.access);
        super::auth::access_of(&access, &headers, peer)
    };
    match verdict {
        Ok((user, may)) => Json(json!({ "user": user, "may": may })).into_response(),
        Err(d) => super::extract::quietly(d, &headers).into_response(),
    }
}

fn bad(key: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": format!("`{key}` must be a number") })),
    )
        .into_response()
}
