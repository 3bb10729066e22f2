//! Keyword arguments: Buildbot's `Name(key=value, ...)` becomes
//! `Name(#{key: value, ...})` in Rhai. [`Kwargs`] takes typed values out of
//! the map and, at the end, turns every key nobody asked for into an error
//! that suggests the nearest known one.

use std::collections::BTreeMap;
use std::sync::Arc;

use rhai::{Dynamic, EvalAltResult, FnPtr, Map, Position};

use crate::config::{Arg, Callback, Origin, PropertyMap, Renderable, Secret, StepCommand, Value};
use crate::diagnostics::{Diagnostic, Location};
use crate::script::LoadState;

pub type ScriptResult<T> = Result<T, Box<EvalAltResult>>;

/// The payload kiln puts in a Rhai runtime error, so that the diagnostic can
/// carry a suggestion, underline a key, or point into another file (JSON).
#[derive(Clone, Debug)]
pub struct ScriptError {
    pub message: String,
    pub help: Option<String>,
    pub focus: Option<String>,
    /// Overrides the Rhai position (an error inside a JSON file, say).
    pub location: Option<Location>,
    /// Extra frames to show below the location ("loaded here").
    pub via: Option<String>,
}

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let Some(h) = &self.help {
            write!(f, "; {h}")?;
        }
        Ok(())
    }
}

impl ScriptError {
    pub fn new(message: impl Into<String>) -> Self {
        ScriptError {
            message: message.into(),
            help: None,
            focus: None,
            location: None,
            via: None,
        }
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    pub fn focus(mut self, focus: impl Into<String>) -> Self {
        self.focus = Some(focus.into());
        self
    }
    pub fn into_err(self) -> Box<EvalAltResult> {
        EvalAltResult::ErrorRuntime(Dynamic::from(self), Position::NONE).into()
    }
}

/// Shorthand for a plain script error.
pub fn fail<T>(message: impl Into<String>) -> ScriptResult<T> {
    Err(ScriptError::new(message).into_err())
}

/// How a value's type reads in a message.
pub fn type_name(v: &Dynamic) -> String {
    // Only a shared value (a closure's captured variable) needs reading
    // through; cloning any other would copy a whole builder or map just to
    // name its type.
    if v.is_shared() {
        return type_name_of(&v.flatten_clone());
    }
    type_name_of(v)
}

fn type_name_of(v: &Dynamic) -> String {
    if v.is_unit() {
        "()".into()
    } else if v.is_string() {
        "string".into()
    } else if v.is_int() {
        "integer".into()
    } else if v.is_float() {
        "float".into()
    } else if v.is_bool() {
        "bool".into()
    } else if v.is_array() {
        "array".into()
    } else if v.is_map() {
        "map".into()
    } else if v.is_fnptr() {
        "function".into()
    } else {
        v.type_name()
            .rsplit("::")
            .next()
            .unwrap_or("value")
            .to_string()
    }
}

/// A constructor's keyword arguments.
pub struct Kwargs {
    what: &'static str,
    /// The given keys, sorted. A list, not the script's map: a step's
    /// constructor asks for about 20 keys of which 3 to 5 are given, and a
    /// length-first scan rejects a missing key cheaper than a tree search.
    map: Vec<(rhai::Identifier, Dynamic)>,
    known: Vec<&'static str>,
    origin: Option<Origin>,
    state: Arc<LoadState>,
}

impl Kwargs {
    pub fn new(
        what: &'static str,
        map: Map,
        origin: Option<Origin>,
        state: Arc<LoadState>,
    ) -> Self {
        Kwargs {
            what,
            map: map.into_iter().collect(),
            // A step's constructor asks for about 20 keys.
            known: Vec::with_capacity(24),
            origin,
            state,
        }
    }

    /// The load this call is part of.
    pub fn state(&self) -> &LoadState {
        &self.state
    }

