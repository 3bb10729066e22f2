//! kiln's own worker: `kiln-worker create DIR ...` and `kiln-worker start
//! DIR` (also `kiln worker ...`). A crate of its own, so that a build
//! machine runs a small binary without the master's script engine,
//! database and web server. It speaks the same `msgpack_experimental_v7` protocol as a stock
//! buildbot-worker: it answers `get_worker_info`, `set_worker_settings`,
//! `keepalive`, `print`, `start_command`, `interrupt_command` and
//! `shutdown`, and reconnects with capped exponential backoff.
//!
//! Shell commands run in their own process group, with the requested env
//! and workdir; stdout and stderr are streamed as they come; `timeout` (no
//! output for N s) and `maxTime` (N s in all) kill the whole group, as
//! does an interrupt. File commands: mkdir, rmdir, rmfile, stat, glob,
//! listdir, cpdir, and the transfers upload_file, upload_directory (a tar,
//! optionally gz or bz2) and download_file, which call the master back
//! block by block and wait for each answer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use rmpv::Value;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use kiln_protocol::{self as protocol, map, map_get, str_of, Frame};

/// The worker's commands, for `kiln-worker` and `kiln worker` alike.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Make a worker dir that connects to a master.
    Create {
        dir: PathBuf,
        /// The master's worker port, HOST:PORT.
        #[arg(long)]
        master: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        password: String,
    },
    /// Run the worker of DIR in the foreground (logs to stderr).
    Start { dir: PathBuf },
}

/// Runs one of the worker's commands; `program` is how the user called
/// this worker (`kiln worker` or `kiln-worker`), for the hints it prints.
pub fn run_command(command: Command, program: &str) -> anyhow::Result<()> {
    match command {
        Command::Create {
            dir,
            master,
            name,
            password,
        } => {
            create(&dir, &master, &name, &password)?;
            println!(
                "created worker `{name}` in {}; run it with `{program} start {}`",
                dir.display(),
                dir.display()
            );
            Ok(())
        }
        Command::Start { dir } => start(&dir),
    }
}

/// The file in a worker dir that says where and who it is.
pub const CONFIG_FILE: &str = "kiln-worker.json";

#[derive(Serialize, Deserialize)]
struct WorkerFile {
    master: String,
    name: String,
    password: String,
}

/// `kiln worker create`.
pub fn create(dir: &Path, master: &str, name: &str, password: &str) -> anyhow::Result<()> {
    if dir.join(CONFIG_FILE).exists() {
        bail!("{} already holds a worker", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let text = serde_json::to_string_pretty(&WorkerFile {
        master: master.to_string(),
        name: name.to_string(),
        password: password.to_string(),
    })?;
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// `kiln worker start`: runs until SIGTERM/SIGINT or a `shutdown` request.
pub fn start(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no worker in {} (kiln worker create makes one)",
            dir.display()
        )
    })?;
    let cfg: WorkerFile =
        serde_json::from_str(&text).with_context(|| format!("{} is malformed", path.display()))?;
    let basedir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cfg, basedir))
}

/// Many workers in one process (for measuring a master with a large
/// fleet): `{prefix}0` .. `{prefix}{count-1}`, all with `password`, each
/// with its own basedir under `dir`. Runs until SIGTERM/SIGINT.
pub fn fleet(
    dir: &Path,
    master: &str,
    prefix: &str,
    count: usize,
    password: &str,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let basedir = dir.join(format!("{prefix}{i}"));
            std::fs::create_dir_all(&basedir)?;
            let cfg = WorkerFile {
                master: master.to_string(),
                name: format!("{prefix}{i}"),
                password: password.to_string(),
            };
            tasks.push(tokio::spawn(run(cfg, basedir)));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}

