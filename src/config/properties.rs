//! A builder's properties, kept small.
//!
//! A master holds every builder's config for as long as it runs, and a
//! master in the seed's idiom has thousands of builders with the same
//! handful of properties (`branch`, `platform`, `product`, ...). As a
//! `BTreeMap<String, Value>` each builder paid a whole B-tree node (eleven
//! slots of a string and an 80-byte JSON value) and two allocations per
//! property. Here a builder holds one sorted slice; a key and a string
//! value are shared strings, so that a load can give every builder the
//! same `"branch"` and the same `"mozilla-central"`.

use std::fmt;

use rhai::ImmutableString;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::Value;

/// One property's value: a string (most of them), else any JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum PropValue {
    Str(ImmutableString),
    Json(Box<Value>),
}

impl PropValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PropValue::Str(s) => Some(s),
            PropValue::Json(v) => v.as_str(),
        }
    }

    /// The value as JSON.
    pub fn to_value(&self) -> Value {
        match self {
            PropValue::Str(s) => Value::String(s.to_string()),
            PropValue::Json(v) => (**v).clone(),
        }
    }
}

impl From<Value> for PropValue {
    fn from(v: Value) -> Self {
        match v {
            Value::String(s) => PropValue::Str(s.into()),
            v => PropValue::Json(Box::new(v)),
        }
    }
}

impl Serialize for PropValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PropValue::Str(v) => s.serialize_str(v),
            PropValue::Json(v) => v.serialize(s),
        }
    }
}

/// A builder's properties, sorted by name, each name once.
#[derive(Clone, Default, PartialEq)]
pub struct BuilderProperties(Box<[(ImmutableString, PropValue)]>);

impl BuilderProperties {
    /// The properties `pairs` name; of a name given twice, the last wins
    /// (as inserting into a map would).
    pub fn new(pairs: impl IntoIterator<Item = (ImmutableString, PropValue)>) -> Self {
        let mut v: Vec<(ImmutableString, PropValue)> = pairs.into_iter().collect();
        // A stable sort keeps equal names in the order given.
        v.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let mut out: Vec<(ImmutableString, PropValue)> = Vec::with_capacity(v.len());
        for (k, val) in v {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = val,
                _ => out.push((k, val)),
            }
        }
        BuilderProperties(out.into_boxed_slice())
    }

    pub fn get(&self, name: &str) -> Option<&PropValue> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(name))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &PropValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl Serialize for BuilderProperties {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl fmt::Debug for BuilderProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn properties_are_sorted_the_last_of_a_name_wins_and_print_as_a_map() {
        let p = BuilderProperties::new([
            ("platform".into(), PropValue::Str("linux".into())),
            ("branch".into(), PropValue::Str("old".into())),
            ("slots".into(), json!([1, 2]).into()),
            ("branch".into(), PropValue::Str("mozilla-central".into())),
        ]);
        assert_eq!(p.len(), 3);
        assert_eq!(
            p.get("branch").and_then(PropValue::as_str),
            Some("mozilla-central")
        );
        assert_eq!(p.get("slots").map(PropValue::to_value), Some(json!([1, 2])));
        assert_eq!(p.get("missing"), None);
        assert_eq!(
            serde_json::to_string(&p).ok().as_deref(),
            Some(r#"{"branch":"mozilla-central","platform":"linux","slots":[1,2]}"#)
        );
    }
}
