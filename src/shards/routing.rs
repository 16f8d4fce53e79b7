//! Which hash a record routes by: `route_by` is an ordered list of `key`, `header:NAME` and
//! `json:/pointer` fields; their values are joined and hashed with xxh3-64 (fixed per topic).

use xxhash_rust::xxh3::Xxh3;

use crate::config::RouteField;
use crate::protocol::records::Record;

fn field_value(field: &RouteField, r: &Record) -> Option<Vec<u8>> {
    match field {
        RouteField::Key => r.key.as_ref().map(|k| k.to_vec()),
        // The first header with the name, as Kafka's Headers.lastHeader would be ambiguous.
        RouteField::Header(name) => r
            .headers
            .iter()
            .find(|(k, _)| k.as_ref() == name.as_bytes())
            .and_then(|(_, v)| v.as_ref().map(|v| v.to_vec())),
        RouteField::Json(ptr) => {
            let v: serde_json::Value = serde_json::from_slice(r.value.as_ref()?).ok()?;
            match v.pointer(ptr)? {
                serde_json::Value::String(s) => Some(s.clone().into_bytes()),
                serde_json::Value::Null => None,
                other => Some(other.to_string().into_bytes()),
            }
        }
    }
}

/// The routing hash of a record, or `None` if it has neither routing fields nor a key (such
/// records are spread).
pub fn route_hash(fields: &[RouteField], r: &Record) -> Option<u64> {
    let values: Vec<Option<Vec<u8>>> = fields.iter().map(|f| field_value(f, r)).collect();
    if values.iter().all(Option::is_none) {
        return r.key.as_ref().map(|k| key_hash(k));
    }
    let mut h = Xxh3::new();
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            h.update(&[0x1f]); // unit separator between fields
        }
        if let Some(v) = v {
            h.update(&(v.len() as u32).to_be_bytes());
            h.update(v);
        } else {
            h.update(&u32::MAX.to_be_bytes());
        }
    }
    Some(h.digest())
}

/// The hash of a bare key, as `route_hash` computes it for `route_by = ["key"]`; used to
/// report where a key lives.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&(key.len() as u32).to_be_bytes());
    h.update(key);
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(key: Option<&str>, headers: &[(&str, &str)], value: &str) -> Record {
        Record {
            attributes: 0,
            timestamp: 0,
            key: key.map(|k| Bytes::from(k.to_string())),
            value: Some(Bytes::from(value.to_string())),
            headers: headers
                .iter()
                .map(|(k, v)| (Bytes::from(k.to_string()), Some(Bytes::from(v.to_string()))))
                .collect(),
        }
    }

    #[test]
    fn fields_parse_and_print_back() {
        for s in ["key", "header:user", "json:/a/b"] {
            let f = RouteField::try_from(s.to_string()).unwrap();
            assert_eq!(String::from(f), s);
        }
        assert!(RouteField::try_from("header:".to_string()).is_err());
        assert!(RouteField::try_from("json:a".to_string()).is_err());
        assert!(RouteField::try_from("value".to_string()).is_err());
    }

    #[test]
    fn routing_is_a_pure_function_of_the_routing_fields() {
        let f = vec![
            RouteField::Header("user".into()),
            RouteField::Json("/type".into()),
        ];
        let a = rec(Some("x"), &[("user", "u1")], r#"{"type":"click","n":1}"#);
        let b = rec(
            Some("y"),
            &[("other", "z"), ("user", "u1")],
            r#"{"n":2,"type":"click"}"#,
        );
        assert_eq!(route_hash(&f, &a), route_hash(&f, &b));
        let c = rec(Some("x"), &[("user", "u2")], r#"{"type":"click"}"#);
        assert_ne!(route_hash(&f, &a), route_hash(&f, &c));
    }

    #[test]
    fn missing_fields_fall_back_to_the_key_then_spread() {
        let f = vec![RouteField::Header("user".into())];
        let keyed = rec(Some("k1"), &[], "{}");
        assert_eq!(
            route_hash(&f, &keyed),
            route_hash(&f, &rec(Some("k1"), &[], "other"))
        );
        assert_eq!(route_hash(&f, &rec(None, &[], "{}")), None);
        assert_eq!(
            route_hash(&[RouteField::Key], &keyed),
            Some(key_hash(b"k1"))
        );
    }
}
