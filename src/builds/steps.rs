//! One step: what each step kind does on the master (SetProperty,
//! Trigger, a transfer, a VCS checkout, a command) and how its outcome is
//! judged (`doStepIf`, log evaluation, properties it sets).

use std::collections::HashSet;

use rmpv::Value;
use tokio_util::sync::CancellationToken;

use crate::config::{
    Arg, BoolOrCallback, Disconnect as DisconnectWhen, Results, Step, StepCommand, StepKind,
};
use crate::store::Properties;
use crate::workers::protocol;
use crate::workers::protocol::map_get;
use crate::workers::transfer;

use super::{
    command::{arg_text, join_path, CommandEnd, CommandRun, Prepared, DEFAULT_TIMEOUT},
    logs::LogSink,
    render,
    runner::{severity, Build},
    Distributor, Generation,
};

/// The outcome of one step.
pub(super) struct StepOutcome {
    pub(super) result: Results,
    /// The worker went away during the step.
    pub(super) lost: bool,
    /// A property the step set (`SetProperty`).
    pub(super) set_property: Option<(String, serde_json::Value)>,
    /// A `DisconnectStep` saw its worker go, or wants it gone: the build
    /// ends after this step, as it is.
    pub(super) disconnect: Option<Disconnected>,
    /// The worker killed the command for `timeout` or `maxTime`.
    pub(super) timed_out: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Disconnected {
    /// The worker went away during the step (it rebooted).
    Gone,
    /// The master is to drop the worker's connection once the build ends.
    Drop,
}

impl StepOutcome {
    pub(super) fn of(result: Results) -> StepOutcome {
        StepOutcome {
            result,
            lost: false,
            set_property: None,
            disconnect: None,
            timed_out: false,
        }
    }
    pub(super) fn lost() -> StepOutcome {
        StepOutcome {
            result: Results::Retry,
            lost: true,
            set_property: None,
            disconnect: None,
            timed_out: false,
        }
    }
}

/// A step as a callback sees it.
pub(super) fn step_map(step: &Step, props: &Properties) -> rhai::Map {
    let mut m = rhai::Map::new();
    m.insert("name".into(), step.name.clone().into());
    let mut p = rhai::Map::new();
    for (k, (v, _)) in props {
        p.insert(
            k.into(),
            rhai::serde::to_dynamic(v).unwrap_or(rhai::Dynamic::UNIT),
        );
    }
    m.insert("properties".into(), p.into());
    m
}

impl Distributor {
    /// Runs one step: what its kind does on the master (`SetProperty`
    /// with a value, `Trigger`) or on the worker (every other kind, as a
    /// command), with its stdio log opened first and finished last.
    pub(super) async fn run_step(
        &self,
        b: &Build<'_>,
        stepid: i64,
        step: &Step,
        stop: &CancellationToken,
        props: &Properties,
    ) -> anyhow::Result<StepOutcome> {
        let log = self.store.new_log(stepid, "stdio", "s").await?;
        let secrets_dir = self.master_dir.join(crate::script::SECRETS_DIR);
        let scope = render::Scope::of(props)
            .with_worker(b.worker.info.get())
            .with_secrets(&secrets_dir);
        let outcome = match (&step.kind, &step.command) {
            (
                StepKind::SetProperty {
                    property,
                    value: Some(value),
                },
                None,
            ) => self.set_property(log, property, value, &scope).await?,
            (
                StepKind::Trigger {
                    scheduler_names,
                    wait_for_finish,
                    set_properties,
                },
                _,
            ) => {
                match self
                    .trigger(
                        b,
                        log,
                        scheduler_names,
                        *wait_for_finish,
                        set_properties,
                        stop,
                    )
                    .await?
                {
                    Ok(r) => StepOutcome::of(r),
                    Err(why) => self.exception(log, why).await?,
                }
            }
            _ => self.command_step(b, log, step, stop, props, &scope).await?,
        };
        self.store.finish_log(log).await?;
        Ok(outcome)
    }

    /// A step that cannot run, for a fault of the config or the master:
    /// EXCEPTION, with the reason in its log.
    async fn exception(&self, log: i64, why: String) -> anyhow::Result<StepOutcome> {
        self.store.append_header(log, &why).await?;
        Ok(StepOutcome::of(Results::Exception))
    }

