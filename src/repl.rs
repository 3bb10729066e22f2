//! `kiln repl`: an interactive Rhai session over a master's scripts.
//!
//! A [`Session`] evaluates the master's entry script with the master's
//! engine, vocabulary and limits, keeps the resulting scope (so `c`,
//! `BRANCHES`, ... are there), re-imports the entry script's modules for
//! every line, and adds helpers to explore the config: `branches()`,
//! `builders()`, `schedulers()`, `show(name)`, `explain(change)` and
//! `help(name)`. [`run`] drives it from a terminal (rustyline: history,
//! multi-line input, completion, Ctrl-C), from piped standard input, or
//! for one expression (`-e`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use rhai::{Dynamic, Engine, Scope, AST};

use crate::config::diff::ConfigDiff;
use crate::config::{ChangeSource, MasterConfig};
use crate::diagnostics::{render, Diagnostic, Sources};
use crate::script::{self, Limits, LoadState, ScriptRuntime, ENTRY_SCRIPT, INTERRUPT};

/// What the helpers read: the config and runtime of the last good load.
#[derive(Default)]
struct Shared {
    config: RwLock<Option<Arc<MasterConfig>>>,
    runtime: RwLock<Option<ScriptRuntime>>,
    /// `--master URL`: a running master to read live state from.
    master: RwLock<Option<String>>,
}

/// GET `path` from the running master at `url`, as JSON.
fn fetch_json(url: &str, path: &str) -> Result<serde_json::Value, String> {
    crate::client::Client::new(url, None)
        .and_then(|c| c.get(path)?.ok_json("the master refused"))
        .map_err(|e| format!("{e:#}"))
}

/// The running master's connected workers and waiting requests.
fn live_state(url: &str) -> Result<String, String> {
    let workers = fetch_json(url, "/api/v2/workers")?;
    let requests = fetch_json(url, "/api/v2/buildrequests?claimed=false")?;
    let mut connected: Vec<String> = workers["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["connected_to"].as_array().is_some_and(|c| !c.is_empty()))
        .filter_map(|w| w["name"].as_str().map(String::from))
        .collect();
    connected.sort();
    let mut pending: std::collections::BTreeMap<String, usize> = Default::default();
    for r in requests["buildrequests"].as_array().into_iter().flatten() {
        let name = r["buildername"].as_str().unwrap_or("?").to_string();
        *pending.entry(name).or_default() += 1;
    }
    let mut lines = vec![format!(
        "{} connected worker(s){}{}",
        connected.len(),
        if connected.is_empty() { "" } else { ": " },
        connected.join(", ")
    )];
    lines.push(format!(
        "{} waiting request(s)",
        pending.values().sum::<usize>()
    ));
    for (b, n) in pending {
        lines.push(format!("  {b}: {n}"));
    }
    Ok(lines.join("\n"))
}

impl Shared {
    fn master(&self) -> Option<String> {
        self.master
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn config(&self) -> Result<Arc<MasterConfig>, Box<rhai::EvalAltResult>> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| "the config did not load; fix it and :reload".into())
    }
}

/// One REPL session over a master dir.
pub struct Session {
    dir: PathBuf,
    limits: Limits,
    state: Arc<LoadState>,
    engine: Arc<Engine>,
    scope: Scope<'static>,
    /// The entry script's imports, run before every line.
    imports: AST,
    /// Functions defined so far (the entry script's, then the lines').
    functions: AST,
    shared: Arc<Shared>,
    /// The config as the session started, for `:diff`.
    started: Option<Arc<MasterConfig>>,
    sources: Sources,
}

/// The outcome of loading: problems are shown, the session still runs.
pub struct Opened {
    pub session: Session,
    pub problems: Vec<Diagnostic>,
}

