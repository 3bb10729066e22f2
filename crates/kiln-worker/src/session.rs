//! One connection to the master: the protocol's requests answered
//! (`get_worker_info`, `set_worker_settings`, `keepalive`, `print`,
//! `start_command`, `interrupt_command`, `shutdown`), commands started and
//! their updates sent, calls back to the master matched to their answers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use rmpv::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use kiln_protocol::{self as protocol, map, map_get, str_of, Frame};

use super::{
    files::file_command,
    shell::shell,
    transfers::{download, upload},
    WorkerFile,
};

pub(super) enum Ended {
    Shutdown,
    Lost(String),
}

/// Running commands: id → interrupt sender.
pub(super) type Running = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<String>>>>;
/// The master's answers we wait for, by sequence number.
pub(super) type Waiting =
    Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Result<Value, String>>>>>;

/// The master's URL from what `--master` says: `HOST:PORT` and
/// `ws://HOST:PORT` are plain, `wss://HOST:PORT` is TLS.
pub(super) fn master_url(master: &str) -> anyhow::Result<String> {
    let url = if master.starts_with("ws://") || master.starts_with("wss://") {
        master.to_string()
    } else if master.contains("://") {
        anyhow::bail!(
            "the master must be HOST:PORT, ws://HOST:PORT or wss://HOST:PORT, not {master}"
        );
    } else {
        format!("ws://{master}/")
    };
    Ok(url)
}

/// The authorities a wss:// master's certificate may come from: those of
/// `ca_file` (relative to `basedir`), or Mozilla's list of public ones.
pub(super) fn roots(
    ca_file: Option<&Path>,
    basedir: &Path,
) -> anyhow::Result<tokio_rustls::rustls::RootCertStore> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::CertificateDer;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let Some(ca) = ca_file else {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(roots);
    };
    let path = basedir.join(ca);
    let certs = CertificateDer::pem_file_iter(&path)
        .and_then(|c| c.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from {}", path.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        anyhow::bail!(
            "{} holds no usable certificate (PEM: -----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(roots)
}

