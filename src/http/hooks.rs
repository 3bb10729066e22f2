//! Buildbot's change hooks: `POST /change_hook/base` (a change from a form,
//! as `buildbot sendchange` and scripts post it) and `/change_hook/poller`
//! (poll these pollers now).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::store::{NewChange, Properties};

use super::extract::Hook;
use super::AppState;

pub(super) fn bad_request(reason: impl Into<String>) -> Response {
    let reason = reason.into();
    tracing::warn!("change hook: refused: {reason}");
    (StatusCode::BAD_REQUEST, Json(json!({ "error": reason }))).into_response()
}

/// The form fields Buildbot's base hook reads.
pub(super) const FIELDS: &[&str] = &[
    "author",
    "who",
    "committer",
    "comments",
    "files",
    "revision",
    "branch",
    "repository",
    "project",
    "category",
    "codebase",
    "revlink",
    "properties",
    "when_timestamp",
];

/// Turns the base hook's form into a change, or says what is wrong.
pub fn change_from_form(form: &BTreeMap<String, String>) -> Result<NewChange, String> {
    if let Some(unknown) = form.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "unknown field `{unknown}`; the base hook takes: {}",
            FIELDS.join(", ")
        ));
    }
    let get = |k: &str| form.get(k).filter(|v| !v.is_empty()).cloned();
    let author = get("author")
        .or_else(|| get("who"))
        .ok_or("`author` is required")?;
    let files = match get("files") {
        None => vec![],
        Some(text) => serde_json::from_str::<Vec<String>>(&text)
            .map_err(|e| format!("`files` must be a JSON list of strings: {e}"))?,
    };
    let properties = match get("properties") {
        None => Properties::new(),
        Some(text) => serde_json::from_str::<serde_json::Map<String, Value>>(&text)
            .map_err(|e| format!("`properties` must be a JSON object: {e}"))?
            .into_iter()
            .map(|(k, v)| (k, (v, "Change".to_string())))
            .collect(),
    };
    let when_timestamp = match get("when_timestamp") {
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
        Some(t) => t
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|t| t.is_finite() && *t >= 0.0)
            .map(|t| t as i64)
            .ok_or_else(|| format!("`when_timestamp` must be Unix seconds, not `{t}`"))?,
    };
    Ok(NewChange {
        author,
        committer: get("committer"),
        comments: get("comments").unwrap_or_default(),
        branch: get("branch"),
        revision: get("revision"),
        revlink: get("revlink"),
        when_timestamp,
        category: get("category"),
        repository: get("repository").unwrap_or_default(),
        codebase: get("codebase").unwrap_or_default(),
        project: get("project").unwrap_or_default(),
        files,
        properties,
    })
}

/// Buildbot's `poller` change hook: `?poller=NAME` (repeatable; a poller's
/// name or repository) polls those pollers now, no `poller` polls them all.
pub(super) async fn change_hook_poller(
    State(st): State<Arc<AppState>>,
    _caller: Hook,
    query: Result<
        axum::extract::Query<Vec<(String, String)>>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Response {
    let axum::extract::Query(pairs) = match query {
        Ok(q) => q,
        Err(e) => return bad_request(format!("bad query string: {}", e.body_text())),
    };
    let mut names = Vec::new();
    for (k, v) in pairs {
        if k != "poller" {
            return bad_request(format!(
                "unknown parameter `{k}`; the poller hook takes `poller`"
            ));
        }
        names.push(v);
    }
    match st.poll_now.poll(&names) {
        Ok(polled) => {
            tracing::info!("poller hook: polling {polled:?}");
            (StatusCode::OK, Json(json!({ "polled": polled }))).into_response()
        }
        Err(unknown) => bad_request(format!("no poller is called {}", unknown.join(", "))),
    }
}

pub(super) async fn change_hook_base(
    State(st): State<Arc<AppState>>,
    _caller: Hook,
    form: Result<Form<BTreeMap<String, String>>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Form(form) = match form {
        Ok(f) => f,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            tracing::warn!("change hook: refused a body over {} bytes", super::MAX_BODY);
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                Json(json!({ "error": format!("the body is over {} bytes", super::MAX_BODY) })),
            )
                .into_response();
        }
        Err(e) => return bad_request(format!("the body is not a form: {}", e.body_text())),
    };
    let change = match change_from_form(&form) {
        Ok(c) => c,
        Err(reason) => return bad_request(reason),
    };
    match st
        .store
        .add_changes("change_hook", vec![change], vec![])
        .await
    {
        Ok(stored) => {
            let ids: Vec<i64> = stored.iter().map(|c| c.changeid).collect();
            tracing::info!("change hook: stored change {ids:?}");
            (StatusCode::OK, Json(json!({ "changeids": ids }))).into_response()
        }
        Err(e) => {
            tracing::error!("change hook: cannot store the change: {e:#}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": format!("cannot store the change: {e:#}") })),
            )
                .into_response()
        }
    }
}

/// Property-based checks: any form the base hook is posted (known and
/// unknown fields, any values) becomes a change or a message, never a
/// panic. `PROPTEST_CASES=N` runs more (bench/fuzz.sh).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::collection::btree_map;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fuzz_any_base_hook_form_is_a_change_or_refused(
            form in btree_map(
                prop_oneof![
                    prop::sample::select(FIELDS.to_vec()).prop_map(String::from),
                    ".{0,8}",
                ],
                prop_oneof![
                    ".{0,16}",
                    Just("[\"a.c\", \"b/c.h\"]".to_string()),
                    Just("{\"k\": [1, 2]}".to_string()),
                    Just("1700000000".to_string()),
                    Just("-1e400".to_string()),
                ],
                0..10,
            ),
        ) {
            match change_from_form(&form) {
                Ok(c) => prop_assert!(!c.author.is_empty()),
                Err(e) => prop_assert!(!e.is_empty()),
            }
        }
    }
}