fn import_lines(text: &str) -> String {
    // Top-level imports only: a line that starts with `import`.
    text.lines()
        .filter(|l| l.trim_start().starts_with("import ") && !l.starts_with(char::is_whitespace))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Session {
    /// Loads `dir/master.rhai` into a new session.
    pub fn open(dir: &Path, limits: Limits) -> Opened {
        let shared = Arc::new(Shared::default());
        let state = LoadState::new(dir, limits.clone());
        let mut engine = script::new_engine(&state);
        register_helpers(&mut engine, &shared);
        let engine = Arc::new(engine);
        let entry = dir.join(ENTRY_SCRIPT);
        let entry_id = crate::diagnostics::canonical(&entry)
            .to_string_lossy()
            .into_owned();
        state.record_file(&entry);
        let mut scope = Scope::new();
        let mut problems = Vec::new();
        let mut imports = AST::empty();
        let mut functions = AST::empty();
        let mut config = None;
        match std::fs::read_to_string(&entry) {
            Err(e) => problems.push(Diagnostic::error(format!(
                "cannot read {}: {e}",
                entry.display()
            ))),
            Ok(text) => {
                state.record_source(&entry_id, &text);
                match engine.compile(&text) {
                    Err(e) => problems.push(script::errors::parse_error(&e, &entry_id)),
                    Ok(mut ast) => {
                        ast.set_source(entry_id.clone());
                        functions = ast.clone_functions_only();
                        if let Ok(mut i) = engine.compile(import_lines(&text)) {
                            i.set_source(entry_id.clone());
                            imports = i;
                        }
                        state.restart_clock();
                        let budget = crate::memory::Budget::enter(limits.max_memory);
                        let value = engine.eval_ast_with_scope::<Dynamic>(&mut scope, &ast);
                        drop(budget);
                        match value {
                            Err(e) => {
                                problems.push(script::errors::diagnose(&e, &entry_id, &limits))
                            }
                            Ok(v) => match script::extract::master_config(v, &state, &entry_id) {
                                Err(mut d) => problems.append(&mut d),
                                Ok(c) => {
                                    let mut invalid = crate::config::validate::validate(&c);
                                    if invalid.is_empty() {
                                        config = Some(Arc::new(c));
                                    } else {
                                        problems.append(&mut invalid);
                                    }
                                }
                            },
                        }
                    }
                }
            }
        }
        let libs = std::iter::once(functions.clone())
            .chain(state.module_functions())
            .collect();
        *shared.runtime.write().unwrap_or_else(|e| e.into_inner()) =
            Some(ScriptRuntime::new(engine.clone(), libs, limits.clone()));
        *shared.config.write().unwrap_or_else(|e| e.into_inner()) = config.clone();
        let mut all = state.warnings();
        all.append(&mut problems);
        let sources = state.sources();
        Opened {
            session: Session {
                dir: dir.to_path_buf(),
                limits,
                state,
                engine,
                scope,
                imports,
                functions,
                shared,
                started: config,
                sources,
            },
            problems: all,
        }
    }

    /// Whether the config loaded (the helpers need it).
    pub fn config(&self) -> Option<Arc<MasterConfig>> {
        self.shared
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Diagnostics as the terminal shows them.
    pub fn render(&self, diags: &[Diagnostic], color: bool) -> String {
        render(diags, &self.sources_with_repl(), color)
    }

    fn sources_with_repl(&self) -> Sources {
        let mut s = self.sources.clone();
        for (id, text) in self.state.sources().iter() {
            s.insert(id.clone(), text.clone());
        }
        s
    }

    /// Evaluates one input (a line, or a block of lines).
    pub fn eval(&mut self, text: &str) -> Result<Dynamic, Vec<Diagnostic>> {
        const ID: &str = "<repl>";
        self.state.record_source(ID, text);
        self.sources.insert(ID.into(), text.into());
        let mut line = self
            .engine
            .compile(text)
            .map_err(|e| vec![script::errors::parse_error(&e, ID)])?;
        line.set_source(ID);
        let program = self.functions.merge(&self.imports).merge(&line);
        INTERRUPT.store(false, Ordering::SeqCst);
        self.state.restart_clock();
        let budget = crate::memory::Budget::enter(self.limits.max_memory);
        let r = self
            .engine
            .eval_ast_with_scope::<Dynamic>(&mut self.scope, &program);
        drop(budget);
        match r {
            Ok(v) => {
                self.functions = self.functions.merge(&line.clone_functions_only());
                Ok(v)
            }
            Err(e) => Err(vec![script::errors::diagnose(&e, ID, &self.limits)]),
        }
    }

    /// A value as the REPL prints it: strings as they are, kiln's values
    /// and everything else through `to_debug`.
    pub fn show(&self, v: &Dynamic) -> String {
        if v.is_unit() {
            return String::new();
        }
        if v.is_string() {
            return v.clone().into_string().unwrap_or_default();
        }
        let mut scope = Scope::new();
        scope.push("__value", v.clone());
        self.engine
            .eval_with_scope::<String>(&mut scope, "to_debug(__value)")
            .unwrap_or_else(|_| v.to_string())
    }

    /// `:reload`: the scripts from disk again. On success the new scope
    /// replaces the old (keeping variables the session defined that the
    /// scripts do not); on failure the old session stays.
    pub fn reload(&mut self) -> Vec<Diagnostic> {
        let Opened {
            mut session,
            problems,
        } = Session::open(&self.dir, self.limits.clone());
        if session.config().is_none() {
            self.sources = session.sources_with_repl();
            return problems;
        }
        let old: Vec<(String, Dynamic)> = self
            .scope
            .iter()
            .map(|(n, _, v)| (n.to_string(), v))
            .collect();
        for (name, value) in old {
            if !session.scope.contains(&name) {
                session.scope.push_dynamic(name, value);
            }
        }
        session.functions = self.functions.merge(&session.functions);
        session.started = self.started.take();
        *session
            .shared
            .master
            .write()
            .unwrap_or_else(|e| e.into_inner()) = self.shared.master();
        *self = session;
        problems
    }

    /// `:diff`: what a reload of the files now would change, against the
    /// config this session started with.
    pub fn diff(&self) -> Result<String, String> {
        if let Some(url) = self.shared.master() {
            let running = fetch_json(&url, "/api/v2/config")?;
            let now = script::load_master(&self.dir, self.limits.clone())
                .map_err(|f| render(&f.diagnostics, &f.sources, false))?;
            let files = serde_json::to_value(&now.config).map_err(|e| e.to_string())?;
            return Ok(format!(
                "against the master at {url}:\n{}",
                ConfigDiff::between_printed(&running["config"], &files)
            ));
        }
        let Some(before) = &self.started else {
            return Err(
                "the config did not load when the session started: nothing to compare".into(),
            );
        };
        match script::load_master(&self.dir, self.limits.clone()) {
            Ok(now) => Ok(ConfigDiff::between(before, &now.config).to_string()),
            Err(f) => Err(render(&f.diagnostics, &f.sources, false)),
        }
    }

    /// Names to complete: variables, functions, module members (after
    /// `alias::`) and map keys (after `value.`).
    pub fn completions(&self, word: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if let Some((path, partial)) = word.rsplit_once("::") {
            for (id, m) in self.state.modules() {
                if !self.imports_alias(path, &id) {
                    continue;
                }
                for (name, _) in m.iter_var() {
                    out.push(format!("{path}::{name}"));
                }
                for sig in m.gen_fn_signatures_with_mapper(std::borrow::Cow::Borrowed) {
                    if let Some(name) = sig.split('(').next() {
                        out.push(format!("{path}::{name}("));
                    }
                }
            }
            out.retain(|c| c[path.len() + 2..].starts_with(partial));
        } else if let Some((path, partial)) = word.rsplit_once('.') {
            if let Some(map) = self.value_at(path).and_then(|v| v.try_cast::<rhai::Map>()) {
                for k in map.keys() {
                    if k.starts_with(partial) {
                        out.push(format!("{path}.{k}"));
                    }
                }
            }
        } else {
            for (name, _, _) in self.scope.iter() {
                out.push(name.to_string());
            }
            for f in self.functions.iter_functions() {
                out.push(format!("{}(", f.name));
            }
            for sig in self.engine.gen_fn_signatures(false) {
                if let Some(name) = sig.split('(').next() {
                    out.push(format!("{name}("));
                }
            }
            for (alias, _) in self.aliases() {
                out.push(format!("{alias}::"));
            }
            out.retain(|c| c.starts_with(word) && !c.starts_with("__"));
        }
        out.sort();
        out.dedup();
        out
    }

    /// `import "path" as alias` pairs of the entry script.
    fn aliases(&self) -> Vec<(String, String)> {
        let text = self
            .sources
            .iter()
            .find(|(id, _)| id.ends_with(ENTRY_SCRIPT) || id.ends_with(".rhai"))
            .map(|(_, t)| t.to_string())
            .unwrap_or_default();
        let entry = crate::diagnostics::canonical(&self.dir.join(ENTRY_SCRIPT))
            .to_string_lossy()
            .into_owned();
        let text = self
            .sources
            .get(&entry)
            .map(|t| t.to_string())
            .unwrap_or(text);
        import_lines(&text)
            .lines()
            .filter_map(|l| {
                let rest = l.trim().strip_prefix("import")?.trim();
                let (path, alias) = rest.split_once(" as ")?;
                Some((
                    alias.trim().trim_end_matches(';').trim().to_string(),
                    path.trim().trim_matches('"').to_string(),
                ))
            })
            .collect()
    }

    fn imports_alias(&self, alias: &str, module_id: &str) -> bool {
        self.aliases().iter().any(|(a, path)| {
            a == alias
                && Path::new(module_id)
                    .file_stem()
                    .is_some_and(|s| Path::new(path).file_stem() == Some(s))
        })
    }

    /// A scope variable, or a key path into one (`c.www`).
    fn value_at(&self, path: &str) -> Option<Dynamic> {
        let mut parts = path.split('.');
        let mut v = self.scope.get_value::<Dynamic>(parts.next()?)?;
        for key in parts {
            v = v.try_cast::<rhai::Map>()?.get(key)?.clone();
        }
        Some(v)
    }
}

/// What `help(name)` knows of kiln's own vocabulary, beyond signatures.
const DOCS: &[(&str, &str)] = &[
    ("HgPoller", "HgPoller(#{hgURL, branch, pollInterval, ...}): polls a Mercurial repository's pushes"),
    ("GitPoller", "GitPoller(#{repourl, branches, pollInterval, ...}): polls a Git repository"),
    ("Scheduler", "Scheduler(#{name, branch, treeStableTimer, builderNames, fileIsImportant, ...}): builds changes on one branch"),
    ("AnyBranchScheduler", "AnyBranchScheduler(#{name, branches, treeStableTimer, builderNames, ...}): builds changes on several branches"),
    ("ForceScheduler", "ForceScheduler(#{name, builderNames}): builds on request (kiln force, the API)"),
    ("Nightly", "Nightly(#{name, branch, hour, minute, builderNames, onlyIfChanged}): builds on a cron schedule"),
    ("Periodic", "Periodic(#{name, periodicBuildTimer, builderNames}): builds every so many seconds"),
    ("Triggerable", "Triggerable(#{name, builderNames}): builds when a Trigger step asks"),
    ("Dependent", "Dependent(#{name, upstream, builderNames}): builds when an upstream buildset succeeds"),
    ("BuilderConfig", "BuilderConfig(#{name, workernames, factory, builddir, ...}): a builder"),
    ("BuildFactory", "BuildFactory(): an empty list of steps; f.addStep(step) appends one"),
    ("ScriptFactory", "ScriptFactory(#{scriptRepo, scriptName, extra_args, ...}): the seed's mozharness build"),
    ("ShellCommand", "ShellCommand(#{command, name, workdir, env, timeout, maxTime, ...}): runs a command on the worker"),
    ("SetProperty", "SetProperty(#{command, property, ...}): sets a property from a command's output"),
    ("Worker", "Worker(name, password, #{max_builds, properties, ...}): a worker that may connect"),
    ("WithProperties", "WithProperties(\"%(prop)s\"): a string rendered with the build's properties"),
    ("Interpolate", "Interpolate(\"%(prop:name)s\"): a string rendered when the step starts"),
    ("generateBranchObjects", "generateBranchObjects(config, name, secrets): the seed's builders, pollers and schedulers of one branch"),
    ("mergeBuildObjects", "mergeBuildObjects(a, b): a's and b's builders, pollers, schedulers and status together"),
    ("load_json", "load_json(path): a JSON file beside the calling script (or in the master dir)"),
    ("secret", "secret(name): the file secrets/NAME, printed as <secret>"),
    ("env_var", "env_var(name): an environment variable, or ()"),
    ("branches", "branches(): the branches the config builds (its builders' categories)"),
    ("builders", "builders() or builders(branch): builder names"),
    ("schedulers", "schedulers(): scheduler names with their kind"),
    ("show", "show(name): a builder, scheduler, change source or worker in full"),
    ("explain", "explain(#{branch, files, who, comments, repository}): which change sources see such a push, which schedulers take it, and which builders get requests"),
    ("help", "help(name): what a function is and how to call it"),
    ("live", "live(): the running master's connected workers and waiting requests per builder (--master URL)"),
];

fn help_text(signatures: &[String], name: &str) -> String {
    let mut out = Vec::new();
    if let Some((_, doc)) = DOCS.iter().find(|(n, _)| *n == name) {
        out.push(doc.to_string());
    }
    let prefix = format!("{name}(");
    let mut sigs: Vec<String> = signatures
        .iter()
        .map(|s| tidy(s))
        .filter(|s| s.starts_with(&prefix) || s.contains(&format!("::{name}(")))
        .collect();
    sigs.sort();
    sigs.dedup();
    out.extend(sigs);
    if out.is_empty() {
        format!("no function named `{name}`; try help(\"builders\"), or Tab to complete a name")
    } else {
        out.join("\n")
    }
}

/// A signature as a script writer reads it: `-> HgPoller`, not the Rust
/// path of a fallible return.
fn tidy(sig: &str) -> String {
    let Some((head, ret)) = sig.split_once(" -> ") else {
        return sig.to_string();
    };
    let ret = ret
        .strip_prefix("core::result::Result<")
        .and_then(|r| r.split(',').next())
        .unwrap_or(ret);
    let ret = ret.rsplit("::").next().unwrap_or(ret);
    format!("{head} -> {ret}")
}

fn array(v: impl IntoIterator<Item = String>) -> rhai::Array {
    v.into_iter().map(Dynamic::from).collect()
}

fn register_helpers(engine: &mut Engine, shared: &Arc<Shared>) {
    let s = shared.clone();
    engine.register_fn(
        "branches",
        move || -> Result<rhai::Array, Box<rhai::EvalAltResult>> {
            let c = s.config()?;
            let mut v: Vec<String> = c
                .builders
                .iter()
                .filter_map(|b| b.category.as_ref().map(|c| c.to_string()))
                .collect();
            if v.is_empty() {
                v = c
                    .change_source
                    .iter()
                    .filter_map(|s| match s {
                        ChangeSource::HgPoller(p) => Some(p.branch.clone()),
                        ChangeSource::GitPoller(p) => p.branches.first().cloned(),
                    })
                    .collect();
            }
            v.sort();
            v.dedup();
            Ok(array(v))
        },
    );
    let s = shared.clone();
    engine.register_fn(
        "builders",
        move || -> Result<rhai::Array, Box<rhai::EvalAltResult>> {
            Ok(array(s.config()?.builders.iter().map(|b| b.name.clone())))
        },
    );
    let s = shared.clone();
    engine.register_fn(
        "builders",
        move |branch: &str| -> Result<rhai::Array, Box<rhai::EvalAltResult>> {
            Ok(array(
                s.config()?
                    .builders
                    .iter()
                    .filter(|b| b.category.as_deref() == Some(branch))
                    .map(|b| b.name.clone()),
            ))
        },
    );
    let s = shared.clone();
    engine.register_fn(
        "schedulers",
        move || -> Result<rhai::Array, Box<rhai::EvalAltResult>> {
            Ok(array(
                s.config()?
                    .schedulers
                    .iter()
                    .map(|x| format!("{} ({})", x.name, x.kind.type_name())),
            ))
        },
    );
    let s = shared.clone();
    engine.register_fn("show", move |name: &str| -> Result<String, Box<rhai::EvalAltResult>> {
        let c = s.config()?;
        let value = if let Some(b) = c.builders.iter().find(|b| b.name == name) {
            serde_json::json!({ "builder": b })
        } else if let Some(x) = c.schedulers.iter().find(|x| x.name == name) {
            serde_json::json!({ "scheduler": x })
        } else if let Some(x) = c.change_source.iter().find(|x| x.name() == name) {
            serde_json::json!({ "change source": x })
        } else if let Some(x) = c.workers.iter().find(|x| x.name == name) {
            serde_json::json!({ "worker": x })
        } else {
            return Err(format!(
                "no builder, scheduler, change source or worker named `{name}`; builders() lists the builders"
            )
            .into());
        };
        Ok(crate::config::print::text_of(&value))
    });
    let s = shared.clone();
    engine.register_fn(
        "live",
        move || -> Result<String, Box<rhai::EvalAltResult>> {
            let url = s
                .master()
                .ok_or("live() reads a running master: start the REPL with --master URL")?;
            live_state(&url).map_err(Into::into)
        },
    );
    let s = shared.clone();
    engine.register_fn(
        "explain",
        move |change: rhai::Map| -> Result<String, Box<rhai::EvalAltResult>> {
            explain(&s, change)
        },
    );
    // Last: help knows every function registered before it.
    let mut signatures = engine.gen_fn_signatures(true);
    signatures.push("help(name: &str) -> String".into());
    engine.register_fn("help", move |name: &str| -> String {
        help_text(&signatures, name)
    });
}

fn explain(shared: &Shared, change: rhai::Map) -> Result<String, Box<rhai::EvalAltResult>> {
    let c = shared.config()?;
    let runtime = shared
        .runtime
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or("the config did not load")?;
    let get = |k: &str| change.get(k).and_then(|v| v.clone().into_string().ok());
    let known = [
        "branch",
        "files",
        "who",
        "comments",
        "repository",
        "project",
    ];
    if let Some(k) = change.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("explain: unknown key `{k}`; it takes {}", known.join(", ")).into());
    }
    let files: Vec<String> = match change.get("files") {
        None => vec![],
        Some(v) => v
            .clone()
            .try_cast::<rhai::Array>()
            .ok_or("explain: `files` must be an array of strings")?
            .into_iter()
            .filter_map(|f| f.into_string().ok())
            .collect(),
    };
    let branch = get("branch").filter(|b| !b.is_empty());
    let mut lines = Vec::new();
    // Change sources: which would see a push like this.
    let mut repository = get("repository");
    lines.push("change sources:".to_string());
    for s in &c.change_source {
        let (sees, repo) = match s {
            ChangeSource::HgPoller(p) => {
                let b = (!p.branch.is_empty()).then(|| p.branch.clone());
                (b == branch, p.repository())
            }
            ChangeSource::GitPoller(p) => (
                branch
                    .as_ref()
                    .is_some_and(|b| p.branches.is_empty() || p.branches.contains(b)),
                p.repourl.clone(),
            ),
        };
        let sees = sees
            && match &repository {
                None => true,
                Some(r) => *r == repo,
            };
        if sees && repository.is_none() {
            repository = Some(repo.clone());
        }
        lines.push(format!(
            "  {} {}",
            if sees { "yes" } else { "no " },
            s.name()
        ));
    }
    let stored = crate::store::Change {
        changeid: 0,
        sourcestampid: 0,
        source: String::new(),
        change: crate::store::NewChange {
            author: get("who").unwrap_or_else(|| "someone".into()),
            comments: get("comments").unwrap_or_default(),
            branch: branch.clone(),
            repository: repository.unwrap_or_default(),
            project: get("project").unwrap_or_default(),
            files,
            ..Default::default()
        },
    };
    lines.push("schedulers:".to_string());
    let mut building: Vec<String> = Vec::new();
    for sched in &c.schedulers {
        use crate::schedulers::Verdict;
        let verdict = crate::schedulers::explain(sched, &stored, &runtime);
        let text = match &verdict {
            Verdict::Builds {
                after_seconds: None,
            } => "yes: builds".to_string(),
            Verdict::Builds {
                after_seconds: Some(s),
            } => format!("yes: builds once the tree is quiet for {s} s"),
            Verdict::Keeps(why) => format!("keeps it: {why}"),
            Verdict::No(why) => format!("no: {why}"),
        };
        lines.push(format!("  {}: {text}", sched.name));
        if matches!(verdict, Verdict::Builds { .. }) {
            building.extend(sched.builder_names.iter().cloned());
        }
    }
    building.sort();
    building.dedup();
    lines.push(format!("builders that get a request: {}", building.len()));
    for b in building {
        lines.push(format!("  {b}"));
    }
    Ok(lines.join("\n"))
}

