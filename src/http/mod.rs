//! The master's HTTP server (axum): one router for the web page, the read
//! API, the control API, the event stream, metrics and change hooks.
//!
//! - `api`: the read API (Buildbot's data API collections).
//! - `control`: the control API (JSON-RPC force, stop, cancel, workers;
//!   reconfig).
//! - `hooks`: the change hooks.
//! - `metrics`: Prometheus text.
//! - `web`: the web page and its push grid.
//! - `auth`: who may read and write.
//!
//! This file holds the shared state, the router, the read guard, the
//! event stream and the small reads (health, running config, reloads).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

mod api;
pub mod auth;
mod control;
mod extract;
mod hooks;
mod metrics;
pub mod server;
mod web;

use crate::schedulers::Schedulers;
use crate::store::Store;

/// A request to reload now, from the API (which waits for the outcome).
pub struct ReloadAsk {
    /// What asked, for the record: `api (user)`, ...
    pub trigger: String,
    pub reply: Option<tokio::sync::oneshot::Sender<crate::store::reloads::Reload>>,
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// The pollers the `poller` change hook can wake.
    pub poll_now: crate::changes::PollNow,
    /// How each change source's polls go, for `/metrics` and the API.
    pub poll_health: crate::changes::PollHealth,
    pub schedulers: Schedulers,
    /// Running builds and connected workers, for stop and shutdown.
    pub builds: Arc<crate::builds::Distributor>,
    /// Who may read and write (`www.users`, `www.authz`,
    /// `www.public_read`); a reload replaces it.
    pub access: Arc<std::sync::RwLock<auth::Access>>,
    /// Where `POST /api/v2/reconfig` asks the master to reload.
    pub reload: tokio::sync::mpsc::Sender<ReloadAsk>,
    /// The files the master watches (those of the running config, and
    /// those a failed reload read).
    pub watched: Arc<std::sync::RwLock<Vec<String>>>,
    /// Fires when this HTTP server stops: event streams end with it.
    pub stopping: tokio_util::sync::CancellationToken,
    pub started_at: std::time::Instant,
    /// Addresses that sent wrong credentials wait before their next request
    /// with credentials is looked at.
    pub throttle: Arc<crate::throttle::Throttle>,
}

/// The largest request body the master reads (a change hook's form, a
/// control call's JSON); a larger one is refused with 413 before it is
/// read whole.
pub const MAX_BODY: usize = 1 << 20;

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
        .route("/metrics", get(metrics::metrics))
        .route("/change_hook/base", post(hooks::change_hook_base))
        .route(
            "/change_hook/poller",
            get(hooks::change_hook_poller).post(hooks::change_hook_poller),
        )
        .route(
            "/api/v2/forceschedulers",
            get(control::list_force_schedulers),
        )
        .route("/api/v2/forceschedulers/{name}", post(control::force_rpc))
        .route(
            "/api/v2/builds/{id}",
            get(api::build).post(control::build_rpc),
        )
        .route(
            "/api/v2/workers/{name}",
            get(api::worker).post(control::worker_rpc),
        )
        .route("/api/v2/builders", get(api::builders))
        .route("/api/v2/builders/{id}", get(api::builder))
        .route("/api/v2/builders/{id}/builds", get(api::builder_builds))
        .route("/api/v2/builds", get(api::builds))
        .route("/api/v2/builds/{id}/steps", get(api::build_steps))
        .route("/api/v2/builds/{id}/failure", get(web::failure))
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
            get(api::buildrequest).post(control::buildrequest_rpc),
        )
        .route("/api/v2/buildsets", get(api::buildsets))
        .route("/api/v2/buildsets/{id}", get(api::buildset))
        .route("/api/v2/changes", get(api::changes))
        .route("/api/v2/changes/{id}", get(api::change))
        .route("/api/v2/workers", get(api::workers))
        .route("/api/v2/masters", get(api::masters))
        .route("/api/v2/masters/{id}", get(api::master))
        .route("/api/v2/schedulers", get(api::schedulers))
        .route("/api/v2/schedulers/{id}", get(api::scheduler))
        .route("/api/v2/reconfig", post(control::reconfig))
        .route("/api/v2/reloads", get(list_reloads))
        .route("/api/v2/config", get(running_config))
        .route("/api/v2/changesources", get(change_sources))
        .route("/api/v2/access", get(web::access))
        .route("/api/v2/events", get(events))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            read_guard,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Reads need what `www.public_read` says (see [`auth::reader`]); writes
/// check their own action in their handler. A request with credentials
/// from an address whose last ones were wrong waits first (see
/// [`crate::throttle`]), and its own are noted.
async fn read_guard(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.headers().contains_key("authorization") {
        st.throttle.wait(peer.ip()).await;
        let valid = {
            let access = crate::sync::read(&st.access);
            auth::credentials_valid(&access, req.headers())
        };
        match valid {
            Some(true) => st.throttle.succeeded(peer.ip()),
            Some(false) => st.throttle.failed(peer.ip()),
            None => {}
        }
    }
    if req.method() == axum::http::Method::GET && req.uri().path() != "/health" {
        let verdict = {
            let access = crate::sync::read(&st.access);
            auth::reader(&access, req.headers(), peer)
        };
        if let Err(d) = verdict {
            return d.into_response();
        }
    }
    next.run(req).await
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
    let watched = crate::sync::read(&st.watched).clone();
    match serde_json::to_value(&*gen.config) {
        Ok(v) => Json(json!({ "config": v, "files": watched })).into_response(),
        Err(e) => internal(e.into()),
    }
}

/// `GET /api/v2/changesources`: each change source of the running config
/// with how its polls go on this master: `state` `ok`, `failing` (with
/// `last_error`, `failing_since`, `failing_for` polls, `retry_at`) or
/// `not polled` (not yet, or by another master of a fleet), and
/// `errors_total`, `last_ok`.
async fn change_sources(State(st): State<Arc<AppState>>) -> Response {
    let gen = st.builds.generation();
    let health = st.poll_health.snapshot();
    let list: Vec<Value> = gen
        .config
        .change_source
        .iter()
        .map(|cs| {
            let name = crate::changes::Poller::new(cs).name();
            let h = health.get(&name).cloned().unwrap_or_default();
            let state = if h.failing_for > 0 {
                "failing"
            } else if h.last_ok.is_some() {
                "ok"
            } else {
                "not polled"
            };
            let mut v = serde_json::to_value(&h).unwrap_or_else(|_| json!({}));
            if let Some(m) = v.as_object_mut() {
                m.insert("name".into(), json!(name));
                m.insert("state".into(), json!(state));
            }
            v
        })
        .collect();
    let n = list.len();
    Json(json!({ "changesources": list, "meta": { "total": n } })).into_response()
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

/// `GET /health`: `status` `ok`, or `degraded` while the database fails
/// writes (`store` says how: see [`crate::store::faults`]). Always 200:
/// the master is up either way.
async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    let faults = st.store.faults().snapshot();
    let store = match &faults.failing_for_s {
        None => json!({ "state": "ok" }),
        Some(s) => json!({
            "state": "failing",
            "failing_for_s": s,
            "last_error": faults.last_error,
            "waiting": faults.waiting,
        }),
    };
    Json(json!({
        "status": if faults.failing_for_s.is_some() { "degraded" } else { "ok" },
        "uptime_s": st.started_at.elapsed().as_secs(),
        "store": store,
    }))
}
