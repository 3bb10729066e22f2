//! Buildbot's vocabulary as typed Rhai values: `HgPoller(#{...})`,
//! `Scheduler(#{...})`, `BuildFactory`, the steps, `Worker`, ... Each
//! constructor checks its keys (suggesting the nearest for a typo), their
//! types, and records where in the script it was called.

use std::collections::BTreeMap;
use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, FnPtr, Map, NativeCallContext};
use serde::Serialize;

use super::kwargs::{fail, fail_focus, Kwargs, ScriptError, ScriptResult};
use super::LoadState;
use crate::config::*;

/// Where the native function being called was called from.
pub fn origin_of(ctx: &NativeCallContext) -> Option<Origin> {
    let pos = ctx.call_position();
    let line = u32::try_from(pos.line()?).ok()?;
    let column = u32::try_from(pos.position().unwrap_or(1)).unwrap_or(u32::MAX);
    Some(Origin {
        file: shared_file_name(ctx.call_source().unwrap_or("<script>")),
        line,
        column,
    })
}

/// The file name as an `Arc` shared by every origin in that file: a config
/// holds tens of thousands of origins (one per step) and a few files.
fn shared_file_name(name: &str) -> Arc<str> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some(file) if &**file == name => file.clone(),
            _ => {
                let file: Arc<str> = name.into();
                *last = Some(file.clone());
                file
            }
        }
    })
}

/// `Name(key: value, ...)` from a value's serialised fields.
pub fn describe(label: &str, value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(m)) => {
            let fields: Vec<String> = m
                .iter()
                .filter(|(k, _)| k.as_str() != "type")
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            format!("{label}({})", fields.join(", "))
        }
        Ok(other) => format!("{label}({other})"),
        Err(_) => label.to_string(),
    }
}

/// A field of a serialisable value as a script value.
fn field(value: &impl Serialize, name: &str) -> Dynamic {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(mut m)) => m
            .remove(name)
            .and_then(|v| rhai::serde::to_dynamic(v).ok())
            .unwrap_or(Dynamic::UNIT),
        _ => Dynamic::UNIT,
    }
}

