//! `import "name"`: beside the importing file, then in the master dir, then
//! kiln's embedded stdlib. Each module is evaluated once per load (as Python
//! imports are), every file is recorded, and cycles are reported as such.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rhai::{Engine, EvalAltResult, Module, Position, Scope, Shared};

type SharedModule = Shared<Module>;

use super::kwargs::ScriptError;
use super::{lock, LoadState};
use crate::diagnostics::{canonical, display_path, display_pathbuf};

/// The Rhai modules shipped inside the binary, by import name.
pub const STDLIB: &[(&str, &str)] = &[("dicts", include_str!("../../stdlib/dicts.rhai"))];

/// Source id of a stdlib module, as shown in diagnostics.
pub fn stdlib_id(name: &str) -> String {
    format!("<stdlib>/{name}.rhai")
}

#[derive(Default)]
pub struct ModuleCache {
    done: Mutex<HashMap<String, SharedModule>>,
    /// Modules being evaluated, outermost first, for cycle detection.
    stack: Mutex<Vec<String>>,
    count: Mutex<usize>,
    /// The functions of every module evaluated, in load order: a closure
    /// written in a module is called against its module's functions.
    functions: Mutex<Vec<rhai::AST>>,
}

impl ModuleCache {
    pub fn done(&self) -> Vec<(String, SharedModule)> {
        crate::sync::lock(&self.done)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn functions(&self) -> Vec<rhai::AST> {
        crate::sync::lock(&self.functions).clone()
    }
}

pub struct KilnResolver {
    state: Arc<LoadState>,
}

impl KilnResolver {
    pub fn new(state: Arc<LoadState>) -> Self {
        KilnResolver { state }
    }

    fn candidates(&self, importer: Option<&str>, path: &str) -> Vec<PathBuf> {
        let file = if path.ends_with(".rhai") {
            path.to_string()
        } else {
            format!("{path}.rhai")
        };
        let mut out = Vec::new();
        if let Some(dir) = importer
            .filter(|s| !s.starts_with("<stdlib>"))
            .and_then(|s| Path::new(s).parent())
        {
            out.push(dir.join(&file));
        }
        let in_master = self.state.master_dir.join(&file);
        if !out.contains(&in_master) {
            out.push(in_master);
        }
        out
    }

    fn evaluate(
        &self,
        engine: &Engine,
        id: &str,
        text: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        let cache = &self.state.modules;
        if let Some(m) = lock(&cache.done).get(id) {
            return Ok(m.clone());
        }
        {
            let stack = lock(&cache.stack);
            if let Some(start) = stack.iter().position(|s| s == id) {
                let chain: Vec<String> = stack[start..]
                    .iter()
                    .chain(std::iter::once(&id.to_string()))
                    .map(|s| display_path(s))
                    .collect();
                return Err(ScriptError::new(format!("import cycle: {}", chain.join(" → ")))
                    .help("modules may not import each other in a circle; move what both need into a third module")
                    .into_err_at(pos));
            }
        }
        {
            let mut count = lock(&cache.count);
            *count += 1;
            if *count > self.state.limits.max_modules {
                return Err(ScriptError::new(format!(
                    "too many modules: the limit is {}",
                    self.state.limits.max_modules
                ))
                .into_err_at(pos));
            }
        }
        let mut ast = engine
            .compile(text)
            .map_err(|e| Box::new(EvalAltResult::ErrorInModule(id.to_string(), e.into(), pos)))?;
        ast.set_source(id.to_string());
        lock(&cache.stack).push(id.to_string());
        let result = Module::eval_ast_as_new(Scope::new(), &ast, engine);
        lock(&cache.stack).pop();
        let mut module =
            result.map_err(|e| Box::new(EvalAltResult::ErrorInModule(id.to_string(), e, pos)))?;
        module.set_id(id.to_string());
        lock(&cache.functions).push(ast.clone_functions_only());
        let module: SharedModule = module.into();
        lock(&cache.done).insert(id.to_string(), module.clone());
        Ok(module)
    }
}

impl ScriptError {
    pub fn into_err_at(self, pos: Position) -> Box<EvalAltResult> {
        EvalAltResult::ErrorRuntime(rhai::Dynamic::from(self), pos).into()
    }
}

impl rhai::ModuleResolver for KilnResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        let candidates = self.candidates(source, path);
        for file in &candidates {
            // Record even what is missing: creating it later changes the import.
            self.state.record_file(file);
            if file.is_file() {
                let id = canonical(file).to_string_lossy().into_owned();
                let text = std::fs::read_to_string(file).map_err(|e| {
                    ScriptError::new(format!("cannot read module {}: {e}", display_pathbuf(file)))
                        .into_err_at(pos)
                })?;
                self.state.record_source(&id, &text);
                return self.evaluate(engine, &id, &text, pos);
            }
        }
        let bare = path.trim_end_matches(".rhai");
        if let Some((name, text)) = STDLIB.iter().find(|(name, _)| *name == bare) {
            let id = stdlib_id(name);
            self.state.record_source(&id, text);
            return self.evaluate(engine, &id, text, pos);
        }
        let looked: Vec<String> = candidates.iter().map(|p| display_pathbuf(p)).collect();
        let names: Vec<&str> = STDLIB.iter().map(|(n, _)| *n).collect();
        Err(ScriptError::new(format!("module `{path}` not found"))
            .help(format!(
                "looked for {} and in kiln's stdlib ({})",
                looked.join(", "),
                names.join(", ")
            ))
            .into_err_at(pos))
    }
}
