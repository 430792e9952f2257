//! A request body, read once (by serde_json) into what the filter decides on: `model`,
//! `stream`, `previous_response_id`, and, when a rewrite or the cache key will need them, the
//! document's members. Everything downstream (the plan, the cache key, each target's body) takes
//! this [`Body`]; nothing reads the client's bytes again.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// How much of the body the parse keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Only the typed fields; every other value is checked, not built.
    Typed,
    /// The typed fields and every member as a `serde_json::Value`, in order.
    Document,
}

/// The client's bytes and what was read from them.
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    raw: Vec<u8>,
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage`: whether a chat stream's last chunk will carry usage.
    pub include_usage: bool,
    pub previous_response_id: Option<String>,
    /// The members in the client's order (`Keep::Document` only).
    members: Option<Vec<(String, Value)>>,
}

/// The typed fields; a repeated one is refused (providers would not agree on which counts).
const TYPED: [&str; 4] = ["model", "stream", "previous_response_id", "stream_options"];

impl Body {
    /// Checks that `bytes` is one JSON object (nesting at most serde_json's limit of 128) and
    /// reads it. The error is a reason for the client.
    pub fn parse(raw: Vec<u8>, keep: Keep) -> Result<Body, String> {
        let mut body = read(&raw, keep)?;
        body.raw = raw;
        Ok(body)
    }

    /// The client's bytes, as they arrived.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The members, in order: kept by a `Keep::Document` parse. The plan asks for the document
    /// whenever a target may change the body, so the parse here (of a body read with
    /// `Keep::Typed`) is a safety net, not a path taken.
    pub fn members(&self) -> Cow<'_, [(String, Value)]> {
        match &self.members {
            Some(m) => Cow::Borrowed(m),
            None => Cow::Owned(
                read(&self.raw, Keep::Document)
                    .ok()
                    .and_then(|b| b.members)
                    .unwrap_or_default(),
            ),
        }
    }

    /// Whether the members were kept by the parse.
    pub fn has_document(&self) -> bool {
        self.members.is_some()
    }
}

fn read(bytes: &[u8], keep: Keep) -> Result<Body, String> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err("the body is empty".to_string()),
        Some(b'{') => {}
        Some(_) => return Err("the body is not a JSON object".to_string()),
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let body = de
        .deserialize_map(BodyVisitor { keep })
        .and_then(|body| de.end().map(|()| body))
        .map_err(|e| {
            if e.is_data() {
                e.to_string()
            } else {
                format!("invalid JSON ({e})")
            }
        })?;
    Ok(body)
}

struct BodyVisitor {
    keep: Keep,
}

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = Body;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body, A::Error> {
        let mut members = (self.keep == Keep::Document).then(Vec::new);
        let mut typed: [Option<Value>; 4] = [None, None, None, None];
        while let Some(Key(key)) = map.next_key()? {
            let Some(slot) = TYPED
                .iter()
                .position(|t| *t == key)
                .and_then(|i| typed.get_mut(i))
            else {
                match &mut members {
                    None => map.next_value_seed(Check)?,
                    Some(members) => members.push((key.into_owned(), map.next_value()?)),
                }
                continue;
            };
            if slot.is_some() {
                return Err(de::Error::custom(format!("'{key}' appears more than once")));
            }
            let value: Value = map.next_value()?;
            if let Some(members) = &mut members {
                members.push((key.into_owned(), value.clone()));
            }
            *slot = Some(value);
        }
        let [model, stream, previous_response_id, stream_options] = typed;
        Ok(Body {
            raw: Vec::new(),
            model: string(model, "model").map_err(de::Error::custom)?,
            stream: match stream {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(_) => return Err(de::Error::custom("'stream' must be a boolean")),
            },
            previous_response_id: string(previous_response_id, "previous_response_id")
                .map_err(de::Error::custom)?,
            // Not checked further: whether the options are valid is the provider's to say.
            include_usage: stream_options
                .as_ref()
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            members,
        })
    }
}

fn string(value: Option<Value>, key: &str) -> Result<Option<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("'{key}' must be a string")),
    }
}

/// A member name, borrowed from the body when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Checks a value as strictly as building it would (syntax, UTF-8, escapes, number range,
/// nesting depth), without building it.
struct Check;

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(Check)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Check)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Check)?.is_some() {
            map.next_value_seed(Check)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn typed(body: &[u8]) -> Result<(Option<String>, bool, Option<String>), String> {
        Body::parse(body.to_vec(), Keep::Typed).map(|b| (b.model, b.stream, b.previous_response_id))
    }

    #[test]
    fn the_typed_fields_are_read() {
        assert_eq!(
            typed(br#" {"model":"gpt-4","stream":true,"messages":[]}"#),
            Ok((Some("gpt-4".into()), true, None))
        );
        assert_eq!(typed(br#"{"messages":[]}"#), Ok((None, false, None)));
        assert_eq!(
            typed(br#"{"model":null,"stream":null,"previous_response_id":null}"#),
            Ok((None, false, None))
        );
        assert_eq!(
            typed(br#"{"model":"o4","input":"hi","previous_response_id":"resp_1"}"#),
            Ok((Some("o4".into()), false, Some("resp_1".into())))
        );
        assert_eq!(
            typed(br#"{"mod\u0065l":"escaped key"}"#),
            Ok((Some("escaped key".into()), false, None))
        );
    }

    #[test]
    fn bodies_that_cannot_be_failed_over_are_refused_in_either_mode() {
        let deep = format!("{{\"x\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        for body in [
            &b""[..],
            b"   ",
            b"[1,2]",
            b"\"s\"",
            b"42",
            b"{",
            br#"{"model": 5}"#,
            br#"{"stream": "yes"}"#,
            br#"{"previous_response_id": 1}"#,
            br#"{"model": "a", "model": "b"}"#,
            br#"{"stream": true, "stream": false}"#,
            br#"{"a":1} trailing"#,
            br#"{"a":1}{}"#,
            b"\xff\xfe",
            br#"{"x":1e400}"#,
            br#"{"x":"\ud800"}"#,
            b"{\"x\":\"\xff\"}",
            b"{\"\xfe\":1}",
            deep.as_bytes(),
        ] {
            for keep in [Keep::Typed, Keep::Document] {
                assert!(
                    Body::parse(body.to_vec(), keep).is_err(),
                    "{keep:?} {:?}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn the_document_keeps_every_member_in_order() {
        let text = br#"{"z":1,"model":"m","a":{"y":[1.0,2]},"z":3}"#;
        let b = Body::parse(text.to_vec(), Keep::Document).unwrap();
        assert!(b.has_document());
        let members = b.members();
        let members: Vec<(&str, &Value)> = members.iter().map(|(k, v)| (k.as_str(), v)).collect();
        assert_eq!(
            members,
            vec![
                ("z", &json!(1)),
                ("model", &json!("m")),
                ("a", &json!({"y": [1.0, 2]})),
                ("z", &json!(3)),
            ]
        );
        let typed = Body::parse(text.to_vec(), Keep::Typed).unwrap();
        assert!(!typed.has_document());
        assert_eq!(
            typed.members(),
            b.members(),
            "read again when it was not kept"
        );
        assert_eq!(typed.raw(), text);
    }

    #[test]
    fn moderate_nesting_is_fine() {
        let body = format!("{{\"x\":{}1{}}}", "[".repeat(100), "]".repeat(100));
        for keep in [Keep::Typed, Keep::Document] {
            assert!(Body::parse(body.clone().into_bytes(), keep).is_ok());
        }
    }
}