    /// `SetProperty` with a `value`: rendered on the master.
    async fn set_property(
        &self,
        log: i64,
        property: &str,
        value: &Arg,
        scope: &render::Scope<'_>,
    ) -> anyhow::Result<StepOutcome> {
        match arg_text(value, scope) {
            Ok(v) => {
                self.store
                    .append_header(log, format!("{property} = {v:?}"))
                    .await?;
                Ok(StepOutcome {
                    set_property: Some((property.to_string(), v.into())),
                    ..StepOutcome::of(Results::Success)
                })
            }
            Err(why) => self.exception(log, why).await,
        }
    }

    /// Every other step: a command on the worker (a VCS checkout, a
    /// transfer, a shell command), then its outcome judged.
    async fn command_step(
        &self,
        b: &Build<'_>,
        log: i64,
        step: &Step,
        stop: &CancellationToken,
        props: &Properties,
        scope: &render::Scope<'_>,
    ) -> anyhow::Result<StepOutcome> {
        let (builder, builddir) = (b.builder, b.builddir);
        let workdir = join_path(builddir, step.workdir.as_deref().unwrap_or("build"));
        let git_step = matches!(step.kind, StepKind::Git { .. }) && step.command.is_none();
        // Secrets given as they are (env, command) are hidden from the
        // start; rendered `%(secret:...)s` ones as they are rendered.
        for arg in builder
            .env
            .values()
            .chain(step.env.values())
            .chain(match &step.command {
                Some(StepCommand::Argv(v)) => v.iter().collect::<Vec<_>>(),
                Some(StepCommand::Shell(a)) => vec![a],
                None => vec![],
            })
        {
            if let Arg::Secret(secret) = arg {
                scope.add_secret(secret.expose());
            }
        }
        let mut sink = LogSink::new(log, stop.clone(), scope.secrets());
        let run = if git_step {
            match self
                .git_checkout(b, &mut sink, step, &workdir, scope)
                .await?
            {
                Ok(run) => run,
                Err(why) => return self.exception(log, why).await,
            }
        } else {
            // JSONPropertiesDownload is a StringDownload of the build's
            // properties and sourcestamp as they are now.
            let props_step;
            let step = match &step.kind {
                StepKind::JsonPropertiesDownload {
                    workerdest,
                    transfer,
                } => {
                    props_step = Step {
                        kind: StepKind::StringDownload {
                            s: Arg::Literal(self.properties_json(b, props).await?.into()),
                            workerdest: workerdest.clone(),
                            transfer: transfer.clone(),
                        },
                        ..step.clone()
                    };
                    &props_step
                }
                _ => step,
            };
            let prepared = match self.prepare_command(step, builder, &workdir, scope) {
                Ok(p) => p,
                Err(Prepared::Exception(why)) => return self.exception(log, why).await,
                Err(Prepared::Failure(why)) => {
                    self.store.append_header(log, &why).await?;
                    return Ok(StepOutcome::of(Results::Failure));
                }
            };
            let (command_name, args, transfer) = prepared;
            let capture = matches!(
                step.kind,
                StepKind::SetProperty { .. } | StepKind::DisconnectStep { .. }
            );
            let hg = match (&step.kind, &args) {
                (StepKind::MercurialCloneCommand { .. }, _) if command_name == "shell" => {
                    let argv: Option<Vec<String>> = match map_get(&args, "command") {
                        Some(Value::Array(a)) => a
                            .iter()
                            .map(|v| protocol::str_of(v).map(String::from))
                            .collect(),
                        _ => None,
                    };
                    match argv {
                        Some(argv) => {
                            self.hg_clone(b, &mut sink, step, &argv, &workdir, scope)
                                .await?
                        }
                        None => None,
                    }
                }
                _ => None,
            };
            match hg {
                Some(run) => run,
                None => {
                    self.run_command(b, &mut sink, command_name, args, transfer, capture)
                        .await?
                }
            }
        };
        let command_id = run.command_id.clone();
        let mut outcome = self.judge(b, log, step, props, run).await?;
        // A transfer ends here: an upload lands only if the command
        // succeeded.
        if let Some(transfer::Transfer::Upload(u)) = b.worker.take_transfer(&command_id) {
            match u.finish(outcome.result == Results::Success) {
                Ok(what) => {
                    self.store
                        .append_header(log, format!("uploaded {what}"))
                        .await?
                }
                Err(why) if outcome.result == Results::Success => {
                    self.store.append_header(log, &why).await?;
                    outcome.result = Results::Failure;
                }
                Err(why) => self.store.append_header(log, &why).await?,
            }
        }
        Ok(outcome)
    }

