//! Client request -> request for one target: which operation it is, what its body says, and the
//! body a target gets (its `model` and `override_params`).

use crate::config::Target;
use crate::json::{self, Value};

/// The operations the filter rewrites and fails over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Operation {
    /// From the client's `:path` (query string allowed). Only `POST` is an operation.
    pub fn from_request(method: &str, path: &str) -> Option<Operation> {
        if method != "POST" {
            return None;
        }
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let path = path.strip_suffix('/').unwrap_or(path);
        match path {
            "/v1/chat/completions" => Some(Operation::ChatCompletions),
            "/v1/completions" => Some(Operation::Completions),
            "/v1/embeddings" => Some(Operation::Embeddings),
            _ => None,
        }
    }

    pub fn azure_suffix(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat/completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat.completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
        }
    }
}

/// What the filter needs to know from a request body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BodyInfo {
    pub model: Option<String>,
    pub stream: bool,
}

/// Checks that `body` is one JSON object and reads `model` and `stream` from it, without
/// building the whole document.
pub fn inspect(body: &[u8]) -> Result<BodyInfo, String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => return Err("the body is empty".to_string()),
        Some(b'{') => {}
        Some(_) => return Err("the body is not a JSON object".to_string()),
    }
    // One pass: `model` and `stream` are kept, every other value is checked as strictly as
    // `body_for` and the cache key will read it. A duplicate is refused: providers would not
    // agree on which value counts.
    let [model, stream] =
        json::scan_object(body, ["model", "stream"]).map_err(|e| format!("invalid JSON ({e})"))?;
    let model = match model {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err("'model' must be a string".to_string()),
    };
    let stream = match stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err("'stream' must be a boolean".to_string()),
    };
    Ok(BodyInfo { model, stream })
}

/// The body `target` gets: the client's, unless the target sets `model` or `override_params`.
/// `None` means "unchanged" (no copy made).
pub fn body_for(target: &Target, body: &[u8]) -> Option<Vec<u8>> {
    if target.model.is_none() && target.override_params.is_none() {
        return None;
    }
    let Ok(Value::Object(mut doc)) = json::parse(body) else {
        return None;
    };
    if let Some(model) = &target.model {
        doc.push(("model".to_string(), Value::String(model.clone())));
    }
    if let Some(overrides) = &target.override_params {
        merge(&mut doc, overrides);
    }
    Some(json::to_vec(&Value::Object(doc)))
}

/// The model `target` is asked for: its own `model` if set, else the client's.
pub fn model_for<'a>(target: &'a Target, info: &'a BodyInfo) -> Option<&'a str> {
    target.model.as_deref().or(info.model.as_deref())
}

/// Deep merge: objects merge key by key, anything else replaces. A key may repeat in `into`
/// (the last one counts, as when it is written out); `from` has no repeated keys.
fn merge(into: &mut json::Object, from: &json::Object) {
    for (k, v) in from {
        let last = into.iter_mut().rev().find(|(key, _)| key == k);
        match (last, v) {
            (Some((_, Value::Object(dst))), Value::Object(src)) => merge(dst, src),
            _ => into.push((k.clone(), v.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Env};
    use serde_json::{json, Value};

    struct NoEnv;
    impl Env for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }

    fn target(extra: Value) -> Target {
        let mut t = json!({"name": "o", "provider": "openai", "cluster": "o", "api_key": "k"});
        for (k, v) in extra.as_object().unwrap() {
            t[k] = v.clone();
        }
        let cfg = json!({ "targets": [t] });
        config::parse(cfg.to_string().as_bytes(), &NoEnv)
            .unwrap()
            .targets
            .remove(0)
    }

    #[test]
    fn operations_are_recognised_by_method_and_path() {
        let cases = [
            (
                "POST",
                "/v1/chat/completions",
                Some(Operation::ChatCompletions),
            ),
            (
                "POST",
                "/v1/chat/completions?foo=bar",
                Some(Operation::ChatCompletions),
            ),
            (
                "POST",
                "/v1/chat/completions/",
                Some(Operation::ChatCompletions),
            ),
            ("POST", "/v1/completions", Some(Operation::Completions)),
            ("POST", "/v1/embeddings", Some(Operation::Embeddings)),
            ("GET", "/v1/chat/completions", None),
            ("POST", "/v1/models", None),
            ("POST", "/v1/chat/completions/x", None),
            ("POST", "/V1/CHAT/COMPLETIONS", None),
        ];
        for (method, path, want) in cases {
            assert_eq!(
                Operation::from_request(method, path),
                want,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn body_inspection_reads_model_and_stream() {
        assert_eq!(
            inspect(br#" {"model":"gpt-4","stream":true,"messages":[]}"#),
            Ok(BodyInfo {
                model: Some("gpt-4".into()),
                stream: true
            })
        );
        assert_eq!(inspect(br#"{"messages":[]}"#), Ok(BodyInfo::default()));
        assert_eq!(
            inspect(br#"{"model":null,"stream":null}"#),
            Ok(BodyInfo::default())
        );
    }

    #[test]
    fn bodies_that_cannot_be_failed_over_are_refused() {
        for body in [
            &b""[..],
            b"   ",
            b"[1,2]",
            b"\"s\"",
            b"42",
            b"{",
            br#"{"model": 5}"#,
            br#"{"stream": "yes"}"#,
            br#"{"model": "a", "model": "b"}"#,
            br#"{"stream": true, "stream": false}"#,
            br#"{"a":1} trailing"#,
            b"\xff\xfe",
        ] {
            assert!(
                inspect(body).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn target_body_overrides_model_and_merges_params() {
        let body = br#"{"model":"gpt-4","temperature":1,"stream_options":{"a":1},"messages":[]}"#;
        assert_eq!(body_for(&target(json!({})), body), None);
        let t = target(
            json!({"model": "gpt-4o-mini", "override_params": {"temperature": 0, "stream_options": {"include_usage": true}}}),
        );
        let out: Value = serde_json::from_slice(&body_for(&t, body).unwrap()).unwrap();
        assert_eq!(
            out,
            json!({"model": "gpt-4o-mini", "temperature": 0, "stream_options": {"a": 1, "include_usage": true}, "messages": []})
        );
        let info = BodyInfo {
            model: Some("gpt-4".into()),
            stream: false,
        };
        assert_eq!(model_for(&t, &info), Some("gpt-4o-mini"));
        assert_eq!(model_for(&target(json!({})), &info), Some("gpt-4"));
    }
}
