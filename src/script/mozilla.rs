//! Mozilla release engineering's helpers from buildbotcustom, natively:
//! `generateBranchObjects`, `mergeBuildObjects`, `ScriptFactory` and
//! `normalizeName`, with the semantics the seed (checkin-to-builds.rst)
//! describes.

use std::sync::Arc;

use rhai::{Array, Dynamic, Engine, Map, NativeCallContext};

use super::kwargs::{arg_of, env_of, secret_of, str_list, Kwargs, ScriptError, ScriptResult};
use super::vocab::{origin_of, HG_MAX_CHANGES, HG_POLL_INTERVAL};
use super::LoadState;
use crate::config::*;

/// A string constant as a shared string, made once per process: the
/// seed's ScriptFactory and generateBranchObjects give every builder the
/// same step names, arguments and property names, and looking each up in
/// the load's string table was a twentieth of a large load's time.
macro_rules! constant {
    ($s:literal) => {{
        static S: std::sync::OnceLock<rhai::ImmutableString> = std::sync::OnceLock::new();
        S.get_or_init(|| rhai::ImmutableString::from($s)).clone()
    }};
}

/// The four lists a set of build objects holds.
pub const BUILD_OBJECT_KEYS: [&str; 4] = ["builders", "status", "change_source", "schedulers"];

pub fn register(engine: &mut Engine, state: &Arc<LoadState>) {
    engine.register_fn("mergeBuildObjects", merge_build_objects);
    engine.register_fn("normalizeName", |name: &str| normalize_name(name, None));
    engine.register_fn("normalizeName", |name: &str, product: &str| {
        normalize_name(name, Some(product))
    });

    let st = state.clone();
    engine.register_fn(
        "ScriptFactory",
        move |ctx: NativeCallContext, map: Map| -> ScriptResult<BuildFactory> {
            let mut kw = Kwargs::new("ScriptFactory", map, origin_of(&ctx), st.clone());
            let f = script_factory(&mut kw)?;
            kw.finish()?;
            Ok(f)
        },
    );

    let st = state.clone();
    engine.register_fn(
        "generateBranchObjects",
        move |ctx: NativeCallContext, config: Map, name: &str| {
            generate_branch_objects(&ctx, &st, &config, name, &Map::new())
        },
    );
    let st = state.clone();
    engine.register_fn(
        "generateBranchObjects",
        move |ctx: NativeCallContext, config: Map, name: &str, secrets: Dynamic| -> ScriptResult<Map> {
            let secrets = if secrets.is_unit() {
                Map::new()
            } else {
                secrets.try_cast::<Map>().ok_or_else(|| {
                    ScriptError::new("generateBranchObjects: `secrets` must be a map of names to secret(...) values")
                        .into_err()
                })?
            };
            generate_branch_objects(&ctx, &st, &config, name, &secrets)
        },
    );
}

/// Buildbotcustom's `mergeBuildObjects(d1, d2)`: `d1`'s lists with `d2`'s
/// appended. Rhai passes a variable first argument by reference, so the
/// lists are extended in place and then moved into the result: the seed's
/// loop `buildObjects = mergeBuildObjects(buildObjects, branchObjects)`
/// costs the size of `d2` per call, not the size of everything merged so
/// far. (Python shares the lists between `d1` and the result; Rhai values
/// cannot share, so `d1` is left empty: use the result.)
pub fn merge_build_objects(d1: &mut Map, mut d2: Map) -> ScriptResult<Map> {
    for key in BUILD_OBJECT_KEYS {
        let slot = d1
            .entry(key.into())
            .or_insert_with(|| Dynamic::from_array(Array::new()));
        let Some(mut list) = slot.write_lock::<Array>() else {
            return Err(ScriptError::new(format!(
                "mergeBuildObjects: `{key}` of the first argument must be an array"
            ))
            .into_err());
        };
        // `d2` is the script's copy: its lists move, element by element.
        let Some(more) = d2.remove(key) else { continue };
        let more = more.flatten().try_cast::<Array>().ok_or_else(|| {
            ScriptError::new(format!(
                "mergeBuildObjects: `{key}` of the second argument must be an array"
            ))
            .into_err()
        })?;
        list.extend(more);
    }
    Ok(std::mem::take(d1))
}

