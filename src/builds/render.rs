//! Rendering `WithProperties` and `Interpolate` against a build's
//! properties when a step starts.
//!
//! `WithProperties("%(prop)s")` takes property names, with `:-default`
//! (used when the property is missing) and `:+alt` (used when it is set,
//! else empty). `Interpolate("%(prop:name)s")` takes `prop:`, plus
//! `:-default`, `:~default` (also when the value is empty or false) and
//! `:+alt`, and `kw:`-less forms are refused. `%%` is a literal `%`.
//! A property that is missing with no default is an error that names it:
//! kiln refuses to run a command with a silently empty argument (Buildbot
//! renders such an Interpolate as an empty string).

use std::fmt;

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

pub fn render(r: &Renderable, props: &Properties) -> Result<String, RenderError> {
    let (template, interpolate) = match r {
        Renderable::WithProperties(t) => (t, false),
        Renderable::Interpolate(t) => (t, true),
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
        let name_and_op = if interpolate {
            match spec.split_once(':') {
                Some(("prop", rest)) => rest,
                Some((kind, _)) => {
                    return err(format!(
                        "{r}: `%({spec})s`: kiln renders `prop:` only, not `{kind}:`"
                    ))
                }
                None => {
                    return err(format!(
                        "{r}: `%({spec})s` needs a kind, as in `%(prop:{spec})s`"
                    ))
                }
            }
        } else {
            spec
        };
        out.push_str(&lookup(r, name_and_op, props)?);
    }
    out.push_str(rest);
    Ok(out)
}

/// `name`, `name:-default`, `name:~default` or `name:+alt`.
fn lookup(r: &Renderable, spec: &str, props: &Properties) -> Result<String, RenderError> {
    let (name, op) = match spec.find(':') {
        Some(i) => (&spec[..i], Some(&spec[i + 1..])),
        None => (spec, None),
    };
    if name.is_empty() {
        return err(format!("{r}: an empty property name"));
    }
    let value = props.get(name).map(|(v, _)| v);
    match op {
        None => match value {
            Some(v) => Ok(text_of(v)),
            None => err(format!(
                "{r}: the build has no property `{name}` (give a default with `%({}{name}:-default)s`)",
                if matches!(r, Renderable::Interpolate(_)) {
                    "prop:"
                } else {
                    ""
                }
            )),
        },
        Some(op) if op.starts_with('-') => Ok(value.map_or_else(|| op[1..].to_string(), text_of)),
        Some(op) if op.starts_with('~') => Ok(match value {
            Some(v) if truthy(v) => text_of(v),
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
        render(&Renderable::WithProperties(t.into()), &props())
    }

    fn ip(t: &str) -> Result<String, RenderError> {
        render(&Renderable::Interpolate(t.into()), &props())
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
        assert!(ip("%(src::branch)s")
            .unwrap_err()
            .message
            .contains("not `src:`"));
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