    /// A finished command's outcome: the worker lost (a DisconnectStep
    /// expects it), stopped, failed, or done and evaluated; and what the
    /// step takes from it (`got_revision`, a property, a disconnect).
    async fn judge(
        &self,
        b: &Build<'_>,
        log: i64,
        step: &Step,
        props: &Properties,
        run: CommandRun,
    ) -> anyhow::Result<StepOutcome> {
        Ok(match run.ended {
            CommandEnd::Lost if matches!(step.kind, StepKind::DisconnectStep { .. }) => {
                self.store
                    .append_header(log, "the worker went away, as this step expects")
                    .await?;
                StepOutcome {
                    disconnect: Some(Disconnected::Gone),
                    ..StepOutcome::of(Results::Success)
                }
            }
            CommandEnd::Lost => StepOutcome::lost(),
            CommandEnd::Cancelled => StepOutcome::of(Results::Cancelled),
            CommandEnd::Failed(why) => {
                self.store.append_header(log, &why).await?;
                StepOutcome::of(Results::Exception)
            }
            CommandEnd::Done { rc } => {
                let timed_out = match run.failure_reason.as_deref() {
                    Some("timeout") => Some(format!(
                        "it ran longer than maxTime ({} s)",
                        step.max_time.unwrap_or_default()
                    )),
                    Some("timeout_without_output") => Some(format!(
                        "it printed nothing for timeout ({} s)",
                        step.timeout.unwrap_or(DEFAULT_TIMEOUT)
                    )),
                    _ => None,
                };
                if let Some(why) = &timed_out {
                    self.store
                        .append_header(log, format!("[kiln] the worker killed the command: {why}"))
                        .await?;
                }
                let mut o =
                    StepOutcome::of(match self.evaluate(b.gen, step, rc, log, props).await {
                        Ok(r) => r,
                        Err(why) => {
                            self.store.append_header(log, &why).await?;
                            Results::Exception
                        }
                    });
                o.timed_out = timed_out.is_some();
                if let (StepKind::Git { .. }, Results::Success) = (&step.kind, o.result) {
                    let v = run.captured.trim().to_string();
                    if !v.is_empty() {
                        o.set_property = Some(("got_revision".into(), v.into()));
                    }
                }
                if let (StepKind::SetProperty { property, .. }, Results::Success) =
                    (&step.kind, o.result)
                {
                    let v = run.captured.trim().to_string();
                    self.store
                        .append_header(log, format!("{property} = {v:?}"))
                        .await?;
                    o.set_property = Some((property.to_string(), v.into()));
                }
                if let StepKind::DisconnectStep { force_disconnect } = &step.kind {
                    let wanted = match force_disconnect {
                        DisconnectWhen::Always(b) => Ok(*b),
                        DisconnectWhen::OutputContains(text) => {
                            Ok(run.captured.contains(text.as_str()))
                        }
                        DisconnectWhen::Callback(cb) => self
                            .call(b.gen, cb, (step_map(step, props), run.captured.clone()))
                            .await
                            .and_then(|v| {
                                v.as_bool().map_err(|t| {
                                    format!("force_disconnect returned a {t}, not a bool")
                                })
                            }),
                    };
                    match wanted {
                        Ok(true) => {
                            self.store
                                .append_header(
                                    log,
                                    "the worker will be disconnected when the build ends",
                                )
                                .await?;
                            o.disconnect = Some(Disconnected::Drop);
                        }
                        Ok(false) => {}
                        Err(why) => {
                            self.store.append_header(log, &why).await?;
                        }
                    }
                }
                o
            }
        })
    }

