//! A remote command: a step turned into a worker command (`shell`,
//! file commands, transfers, Mozilla's mock) and its run on the worker,
//! streaming its output into the step's log until it ends, is stopped or
//! its worker goes.

use std::time::Duration;

use rmpv::Value;

use crate::config::{Arg, BuilderConfig, Step, StepCommand, StepKind, TransferOptions};
use crate::store::builds::LineKind;
use crate::workers::transfer::{self, Download, Upload, UploadKind};
use crate::workers::{protocol, CommandEvent};

use super::{logs::LogSink, render, runner::Build, Distributor};

/// How long a stopped build waits for its interrupted command to end.
pub(super) const INTERRUPT_GRACE: Duration = Duration::from_secs(30);

/// Buildbot's default `timeout`: seconds without output before the worker
/// kills a command.
pub(super) const DEFAULT_TIMEOUT: u32 = 1200;

/// The most of a command's stdout a `SetProperty` keeps.
pub(super) const CAPTURE_LIMIT: usize = 1 << 20;

/// How one worker command ended.
pub(super) enum CommandEnd {
    /// It completed, with this exit code (if the worker sent one).
    Done { rc: Option<i64> },
    /// The worker could not run it.
    Failed(String),
    /// The build was stopped.
    Cancelled,
    /// The worker went away.
    Lost,
}

pub(super) struct CommandRun {
    pub(super) ended: CommandEnd,
    /// Its stdout, when asked for.
    pub(super) captured: String,
    pub(super) command_id: String,
    /// Why the worker ended it, when it did (`timeout` for maxTime,
    /// `timeout_without_output` for timeout).
    pub(super) failure_reason: Option<String>,
}

/// Why a step's command could not be prepared.
pub(super) enum Prepared {
    /// A fault in the config or the master: EXCEPTION.
    Exception(String),
    /// What the step was asked to do cannot be done (a missing master
    /// file): FAILURE, as Buildbot's transfer steps report it.
    Failure(String),
}

