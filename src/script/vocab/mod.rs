//! Buildbot's vocabulary as typed Rhai values: `HgPoller(#{...})`,
//! `Scheduler(#{...})`, `BuildFactory`, the steps, `Worker`, ... Each
//! constructor checks its keys (suggesting the nearest for a typo), their
//! types, and records where in the script it was called.

mod builders;
mod sources;
mod steps;

use std::collections::BTreeMap;
use std::sync::Arc;

use rhai::{Dynamic, Engine, Map, NativeCallContext};
use serde::Serialize;

use crate::config::*;
use crate::script::kwargs::{fail, fail_focus, Kwargs, ScriptError, ScriptResult};
use crate::script::LoadState;

pub(super) use builders::{bool_or_callback, builder_config};
use builders::{register_latent_workers, register_workers};
use sources::{register_change_sources, register_schedulers, register_status};
pub(super) use sources::{HG_MAX_CHANGES, HG_POLL_INTERVAL};
use steps::{check_format, register_factory, register_steps, result_of};

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
    register_latent_workers(engine, state);
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
                        crate::script::kwargs::type_name(&v)
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
