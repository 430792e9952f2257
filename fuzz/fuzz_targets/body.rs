//! The request body read on any bytes: never a panic; the typed read and the document read
//! accept exactly the same texts, agree on the typed fields, and accept only what serde_json
//! reads as an object. Input: the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_failover::request::body::{Body, Keep};
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let typed = Body::parse(data.to_vec(), Keep::Typed);
    let document = Body::parse(data.to_vec(), Keep::Document);
    assert_eq!(typed.is_ok(), document.is_ok(), "{typed:?} / {document:?}");
    let (Ok(typed), Ok(document)) = (typed, document) else {
        return;
    };
    assert_eq!(
        (&typed.model, typed.stream, &typed.previous_response_id),
        (&document.model, document.stream, &document.previous_response_id)
    );
    // serde_json reads the same object (its map keeps a repeated member's last value).
    let object: Map<String, Value> = serde_json::from_slice(data).expect("an object");
    let members = document.members();
    let last: Map<String, Value> = members.iter().cloned().collect();
    assert_eq!(last, object);
    assert_eq!(typed.members(), members, "the typed read's safety net reads the same");
    assert_eq!(typed.raw(), data);
    if let Some(Value::String(m)) = object.get("model") {
        assert_eq!(typed.model.as_deref(), Some(m.as_str()));
    }
});