/// buildbotcustom's `normalizeName`: shortens well-known words so that
/// worker build directories stay short on Windows, then pads with `-0…`
/// (or truncates) to 30 characters.
pub fn normalize_name(name: &str, product: Option<&str>) -> String {
    const MAPPINGS: &[(&str, &str)] = &[
        ("mozilla", "m"),
        ("central", "cen"),
        ("aurora", "a"),
        ("beta", "b"),
        ("release", "rel"),
        ("inbound", "in"),
        ("linux64", "l64"),
        ("linux", "lnx"),
        ("macosx64", "m64"),
        ("macosx", "mac"),
        ("win32", "w32"),
        ("win64", "w64"),
        ("android", "andrd"),
        ("nightly", "ntly"),
        ("debug", "dbg"),
        ("xulrunner", "xr"),
        ("mobile", "mb"),
        ("build", "bld"),
        ("desktop", "dsk"),
        ("unittest", "u"),
        ("talos", "tls"),
        ("update", "upd"),
        ("upload", "upl"),
        ("project", "p"),
        ("projects", "p"),
    ];
    const LEN: usize = 30;
    let sep = |c: char| c == '-' || c == '_';
    // Replace whole segments between separators, keeping the separators.
    let mut out = String::with_capacity(name.len());
    let mut segment = String::new();
    let flush = |seg: &mut String, out: &mut String| {
        let word = MAPPINGS
            .iter()
            .find(|(w, _)| *w == seg.as_str())
            .map_or(seg.as_str(), |(_, r)| r);
        out.push_str(word);
        seg.clear();
    };
    for c in name.chars() {
        if sep(c) {
            flush(&mut segment, &mut out);
            out.push(c);
        } else {
            segment.push(c);
        }
    }
    flush(&mut segment, &mut out);
    if let Some(p) = product.filter(|p| *p != "firefox") {
        out = format!("{}_{out}", p.chars().take(2).collect::<String>());
    }
    if out.len() < LEN {
        out.push('-');
        while out.len() < LEN {
            out.push('0');
        }
    }
    out.chars().take(LEN).collect()
}

