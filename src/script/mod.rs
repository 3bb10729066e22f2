//! The Rhai host: one engine setup for the master, `checkconfig`,
//! `print-config`, the REPL and reload.
//!
//! [`load_master`] evaluates `DIR/master.rhai` with kiln's vocabulary, a
//! module resolver that looks beside the importing file, then in the master
//! dir, then in kiln's embedded `stdlib/`, and limits that stop runaway
//! scripts. It returns the typed [`MasterConfig`] together with every file
//! it read (for the reload watcher) or diagnostics that say what is wrong.

pub(crate) mod errors;
pub(crate) mod extract;
mod host;
pub use host::SECRETS_DIR;
pub mod kwargs;
mod mozilla;
mod resolver;
mod vocab;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rhai::{Dynamic, Engine, Scope, AST};

use crate::config::{validate, Arg, LogEval, MasterConfig, Step};
use crate::diagnostics::{canonical, display_pathbuf, Diagnostic, Sources};

pub use mozilla::normalize_name;

/// Name of the entry script in a master dir.
pub const ENTRY_SCRIPT: &str = "master.rhai";

/// Bounds on what a script may do; see ARCHITECTURE.md.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_operations: u64,
    pub max_call_levels: usize,
    pub max_expr_depth: usize,
    /// Heap bytes one evaluation may hold (see `crate::memory`).
    pub max_memory: usize,
    pub max_modules: usize,
    /// Wall-clock bound on one evaluation, checked as operations run.
    pub max_duration: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 500_000_000,
            max_call_levels: 64,
            max_expr_depth: 128,
            max_memory: 512 << 20,
            max_modules: 256,
            max_duration: Duration::from_secs(60),
        }
    }
}

/// What one evaluation of the master's scripts records as it goes.
pub struct LoadState {
    pub master_dir: PathBuf,
    pub limits: Limits,
    files: Mutex<BTreeSet<PathBuf>>,
    sources: Mutex<Sources>,
    warnings: Mutex<Warnings>,
    started: Mutex<Instant>,
    modules: resolver::ModuleCache,
    /// Steps ScriptFactory made, by name, to be shared by the factories
    /// that make them alike.
    steps: Mutex<ahash::AHashMap<rhai::ImmutableString, Kept<Step>>>,
    /// The environments and log evaluations ScriptFactory gives its
    /// scripts, as `steps`.
    envs: Mutex<Kept<std::collections::BTreeMap<String, Arg>>>,
    log_evals: Mutex<Kept<LogEval>>,
    /// Builders' property names and string values, each held once.
    strings: Mutex<ahash::AHashSet<rhai::ImmutableString>>,
    /// Builders' worker pools and tags, as `steps`.
    pools: Mutex<Kept<[rhai::ImmutableString]>>,
    tags: Mutex<Kept<[rhai::ImmutableString]>>,
}

/// What a load makes alike many times, kept once: at most a few variants,
/// so that a value made different every time costs a short look. `T` may
/// be a slice, kept from the `Vec` given.
struct Kept<T: ?Sized>(Vec<Arc<T>>);

impl<T: ?Sized> Default for Kept<T> {
    fn default() -> Self {
        Kept(Vec::new())
    }
}

impl<T: ?Sized + PartialEq> Kept<T> {
    const VARIANTS: usize = 8;

    fn share<V: std::borrow::Borrow<T> + Into<Arc<T>>>(&mut self, value: V) -> Arc<T> {
        if let Some(v) = self.0.iter().find(|v| ***v == *value.borrow()) {
            return v.clone();
        }
        let value: Arc<T> = value.into();
        if self.0.len() < Self::VARIANTS {
            self.0.push(value.clone());
        }
        value
    }
}

use crate::sync::lock;

/// The warnings of a load, each message once, with how often it was said.
#[derive(Default)]
struct Warnings {
    list: Vec<Diagnostic>,
    counts: Vec<usize>,
    seen: std::collections::HashMap<String, usize>,
}

impl LoadState {
    pub fn new(master_dir: &Path, limits: Limits) -> Arc<Self> {
        Arc::new(LoadState {
            master_dir: canonical(master_dir),
            limits,
            files: Mutex::default(),
            sources: Mutex::default(),
            warnings: Mutex::default(),
            started: Mutex::new(Instant::now()),
            modules: resolver::ModuleCache::default(),
            steps: Mutex::default(),
            envs: Mutex::default(),
            log_evals: Mutex::default(),
            strings: Mutex::default(),
            pools: Mutex::default(),
            tags: Mutex::default(),
        })
    }

