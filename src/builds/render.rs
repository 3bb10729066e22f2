//! Rendering `WithProperties` and `Interpolate` when a step starts.
//!
//! `WithProperties("%(prop)s")` takes property names, with `:-default`
//! (used when the property is missing) and `:+alt` (used when it is set,
//! else empty). `Interpolate("%(kind:name)s")` takes Buildbot's kinds:
//! `prop:NAME`, `src:CODEBASE:ATTR` (the sourcestamp's branch, revision,
//! repository, project or codebase), `worker:ATTR` (what the worker
//! reported: os, basedir, admin, host, ...), `kw:KEY` (from
//! `Interpolate(fmt, #{ KEY: value })`) and `secret:NAME` (the master's
//! `secrets/NAME`), each with `:-default`, `:~default` (also when the value
//! is empty or false) and `:+alt`. `%%` is a literal `%`.
//!
//! A value that is missing with no default is an error that names it: kiln
//! refuses to run a command with a silently empty argument (Buildbot
//! renders such an Interpolate as an empty string). Secrets rendered are
//! remembered so that the step's log can hide them.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::config::Renderable;
use crate::store::Properties;

/// Why a value could not be rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderError {
    pub message: String,
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn err<T>(message: String) -> Result<T, RenderError> {
    Err(RenderError { message })
}

/// A property value as Python's `%s` prints it (the seed's scripts were
/// written against that): strings as they are, `True`/`False`, `None`,
/// numbers, and JSON for lists and maps.
pub fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// Python's truth of a value, for `:~`.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// What a step's values are rendered against.
pub struct Scope<'a> {
    pub props: &'a Properties,
    /// The worker's info, for `worker:`.
    pub worker: Option<&'a Value>,
    /// Where `secret:` names are read (the master's `secrets/`).
    pub secrets_dir: Option<&'a Path>,
    /// Secret values rendered so far.
    used_secrets: Arc<Mutex<Vec<String>>>,
}

impl<'a> Scope<'a> {
    /// Properties only: `worker:` and `secret:` lookups find nothing.
    pub fn of(props: &'a Properties) -> Scope<'a> {
        Scope {
            props,
            worker: None,
            secrets_dir: None,
            used_secrets: Arc::default(),
        }
    }

    pub fn with_worker(mut self, info: Option<&'a Value>) -> Self {
        self.worker = info;
        self
    }

    pub fn with_secrets(mut self, dir: &'a Path) -> Self {
        self.secrets_dir = Some(dir);
        self
    }

    /// Counts `secret` among the values to hide (a secret given to the
    /// step as it is, not rendered).
    pub fn add_secret(&self, secret: &str) {
        crate::sync::lock(&self.used_secrets).push(secret.to_string());
    }

    /// The secret values rendered through this scope (or added), as they
    /// grow: a step's log hides each of them.
    pub fn secrets(&self) -> Arc<Mutex<Vec<String>>> {
        self.used_secrets.clone()
    }
}

pub fn render(r: &Renderable, scope: &Scope) -> Result<String, RenderError> {
    let (template, kw, interpolate) = match r {
        Renderable::WithProperties(t) => (t, None, false),
        Renderable::Interpolate(t, kw) => (t, Some(kw), true),
    };
    let mut out = String::with_capacity(template.len());
    let mut rest = template.as_str();
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('%') {
            out.push('%');
            rest = after;
            continue;
        }
        let Some(inner) = rest.strip_prefix('(') else {
            return err(format!(
                "{r}: `%` must start `%(...)s` or be doubled as `%%`"
            ));
        };
        let Some(close) = inner.find(')') else {
            return err(format!("{r}: `%(` without its `)`"));
        };
        let spec = &inner[..close];
        let after = &inner[close + 1..];
        let mut chars = after.chars();
        let conv = chars.next();
        if !matches!(conv, Some('s' | 'd' | 'i')) {
            return err(format!("{r}: `%({spec})` must be followed by `s` (or `d`)"));
        }
        rest = chars.as_str();
        if !interpolate {
            let props = scope.props;
            out.push_str(&lookup(r, "", spec, |name| {
                props.get(name).map(|(v, _)| v.clone())
            })?);
            continue;
        }
        let Some((kind, spec)) = spec.split_once(':') else {
            return err(format!(
                "{r}: `%({spec})s` needs a kind, as in `%(prop:{spec})s`"
            ));
        };
        let text = match kind {
            "prop" => lookup(r, "prop:", spec, |name| {
                scope.props.get(name).map(|(v, _)| v.clone())
            })?,
            "src" => {
                let Some((codebase, spec)) = spec.split_once(':') else {
                    return err(format!(
                        "{r}: `%(src:{spec})s` needs a codebase and an attribute, as in `%(src::revision)s`"
                    ));
                };
                let ours = scope
                    .props
                    .get("codebase")
                    .and_then(|(v, _)| v.as_str())
                    .unwrap_or("");
                let kind = format!("src:{codebase}:");
                lookup(r, &kind, spec, |attr| {
                    if codebase != ours
                        || !["branch", "revision", "repository", "project", "codebase"]
                            .contains(&attr)
                    {
                        return None;
                    }
                    scope
                        .props
                        .get(attr)
                        .map(|(v, _)| v.clone())
                        .filter(|v| !v.is_null())
                })?
            }
            "worker" => lookup(r, "worker:", spec, |attr| {
                scope.worker.and_then(|w| w.get(attr)).cloned()
            })?,
            "kw" => lookup(r, "kw:", spec, |key| {
                kw.and_then(|kw| kw.get(key))
                    .map(|v| Value::String(v.clone()))
            })?,
            "secret" => {
                let mut unreadable = None;
                let text = lookup(r, "secret:", spec, |name| {
                    let dir = scope.secrets_dir?;
                    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                        return None;
                    }
                    match std::fs::read_to_string(dir.join(name)) {
                        Ok(v) => {
                            let v = v.trim_end_matches(['\n', '\r']).to_string();
                            crate::sync::lock(&scope.used_secrets).push(v.clone());
                            Some(Value::String(v))
                        }
                        Err(e) => {
                            unreadable = Some(format!("{}: {e}", dir.join(name).display()));
                            None
                        }
                    }
                });
                match (text, unreadable) {
                    (Ok(t), _) => t,
                    (Err(_), Some(why)) => {
                        return err(format!("{r}: secret `{spec}` cannot be read: {why}"))
                    }
                    (Err(e), None) => return Err(e),
                }
            }
            other => {
                return err(format!(
                    "{r}: `%({other}:...)s`: the kinds are prop:, src:, worker:, kw: and secret:"
                ))
            }
        };
        out.push_str(&text);
    }
    out.push_str(rest);
    Ok(out)
}

