//! Cache keys and entries: `cache::key` canonicalises any body the filter accepts;
//! `Entry::decode` reads any bytes and accepts only what `Entry::encode` writes.
//! Input: [operation][name length][name][rest].
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_failover::request::body::{Body, Keep};
use llm_failover::answer::cache::{self, Entry};
use llm_failover::target::rewrite::Operation;
use serde_json::Value;

fn key(name: &str, op: Operation, bytes: &[u8]) -> Option<cache::Digest> {
    let body = Body::parse(bytes.to_vec(), Keep::Document).ok()?;
    cache::key("", name, op, &body)
}

fuzz_target!(|data: &[u8]| {
    let op = match data.first().copied().unwrap_or(0) % 3 {
        0 => Operation::ChatCompletions,
        1 => Operation::Completions,
        _ => Operation::Embeddings,
    };
    let rest = data.get(1..).unwrap_or_default();
    let n = usize::from(rest.first().copied().unwrap_or(0) % 32).min(rest.len().saturating_sub(1));
    let name = String::from_utf8_lossy(rest.get(1..1 + n).unwrap_or_default()).into_owned();
    let bytes = rest.get(1 + n..).unwrap_or_default();

    // Keys: defined for every accepted body, and the same for every spelling of the document.
    let k = key(&name, op, bytes);
    assert_eq!(k.is_some(), Body::parse(bytes.to_vec(), Keep::Typed).is_ok());
    if let Some(k) = k {
        let doc: Value = serde_json::from_slice(bytes).expect("accepted bodies are JSON");
        let compact = serde_json::to_vec(&doc).unwrap();
        let pretty = serde_json::to_vec_pretty(&doc).unwrap();
        // Written out by serde_json, a repeated member appears once: the same key only when
        // the body had none.
        if key(&name, op, &compact).is_some() {
            assert_eq!(key(&name, op, &pretty), key(&name, op, &compact));
        }
        assert_ne!(key(&format!("{name}x"), op, bytes), Some(k));
        let max_entries = u32::from_le_bytes([k[8], k[9], 0, 0]);
        assert!(cache::slot(&k, max_entries) < max_entries.max(1));
    }

    // Entries: any bytes decode or not, without panicking; what decodes re-encodes to itself.
    match Entry::decode(bytes) {
        Some(e) => {
            assert_eq!(e.encode(), bytes);
            assert_eq!(Entry::expiry(bytes), Some(e.expires_ms));
            for now in [0, e.expires_ms.saturating_sub(1), e.expires_ms, u64::MAX] {
                let hit = cache::lookup(bytes, &e.digest, now);
                assert_eq!(hit.is_some(), e.expires_ms > now);
            }
        }
        None => assert!(cache::lookup(bytes, &[0; 32], 0).is_none()),
    }
    let entry = Entry {
        digest: k.unwrap_or([7; 32]),
        expires_ms: bytes.len() as u64,
        target: name.clone(),
        content_type: String::from_utf8_lossy(bytes).into_owned(),
        body: bytes.to_vec(),
    };
    let fits = entry.content_type.len() <= usize::from(u16::MAX);
    assert_eq!(Entry::decode(&entry.encode()), fits.then_some(entry));
});
