//! The master side of Buildbot's `msgpack_experimental_v7` worker protocol
//! (docs/workers.md): a WebSocket per worker, one MessagePack map per message,
//! requests and responses matched by `seq_number`, HTTP Basic auth in the
//! handshake.
//!
//! On a connection the master asks for the worker's info, sends its
//! settings, records the worker as connected in the store, and keeps the
//! connection alive. (Version 7 has no builder list: a command names its
//! builder and carries an absolute workdir under the worker's basedir.) A wrong password or an unknown
//! worker is refused in the handshake (401); a malformed frame or an
//! unexpected message closes that connection with the reason logged. A
//! second connection for a worker that is connected is accepted only if
//! the first does not answer a keepalive (Buildbot's rule: the live one
//! wins).

pub use kiln_protocol as protocol;
#[cfg(test)]
mod fuzz;
pub mod latent;
pub mod transfer;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use rmpv::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::config::MasterConfig;
use crate::store::Store;
use protocol::{map_get, str_of, Frame};

/// Updates of one command that may wait for the build runner.
const COMMAND_EVENTS: usize = 16;

/// How long the master waits for a worker to answer a request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest line a stock worker sends whole (`max_line_length`).
const MAX_LINE_LENGTH: u64 = 1024 * 1024;

/// What the master needs of the config to accept workers; a reload
/// replaces it for the connections after it.
#[derive(Clone)]
pub struct WorkerSetup {
    /// name → (password, keepalive seconds)
    workers: Arc<std::sync::RwLock<HashMap<String, (crate::config::Secret, u64)>>>,
}

impl WorkerSetup {
    pub fn from_config(c: &MasterConfig) -> WorkerSetup {
        let setup = WorkerSetup {
            workers: Arc::default(),
        };
        setup.replace(c);
        setup
    }

    /// Takes the workers of a reloaded config.
    pub fn replace(&self, c: &MasterConfig) {
        let workers = c
            .workers
            .iter()
            .map(|w| (w.name.clone(), (w.password.clone(), w.keepalive_interval)))
            .collect();
        *crate::sync::write(&self.workers) = workers;
    }

    fn get(&self, name: &str) -> Option<(crate::config::Secret, u64)> {
        crate::sync::read(&self.workers).get(name).cloned()
    }
}

/// What a running command reports.
#[derive(Debug)]
pub enum CommandEvent {
    /// `update`: (key, value) pairs such as `stdout`, `rc`, `elapsed`.
    Update(Vec<(String, Value)>),
    /// `complete`: `None` on success, else the failure text.
    Complete(Option<String>),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// One connected worker.
pub struct WorkerConn {
    pub name: String,
    /// What `get_worker_info` answered.
    pub info: std::sync::OnceLock<serde_json::Value>,
    out: mpsc::Sender<Message>,
    pending: Pending,
    commands: Arc<Mutex<HashMap<String, mpsc::Sender<CommandEvent>>>>,
    /// The master's end of running file transfers, by command id.
    transfers: Mutex<HashMap<String, transfer::Transfer>>,
    seq: AtomicU64,
    next_command: AtomicU64,
    /// Fires when the connection is gone.
    pub closed: CancellationToken,
    /// Asked to shut down gracefully: it takes no new builds on this
    /// connection (a new connection starts afresh).
    pub draining: std::sync::atomic::AtomicBool,
    /// `shutdown` was sent on this connection.
    pub shutdown_sent: std::sync::atomic::AtomicBool,
}

use crate::sync::lock;

impl WorkerConn {
    /// Sends a request and waits for its response.
    pub async fn request(&self, op: &str, fields: Vec<(&str, Value)>) -> anyhow::Result<Value> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(seq, tx);
        let frame = protocol::request(seq, op, fields);
        if self.out.send(Message::Binary(frame.into())).await.is_err() {
            lock(&self.pending).remove(&seq);
            bail!("worker {} is disconnected", self.name);
        }
        let answer = tokio::select! {
            r = tokio::time::timeout(REQUEST_TIMEOUT, rx) => r,
            _ = self.closed.cancelled() => {
                lock(&self.pending).remove(&seq);
                bail!("worker {} disconnected during `{op}`", self.name)
            }
        };
        match answer {
            Err(_) => {
                lock(&self.pending).remove(&seq);
                bail!(
                    "worker {} did not answer `{op}` within {} s",
                    self.name,
                    REQUEST_TIMEOUT.as_secs()
                )
            }
            Ok(Err(_)) => bail!("worker {} disconnected during `{op}`", self.name),
            Ok(Ok(Err(e))) => bail!("worker {} failed `{op}`: {e}", self.name),
            Ok(Ok(Ok(v))) => Ok(v),
        }
    }

