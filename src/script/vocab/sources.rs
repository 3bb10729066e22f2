//! Change sources (`HgPoller`, `GitPoller`), schedulers, and status
//! targets (`QueueDir`, `QueuedCommandHandler`).

use std::sync::Arc;

use rhai::{Array, Dynamic, Engine};

use crate::config::*;
use crate::script::kwargs::{fail_focus, Kwargs, ScriptError, ScriptResult};
use crate::script::LoadState;

use super::{ctor, describe, register_type};

pub(super) fn register_change_sources(engine: &mut Engine, state: &Arc<LoadState>) {
    register_type::<HgPoller>(
        engine,
        "HgPoller",
        &[
            "hgURL",
            "branch",
            "pushlogUrlOverride",
            "tipsOnly",
            "maxChanges",
            "repo_branch",
            "pollInterval",
            "storeRev",
            "category",
            "project",
        ],
        |p| describe("HgPoller", p),
    );
    engine.register_get("repository", |p: &mut HgPoller| p.repository());
    ctor(engine, state, "HgPoller", hg_poller);

    register_type::<GitPoller>(
        engine,
        "GitPoller",
        &[
            "repourl",
            "branches",
            "pollInterval",
            "category",
            "project",
            "only_tags",
        ],
        |p| describe("GitPoller", p),
    );
    ctor(engine, state, "GitPoller", |kw| {
        let repourl = kw.req_str("repourl")?;
        let mut branches = kw.str_list("branches")?.unwrap_or_default();
        if let Some(b) = kw.str("branch")? {
            branches.push(b);
        }
        Ok(GitPoller {
            repourl,
            branches,
            poll_interval: kw.uint("pollInterval")?.unwrap_or(600),
            category: kw.str("category")?,
            project: kw.str("project")?,
            only_tags: kw.bool("only_tags", false)?,
            origin: kw.origin(),
        })
    });
}

/// Mozilla's default: poll the pushlog every minute, at most 100 changes a poll.
pub const HG_POLL_INTERVAL: u64 = 60;
pub const HG_MAX_CHANGES: u64 = 100;

pub fn hg_poller(kw: &mut Kwargs) -> ScriptResult<HgPoller> {
    Ok(HgPoller {
        hg_url: kw.req_str("hgURL")?,
        branch: kw.req_str("branch")?,
        pushlog_url_override: kw.str("pushlogUrlOverride")?,
        tips_only: kw.bool("tipsOnly", false)?,
        max_changes: kw.uint("maxChanges")?.unwrap_or(HG_MAX_CHANGES),
        // Mozilla's default: the `default` named branch; `()` means all.
        repo_branch: if kw.is_unit("repo_branch") {
            kw.take("repo_branch");
            None
        } else {
            Some(kw.str("repo_branch")?.unwrap_or_else(|| "default".into()))
        },
        poll_interval: kw.uint("pollInterval")?.unwrap_or(HG_POLL_INTERVAL),
        store_rev: kw.str("storeRev")?,
        category: kw.str("category")?,
        project: kw.str("project")?,
        origin: kw.origin(),
    })
}

/// The five cron fields of a `Nightly` or the janitor: minute 0 of
/// `hour` (every hour or midnight, as their Buildbot defaults differ),
/// any day.
fn cron(kw: &mut Kwargs, hour: CronField) -> ScriptResult<Cron> {
    Ok(Cron {
        minute: cron_field(kw, "minute", CronField::Values(vec![0]), (0, 59))?,
        hour: cron_field(kw, "hour", hour, (0, 23))?,
        day_of_month: cron_field(kw, "dayOfMonth", CronField::Any(AnyMarker), (1, 31))?,
        month: cron_field(kw, "month", CronField::Any(AnyMarker), (1, 12))?,
        day_of_week: cron_field(kw, "dayOfWeek", CronField::Any(AnyMarker), (0, 6))?,
    })
}

