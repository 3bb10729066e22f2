//! The worker protocol's frames, shared by the master and kiln's worker:
//! Buildbot's `msgpack_experimental_v7`, MessagePack over WebSocket.
//!
//! MessagePack frames of the worker protocol: every message is a map with
//! `seq_number` and `op`; a response has `op: "response"`, `result`, and
//! `is_exception` when the request failed.

use rmpv::Value;

/// A decoded message from a worker.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Response {
        seq: u64,
        result: Result<Value, String>,
    },
    Request {
        seq: u64,
        op: String,
        msg: Value,
    },
}

pub fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

pub fn map_get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| str_of(k) == Some(key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// A string, whether MessagePack carried it as str or bin (Python 2-era
/// peers send bytes).
pub fn str_of(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => s.as_str(),
        Value::Binary(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, v);
    out
}

pub fn request(seq: u64, op: &str, fields: Vec<(&str, Value)>) -> Vec<u8> {
    let mut pairs = vec![("seq_number", Value::from(seq)), ("op", Value::from(op))];
    pairs.extend(fields);
    encode(&map(pairs))
}

pub fn response(seq: u64, result: Value, is_exception: bool) -> Vec<u8> {
    let mut pairs = vec![
        ("seq_number", Value::from(seq)),
        ("op", Value::from("response")),
        ("result", result),
    ];
    if is_exception {
        pairs.push(("is_exception", Value::Boolean(true)));
    }
    encode(&map(pairs))
}

/// Decodes one message; anything that is not a map with an integer
/// `seq_number` and a string `op` is an error.
pub fn decode(data: &[u8]) -> Result<Frame, String> {
    let mut cursor = data;
    let v = rmpv::decode::read_value(&mut cursor).map_err(|e| e.to_string())?;
    if !cursor.is_empty() {
        return Err(format!("{} bytes after the message", cursor.len()));
    }
    if !matches!(v, Value::Map(_)) {
        return Err("the message is not a map".into());
    }
    let seq = map_get(&v, "seq_number")
        .and_then(Value::as_u64)
        .ok_or("no integer seq_number")?;
    let op = map_get(&v, "op")
        .and_then(str_of)
        .ok_or("no op")?
        .to_string();
    if op == "response" {
        let result = map_get(&v, "result").cloned().unwrap_or(Value::Nil);
        let failed = matches!(map_get(&v, "is_exception"), Some(Value::Boolean(true)));
        return Ok(Frame::Response {
            seq,
            result: if failed {
                Err(str_of(&result)
                    .map(String::from)
                    .unwrap_or_else(|| result.to_string()))
            } else {
                Ok(result)
            },
        });
    }
    Ok(Frame::Request { seq, op, msg: v })
}

/// An `update`'s args: a list of `[key, value]` pairs.
pub fn update_pairs(args: &Value) -> Result<Vec<(String, Value)>, String> {
    let Value::Array(items) = args else {
        return Err("update args are not a list".into());
    };
    items
        .iter()
        .map(|item| match item {
            Value::Array(kv) if kv.len() == 2 => match str_of(&kv[0]) {
                Some(k) => Ok((k.to_string(), kv[1].clone())),
                None => Err("an update key is not a string".to_string()),
            },
            _ => Err("an update item is not a [key, value] pair".to_string()),
        })
        .collect()
}

/// A MessagePack value as JSON (bytes as text where they are UTF-8).
pub fn to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Nil => J::Null,
        Value::Boolean(b) => J::Bool(*b),
        Value::Integer(i) => i
            .as_i64()
            .map(J::from)
            .or_else(|| i.as_u64().map(J::from))
            .unwrap_or(J::Null),
        Value::F32(f) => serde_json::Number::from_f64(*f as f64).map_or(J::Null, J::Number),
        Value::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::String(_) | Value::Binary(_) => match str_of(v) {
            Some(s) => J::String(s.to_string()),
            None => J::Null,
        },
        Value::Array(a) => J::Array(a.iter().map(to_json).collect()),
        Value::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| {
                    (
                        str_of(k).map(String::from).unwrap_or_else(|| k.to_string()),
                        to_json(v),
                    )
                })
                .collect(),
        ),
        Value::Ext(_, _) => J::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let r = request(7, "keepalive", vec![]);
        assert_eq!(
            decode(&r).unwrap(),
            Frame::Request {
                seq: 7,
                op: "keepalive".into(),
                msg: map(vec![
                    ("seq_number", Value::from(7)),
                    ("op", Value::from("keepalive"))
                ]),
            }
        );
        let ok = response(3, Value::from("fine"), false);
        assert_eq!(
            decode(&ok).unwrap(),
            Frame::Response {
                seq: 3,
                result: Ok(Value::from("fine"))
            }
        );
        let bad = response(4, Value::from("boom"), true);
        assert_eq!(
            decode(&bad).unwrap(),
            Frame::Response {
                seq: 4,
                result: Err("boom".into())
            }
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[0xc1]).is_err());
        assert!(decode(&encode(&Value::from(5))).is_err());
        assert!(decode(&encode(&map(vec![("op", Value::from("x"))]))).is_err());
        assert!(decode(&encode(&map(vec![("seq_number", Value::from(1))]))).is_err());
        let mut two = request(1, "a", vec![]);
        two.extend(request(2, "b", vec![]));
        assert!(decode(&two).is_err());
    }

    #[test]
    fn update_args_are_key_value_pairs() {
        let args = Value::Array(vec![
            Value::Array(vec![
                Value::from("stdout"),
                Value::Array(vec![Value::from("hi\n")]),
            ]),
            Value::Array(vec![Value::from("rc"), Value::from(0)]),
        ]);
        let pairs = update_pairs(&args).unwrap();
        assert_eq!(pairs[1], ("rc".to_string(), Value::from(0)));
        assert!(update_pairs(&Value::from(1)).is_err());
        assert!(update_pairs(&Value::Array(vec![Value::from(1)])).is_err());
    }
}
