//! Cache keys and entries: `cache::key` canonicalises any body; `Entry::decode` reads any bytes
//! and accepts only what `Entry::encode` writes. Input: [operation][name length][name][rest].
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_failover::cache::{self, Entry};
use llm_failover::json;
use llm_failover::rewrite::Operation;
use serde_json::Value;

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

    // Keys: defined exactly for JSON, and the same for every spelling of the same document
    // (numbers spelled the same).
    let key = cache::key(&name, op, bytes);
    let parsed = json::parse(bytes).ok();
    assert_eq!(key.is_some(), parsed.is_some());
    if let (Some(key), Some(parsed)) = (key, parsed) {
        assert_eq!(cache::key(&name, op, &json::to_vec(&parsed)), Some(key));
        // serde_json's spellings: its compact and pretty texts spell numbers alike. serde_json
        // (without `float_roundtrip`) may refuse a number within an ULP of f64::MAX.
        if let Ok(doc) = serde_json::from_slice::<Value>(bytes) {
            let compact = serde_json::to_vec(&doc).unwrap();
            let pretty = serde_json::to_vec_pretty(&doc).unwrap();
            assert_eq!(
                cache::key(&name, op, &pretty),
                cache::key(&name, op, &compact)
            );
        }
        assert_ne!(cache::key(&format!("{name}x"), op, bytes), Some(key));
        let max_entries = u32::from_le_bytes([key[8], key[9], 0, 0]);
        assert!(cache::slot(&key, max_entries) < max_entries.max(1));
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
        digest: key.unwrap_or([7; 32]),
        expires_ms: bytes.len() as u64,
        target: name.clone(),
        content_type: String::from_utf8_lossy(bytes).into_owned(),
        body: bytes.to_vec(),
    };
    let fits = entry.content_type.len() <= usize::from(u16::MAX);
    assert_eq!(Entry::decode(&entry.encode()), fits.then_some(entry));
});