    /// Starts a command; its updates and completion arrive on the receiver.
    pub async fn start_command(
        &self,
        builder: &str,
        command_name: &str,
        args: Value,
    ) -> anyhow::Result<(String, mpsc::Receiver<CommandEvent>)> {
        self.start_transfer(builder, command_name, args, None).await
    }

    /// Starts a command whose file transfer requests `transfer` answers;
    /// take it back with [`WorkerConn::take_transfer`] when it completes.
    pub async fn start_transfer(
        &self,
        builder: &str,
        command_name: &str,
        args: Value,
        transfer: Option<transfer::Transfer>,
    ) -> anyhow::Result<(String, mpsc::Receiver<CommandEvent>)> {
        let id = self
            .next_command
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        // Bounded: a command's output waits in the socket (and the worker),
        // not in the master's memory, while the store catches up.
        let (tx, rx) = mpsc::channel(COMMAND_EVENTS);
        lock(&self.commands).insert(id.clone(), tx);
        if let Some(t) = transfer {
            lock(&self.transfers).insert(id.clone(), t);
        }
        let r = self
            .request(
                "start_command",
                vec![
                    ("builder_name", Value::from(builder)),
                    ("command_id", Value::from(id.as_str())),
                    ("command_name", Value::from(command_name)),
                    ("args", args),
                ],
            )
            .await;
        if let Err(e) = r {
            lock(&self.commands).remove(&id);
            lock(&self.transfers).remove(&id);
            return Err(e);
        }
        Ok((id, rx))
    }

    /// The transfer a command was started with (once it has completed).
    pub fn take_transfer(&self, command_id: &str) -> Option<transfer::Transfer> {
        lock(&self.transfers).remove(command_id)
    }

    /// Asks the worker to shut down (Buildbot's graceful shutdown: the
    /// worker process exits).
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        self.request("shutdown", vec![]).await.map(|_| ())
    }

    pub async fn interrupt_command(
        &self,
        builder: &str,
        command_id: &str,
        why: &str,
    ) -> anyhow::Result<()> {
        self.request(
            "interrupt_command",
            vec![
                ("builder_name", Value::from(builder)),
                ("command_id", Value::from(command_id)),
                ("why", Value::from(why)),
            ],
        )
        .await
        .map(|_| ())
    }
}

/// The connected workers, by name.
pub struct Registry {
    workers: Mutex<BTreeMap<String, Arc<WorkerConn>>>,
    /// Woken whenever a worker connects or disconnects. Its one waiter is
    /// the distributor; a notice given while it is busy is kept for it.
    pub changed: tokio::sync::Notify,
    /// Who connected, went away or was refused (latent workers follow it).
    pub presence: tokio::sync::broadcast::Sender<Presence>,
    /// Addresses that sent wrong credentials wait before their next try.
    pub throttle: crate::throttle::Throttle,
    /// Connections still in their handshake, bounded per address and in all.
    pub handshakes: Arc<crate::throttle::Handshakes>,
}

/// How many connections from one address may be in their handshake at
/// once (a host running many workers that all reconnect at once stays
/// well under it).
pub const HANDSHAKES_PER_ADDRESS: usize = 64;
/// How many connections may be in their handshake at once in all.
pub const HANDSHAKES_TOTAL: usize = 1024;

/// A worker's comings and goings.
#[derive(Clone, Debug, PartialEq)]
pub enum Presence {
    Connected(String),
    Disconnected(String),
    /// A worker named itself but was refused (a wrong password).
    Refused {
        name: String,
        why: String,
    },
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            workers: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            presence: tokio::sync::broadcast::channel(256).0,
            throttle: crate::throttle::Throttle::default(),
            handshakes: Arc::new(crate::throttle::Handshakes::new(
                HANDSHAKES_PER_ADDRESS,
                HANDSHAKES_TOTAL,
            )),
        }
    }
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<WorkerConn>> {
        lock(&self.workers).get(name).cloned()
    }
    pub fn names(&self) -> Vec<String> {
        lock(&self.workers).keys().cloned().collect()
    }
}

