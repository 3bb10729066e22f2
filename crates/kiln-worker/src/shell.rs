//! The `shell` command: a process group with the requested env and workdir,
//! its output streamed in whole lines, `timeout` and `maxTime` enforced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rmpv::Value;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use kiln_protocol::{map_get, str_of};

use super::session::{arg_secs, arg_str, CommandCtx};

/// The command's environment: the worker's, changed as `env` says (None
/// removes a key, a list is joined with `:`, `${NAME}` is the worker's).
pub(super) fn environment(args: &Value) -> HashMap<String, String> {
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
pub(super) async fn shell(
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
pub(super) const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// How much output makes an update at once.
pub(super) const FLUSH_BYTES: usize = 64 * 1024;

/// A stream's output not sent yet.
#[derive(Default)]
pub(super) struct Pending(Vec<u8>);

impl Pending {
    /// Adds output; true when there is enough to send now.
    pub(super) fn add(&mut self, bytes: &[u8]) -> bool {
        self.0.extend_from_slice(bytes);
        self.0.len() >= FLUSH_BYTES
    }

    /// Sends the whole lines gathered, keeping a partial last line (unless
    /// it alone is FLUSH_BYTES long: a line without end still streams).
    pub(super) fn send_lines(&mut self, ctx: &CommandCtx, stream: &str) {
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
    pub(super) fn send_all(&mut self, ctx: &CommandCtx, stream: &str) {
        if !self.0.is_empty() {
            ctx.text(stream, &String::from_utf8_lossy(&self.0));
            self.0.clear();
        }
    }
}

/// The length of `bytes` without an incomplete UTF-8 character at its end.
pub(super) fn utf8_prefix(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => bytes.len(),
    }
}