/// `ScriptFactory(#{scriptRepo, scriptName, ...})`: the seed's factory that
/// clones a scripts repository and runs one script from it (mozharness).
pub fn script_factory(kw: &mut Kwargs) -> ScriptResult<BuildFactory> {
    let script_repo = kw.req_str("scriptRepo")?;
    let script_name = kw.req_str("scriptName")?;
    let interpreter = match kw.raw("interpreter") {
        None => vec![],
        Some(v) if v.is_string() => vec![v.into_string().unwrap_or_default()],
        Some(v) => str_list(&v).ok_or_else(|| {
            ScriptError::new(
                "`interpreter` in ScriptFactory must be a string or an array of strings",
            )
            .focus("interpreter")
            .into_err()
        })?,
    };
    let extra_args: Vec<Arg> = match kw.raw("extra_args") {
        None => vec![],
        Some(v) => v
            .clone()
            .try_cast::<Array>()
            .and_then(|a| a.iter().map(arg_of).collect::<Option<Vec<_>>>())
            .ok_or_else(|| {
                ScriptError::new("`extra_args` in ScriptFactory must be an array of strings")
                    .focus("extra_args")
                    .into_err()
            })?,
    };
    let reboot_command = kw.command("reboot_command")?;
    let script_timeout = kw.secs("script_timeout")?.unwrap_or(1200);
    let script_maxtime = kw.secs("script_maxtime")?;
    let log_eval = match kw.raw("log_eval_func") {
        None => None,
        Some(v) => match v.clone().try_cast::<LogEval>() {
            Some(l) => Some(l),
            None => match v.try_cast::<rhai::FnPtr>() {
                Some(fn_ptr) => Some(LogEval::Callback(Callback {
                    fn_ptr,
                    origin: kw.origin(),
                })),
                None => {
                    return Err(ScriptError::new(
                        "`log_eval_func` must be rc_eval_func(...) or a function",
                    )
                    .focus("log_eval_func")
                    .into_err())
                }
            },
        },
    };
    let platform = kw.str("platform")?;
    let use_mock = kw.bool("use_mock", false)?;
    let mock_target = kw.str("mock_target")?;
    let mut env = kw.env("env")?;
    let hg_bin = kw.str("hg_bin")?.unwrap_or_else(|| "hg".into());
    let properties_file = kw
        .str("properties_file")?
        .unwrap_or_else(|| "buildprops.json".into());
    let use_credentials_file = kw.bool("use_credentials_file", false)?;
    let origin = kw.origin();

    // The workers' `os.name`, when the config knows it better than the
    // platform's name does (a staging master building Windows platforms
    // on posix stand-ins).
    let worker_system = kw.str("worker_system")?;
    let is_windows = match worker_system.as_deref() {
        Some(system) => system != "posix",
        None => platform.as_deref().is_some_and(|p| p.contains("win")),
    };
    let lit = |s: &str| Arg::Literal(kw.state().shared_str(s));
    env.insert(
        "PROPERTIES_FILE".into(),
        Arg::Render(Box::new(Renderable::WithProperties(format!(
            "%(basedir)s/{properties_file}"
        )))),
    );
    let env = kw.state().share_env(env);

    let base = |name: rhai::ImmutableString, kind: StepKind, command: Vec<Arg>| Step {
        name,
        kind,
        description: None,
        command: Some(StepCommand::Argv(command)),
        workdir: Some(constant!(".")),
        env: Default::default(),
        timeout: None,
        max_time: None,
        halt_on_failure: false,
        flunk_on_failure: true,
        flunk_on_warnings: false,
        warn_on_failure: false,
        warn_on_warnings: false,
        always_run: false,
        do_step_if: None,
        log_eval: None,
        log_rules: vec![],
        origin: origin.clone(),
    };

    // At most six steps, made for every builder of a seed-shaped master:
    // no growing.
    let mut steps = Vec::with_capacity(6);
    steps.push(Step {
        halt_on_failure: true,
        ..base(
            constant!("get_basedir"),
            StepKind::SetProperty {
                property: constant!("basedir"),
                value: None,
            },
            vec![Arg::Literal(if is_windows {
                constant!("cd")
            } else {
                constant!("pwd")
            })],
        )
    });
    steps.push(Step {
        halt_on_failure: true,
        log_eval: Some(kw.state().share_log_eval(LogEval::RcMap {
            codes: [(0, Results::Success)].into_iter().collect(),
            default: Some(Results::Retry),
        })),
        ..base(
            constant!("clone_scripts"),
            StepKind::MercurialCloneCommand { retry: false },
            vec![
                lit(&hg_bin),
                Arg::Literal(constant!("clone")),
                lit(&script_repo),
                Arg::Literal(constant!("scripts")),
            ],
        )
    });
    // What mozharness reads as the build's properties ($PROPERTIES_FILE).
    steps.push(Step {
        command: None,
        halt_on_failure: true,
        ..base(
            constant!("download_props"),
            StepKind::JsonPropertiesDownload {
                workerdest: lit(&properties_file),
                transfer: Default::default(),
            },
            vec![],
        )
    });
    let script_path = if script_name.starts_with('/') {
        script_name.clone()
    } else {
        format!("scripts/{script_name}")
    };
    let mut cmd: Vec<Arg> = interpreter.iter().map(|s| lit(s)).collect();
    cmd.push(lit(&script_path));
    cmd.extend(extra_args);
    steps.push(Step {
        env: env.clone(),
        timeout: Some(script_timeout),
        max_time: script_maxtime,
        log_eval: log_eval.map(|l| kw.state().share_log_eval(l)),
        halt_on_failure: true,
        warn_on_warnings: true,
        ..base(
            constant!("run_script"),
            StepKind::MockCommand {
                use_mock,
                target: mock_target.map(Into::into),
            },
            cmd,
        )
    });
    // Leave nothing behind that a later build on this worker could pick up.
    let mut cleanup = vec![
        Arg::Literal(constant!("rm")),
        Arg::Literal(constant!("-f")),
        lit(&properties_file),
    ];
    if use_credentials_file {
        cleanup.push(Arg::Literal(constant!("oauth.txt")));
    }
    steps.push(Step {
        always_run: true,
        flunk_on_failure: false,
        ..base(constant!("cleanup"), StepKind::ShellCommand, cleanup)
    });
    if let Some(reboot) = reboot_command {
        steps.push(Step {
            command: Some(reboot),
            description: Some(constant!("reboot")),
            env,
            always_run: true,
            flunk_on_failure: false,
            warn_on_failure: false,
            ..base(
                constant!("reboot"),
                StepKind::DisconnectStep {
                    force_disconnect: Disconnect::OutputContains("SCHEDULED REBOOT".into()),
                },
                vec![],
            )
        });
    }
    // A new list, not `collect()`: that would reuse the steps' own
    // allocation (six steps' room) for six pointers.
    let mut shared = Vec::with_capacity(steps.len());
    for s in steps {
        shared.push(kw.state().share_step(s));
    }
    Ok(BuildFactory {
        steps: shared.into(),
        origin,
    })
}