/// A command run inside Mozilla's mock chroot, as its MockCommand did:
/// `mock_mozilla -r TARGET --cwd WORKDIR --unpriv --shell "/usr/bin/env
/// K=V ... CMD"`, the step's env passed inside.
pub(super) fn mock_command(
    command: &Value,
    target: &str,
    workdir: &str,
    step: &Step,
    props: &render::Scope<'_>,
) -> Result<Value, String> {
    let quote = |s: &str| {
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
        {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let cmd = match command {
        Value::Array(a) => a
            .iter()
            .map(|v| protocol::str_of(v).map(quote).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(" "),
        other => protocol::str_of(other).unwrap_or_default().to_string(),
    };
    let mut inner = vec!["/usr/bin/env".to_string()];
    for (k, v) in step.env.iter() {
        inner.push(quote(&format!("{k}={}", arg_text(v, props)?)));
    }
    inner.push(cmd);
    Ok(Value::Array(
        [
            "mock_mozilla",
            "-r",
            target,
            "--cwd",
            workdir,
            "--unpriv",
            "--shell",
            &inner.join(" "),
        ]
        .into_iter()
        .map(Value::from)
        .collect(),
    ))
}

/// The arguments of a `shell` command for a step.
pub(super) fn shell_args(
    step: &Step,
    builder: &BuilderConfig,
    workdir: &str,
    command: Value,
    props: &render::Scope<'_>,
) -> Result<Value, String> {
    let mut env = Vec::new();
    for (k, v) in builder.env.iter().chain(step.env.iter()) {
        let t = arg_text(v, props)?;
        env.push((Value::from(k.as_str()), Value::from(t)));
    }
    let mut args = vec![
        ("workdir", Value::from(workdir)),
        ("command", command),
        ("env", Value::Map(env)),
        ("want_stdout", Value::Boolean(true)),
        ("want_stderr", Value::Boolean(true)),
        ("logEnviron", Value::Boolean(true)),
        (
            "timeout",
            Value::from(step.timeout.unwrap_or(DEFAULT_TIMEOUT)),
        ),
        ("usePTY", Value::Boolean(false)),
    ];
    if let Some(t) = step.max_time {
        args.push(("maxTime", Value::from(t)));
    }
    Ok(protocol::map(args))
}

pub(super) fn download_args(dest: &str, t: &TransferOptions) -> Value {
    protocol::map(vec![
        ("path", Value::from(dest)),
        ("maxsize", t.maxsize.map_or(Value::Nil, Value::from)),
        ("blocksize", Value::from(t.blocksize)),
        ("mode", t.mode.map_or(Value::Nil, Value::from)),
    ])
}

/// The text of a stdio update: Buildbot's `[text, newlines, times]` or a
/// plain string.
pub(super) fn update_text(v: &Value) -> &str {
    match v {
        Value::Array(a) => a.first().and_then(protocol::str_of).unwrap_or_default(),
        other => protocol::str_of(other).unwrap_or_default(),
    }
}

pub(super) fn join_path(base: &str, rel: &str) -> String {
    if rel.starts_with('/') {
        rel.to_string()
    } else if rel.is_empty() || rel == "." {
        base.to_string()
    } else {
        format!("{}/{}", base.trim_end_matches('/'), rel)
    }
}

pub(super) fn arg_text(a: &Arg, props: &render::Scope<'_>) -> Result<String, String> {
    match a {
        Arg::Literal(s) => Ok(s.to_string()),
        Arg::Secret(s) => Ok(s.expose().to_string()),
        Arg::Render(r) => render::render(r, props).map_err(|e| e.message),
    }
}

pub(super) fn command_value(c: &StepCommand, props: &render::Scope<'_>) -> Result<Value, String> {
    match c {
        StepCommand::Shell(a) => Ok(Value::from(arg_text(a, props)?)),
        StepCommand::Argv(v) => Ok(Value::Array(
            v.iter()
                .map(|a| arg_text(a, props).map(Value::from))
                .collect::<Result<_, _>>()?,
        )),
    }
}

impl Distributor {
    pub(super) fn prepare_command(
        &self,
        step: &Step,
        builder: &BuilderConfig,
        workdir: &str,
        props: &render::Scope<'_>,
    ) -> Result<(&'static str, Value, Option<transfer::Transfer>), Prepared> {
        let arg_text = |a: &Arg| arg_text(a, props);
        let exception = Prepared::Exception;
        let opt_u64 = |v: Option<u64>| v.map_or(Value::Nil, Value::from);
        let master_path = |p: &str| self.master_dir.join(p);
        // A file or directory from the worker into the master's directory:
        // the remote command, its arguments (the last one the kind's own)
        // and where the bytes go.
        let upload = |command: &'static str,
                      workersrc: &Arg,
                      masterdest: &str,
                      transfer: &TransferOptions,
                      kind: UploadKind,
                      (key, value): (&'static str, Value)| {
            let src = join_path(workdir, &arg_text(workersrc).map_err(exception)?);
            let dest = master_path(masterdest);
            let upload = Upload::new(dest.clone(), transfer.maxsize, kind)
                .map_err(|e| exception(format!("cannot write {}: {e}", dest.display())))?;
            let args = protocol::map(vec![
                ("path", Value::from(src)),
                ("maxsize", opt_u64(transfer.maxsize)),
                ("blocksize", Value::from(transfer.blocksize)),
                (key, value),
            ]);
            Ok((command, args, Some(transfer::Transfer::Upload(upload))))
        };
        match &step.kind {
            StepKind::FileUpload {
                workersrc,
                masterdest,
                transfer,
                keepstamp,
            } => upload(
                "upload_file",
                workersrc,
                masterdest,
                transfer,
                UploadKind::File {
                    mode: transfer.mode,
                },
                ("keepstamp", Value::Boolean(*keepstamp)),
            ),
            StepKind::DirectoryUpload {
                workersrc,
                masterdest,
                transfer,
                compress,
            } => upload(
                "upload_directory",
                workersrc,
                masterdest,
                transfer,
                UploadKind::Directory {
                    compress: compress.as_ref().map(|c| c.to_string()),
                },
                (
                    "compress",
                    compress.as_deref().map_or(Value::Nil, Value::from),
                ),
            ),
            StepKind::FileDownload {
                mastersrc,
                workerdest,
                transfer,
            } => {
                let src = master_path(mastersrc);
                let file = std::fs::File::open(&src).map_err(|e| {
                    Prepared::Failure(format!(
                        "{} is not available on the master: {e}",
                        src.display()
                    ))
                })?;
                let dest = join_path(workdir, &arg_text(workerdest).map_err(exception)?);
                Ok((
                    "download_file",
                    download_args(&dest, transfer),
                    Some(transfer::Transfer::Download(Download::new(Box::new(file)))),
                ))
            }
            StepKind::StringDownload {
                s,
                workerdest,
                transfer,
            } => {
                let text = arg_text(s).map_err(exception)?;
                let dest = join_path(workdir, &arg_text(workerdest).map_err(exception)?);
                Ok((
                    "download_file",
                    download_args(&dest, transfer),
                    Some(transfer::Transfer::Download(Download::new(Box::new(
                        std::io::Cursor::new(text.into_bytes()),
                    )))),
                ))
            }
            _ => {
                let Some(command) = &step.command else {
                    return Err(exception(format!(
                        "step `{}` ({}) has no command; this kiln runs command and transfer steps only so far",
                        step.name,
                        step.kind.type_name()
                    )));
                };
                let mut command = command_value(command, props).map_err(exception)?;
                if let StepKind::MockCommand {
                    use_mock: true,
                    target,
                } = &step.kind
                {
                    let Some(target) = target else {
                        return Err(exception(format!(
                            "step `{}`: MockCommand with mock: true needs a `target`",
                            step.name
                        )));
                    };
                    command =
                        mock_command(&command, target, workdir, step, props).map_err(exception)?;
                }
                let args = shell_args(step, builder, workdir, command, props).map_err(exception)?;
                Ok(("shell", args, None))
            }
        }
    }

    /// Runs one command of a step on the worker, streaming its output into
    /// `sink`'s log, until it completes, fails, is cancelled by `stop`
    /// (interrupted, with a grace period) or its worker is lost. With
    /// `capture`, its stdout is also returned (bounded).
    pub(super) async fn run_command(
        &self,
        b: &Build<'_>,
        sink: &mut LogSink,
        command_name: &str,
        args: Value,
        transfer: Option<transfer::Transfer>,
        capture: bool,
    ) -> anyhow::Result<CommandRun> {
        let (builder, worker, log) = (b.builder, b.worker, sink.log);
        let stop = sink.stop.clone();
        let mut run = CommandRun {
            ended: CommandEnd::Lost,
            captured: String::new(),
            command_id: String::new(),
            failure_reason: None,
        };
        let (command_id, mut events) = match worker
            .start_transfer(&builder.name, command_name, args, transfer)
            .await
        {
            Ok(x) => x,
            Err(e) if worker.closed.is_cancelled() => {
                tracing::warn!("{e:#}");
                return Ok(run);
            }
            Err(e) => {
                run.ended = CommandEnd::Failed(format!("cannot start the command: {e:#}"));
                return Ok(run);
            }
        };
        run.command_id = command_id.clone();
        let mut rc: Option<i64> = None;
        // When the build is stopped: the command is interrupted, and if the
        // worker does not report it ended within this time, the step ends
        // anyway.
        let mut interrupted: Option<tokio::time::Instant> = None;
        run.ended = loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = stop.cancelled(), if interrupted.is_none() => {
                    interrupted = Some(tokio::time::Instant::now() + INTERRUPT_GRACE);
                    // In its own task: the answer comes through the same
                    // connection as the updates this loop must keep taking.
                    let (w, bname, id) = (worker.clone(), builder.name.clone(), command_id.clone());
                    tokio::spawn(async move {
                        if let Err(e) = w.interrupt_command(&bname, &id, "the build was stopped").await {
                            tracing::warn!(builder = %bname, "interrupting the command: {e:#}");
                        }
                    });
                    continue;
                }
                _ = tokio::time::sleep_until(interrupted.unwrap_or_else(tokio::time::Instant::now)), if interrupted.is_some() => {
                    self.store
                        .append_header(log, format!("the worker did not end the command within {} s of the interrupt", INTERRUPT_GRACE.as_secs()))
                        .await?;
                    break CommandEnd::Cancelled;
                }
            };
            let Some(ev) = ev else {
                break CommandEnd::Lost;
            };
            match ev {
                CommandEvent::Update(pairs) => {
                    let mut lines = Vec::new();
                    for (key, value) in pairs {
                        match key.as_str() {
                            "stdout" | "stderr" | "header" => {
                                let kind = LineKind::of_stream(&key);
                                for l in sink.split(kind, update_text(&value)) {
                                    if capture
                                        && kind == LineKind::Stdout
                                        && run.captured.len() < CAPTURE_LIMIT
                                    {
                                        run.captured.push_str(&l);
                                        run.captured.push('\n');
                                    }
                                    if let Some(line) =
                                        sink.keep(kind, &l, b.gen.config.log_max_size)
                                    {
                                        lines.push(line);
                                    }
                                }
                            }
                            "rc" => rc = value.as_i64(),
                            "failure_reason" => {
                                run.failure_reason = protocol::str_of(&value).map(String::from)
                            }
                            _ => {}
                        }
                    }
                    if !lines.is_empty() {
                        self.store.append_log(log, lines).await?;
                    }
                }
                CommandEvent::Complete(_) if interrupted.is_some() => break CommandEnd::Cancelled,
                CommandEvent::Complete(None) => break CommandEnd::Done { rc },
                CommandEvent::Complete(Some(why)) => {
                    if worker.closed.is_cancelled() {
                        break CommandEnd::Lost;
                    }
                    break CommandEnd::Failed(why);
                }
            }
        };
        // Output that ended without a newline is a line of its own.
        let mut lines = Vec::new();
        for (kind, l) in sink.take_partial() {
            if capture && kind == LineKind::Stdout && run.captured.len() < CAPTURE_LIMIT {
                run.captured.push_str(&l);
                run.captured.push('\n');
            }
            if let Some(line) = sink.keep(kind, &l, b.gen.config.log_max_size) {
                lines.push(line);
            }
        }
        self.store.append_log(log, lines).await?;
        Ok(run)
    }
}
