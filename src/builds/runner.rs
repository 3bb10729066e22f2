//! A build's life: its row, its properties, its steps in order with
//! Buildbot's result folding and termination rules, the completion of its
//! requests, and what happens after (status queues, a drained worker).

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::config::{BuilderConfig, Results, Step};
use crate::schedulers::BuildsetDone;
use crate::store::builds::Claimed;
use crate::store::buildsets::BuildRequest;
use crate::store::Properties;
use crate::workers::WorkerConn;

use super::{
    command::join_path,
    lock, render,
    steps::{Disconnected, StepOutcome},
    Distributor, Generation, RunningBuild,
};

/// One running build, as its steps see it.
#[derive(Clone, Copy)]
pub(super) struct Build<'a> {
    /// The config the build started with; it keeps it to its end.
    pub(super) gen: &'a Generation,
    pub(super) id: i64,
    pub(super) number: i64,
    /// The buildset built (the newest request's).
    pub(super) buildsetid: i64,
    /// The requests it builds (collapsed ones after the first).
    pub(super) claimed: &'a [i64],
    pub(super) builder: &'a BuilderConfig,
    pub(super) worker: &'a Arc<WorkerConn>,
    pub(super) running: &'a RunningBuild,
    /// The build's directory on the worker.
    pub(super) builddir: &'a str,
    pub(super) props: &'a Properties,
}

/// Buildbot's `worst_status` order: SKIPPED < SUCCESS < WARNINGS <
/// FAILURE < EXCEPTION < RETRY < CANCELLED.
pub(super) fn severity(r: Results) -> i64 {
    match r {
        Results::Skipped => -1,
        other => other as i64,
    }
}

/// Buildbot's way of folding a step's result into the build's.
pub(super) fn combine(build: Results, step: &Step, r: Results) -> Results {
    let contribution = match r {
        Results::Failure if step.flunk_on_failure => Results::Failure,
        Results::Failure if step.warn_on_failure => Results::Warnings,
        Results::Failure => Results::Success,
        Results::Warnings if step.flunk_on_warnings => Results::Failure,
        Results::Warnings if step.warn_on_warnings => Results::Warnings,
        Results::Warnings => Results::Success,
        Results::Skipped => Results::Success,
        other => other,
    };
    if (contribution as i64) > (build as i64) {
        contribution
    } else {
        build
    }
}

impl Distributor {
    /// Runs one build for the requests `claimed` (collapsed ones after the
    /// first). The newest request's buildset is the one built.
    pub(super) async fn run_build(
        &self,
        gen: &Generation,
        claimed: &[i64],
        first: &BuildRequest,
        builder: &BuilderConfig,
        worker: &Arc<WorkerConn>,
    ) -> anyhow::Result<()> {
        let newest = claimed
            .iter()
            .copied()
            .max()
            .unwrap_or(first.buildrequestid);
        let req = &self
            .store
            .request(newest)
            .await?
            .unwrap_or_else(|| first.clone());
        if claimed.len() > 1 {
            tracing::info!(builder = %builder.name, "requests {claimed:?} collapsed into one build of request {newest}");
        }
        let workerid = self.store.worker_id(&worker.name).await?;
        let basedir = worker
            .info
            .get()
            .and_then(|i| i["basedir"].as_str())
            .unwrap_or(".")
            .to_string();
        let builddir = join_path(&basedir, &builder.worker_builddir);
        // Buildbot's layering, later ones winning: global, builder, the
        // buildset's (scheduler, change, force), worker, then the build's own.
        let mut props: Properties = Properties::new();
        let layer = |props: &mut Properties, from: &crate::config::PropertyMap, source: &str| {
            for (k, v) in from {
                props.insert(k.clone(), (v.clone(), source.to_string()));
            }
        };
        layer(&mut props, &gen.config.properties, "Global");
        for (k, v) in builder.properties.iter() {
            props.insert(k.to_string(), (v.to_value(), "Builder".to_string()));
        }
        if let Some(bs) = self.store.get_buildset(req.buildsetid).await? {
            props.extend(bs.properties);
        }
        if let Some(w) = gen.config.workers.iter().find(|w| w.name == worker.name) {
            layer(&mut props, &w.properties, "Worker");
        }
        let mut own = |k: &str, v: serde_json::Value, source: &str| {
            props.insert(k.to_string(), (v, source.to_string()));
        };
        own("buildername", builder.name.as_str().into(), "Builder");
        own("workername", worker.name.clone().into(), "Worker");
        own("builddir", builddir.clone().into(), "Worker");
        if let Some(ss) = self
            .store
            .buildset_sourcestamps(req.buildsetid)
            .await?
            .into_iter()
            .next()
        {
            own(
                "branch",
                ss.branch.map_or(serde_json::Value::Null, Into::into),
                "Build",
            );
            own(
                "revision",
                ss.revision.map_or(serde_json::Value::Null, Into::into),
                "Build",
            );
            own("repository", ss.repository.into(), "Build");
            own("project", ss.project.into(), "Build");
            own("codebase", ss.codebase.into(), "Build");
        }
        let (buildid, number) = self
            .store
            .new_build(
                req.builderid,
                req.buildrequestid,
                workerid,
                self.masterid,
                props.clone(),
            )
            .await?;
        props.insert("buildnumber".into(), (number.into(), "Build".into()));
        tracing::info!(builder = %builder.name, worker = %worker.name, "build {number} started (request {})", req.buildrequestid);
        let running = Arc::new(RunningBuild {
            worker: worker.name.clone(),
            requests: claimed.to_vec(),
            stop: CancellationToken::new(),
            reason: Mutex::new(String::new()),
        });
        lock(&self.running_builds).insert(buildid, running.clone());
        let outcome = self
            .run_steps(&Build {
                gen,
                id: buildid,
                number,
                buildsetid: req.buildsetid,
                claimed,
                builder,
                worker,
                running: &running,
                builddir: &builddir,
                props: &props,
            })
            .await;
        lock(&self.running_builds).remove(&buildid);
        outcome
    }