    /// `step`, or an equal step made earlier in this load: the seed's
    /// ScriptFactory makes the same five of its six steps for every branch
    /// and platform, and thousands of builders then hold one copy of them.
    /// At most a few variants of each step name are kept, so that a step
    /// made different every time (the script's own command line) costs a
    /// short look and no memory.
    pub fn share_step(&self, step: Step) -> Arc<Step> {
        lock(&self.steps)
            .entry(step.name.clone())
            .or_default()
            .share(step)
    }

    /// A step's environment, shared as [`Self::share_step`] shares steps
    /// (the seed's `run_script` differs per branch; its environment not).
    pub fn share_env(
        &self,
        env: std::collections::BTreeMap<String, Arg>,
    ) -> Arc<std::collections::BTreeMap<String, Arg>> {
        lock(&self.envs).share(env)
    }

    /// A step's log evaluation, shared likewise.
    pub fn share_log_eval(&self, log_eval: LogEval) -> Arc<LogEval> {
        lock(&self.log_evals).share(log_eval)
    }

    /// A builder's worker pool, the same list as an equal pool given to
    /// another builder (the seed gives a platform's pool to each branch's
    /// builder); at most a few distinct pools are kept for this.
    pub fn share_workers(&self, names: Vec<rhai::ImmutableString>) -> Arc<[rhai::ImmutableString]> {
        lock(&self.pools).share(names)
    }

    /// A builder's tags, shared as [`Self::share_workers`] shares pools.
    pub fn share_tags(&self, tags: Vec<rhai::ImmutableString>) -> Arc<[rhai::ImmutableString]> {
        lock(&self.tags).share(tags)
    }

    /// `s` as a string shared with every equal one this load gives its
    /// builders (property names and values, step names, a command's
    /// literal arguments): thousands of builders made the seed's way hold
    /// the same few.
    pub fn shared_str(&self, s: &str) -> rhai::ImmutableString {
        let mut strings = lock(&self.strings);
        if let Some(v) = strings.get(s) {
            return v.clone();
        }
        let v = rhai::ImmutableString::from(s);
        strings.insert(v.clone());
        v
    }

    /// A JSON property value, a string one shared as [`Self::shared_str`]
    /// shares it.
    pub fn prop_value(&self, v: crate::config::Value) -> crate::config::PropValue {
        use crate::config::{PropValue, Value};
        match v {
            Value::String(s) => PropValue::Str(self.shared_str(&s)),
            v => PropValue::Json(Box::new(v)),
        }
    }

    /// Records a file that was read (or looked for), with every symlink on
    /// the way to it, so that reload can watch them all.
    pub fn record_file(&self, path: &Path) {
        let mut files = lock(&self.files);
        let mut p = path.to_path_buf();
        for _ in 0..40 {
            files.insert(absolute(&p));
            match std::fs::read_link(&p) {
                Ok(target) => {
                    p = match p.parent() {
                        Some(dir) => dir.join(target),
                        None => target,
                    }
                }
                Err(_) => break,
            }
        }
        files.insert(canonical(path));
    }

    pub fn record_source(&self, id: &str, text: &str) {
        lock(&self.sources).insert(id.into(), text.into());
    }

    /// Records a warning. One said again (the same message: a legacy key
    /// in each of 5,000 platforms, say) is kept once, at its first place,
    /// and counted.
    pub fn warn(&self, d: Diagnostic) {
        let mut w = lock(&self.warnings);
        let w = &mut *w;
        match w.seen.get(&d.message) {
            Some(&i) => w.counts[i] += 1,
            None => {
                w.seen.insert(d.message.clone(), w.list.len());
                w.list.push(d);
                w.counts.push(1);
            }
        }
    }

    pub fn files(&self) -> Vec<PathBuf> {
        lock(&self.files).iter().cloned().collect()
    }

    pub fn sources(&self) -> Sources {
        lock(&self.sources).clone()
    }

    /// The warnings, each once; one said more than once says how often.
    pub fn warnings(&self) -> Vec<Diagnostic> {
        let w = lock(&self.warnings);
        w.list
            .iter()
            .zip(&w.counts)
            .map(|(d, &n)| {
                let mut d = d.clone();
                if n > 1 {
                    d.message = format!("{} ({n} times; the first is shown)", d.message);
                }
                d
            })
            .collect()
    }