/// Reads `key` of a branch or platform config map, naming where it was.
struct Cfg<'a> {
    map: &'a Map,
    path: String,
}

impl<'a> Cfg<'a> {
    /// The value under `key`, not copied; `()` is no value.
    fn peek(&self, key: &str) -> Option<&'a Dynamic> {
        let v = self.map.get(key)?;
        let unit = if v.is_shared() {
            v.flatten_clone().is_unit()
        } else {
            v.is_unit()
        };
        (!unit).then_some(v)
    }
    fn get(&self, key: &str) -> Option<Dynamic> {
        self.map
            .get(key)
            .map(|v| v.flatten_clone())
            .filter(|v| !v.is_unit())
    }
    fn err(&self, msg: String) -> Box<rhai::EvalAltResult> {
        ScriptError::new(format!("{}: {msg}", self.path)).into_err()
    }
    fn str(&self, key: &str) -> ScriptResult<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.clone().into_string().map(Some).map_err(|_| {
                self.err(format!(
                    "`{key}` must be a string, got {}",
                    super::kwargs::type_name(&v)
                ))
            }),
        }
    }
    fn req_str(&self, key: &str) -> ScriptResult<String> {
        self.str(key)?
            .ok_or_else(|| self.err(format!("missing `{key}`")))
    }
    fn bool(&self, key: &str) -> ScriptResult<bool> {
        match self.get(key) {
            None => Ok(false),
            Some(v) => v
                .as_bool()
                .map_err(|_| self.err(format!("`{key}` must be a bool"))),
        }
    }
    fn uint(&self, key: &str) -> ScriptResult<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_int() {
                Ok(n) if n >= 0 => Ok(Some(n as u64)),
                _ => Err(self.err(format!("`{key}` must be a non-negative integer"))),
            },
        }
    }
    fn str_list(&self, key: &str) -> ScriptResult<Option<Vec<String>>> {
        Ok(self
            .shared_str_list(key)?
            .map(|l| l.into_iter().map(String::from).collect()))
    }
    fn shared_str_list(&self, key: &str) -> ScriptResult<Option<Vec<rhai::ImmutableString>>> {
        match self.peek(key) {
            None => Ok(None),
            Some(v) => super::kwargs::shared_str_list(v)
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be an array of strings"))),
        }
    }
    /// The map under `key`, read in place: a branch's platforms are read
    /// once per builder, and copying them was most of the work.
    fn map(&self, key: &str) -> ScriptResult<Option<impl std::ops::Deref<Target = Map> + 'a>> {
        match self.peek(key) {
            None => Ok(None),
            Some(v) => v
                .as_map_ref()
                .map(Some)
                .map_err(|_| self.err(format!("`{key}` must be a map"))),
        }
    }
    fn sub(&self, key: &str, map: &'a Map) -> Cfg<'a> {
        Cfg {
            map,
            path: format!("{}.{key}", self.path),
        }
    }
}