/// The connection under the WebSocket: TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A connection to the master, through TLS for a wss:// URL (the master's
/// certificate checked against [`roots`] and the URL's host).
async fn connect(
    cfg: &WorkerFile,
    basedir: &Path,
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<Box<dyn Io>>> {
    use tokio_rustls::rustls;
    let uri = req.uri().clone();
    let host = uri.host().context("the master's URL has no host")?;
    let secure = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if secure {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(cfg.ca_file.as_deref(), basedir)?)
            .with_no_client_auth();
        let name =
            rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .with_context(|| format!("{host} is not a host name or an address"))?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .context("TLS handshake with the master")?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let (ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    Ok(ws)
}

pub(super) async fn session(cfg: &WorkerFile, basedir: &Path) -> anyhow::Result<Ended> {
    use base64::Engine as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = master_url(&cfg.master)?;
    let mut req = url.as_str().into_client_request()?;
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", cfg.name, cfg.password));
    req.headers_mut()
        .insert("Authorization", format!("Basic {auth}").parse()?);
    let ws = tokio::time::timeout(Duration::from_secs(30), connect(cfg, basedir, req))
        .await
        .context("no answer within 30 s")??;
    tracing::info!("connected to {url} as {}", cfg.name);
    let (mut sink, mut stream) = ws.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if sink.send(Message::Binary(frame.into())).await.is_err() {
                break;
            }
        }
    });
    let running: Running = Arc::default();
    let waiting: Waiting = Arc::default();
    let seq = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let ended = loop {
        let data = match stream.next().await {
            None => break Ended::Lost("closed".into()),
            Some(Err(e)) => break Ended::Lost(e.to_string()),
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(_))) => {
                break Ended::Lost("the master closed the connection".into())
            }
            Some(Ok(_)) => continue,
        };
        let (seq_no, op, msg) = match protocol::decode(&data) {
            Ok(Frame::Request { seq, op, msg }) => (seq, op, msg),
            // Answers to our requests; most (acknowledgements of updates)
            // nobody waits for.
            Ok(Frame::Response { seq, result }) => {
                if let Some(tx) = waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&seq)
                {
                    let _ = tx.send(result);
                }
                continue;
            }
            Err(e) => break Ended::Lost(format!("malformed message from the master: {e}")),
        };
        let reply = |result: Result<Value, String>| match result {
            Ok(v) => protocol::response(seq_no, v, false),
            Err(e) => protocol::response(seq_no, Value::from(e), true),
        };
        match op.as_str() {
            "keepalive" | "set_worker_settings" => {
                let _ = out.send(reply(Ok(Value::Nil)));
            }
            "print" => {
                if let Some(m) = map_get(&msg, "message").and_then(str_of) {
                    tracing::info!("message from the master: {m}");
                }
                let _ = out.send(reply(Ok(Value::Nil)));
            }
            "get_worker_info" => {
                let _ = out.send(reply(Ok(worker_info(basedir))));
            }
            "shutdown" => {
                let _ = out.send(reply(Ok(Value::Nil)));
                break Ended::Shutdown;
            }
            "interrupt_command" => {
                let id = map_get(&msg, "command_id")
                    .and_then(str_of)
                    .unwrap_or_default()
                    .to_string();
                let why = map_get(&msg, "why")
                    .and_then(str_of)
                    .unwrap_or("interrupted")
                    .to_string();
                let found = running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                    .cloned();
                let r = match found {
                    Some(tx) => {
                        let _ = tx.send(why);
                        Ok(Value::Nil)
                    }
                    None => Err(format!("no running command {id}")),
                };
                let _ = out.send(reply(r));
            }
            "start_command" => {
                let id = map_get(&msg, "command_id")
                    .and_then(str_of)
                    .map(String::from);
                let name = map_get(&msg, "command_name")
                    .and_then(str_of)
                    .map(String::from);
                let args = map_get(&msg, "args").cloned();
                let (Some(id), Some(name), Some(args)) = (id, name, args) else {
                    let _ = out.send(reply(Err(
                        "start_command needs command_id, command_name and args".into(),
                    )));
                    continue;
                };
                let (itx, irx) = mpsc::unbounded_channel();
                running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), itx);
                let _ = out.send(reply(Ok(Value::Nil)));
                let ctx = CommandCtx {
                    id: id.clone(),
                    out: out.clone(),
                    seq: seq.clone(),
                    waiting: waiting.clone(),
                };
                let running = running.clone();
                tokio::spawn(async move {
                    let ended = match name.as_str() {
                        "shell" => shell(&ctx, &args, irx).await,
                        "upload_file" | "uploadFile" => upload(&ctx, &args, false, irx).await,
                        "upload_directory" | "uploadDirectory" => {
                            upload(&ctx, &args, true, irx).await
                        }
                        "download_file" | "downloadFile" => download(&ctx, &args, irx).await,
                        other => file_command(&ctx, other, &args).await,
                    };
                    ctx.send(
                        "complete",
                        vec![("args", ended.err().map_or(Value::Nil, Value::from))],
                    );
                    running
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                });
            }
            other => {
                let _ = out.send(reply(Err(format!("Command {other} does not exist."))));
            }
        }
    };
    // Nobody will answer now.
    waiting.lock().unwrap_or_else(|e| e.into_inner()).clear();
    // Commands of a lost connection are killed: their results could not be
    // reported.
    for (_, tx) in running.lock().unwrap_or_else(|e| e.into_inner()).drain() {
        let _ = tx.send("the connection to the master was lost".into());
    }
    drop(out);
    let _ = writer.await;
    Ok(ended)
}