/// Accepts workers on `listener` until `cancel` fires (the master
/// stops: every connection is closed) or `stop_listening` does (a reload
/// moved the port: the connections stay).
pub async fn serve(
    bound: crate::net::Bound,
    setup: WorkerSetup,
    registry: Arc<Registry>,
    store: Store,
    masterid: i64,
    cancel: CancellationToken,
    stop_listening: CancellationToken,
) {
    let setup = Arc::new(setup);
    let mut refusals = crate::throttle::Refusals::default();
    loop {
        let (stream, peer) = tokio::select! {
            r = bound.tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accepting a worker connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => break,
            _ = stop_listening.cancelled() => return,
        };
        let Some(admitted) = registry.handshakes.admit(peer.ip()) else {
            drop(stream);
            if let Some(n) = refusals.note() {
                tracing::warn!(peer = %peer, "too many connections are still in their handshake (from this address or in all): closed {n} connection(s)");
            }
            continue;
        };
        let (setup, registry, store, cancel, tls) = (
            setup.clone(),
            registry.clone(),
            store.clone(),
            cancel.clone(),
            bound.tls.clone(),
        );
        tokio::spawn(async move {
            let stream = match crate::net::Stream::accept(stream, tls.as_deref()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(peer = %peer, "worker connection closed: {e:#}");
                    return;
                }
            };
            if let Err(e) = connection(
                stream, peer, admitted, &setup, &registry, &store, masterid, &cancel,
            )
            .await
            {
                tracing::warn!(peer = %peer, "worker connection closed: {e:#}");
            }
        });
    }
    // Tell every worker's connection to end.
    let all: Vec<Arc<WorkerConn>> = lock(&registry.workers).values().cloned().collect();
    for w in all {
        w.closed.cancel();
    }
}

fn refuse(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_string()));
    *r.status_mut() = status;
    if status == StatusCode::UNAUTHORIZED {
        if let Ok(v) = "Basic realm=\"kiln\"".parse() {
            r.headers_mut().insert("WWW-Authenticate", v);
        }
    }
    r
}

/// The worker name a Basic auth header claims, valid or not.
fn claimed_name(req: &Request) -> Option<String> {
    use base64::Engine as _;
    let header = req
        .headers()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(header.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.split_once(':')?.0.to_string())
}

