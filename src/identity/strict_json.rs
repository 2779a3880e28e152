//! JSON parsing that rejects duplicate object keys at any depth. OWNER: identity helper.
//!
//! RFC 7515 and RFC 7519 say a JWS header or JWT claims set with duplicate member names must
//! be rejected (or the last one used). Different parsers pick different duplicates, which is
//! exactly the disagreement an attacker exploits (`{"alg":"RS256","alg":"none"}`), so we
//! reject. Used for JWT headers, claims and JWKS documents. Pure: no I/O.
//!
//! Nesting depth is bounded by serde_json's own recursion limit (128), which applies to any
//! visitor, so a deeply nested document is a syntax error rather than a stack overflow.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why a document was rejected. Messages never quote the document itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictJsonError {
    /// The same member name appears twice in one object. Carries the member name so callers
    /// that may show it (key sets) can; token callers must not.
    #[error("duplicate member `{0}`")]
    DuplicateKey(String),
    /// Not JSON at all, trailing data, too deep, invalid UTF-8, ...
    #[error("{0}")]
    Syntax(String),
    /// Valid JSON, but the top level is not an object.
    #[error("the top level is not a JSON object")]
    NotObject,
}

/// Parses one JSON value, rejecting duplicate keys at any depth and any trailing data.
pub fn parse_value(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    let duplicate = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = StrictSeed {
        duplicate: &duplicate,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(v) => Ok(v),
        Err(e) => match duplicate.take() {
            Some(key) => Err(StrictJsonError::DuplicateKey(key)),
            None => Err(StrictJsonError::Syntax(syntax_message(&e))),
        },
    }
}

/// Parses a JSON object (the only shape a JWT header, claims set or JWKS may have).
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, StrictJsonError> {
    match parse_value(bytes)? {
        Value::Object(map) => Ok(map),
        _ => Err(StrictJsonError::NotObject),
    }
}

/// serde_json's messages describe the syntax problem and its position, never the input.
fn syntax_message(e: &serde_json::Error) -> String {
    e.to_string()
}

/// A seed so every nested value is parsed with the same duplicate check.
#[derive(Clone, Copy)]
struct StrictSeed<'a> {
    /// Set to the offending key when a duplicate is found, so the caller can tell a duplicate
    /// from a syntax error without parsing error strings.
    duplicate: &'a Cell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for StrictSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number is not finite"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        // Keys are compared after unescaping, so `"a"` and `"\u0061"` are the same member.
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                let err = de::Error::custom("duplicate member");
                self.duplicate.set(Some(key));
                return Err(err);
            }
            let value = map.next_value_seed(self)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_objects() {
        let m = parse_object(br#"{"a":1,"b":[1,2,{"c":"d"}],"e":null,"f":1.5}"#).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m["b"][2]["c"], "d");
    }

    #[test]
    fn rejects_top_level_duplicates() {
        assert_eq!(
            parse_object(br#"{"alg":"RS256","alg":"none"}"#),
            Err(StrictJsonError::DuplicateKey("alg".into()))
        );
    }

    #[test]
    fn rejects_nested_duplicates() {
        assert_eq!(
            parse_object(br#"{"a":{"b":[{"c":1,"c":2}]}}"#),
            Err(StrictJsonError::DuplicateKey("c".into()))
        );
    }

    #[test]
    fn duplicates_are_compared_after_unescaping() {
        assert_eq!(
            parse_object(br#"{"a":1,"\u0061":2}"#),
            Err(StrictJsonError::DuplicateKey("a".into()))
        );
    }

    #[test]
    fn same_key_in_sibling_objects_is_fine() {
        assert!(parse_object(br#"{"x":{"a":1},"y":{"a":2}}"#).is_ok());
    }

    #[test]
    fn rejects_non_objects_and_garbage() {
        assert_eq!(parse_object(b"[1]"), Err(StrictJsonError::NotObject));
        assert_eq!(parse_object(b"\"s\""), Err(StrictJsonError::NotObject));
        assert!(matches!(
            parse_object(b"{"),
            Err(StrictJsonError::Syntax(_))
        ));
        assert!(matches!(
            parse_object(b"{} x"),
            Err(StrictJsonError::Syntax(_))
        ));
        assert!(matches!(
            parse_object(b"{\"a\":\xff}"),
            Err(StrictJsonError::Syntax(_))
        ));
    }

    #[test]
    fn rejects_too_deep_documents_without_overflowing() {
        let mut doc = String::from("{\"a\":");
        doc.push_str(&"[".repeat(100_000));
        assert!(matches!(
            parse_object(doc.as_bytes()),
            Err(StrictJsonError::Syntax(_))
        ));
    }
}