pub(super) fn worker_info(basedir: &Path) -> Value {
    let environ: Vec<(Value, Value)> = std::env::vars()
        .map(|(k, v)| (Value::from(k), Value::from(v)))
        .collect();
    let commands: Vec<(Value, Value)> = [
        "shell",
        "mkdir",
        "rmdir",
        "rmfile",
        "stat",
        "glob",
        "listdir",
        "cpdir",
        "upload_file",
        "upload_directory",
        "download_file",
    ]
    .iter()
    .map(|c| (Value::from(*c), Value::from("3.3")))
    .collect();
    let mut info = vec![
        ("environ", Value::Map(environ)),
        ("system", Value::from("posix")),
        ("basedir", Value::from(basedir.to_string_lossy().as_ref())),
        (
            "numcpus",
            Value::from(std::thread::available_parallelism().map_or(1, |n| n.get()) as u64),
        ),
        (
            "version",
            Value::from(concat!("kiln-", env!("CARGO_PKG_VERSION"))),
        ),
        ("worker_commands", Value::Map(commands)),
    ];
    // Buildbot's convention: files in BASEDIR/info are more info.
    let mut extra = Vec::new();
    if let Ok(entries) = std::fs::read_dir(basedir.join("info")) {
        for e in entries.flatten() {
            if let (Some(name), Ok(text)) = (
                e.file_name().to_str().map(String::from),
                std::fs::read_to_string(e.path()),
            ) {
                extra.push((name, text));
            }
        }
    }
    let mut m = map(std::mem::take(&mut info));
    if let Value::Map(pairs) = &mut m {
        for (k, v) in extra {
            pairs.push((Value::from(k), Value::from(v)));
        }
    }
    m
}

pub(super) struct CommandCtx {
    pub(super) id: String,
    pub(super) out: mpsc::UnboundedSender<Vec<u8>>,
    pub(super) seq: Arc<std::sync::atomic::AtomicU64>,
    pub(super) waiting: Waiting,
}

/// How long the worker waits for the master to answer a transfer call.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(120);

impl CommandCtx {
    /// Sends a request about this command and waits for the master's answer.
    pub(super) async fn call(
        &self,
        op: &str,
        mut fields: Vec<(&str, Value)>,
    ) -> Result<Value, String> {
        fields.push(("command_id", Value::from(self.id.as_str())));
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seq, tx);
        if self.out.send(protocol::request(seq, op, fields)).is_err() {
            return Err("the connection to the master is gone".into());
        }
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the connection to the master is gone".into()),
            Err(_) => {
                self.waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&seq);
                Err(format!(
                    "the master did not answer `{op}` within {} s",
                    CALL_TIMEOUT.as_secs()
                ))
            }
        }
    }

    pub(super) fn send(&self, op: &str, mut fields: Vec<(&str, Value)>) {
        fields.push(("command_id", Value::from(self.id.as_str())));
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.out.send(protocol::request(seq, op, fields));
    }

    /// One `update` with (key, value) pairs.
    pub(super) fn update(&self, pairs: Vec<(&str, Value)>) {
        let args = Value::Array(
            pairs
                .into_iter()
                .map(|(k, v)| Value::Array(vec![Value::from(k), v]))
                .collect(),
        );
        self.send("update", vec![("args", args)]);
    }

    /// Text for a stdio stream, as Buildbot's LineInfo: the text, where its
    /// newlines are, and when each line came.
    pub(super) fn text(&self, stream: &str, text: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let newlines: Vec<Value> = text
            .char_indices()
            .filter(|(_, c)| *c == '\n')
            .map(|(i, _)| Value::from(i as u64))
            .collect();
        let times = vec![Value::from(now); newlines.len()];
        self.update(vec![(
            stream,
            Value::Array(vec![
                Value::from(text),
                Value::Array(newlines),
                Value::Array(times),
            ]),
        )]);
    }

    pub(super) fn header(&self, line: &str) {
        self.text("header", &format!("{line}\n"));
    }
}

pub(super) fn arg_str(args: &Value, key: &str) -> Option<String> {
    map_get(args, key).and_then(str_of).map(String::from)
}

pub(super) fn arg_secs(args: &Value, key: &str) -> Option<Duration> {
    match map_get(args, key) {
        Some(Value::Integer(i)) => i.as_u64().map(Duration::from_secs),
        Some(Value::F64(f)) if *f >= 0.0 => Some(Duration::from_secs_f64(*f)),
        _ => None,
    }
}