/// Registers a custom type with printing and read-only getters for the
/// given (serialised) field names.
fn register_type<T>(
    engine: &mut Engine,
    name: &str,
    fields: &[&'static str],
    label: fn(&T) -> String,
) where
    T: Clone + Serialize + Send + Sync + 'static,
{
    engine.register_type_with_name::<T>(name);
    engine.register_fn("to_string", move |x: &mut T| label(x));
    engine.register_fn("to_debug", move |x: &mut T| label(x));
    for f in fields {
        let f: &'static str = f;
        engine.register_get(f, move |x: &mut T| field(x, f));
    }
}

/// A constructor taking a keyword map, with its call origin.
fn ctor<T, F>(engine: &mut Engine, state: &Arc<LoadState>, name: &'static str, build: F)
where
    T: Clone + Send + Sync + 'static,
    F: Fn(&mut Kwargs) -> ScriptResult<T> + Send + Sync + 'static,
{
    let st = state.clone();
    engine.register_fn(
        name,
        move |ctx: NativeCallContext, map: Map| -> ScriptResult<T> {
            let mut kw = Kwargs::new(name, map, origin_of(&ctx), st.clone());
            let v = build(&mut kw)?;
            kw.finish()?;
            Ok(v)
        },
    );
}

pub fn register(engine: &mut Engine, state: &Arc<LoadState>) {
    register_values(engine);
    register_steps(engine, state);
    register_factory(engine, state);
    register_workers(engine, state);
    register_change_sources(engine, state);
    register_schedulers(engine, state);
    register_status(engine, state);
}

fn register_values(engine: &mut Engine) {
    engine.register_type_with_name::<Secret>("Secret");
    engine.register_fn("to_string", |_: &mut Secret| "<secret>".to_string());
    engine.register_fn("to_debug", |_: &mut Secret| "<secret>".to_string());
    engine.register_get("name", |s: &mut Secret| {
        s.name.clone().map_or(Dynamic::UNIT, Dynamic::from)
    });

    engine.register_type_with_name::<Renderable>("Renderable");
    engine.register_fn("to_string", |r: &mut Renderable| r.to_string());
    engine.register_fn("to_debug", |r: &mut Renderable| r.to_string());
    engine.register_fn("WithProperties", |fmt: &str| -> ScriptResult<Renderable> {
        check_format(fmt, false)?;
        Ok(Renderable::WithProperties(fmt.to_string()))
    });
    engine.register_fn("Interpolate", |fmt: &str| -> ScriptResult<Renderable> {
        check_format(fmt, true)?;
        Ok(Renderable::Interpolate(fmt.to_string(), BTreeMap::new()))
    });
    engine.register_fn(
        "Interpolate",
        |fmt: &str, kw: Map| -> ScriptResult<Renderable> {
            check_format(fmt, true)?;
            let mut keywords = BTreeMap::new();
            for (k, v) in kw {
                let v = v.flatten();
                let text = if v.is_string() || v.is_int() || v.is_float() || v.is_bool() {
                    v.to_string()
                } else {
                    return fail(format!(
                        "Interpolate keyword `{k}` must be a string, number or bool, not a {}",
                        super::kwargs::type_name(&v)
                    ));
                };
                keywords.insert(k.to_string(), text);
            }
            Ok(Renderable::Interpolate(fmt.to_string(), keywords))
        },
    );

    engine.register_type_with_name::<LogEval>("LogEval");
    engine.register_fn("to_string", |l: &mut LogEval| describe("LogEval", l));
    engine.register_fn("to_debug", |l: &mut LogEval| describe("LogEval", l));
    engine.register_fn("rc_eval_func", |map: Map| -> ScriptResult<LogEval> {
        let mut codes = BTreeMap::new();
        let mut default = None;
        for (k, v) in map {
            let r = result_of(&v).ok_or_else(|| {
                ScriptError::new(format!(
                    "rc_eval_func: `{k}` maps to {v}, which is not a result (SUCCESS, WARNINGS, FAILURE, SKIPPED, EXCEPTION, RETRY, CANCELLED)"
                ))
                .into_err()
            })?;
            if k.as_str() == "default" {
                default = Some(r);
            } else {
                let code: i64 = k.parse().map_err(|_| {
                    ScriptError::new(format!("rc_eval_func: key `{k}` is neither an exit code nor `default`"))
                        .help("write #{\"0\": SUCCESS, default: RETRY}")
                        .into_err()
                })?;
                codes.insert(code, r);
            }
        }
        Ok(LogEval::RcMap { codes, default })
    });

    engine.register_type_with_name::<LockAccess>("Lock");
    engine.register_fn("to_string", |l: &mut LockAccess| describe("Lock", l));
    engine.register_fn("to_debug", |l: &mut LockAccess| describe("Lock", l));
    for (ctor, scope) in [
        ("MasterLock", LockScope::Master),
        ("WorkerLock", LockScope::Worker),
    ] {
        let make = move |name: &str, max_count: i64| -> ScriptResult<LockAccess> {
            if max_count < 1 {
                return fail(format!(
                    "{ctor} `{name}`: maxCount must be at least 1, got {max_count}"
                ));
            }
            Ok(LockAccess {
                name: name.to_string(),
                scope,
                max_count: max_count as u32,
                mode: LockMode::Counting,
            })
        };
        engine.register_fn(ctor, move |name: &str| make(name, 1));
        engine.register_fn(
            ctor,
            move |name: &str, opts: Map| -> ScriptResult<LockAccess> {
                let mut max = 1;
                for (k, v) in opts {
                    match k.as_str() {
                        "maxCount" => {
                            max = v.as_int().map_err(|_| {
                                ScriptError::new(format!("{ctor}: `maxCount` must be an integer"))
                                    .into_err()
                            })?
                        }
                        other => {
                            return fail_focus(
                                format!("unknown key `{other}` in {ctor}; it takes maxCount"),
                                other,
                            )
                        }
                    }
                }
                make(name, max)
            },
        );
    }
    engine.register_fn(
        "access",
        |l: &mut LockAccess, mode: &str| -> ScriptResult<LockAccess> {
            let mode = match mode {
                "exclusive" => LockMode::Exclusive,
                "counting" => LockMode::Counting,
                other => {
                    return fail(format!(
                        "lock access must be \"exclusive\" or \"counting\", got {other:?}"
                    ))
                }
            };
            Ok(LockAccess { mode, ..l.clone() })
        },
    );
}

/// Checks `%(name)s`-style format strings so mistakes show at load time.
fn check_format(fmt: &str, interpolate: bool) -> ScriptResult<()> {
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

fn step_label(s: &Step) -> String {
    describe(s.kind.type_name(), s)
}

/// The common parameters of every step, around its kind-specific part.
fn step(kw: &mut Kwargs, kind: StepKind, needs_command: bool) -> ScriptResult<Step> {
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
        env: kw.env("env")?,
        timeout: kw.secs("timeout")?,
        max_time: kw.secs("maxTime")?,
        halt_on_failure: kw.bool("haltOnFailure", false)?,
        flunk_on_failure: kw.bool("flunkOnFailure", true)?,
        flunk_on_warnings: kw.bool("flunkOnWarnings", false)?,
        warn_on_failure: kw.bool("warnOnFailure", false)?,
        warn_on_warnings: kw.bool("warnOnWarnings", false)?,
        always_run: kw.bool("alwaysRun", false)?,
        do_step_if: do_step_if.map(Box::new),
        log_eval: log_eval.map(Box::new),
        origin: kw.origin(),
        kind,
    })
}

/// `log_rules: [["regex", RETRY], ...]`, each pattern checked here.
fn log_rules_of(v: Dynamic, what: &str) -> ScriptResult<Vec<LogRule>> {
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

fn register_steps(engine: &mut Engine, state: &Arc<LoadState>) {
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
        let repourl = kw
            .arg("repourl")?
            .ok_or_else(|| kw.missing("repourl", "the repository URL"))?;
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

fn transfer_options(kw: &mut Kwargs) -> ScriptResult<Box<TransferOptions>> {
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

fn register_transfer_steps(engine: &mut Engine, state: &Arc<LoadState>) {
    ctor(engine, state, "FileUpload", |kw| {
        let workersrc = kw
            .arg("workersrc")?
            .ok_or_else(|| kw.missing("workersrc", "the file on the worker"))?;
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
        let workersrc = kw
            .arg("workersrc")?
            .ok_or_else(|| kw.missing("workersrc", "the directory on the worker"))?;
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
        let workerdest = kw
            .arg("workerdest")?
            .ok_or_else(|| kw.missing("workerdest", "the file to write on the worker"))?;
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
        let s = kw
            .arg("s")?
            .ok_or_else(|| kw.missing("s", "the text to write"))?;
        let workerdest = kw
            .arg("workerdest")?
            .ok_or_else(|| kw.missing("workerdest", "the file to write on the worker"))?;
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
        let workerdest = kw
            .arg("workerdest")?
            .ok_or_else(|| kw.missing("workerdest", "the file to write on the worker"))?;
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

fn steps_of(arr: Array) -> ScriptResult<Vec<Step>> {
    arr.into_iter()
        .enumerate()
        .map(|(i, v)| {
            let v = v.flatten();
            let t = super::kwargs::type_name(&v);
            v.try_cast::<Step>().ok_or_else(|| {
                ScriptError::new(format!("item {i} of the steps is a {t}, not a step")).into_err()
            })
        })
        .collect()
}

fn register_factory(engine: &mut Engine, state: &Arc<LoadState>) {
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
                steps: Arc::new(steps_of(steps)?),
                origin: origin_of(&ctx),
            })
        },
    );
    engine.register_fn("addStep", |f: &mut BuildFactory, s: Step| {
        // Exactly one more slot: a factory has a handful of large steps,
        // and the doubling a plain push does left a 5-step factory with
        // room for 8 (a third of a Mozilla-shaped config's memory).
        let steps = Arc::make_mut(&mut f.steps);
        steps.reserve_exact(1);
        steps.push(s)
    });
    engine.register_fn(
        "addSteps",
        |f: &mut BuildFactory, steps: Array| -> ScriptResult<()> {
            let new = steps_of(steps)?;
            let all = Arc::make_mut(&mut f.steps);
            all.reserve_exact(new.len());
            all.extend(new);
            Ok(())
        },
    );
    engine.register_get("steps", |f: &mut BuildFactory| -> Array {
        f.steps.iter().cloned().map(Dynamic::from).collect()
    });
    engine.register_fn("len", |f: &mut BuildFactory| f.steps.len() as i64);

    register_type::<BuilderConfig>(
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
    engine.register_get("factory", |b: &mut BuilderConfig| b.factory.clone());
    ctor(engine, state, "BuilderConfig", builder_config);
}

/// Buildbot's `safeTranslate`: a name made safe for a directory.
pub fn safe_dir_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `BuilderConfig(#{...})`, and the plain maps Buildbot 0.8 configs used.
pub fn builder_config(kw: &mut Kwargs) -> ScriptResult<BuilderConfig> {
    let name = kw.req_str("name")?;
    let factory = kw
        .custom::<BuildFactory>("factory", "a BuildFactory")?
        .ok_or_else(|| kw.missing("factory", "a BuildFactory"))?;
    let builddir = kw.str("builddir")?.unwrap_or_else(|| safe_dir_name(&name));
    let worker_builddir = match kw.take_legacy("workerbuilddir", "slavebuilddir") {
        None => builddir.clone(),
        Some(v) => v.into_string().map_err(|_| {
            ScriptError::new("`workerbuilddir` must be a string")
                .focus("workerbuilddir")
                .into_err()
        })?,
    };
    let mut worker_names = match kw.take_legacy("workernames", "slavenames") {
        None => vec![],
        Some(v) => super::kwargs::shared_str_list(&v).ok_or_else(|| {
            ScriptError::new(format!(
                "`workernames` in BuilderConfig `{name}` must be an array of strings"
            ))
            .focus("workernames")
            .into_err()
        })?,
    };
    if let Some(one) = kw.take_legacy("workername", "slavename") {
        worker_names.push(
            one.into_immutable_string()
                .map_err(|_| ScriptError::new("`workername` must be a string").into_err())?,
        );
    }
    let next_worker = match kw.take_legacy("nextWorker", "nextSlave") {
        None => None,
        Some(v) => match v.try_cast::<FnPtr>() {
            Some(fn_ptr) => Some(Callback {
                fn_ptr,
                origin: kw.origin(),
            }),
            None => return fail_focus("`nextWorker` must be a function".into(), "nextWorker"),
        },
    };
    let can_start_build = kw.callback("canStartBuild")?;
    let collapse_requests = bool_or_callback(kw, "collapseRequests")?;
    let locks = match kw.raw("locks") {
        None => vec![],
        Some(v) => locks_of(&v)?,
    };
    Ok(BuilderConfig {
        factory,
        builddir,
        worker_builddir,
        worker_names,
        next_worker: next_worker.map(Box::new),
        can_start_build: can_start_build.map(Box::new),
        category: kw.shared_str("category")?,
        tags: kw.str_list("tags")?.unwrap_or_default(),
        description: kw.shared_str("description")?,
        properties: kw.properties("properties")?,
        env: kw.env("env")?,
        collapse_requests,
        locks,
        origin: kw.origin(),
        name,
    })
}

pub fn bool_or_callback(
    kw: &mut Kwargs,
    key: &'static str,
) -> ScriptResult<Option<BoolOrCallback>> {
    match kw.raw(key) {
        None => Ok(None),
        Some(v) if v.is_bool() => Ok(Some(BoolOrCallback::Enabled(v.as_bool().unwrap_or(true)))),
        Some(v) => match v.try_cast::<FnPtr>() {
            Some(fn_ptr) => Ok(Some(BoolOrCallback::Callback(Box::new(Callback {
                fn_ptr,
                origin: kw.origin(),
            })))),
            None => fail_focus(
                format!("`{key}` in {} must be a bool or a function", kw.what()),
                key,
            ),
        },
    }
}

fn locks_of(v: &Dynamic) -> ScriptResult<Vec<LockAccess>> {
    let arr = v.clone().try_cast::<Array>().ok_or_else(|| {
        ScriptError::new("`locks` must be an array of locks")
            .focus("locks")
            .into_err()
    })?;
    arr.into_iter()
        .map(|l| {
            l.flatten().try_cast::<LockAccess>().ok_or_else(|| {
                ScriptError::new("`locks` must hold MasterLock(...) or WorkerLock(...) values")
                    .focus("locks")
                    .into_err()
            })
        })
        .collect()
}

fn register_workers(engine: &mut Engine, state: &Arc<LoadState>) {
    register_type::<Worker>(
        engine,
        "Worker",
        &[
            "name",
            "max_builds",
            "properties",
            "keepalive_interval",
            "missing_timeout",
        ],
        |w| format!("Worker({:?})", w.name),
    );
    for ctor_name in ["Worker", "BuildSlave"] {
        let st = state.clone();
        let make = move |ctx: &NativeCallContext,
                         name: &str,
                         password: Dynamic,
                         opts: Map|
              -> ScriptResult<Worker> {
            let origin = origin_of(ctx);
            if ctor_name == "BuildSlave" {
                st.warn(
                    crate::diagnostics::Diagnostic::warning(
                        "`BuildSlave` is a legacy Buildbot 0.8 name; use `Worker`",
                    )
                    .at_origin(origin.as_ref()),
                );
            }
            let password = super::kwargs::secret_of(&password).ok_or_else(|| {
                ScriptError::new(format!(
                    "the password of worker `{name}` must be a string or secret(...)"
                ))
                .into_err()
            })?;
            let mut kw = Kwargs::new("Worker", opts, origin.clone(), st.clone());
            let max_builds = kw.uint("max_builds")?.map(|n| n as u32);
            let w = Worker {
                name: name.to_string(),
                password,
                max_builds,
                properties: kw.properties("properties")?,
                keepalive_interval: kw.uint("keepalive_interval")?.unwrap_or(3600),
                missing_timeout: kw.uint("missing_timeout")?.unwrap_or(600),
                origin,
            };
            kw.finish()?;
            Ok(w)
        };
        let m = make.clone();
        engine.register_fn(
            ctor_name,
            move |ctx: NativeCallContext, name: &str, pw: Dynamic| m(&ctx, name, pw, Map::new()),
        );
        engine.register_fn(
            ctor_name,
            move |ctx: NativeCallContext, name: &str, pw: Dynamic, opts: Map| {
                make(&ctx, name, pw, opts)
            },
        );
    }
}

fn register_change_sources(engine: &mut Engine, state: &Arc<LoadState>) {
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

fn cron_field(
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
            "`{key}` in Nightly must be \"*\", an integer or an array of integers from {} to {}",
            range.0, range.1
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

fn scheduler(
    kw: &mut Kwargs,
    build_kind: impl FnOnce(&mut Kwargs) -> ScriptResult<SchedulerKind>,
) -> ScriptResult<SchedulerConfig> {
    let name = kw.req_str("name")?;
    let builder_names = kw.req_str_list("builderNames")?;
    let kind = build_kind(kw)?;
    Ok(SchedulerConfig {
        name,
        kind,
        builder_names,
        properties: kw.properties("properties")?,
        priority: kw.int("priority")?,
        origin: kw.origin(),
    })
}

fn register_schedulers(engine: &mut Engine, state: &Arc<LoadState>) {
    register_type::<SchedulerConfig>(
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
    engine.register_get("type", |s: &mut SchedulerConfig| {
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
                minute: cron_field(kw, "minute", CronField::Values(vec![0]), (0, 59))?,
                hour: cron_field(kw, "hour", CronField::Any(AnyMarker), (0, 23))?,
                day_of_month: cron_field(kw, "dayOfMonth", CronField::Any(AnyMarker), (1, 31))?,
                month: cron_field(kw, "month", CronField::Any(AnyMarker), (1, 12))?,
                day_of_week: cron_field(kw, "dayOfWeek", CronField::Any(AnyMarker), (0, 6))?,
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
                Some(v) => match v.try_cast::<SchedulerConfig>() {
                    Some(s) => s.name,
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

fn register_status(engine: &mut Engine, state: &Arc<LoadState>) {
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
