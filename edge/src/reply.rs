//! Redis replies as JSON values: what the L1 stores and hands to callers.

use redis::Value as Reply;
use serde_json::{Map, Number, Value};

/// Converts a RESP3 reply (maps stay maps) into JSON. Binary strings are read lossily as UTF-8;
/// gpucache replies are ASCII.
pub fn to_json(reply: Reply) -> Value {
    match reply {
        Reply::Nil => Value::Null,
        Reply::Int(n) => Value::from(n),
        Reply::Double(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
        Reply::Boolean(b) => Value::Bool(b),
        Reply::BulkString(bytes) => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
        Reply::SimpleString(s) => Value::String(s),
        Reply::Okay => Value::String("OK".into()),
        Reply::VerbatimString { text, .. } => Value::String(text),
        Reply::Array(items) | Reply::Set(items) => {
            Value::Array(items.into_iter().map(to_json).collect())
        }
        Reply::Map(pairs) => {
            let mut map = Map::with_capacity(pairs.len());
            for (k, v) in pairs {
                let key = match to_json(k) {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                map.insert(key, to_json(v));
            }
            Value::Object(map)
        }
        Reply::Attribute { data, .. } => to_json(*data),
        other => Value::String(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_arrays_and_scalars_convert() {
        let reply = Reply::Map(vec![
            (
                Reply::BulkString(b"gpu_id".to_vec()),
                Reply::BulkString(b"g1".to_vec()),
            ),
            (Reply::SimpleString("version".into()), Reply::Int(7)),
            (Reply::BulkString(b"booking_id".to_vec()), Reply::Nil),
            (
                Reply::BulkString(b"rows".to_vec()),
                Reply::Array(vec![Reply::Int(1), Reply::Double(0.5)]),
            ),
        ]);
        assert_eq!(
            to_json(reply),
            json!({"gpu_id": "g1", "version": 7, "booking_id": null, "rows": [1, 0.5]})
        );
    }
}
