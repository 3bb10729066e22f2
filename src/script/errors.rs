//! Rhai errors as kiln diagnostics: the innermost position, the file it is
//! in, and the chain of imports and calls that led there.

use rhai::{EvalAltResult, ParseError, Position};

use super::kwargs::ScriptError;
use super::Limits;
use crate::diagnostics::{Diagnostic, Location, TraceFrame};

fn location(file: &str, pos: Position) -> Option<Location> {
    Some(Location {
        file: file.into(),
        line: pos.line()?,
        column: pos.position().unwrap_or(1),
    })
}

pub fn parse_error(e: &ParseError, file: &str) -> Diagnostic {
    Diagnostic::error(format!("syntax error: {}", e.err_type())).at(location(file, e.position()))
}

/// Rhai's message without its trailing " (line L, position P)".
fn bare_message(e: &EvalAltResult) -> String {
    let s = e.to_string();
    match s.rfind(" (line ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

pub fn diagnose(err: &EvalAltResult, entry: &str, limits: &Limits) -> Diagnostic {
    let mut file = entry.to_string();
    let mut trace = Vec::new();
    let mut e = err;
    loop {
        match e {
            EvalAltResult::ErrorInModule(path, inner, pos) => {
                if let Some(l) = location(&file, *pos) {
                    trace.push(TraceFrame {
                        label: "imported here".into(),
                        location: l,
                    });
                }
                file = path.clone();
                e = inner;
            }
            EvalAltResult::ErrorInFunctionCall(name, src, inner, pos) => {
                if let Some(l) = location(&file, *pos) {
                    trace.push(TraceFrame {
                        label: format!("in the call to `{name}`"),
                        location: l,
                    });
                }
                if !src.is_empty() {
                    file = src.clone();
                }
                e = inner;
            }
            _ => break,
        }
    }
    trace.reverse();
    let pos = e.position();
    let mut d = match e {
        EvalAltResult::ErrorRuntime(v, _) if v.is::<ScriptError>() => {
            let se = v.clone().cast::<ScriptError>();
            let mut d = Diagnostic::error(se.message).with_help(se.help).with_focus(se.focus);
            if let Some(loc) = se.location {
                // The error is in another file (JSON); the script position is where it was read.
                if let Some(l) = location(&file, pos) {
                    trace.insert(0, TraceFrame { label: se.via.unwrap_or_else(|| "read here".into()), location: l });
                }
                d.location = Some(loc);
                return Diagnostic { trace, ..d };
            }
            d
        }
        EvalAltResult::ErrorParsing(t, _) => Diagnostic::error(format!("syntax error: {t}")),
        EvalAltResult::ErrorTooManyOperations(_) => Diagnostic::error(format!(
            "the script was stopped after {} operations (the operation limit); is there an endless loop?",
            limits.max_operations
        )),
        EvalAltResult::ErrorTerminated(v, _) => Diagnostic::error(v.to_string()),
        EvalAltResult::ErrorDataTooLarge(what, _) => Diagnostic::error(format!(
            "{what} exceeds kiln's limit",
        )),
        EvalAltResult::ErrorStackOverflow(_) => Diagnostic::error(format!(
            "calls nested more than {} deep (the call-depth limit); is there endless recursion?",
            limits.max_call_levels
        )),
        EvalAltResult::ErrorTooManyModules(_) => {
            Diagnostic::error(format!("too many modules: the limit is {}", limits.max_modules))
        }
        EvalAltResult::ErrorFunctionNotFound(sig, _) => {
            let name = sig.split(' ').next().unwrap_or(sig).split('(').next().unwrap_or(sig);
            let is_operator = name.chars().all(|c| "+-*/%<>=!&|^".contains(c)) && !name.is_empty();
            if is_operator {
                let operands = sig[name.len()..].trim();
                let mut d = Diagnostic::error(format!("`{name}` cannot be applied to {operands}"));
                if operands.contains("()") {
                    d.help = Some("one side is `()`: a map key that does not exist reads as `()`".into());
                }
                d
            } else {
                Diagnostic::error(format!("function not found: {sig}")).with_focus(Some(name.to_string()))
            }
        }
        other => Diagnostic::error(bare_message(other)),
    };
    d.location = location(&file, pos);
    d.trace = trace;
    d
}