async fn run(cfg: WorkerFile, basedir: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut failures: u32 = 0;
    loop {
        let session = session(&cfg, &basedir);
        let outcome = tokio::select! {
            r = session => r,
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        };
        match outcome {
            Ok(Ended::Shutdown) => {
                tracing::info!("the master asked this worker to shut down");
                return Ok(());
            }
            Ok(Ended::Lost(why)) => {
                failures = 0;
                tracing::warn!("connection to {} lost: {why}", cfg.master);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!("cannot connect to {}: {e:#}", cfg.master);
            }
        }
        // Capped exponential backoff: 1, 2, 4, ... 60 s.
        let wait = Duration::from_secs((1u64 << failures.min(6)).min(60));
        tracing::info!("reconnecting in {} s", wait.as_secs());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}

enum Ended {
    Shutdown,
    Lost(String),
}

/// Running commands: id → interrupt sender.
type Running = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<String>>>>;
/// The master's answers we wait for, by sequence number.
type Waiting = Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Result<Value, String>>>>>;

async fn session(cfg: &WorkerFile, basedir: &Path) -> anyhow::Result<Ended> {
    use base64::Engine as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = if cfg.master.starts_with("ws://") {
        cfg.master.clone()
    } else {
        format!("ws://{}/", cfg.master)
    };
    let mut req = url.as_str().into_client_request()?;
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", cfg.name, cfg.password));
    req.headers_mut()
        .insert("Authorization", format!("Basic {auth}").parse()?);
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_tungstenite::connect_async(req),
    )
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

fn worker_info(basedir: &Path) -> Value {
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

struct CommandCtx {
    id: String,
    out: mpsc::UnboundedSender<Vec<u8>>,
    seq: Arc<std::sync::atomic::AtomicU64>,
    waiting: Waiting,
}

/// How long the worker waits for the master to answer a transfer call.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

impl CommandCtx {
    /// Sends a request about this command and waits for the master's answer.
    async fn call(&self, op: &str, mut fields: Vec<(&str, Value)>) -> Result<Value, String> {
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

    fn send(&self, op: &str, mut fields: Vec<(&str, Value)>) {
        fields.push(("command_id", Value::from(self.id.as_str())));
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.out.send(protocol::request(seq, op, fields));
    }

    /// One `update` with (key, value) pairs.
    fn update(&self, pairs: Vec<(&str, Value)>) {
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
    fn text(&self, stream: &str, text: &str) {
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

    fn header(&self, line: &str) {
        self.text("header", &format!("{line}\n"));
    }
}

fn arg_str(args: &Value, key: &str) -> Option<String> {
    map_get(args, key).and_then(str_of).map(String::from)
}

fn arg_secs(args: &Value, key: &str) -> Option<Duration> {
    match map_get(args, key) {
        Some(Value::Integer(i)) => i.as_u64().map(Duration::from_secs),
        Some(Value::F64(f)) if *f >= 0.0 => Some(Duration::from_secs_f64(*f)),
        _ => None,
    }
}

/// The command's environment: the worker's, changed as `env` says (None
/// removes a key, a list is joined with `:`, `${NAME}` is the worker's).
fn environment(args: &Value) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = std::env::vars().collect();
    let base = env.clone();
    let expand = |s: &str| -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            match rest[i + 2..].find('}') {
                Some(j) => {
                    let name = &rest[i + 2..i + 2 + j];
                    out.push_str(base.get(name).map(String::as_str).unwrap_or(""));
                    rest = &rest[i + 3 + j..];
                }
                None => {
                    out.push_str(&rest[i..]);
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out
    };
    if let Some(Value::Map(pairs)) = map_get(args, "env") {
        for (k, v) in pairs {
            let Some(k) = str_of(k) else { continue };
            match v {
                Value::Nil => {
                    env.remove(k);
                }
                Value::Array(parts) => {
                    let joined: Vec<String> =
                        parts.iter().filter_map(str_of).map(&expand).collect();
                    env.insert(k.to_string(), joined.join(":"));
                }
                other => {
                    if let Some(s) = str_of(other) {
                        env.insert(k.to_string(), expand(s));
                    }
                }
            }
        }
    }
    env
}

/// Runs a `shell` command; an error is why it could not run.
async fn shell(
    ctx: &CommandCtx,
    args: &Value,
    mut interrupt: mpsc::UnboundedReceiver<String>,
) -> Result<(), String> {
    let Some(workdir) = arg_str(args, "workdir") else {
        return Err("shell needs a workdir".into());
    };
    // Without `.` components: `create_dir_all("a/b/.")` would not create b.
    let workdir: String = Path::new(&workdir)
        .components()
        .collect::<PathBuf>()
        .to_string_lossy()
        .into_owned();
    let argv: Vec<String> = match map_get(args, "command") {
        Some(Value::Array(a)) => a.iter().filter_map(str_of).map(String::from).collect(),
        Some(v) => match str_of(v) {
            Some(s) => vec!["/bin/sh".into(), "-c".into(), s.to_string()],
            None => return Err("`command` must be a string or a list".into()),
        },
        None => return Err("shell needs a command".into()),
    };
    let Some((program, rest)) = argv.split_first() else {
        return Err("the command is empty".into());
    };
    if let Err(e) = std::fs::create_dir_all(&workdir) {
        ctx.header(&format!("cannot create {workdir}: {e}"));
        ctx.update(vec![("rc", Value::from(-1))]);
        return Ok(());
    }
    let env = environment(args);
    // The header goes as one update.
    let mut header = format!("{}\n in dir {workdir}\n", argv.join(" "));
    if !matches!(map_get(args, "logEnviron"), Some(Value::Boolean(false))) {
        let mut keys: Vec<&String> = env.keys().collect();
        keys.sort();
        header.push_str(" environment:\n");
        for k in keys {
            header.push_str(&format!("  {k}={}\n", env[k]));
        }
    }
    ctx.text("header", &header);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest)
        .current_dir(&workdir)
        .env_clear()
        .envs(&env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            ctx.header(&format!("cannot run {program}: {e}"));
            ctx.update(vec![("rc", Value::from(-1))]);
            return Ok(());
        }
    };
    let pgid = child.id().map(|p| p as i32);
    let kill_group = || {
        if let Some(pg) = pgid {
            // SAFETY: kill(2) on the process group this command leads.
            unsafe {
                libc::kill(-pg, libc::SIGKILL);
            }
        }
    };
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let timeout = arg_secs(args, "timeout");
    let max_time = arg_secs(args, "maxTime");
    let flag = |k: &str| match map_get(args, k) {
        Some(Value::Boolean(b)) => *b,
        Some(Value::Integer(i)) => i.as_i64() != Some(0),
        _ => true,
    };
    let (want_stdout, want_stderr) = (flag("want_stdout"), flag("want_stderr"));
    let mut last_output = Instant::now();
    let mut obuf = vec![0u8; 64 * 1024];
    let mut ebuf = vec![0u8; 64 * 1024];
    // Output is sent in whole lines, gathered for up to FLUSH_EVERY or
    // FLUSH_BYTES, as buildbot-worker buffers it: one update per read
    // would be one message (and one store write) per few kilobytes.
    let mut pending_out = Pending::default();
    let mut pending_err = Pending::default();
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut killed: Option<(&str, String)> = None;
    loop {
        let deadline = {
            let idle = timeout.map(|t| last_output + t);
            let total = max_time.map(|t| started + t);
            match (idle, total) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = async { match out.as_mut() { Some(o) => o.read(&mut obuf).await, None => std::future::pending().await } } => {
                match n {
                    Ok(0) | Err(_) => {
                        out = None;
                        pending_out.send_all(ctx, "stdout");
                    }
                    Ok(n) => {
                        last_output = Instant::now();
                        if want_stdout && pending_out.add(&obuf[..n]) {
                            pending_out.send_lines(ctx, "stdout");
                        }
                    }
                }
            }
            n = async { match err.as_mut() { Some(e) => e.read(&mut ebuf).await, None => std::future::pending().await } } => {
                match n {
                    Ok(0) | Err(_) => {
                        err = None;
                        pending_err.send_all(ctx, "stderr");
                    }
                    Ok(n) => {
                        last_output = Instant::now();
                        if want_stderr && pending_err.add(&ebuf[..n]) {
                            pending_err.send_lines(ctx, "stderr");
                        }
                    }
                }
            }
            _ = flush.tick() => {
                pending_out.send_lines(ctx, "stdout");
                pending_err.send_lines(ctx, "stderr");
            }
            status = child.wait(), if out.is_none() && err.is_none() => {
                let rc = match status {
                    Ok(s) => s.code().unwrap_or(-1),
                    Err(_) => -1,
                };
                if let Some((reason, text)) = &killed {
                    ctx.header(text);
                    ctx.update(vec![("failure_reason", Value::from(*reason))]);
                }
                ctx.update(vec![("rc", Value::from(rc)), ("elapsed", Value::from(started.elapsed().as_secs_f64()))]);
                return Ok(());
            }
            _ = sleep, if killed.is_none() => {
                pending_out.send_all(ctx, "stdout");
                pending_err.send_all(ctx, "stderr");
                let now = Instant::now();
                let (reason, text) = if max_time.is_some_and(|t| now >= started + t) {
                    ("timeout", format!("command timed out: {} seconds elapsed running {}, attempting to kill", max_time.map_or(0, |t| t.as_secs()), argv.join(" ")))
                } else {
                    ("timeout_without_output", format!("command timed out: {} seconds without output running {}, attempting to kill", timeout.map_or(0, |t| t.as_secs()), argv.join(" ")))
                };
                kill_group();
                killed = Some((reason, text));
            }
            why = interrupt.recv(), if killed.is_none() => {
                kill_group();
                killed = Some(("interrupted", format!("killing the command: {}", why.unwrap_or_default())));
            }
        }
    }
}

/// How long output may wait on the worker before it is sent.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// How much output makes an update at once.
const FLUSH_BYTES: usize = 64 * 1024;

/// A stream's output not sent yet.
#[derive(Default)]
struct Pending(Vec<u8>);

impl Pending {
    /// Adds output; true when there is enough to send now.
    fn add(&mut self, bytes: &[u8]) -> bool {
        self.0.extend_from_slice(bytes);
        self.0.len() >= FLUSH_BYTES
    }

    /// Sends the whole lines gathered, keeping a partial last line (unless
    /// it alone is FLUSH_BYTES long: a line without end still streams).
    fn send_lines(&mut self, ctx: &CommandCtx, stream: &str) {
        let end = match self.0.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None if self.0.len() >= FLUSH_BYTES => utf8_prefix(&self.0),
            None => return,
        };
        if end == 0 {
            return;
        }
        let rest = self.0.split_off(end);
        ctx.text(stream, &String::from_utf8_lossy(&self.0));
        self.0 = rest;
    }

    /// Sends everything (the stream ended, or the command is killed).
    fn send_all(&mut self, ctx: &CommandCtx, stream: &str) {
        if !self.0.is_empty() {
            ctx.text(stream, &String::from_utf8_lossy(&self.0));
            self.0.clear();
        }
    }
}

/// The length of `bytes` without an incomplete UTF-8 character at its end.
fn utf8_prefix(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => bytes.len(),
    }
}

/// The file commands; an error is why one could not run. Results go in
/// updates (`rc`, and `stat`/`files` where the command answers something).
async fn file_command(ctx: &CommandCtx, name: &str, args: &Value) -> Result<(), String> {
    let path = arg_str(args, "path").map(PathBuf::from);
    let fail = |e: std::io::Error| {
        ctx.header(&format!("{name} failed: {e}"));
        ctx.update(vec![("rc", Value::from(e.raw_os_error().unwrap_or(1)))]);
        Ok(())
    };
    let ok = |extra: Vec<(&str, Value)>| {
        let mut pairs = extra;
        pairs.push(("rc", Value::from(0)));
        ctx.update(pairs);
        Ok(())
    };
    match name {
        "mkdir" => match path.map(std::fs::create_dir_all) {
            Some(Ok(())) => ok(vec![]),
            Some(Err(e)) => fail(e),
            None => Err("mkdir needs a path".into()),
        },
        "rmdir" => {
            let paths: Vec<PathBuf> = match map_get(args, "paths").or_else(|| map_get(args, "path"))
            {
                Some(Value::Array(a)) => a.iter().filter_map(str_of).map(PathBuf::from).collect(),
                Some(v) => str_of(v).map(PathBuf::from).into_iter().collect(),
                None => return Err("rmdir needs paths".into()),
            };
            for p in paths {
                let r = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else if p.exists() {
                    std::fs::remove_file(&p)
                } else {
                    Ok(())
                };
                if let Err(e) = r {
                    return fail(e);
                }
            }
            ok(vec![])
        }
        "rmfile" => match path.map(std::fs::remove_file) {
            Some(Ok(())) => ok(vec![]),
            Some(Err(e)) => fail(e),
            None => Err("rmfile needs a path".into()),
        },
        "stat" => match path.map(std::fs::metadata) {
            Some(Ok(m)) => {
                use std::os::unix::fs::MetadataExt;
                let st = Value::Array(vec![
                    Value::from(m.mode() as u64),
                    Value::from(m.ino()),
                    Value::from(m.dev()),
                    Value::from(m.nlink()),
                    Value::from(m.uid() as u64),
                    Value::from(m.gid() as u64),
                    Value::from(m.size()),
                    Value::from(m.atime()),
                    Value::from(m.mtime()),
                    Value::from(m.ctime()),
                ]);
                ok(vec![("stat", st)])
            }
            Some(Err(e)) => fail(e),
            None => Err("stat needs a path".into()),
        },
        "listdir" => match path.map(std::fs::read_dir) {
            Some(Ok(entries)) => {
                let mut names: Vec<String> = entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .collect();
                names.sort();
                ok(vec![(
                    "files",
                    Value::Array(names.into_iter().map(Value::from).collect()),
                )])
            }
            Some(Err(e)) => fail(e),
            None => Err("listdir needs a path".into()),
        },
        "glob" => {
            let Some(pattern) = path else {
                return Err("glob needs a path".into());
            };
            let files = glob_paths(&pattern);
            ok(vec![(
                "files",
                Value::Array(files.into_iter().map(Value::from).collect()),
            )])
        }
        "cpdir" => {
            let (Some(from), Some(to)) = (arg_str(args, "from_path"), arg_str(args, "to_path"))
            else {
                return Err("cpdir needs from_path and to_path".into());
            };
            match copy_dir(Path::new(&from), Path::new(&to)) {
                Ok(()) => ok(vec![]),
                Err(e) => fail(e),
            }
        }
        other => Err(format!("command {other} is not supported by kiln's worker")),
    }
}

/// The end of a transfer: `rc`, and `stderr` when something went wrong
/// (as Buildbot's transfer commands report it).
fn transfer_result(ctx: &CommandCtx, stderr: Option<String>) -> Result<(), String> {
    let mut pairs = vec![("rc", Value::from(i64::from(stderr.is_some())))];
    if let Some(e) = stderr {
        pairs.push(("stderr", Value::from(format!("{e}\n"))));
    }
    ctx.update(pairs);
    Ok(())
}

fn transfer_sizes(args: &Value) -> (Option<u64>, usize) {
    let maxsize = map_get(args, "maxsize").and_then(Value::as_u64);
    let blocksize = map_get(args, "blocksize")
        .and_then(Value::as_u64)
        .unwrap_or(16 * 1024)
        .clamp(1, 16 << 20) as usize;
    (maxsize, blocksize)
}

/// A tarball of `dir` in a temporary file, compressed as asked.
fn tar_directory(dir: &Path, compress: Option<&str>) -> std::io::Result<std::fs::File> {
    let mut file = tempfile::tempfile()?;
    {
        let w: Box<dyn std::io::Write> = match compress {
            Some("gz") => Box::new(flate2::write::GzEncoder::new(
                &mut file,
                flate2::Compression::default(),
            )),
            Some("bz2") => Box::new(bzip2::write::BzEncoder::new(
                &mut file,
                bzip2::Compression::default(),
            )),
            _ => Box::new(&mut file),
        };
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(false);
        b.append_dir_all(".", dir)?;
        b.into_inner()?.flush()?;
    }
    use std::io::Seek;
    file.rewind()?;
    Ok(file)
}

/// `upload_file` / `upload_directory`: the file (or a tar of the
/// directory) to the master in `blocksize` blocks, then close (and utime
/// with `keepstamp`) or unpack.
async fn upload(
    ctx: &CommandCtx,
    args: &Value,
    directory: bool,
    mut interrupt: mpsc::UnboundedReceiver<String>,
) -> Result<(), String> {
    use std::io::Read;
    let Some(path) = arg_str(args, "path") else {
        return Err("an upload needs a path".into());
    };
    let (maxsize, blocksize) = transfer_sizes(args);
    let keepstamp = map_get(args, "keepstamp")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let opened = if directory {
        let compress = arg_str(args, "compress");
        tar_directory(Path::new(&path), compress.as_deref())
            .map_err(|e| format!("Cannot read directory '{path}' for upload: {e}"))
    } else {
        std::fs::File::open(&path).map_err(|_| format!("Cannot open file '{path}' for upload"))
    };
    let write_op = if directory {
        "update_upload_directory_write"
    } else {
        "update_upload_file_write"
    };
    let mut stderr = None;
    if let (true, Err(e)) = (directory, &opened) {
        // Buildbot's worker reports an unreadable directory without calling
        // the master back.
        return transfer_result(ctx, Some(e.clone()));
    }
    ctx.header(&format!("sending {path}"));
    let mut failed_call = None;
    if let Ok(mut file) = opened {
        let mut remaining = maxsize;
        let mut buf = vec![0u8; blocksize];
        loop {
            if let Ok(why) = interrupt.try_recv() {
                stderr = Some(format!("upload interrupted: {why}"));
                break;
            }
            let want = remaining.map_or(blocksize, |r| (r as usize).min(blocksize));
            if want == 0 {
                // At the limit: anything more is truncated.
                let mut probe = [0u8; 1];
                if matches!(file.read(&mut probe), Ok(n) if n > 0) {
                    stderr = Some(format!(
                        "Maximum filesize reached, truncating file '{path}'"
                    ));
                }
                break;
            }
            let n = match file.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    stderr = Some(format!("cannot read '{path}': {e}"));
                    break;
                }
            };
            remaining = remaining.map(|r| r - n as u64);
            if let Err(e) = ctx
                .call(write_op, vec![("args", Value::Binary(buf[..n].to_vec()))])
                .await
            {
                failed_call = Some(e);
                break;
            }
        }
    } else if let Err(e) = opened {
        stderr = Some(e);
    }
    if directory {
        if failed_call.is_none() && stderr.is_none() {
            if let Err(e) = ctx.call("update_upload_directory_unpack", vec![]).await {
                failed_call = Some(e);
            }
        }
    } else {
        let closed = ctx.call("update_upload_file_close", vec![]).await;
        if failed_call.is_none() {
            failed_call = closed.err();
        }
        if keepstamp && failed_call.is_none() && stderr.is_none() {
            if let Ok(m) = std::fs::metadata(&path) {
                use std::os::unix::fs::MetadataExt;
                let at = m.atime() as f64 + m.atime_nsec() as f64 / 1e9;
                let mt = m.mtime() as f64 + m.mtime_nsec() as f64 / 1e9;
                failed_call = ctx
                    .call(
                        "update_upload_file_utime",
                        vec![
                            ("access_time", Value::F64(at)),
                            ("modified_time", Value::F64(mt)),
                        ],
                    )
                    .await
                    .err();
            }
        }
    }
    transfer_result(ctx, failed_call.or(stderr))
}

