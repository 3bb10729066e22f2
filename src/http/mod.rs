//! The master's HTTP server (axum). For now: `GET /health` and Buildbot's
//! base change hook, `POST /change_hook/base`. The data API and the web
//! page will be further routes on the same router.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

mod api;
pub mod auth;
mod web;

use crate::config::WwwAction;
use auth::Denied;

use crate::changes::ChangeBus;
use crate::config::SchedulerKind;
use crate::schedulers::{ForceRequest, Schedulers};
use crate::store::{NewChange, Properties, Store};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub bus: ChangeBus,
    /// The pollers the `poller` change hook can wake.
    pub poll_now: crate::changes::PollNow,
    /// Failed polls per change source, for `/metrics`.
    pub poll_errors: crate::changes::PollErrors,
    pub schedulers: Schedulers,
    /// Running builds and connected workers, for stop and shutdown.
    pub builds: Arc<crate::builds::Distributor>,
    /// Who may read and write (`www.users`, `www.authz`,
    /// `www.public_read`); a reload replaces it.
    pub access: Arc<std::sync::RwLock<auth::Access>>,
    /// Where `POST /api/v2/reconfig` asks the master to reload.
    pub reload: tokio::sync::mpsc::Sender<crate::reconfig::ReloadAsk>,
    /// The files the master watches (those of the running config, and
    /// those a failed reload read).
    pub watched: Arc<std::sync::RwLock<Vec<String>>>,
    /// Fires when this HTTP server stops: event streams end with it.
    pub stopping: tokio_util::sync::CancellationToken,
    pub started_at: std::time::Instant,
}

/// The router; serve it with `into_make_service_with_connect_info::<SocketAddr>()`
/// so that writes can check where they come from.
pub fn router(state: AppState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route("/", get(web::index))
        .route("/kiln.js", get(web::script))
        .route("/kiln.css", get(web::style))
        .route("/api/v2/grid", get(web::grid))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/change_hook/base", post(change_hook_base))
        .route(
            "/change_hook/poller",
            get(change_hook_poller).post(change_hook_poller),
        )
        .route("/api/v2/forceschedulers", get(list_force_schedulers))
        .route("/api/v2/forceschedulers/{name}", post(force_rpc))
        .route("/api/v2/builds/{id}", get(api::build).post(build_rpc))
        .route("/api/v2/workers/{name}", get(api::worker).post(worker_rpc))
        .route("/api/v2/builders", get(api::builders))
        .route("/api/v2/builders/{id}", get(api::builder))
        .route("/api/v2/builders/{id}/builds", get(api::builder_builds))
        .route("/api/v2/builds", get(api::builds))
        .route("/api/v2/builds/{id}/steps", get(api::build_steps))
        .route("/api/v2/steps", get(api::steps))
        .route("/api/v2/steps/{id}", get(api::step))
        .route("/api/v2/steps/{id}/logs", get(api::step_logs))
        .route("/api/v2/logs", get(api::logs))
        .route("/api/v2/logs/{id}", get(api::log))
        .route("/api/v2/logs/{id}/contents", get(api::log_contents))
        .route("/api/v2/logs/{id}/raw", get(api::log_raw))
        .route("/api/v2/buildrequests", get(api::buildrequests))
        .route(
            "/api/v2/buildrequests/{id}",
            get(api::buildrequest).post(buildrequest_rpc),
        )
        .route("/api/v2/buildsets", get(api::buildsets))
        .route("/api/v2/buildsets/{id}", get(api::buildset))
        .route("/api/v2/changes", get(api::changes))
        .route("/api/v2/changes/{id}", get(api::change))
        .route("/api/v2/workers", get(api::workers))
        .route("/api/v2/schedulers", get(api::schedulers))
        .route("/api/v2/schedulers/{id}", get(api::scheduler))
        .route("/api/v2/reconfig", post(reconfig))
        .route("/api/v2/reloads", get(list_reloads))
        .route("/api/v2/config", get(running_config))
        .route("/api/v2/events", get(events))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            read_guard,
        ))
        .with_state(state)
}

impl AppState {
    fn writer(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
        action: WwwAction,
    ) -> Result<String, Denied> {
        let access = self.access.read().unwrap_or_else(|e| e.into_inner());
        auth::writer(&access, headers, peer, action)
    }