    /// The functions of every module evaluated so far.
    pub fn module_functions(&self) -> Vec<AST> {
        self.modules.functions()
    }

    /// The modules evaluated so far, by id (the REPL completes their members).
    pub fn modules(&self) -> Vec<(String, rhai::Shared<rhai::Module>)> {
        self.modules.done()
    }

    /// Restarts the wall-clock bound (each REPL line is its own evaluation).
    pub fn restart_clock(&self) {
        *lock(&self.started) = Instant::now();
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// The message of a script error, without position: kiln's own payload, or
/// Rhai's text.
pub fn error_text(e: &rhai::EvalAltResult) -> String {
    match e {
        rhai::EvalAltResult::ErrorRuntime(v, _) if v.is::<kwargs::ScriptError>() => {
            v.clone().cast::<kwargs::ScriptError>().to_string()
        }
        other => other.to_string(),
    }
}

/// What a script that went over its memory budget is told.
pub(crate) fn memory_message(limit: usize) -> String {
    format!(
        "the script used more than {} MiB of memory (the memory limit)",
        limit >> 20
    )
}

/// Builds the engine every kiln evaluation uses. Evaluations are bounded in
/// memory only inside a [`crate::memory::Budget`] of `limits.max_memory`.
pub fn new_engine(state: &Arc<LoadState>) -> Engine {
    let mut engine = Engine::new();
    let l = &state.limits;
    engine
        .set_max_operations(l.max_operations)
        .set_max_call_levels(l.max_call_levels)
        .set_max_expr_depths(l.max_expr_depth, l.max_expr_depth)
        .set_max_modules(l.max_modules)
        // Rhai's string interner evicts by scanning its whole cache each
        // time it is over capacity: with a config's thousands of distinct
        // names that scan was 5% of a 5000-builder checkconfig.
        .set_max_strings_interned(0);
    // No Rhai size limits: they re-measure containers after each change
    // (quadratic in a config's size). Memory is bounded by `max_memory`,
    // checked below between operations and by `host` in the few built-ins
    // that can allocate a lot in one call.
    // No code from strings: everything a config runs is in a file we watch.
    engine.disable_symbol("eval");

    let st = state.clone();
    engine.on_progress(move |ops| {
        if let Some(limit) = crate::memory::over_budget() {
            return Some(Dynamic::from(memory_message(limit)));
        }
        if ops % 4096 == 0 {
            if INTERRUPT.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Some(Dynamic::from("interrupted (Ctrl-C)".to_string()));
            }
            if let Some((deadline, secs)) = CALL_DEADLINE.with(std::cell::Cell::get) {
                if Instant::now() > deadline {
                    return Some(Dynamic::from(format!(
                        "the function ran for more than {secs} s (the time limit for a callback); is there an endless loop?"
                    )));
                }
                return None;
            }
        }
        if ops % 65_536 == 0 && lock(&st.started).elapsed() > st.limits.max_duration {
            return Some(Dynamic::from(format!(
                "the script ran for more than {} s (the time limit); is there an endless loop?",
                st.limits.max_duration.as_secs()
            )));
        }
        None
    });
    engine.on_print(|s| tracing::info!(target: "kiln::script", "{s}"));
    engine.on_debug(|s, src, pos| {
        let src = src
            .map(|s| display_pathbuf(Path::new(s)))
            .unwrap_or_default();
        tracing::info!(target: "kiln::script", "{src}:{pos}: {s}")
    });
    engine.set_module_resolver(resolver::KilnResolver::new(state.clone()));
    host::register(&mut engine, state);
    vocab::register(&mut engine, state);
    mozilla::register(&mut engine, state);
    engine
}

/// Set (by the REPL's Ctrl-C) to stop the evaluation running now. Shared
/// (an `Arc`) so that a signal handler can hold it.
pub static INTERRUPT: std::sync::LazyLock<Arc<std::sync::atomic::AtomicBool>> =
    std::sync::LazyLock::new(Default::default);

thread_local! {
    /// While a callback runs on this thread: when it must be done, and the
    /// limit in seconds (for the message).
    static CALL_DEADLINE: std::cell::Cell<Option<(Instant, u64)>> = const { std::cell::Cell::new(None) };
}

/// Runs a config's callbacks (`fileIsImportant`, `doStepIf`, ...) against
/// the engine and script they were written in, each call bounded in
/// operations, memory and time.
#[derive(Clone)]
pub struct ScriptRuntime {
    engine: Arc<Engine>,
    /// The functions of the entry script, then of each module: a function
    /// pointer is called against the first that defines its function.
    /// (Rhai resolves a pointer only in the AST it is called with, and a
    /// closure written in a module lives in that module's.)
    libs: Arc<Vec<AST>>,
    limits: Limits,
}

/// How long one callback may run.
pub const CALLBACK_TIME_LIMIT: Duration = Duration::from_secs(10);

impl ScriptRuntime {
    pub fn new(engine: Arc<Engine>, libs: Vec<AST>, limits: Limits) -> ScriptRuntime {
        ScriptRuntime {
            engine,
            libs: Arc::new(libs),
            limits,
        }
    }