/// `name`, `name:-default`, `name:~default` or `name:+alt`, looked up with
/// `get`; `kind` is the `prop:`-like prefix, for messages.
fn lookup(
    r: &Renderable,
    kind: &str,
    spec: &str,
    get: impl FnOnce(&str) -> Option<Value>,
) -> Result<String, RenderError> {
    let (name, op) = match spec.find(':') {
        Some(i) => (&spec[..i], Some(&spec[i + 1..])),
        None => (spec, None),
    };
    if name.is_empty() {
        return err(format!("{r}: an empty name in `%({kind}{spec})s`"));
    }
    let value = get(name);
    match op {
        None => match value {
            Some(v) => Ok(text_of(&v)),
            None => {
                let what = match kind {
                    "" | "prop:" => format!("the build has no property `{name}`"),
                    "worker:" => format!("the worker did not report `{name}`"),
                    "kw:" => format!("the Interpolate has no keyword `{name}`"),
                    "secret:" => format!("there is no secret `{name}`"),
                    _ => format!("the build's sourcestamp has no `{kind}{name}`"),
                };
                err(format!(
                    "{r}: {what} (give a default with `%({kind}{name}:-default)s`)"
                ))
            }
        },
        Some(op) if op.starts_with('-') => {
            Ok(value.map_or_else(|| op[1..].to_string(), |v| text_of(&v)))
        }
        Some(op) if op.starts_with('~') => Ok(match value {
            Some(v) if truthy(&v) => text_of(&v),
            _ => op[1..].to_string(),
        }),
        Some(op) if op.starts_with('+') => Ok(if value.is_some() {
            op[1..].to_string()
        } else {
            String::new()
        }),
        Some(op) => err(format!(
            "{r}: `:{op}` is not one of `:-default`, `:~default`, `:+alt`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props() -> Properties {
        let mut p = Properties::new();
        p.insert("branch".into(), (json!("mozilla-central"), "Build".into()));
        p.insert("buildnumber".into(), (json!(7), "Build".into()));
        p.insert("empty".into(), (json!(""), "Build".into()));
        p.insert("clobber".into(), (json!(false), "Force".into()));
        p
    }

    fn wp(t: &str) -> Result<String, RenderError> {
        render(&Renderable::WithProperties(t.into()), &Scope::of(&props()))
    }

    fn ip(t: &str) -> Result<String, RenderError> {
        render(
            &Renderable::Interpolate(t.into(), Default::default()),
            &Scope::of(&props()),
        )
    }

    #[test]
    fn with_properties_renders_names_defaults_and_alternatives() {
        assert_eq!(
            wp("%(branch)s-%(buildnumber)d 100%%").as_deref(),
            Ok("mozilla-central-7 100%")
        );
        assert_eq!(wp("%(nope:-dflt)s").as_deref(), Ok("dflt"));
        assert_eq!(wp("%(branch:-dflt)s").as_deref(), Ok("mozilla-central"));
        assert_eq!(
            wp("[%(branch:+set)s][%(nope:+set)s]").as_deref(),
            Ok("[set][]")
        );
        assert_eq!(wp("%(clobber)s").as_deref(), Ok("False"));
    }

    #[test]
    fn interpolate_renders_prop_lookups() {
        assert_eq!(
            ip("--branch %(prop:branch)s").as_deref(),
            Ok("--branch mozilla-central")
        );
        assert_eq!(ip("%(prop:empty:~none)s").as_deref(), Ok("none"));
        assert_eq!(ip("%(prop:empty:-none)s").as_deref(), Ok(""));
        assert_eq!(ip("%(prop:clobber:~no)s").as_deref(), Ok("no"));
    }

    #[test]
    fn a_missing_property_or_bad_template_is_an_error_that_says_which() {
        let e = wp("hg clone %(repo_path)s").unwrap_err().message;
        assert!(e.contains("no property `repo_path`"), "{e}");
        let e = ip("%(prop:basedir)s/scripts").unwrap_err().message;
        assert!(
            e.contains("`basedir`") && e.contains("prop:basedir:-"),
            "{e}"
        );
        assert!(ip("%(branch)s")
            .unwrap_err()
            .message
            .contains("needs a kind"));
        assert!(ip("%(bogus:branch)s")
            .unwrap_err()
            .message
            .contains("the kinds are prop:, src:, worker:, kw: and secret:"));
        assert!(wp("50% done").unwrap_err().message.contains("%%"));
        assert!(wp("%(branch)")
            .unwrap_err()
            .message
            .contains("followed by `s`"));
        assert!(wp("%(branch")
            .unwrap_err()
            .message
            .contains("without its `)`"));
    }
}

/// Property-based checks: any template (Interpolate's and WithProperties'
/// syntax, mangled) renders or is refused with a message, never a panic;
/// text without `%` renders as itself. `PROPTEST_CASES=N` runs more
/// (bench/fuzz.sh).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use serde_json::json;

    /// Templates made of the pieces the syntax has, in any order.
    fn template() -> impl Strategy<Value = String> {
        vec(
            prop_oneof![
                prop::sample::select(vec![
                    "%(",
                    ")s",
                    "%(prop:",
                    "%(kw:",
                    "%(worker:",
                    "%(src:",
                    "%(secret:",
                    ":-",
                    ":~",
                    ":+",
                    ":?|",
                    "|",
                    ")",
                    "%",
                    "%%",
                    "(",
                    "s",
                    "branch",
                    "x",
                    "buildnumber",
                    "é",
                ])
                .prop_map(String::from),
                ".{0,4}",
            ],
            0..12,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn fuzz_any_template_renders_or_is_refused(
            t in template(),
            kw in btree_map("[a-z]{1,4}", ".{0,6}", 0..3),
            interpolate in any::<bool>(),
        ) {
            let mut props = Properties::new();
            props.insert("branch".into(), (json!("mozilla-central"), "Build".into()));
            props.insert("buildnumber".into(), (json!(7), "Build".into()));
            let r = if interpolate {
                Renderable::Interpolate(t.clone(), kw)
            } else {
                Renderable::WithProperties(t.clone())
            };
            match render(&r, &Scope::of(&props)) {
                Ok(text) if !t.contains('%') => prop_assert_eq!(text, t),
                Ok(_) => {}
                Err(e) => prop_assert!(!e.message.is_empty()),
            }
        }
    }
}