/// How `kiln repl` was asked to run.
pub struct Options {
    pub dir: PathBuf,
    pub limits: Limits,
    /// `-e EXPR`: evaluate, print, exit.
    pub expr: Option<String>,
    /// `--master URL`: a running master for `live()` and `:diff`.
    pub master: Option<String>,
}

/// Whether `text` is an unfinished block (more brackets opened than
/// closed, outside strings and comments).
pub fn unfinished(text: &str) -> bool {
    let mut depth: i64 = 0;
    let mut chars = text.chars().peekable();
    let mut in_str: Option<char> = None;
    while let Some(ch) = chars.next() {
        if let Some(q) = in_str {
            if ch == '\\' {
                chars.next();
            } else if ch == q {
                in_str = None;
            }
            continue;
        }
        match ch {
            '"' | '`' | '\'' => in_str = Some(ch),
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '{' | '(' | '[' => depth += 1,
            '}' | ')' | ']' => depth -= 1,
            _ => {}
        }
    }
    depth > 0 || in_str == Some('`')
}

/// A REPL command (`:help`, `:reload`, `:diff`, `:quit`) or an input to
/// evaluate; prints what it shows. Returns false to quit, and whether it
/// failed.
fn handle(
    session: &mut Session,
    input: &str,
    color: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> (bool, bool) {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return (true, false);
    }
    if let Some(cmd) = trimmed.strip_prefix(':') {
        let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
        let arg = arg.trim();
        match name {
            "q" | "quit" | "exit" => return (false, false),
            "help" | "h" => {
                let text = if arg.is_empty() {
                    "kiln repl: type Rhai; the config's values are in scope (c, BRANCHES, ...).\n\
                     helpers: branches(), builders(), builders(branch), schedulers(), show(name), \
                     explain(#{branch, files, who, comments}), help(name), live() (with --master URL)\n\
                     commands: :help NAME, :reload, :diff, :quit (or Ctrl-D)"
                        .to_string()
                } else {
                    help_text(&session.engine.gen_fn_signatures(true), arg)
                };
                let _ = writeln!(out, "{text}");
            }
            "reload" | "r" => {
                let problems = session.reload();
                if problems.iter().any(|d| d.is_error()) {
                    let _ = write!(err, "{}", session.render(&problems, color));
                    let _ = writeln!(
                        err,
                        "the reload failed; the session keeps the previous scripts"
                    );
                    return (true, true);
                }
                let n = session.config().map_or(0, |c| c.builders.len());
                let _ = writeln!(out, "reloaded: {n} builders");
            }
            "diff" | "d" => match session.diff() {
                Ok(d) => {
                    let _ = writeln!(out, "{d}");
                }
                Err(e) => {
                    let _ = write!(err, "{e}");
                    return (true, true);
                }
            },
            other => {
                let _ = writeln!(err, "unknown command `:{other}`; :help lists them");
                return (true, true);
            }
        }
        return (true, false);
    }
    match session.eval(input) {
        Ok(v) => {
            let shown = session.show(&v);
            if !shown.is_empty() {
                let _ = writeln!(out, "{shown}");
            }
            (true, false)
        }
        Err(d) => {
            let _ = write!(err, "{}", session.render(&d, color));
            (true, true)
        }
    }
}

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPT.store(true, Ordering::SeqCst);
}