/// The worker name from a valid Basic auth header, or why not.
fn authenticate(setup: &WorkerSetup, req: &Request) -> Result<String, (StatusCode, String)> {
    use base64::Engine as _;
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .ok_or((StatusCode::UNAUTHORIZED, "no credentials".to_string()))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(header.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or((
            StatusCode::UNAUTHORIZED,
            "malformed credentials".to_string(),
        ))?;
    let (name, password) = decoded.split_once(':').ok_or((
        StatusCode::UNAUTHORIZED,
        "malformed credentials".to_string(),
    ))?;
    match setup.get(name) {
        None => Err((StatusCode::UNAUTHORIZED, format!("unknown worker `{name}`"))),
        Some((secret, _)) if !constant_time_eq(secret.expose().as_bytes(), password.as_bytes()) => {
            Err((
                StatusCode::UNAUTHORIZED,
                format!("wrong password for worker `{name}`"),
            ))
        }
        Some(_) => Ok(name.to_string()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// tungstenite's handshake callback must return its own (large) error type.
#[allow(clippy::result_large_err)]
#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: crate::net::Stream,
    peer: SocketAddr,
    admitted: crate::throttle::Admitted,
    setup: &WorkerSetup,
    registry: &Arc<Registry>,
    store: &Store,
    masterid: i64,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    // An address that sent wrong credentials waits before its next try
    // is looked at.
    registry.throttle.wait(peer.ip()).await;
    let mut who: Result<String, (StatusCode, String)> =
        Err((StatusCode::UNAUTHORIZED, "no handshake".into()));
    let mut refused_name: Option<String> = None;
    // Small buffers: a master holds a connection per worker, and
    // tungstenite's default read buffer alone is 128 KiB.
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20));
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        |req: &Request, resp: Response| {
            who = authenticate(setup, req);
            // Noted before the answer goes out, so that the client's next
            // try, however quick, finds it.
            if who.is_err() {
                registry.throttle.failed(peer.ip());
                refused_name = claimed_name(req);
            } else {
                registry.throttle.succeeded(peer.ip());
            }
            match &who {
                Ok(_) => Ok(resp),
                Err((status, why)) => Err(refuse(*status, why)),
            }
        },
        Some(ws_config),
    );
    let ws = match tokio::time::timeout(Duration::from_secs(30), handshake).await {
        Err(_) => bail!("no WebSocket handshake within 30 s"),
        Ok(Err(e)) => {
            if let Err((_, why)) = &who {
                if let Some(name) = &refused_name {
                    let _ = registry.presence.send(Presence::Refused {
                        name: name.clone(),
                        why: why.clone(),
                    });
                }
                bail!("refused: {why}");
            }
            bail!("WebSocket handshake failed: {e}");
        }
        Ok(Ok(ws)) => ws,
    };
    // The handshake is over: its place goes to the next connection.
    drop(admitted);
    let name = who.map_err(|(_, why)| anyhow!("refused: {why}"))?;
    let keepalive = setup.get(&name).map(|w| w.1).unwrap_or(3600).max(1);
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(256);
    let closed = CancellationToken::new();
    let conn = Arc::new(WorkerConn {
        name: name.clone(),
        info: std::sync::OnceLock::new(),
        out: out_tx,
        pending: Arc::default(),
        commands: Arc::default(),
        transfers: Mutex::default(),
        seq: AtomicU64::new(1),
        next_command: AtomicU64::new(1),
        closed: closed.clone(),
        draining: Default::default(),
        shutdown_sent: Default::default(),
    });

    // Writer: everything to the socket goes through one task.
    let writer_closed = closed.clone();
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                m = out_rx.recv() => match m {
                    Some(m) => if sink.send(m).await.is_err() { break },
                    None => break,
                },
                _ = writer_closed.cancelled() => break,
            }
        }
        let _ = sink.send(Message::Close(None)).await;
        writer_closed.cancel();
    });

    // Reader: responses to our requests, and the worker's own requests.
    let reader_conn = conn.clone();
    let reader_closed = closed.clone();
    let reader_name = name.clone();
    let reader = tokio::spawn(async move {
        let why = loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = reader_closed.cancelled() => break None,
            };
            let data = match msg {
                None => break Some("the worker closed the connection".to_string()),
                Some(Err(e)) => break Some(format!("connection error: {e}")),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Close(_))) => {
                    break Some("the worker closed the connection".to_string())
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => break Some(format!("unexpected {} frame", frame_kind(&other))),
            };
            match protocol::decode(&data) {
                Err(e) => break Some(format!("malformed message: {e}")),
                Ok(Frame::Response { seq, result }) => {
                    if let Some(tx) = lock(&reader_conn.pending).remove(&seq) {
                        let _ = tx.send(result);
                    }
                }
                Ok(Frame::Request { seq, op, msg }) => {
                    let answer = handle_worker_request(&reader_conn, &op, &msg);
                    let reply = match answer {
                        Ok((v, deliver)) => {
                            if let Some((tx, ev)) = deliver {
                                // Waits while the runner is behind; a
                                // runner that has gone drops the event.
                                tokio::select! {
                                    _ = tx.send(ev) => {}
                                    _ = reader_closed.cancelled() => break None,
                                }
                            }
                            protocol::response(seq, v, false)
                        }
                        Err(e) => protocol::response(seq, Value::from(e.as_str()), true),
                    };
                    if reader_conn
                        .out
                        .send(Message::Binary(reply.into()))
                        .await
                        .is_err()
                    {
                        break Some("cannot answer the worker".to_string());
                    }
                }
            }
        };
        if let Some(why) = why {
            tracing::info!(worker = %reader_name, "disconnected: {why}");
        }
        reader_closed.cancel();
    });

    // A second connection: the first wins if it still answers.
    if let Some(old) = registry.get(&name) {
        let alive = tokio::time::timeout(Duration::from_secs(10), old.request("keepalive", vec![]))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        if alive {
            closed.cancel();
            let _ = tokio::join!(reader, writer);
            bail!("worker `{name}` from {peer} refused: it is already connected and answering");
        }
        tracing::info!(worker = %name, "replacing a connection that no longer answers");
        old.closed.cancel();
    }

    let setup_result = async {
        let info = conn.request("get_worker_info", vec![]).await?;
        conn.request(
            "set_worker_settings",
            vec![(
                "args",
                protocol::map(vec![
                    ("buffer_size", Value::from(64 * 1024)),
                    ("buffer_timeout", Value::from(1.0)),
                    (
                        "newline_re",
                        Value::from(
                            r"(\r\n|\r(?=.)|\033\[u|\033\[[0-9]+;[0-9]+[Hf]|\033\[2J|\x08+)",
                        ),
                    ),
                    // Buildbot says 4096, and buildbot-worker 4.3 cuts a
                    // longer line into one piece and empty lines (its
                    // LineBoundaryFinder slices from the line's start).
                    // kiln joins lines cut anywhere, so only a runaway line
                    // is cut.
                    ("max_line_length", Value::from(MAX_LINE_LENGTH)),
                ]),
            )],
        )
        .await?;
        // Protocol v7 has no builder list: each command names its builder
        // and carries an absolute workdir under the worker's basedir.
        anyhow::Ok(protocol::to_json(&info))
    };
    let info = match tokio::time::timeout(REQUEST_TIMEOUT * 2, setup_result).await {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => {
            closed.cancel();
            let _ = tokio::join!(reader, writer);
            return Err(e.context(format!("setting up worker `{name}` failed")));
        }
        Err(_) => {
            closed.cancel();
            let _ = tokio::join!(reader, writer);
            bail!("setting up worker `{name}` took too long");
        }
    };
    let workerid = store
        .worker_connected(&name, info.clone(), masterid)
        .await
        .context("cannot record the worker")?;
    let _ = conn.info.set(info);
    lock(&registry.workers).insert(name.clone(), conn.clone());
    registry.changed.notify_one();
    let _ = registry.presence.send(Presence::Connected(name.clone()));
    tracing::info!(worker = %name, peer = %peer, "connected");

    // Keepalives until the connection ends.
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(keepalive)) => {
                if let Err(e) = conn.request("keepalive", vec![]).await {
                    tracing::warn!(worker = %name, "keepalive failed: {e:#}");
                    closed.cancel();
                    break;
                }
            }
            _ = closed.cancelled() => break,
            _ = cancel.cancelled() => { closed.cancel(); break }
        }
    }
    let _ = tokio::join!(reader, writer);
    // Unfinished uploads are discarded.
    lock(&conn.transfers).clear();
    // Running commands learn that their worker is gone.
    for (_, tx) in lock(&conn.commands).drain() {
        // If the queue is full the runner still learns it: the channel
        // closes when this sender is dropped.
        let _ = tx.try_send(CommandEvent::Complete(Some(
            "the worker disconnected".into(),
        )));
    }
    {
        let mut w = lock(&registry.workers);
        if w.get(&name).is_some_and(|c| Arc::ptr_eq(c, &conn)) {
            w.remove(&name);
        }
    }
    registry.changed.notify_one();
    let _ = registry.presence.send(Presence::Disconnected(name.clone()));
    if let Err(e) = store.worker_disconnected(workerid, masterid).await {
        tracing::warn!(worker = %name, "cannot record the disconnection: {e:#}");
    }
    Ok(())
}