    /// Calls `cb` with `args`. An error is a message naming the callback,
    /// where it was written, and where it failed.
    pub fn call(
        &self,
        cb: &crate::config::Callback,
        args: impl rhai::FuncArgs,
    ) -> Result<Dynamic, String> {
        let _budget = crate::memory::Budget::enter(self.limits.max_memory);
        let secs = CALLBACK_TIME_LIMIT.as_secs();
        let outer =
            CALL_DEADLINE.with(|d| d.replace(Some((Instant::now() + CALLBACK_TIME_LIMIT, secs))));
        let name = cb.fn_ptr.fn_name();
        let lib = self
            .libs
            .iter()
            .find(|ast| ast.iter_functions().any(|f| f.name == name))
            .or_else(|| self.libs.first());
        let empty = AST::empty();
        let r = cb
            .fn_ptr
            .call::<Dynamic>(&self.engine, lib.unwrap_or(&empty), args);
        CALL_DEADLINE.with(|d| d.set(outer));
        r.map_err(|e| {
            let entry = cb
                .origin
                .as_ref()
                .map(|o| o.file.to_string())
                .unwrap_or_default();
            let d = errors::diagnose(&e, &entry, &self.limits);
            let at = d
                .location
                .map(|l| {
                    format!(
                        " at {}:{}:{}",
                        crate::diagnostics::display_path(&l.file),
                        l.line,
                        l.column
                    )
                })
                .unwrap_or_default();
            format!("{} failed{at}: {}", cb.describe(), d.message)
        })
    }
}

/// A successfully loaded master config and what it was made from.
pub struct Loaded {
    pub config: MasterConfig,
    /// Every file the load read or looked for, symlinks and their targets.
    pub files: Vec<PathBuf>,
    pub warnings: Vec<Diagnostic>,
    pub sources: Sources,
    /// The engine and functions the config's callbacks belong to.
    pub engine: Arc<Engine>,
    pub libs: Arc<Vec<AST>>,
    pub limits: Limits,
}

impl Loaded {
    pub fn runtime(&self) -> ScriptRuntime {
        ScriptRuntime {
            engine: self.engine.clone(),
            libs: self.libs.clone(),
            limits: self.limits.clone(),
        }
    }
}

/// A load that failed, with everything needed to show why and to watch for
/// the fix.
pub struct LoadFailure {
    pub diagnostics: Vec<Diagnostic>,
    pub files: Vec<PathBuf>,
    pub sources: Sources,
}

impl std::fmt::Debug for LoadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for d in &self.diagnostics {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Gives a place to diagnostics that have none (problems in plain maps,
/// which carry no position): where their key is first written in the
/// loaded scripts, the entry script first.
fn locate_all(state: &LoadState, entry: &str, diags: &mut [Diagnostic]) {
    let sources = state.sources();
    let mut files: Vec<String> = vec![entry.to_string()];
    files.extend(
        state
            .files()
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|f| f.ends_with(".rhai") && f != entry),
    );
    for d in diags.iter_mut().filter(|d| d.location.is_none()) {
        let Some(word) = d.focus.clone() else {
            continue;
        };
        d.location = files.iter().find_map(|file| {
            let text = sources.get(file)?;
            text.lines().enumerate().find_map(|(i, line)| {
                let col = crate::diagnostics::find_word(line, &word)?;
                Some(crate::diagnostics::Location {
                    file: file.as_str().into(),
                    line: i + 1,
                    column: line[..col].chars().count() + 1,
                })
            })
        });
    }
}

/// When the entry script ends with a bare variable (`c`, as masters do),
/// the script without that last statement, the variable's name and its
/// position.
fn returned_variable(ast: &AST) -> Option<(AST, rhai::ImmutableString, rhai::Position)> {
    use rhai::{Expr, Stmt};
    let (last, head) = ast.statements().split_last()?;
    let Stmt::Expr(expr) = last else { return None };
    let Expr::Variable(var, _, pos) = &**expr else {
        return None;
    };
    if !var.2.is_empty() {
        return None; // a module's variable (`m::c`), not the scope's
    }
    let mut head = AST::new(head.to_vec(), ast.shared_lib().clone());
    if let Some(source) = ast.source() {
        head.set_source(source.to_string());
    }
    Some((head, var.1.clone(), *pos))
}

/// Loads, evaluates and validates `DIR/master.rhai`.
pub fn load_master(dir: &Path, limits: Limits) -> Result<Loaded, LoadFailure> {
    let state = LoadState::new(dir, limits);
    let entry = dir.join(ENTRY_SCRIPT);
    let entry_id = canonical(&entry).to_string_lossy().into_owned();
    let fail = |state: &LoadState, mut diags: Vec<Diagnostic>| {
        let mut all = state.warnings();
        all.append(&mut diags);
        locate_all(state, &entry_id, &mut all);
        LoadFailure {
            diagnostics: all,
            files: state.files(),
            sources: state.sources(),
        }
    };
    state.record_file(&entry);
    let text = match std::fs::read_to_string(&entry) {
        Ok(t) => t,
        Err(e) => {
            let msg = if e.kind() == std::io::ErrorKind::NotFound {
                format!("no {ENTRY_SCRIPT} in {}", display_pathbuf(dir))
            } else {
                format!("cannot read {}: {e}", display_pathbuf(&entry))
            };
            let help = Some(format!(
                "a master dir holds {ENTRY_SCRIPT}, the entry script; `kiln create-master DIR` writes one"
            ));
            return Err(fail(&state, vec![Diagnostic::error(msg).with_help(help)]));
        }
    };
    state.record_source(&entry_id, &text);
    let engine = new_engine(&state);

    let mut ast = match engine.compile(&text) {
        Ok(ast) => ast,
        Err(e) => return Err(fail(&state, vec![errors::parse_error(&e, &entry_id)])),
    };
    ast.set_source(entry_id.clone());
    state.restart_clock();
    let budget = crate::memory::Budget::enter(state.limits.max_memory);
    let mut scope = Scope::new();
    let value = match returned_variable(&ast) {
        // `c` at the end of the script would copy the whole config (Rhai
        // returns a clone of the variable, and the scope's copy lives
        // until the evaluation ends), doubling the peak. Run everything
        // before it and take the variable's value out of the scope.
        Some((head, name, pos)) => engine
            .eval_ast_with_scope::<Dynamic>(&mut scope, &head)
            .and_then(|_| {
                scope.remove::<Dynamic>(&name).ok_or_else(|| {
                    Box::new(rhai::EvalAltResult::ErrorVariableNotFound(
                        name.to_string(),
                        pos,
                    ))
                })
            }),
        None => engine.eval_ast_with_scope::<Dynamic>(&mut scope, &ast),
    };
    drop(scope);
    drop(budget);
    let value = match value {
        Ok(v) => v,
        Err(e) => {
            return Err(fail(
                &state,
                vec![errors::diagnose(&e, &entry_id, &state.limits)],
            ))
        }
    };
    let config = match extract::master_config(value, &state, &entry_id) {
        Ok(c) => c,
        Err(diags) => return Err(fail(&state, diags)),
    };
    let problems = validate::validate(&config);
    if !problems.is_empty() {
        return Err(fail(&state, problems));
    }
    let mut warnings = state.warnings();
    locate_all(&state, &entry_id, &mut warnings);
    Ok(Loaded {
        config,
        files: state.files(),
        warnings,
        sources: state.sources(),
        engine: Arc::new(engine),
        libs: Arc::new(
            std::iter::once(ast.clone_functions_only())
                .chain(state.modules.functions())
                .collect(),
        ),
        limits: state.limits.clone(),
    })
}