    pub fn origin(&self) -> Option<Origin> {
        self.origin.clone()
    }

    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Takes a key; `()` counts as absent (Python's `None`).
    pub fn take(&mut self, key: &'static str) -> Option<Dynamic> {
        self.known.push(key);
        self.remove(key)
            .map(|v| v.flatten())
            .filter(|v| !v.is_unit())
    }

    fn position(&self, key: &str) -> Option<usize> {
        self.map.iter().position(|(k, _)| k.as_str() == key)
    }

    fn remove(&mut self, key: &str) -> Option<Dynamic> {
        let i = self.position(key)?;
        Some(self.map.remove(i).1)
    }

    /// Takes a key that Buildbot 0.8 spelled differently, warning on the old name.
    pub fn take_legacy(&mut self, key: &'static str, legacy: &'static str) -> Option<Dynamic> {
        let modern = self.take(key);
        if let Some(old) = self.remove(legacy).map(|v| v.flatten()) {
            self.warn_legacy(legacy, key);
            if modern.is_none() && !old.is_unit() {
                return Some(old);
            }
        }
        modern
    }

    /// Reads Buildbot 0.8's name for a key as the modern one (warning), so
    /// that the modern key's typed getter applies to either spelling.
    pub fn rename_legacy(&mut self, key: &'static str, legacy: &'static str) {
        if let Some(old) = self.remove(legacy) {
            self.warn_legacy(legacy, key);
            if self.position(key).is_none() {
                let at = self.map.partition_point(|(k, _)| k.as_str() < key);
                self.map.insert(at, (key.into(), old));
            }
        }
    }

    /// Warns about `key` of these arguments.
    pub fn warn(&self, message: &str, key: &str) {
        self.state.warn(
            Diagnostic::warning(message.to_string())
                .at_origin(self.origin.as_ref())
                .with_focus(Some(key.to_string())),
        );
    }

    pub fn warn_legacy(&self, legacy: &str, modern: &str) {
        self.state.warn(
            Diagnostic::warning(format!(
                "`{legacy}` in {} is a legacy Buildbot 0.8 name; use `{modern}`",
                self.what
            ))
            .at_origin(self.origin.as_ref())
            .with_focus(Some(legacy.to_string())),
        );
    }

    fn wrong(&self, key: &str, expected: &str, got: &Dynamic) -> Box<EvalAltResult> {
        ScriptError::new(format!(
            "`{key}` in {} must be {expected}, got {}",
            self.what,
            type_name(got)
        ))
        .focus(key)
        .into_err()
    }

    pub fn missing(&self, key: &str, expected: &str) -> Box<EvalAltResult> {
        ScriptError::new(format!("{} needs `{key}` ({expected})", self.what)).into_err()
    }

    pub fn str(&mut self, key: &'static str) -> ScriptResult<Option<String>> {
        Ok(self.shared_str(key)?.map(String::from))
    }

    /// A string kept as the script's own (shared, not copied): for the
    /// strings a config holds once per step.
    pub fn shared_str(&mut self, key: &'static str) -> ScriptResult<Option<rhai::ImmutableString>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match v.clone().into_immutable_string() {
                Ok(s) => Ok(Some(s)),
                Err(_) => Err(self.wrong(key, "a string", &v)),
            },
        }
    }

    /// A number of seconds for a step (a timeout): up to 2^32-1.
    pub fn secs(&mut self, key: &'static str) -> ScriptResult<Option<u32>> {
        match self.uint(key)? {
            None => Ok(None),
            Some(n) => match u32::try_from(n) {
                Ok(n) => Ok(Some(n)),
                Err(_) => fail_focus(
                    format!("`{key}` in {} is too large: {n} seconds", self.what),
                    key,
                ),
            },
        }
    }

    /// Whether `key` is given as `()` (Python's None), which some keys
    /// distinguish from not giving the key at all.
    pub fn is_unit(&self, key: &str) -> bool {
        self.position(key).is_some_and(|i| self.map[i].1.is_unit())
    }

    pub fn req_str(&mut self, key: &'static str) -> ScriptResult<String> {
        self.str(key)?.ok_or_else(|| self.missing(key, "a string"))
    }