pub(super) fn cron_field(
    kw: &mut Kwargs,
    key: &'static str,
    default: CronField,
    range: (u32, u32),
) -> ScriptResult<CronField> {
    let Some(v) = kw.raw(key) else {
        return Ok(default);
    };
    let bad = || {
        ScriptError::new(format!(
            "`{key}` in {} must be \"*\", an integer or an array of integers from {} to {}",
            kw.what(),
            range.0,
            range.1
        ))
        .focus(key)
        .into_err()
    };
    let one = |x: &Dynamic| -> ScriptResult<u32> {
        match x.as_int() {
            Ok(n) if n >= range.0 as i64 && n <= range.1 as i64 => Ok(n as u32),
            _ => Err(bad()),
        }
    };
    if v.clone().into_string().is_ok_and(|s| s == "*") {
        return Ok(CronField::Any(AnyMarker));
    }
    if v.is_array() {
        let mut vals = v
            .cast::<Array>()
            .iter()
            .map(one)
            .collect::<ScriptResult<Vec<_>>>()?;
        vals.sort_unstable();
        vals.dedup();
        if vals.is_empty() {
            return Err(bad());
        }
        return Ok(CronField::Values(vals));
    }
    Ok(CronField::Values(vec![one(&v)?]))
}

pub(super) fn scheduler(
    kw: &mut Kwargs,
    build_kind: impl FnOnce(&mut Kwargs) -> ScriptResult<SchedulerKind>,
) -> ScriptResult<Arc<SchedulerConfig>> {
    let name = kw.req_str("name")?;
    let builder_names = kw.req_str_list("builderNames")?;
    let kind = build_kind(kw)?;
    Ok(Arc::new(SchedulerConfig {
        name,
        kind,
        builder_names: builder_names.into_iter().map(Into::into).collect(),
        properties: kw.properties("properties")?,
        priority: kw.int("priority")?,
        origin: kw.origin(),
    }))
}

pub(super) fn register_schedulers(engine: &mut Engine, state: &Arc<LoadState>) {
    // Shared, as builders are: the seed's schedulers are copied from
    // list to list as its builders are.
    register_type::<Arc<SchedulerConfig>>(
        engine,
        "Scheduler",
        &[
            "name",
            "builderNames",
            "properties",
            "priority",
            "branch",
            "treeStableTimer",
            "onlyImportant",
        ],
        |s| describe(s.kind.type_name(), s),
    );
    engine.register_get("type", |s: &mut Arc<SchedulerConfig>| {
        s.kind.type_name().to_string()
    });

    ctor(engine, state, "Scheduler", |kw| {
        scheduler(kw, |kw| {
            Ok(SchedulerKind::Scheduler {
                branch: kw.str("branch")?,
                repository: kw.str("repository")?,
                project: kw.str("project")?,
                tree_stable_timer: kw.uint("treeStableTimer")?.filter(|t| *t > 0),
                file_is_important: kw.callback("fileIsImportant")?,
                only_important: kw.bool("onlyImportant", false)?,
            })
        })
    });
    ctor(engine, state, "AnyBranchScheduler", |kw| {
        scheduler(kw, |kw| {
            Ok(SchedulerKind::AnyBranchScheduler {
                branches: kw.str_list("branches")?,
                tree_stable_timer: kw.uint("treeStableTimer")?.filter(|t| *t > 0),
                file_is_important: kw.callback("fileIsImportant")?,
                only_important: kw.bool("onlyImportant", false)?,
            })
        })
    });
    ctor(engine, state, "Nightly", |kw| {
        scheduler(kw, |kw| {
            Ok(SchedulerKind::Nightly {
                branch: kw.str("branch")?,
                // Buildbot's defaults: at minute 0 of every hour.
                when: cron(kw, CronField::Any(AnyMarker))?,
                only_if_changed: kw.bool("onlyIfChanged", false)?,
            })
        })
    });
    ctor(engine, state, "Periodic", |kw| {
        scheduler(kw, |kw| {
            let t = kw
                .uint("periodicBuildTimer")?
                .ok_or_else(|| kw.missing("periodicBuildTimer", "seconds between builds"))?;
            Ok(SchedulerKind::Periodic {
                periodic_build_timer: t,
            })
        })
    });
    ctor(engine, state, "Triggerable", |kw| {
        scheduler(kw, |_| Ok(SchedulerKind::Triggerable))
    });
    ctor(engine, state, "Dependent", |kw| {
        scheduler(kw, |kw| {
            let upstream = match kw.raw("upstream") {
                None => return Err(kw.missing("upstream", "the upstream scheduler or its name")),
                Some(v) if v.is_string() => v.into_string().unwrap_or_default(),
                Some(v) => match v.try_cast::<Arc<SchedulerConfig>>() {
                    Some(s) => s.name.clone(),
                    None => {
                        return fail_focus(
                            "`upstream` in Dependent must be a scheduler or its name".into(),
                            "upstream",
                        )
                    }
                },
            };
            Ok(SchedulerKind::Dependent { upstream })
        })
    });
    ctor(engine, state, "ForceScheduler", |kw| {
        scheduler(kw, |kw| {
            let label = kw.str("label")?;
            Ok(SchedulerKind::ForceScheduler {
                button_name: kw.str("buttonName")?.unwrap_or_else(|| "Force".into()),
                label: label.unwrap_or_default(),
            })
        })
    });
}