    /// `Trigger`: a buildset from each Triggerable scheduler named, on this
    /// build's sourcestamps with `set_properties`, linked to this build;
    /// with `waitForFinish`, the step waits for them and takes the worst
    /// of their results (a stop cancels the wait).
    pub(super) async fn trigger(
        &self,
        b: &Build<'_>,
        log: i64,
        names: &[String],
        wait: bool,
        set_properties: &crate::config::PropertyMap,
        stop: &CancellationToken,
    ) -> anyhow::Result<Result<Results, String>> {
        let sourcestamps = self.store.buildset_sourcestamps(b.buildsetid).await?;
        let props: Properties = set_properties
            .iter()
            .map(|(k, v)| (k.clone(), (v.clone(), "Trigger".to_string())))
            .collect();
        let mut done = self.schedulers.subscribe_done();
        let mut waiting = HashSet::new();
        for name in names {
            match self
                .schedulers
                .trigger(name, sourcestamps.clone(), props.clone(), Some(b.id))
                .await
            {
                Ok(ids) => {
                    self.store
                        .append_header(
                            log,
                            format!(
                                "triggered {name}: buildset {} ({} request(s))",
                                ids.bsid,
                                ids.brids.len()
                            ),
                        )
                        .await?;
                    waiting.insert(ids.bsid);
                }
                Err(e) => return Ok(Err(format!("cannot trigger `{name}`: {e:#}"))),
            }
        }
        if !wait {
            return Ok(Ok(Results::Success));
        }
        let mut worst = Results::Success;
        while !waiting.is_empty() {
            let d = tokio::select! {
                d = done.recv() => d,
                _ = stop.cancelled() => return Ok(Ok(Results::Cancelled)),
            };
            match d {
                Ok(d) => {
                    if waiting.remove(&d.bsid) {
                        let r = Results::from_code(d.results).unwrap_or(Results::Exception);
                        self.store
                            .append_header(
                                log,
                                format!("buildset {} finished: {}", d.bsid, r.name()),
                            )
                            .await?;
                        if severity(r) > severity(worst) {
                            worst = r;
                        }
                    }
                }
                // Missed notices: look the buildsets up instead.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for bsid in waiting.clone() {
                        if let Some(bs) = self.store.get_buildset(bsid).await? {
                            if bs.complete {
                                waiting.remove(&bsid);
                                let r = bs
                                    .results
                                    .and_then(Results::from_code)
                                    .unwrap_or(Results::Exception);
                                if severity(r) > severity(worst) {
                                    worst = r;
                                }
                            }
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Ok(Err("the master is stopping".into()))
                }
            }
        }
        Ok(Ok(worst))
    }

    /// Whether a step runs (`doStepIf`): a bool, or a function given
    /// `#{ name, properties }` that returns one. A failing function is the
    /// step's EXCEPTION, as in Buildbot.
    pub(super) async fn do_step_if(
        &self,
        gen: &Generation,
        step: &Step,
        props: &Properties,
    ) -> Result<bool, String> {
        match step.do_step_if.as_deref() {
            None => Ok(true),
            Some(BoolOrCallback::Enabled(b)) => Ok(*b),
            Some(BoolOrCallback::Callback(cb)) => {
                let v = self.call(gen, cb, (step_map(step, props),)).await?;
                v.as_bool().map_err(|t| {
                    format!(
                        "doStepIf of step `{}` returned a {t}, not a bool",
                        step.name
                    )
                })
            }
        }
    }

    /// The worker command a step runs: its name, its arguments and, for a
    /// transfer, the master's end of it.
    /// What `JSONPropertiesDownload` writes: Buildbot 0.8's
    /// `{"properties": {name: value}, "sourcestamp": {..., "changes": [...]}}`,
    /// the shape mozharness reads from `buildprops.json`.
    pub(super) async fn properties_json(
        &self,
        b: &Build<'_>,
        props: &Properties,
    ) -> anyhow::Result<String> {
        let properties: serde_json::Map<String, serde_json::Value> = props
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        let changeids = self
            .store
            .get_buildset(b.buildsetid)
            .await?
            .map(|bs| bs.changeids)
            .unwrap_or_default();
        let mut changes = Vec::with_capacity(changeids.len());
        for id in changeids {
            let Some(c) = self.store.get_change(id).await? else {
                continue;
            };
            let ch = &c.change;
            changes.push(serde_json::json!({
                "number": c.changeid,
                "who": ch.author,
                "comments": ch.comments,
                "branch": ch.branch,
                "revision": ch.revision,
                "revlink": ch.revlink,
                "when": ch.when_timestamp,
                "category": ch.category,
                "repository": ch.repository,
                "project": ch.project,
                "files": ch.files.iter().map(|f| serde_json::json!({"name": f})).collect::<Vec<_>>(),
            }));
        }
        let sourcestamp = match self
            .store
            .buildset_sourcestamps(b.buildsetid)
            .await?
            .into_iter()
            .next()
        {
            Some(ss) => serde_json::json!({
                "branch": ss.branch,
                "revision": ss.revision,
                "repository": ss.repository,
                "project": ss.project,
                "codebase": ss.codebase,
                "changes": changes,
            }),
            None => serde_json::json!({ "changes": changes }),
        };
        Ok(serde_json::to_string_pretty(&serde_json::json!({
            "properties": properties,
            "sourcestamp": sourcestamp,
        }))?)
    }
}
