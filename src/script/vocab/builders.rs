//! Builders (`BuilderConfig`), their locks and callbacks, and workers.

use std::collections::BTreeMap;
use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, FnPtr, Map, NativeCallContext};

use crate::config::*;
use crate::script::kwargs::{fail_focus, Kwargs, ScriptError, ScriptResult};
use crate::script::LoadState;

use super::{origin_of, register_type};

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
        Some(v) => crate::script::kwargs::shared_str_list(&v).ok_or_else(|| {
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
        builddir: builddir.into(),
        worker_builddir: worker_builddir.into(),
        worker_names: kw.state().share_workers(worker_names),
        next_worker: next_worker.map(Box::new),
        can_start_build: can_start_build.map(Box::new),
        category: kw.shared_str("category")?,
        tags: {
            let tags = kw.str_list("tags")?.unwrap_or_default();
            kw.state()
                .share_tags(tags.into_iter().map(Into::into).collect())
        },
        description: kw.shared_str("description")?,
        properties: kw.builder_properties("properties")?,
        env: kw.env("env")?,
        collapse_requests,
        locks,
        origin: kw.origin(),
        name: name.into(),
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

pub(super) fn locks_of(v: &Dynamic) -> ScriptResult<Vec<LockAccess>> {
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

/// The keys every worker takes; `missing_timeout` defaults to
/// `missing_default`.
fn worker_of(
    kw: &mut Kwargs,
    name: &str,
    password: crate::config::Secret,
    missing_default: u64,
    origin: Option<crate::config::Origin>,
) -> ScriptResult<Worker> {
    Ok(Worker {
        name: name.to_string(),
        password,
        max_builds: kw.uint("max_builds")?.map(|n| n as u32),
        properties: kw.properties("properties")?,
        keepalive_interval: kw.uint("keepalive_interval")?.unwrap_or(3600),
        missing_timeout: kw.uint("missing_timeout")?.unwrap_or(missing_default),
        latent: None,
        origin,
    })
}

/// A latent worker: a worker with `latent` set from `kind` and
/// `build_wait_timeout`.
fn latent_worker(
    ctx: &NativeCallContext,
    state: &Arc<LoadState>,
    what: &'static str,
    name: &str,
    password: Dynamic,
    opts: Map,
    kind: impl FnOnce(&mut Kwargs) -> ScriptResult<LatentKind>,
) -> ScriptResult<Worker> {
    let origin = origin_of(ctx);
    let password = crate::script::kwargs::secret_of(&password).ok_or_else(|| {
        ScriptError::new(format!(
            "the password of worker `{name}` must be a string or secret(...)"
        ))
        .into_err()
    })?;
    let mut kw = Kwargs::new(what, opts, origin.clone(), state.clone());
    let mut w = worker_of(&mut kw, name, password, Latent::MISSING_TIMEOUT, origin)?;
    let build_wait_timeout = kw
        .int("build_wait_timeout")?
        .unwrap_or(Latent::BUILD_WAIT_TIMEOUT);
    if build_wait_timeout < -1 {
        return fail_focus(
            format!("`build_wait_timeout` in {what} is seconds, 0 (stop after each build) or -1 (never stop); got {build_wait_timeout}"),
            "build_wait_timeout",
        );
    }
    let kind = kind(&mut kw)?;
    kw.finish()?;
    w.latent = Some(Box::new(Latent {
        kind,
        build_wait_timeout,
    }));
    Ok(w)
}

/// A command for a latent worker: a non-empty array of strings.
fn latent_command(kw: &mut Kwargs, key: &'static str, what: &str) -> ScriptResult<Vec<String>> {
    let argv = kw.req_str_list(key)?;
    if argv.is_empty() {
        return fail_focus(
            format!("`{key}` in CommandLatentWorker is empty; it needs the program that {what}"),
            key,
        );
    }
    Ok(argv)
}

pub(super) fn register_latent_workers(engine: &mut Engine, state: &Arc<LoadState>) {
    let st = state.clone();
    engine.register_fn(
        "LocalLatentWorker",
        move |ctx: NativeCallContext, name: &str, pw: Dynamic, opts: Map| {
            latent_worker(&ctx, &st, "LocalLatentWorker", name, pw, opts, |kw| {
                let basedir = kw
                    .str("basedir")?
                    .unwrap_or_else(|| format!("latent/{name}"));
                Ok(LatentKind::Local { basedir })
            })
        },
    );
    let st = state.clone();
    engine.register_fn(
        "LocalLatentWorker",
        move |ctx: NativeCallContext, name: &str, pw: Dynamic| {
            latent_worker(&ctx, &st, "LocalLatentWorker", name, pw, Map::new(), |_| {
                Ok(LatentKind::Local {
                    basedir: format!("latent/{name}"),
                })
            })
        },
    );
    let st = state.clone();
    engine.register_fn(
        "CommandLatentWorker",
        move |ctx: NativeCallContext, name: &str, pw: Dynamic, opts: Map| {
            latent_worker(&ctx, &st, "CommandLatentWorker", name, pw, opts, |kw| {
                let start = latent_command(kw, "start", "starts the instance")?;
                let stop = latent_command(kw, "stop", "stops the instance")?;
                let mut env = BTreeMap::new();
                for (k, v) in kw.env("env")? {
                    match v {
                        crate::config::Arg::Literal(s) => {
                            env.insert(k, s.to_string());
                        }
                        _ => {
                            return fail_focus(
                                format!("`env.{k}` in CommandLatentWorker must be a plain string"),
                                "env",
                            )
                        }
                    }
                }
                Ok(LatentKind::Command { start, stop, env })
            })
        },
    );
}

pub(super) fn register_workers(engine: &mut Engine, state: &Arc<LoadState>) {
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
            let password = crate::script::kwargs::secret_of(&password).ok_or_else(|| {
                ScriptError::new(format!(
                    "the password of worker `{name}` must be a string or secret(...)"
                ))
                .into_err()
            })?;
            let mut kw = Kwargs::new("Worker", opts, origin.clone(), st.clone());
            let w = worker_of(&mut kw, name, password, 600, origin)?;
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