fn frame_kind(m: &Message) -> &'static str {
    match m {
        Message::Text(_) => "text",
        Message::Binary(_) => "binary",
        Message::Ping(_) => "ping",
        Message::Pong(_) => "pong",
        Message::Close(_) => "close",
        Message::Frame(_) => "raw",
    }
}

/// What the worker asks of the master: command updates and completion,
/// and the file transfer calls of a transfer command.
/// An event for a command's runner, to be delivered before the answer.
type Deliver = Option<(mpsc::Sender<CommandEvent>, CommandEvent)>;

fn handle_worker_request(
    conn: &WorkerConn,
    op: &str,
    msg: &Value,
) -> Result<(Value, Deliver), String> {
    let command_id = map_get(msg, "command_id")
        .and_then(str_of)
        .map(String::from);
    let sender = |id: &Option<String>| -> Result<mpsc::Sender<CommandEvent>, String> {
        let id = id
            .as_ref()
            .ok_or_else(|| format!("`{op}` without a command_id"))?;
        lock(&conn.commands)
            .get(id)
            .cloned()
            .ok_or_else(|| format!("unknown command {id}"))
    };
    match op {
        "update" => {
            let tx = sender(&command_id)?;
            let args = map_get(msg, "args").ok_or("`update` without args")?;
            let pairs = protocol::update_pairs(args)?;
            Ok((Value::Nil, Some((tx, CommandEvent::Update(pairs)))))
        }
        "complete" => {
            let tx = sender(&command_id)?;
            let failure = match map_get(msg, "args") {
                None | Some(Value::Nil) => None,
                Some(v) => Some(str_of(v).map(String::from).unwrap_or_else(|| v.to_string())),
            };
            if let Some(id) = &command_id {
                lock(&conn.commands).remove(id);
            }
            Ok((Value::Nil, Some((tx, CommandEvent::Complete(failure)))))
        }
        op if op.starts_with("update_upload_") || op.starts_with("update_read_file") => {
            let id = command_id.ok_or_else(|| format!("`{op}` without a command_id"))?;
            let mut transfers = lock(&conn.transfers);
            let t = transfers
                .get_mut(&id)
                .ok_or_else(|| format!("`{op}` for command {id}, which transfers no file"))?;
            t.handle(op, msg).map(|v| (v, None))
        }
        other => Err(format!("unexpected request `{other}`")),
    }
}