/// `download_file`: asks the master for `blocksize` blocks until an empty
/// one, writing them to `path` (its directory created, `mode` applied).
async fn download(
    ctx: &CommandCtx,
    args: &Value,
    mut interrupt: mpsc::UnboundedReceiver<String>,
) -> Result<(), String> {
    use std::io::Write;
    let Some(path) = arg_str(args, "path") else {
        return Err("a download needs a path".into());
    };
    let (maxsize, blocksize) = transfer_sizes(args);
    let mode = map_get(args, "mode").and_then(Value::as_u64);
    let opened = (|| {
        if let Some(dir) = Path::new(&path).parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::File::create(&path)?;
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode as u32))?;
        }
        Ok::<_, std::io::Error>(f)
    })();
    let mut stderr = None;
    match opened {
        Err(_) => stderr = Some(format!("Cannot open file '{path}' for download")),
        Ok(mut file) => {
            let mut remaining = maxsize;
            loop {
                if let Ok(why) = interrupt.try_recv() {
                    stderr = Some(format!("download interrupted: {why}"));
                    break;
                }
                let want = remaining.map_or(blocksize as u64, |r| r.min(blocksize as u64));
                if want == 0 {
                    stderr = Some(format!(
                        "Maximum filesize reached, truncating file '{path}'"
                    ));
                    break;
                }
                let data = match ctx
                    .call("update_read_file", vec![("length", Value::from(want))])
                    .await
                {
                    Ok(v) => v,
                    Err(e) => {
                        stderr = Some(e);
                        break;
                    }
                };
                let bytes: &[u8] = match &data {
                    Value::Binary(b) => b,
                    Value::String(s) => s.as_bytes(),
                    _ => &[],
                };
                if bytes.is_empty() {
                    break;
                }
                let n = (bytes.len() as u64).min(want) as usize;
                if let Err(e) = file.write_all(&bytes[..n]) {
                    stderr = Some(format!("cannot write '{path}': {e}"));
                    break;
                }
                remaining = remaining.map(|r| r - n as u64);
            }
        }
    }
    let closed = ctx.call("update_read_file_close", vec![]).await;
    if stderr.is_none() {
        stderr = closed.err();
    }
    transfer_result(ctx, stderr)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// `*` and `?` in the last component of a path.
fn glob_paths(pattern: &Path) -> Vec<String> {
    let (Some(dir), Some(pat)) = (
        pattern.parent(),
        pattern.file_name().and_then(|f| f.to_str()),
    ) else {
        return vec![];
    };
    fn matches(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => matches(&p[1..], s) || (!s.is_empty() && matches(p, &s[1..])),
            (Some(b'?'), Some(_)) => matches(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => matches(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| matches(pat.as_bytes(), n.as_bytes()))
        })
        .map(|e| e.path().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}
