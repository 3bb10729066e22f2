//! Buildbot's control API: JSON-RPC 2.0 calls that change what the master
//! does (force a build, stop a build, cancel a request, stop or kill a
//! worker) and `POST /api/v2/reconfig`. Each checks its `www.authz`
//! action first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::config::WwwAction;

use crate::config::SchedulerKind;
use crate::schedulers::ForceRequest;

use super::AppState;
use crate::builds::CancelError;

/// `POST /api/v2/reconfig`: reloads the config now and answers with the
/// reload's record: 200 when applied, 422 with the errors when not.
pub(super) async fn reconfig(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let user = match st.writer(&headers, peer, WwwAction::Reconfig) {
        Ok(u) => u,
        Err(d) => return d.into_response(),
    };
    let trigger = if user.is_empty() {
        format!("api ({})", peer.ip())
    } else {
        format!("api ({user})")
    };
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
            let status = if r.applied {
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let owner = match st.writer(&headers, peer, WwwAction::Force) {
        Ok(u) => u,
        Err(d) => return d.into_response(),
    };
    let (id, method, params) = match rpc_call(&body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if method != "force" {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            &id,
            -32601,
            "the only method is `force`".into(),
        );
    }
    let text = |k: &str| params.get(k).and_then(Value::as_str).map(String::from);
    let builders = match params.get("builderNames") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        Some(_) => {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                &id,
                -32602,
                "`builderNames` must be a list".into(),
            )
        }
    };
    let properties = match params.get("properties") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m.clone().into_iter().collect(),
        Some(_) => {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                &id,
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
        owner: if owner.is_empty() {
            text("owner").unwrap_or_default()
        } else {
            owner
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
            rpc_result(&id, json!([ids.bsid, brids]))
        }
        Err(e) => rpc_error(StatusCode::BAD_REQUEST, &id, -32602, format!("{e:#}")),
    }
}

