//! Client request -> the body one target gets (its `model`, the deployment where Azure wants it,
//! its `override_params`).

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::config::{Step, Target};
use crate::request::body::Body;
use crate::target::provider;

pub use crate::request::operation::Operation;

/// The body `target` gets for `op` with its own settings (see [`body_for_step`]).
pub fn body_for(target: &Target, op: Operation, body: &Body) -> Option<Vec<u8>> {
    body_for_step(target, &step_of(target), op, body)
}

/// The body `target` gets as `step` of a chain, for `op`: the client's, unless the step sets
/// `model` or `override_params`, or the target's API wants the deployment in the body (Azure's
/// v1 API, the Responses API on Azure). `None` means "unchanged" (the client's bytes are sent as
/// they are).
pub fn body_for_step(target: &Target, step: &Step, op: Operation, body: &Body) -> Option<Vec<u8>> {
    let model = provider::body_model(target, op, step.model.as_deref(), body.model.as_deref());
    let overrides = step.override_params.as_ref();
    if overrides.is_none() && model == body.model.as_deref() {
        return None;
    }
    rewrite(body, model, overrides)
}

/// The body with `model` set (in place, or first when the client sent none) and `overrides`
/// deep-merged; `None` when neither is asked for.
pub fn rewrite(
    body: &Body,
    model: Option<&str>,
    overrides: Option<&Map<String, Value>>,
) -> Option<Vec<u8>> {
    if model.is_none() && overrides.is_none() {
        return None;
    }
    let document = body.members();
    let mut members: Vec<(Cow<str>, Cow<Value>)> = document
        .iter()
        .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v)))
        .collect();
    if let Some(model) = model {
        let value = Cow::Owned(Value::String(model.to_string()));
        match members.iter_mut().find(|(k, _)| k == "model") {
            Some((_, v)) => *v = value,
            None => members.insert(0, (Cow::Borrowed("model"), value)),
        }
    }
    for (key, value) in overrides.into_iter().flatten() {
        // A repeated member: the last one is the one that counts.
        match members.iter_mut().rev().find(|(k, _)| k == key) {
            Some((_, existing)) => merge(existing.to_mut(), value),
            None => members.push((Cow::Borrowed(key.as_str()), Cow::Borrowed(value))),
        }
    }
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    for (i, (key, value)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, key.as_ref()).ok()?;
        out.push(b':');
        serde_json::to_writer(&mut out, value.as_ref()).ok()?;
    }
    out.push(b'}');
    Some(out)
}

/// Whether `target` as `step` may change a body for `op` (so the parse must keep the document).
pub fn may_change_body(target: &Target, step: &Step, op: Operation) -> bool {
    step.model.is_some()
        || step.override_params.is_some()
        || provider::deployment_in_body(target, op)
}

/// The model `target` is asked for with its own settings: its `model` if set, else the client's.
pub fn model_for<'a>(target: &'a Target, body: &'a Body) -> Option<&'a str> {
    target.model.as_deref().or(body.model.as_deref())
}

/// The model a step is asked for: its `model` (the route step's, or the target's) if set, else
/// the client's.
pub fn model_of<'a>(step: &'a Step, body: &'a Body) -> Option<&'a str> {
    step.model.as_deref().or(body.model.as_deref())
}

/// A target's own settings as a step (its index does not matter here).
fn step_of(target: &Target) -> Step {
    Step {
        target: 0,
        retries: target.retries,
        timeout: target.timeout,
        model: target.model.clone(),
        override_params: target.override_params.clone(),
    }
}

/// Deep merge: objects merge key by key, anything else replaces.
fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(dst), Value::Object(src)) => {
            for (k, v) in src {
                match dst.get_mut(k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        dst.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (into, from) => *into = from.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, NoEnv};
    use crate::request::body::Keep;
    use serde_json::{json, Value};

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

    fn doc(text: &[u8]) -> Body {
        Body::parse(text.to_vec(), Keep::Document).unwrap()
    }

    #[test]
    fn target_body_overrides_model_and_merges_params() {
        let body =
            doc(br#"{"model":"gpt-4","temperature":1,"stream_options":{"a":1},"messages":[]}"#);
        let chat = Operation::ChatCompletions;
        assert_eq!(body_for(&target(json!({})), chat, &body), None);
        let t = target(
            json!({"model": "gpt-4o-mini", "override_params": {"temperature": 0, "stream_options": {"include_usage": true}}}),
        );
        let out: Value = serde_json::from_slice(&body_for(&t, chat, &body).unwrap()).unwrap();
        assert_eq!(
            out,
            json!({"model": "gpt-4o-mini", "temperature": 0, "stream_options": {"a": 1, "include_usage": true}, "messages": []})
        );
        assert_eq!(model_for(&t, &body), Some("gpt-4o-mini"));
        assert_eq!(model_for(&target(json!({})), &body), Some("gpt-4"));
    }

    #[test]
    fn a_rewrite_keeps_the_clients_members_and_their_order() {
        let body = doc(br#"{"messages":[{"role":"user","content":"hi"}],"seed":18446744073709551615,"x":1.5,"x":2}"#);
        let out = rewrite(&body, Some("dep"), None).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"dep","messages":[{"content":"hi","role":"user"}],"seed":18446744073709551615,"x":1.5,"x":2}"#
        );
        // An override of a repeated member changes the one that counts (the last).
        let overrides = json!({"x": 3, "stream_options": {"include_usage": true}});
        let out = rewrite(&body, None, overrides.as_object()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.ends_with(r#""x":1.5,"x":3,"stream_options":{"include_usage":true}}"#),
            "{text}"
        );
        // Read without the document (the plan's mistake), the rewrite is the same.
        let typed = Body::parse(body.raw().to_vec(), Keep::Typed).unwrap();
        assert_eq!(
            rewrite(&typed, Some("dep"), None),
            rewrite(&body, Some("dep"), None)
        );
    }
}