/// `kiln repl`. Returns the process's exit code.
pub fn run(opts: Options) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let Opened {
        mut session,
        problems,
    } = Session::open(&opts.dir, opts.limits.clone());
    *session
        .shared
        .master
        .write()
        .unwrap_or_else(|e| e.into_inner()) =
        opts.master.map(|m| m.trim_end_matches('/').to_string());
    let failed_load = session.config().is_none();
    if !problems.is_empty() {
        eprint!("{}", session.render(&problems, color));
    }
    let mut stdout = std::io::stdout();
    if let Some(expr) = opts.expr {
        if failed_load {
            return Ok(ExitCode::FAILURE);
        }
        let (_, failed) = handle(
            &mut session,
            &expr,
            color,
            &mut stdout,
            &mut std::io::stderr(),
        );
        return Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    if !std::io::stdin().is_terminal() {
        // Piped input: each complete input in turn.
        let mut failed = failed_load;
        let mut pending = String::new();
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            pending.push_str(&line);
            pending.push('\n');
            if unfinished(&pending) {
                continue;
            }
            let (go_on, f) = handle(
                &mut session,
                &pending,
                false,
                &mut stdout,
                &mut std::io::stderr(),
            );
            failed |= f;
            pending.clear();
            if !go_on {
                break;
            }
        }
        if !pending.trim().is_empty() {
            let (_, f) = handle(
                &mut session,
                &pending,
                false,
                &mut stdout,
                &mut std::io::stderr(),
            );
            failed |= f;
        }
        return Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    interactive(session, color)
}

