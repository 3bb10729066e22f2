//! Buildbot's control API: JSON-RPC 2.0 calls that change what the master
//! does (force a build, stop a build, cancel a request, stop or kill a
//! worker) and `POST /api/v2/reconfig`. Each checks its `www.authz`
//! action first.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::extract::{self, Caller, Rpc, Writer};
use super::AppState;
use crate::builds::CancelError;
use crate::config::SchedulerKind;
use crate::schedulers::ForceRequest;

/// `POST /api/v2/reconfig`: reloads the config now and answers with the
/// reload's record: 200 when applied, 422 with the errors when not.
pub(super) async fn reconfig(
    State(st): State<Arc<AppState>>,
    writer: Writer<extract::Reconfig>,
) -> Response {
    let trigger = format!("api ({})", writer.who());
    let (reply, answer) = tokio::sync::oneshot::channel();
    let ask = super::ReloadAsk {
        trigger,
        reply: Some(reply),
    };
    if st.reload.send(ask).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "the master is stopping" })),
        )
            .into_response();
    }
    match answer.await {
        Ok(r) => {
            let status = if r.record.applied {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            (
                status,
                Json(json!({ "reloads": [r], "meta": { "total": 1 } })),
            )
                .into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "the master stopped before the reload finished" })),
        )
            .into_response(),
    }
}

pub(super) async fn list_force_schedulers(State(st): State<Arc<AppState>>) -> Json<Value> {
    let list: Vec<Value> = st
        .schedulers
        .force_schedulers()
        .into_iter()
        .map(|c| {
            let (button_name, label) = match &c.kind {
                SchedulerKind::ForceScheduler { button_name, label } => {
                    (button_name.clone(), label.clone())
                }
                _ => (String::new(), String::new()),
            };
            json!({
                "name": c.name,
                "builder_names": c.builder_names,
                "button_name": button_name,
                "label": label,
                "all_fields": [],
            })
        })
        .collect();
    let total = list.len();
    Json(json!({ "forceschedulers": list, "meta": { "total": total } }))
}

/// Buildbot's JSON-RPC call `{"method": "force", "params": {...}}`.
pub(super) async fn force_rpc(
    State(st): State<Arc<AppState>>,
    writer: Writer<extract::Force>,
    Path(name): Path<String>,
    rpc: Rpc,
) -> Response {
    if rpc.method != "force" {
        return rpc.no_such_method("the only method is `force`");
    }
    let params = &rpc.params;
    let text = |k: &str| params.get(k).and_then(Value::as_str).map(String::from);
    let builders = match params.get("builderNames") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        Some(_) => {
            return rpc.error(
                StatusCode::BAD_REQUEST,
                -32602,
                "`builderNames` must be a list".into(),
            )
        }
    };
    let properties = match params.get("properties") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m.clone().into_iter().collect(),
        Some(_) => {
            return rpc.error(
                StatusCode::BAD_REQUEST,
                -32602,
                "`properties` must be an object".into(),
            )
        }
    };
    let request = ForceRequest {
        builders,
        branch: text("branch").filter(|b| !b.is_empty()),
        revision: text("revision").filter(|r| !r.is_empty()),
        repository: text("repository").unwrap_or_default(),
        project: text("project").unwrap_or_default(),
        reason: text("reason").unwrap_or_default(),
        owner: if writer.user.is_empty() {
            text("owner").unwrap_or_default()
        } else {
            writer.user
        },
        properties,
    };
    match st.schedulers.force(&name, request).await {
        Ok(ids) => {
            let brids: serde_json::Map<String, Value> = ids
                .brids
                .iter()
                .map(|r| (r.builderid.to_string(), json!(r.brid)))
                .collect();
            rpc.result(json!([ids.bsid, brids]))
        }
        Err(e) => rpc.error(StatusCode::BAD_REQUEST, -32602, format!("{e:#}")),
    }
}

/// The one-item calls (stop a build, cancel a request): their method, and
/// what the item is called in errors.
struct ItemKind {
    method: &'static str,
    what: &'static str,
}

const STOP_BUILD: ItemKind = ItemKind {
    method: "stop",
    what: "build",
};

const CANCEL_REQUEST: ItemKind = ItemKind {
    method: "cancel",
    what: "build request",
};

/// A one-item call's item id (from the path) and reason (with who gave
/// it), once the method is the kind's.
#[allow(clippy::result_large_err)] // the error is the response itself
fn item_call(
    kind: &ItemKind,
    path_id: &str,
    rpc: &Rpc,
    user: &str,
) -> Result<(i64, String), Response> {
    let Ok(item) = path_id.parse::<i64>() else {
        return Err(rpc.error(
            StatusCode::NOT_FOUND,
            -32602,
            format!("`{path_id}` is not a {} id", kind.what),
        ));
    };
    if rpc.method != kind.method {
        return Err(
            rpc.no_such_method(&format!("{}s have the method `{}`", kind.what, kind.method))
        );
    }
    let mut reason = rpc
        .params
        .get("reason")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
        .unwrap_or("no reason given")
        .to_string();
    if !user.is_empty() {
        reason = format!("{reason} (by {user})");
    }
    Ok((item, reason))
}

