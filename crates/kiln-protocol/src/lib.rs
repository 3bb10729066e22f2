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

/// Property-based checks of the decoder against any bytes and any
/// MessagePack value. `PROPTEST_CASES=N` runs more cases than the suite's
/// default (bench/fuzz.sh).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// Any MessagePack value, nested up to 4 deep.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Boolean),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::F64),
            ".{0,24}".prop_map(Value::from),
            vec(any::<u8>(), 0..24).prop_map(Value::Binary),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..8).prop_map(Value::Array),
                vec((inner.clone(), inner), 0..8).prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #[test]
        fn fuzz_decode_takes_any_bytes(data in vec(any::<u8>(), 0..512)) {
            let _ = decode(&data);
        }

        #[test]
        fn fuzz_decode_takes_any_value_and_a_cut_one(v in value(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&v);
            let frame = decode(&bytes);
            // Only a map with an integer seq_number and a string op is a frame.
            if frame.is_ok() {
                prop_assert!(matches!(v, Value::Map(_)));
            }
            // A frame cut short is an error, never a panic.
            let at = cut.index(bytes.len().max(1));
            if at < bytes.len() {
                prop_assert!(decode(&bytes[..at]).is_err());
            }
            let _ = update_pairs(&v);
            let _ = to_json(&v);
        }

        #[test]
        fn fuzz_requests_and_responses_round_trip(
            seq in any::<u64>(),
            op in "[a-z_]{1,16}",
            fields in vec(("[a-z]{1,8}", value()), 0..6),
            result in value(),
            failed in any::<bool>(),
        ) {
            prop_assume!(op != "response");
            let fields: Vec<(&str, Value)> = fields.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            match decode(&request(seq, &op, fields)) {
                Ok(Frame::Request { seq: s, op: o, .. }) => {
                    prop_assert_eq!(s, seq);
                    prop_assert_eq!(o, op);
                }
                other => prop_assert!(false, "{:?}", other),
            }
            match decode(&response(seq, result.clone(), failed)) {
                Ok(Frame::Response { seq: s, result: r }) => {
                    prop_assert_eq!(s, seq);
                    prop_assert_eq!(r.is_err(), failed);
                    if !failed {
                        prop_assert_eq!(r, Ok(result));
                    }
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }

    /// A header that declares far more than the frame holds (a 4-billion
    /// item array, map or string) is an error, not an allocation of it.
    #[test]
    fn a_huge_declared_length_is_an_error() {
        for header in [
            &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
            &[0xdf, 0xff, 0xff, 0xff, 0xff],
            &[0xdb, 0xff, 0xff, 0xff, 0xff],
            &[0xc6, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(decode(header).is_err(), "{header:x?}");
        }
        // A map whose one entry declares a huge array.
        let mut m = vec![0x81, 0xa2, b'o', b'p', 0xdd, 0x7f, 0xff, 0xff, 0xff];
        m.extend([0u8; 16]);
        assert!(decode(&m).is_err());
    }
}