/// The seed's `generateBranchObjects(config, name, secrets)`.
///
/// One HgPoller per branch (over `poll_repo` or `repo_path`), one Scheduler
/// per product over that product's builders, and one builder per enabled
/// platform (sorted), each running the platform's mozharness script through
/// ScriptFactory. The inputs are never modified.
fn generate_branch_objects(
    ctx: &NativeCallContext,
    state: &Arc<LoadState>,
    config: &Map,
    name: &str,
    secrets: &Map,
) -> ScriptResult<Map> {
    let origin = origin_of(ctx);
    let cfg = Cfg {
        map: config,
        path: format!("branch `{name}`"),
    };
    let platforms = cfg
        .map("platforms")?
        .ok_or_else(|| cfg.err("missing `platforms`".into()))?;
    let enabled_products = cfg
        .str_list("enabled_products")?
        .ok_or_else(|| cfg.err("missing `enabled_products`".into()))?;
    let hgurl = cfg.req_str("hgurl")?;
    let repo_path = cfg.req_str("repo_path")?;
    let poll_repo = cfg.str("poll_repo")?.unwrap_or_else(|| repo_path.clone());
    let script_repo = match cfg.str("mozharness_repo_url")? {
        Some(url) => url,
        None => format!(
            "{hgurl}{}",
            cfg.str("mozharness_repo_path")?.ok_or_else(|| {
                cfg.err("missing `mozharness_repo_path` (or `mozharness_repo_url`)".into())
            })?
        ),
    };
    let staging = cfg.bool("staging")?;
    let enable_try = cfg.bool("enable_try")?;
    let mozharness_tag = cfg
        .str("mozharness_tag")?
        .unwrap_or_else(|| "default".into());
    let file_is_important = match cfg.get("fileIsImportant") {
        None => None,
        Some(v) => Some(Callback {
            fn_ptr: v
                .try_cast::<rhai::FnPtr>()
                .ok_or_else(|| cfg.err("`fileIsImportant` must be a function".into()))?,
            origin: origin.clone(),
        }),
    };
    let next_worker = match cfg.get("nextWorker") {
        None => None,
        Some(v) => Some(Callback {
            fn_ptr: v
                .try_cast::<rhai::FnPtr>()
                .ok_or_else(|| cfg.err("`nextWorker` must be a function".into()))?,
            origin: origin.clone(),
        }),
    };

    let mut platform_names: Vec<String> = platforms.keys().map(|k| k.to_string()).collect();
    platform_names.sort();

    let mut builders = Array::new();
    let mut builders_by_product: Vec<(String, Vec<rhai::ImmutableString>)> = Vec::new();
    for platform in &platform_names {
        let pf_map = platforms
            .get(platform.as_str())
            .and_then(|v| v.as_map_ref().ok())
            .ok_or_else(|| cfg.err(format!("`platforms.{platform}` must be a map")))?;
        let pf = cfg.sub(&format!("platforms.{platform}"), &pf_map);
        let product = pf.req_str("stage_product")?;
        if !enabled_products.contains(&product) {
            continue;
        }
        let builder = desktop_mozharness_builder(
            state,
            &pf,
            name,
            platform,
            &product,
            &script_repo,
            staging,
            &mozharness_tag,
            &repo_path,
            next_worker.clone(),
            secrets,
            origin.clone(),
        )?;
        match builders_by_product.iter_mut().find(|(p, _)| *p == product) {
            Some((_, names)) => names.push(builder.name.clone()),
            None => builders_by_product.push((product.clone(), vec![builder.name.clone()])),
        }
        builders.push(Dynamic::from(Arc::new(builder)));
    }

    let poller = HgPoller {
        hg_url: hgurl,
        branch: poll_repo.clone(),
        pushlog_url_override: None,
        // Try gets one change per push, from any named branch.
        tips_only: enable_try,
        max_changes: cfg.uint("maxChanges")?.unwrap_or(HG_MAX_CHANGES),
        repo_branch: if enable_try {
            None
        } else {
            Some("default".into())
        },
        poll_interval: cfg.uint("pollInterval")?.unwrap_or(HG_POLL_INTERVAL),
        store_rev: None,
        category: None,
        project: None,
        origin: origin.clone(),
    };

    let mut schedulers = Array::new();
    builders_by_product.sort_by(|a, b| a.0.cmp(&b.0));
    for (product, names) in builders_by_product {
        schedulers.push(Dynamic::from(Arc::new(SchedulerConfig {
            name: format!("{name}-{product}"),
            kind: SchedulerKind::Scheduler {
                branch: Some(poll_repo.clone()),
                repository: None,
                project: None,
                tree_stable_timer: cfg.uint("treeStableTimer")?.filter(|t| *t > 0),
                file_is_important: file_is_important.clone(),
                only_important: false,
            },
            builder_names: names,
            properties: PropertyMap::new(),
            priority: None,
            origin: origin.clone(),
        })));
    }

    let mut out = Map::new();
    out.insert("builders".into(), Dynamic::from_array(builders));
    out.insert(
        "change_source".into(),
        Dynamic::from_array(vec![Dynamic::from(poller)]),
    );
    out.insert("schedulers".into(), Dynamic::from_array(schedulers));
    out.insert("status".into(), Dynamic::from_array(Array::new()));
    Ok(out)
}

