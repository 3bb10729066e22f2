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
use crate::store::api::Collection;

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

/// `GET /api/v2/grid?buildsets=N&before=BSID`: the configured builders (in
/// the grid's column order: by category, then name) and the newest pushes
/// made of at most N buildsets (default 60), each with its changes and a
/// cell per builder it asked for.
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
            Some(json!({
                "builderid": ids.get(&b.name)?,
                "name": b.name,
                "category": b.category,
                "tags": b.tags,
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
    match st.store.grid(buildsets, before).await {
        Ok(pushes) => Json(json!({
            "title": gen.config.title,
            "builders": builders,
            "pushes": pushes,
            "meta": { "total": pushes.len() },
        }))
        .into_response(),
        Err(e) => super::internal(e),
    }
}

fn bad(key: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": format!("`{key}` must be a number") })),
    )
        .into_response()
}
