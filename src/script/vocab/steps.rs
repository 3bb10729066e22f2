//! Steps and factories: `ShellCommand` and the other step kinds, their
//! flags, `log_rules`, the transfer steps, and `BuildFactory`.

use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, FnPtr, NativeCallContext};

use crate::config::*;
use crate::script::kwargs::{fail, fail_focus, Kwargs, ScriptError, ScriptResult};
use crate::script::LoadState;

use super::{builders::builder_config, ctor, describe, origin_of, register_type};

/// Checks `%(name)s`-style format strings so mistakes show at load time.
pub(super) fn check_format(fmt: &str, interpolate: bool) -> ScriptResult<()> {
    let mut rest = fmt;
    while let Some(i) = rest.find("%(") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(")s") else {
            return fail(format!("unterminated `%(` in {fmt:?}: write %(name)s"));
        };
        let inner = &after[..end];
        if interpolate
            && !inner.contains(':')
            && !["kw", "prop", "src", "secret", "worker"]
                .iter()
                .any(|p| inner.starts_with(p))
        {
            return fail(format!(
                "Interpolate placeholder `%({inner})s` needs a source, as in %(prop:{inner})s"
            ));
        }
        rest = &after[end + 2..];
    }
    Ok(())
}

pub fn result_of(v: &Dynamic) -> Option<Results> {
    v.as_int().ok().and_then(Results::from_code)
}

pub(super) fn step_label(s: &Step) -> String {
    describe(s.kind.type_name(), s)
}

/// The common parameters of every step, around its kind-specific part.
pub(super) fn step(kw: &mut Kwargs, kind: StepKind, needs_command: bool) -> ScriptResult<Step> {
    let name = kw
        .shared_str("name")?
        .unwrap_or_else(|| kind.type_name().to_lowercase().into());
    let command = kw.command("command")?;
    if needs_command && command.is_none() {
        return Err(kw.missing("command", "a string or an array of arguments"));
    }
    let do_step_if = match kw.raw("doStepIf") {
        None => None,
        Some(v) if v.is_bool() => Some(BoolOrCallback::Enabled(v.as_bool().unwrap_or(true))),
        Some(v) => match v.try_cast::<FnPtr>() {
            Some(fn_ptr) => Some(BoolOrCallback::Callback(Box::new(Callback {
                fn_ptr,
                origin: kw.origin(),
            }))),
            None => {
                return fail_focus(
                    format!("`doStepIf` in {} must be a bool or a function", kw.what()),
                    "doStepIf",
                )
            }
        },
    };
    let log_eval = match kw.raw("log_eval_func") {
        None => None,
        Some(v) => {
            if let Some(l) = v.clone().try_cast::<LogEval>() {
                Some(l)
            } else if let Some(fn_ptr) = v.try_cast::<FnPtr>() {
                Some(LogEval::Callback(Callback {
                    fn_ptr,
                    origin: kw.origin(),
                }))
            } else {
                return fail_focus(
                    format!(
                        "`log_eval_func` in {} must be rc_eval_func(...) or a function",
                        kw.what()
                    ),
                    "log_eval_func",
                );
            }
        }
    };
    let log_rules = match kw.raw("log_rules") {
        None => vec![],
        Some(v) => log_rules_of(v, kw.what())?,
    };
    Ok(Step {
        log_rules,
        name,
        description: kw.shared_str("description")?,
        command,
        workdir: kw.shared_str("workdir")?,
        env: Arc::new(kw.env("env")?),
        timeout: kw.secs("timeout")?,
        max_time: kw.secs("maxTime")?,
        halt_on_failure: kw.bool("haltOnFailure", false)?,
        flunk_on_failure: kw.bool("flunkOnFailure", true)?,
        flunk_on_warnings: kw.bool("flunkOnWarnings", false)?,
        warn_on_failure: kw.bool("warnOnFailure", false)?,
        warn_on_warnings: kw.bool("warnOnWarnings", false)?,
        always_run: kw.bool("alwaysRun", false)?,
        do_step_if: do_step_if.map(Box::new),
        log_eval: log_eval.map(Arc::new),
        origin: kw.origin(),
        kind,
    })
}

