//! `kiln print-config`'s two forms of a config: JSON, and indented
//! `key: value` text in the same order (also how the REPL shows a value).

use super::MasterConfig;

/// The config as pretty JSON.
pub fn to_json(c: &MasterConfig) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(c)?)
}

/// The config as indented `key: value` text, in the same order as the JSON.
pub fn to_text(c: &MasterConfig) -> anyhow::Result<String> {
    let v = serde_json::to_value(c)?;
    let mut out = String::new();
    text_value(&v, 0, &mut out);
    Ok(out.trim_end().to_string())
}

/// Any JSON value as print-config's indented text.
pub fn text_of(v: &serde_json::Value) -> String {
    let mut out = String::new();
    text_value(v, 0, &mut out);
    out.trim_end().to_string()
}

fn scalar(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Object(m) if m.is_empty() => Some("{}".into()),
        serde_json::Value::Array(a) if a.is_empty() => Some("[]".into()),
        serde_json::Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => Some(
            serde_json::to_string(v)
                .unwrap_or_default()
                .replace("\",\"", "\", \""),
        ),
        serde_json::Value::Object(_) | serde_json::Value::Array(_) => None,
        other => Some(other.to_string()),
    }
}

fn text_value(v: &serde_json::Value, indent: usize, out: &mut String) {
    let pad = "  ".repeat(indent);
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match scalar(x) {
                    Some(s) => out.push_str(&format!("{pad}{k}: {s}\n")),
                    None => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        text_value(x, indent + 1, out);
                    }
                }
            }
        }
        serde_json::Value::Array(a) => {
            for x in a {
                match scalar(x) {
                    Some(s) => out.push_str(&format!("{pad}- {s}\n")),
                    None => {
                        let mut inner = String::new();
                        text_value(x, indent + 1, &mut inner);
                        let inner = inner.trim_start();
                        out.push_str(&format!("{pad}- {inner}"));
                    }
                }
            }
        }
        other => out.push_str(&format!("{pad}{other}\n")),
    }
}
