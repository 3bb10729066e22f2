//! A REPL session: the master's scripts evaluated with the master's engine,
//! the scope kept between lines, imports re-run before each line, `:reload`
//! and `:diff`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rhai::{Dynamic, Engine, Scope, AST};

use crate::config::diff::ConfigDiff;
use crate::config::MasterConfig;
use crate::diagnostics::{render, Diagnostic, Sources};
use crate::script::{self, Limits, LoadState, ScriptRuntime, ENTRY_SCRIPT, INTERRUPT};

use super::helpers::{fetch_json, register_helpers, Shared};

/// One REPL session over a master dir.
pub struct Session {
    pub(super) dir: PathBuf,
    limits: Limits,
    state: Arc<LoadState>,
    pub(super) engine: Arc<Engine>,
    scope: Scope<'static>,
    /// The entry script's imports, run before every line.
    imports: AST,
    /// Functions defined so far (the entry script's, then the lines').
    functions: AST,
    pub(super) shared: Arc<Shared>,
    /// The config as the session started, for `:diff`.
    started: Option<Arc<MasterConfig>>,
    sources: Sources,
}

/// The outcome of loading: problems are shown, the session still runs.
pub struct Opened {
    pub session: Session,
    pub problems: Vec<Diagnostic>,
}

pub(super) fn import_lines(text: &str) -> String {
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
        *crate::sync::write(&shared.runtime) =
            Some(ScriptRuntime::new(engine.clone(), libs, limits.clone()));
        *crate::sync::write(&shared.config) = config.clone();
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
        crate::sync::read(&self.shared.config).clone()
    }

    /// Diagnostics as the terminal shows them.
    pub fn render(&self, diags: &[Diagnostic], color: bool) -> String {
        render(diags, &self.sources_with_repl(), color)
    }

    pub(super) fn sources_with_repl(&self) -> Sources {
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
        *crate::sync::write(&session.shared.master) = self.shared.master();
        *self = session;
        problems
    }

    /// `:diff`: what a reload of the files now would change, against the
    /// config this session started with.
    pub fn diff(&self) -> Result<String, String> {
        if let Some(url) = self.shared.master() {
            let [running] = fetch_json(&url, ["/api/v2/config"])?;
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
    pub(super) fn aliases(&self) -> Vec<(String, String)> {
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

    pub(super) fn imports_alias(&self, alias: &str, module_id: &str) -> bool {
        self.aliases().iter().any(|(a, path)| {
            a == alias
                && Path::new(module_id)
                    .file_stem()
                    .is_some_and(|s| Path::new(path).file_stem() == Some(s))
        })
    }

    /// A scope variable, or a key path into one (`c.www`).
    pub(super) fn value_at(&self, path: &str) -> Option<Dynamic> {
        let mut parts = path.split('.');
        let mut v = self.scope.get_value::<Dynamic>(parts.next()?)?;
        for key in parts {
            v = v.try_cast::<rhai::Map>()?.get(key)?.clone();
        }
        Some(v)
    }
}