/// `log_rules: [["regex", RETRY], ...]`, each pattern checked here.
pub(super) fn log_rules_of(v: Dynamic, what: &str) -> ScriptResult<Vec<LogRule>> {
    let bad = || {
        fail_focus(
            format!("`log_rules` in {what} must be a list of [\"regex\", RESULT] pairs"),
            "log_rules",
        )
    };
    let Some(items) = v.try_cast::<Array>() else {
        return bad();
    };
    let mut rules = Vec::new();
    for item in items {
        let Some(pair) = item.try_cast::<Array>() else {
            return bad();
        };
        let [pattern, result] = pair.as_slice() else {
            return bad();
        };
        let (Some(pattern), Ok(code)) = (pattern.clone().into_string().ok(), result.as_int())
        else {
            return bad();
        };
        if let Err(e) = regex::Regex::new(&pattern) {
            return fail_focus(
                format!("`log_rules` in {what}: {pattern:?} is not a regular expression: {e}"),
                "log_rules",
            );
        }
        let Some(result) = Results::from_code(code) else {
            return fail_focus(
                format!("`log_rules` in {what}: {code} is not a result such as RETRY"),
                "log_rules",
            );
        };
        rules.push(LogRule { pattern, result });
    }
    Ok(rules)
}

pub(super) fn register_steps(engine: &mut Engine, state: &Arc<LoadState>) {
    register_type::<Step>(
        engine,
        "Step",
        &[
            "name",
            "description",
            "command",
            "workdir",
            "env",
            "timeout",
            "maxTime",
            "haltOnFailure",
            "flunkOnFailure",
            "warnOnFailure",
            "warnOnWarnings",
            "alwaysRun",
        ],
        step_label,
    );
    engine.register_get("type", |s: &mut Step| s.kind.type_name().to_string());

    ctor(engine, state, "ShellCommand", |kw| {
        step(kw, StepKind::ShellCommand, true)
    });
    for name in ["SetProperty", "SetPropertyFromCommand"] {
        ctor(engine, state, name, |kw| {
            let property = kw.req_str("property")?;
            let value = kw.arg("value")?;
            let has_value = value.is_some();
            let s = step(
                kw,
                StepKind::SetProperty {
                    property: property.into(),
                    value,
                },
                false,
            )?;
            match (s.command.is_some(), has_value) {
                (true, true) => fail(format!(
                    "{} takes `command` or `value`, not both",
                    kw.what()
                )),
                (false, false) => Err(kw.missing(
                    "command",
                    "the command whose output becomes the property, or a `value`",
                )),
                _ => Ok(s),
            }
        });
    }
    ctor(engine, state, "MercurialCloneCommand", |kw| {
        let retry = kw.bool("retry", true)?;
        step(kw, StepKind::MercurialCloneCommand { retry }, true)
    });
    ctor(engine, state, "Git", |kw| {
        let repourl = kw.req_arg("repourl", "the repository URL")?;
        let branch = kw.arg("branch")?;
        let mode = kw.str("mode")?.unwrap_or_else(|| "incremental".into());
        if mode != "incremental" && mode != "full" {
            return fail_focus(
                format!("`mode` in Git must be \"incremental\" or \"full\", got {mode:?}"),
                "mode",
            );
        }
        step(
            kw,
            StepKind::Git {
                repourl,
                branch,
                mode: mode.into(),
            },
            false,
        )
    });
    ctor(engine, state, "MockCommand", |kw| {
        let use_mock = kw.bool("mock", false)?;
        let target = kw.str("target")?;
        step(
            kw,
            StepKind::MockCommand {
                use_mock,
                target: target.map(Into::into),
            },
            true,
        )
    });
    ctor(engine, state, "DisconnectStep", |kw| {
        let force_disconnect = match kw.raw("force_disconnect") {
            None => Disconnect::Always(false),
            Some(v) if v.is_bool() => Disconnect::Always(v.as_bool().unwrap_or(false)),
            Some(v) if v.is_string() => Disconnect::OutputContains(v.into_immutable_string().unwrap_or_default()),
            Some(v) => match v.try_cast::<FnPtr>() {
                Some(fn_ptr) => Disconnect::Callback(Box::new(Callback { fn_ptr, origin: kw.origin() })),
                None => {
                    return fail_focus(
                        "`force_disconnect` in DisconnectStep must be a bool, a string to look for in the output, or a function".into(),
                        "force_disconnect",
                    )
                }
            },
        };
        step(kw, StepKind::DisconnectStep { force_disconnect }, true)
    });
    register_transfer_steps(engine, state);
    ctor(engine, state, "Trigger", |kw| {
        let scheduler_names = kw.req_str_list("schedulerNames")?;
        let wait_for_finish = kw.bool("waitForFinish", false)?;
        let set_properties = kw.properties("set_properties")?;
        step(
            kw,
            StepKind::Trigger {
                scheduler_names,
                wait_for_finish,
                set_properties: Box::new(set_properties),
            },
            false,
        )
    });
}