/// The seed's `generateDesktopMozharnessBuilders` for one platform.
#[allow(clippy::too_many_arguments)]
fn desktop_mozharness_builder(
    state: &Arc<LoadState>,
    pf: &Cfg,
    name: &str,
    platform: &str,
    product: &str,
    script_repo: &str,
    staging: bool,
    mozharness_tag: &str,
    repo_path: &str,
    next_worker: Option<Callback>,
    secrets: &Map,
    origin: Option<Origin>,
) -> ScriptResult<BuilderConfig> {
    let base_name = pf.req_str("base_name")?;
    let mh_map = pf
        .map("mozharness_config")?
        .ok_or_else(|| pf.err("missing `mozharness_config`".into()))?;
    let mh = pf.sub("mozharness_config", &mh_map);
    let workers = match pf.shared_str_list("workers")? {
        Some(w) => w,
        None => match pf.shared_str_list("slaves")? {
            Some(w) => {
                let mut d = crate::diagnostics::Diagnostic::warning(
                    "`slaves` in a platform given to generateBranchObjects is a legacy \
                     Buildbot 0.8 name; use `workers`",
                )
                .at_origin(origin.as_ref());
                d.help = Some(format!("the first is {}", pf.path));
                state.warn(d);
                w
            }
            None => {
                return Err(pf.err("missing `workers` (the worker pool for this platform)".into()))
            }
        },
    };

    // A fresh list: the caller's extra_args are never extended in place.
    let mut extra_args: Vec<Dynamic> = mh
        .get("extra_args")
        .and_then(|v| v.try_cast::<Array>())
        .unwrap_or_default();
    let branch = state.shared_str(name);
    for a in [
        constant!("--branch"),
        branch.clone(),
        constant!("--build-pool"),
        if staging {
            constant!("staging")
        } else {
            constant!("production")
        },
    ] {
        extra_args.push(Dynamic::from(a));
    }
    let builddir = format!("{name}-{platform}");
    let worker_builddir = normalize_name(&builddir, Some(product));

    let mut env = match pf.get("env") {
        None => Default::default(),
        Some(v) => env_of(&v).ok_or_else(|| pf.err("`env` must be a map of strings".into()))?,
    };
    if let Some(key) = pf.str("dep_signing_servers")? {
        let secret = secrets
            .get(key.as_str())
            .and_then(secret_of)
            .ok_or_else(|| pf.err(format!("`dep_signing_servers` names `{key}`, which is not in the secrets passed to generateBranchObjects")))?;
        env.insert("MOZ_SIGNING_SERVERS".into(), Arg::Secret(Box::new(secret)));
    }

    let mut fmap = Map::new();
    fmap.insert("scriptRepo".into(), Dynamic::from(script_repo.to_string()));
    fmap.insert(
        "scriptName".into(),
        mh.get("script_name")
            .ok_or_else(|| mh.err("missing `script_name`".into()))?,
    );
    if let Some(i) = mh.get("mozharness_python") {
        fmap.insert("interpreter".into(), i);
    }
    if let Some(r) = mh.get("reboot_command") {
        fmap.insert("reboot_command".into(), r);
    }
    fmap.insert("extra_args".into(), Dynamic::from_array(extra_args));
    fmap.insert(
        "script_timeout".into(),
        Dynamic::from(pf.uint("timeout")?.unwrap_or(3600) as i64),
    );
    fmap.insert(
        "script_maxtime".into(),
        Dynamic::from(pf.uint("maxTime")?.unwrap_or(4 * 3600) as i64),
    );
    fmap.insert("platform".into(), Dynamic::from(platform.to_string()));
    fmap.insert("use_mock".into(), Dynamic::from(pf.bool("use_mock")?));
    if let Some(system) = pf.str("worker_system")? {
        fmap.insert("worker_system".into(), Dynamic::from(system));
    }
    if let Some(t) = pf.get("mock_target") {
        fmap.insert("mock_target".into(), t);
    }
    fmap.insert(
        "log_eval_func".into(),
        Dynamic::from(LogEval::RcMap {
            // mozharness's exit codes, as TBPL read them.
            codes: [
                (0, Results::Success),
                (1, Results::Warnings),
                (2, Results::Failure),
                (3, Results::Exception),
                (4, Results::Retry),
            ]
            .into_iter()
            .collect(),
            default: Some(Results::Failure),
        }),
    );
    let mut env_map = Map::new();
    for (k, v) in env {
        env_map.insert(
            k.into(),
            match v {
                Arg::Literal(s) => Dynamic::from(s),
                Arg::Render(r) => Dynamic::from(*r),
                Arg::Secret(s) => Dynamic::from(*s),
            },
        );
    }
    fmap.insert("env".into(), Dynamic::from_map(env_map));
    let mut kw = Kwargs::new("ScriptFactory", fmap, origin.clone(), state.clone());
    let factory = script_factory(&mut kw).map_err(|e| {
        // Name the branch and platform the bad mozharness_config came from.
        ScriptError::new(format!("{}: {}", mh.path, super::error_text(&e))).into_err()
    })?;
    kw.finish()?;

    let builddir = rhai::ImmutableString::from(builddir);
    let worker_builddir = rhai::ImmutableString::from(worker_builddir);
    let shared = |v: &str| PropValue::Str(state.shared_str(v));
    let properties = BuilderProperties::new([
        (constant!("branch"), PropValue::Str(branch.clone())),
        (constant!("platform"), shared(platform)),
        (constant!("product"), shared(product)),
        (constant!("repo_path"), shared(repo_path)),
        (constant!("script_repo_revision"), shared(mozharness_tag)),
        (constant!("builddir"), PropValue::Str(builddir.clone())),
        (
            constant!("workerbuilddir"),
            PropValue::Str(worker_builddir.clone()),
        ),
    ]);
    Ok(BuilderConfig {
        name: format!("{base_name} build").into(),
        builddir,
        worker_builddir,
        worker_names: state.share_workers(workers),
        next_worker: next_worker.map(Box::new),
        can_start_build: None,
        factory: BuildFactory {
            steps: factory.steps,
            origin: origin.clone(),
        },
        category: Some(branch),
        // The push page shows a build as `B` in its platform's row.
        tags: state.share_tags(vec!["symbol:B".into()]),
        description: None,
        properties,
        env: Default::default(),
        collapse_requests: None,
        locks: vec![],
        origin,
    })
}