pub(super) fn register_status(engine: &mut Engine, state: &Arc<LoadState>) {
    register_type::<Janitor>(
        engine,
        "JanitorConfigurator",
        &["logHorizon", "hour", "dayOfWeek"],
        |j| describe("JanitorConfigurator", j),
    );
    ctor(engine, state, "JanitorConfigurator", |kw| {
        let log_horizon = match kw.uint("logHorizon")? {
            Some(s) if s > 0 => s,
            _ => {
                return Err(kw.missing(
                    "logHorizon",
                    "how old, in seconds, a build's logs are when the janitor deletes them (86400 * 30: a month)",
                ))
            }
        };
        // kiln keeps no build data (Buildbot's setBuildData) to delete.
        if kw.raw("build_data_horizon").is_some() {
            kw.warn(
                "`build_data_horizon` in JanitorConfigurator has nothing to delete: kiln keeps no build data \
                 (Buildbot's setBuildData); builds, steps and properties are kept, logs go by `logHorizon`",
                "build_data_horizon",
            );
        }
        Ok(Janitor {
            log_horizon,
            // Buildbot's default: every day at midnight.
            when: cron(kw, CronField::Values(vec![0]))?,
            origin: kw.origin(),
        })
    });

    register_type::<QueueDirConfig>(engine, "QueueDir", &["name", "path"], |q| {
        describe("QueueDir", q)
    });
    engine.register_fn("QueueDir", |name: &str, path: &str| QueueDirConfig {
        name: name.into(),
        path: path.into(),
    });

    register_type::<StatusTarget>(
        engine,
        "StatusTarget",
        &["command", "queuedir"],
        |s| match s {
            StatusTarget::QueuedCommandHandler { .. } => describe("QueuedCommandHandler", s),
        },
    );
    ctor(engine, state, "QueuedCommandHandler", |kw| {
        let command = match kw.command("command")? {
            Some(StepCommand::Argv(v)) => v,
            Some(StepCommand::Shell(a)) => vec![a],
            None => return Err(kw.missing("command", "the command to queue, as an array")),
        };
        let queuedir = kw
            .custom::<QueueDirConfig>("queuedir", "a QueueDir")?
            .ok_or_else(|| kw.missing("queuedir", "a QueueDir"))?;
        Ok(StatusTarget::QueuedCommandHandler {
            command,
            queuedir,
            origin: kw.origin(),
        })
    });
}