pub(super) fn transfer_options(kw: &mut Kwargs) -> ScriptResult<Box<TransferOptions>> {
    let mode = match kw.uint("mode")? {
        None => None,
        Some(m) if m <= 0o7777 => Some(m as u32),
        Some(m) => {
            return fail_focus(
                format!(
                    "`mode` in {} must be permission bits such as 0o644, got {m}",
                    kw.what()
                ),
                "mode",
            )
        }
    };
    let blocksize = kw.uint("blocksize")?.unwrap_or(16 * 1024);
    if blocksize == 0 {
        return fail_focus(
            format!("`blocksize` in {} must be at least 1", kw.what()),
            "blocksize",
        );
    }
    Ok(Box::new(TransferOptions {
        maxsize: kw.uint("maxsize")?,
        blocksize,
        mode,
    }))
}

pub(super) fn register_transfer_steps(engine: &mut Engine, state: &Arc<LoadState>) {
    ctor(engine, state, "FileUpload", |kw| {
        let workersrc = kw.req_arg("workersrc", "the file on the worker")?;
        let masterdest = kw.req_str("masterdest")?;
        let keepstamp = kw.bool("keepstamp", false)?;
        let transfer = transfer_options(kw)?;
        step(
            kw,
            StepKind::FileUpload {
                workersrc,
                masterdest: masterdest.into(),
                transfer,
                keepstamp,
            },
            false,
        )
    });
    ctor(engine, state, "DirectoryUpload", |kw| {
        let workersrc = kw.req_arg("workersrc", "the directory on the worker")?;
        let masterdest = kw.req_str("masterdest")?;
        let compress = kw.str("compress")?;
        if let Some(c) = &compress {
            if c != "gz" && c != "bz2" {
                return fail_focus(
                    format!(
                        "`compress` in DirectoryUpload must be \"gz\", \"bz2\" or (), got {c:?}"
                    ),
                    "compress",
                );
            }
        }
        let transfer = transfer_options(kw)?;
        step(
            kw,
            StepKind::DirectoryUpload {
                workersrc,
                masterdest: masterdest.into(),
                transfer,
                compress: compress.map(Into::into),
            },
            false,
        )
    });
    ctor(engine, state, "FileDownload", |kw| {
        let mastersrc = kw.req_str("mastersrc")?;
        let workerdest = kw.req_arg("workerdest", "the file to write on the worker")?;
        let transfer = transfer_options(kw)?;
        step(
            kw,
            StepKind::FileDownload {
                mastersrc: mastersrc.into(),
                workerdest,
                transfer,
            },
            false,
        )
    });
    ctor(engine, state, "StringDownload", |kw| {
        let s = kw.req_arg("s", "the text to write")?;
        let workerdest = kw.req_arg("workerdest", "the file to write on the worker")?;
        let transfer = transfer_options(kw)?;
        step(
            kw,
            StepKind::StringDownload {
                s,
                workerdest,
                transfer,
            },
            false,
        )
    });
    ctor(engine, state, "JSONPropertiesDownload", |kw| {
        kw.rename_legacy("workerdest", "slavedest");
        let workerdest = kw.req_arg("workerdest", "the file to write on the worker")?;
        let transfer = transfer_options(kw)?;
        step(
            kw,
            StepKind::JsonPropertiesDownload {
                workerdest,
                transfer,
            },
            false,
        )
    });
}