    pub fn bool(&mut self, key: &'static str, default: bool) -> ScriptResult<bool> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v.as_bool().map_err(|_| self.wrong(key, "a bool", &v)),
        }
    }

    pub fn int(&mut self, key: &'static str) -> ScriptResult<Option<i64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => v
                .as_int()
                .map(Some)
                .map_err(|_| self.wrong(key, "an integer", &v)),
        }
    }

    /// A count or a number of seconds: a non-negative integer.
    pub fn uint(&mut self, key: &'static str) -> ScriptResult<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match v.as_int() {
                Ok(n) if n >= 0 => Ok(Some(n as u64)),
                Ok(n) => fail_focus(
                    format!("`{key}` in {} must not be negative, got {n}", self.what),
                    key,
                ),
                Err(_) => Err(self.wrong(key, "a non-negative integer", &v)),
            },
        }
    }

    pub fn str_list(&mut self, key: &'static str) -> ScriptResult<Option<Vec<String>>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => str_list(&v)
                .map(Some)
                .ok_or_else(|| self.wrong(key, "an array of strings", &v)),
        }
    }

    pub fn req_str_list(&mut self, key: &'static str) -> ScriptResult<Vec<String>> {
        self.str_list(key)?
            .ok_or_else(|| self.missing(key, "an array of strings"))
    }

    pub fn callback(&mut self, key: &'static str) -> ScriptResult<Option<Callback>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match v.clone().try_cast::<FnPtr>() {
                Some(fn_ptr) => Ok(Some(Callback {
                    fn_ptr,
                    origin: self.origin.clone(),
                })),
                None => Err(self.wrong(
                    key,
                    "a function (a closure `|x| ...` or `Fn(\"name\")`)",
                    &v,
                )),
            },
        }
    }

    pub fn properties(&mut self, key: &'static str) -> ScriptResult<PropertyMap> {
        match self.take(key) {
            None => Ok(PropertyMap::new()),
            Some(v) => match v.clone().try_cast::<Map>() {
                Some(m) => properties_of(&m, key),
                None => Err(self.wrong(key, "a map of properties", &v)),
            },
        }
    }

    /// [`Self::properties`] as a builder keeps them.
    pub fn builder_properties(
        &mut self,
        key: &'static str,
    ) -> ScriptResult<crate::config::BuilderProperties> {
        let map = self.properties(key)?;
        let state = &self.state;
        Ok(crate::config::BuilderProperties::new(
            map.into_iter()
                .map(|(k, v)| (state.shared_str(&k), state.prop_value(v))),
        ))
    }

    /// A required [`Self::arg`]; `expected` says what it is when missing.
    pub fn req_arg(&mut self, key: &'static str, expected: &str) -> ScriptResult<Arg> {
        self.arg(key)?.ok_or_else(|| self.missing(key, expected))
    }

    pub fn arg(&mut self, key: &'static str) -> ScriptResult<Option<Arg>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => arg_of(&v)
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a string or WithProperties(...)", &v)),
        }
    }

    pub fn env(&mut self, key: &'static str) -> ScriptResult<BTreeMap<String, Arg>> {
        match self.take(key) {
            None => Ok(BTreeMap::new()),
            Some(v) => env_of(&v)
                .ok_or_else(|| self.wrong(key, "a map of strings or WithProperties(...)", &v)),
        }
    }

    pub fn command(&mut self, key: &'static str) -> ScriptResult<Option<StepCommand>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => command_of(&v).map(Some).ok_or_else(|| {
                self.wrong(
                    key,
                    "a string or an array of strings and WithProperties(...)",
                    &v,
                )
            }),
        }
    }

    pub fn secret(&mut self, key: &'static str) -> ScriptResult<Option<Secret>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => secret_of(&v)
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a string or secret(...)", &v)),
        }
    }

    /// Takes a value of a custom type.
    pub fn custom<T: Clone + Send + Sync + 'static>(
        &mut self,
        key: &'static str,
        expected: &str,
    ) -> ScriptResult<Option<T>> {
        match self.take(key) {
            None => Ok(None),
            Some(v) if v.is::<T>() => Ok(Some(v.cast::<T>())),
            Some(v) => Err(self.wrong(key, expected, &v)),
        }
    }

    /// Anything else, untyped, for the caller to interpret.
    pub fn raw(&mut self, key: &'static str) -> Option<Dynamic> {
        self.take(key)
    }

    /// Fails on any key that no `take` asked for.
    pub fn finish(self) -> ScriptResult<()> {
        let Some((key, _)) = self.map.first() else {
            return Ok(());
        };
        let key = key.to_string();
        let mut err =
            ScriptError::new(format!("unknown key `{key}` in {}", self.what)).focus(key.clone());
        if let Some(near) = crate::suggest::nearest(&key, self.known.iter().copied()) {
            err.message = format!("{}; did you mean `{near}`?", err.message);
        } else {
            let mut known = self.known.clone();
            known.sort_unstable();
            known.dedup();
            err = err.help(format!("{} takes: {}", self.what, known.join(", ")));
        }
        Err(err.into_err())
    }
}

pub fn fail_focus<T>(message: String, focus: &str) -> ScriptResult<T> {
    Err(ScriptError::new(message).focus(focus).into_err())
}

/// An array of strings, or `None` when the value is anything else.
pub fn str_list(v: &Dynamic) -> Option<Vec<String>> {
    shared_str_list(v).map(|l| l.into_iter().map(String::from).collect())
}

/// An array of strings kept as the script's own (shared, not copied).
pub fn shared_str_list(v: &Dynamic) -> Option<Vec<rhai::ImmutableString>> {
    let arr = v.as_array_ref().ok()?;
    arr.iter()
        .map(|x| x.flatten_clone().into_immutable_string().ok())
        .collect()
}