    /// The config's status handlers hear that a build finished: each
    /// `QueuedCommandHandler` queues its command (rendered with the build's
    /// properties) followed by the builder's name and the build number,
    /// with the build's details in the environment (`KILN_BUILDID`,
    /// `KILN_BUILDER`, `KILN_BUILD_NUMBER`, `KILN_RESULTS`,
    /// `KILN_MASTER_DIR`). A handler that cannot queue is logged; the build
    /// is not affected.
    pub(super) async fn queue_status(&self, b: &Build<'_>, results: Results, props: &Properties) {
        use crate::config::{Arg, StatusTarget};
        for target in &b.gen.config.status {
            let StatusTarget::QueuedCommandHandler {
                command, queuedir, ..
            } = target;
            let scope = render::Scope::of(props);
            let mut argv = Vec::with_capacity(command.len() + 2);
            let mut failed = None;
            for arg in command {
                match arg {
                    Arg::Literal(s) => argv.push(s.to_string()),
                    Arg::Secret(s) => argv.push(s.expose().to_string()),
                    Arg::Render(r) => match render::render(r, &scope) {
                        Ok(s) => argv.push(s),
                        Err(e) => failed = Some(e.to_string()),
                    },
                }
            }
            if let Some(e) = failed {
                tracing::error!(queue = %queuedir.name, "build {} of {}: the QueuedCommandHandler's command cannot be rendered: {e}", b.number, b.builder.name);
                continue;
            }
            argv.push(b.builder.name.to_string());
            argv.push(b.number.to_string());
            let env = [
                ("KILN_BUILDID", b.id.to_string()),
                ("KILN_BUILDER", b.builder.name.to_string()),
                ("KILN_BUILD_NUMBER", b.number.to_string()),
                ("KILN_RESULTS", (results as i64).to_string()),
                ("KILN_MASTER_DIR", self.master_dir.display().to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let item = crate::queuedir::Item {
                command: argv,
                env,
                created: crate::store::now(),
                cwd: Some(self.master_dir.clone()),
            };
            let root = self.master_dir.join(&queuedir.path);
            let queued = tokio::task::spawn_blocking(move || {
                crate::queuedir::QueueDir::open(&root)?.add(&item)
            })
            .await;
            match queued {
                Ok(Ok(id)) => {
                    tracing::info!(queue = %queuedir.name, "build {} of {} queued as {id}", b.number, b.builder.name)
                }
                Ok(Err(e)) => {
                    tracing::error!(queue = %queuedir.name, "build {} of {}: cannot queue its command: {e:#}", b.number, b.builder.name)
                }
                Err(e) => tracing::error!(queue = %queuedir.name, "cannot queue: {e}"),
            }
        }
    }

    pub(super) async fn run_steps(&self, b: &Build<'_>) -> anyhow::Result<()> {
        let Build {
            id: buildid,
            number,
            claimed,
            builder,
            worker,
            running,
            ..
        } = *b;
        let mut props = b.props.clone();
        let mut results = Results::Success;
        let mut halted = false;
        let mut lost = false;
        let mut disconnected: Option<Disconnected> = None;
        for (i, step) in builder.factory.steps.iter().enumerate() {
            let stepid = self.store.new_step(buildid, i as i64, &step.name).await?;
            let stopped = running.stop.is_cancelled();
            // As Buildbot: after a failure that halts, or a stop, only
            // `alwaysRun` steps run (cleanup), and a stop interrupts only
            // the step running when it came.
            // After a DisconnectStep the worker is gone (or going): nothing
            // more runs on it.
            if disconnected.is_some() || (stopped || halted) && !step.always_run {
                self.store
                    .finish_step(stepid, Results::Skipped as i64, "skipped")
                    .await?;
                continue;
            }
            let stop = if stopped {
                CancellationToken::new()
            } else {
                running.stop.clone()
            };
            let out = match self.do_step_if(b.gen, step, &props).await {
                Ok(true) => self.run_step(b, stepid, step, &stop, &props).await?,
                Ok(false) => StepOutcome::of(Results::Skipped),
                Err(why) => {
                    let log = self.store.new_log(stepid, "stdio", "s").await?;
                    self.store.append_header(log, &why).await?;
                    self.store.finish_log(log).await?;
                    StepOutcome::of(Results::Exception)
                }
            };
            if let Some((name, value)) = &out.set_property {
                self.store
                    .set_build_property(buildid, name, value, "SetProperty")
                    .await?;
                props.insert(name.clone(), (value.clone(), "SetProperty".into()));
            }
            let state = if out.timed_out {
                format!("{} (timed out)", out.result.name())
            } else {
                out.result.name().to_string()
            };
            self.store
                .finish_step(stepid, out.result as i64, &state)
                .await?;
            if out.lost {
                lost = true;
                break;
            }
            if out.disconnect.is_some() {
                disconnected = out.disconnect;
            }
            results = combine(results, step, out.result);
            // Buildbot's termination rule: a failure that halts, or
            // EXCEPTION, RETRY or CANCELLED.
            if out.result == Results::Failure && step.halt_on_failure
                || matches!(
                    out.result,
                    Results::Exception | Results::Retry | Results::Cancelled
                )
            {
                halted = true;
            }
        }
        if lost {
            self.store
                .finish_build(
                    buildid,
                    Results::Retry as i64,
                    "retry: the worker was lost",
                    Claimed::GiveBack(claimed.to_vec()),
                )
                .await?;
            self.queue_status(b, Results::Retry, &props).await;
            tracing::warn!(builder = %builder.name, worker = %worker.name, "build {number}: worker lost; the request will run again");
            return Ok(());
        }
        let state = if running.stop.is_cancelled() {
            results = Results::Cancelled;
            format!("cancelled: {}", lock(&running.reason))
        } else {
            results.name().to_string()
        };
        // As Buildbot: a build that ends RETRY (a step's log rules said
        // so) gives its requests back to run again.
        let retry = results == Results::Retry;
        let requests = if retry {
            Claimed::GiveBack(claimed.to_vec())
        } else {
            Claimed::Complete(claimed.to_vec())
        };
        let completed = self
            .store
            .finish_build(buildid, results as i64, &state, requests)
            .await?;
        self.queue_status(b, results, &props).await;
        tracing::info!(builder = %builder.name, "build {number}: {}", results.name());
        if retry {
            tracing::warn!(builder = %builder.name, "build {number} ended RETRY; its request(s) will run again");
            return Ok(());
        }
        for (bsid, r) in completed {
            self.schedulers
                .buildset_done(BuildsetDone { bsid, results: r });
        }
        if disconnected == Some(Disconnected::Drop) {
            tracing::info!(worker = %worker.name, "disconnecting the worker, as build {number}'s DisconnectStep asked");
            worker.closed.cancel();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StepKind;

    fn step(flags: &[&str]) -> Step {
        let on = |f: &str| flags.contains(&f);
        Step {
            name: "s".into(),
            kind: StepKind::ShellCommand,
            description: None,
            command: None,
            workdir: None,
            env: Default::default(),
            timeout: None,
            max_time: None,
            halt_on_failure: on("haltOnFailure"),
            flunk_on_failure: !on("!flunkOnFailure"),
            flunk_on_warnings: on("flunkOnWarnings"),
            warn_on_failure: on("warnOnFailure"),
            warn_on_warnings: on("warnOnWarnings"),
            always_run: false,
            do_step_if: None,
            log_eval: None,
            log_rules: vec![],
            origin: None,
        }
    }

    #[test]
    fn step_results_fold_into_the_build_as_buildbot_folds_them() {
        use Results::*;
        let fold = |flags: &[&str], r| combine(Success, &step(flags), r);
        assert_eq!(fold(&[], Failure), Failure);
        assert_eq!(fold(&["!flunkOnFailure"], Failure), Success);
        assert_eq!(
            fold(&["!flunkOnFailure", "warnOnFailure"], Failure),
            Warnings
        );
        // flunkOnFailure wins over warnOnFailure, as in Buildbot.
        assert_eq!(fold(&["warnOnFailure"], Failure), Failure);
        assert_eq!(fold(&[], Warnings), Success);
        assert_eq!(fold(&["warnOnWarnings"], Warnings), Warnings);
        assert_eq!(fold(&["flunkOnWarnings"], Warnings), Failure);
        assert_eq!(fold(&[], Skipped), Success);
        assert_eq!(fold(&[], Retry), Retry);
        assert_eq!(combine(Exception, &step(&[]), Failure), Exception);
        assert_eq!(combine(Warnings, &step(&[]), Success), Warnings);
        assert!(severity(Skipped) < severity(Success));
        assert!(severity(Retry) < severity(Cancelled));
    }
}