/// `POST /api/v2/builds/{id}`: Buildbot's controls of a build, `stop`
/// (with `{"reason"}`) and `rebuild` (a new request for the build's
/// builder with its sources and properties; answers `[bsid, {builderid:
/// brid}]` as `force` does).
pub(super) async fn build_rpc(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    rpc: Rpc,
) -> Response {
    match rpc.method.as_str() {
        "rebuild" => match caller.writer::<extract::Rebuild>(&st) {
            Ok(w) => rebuild(&st, &w.user, &id, &rpc).await,
            Err(r) => r,
        },
        "stop" => match caller.writer::<extract::Stop>(&st) {
            Ok(w) => stop(&st, &w.user, &id, &rpc).await,
            Err(r) => r,
        },
        _ => rpc.no_such_method("builds have the methods `stop` and `rebuild`"),
    }
}

async fn stop(st: &AppState, user: &str, id: &str, rpc: &Rpc) -> Response {
    let (build, reason) = match item_call(&STOP_BUILD, id, rpc, user) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if st.builds.stop_build(build, &reason) {
        rpc.result(json!(null))
    } else if let Some(master) = st.builds.stop_elsewhere(build, &reason).await {
        tracing::info!("build {build} runs on master {master}: asked it to stop");
        rpc.result(json!(null))
    } else {
        rpc.error(
            StatusCode::NOT_FOUND,
            -32602,
            format!("build {build} is not running"),
        )
    }
}

async fn rebuild(st: &AppState, user: &str, id: &str, rpc: &Rpc) -> Response {
    let Ok(build) = id.parse::<i64>() else {
        return rpc.error(
            StatusCode::NOT_FOUND,
            -32602,
            format!("`{id}` is not a build id"),
        );
    };
    let mut reason = format!("rebuild of build {build}");
    if !user.is_empty() {
        reason = format!("{reason} (by {user})");
    }
    // Only a builder the config has now can build the new request.
    let builder = match st.store.build_builder(build).await {
        Ok(Some(name)) => name,
        Ok(None) => {
            return rpc.error(
                StatusCode::NOT_FOUND,
                -32602,
                format!("there is no build {build}"),
            )
        }
        Err(e) => return rpc.error(StatusCode::INTERNAL_SERVER_ERROR, -32603, format!("{e:#}")),
    };
    if !st
        .builds
        .generation()
        .config
        .builders
        .iter()
        .any(|b| b.name == builder)
    {
        return rpc.error(
            StatusCode::CONFLICT,
            -32602,
            format!("builder `{builder}` of build {build} is no longer in the config"),
        );
    }
    match st.store.rebuild(build, reason.clone()).await {
        Ok(Some(ids)) => {
            tracing::info!("{reason}: buildset {}", ids.bsid);
            st.builds.wake();
            let brids: serde_json::Map<String, Value> = ids
                .brids
                .iter()
                .map(|r| (r.builderid.to_string(), json!(r.brid)))
                .collect();
            rpc.result(json!([ids.bsid, brids]))
        }
        Ok(None) => rpc.error(
            StatusCode::NOT_FOUND,
            -32602,
            format!("there is no build {build}"),
        ),
        Err(e) => rpc.error(StatusCode::INTERNAL_SERVER_ERROR, -32603, format!("{e:#}")),
    }
}

/// `POST /api/v2/buildrequests/{id}` with `{"method": "cancel", "params":
/// {"reason"}}`: Buildbot's cancel control.
pub(super) async fn buildrequest_rpc(
    State(st): State<Arc<AppState>>,
    writer: Writer<extract::Cancel>,
    Path(id): Path<String>,
    rpc: Rpc,
) -> Response {
    let (request, reason) = match item_call(&CANCEL_REQUEST, &id, &rpc, &writer.user) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match st.builds.cancel_request(request, &reason).await {
        Ok(msg) => rpc.result(json!(msg)),
        Err(e) => {
            let status = match e {
                CancelError::Missing(_) => StatusCode::NOT_FOUND,
                CancelError::Complete(_) | CancelError::NotRunningHere(_) => StatusCode::CONFLICT,
                CancelError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            rpc.error(status, -32602, e.to_string())
        }
    }
}

/// `POST /api/v2/workers/{name or id}` with the method `stop` (graceful:
/// no new builds, then shut down) or `kill` (shut down now; its builds end
/// RETRY and run again).
pub(super) async fn worker_rpc(
    State(st): State<Arc<AppState>>,
    _writer: Writer<extract::Workers>,
    Path(name): Path<String>,
    rpc: Rpc,
) -> Response {
    let graceful = match rpc.method.as_str() {
        "stop" => true,
        "kill" => false,
        _ => return rpc.no_such_method("workers have the methods `stop` and `kill`"),
    };
    // A worker id, as Buildbot's API uses, or its name.
    let name = match name.parse::<i64>() {
        Ok(id) => match st.store.workers().await {
            Ok(ws) => ws
                .into_iter()
                .find(|w| w.workerid == id)
                .map_or(name, |w| w.name),
            Err(e) => {
                return rpc.error(StatusCode::INTERNAL_SERVER_ERROR, -32603, format!("{e:#}"))
            }
        },
        Err(_) => name,
    };
    match st.builds.shutdown_worker(&name, graceful).await {
        Ok(msg) => rpc.result(json!(msg)),
        Err(e) => rpc.error(StatusCode::NOT_FOUND, -32602, format!("{e:#}")),
    }
}