    fn hook(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<(), Denied> {
        let access = self.access.read().unwrap_or_else(|e| e.into_inner());
        auth::hook(&access, headers, peer)
    }
}

/// Reads need what `www.public_read` says (see [`auth::reader`]); writes
/// check their own action in their handler.
async fn read_guard(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.method() == axum::http::Method::GET && req.uri().path() != "/health" {
        let verdict = {
            let access = st.access.read().unwrap_or_else(|e| e.into_inner());
            auth::reader(&access, req.headers(), peer)
        };
        if let Err(d) = verdict {
            return d.into_response();
        }
    }
    next.run(req).await
}

/// `POST /api/v2/reconfig`: reloads the config now and answers with the
/// reload's record: 200 when applied, 422 with the errors when not.
async fn reconfig(
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
    let ask = crate::reconfig::ReloadAsk {
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

fn internal(e: anyhow::Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({ "error": format!("{e:#}") })),
    )
        .into_response()
}

/// `GET /api/v2/events?topics=builds,steps&logs=12`: server-sent events,
/// one per thing the store records (see [`crate::events`]). The SSE event
/// name is the topic; its data is the event as JSON. A client that falls
/// behind gets a `lagged` event and should read the API afresh.
async fn events(
    State(st): State<Arc<AppState>>,
    axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>,
) -> Response {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    let filter = match crate::events::Filter::parse(
        q.get("topics").map(String::as_str),
        q.get("logs").map(String::as_str),
    ) {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({ "error": e }))).into_response(),
    };
    let rx = st.store.events().subscribe();
    let stopping = st.stopping.clone();
    let stream = futures_util::stream::unfold((rx, filter), move |(mut rx, filter)| {
        let stopping = stopping.clone();
        async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let received = tokio::select! {
                    r = rx.recv() => r,
                    _ = stopping.cancelled() => return None,
                };
                let ev = match received {
                    Ok(ev) if filter.wants(&ev) => SseEvent::default()
                        .event(ev.topic)
                        .json_data(&*ev)
                        .unwrap_or_else(|_| SseEvent::default().comment("unencodable event")),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => SseEvent::default()
                        .event("lagged")
                        .data(json!({ "missed": n }).to_string()),
                    Err(RecvError::Closed) => return None,
                };
                return Some((Ok::<_, std::convert::Infallible>(ev), (rx, filter)));
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `GET /api/v2/config`: the config the master runs now, as
/// `kiln print-config --json` prints it (secrets as `<secret>`).
async fn running_config(State(st): State<Arc<AppState>>) -> Response {
    let gen = st.builds.generation();
    let watched = st.watched.read().unwrap_or_else(|e| e.into_inner()).clone();
    match serde_json::to_value(&*gen.config) {
        Ok(v) => Json(json!({ "config": v, "files": watched })).into_response(),
        Err(e) => internal(e.into()),
    }
}

/// `GET /api/v2/reloads`: the newest reloads first (`?limit=N`, default 20).
async fn list_reloads(
    State(st): State<Arc<AppState>>,
    axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>,
) -> Response {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, 1000);
    match st.store.reloads(limit).await {
        Ok(list) => {
            let n = list.len();
            Json(json!({ "reloads": list, "meta": { "total": n } })).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": format!("{e:#}") })),
        )
            .into_response(),
    }
}

async fn list_force_schedulers(State(st): State<Arc<AppState>>) -> Json<Value> {
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
async fn force_rpc(
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
            Json(json!({ "jsonrpc": "2.0", "id": id, "result": [ids.bsid, brids] })).into_response()
        }
        Err(e) => rpc_error(StatusCode::BAD_REQUEST, &id, -32602, format!("{e:#}")),
    }
}

/// A JSON-RPC 2.0 error answer, as Buildbot's control API gives them.
fn rpc_error(status: StatusCode, id: &Value, code: i64, msg: String) -> Response {
    (
        status,
        Json(json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": msg } })),
    )
        .into_response()
}

/// A JSON-RPC call: (id, method, params), or the error answer.
#[allow(clippy::result_large_err)] // the error is the response itself, answered at once
fn rpc_call(body: &[u8]) -> Result<(Value, String, Value), Response> {
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

/// `POST /api/v2/builds/{id}` with `{"method": "stop", "params": {"reason"}}`:
/// Buildbot's stop control.
async fn build_rpc(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let who = match st.writer(&headers, peer, WwwAction::Stop) {
        Ok(u) => u,
        Err(d) => return d.into_response(),
    };
    let (rpc_id, method, params) = match rpc_call(&body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Ok(buildid) = id.parse::<i64>() else {
        return rpc_error(
            StatusCode::NOT_FOUND,
            &rpc_id,
            -32602,
            format!("`{id}` is not a build id"),
        );
    };
    if method != "stop" {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            &rpc_id,
            -32601,
            format!("builds have the method `stop`, not `{method}`"),
        );
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
    if st.builds.stop_build(buildid, &reason) {
        Json(json!({ "jsonrpc": "2.0", "id": rpc_id, "result": null })).into_response()
    } else {
        rpc_error(
            StatusCode::NOT_FOUND,
            &rpc_id,
            -32602,
            format!("build {buildid} is not running"),
        )
    }
}

/// `POST /api/v2/buildrequests/{id}` with `{"method": "cancel", "params":
/// {"reason"}}`: Buildbot's cancel control.
async fn buildrequest_rpc(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let who = match st.writer(&headers, peer, WwwAction::Cancel) {
        Ok(u) => u,
        Err(d) => return d.into_response(),
    };
    let (rpc_id, method, params) = match rpc_call(&body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Ok(brid) = id.parse::<i64>() else {
        return rpc_error(
            StatusCode::NOT_FOUND,
            &rpc_id,
            -32602,
            format!("`{id}` is not a build request id"),
        );
    };
    if method != "cancel" {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            &rpc_id,
            -32601,
            format!("build requests have the method `cancel`, not `{method}`"),
        );
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
    match st.builds.cancel_request(brid, &reason).await {
        Ok(msg) => Json(json!({ "jsonrpc": "2.0", "id": rpc_id, "result": msg })).into_response(),
        Err(e) => {
            let msg = format!("{e:#}");
            let status = if msg.starts_with("there is no") {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::CONFLICT
            };
            rpc_error(status, &rpc_id, -32602, msg)
        }
    }
}

/// `POST /api/v2/workers/{name or id}` with the method `stop` (graceful:
/// no new builds, then shut down) or `kill` (shut down now; its builds end
/// RETRY and run again).
async fn worker_rpc(
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
        Ok(msg) => Json(json!({ "jsonrpc": "2.0", "id": rpc_id, "result": msg })).into_response(),
        Err(e) => rpc_error(StatusCode::NOT_FOUND, &rpc_id, -32602, format!("{e:#}")),
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `/metrics`: Prometheus text format.
async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    use std::fmt::Write as _;
    let started = std::time::Instant::now();
    let m = match st.store.metrics().await {
        Ok(m) => m,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the store: {e:#}\n"),
            )
                .into_response()
        }
    };
    let store_seconds = started.elapsed().as_secs_f64();
    let mut text = String::new();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut text,
        "kiln_builds_total",
        "counter",
        "Builds by builder and result (\"running\" while they run).",
    );
    for (builder, results, n) in &m.builds {
        let result = results
            .and_then(crate::config::Results::from_code)
            .map_or("running", |r| r.name());
        let _ = writeln!(
            text,
            "kiln_builds_total{{builder=\"{}\",result=\"{result}\"}} {n}",
            label(builder)
        );
    }
    family(
        &mut text,
        "kiln_build_requests_pending",
        "gauge",
        "Build requests waiting for a worker, by builder.",
    );
    for (builder, n) in &m.pending {
        let _ = writeln!(
            text,
            "kiln_build_requests_pending{{builder=\"{}\"}} {n}",
            label(builder)
        );
    }
    family(
        &mut text,
        "kiln_request_wait_seconds",
        "summary",
        "Time from a build request to its build's start.",
    );
    let _ = writeln!(text, "kiln_request_wait_seconds_sum {}", m.wait_sum);
    let _ = writeln!(text, "kiln_request_wait_seconds_count {}", m.wait_count);
    family(
        &mut text,
        "kiln_workers_connected",
        "gauge",
        "Workers connected to this master.",
    );
    let _ = writeln!(text, "kiln_workers_connected {}", m.workers_connected);
    family(
        &mut text,
        "kiln_poll_errors_total",
        "counter",
        "Failed polls by change source since the master started.",
    );
    for (source, n) in st.poll_errors.snapshot() {
        let _ = writeln!(
            text,
            "kiln_poll_errors_total{{source=\"{}\"}} {n}",
            label(&source)
        );
    }
    family(
        &mut text,
        "kiln_reloads_total",
        "counter",
        "Config reloads, applied or failed.",
    );
    for (applied, n, _) in &m.reloads {
        let _ = writeln!(text, "kiln_reloads_total{{applied=\"{applied}\"}} {n}");
    }
    family(
        &mut text,
        "kiln_reload_duration_seconds",
        "summary",
        "Time each reload took.",
    );
    let (count, ms) = m
        .reloads
        .iter()
        .fold((0i64, 0.0f64), |(c, s), r| (c + r.1, s + r.2));
    let _ = writeln!(text, "kiln_reload_duration_seconds_sum {}", ms / 1000.0);
    let _ = writeln!(text, "kiln_reload_duration_seconds_count {count}");
    family(
        &mut text,
        "kiln_store_query_seconds",
        "gauge",
        "Time the store took to answer this scrape's queries.",
    );
    let _ = writeln!(text, "kiln_store_query_seconds {store_seconds}");
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "uptime_s": st.started_at.elapsed().as_secs(),
    }))
}

fn bad_request(reason: impl Into<String>) -> Response {
    let reason = reason.into();
    tracing::warn!("change hook: refused: {reason}");
    (StatusCode::BAD_REQUEST, Json(json!({ "error": reason }))).into_response()
}

/// The form fields Buildbot's base hook reads.
const FIELDS: &[&str] = &[
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
async fn change_hook_poller(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<
        axum::extract::Query<Vec<(String, String)>>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Response {
    if let Err(d) = st.hook(&headers, peer) {
        return d.into_response();
    }
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

async fn change_hook_base(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<BTreeMap<String, String>>, axum::extract::rejection::FormRejection>,
) -> Response {
    if let Err(d) = st.hook(&headers, peer) {
        return d.into_response();
    }
    let Form(form) = match form {
        Ok(f) => f,
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
            st.bus.publish(stored);
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