/// The terminal REPL: rustyline with history in the master dir, multi-line
/// input, completion, and Ctrl-C for the line or the evaluation.
fn interactive(session: Session, color: bool) -> anyhow::Result<std::process::ExitCode> {
    use rustyline::error::ReadlineError;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
    let history = session.dir.join(".kiln_repl_history");
    let shared = Arc::new(std::sync::Mutex::new(session));
    let mut rl: rustyline::Editor<ReplHelper, rustyline::history::DefaultHistory> =
        rustyline::Editor::new()?;
    rl.set_helper(Some(ReplHelper {
        session: shared.clone(),
    }));
    let _ = rl.load_history(&history);
    println!(
        "kiln repl in {}: the config's values are in scope; :help for help, Ctrl-D to leave",
        crate::diagnostics::display_pathbuf(&shared.lock().unwrap_or_else(|e| e.into_inner()).dir)
    );
    loop {
        match rl.readline("kiln> ") {
            Ok(line) => {
                let _ = rl.add_history_entry(line.as_str());
                // Ctrl-C while it evaluates stops the evaluation (the line
                // editor may have put its own handler in place).
                // SAFETY: the handler only stores to an atomic.
                unsafe {
                    libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
                }
                let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                let (go_on, _) = handle(
                    &mut s,
                    &line,
                    color,
                    &mut std::io::stdout(),
                    &mut std::io::stderr(),
                );
                if !go_on {
                    break;
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let _ = rl.save_history(&history);
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(rustyline::Helper, rustyline::Highlighter, rustyline::Hinter)]
struct ReplHelper {
    session: Arc<std::sync::Mutex<Session>>,
}

impl rustyline::validate::Validator for ReplHelper {
    fn validate(
        &self,
        ctx: &mut rustyline::validate::ValidationContext,
    ) -> rustyline::Result<rustyline::validate::ValidationResult> {
        use rustyline::validate::ValidationResult;
        Ok(if unfinished(ctx.input()) {
            ValidationResult::Incomplete
        } else {
            ValidationResult::Valid(None)
        })
    }
}

impl rustyline::completion::Completer for ReplHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let before = &line[..pos];
        let start = before
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.' || c == ':'))
            .map_or(0, |i| i + 1);
        let word = &before[start..];
        let s = self.session.lock().unwrap_or_else(|e| e.into_inner());
        Ok((start, s.completions(word)))
    }
}
