//! The only ways a script reaches outside itself: `load_json(path)`,
//! `secret(name)` and `env_var(name)`. Each file read is recorded.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{Dynamic, Engine, NativeCallContext};

use super::kwargs::{ScriptError, ScriptResult};
use super::LoadState;
use crate::config::{Results, Secret};
use crate::diagnostics::{canonical, display_pathbuf, Location};

/// Directory (inside the master dir) that `secret(name)` reads from, one
/// file per secret, as Buildbot's `SecretInAFile`.
pub const SECRETS_DIR: &str = "secrets";

fn caller_dir(ctx: &NativeCallContext, state: &LoadState) -> PathBuf {
    ctx.call_source()
        .filter(|s| !s.starts_with("<stdlib>"))
        .and_then(|s| Path::new(s).parent().map(Path::to_path_buf))
        .unwrap_or_else(|| state.master_dir.clone())
}

pub fn register(engine: &mut Engine, state: &Arc<LoadState>) {
    let st = state.clone();
    engine.register_fn(
        "load_json",
        move |ctx: NativeCallContext, path: &str| -> ScriptResult<Dynamic> {
            let file = caller_dir(&ctx, &st).join(path);
            st.record_file(&file);
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
}
