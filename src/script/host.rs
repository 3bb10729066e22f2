//! The only ways a script reaches outside itself: `load_json(path)`,
//! `secret(name)` and `env_var(name)`. Each file read is recorded.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{Array, Blob, Dynamic, Engine, ImmutableString, NativeCallContext, INT};

use super::kwargs::{ScriptError, ScriptResult};
use super::LoadState;
use crate::config::{Results, Secret};
use crate::diagnostics::{canonical, display_pathbuf, Location};

/// Directory (inside the master dir) that `secret(name)` reads from, one
/// file per secret, as Buildbot's `SecretInAFile`.
pub const SECRETS_DIR: &str = "secrets";

/// Where `load_json(path)` looks: beside the calling script, then in the
/// master dir (the same rule as `import`), so a script in a config
/// repository can read the master's own `master_config.json`.
fn json_candidates(ctx: &NativeCallContext, state: &LoadState, path: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = ctx
        .call_source()
        .filter(|s| !s.starts_with("<stdlib>"))
        .and_then(|s| Path::new(s).parent())
    {
        out.push(dir.join(path));
    }
    let in_master = state.master_dir.join(path);
    if !out.contains(&in_master) {
        out.push(in_master);
    }
    out
}

pub fn register(engine: &mut Engine, state: &Arc<LoadState>) {
    let st = state.clone();
    engine.register_fn(
        "load_json",
        move |ctx: NativeCallContext, path: &str| -> ScriptResult<Dynamic> {
            let candidates = json_candidates(&ctx, &st, path);
            candidates.iter().for_each(|f| st.record_file(f));
            let file = match candidates.iter().find(|f| f.is_file()) {
                Some(f) => f.clone(),
                None => candidates[0].clone(),
            };
            let text = std::fs::read_to_string(&file).map_err(|e| {
                ScriptError::new(format!(
                    "load_json: cannot read {}: {e}",
                    display_pathbuf(&file)
                ))
                .into_err()
            })?;
            let id = canonical(&file).to_string_lossy().into_owned();
            st.record_source(&id, &text);
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                let mut err =
                    ScriptError::new(format!("malformed JSON in {}: {e}", display_pathbuf(&file)));
                err.message = err
                    .message
                    .trim_end_matches(&format!(" at line {} column {}", e.line(), e.column()))
                    .to_string();
                err.location = Some(Location {
                    file: id.as_str().into(),
                    line: e.line(),
                    column: e.column().max(1),
                });
                err.via = Some("loaded here".into());
                err.into_err()
            })?;
            rhai::serde::to_dynamic(&value)
        },
    );

    let st = state.clone();
    engine.register_fn("secret", move |name: &str| -> ScriptResult<Secret> {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(ScriptError::new(format!(
                "secret name `{name}` must be a plain file name"
            ))
            .into_err());
        }
        let file = st.master_dir.join(SECRETS_DIR).join(name);
        st.record_file(&file);
        match std::fs::read_to_string(&file) {
            Ok(v) => Ok(Secret::named(name, v.trim_end_matches(['\n', '\r']))),
            Err(e) => Err(ScriptError::new(format!("secret `{name}` not found: {e}"))
                .help(format!(
                    "secrets are files in {}; create {}",
                    display_pathbuf(&st.master_dir.join(SECRETS_DIR)),
                    display_pathbuf(&file)
                ))
                .into_err()),
        }
    });

    engine.register_fn("env_var", |name: &str| -> Dynamic {
        std::env::var(name).map_or(Dynamic::UNIT, Dynamic::from)
    });

    // Buildbot's result constants, readable everywhere (also inside functions).
    // `on_var` is marked volatile, not deprecated, by Rhai.
    #[allow(deprecated)]
    engine.on_var(|name, _, _| {
        let first = name.as_bytes().first().copied().unwrap_or(b'a');
        if first.is_ascii_uppercase() {
            if let Some(r) = Results::ALL.iter().find(|r| r.name() == name) {
                return Ok(Some(Dynamic::from(*r as i64).into_read_only()));
            }
        }
        Ok(None)
    });

    register_bounded_builtins(engine);
}

/// Fails when `bytes` more would take the evaluation over its memory budget.
fn reserve(bytes: usize) -> ScriptResult<()> {
    match crate::memory::would_exceed(bytes) {
        Some(limit) => Err(ScriptError::new(super::memory_message(limit)).into_err()),
        None => Ok(()),
    }
}

/// A rough lower bound of the heap one copy of `v` takes.
fn approx_size(v: &Dynamic) -> usize {
    const SLOT: usize = std::mem::size_of::<Dynamic>();
    if let Some(a) = v.read_lock::<Array>() {
        SLOT + a.len() * SLOT
    } else if let Some(m) = v.read_lock::<rhai::Map>() {
        SLOT + m.len() * 4 * SLOT
    } else if let Some(b) = v.read_lock::<Blob>() {
        SLOT + b.len()
    } else {
        SLOT
    }
}

fn pad_len(len: INT, have: usize) -> Option<usize> {
    usize::try_from(len)
        .ok()
        .filter(|&l| l > have)
        .map(|l| l - have)
}

/// The built-ins that can allocate a lot in a single call (`pad`, `blob`),
/// with the same results as Rhai's own but checked against the memory
/// budget first. Every other growth happens one operation at a time, and
/// the engine's progress check stops it.
fn register_bounded_builtins(engine: &mut Engine) {
    engine.register_fn(
        "pad",
        |array: &mut Array, len: INT, item: Dynamic| -> ScriptResult<()> {
            if let Some(more) = pad_len(len, array.len()) {
                reserve(more.saturating_mul(approx_size(&item)))?;
                array.resize(array.len() + more, item);
            }
            Ok(())
        },
    );
    engine.register_fn(
        "pad",
        |string: &mut ImmutableString, len: INT, ch: char| -> ScriptResult<()> {
            if let Some(more) = pad_len(len, string.chars().count()) {
                reserve(more.saturating_mul(ch.len_utf8()))?;
                string.make_mut().extend(std::iter::repeat(ch).take(more));
            }
            Ok(())
        },
    );
    engine.register_fn(
        "pad",
        |string: &mut ImmutableString, len: INT, padding: &str| -> ScriptResult<()> {
            if padding.is_empty() {
                return Ok(());
            }
            if let Some(more) = pad_len(len, string.chars().count()) {
                reserve(more.saturating_mul(4))?;
                string.make_mut().extend(padding.chars().cycle().take(more));
            }
            Ok(())
        },
    );
    fn byte(value: INT) -> u8 {
        (value & 0xff) as u8
    }
    engine.register_fn(
        "pad",
        |blob: &mut Blob, len: INT, value: INT| -> ScriptResult<()> {
            if let Some(more) = pad_len(len, blob.len()) {
                reserve(more)?;
                blob.resize(blob.len() + more, byte(value));
            }
            Ok(())
        },
    );
    fn new_blob(len: INT, value: INT) -> ScriptResult<Blob> {
        let len = pad_len(len, 0).unwrap_or(0);
        reserve(len)?;
        Ok(vec![byte(value); len])
    }
    engine.register_fn("blob", |len: INT| new_blob(len, 0));
    engine.register_fn("blob", new_blob);
}