pub fn arg_of(v: &Dynamic) -> Option<Arg> {
    let v = v.flatten_clone();
    if v.is_string() {
        return v.into_immutable_string().ok().map(Arg::Literal);
    }
    if v.is_int() || v.is_float() {
        return Some(Arg::Literal(v.to_string().into()));
    }
    if v.is::<Secret>() {
        return v.try_cast::<Secret>().map(|s| Arg::Secret(Box::new(s)));
    }
    v.try_cast::<Renderable>().map(|r| Arg::Render(Box::new(r)))
}

pub fn command_of(v: &Dynamic) -> Option<StepCommand> {
    if let Ok(arr) = v.as_array_ref() {
        return arr
            .iter()
            .map(arg_of)
            .collect::<Option<Vec<_>>>()
            .map(StepCommand::Argv);
    }
    arg_of(v).map(StepCommand::Shell)
}

pub fn env_of(v: &Dynamic) -> Option<BTreeMap<String, Arg>> {
    let m = v.flatten_clone().try_cast::<Map>()?;
    m.iter()
        .map(|(k, v)| arg_of(v).map(|a| (k.to_string(), a)))
        .collect()
}

pub fn secret_of(v: &Dynamic) -> Option<Secret> {
    let v = v.flatten_clone();
    if v.is_string() {
        return v.into_string().ok().map(Secret::literal);
    }
    v.try_cast::<Secret>()
}

pub fn properties_of(m: &Map, key: &str) -> ScriptResult<PropertyMap> {
    m.iter()
        .map(|(k, v)| Ok((k.to_string(), json_of(v, &format!("{key}.{k}"))?)))
        .collect()
}

/// A script value as a JSON-like property value.
pub fn json_of(v: &Dynamic, path: &str) -> ScriptResult<Value> {
    let v = v.flatten_clone();
    if v.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(b) = v.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Ok(i) = v.as_int() {
        return Ok(Value::from(i));
    }
    if let Ok(f) = v.as_float() {
        return Ok(serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number));
    }
    if v.is_string() {
        return Ok(Value::String(v.into_string().unwrap_or_default()));
    }
    if v.is_array() {
        let arr = v.cast::<rhai::Array>();
        return arr
            .iter()
            .enumerate()
            .map(|(i, x)| json_of(x, &format!("{path}[{i}]")))
            .collect::<ScriptResult<Vec<_>>>()
            .map(Value::Array);
    }
    if v.is_map() {
        let m = v.cast::<Map>();
        let mut out = serde_json::Map::new();
        for (k, x) in m.iter() {
            out.insert(k.to_string(), json_of(x, &format!("{path}.{k}"))?);
        }
        return Ok(Value::Object(out));
    }
    fail(format!(
        "`{path}` must be a plain value (string, number, bool, array or map), got {}",
        type_name(&v)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kwargs(keys: &[&str]) -> Kwargs {
        let mut map = Map::new();
        for (i, k) in keys.iter().enumerate() {
            map.insert((*k).into(), Dynamic::from(i as i64));
        }
        let state = super::super::LoadState::new(std::path::Path::new("."), Default::default());
        Kwargs::new("Step", map, None, state)
    }

    #[test]
    fn every_given_key_is_found_once_and_no_other() {
        let given = [
            "name",
            "command",
            "haltOnFailure",
            "flunkOnFailure",
            "warnOnFailure",
            "timeout",
            "maxTime",
            "workdir",
            "env",
            "alwaysRun",
        ];
        let mut kw = kwargs(&given);
        for asked in [
            "description",
            "flunkOnWarnings",
            "warnOnWarnings",
            "doStepIf",
        ] {
            assert!(kw.take(asked).is_none(), "{asked} was not given");
        }
        for (i, k) in given.iter().enumerate() {
            let v = kw.take(k).unwrap_or_else(|| panic!("{k} was given"));
            assert_eq!(v.as_int().ok(), Some(i as i64), "{k}");
            assert!(kw.take(k).is_none(), "{k} is taken only once");
        }
        assert!(kw.finish().is_ok());
    }

    #[test]
    fn a_legacy_key_is_read_as_the_modern_one_and_leftovers_are_unknown() {
        let mut kw = kwargs(&["slavenames", "nmae"]);
        kw.rename_legacy("workernames", "slavenames");
        assert_eq!(
            kw.take("workernames").and_then(|v| v.as_int().ok()),
            Some(0)
        );
        assert!(kw.take("name").is_none());
        let err = match *kw.finish().expect_err("nmae is unknown") {
            EvalAltResult::ErrorRuntime(d, _) => d
                .try_cast::<ScriptError>()
                .map(|e| e.message)
                .unwrap_or_default(),
            other => other.to_string(),
        };
        assert!(err.contains("unknown key `nmae`"), "{err}");
        assert!(err.contains("did you mean `name`"), "{err}");
    }
}