/// A JSON-RPC 2.0 error answer, as Buildbot's control API gives them.
pub(super) fn rpc_error(status: StatusCode, id: &Value, code: i64, msg: String) -> Response {
    (
        status,
        Json(json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": msg } })),
    )
        .into_response()
}

/// A JSON-RPC call: (id, method, params), or the error answer.
#[allow(clippy::result_large_err)] // the error is the response itself, answered at once
pub(super) fn rpc_call(body: &[u8]) -> Result<(Value, String, Value), Response> {
    let req: Value = serde_json::from_slice(body).map_err(|e| {
        rpc_error(
            StatusCode::BAD_REQUEST,
            &Value::Null,
            -32700,
            format!("not JSON: {e}"),
        )
    })?;
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let Some(method) = req.get("method").and_then(Value::as_str) else {
        return Err(rpc_error(
            StatusCode::BAD_REQUEST,
            &id,
            -32600,
            "no `method`".into(),
        ));
    };
    let params = req.get("params").cloned().unwrap_or_else(|| json!({}));
    Ok((id.clone(), method.to_string(), params))
}

/// A successful JSON-RPC answer.
fn rpc_result(id: &Value, result: Value) -> Response {
    Json(json!({ "jsonrpc": "2.0", "id": id, "result": result })).into_response()
}

/// The one-item calls (stop a build, cancel a request): the action they
/// need, their method, and what the item is called in errors.
struct ItemKind {
    action: WwwAction,
    method: &'static str,
    what: &'static str,
}

const STOP_BUILD: ItemKind = ItemKind {
    action: WwwAction::Stop,
    method: "stop",
    what: "build",
};

const CANCEL_REQUEST: ItemKind = ItemKind {
    action: WwwAction::Cancel,
    method: "cancel",
    what: "build request",
};

/// A one-item call, once the writer may do its action, the path names an
/// id and the method is the kind's: the call's id, the item's id, and the
/// reason (with who gave it).
struct ItemCall {
    rpc_id: Value,
    item: i64,
    reason: String,
}

#[allow(clippy::result_large_err)] // the error is the response itself
fn item_call(
    st: &AppState,
    headers: &HeaderMap,
    peer: SocketAddr,
    kind: &ItemKind,
    path_id: &str,
    body: &[u8],
) -> Result<ItemCall, Response> {
    let who = st
        .writer(headers, peer, kind.action)
        .map_err(IntoResponse::into_response)?;
    let (rpc_id, called, params) = rpc_call(body)?;
    let Ok(item) = path_id.parse::<i64>() else {
        return Err(rpc_error(
            StatusCode::NOT_FOUND,
            &rpc_id,
            -32602,
            format!("`{path_id}` is not a {} id", kind.what),
        ));
    };
    if called != kind.method {
        return Err(rpc_error(
            StatusCode::BAD_REQUEST,
            &rpc_id,
            -32601,
            format!(
                "{}s have the method `{}`, not `{called}`",
                kind.what, kind.method
            ),
        ));
    }
    let mut reason = params
        .get("reason")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
        .unwrap_or("no reason given")
        .to_string();
    if !who.is_empty() {
        reason = format!("{reason} (by {who})");
    }
    Ok(ItemCall {
        rpc_id,
        item,
        reason,
    })
}

/// `POST /api/v2/builds/{id}` with `{"method": "stop", "params": {"reason"}}`:
/// Buildbot's stop control.
pub(super) async fn build_rpc(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let call = match item_call(&st, &headers, peer, &STOP_BUILD, &id, &body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if st.builds.stop_build(call.item, &call.reason) {
        rpc_result(&call.rpc_id, json!(null))
    } else if let Some(master) = st.builds.stop_elsewhere(call.item, &call.reason).await {
        tracing::info!(
            "build {} runs on master {master}: asked it to stop",
            call.item
        );
        rpc_result(&call.rpc_id, json!(null))
    } else {
        rpc_error(
            StatusCode::NOT_FOUND,
            &call.rpc_id,
            -32602,
            format!("build {} is not running", call.item),
        )
    }
}

/// `POST /api/v2/buildrequests/{id}` with `{"method": "cancel", "params":
/// {"reason"}}`: Buildbot's cancel control.
pub(super) async fn buildrequest_rpc(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let call = match item_call(&st, &headers, peer, &CANCEL_REQUEST, &id, &body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match st.builds.cancel_request(call.item, &call.reason).await {
        Ok(msg) => rpc_result(&call.rpc_id, json!(msg)),
        Err(e) => {
            let status = match e {
                CancelError::Missing(_) => StatusCode::NOT_FOUND,
                CancelError::Complete(_) | CancelError::NotRunningHere(_) => StatusCode::CONFLICT,
                CancelError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            rpc_error(status, &call.rpc_id, -32602, e.to_string())
        }
    }
}

/// `POST /api/v2/workers/{name or id}` with the method `stop` (graceful:
/// no new builds, then shut down) or `kill` (shut down now; its builds end
/// RETRY and run again).
pub(super) async fn worker_rpc(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(d) = st.writer(&headers, peer, WwwAction::Workers) {
        return d.into_response();
    }
    let (rpc_id, method, _params) = match rpc_call(&body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let graceful = match method.as_str() {
        "stop" => true,
        "kill" => false,
        other => {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                &rpc_id,
                -32601,
                format!("workers have the methods `stop` and `kill`, not `{other}`"),
            )
        }
    };
    // A worker id, as Buildbot's API uses, or its name.
    let name = match name.parse::<i64>() {
        Ok(id) => match st.store.workers().await {
            Ok(ws) => ws
                .into_iter()
                .find(|w| w.workerid == id)
                .map_or(name, |w| w.name),
            Err(e) => {
                return rpc_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &rpc_id,
                    -32603,
                    format!("{e:#}"),
                )
            }
        },
        Err(_) => name,
    };
    match st.builds.shutdown_worker(&name, graceful).await {
        Ok(msg) => rpc_result(&rpc_id, json!(msg)),
        Err(e) => rpc_error(StatusCode::NOT_FOUND, &rpc_id, -32602, format!("{e:#}")),
    }
}