pub(super) fn steps_of(arr: Array) -> ScriptResult<Vec<Step>> {
    arr.into_iter()
        .enumerate()
        .map(|(i, v)| {
            let v = v.flatten();
            let t = crate::script::kwargs::type_name(&v);
            v.try_cast::<Step>().ok_or_else(|| {
                ScriptError::new(format!("item {i} of the steps is a {t}, not a step")).into_err()
            })
        })
        .collect()
}

pub(super) fn register_factory(engine: &mut Engine, state: &Arc<LoadState>) {
    register_type::<BuildFactory>(engine, "BuildFactory", &[], |f| {
        let names: Vec<&str> = f.steps.iter().map(|s| s.name.as_str()).collect();
        format!("BuildFactory([{}])", names.join(", "))
    });
    engine.register_fn("BuildFactory", |ctx: NativeCallContext| BuildFactory {
        steps: Arc::default(),
        origin: origin_of(&ctx),
    });
    engine.register_fn(
        "BuildFactory",
        |ctx: NativeCallContext, steps: Array| -> ScriptResult<BuildFactory> {
            Ok(BuildFactory {
                steps: steps_of(steps)?.into_iter().map(Arc::new).collect(),
                origin: origin_of(&ctx),
            })
        },
    );
    // A factory's steps are an exact-size slice: adding copies the
    // handful of step pointers a factory has into a new one.
    engine.register_fn("addStep", |f: &mut BuildFactory, s: Step| {
        f.steps = f.steps.iter().cloned().chain([Arc::new(s)]).collect();
    });
    engine.register_fn(
        "addSteps",
        |f: &mut BuildFactory, steps: Array| -> ScriptResult<()> {
            let new = steps_of(steps)?;
            f.steps = f
                .steps
                .iter()
                .cloned()
                .chain(new.into_iter().map(Arc::new))
                .collect();
            Ok(())
        },
    );
    engine.register_get("steps", |f: &mut BuildFactory| -> Array {
        f.steps
            .iter()
            .map(|s| Dynamic::from(Step::clone(s)))
            .collect()
    });
    engine.register_fn("len", |f: &mut BuildFactory| f.steps.len() as i64);

    // Shared: a script copies builders between lists (the seed's
    // `mergeBuildObjects`, `c.builders += ...`) and each copy is the same
    // builder, not a deep copy of its steps.
    register_type::<Arc<BuilderConfig>>(
        engine,
        "BuilderConfig",
        &[
            "name",
            "builddir",
            "workerbuilddir",
            "workernames",
            "category",
            "tags",
            "description",
            "properties",
            "env",
        ],
        |b| {
            format!(
                "BuilderConfig(name: {:?}, workernames: {:?}, steps: {})",
                b.name,
                b.worker_names,
                b.factory.steps.len()
            )
        },
    );
    engine.register_get("factory", |b: &mut Arc<BuilderConfig>| b.factory.clone());
    ctor(engine, state, "BuilderConfig", |kw| {
        builder_config(kw).map(Arc::new)
    });
}
