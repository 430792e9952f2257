//! Response cache: keys and entries. Entries live in Envoy shared data in a fixed set of
//! `max_entries` slots (a direct-mapped cache), so memory is bounded by construction however many
//! distinct prompts arrive: a new entry evicts whatever held its slot.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::request::auth::sha256;
use crate::request::body::Body;
use crate::target::rewrite::Operation;

pub type Digest = [u8; 32];

/// Shared-data key prefix; a slot's key is `<prefix><slot>`.
pub const SLOT_PREFIX: &str = "llm_failover.cache.";

/// The cache key of a request: SHA-256 over the cache's scope (a route's name), the gateway key's
/// name, the operation and the canonical JSON of the body (serde_json's: object keys sorted, a repeated key's last value,
/// no insignificant white space, integers apart from decimals so that `1` and `1.0` differ), so
/// two bodies that differ only in key order, spacing or escapes share an entry.
pub fn key(scope: &str, key_name: &str, op: Operation, body: &Body) -> Option<Digest> {
    let members = body.members();
    let sorted: BTreeMap<&str, &Value> = members.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let canonical = serde_json::to_vec(&sorted).ok()?;
    let mut material = Vec::with_capacity(scope.len() + key_name.len() + canonical.len() + 24);
    material.extend_from_slice(scope.as_bytes());
    material.push(0);
    material.extend_from_slice(key_name.as_bytes());
    material.push(0);
    material.extend_from_slice(op.as_str().as_bytes());
    material.push(0);
    material.extend_from_slice(&canonical);
    Some(sha256(&material))
}

pub fn slot(digest: &Digest, max_entries: u32) -> u32 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_le_bytes(first) % u64::from(max_entries.max(1))) as u32
}

/// The shared-data key of a slot of the top-level cache.
pub fn slot_key(slot: u32) -> String {
    slot_key_in("", slot)
}

/// The shared-data key of a slot of the cache of `scope` (a route's name; "" for the top-level
/// cache): each cache has slots of its own.
pub fn slot_key_in(scope: &str, slot: u32) -> String {
    if scope.is_empty() {
        format!("{SLOT_PREFIX}{slot}")
    } else {
        format!("{SLOT_PREFIX}{scope}.{slot}")
    }
}

/// A cached 200 response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub digest: Digest,
    pub expires_ms: u64,
    pub target: String,
    pub content_type: String,
    pub body: Vec<u8>,
}

const MAGIC: u8 = 0xC1;

impl Entry {
    /// Empty (read back as no entry) when `target` or `content_type` is longer than the 65535
    /// bytes their length fields hold.
    pub fn encode(&self) -> Vec<u8> {
        let (Ok(target_len), Ok(type_len)) = (
            u16::try_from(self.target.len()),
            u16::try_from(self.content_type.len()),
        ) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(
            1 + 32 + 8 + 4 + self.target.len() + self.content_type.len() + self.body.len(),
        );
        out.push(MAGIC);
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        out.extend_from_slice(&target_len.to_le_bytes());
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(&type_len.to_le_bytes());
        out.extend_from_slice(self.content_type.as_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let mut r = Reader(bytes);
        if r.take(1)? != [MAGIC] {
            return None;
        }
        let digest: Digest = r.take(32)?.try_into().ok()?;
        let expires_ms = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let target = r.string()?;
        let content_type = r.string()?;
        Some(Entry {
            digest,
            expires_ms,
            target,
            content_type,
            body: r.0.to_vec(),
        })
    }

    /// Only the expiry, without copying the body (for the sweep).
    pub fn expiry(bytes: &[u8]) -> Option<u64> {
        let b = bytes.get(33..41)?;
        (bytes.first() == Some(&MAGIC))
            .then(|| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
}

/// The entry in a slot's bytes if it is for `digest` and still fresh.
pub fn lookup(bytes: &[u8], digest: &Digest, now_ms: u64) -> Option<Entry> {
    let entry = Entry::decode(bytes)?;
    (entry.digest == *digest && entry.expires_ms > now_ms).then_some(entry)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn string(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::request::body::Keep;

    fn key(name: &str, op: Operation, body: &[u8]) -> Option<Digest> {
        let body = Body::parse(body.to_vec(), Keep::Document).ok()?;
        super::key("", name, op, &body)
    }

    #[test]
    fn every_cache_has_its_own_keys_and_slots() {
        let body = Body::parse(br#"{"m":1}"#.to_vec(), Keep::Document).unwrap();
        let op = Operation::ChatCompletions;
        assert_ne!(
            super::key("", "k", op, &body),
            super::key("r", "k", op, &body)
        );
        assert_ne!(
            super::key("ab", "c", op, &body),
            super::key("a", "bc", op, &body)
        );
        assert_eq!(slot_key(7), "llm_failover.cache.7");
        assert_eq!(slot_key_in("test", 7), "llm_failover.cache.test.7");
    }

    #[test]
    fn numbers_count_as_integers_or_decimals() {
        let one = key("a", Operation::ChatCompletions, br#"{"t":1}"#);
        assert_ne!(one, key("a", Operation::ChatCompletions, br#"{"t":1.0}"#));
        assert_eq!(
            key("a", Operation::ChatCompletions, br#"{"t":1.0}"#),
            key("a", Operation::ChatCompletions, br#"{"t":1.00}"#)
        );
        assert_eq!(
            one,
            key("a", Operation::ChatCompletions, br#"{"t":1,"t":1}"#)
        );
        assert_eq!(
            key(
                "a",
                Operation::ChatCompletions,
                br#"{"t":"\u0041","n":{"b":1,"a":2}}"#
            ),
            key(
                "a",
                Operation::ChatCompletions,
                br#"{"n":{"a":2,"b":1},"t":"A"}"#
            )
        );
    }

    #[test]
    fn key_ignores_key_order_and_spacing_but_not_content() {
        let a = key(
            "app",
            Operation::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let b = key(
            "app",
            Operation::ChatCompletions,
            br#"{ "messages" : [ {"content":"hi", "role":"user"} ], "model":"m" }"#,
        )
        .unwrap();
        assert_eq!(a, b);
        let other_content = key(
            "app",
            Operation::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"user","content":"ho"}]}"#,
        )
        .unwrap();
        let other_key = key(
            "batch",
            Operation::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        let other_op = key(
            "app",
            Operation::Completions,
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert_ne!(a, other_content);
        assert_ne!(a, other_key);
        assert_ne!(a, other_op);
        assert!(key("app", Operation::ChatCompletions, b"not json").is_none());
    }

    #[test]
    fn entries_round_trip_and_expire() {
        let digest = [7u8; 32];
        let e = Entry {
            digest,
            expires_ms: 5000,
            target: "azure".into(),
            content_type: "application/json".into(),
            body: b"{\"id\":1}".to_vec(),
        };
        let bytes = e.encode();
        assert_eq!(Entry::decode(&bytes), Some(e.clone()));
        assert_eq!(Entry::expiry(&bytes), Some(5000));
        assert_eq!(lookup(&bytes, &digest, 4999), Some(e));
        assert_eq!(lookup(&bytes, &digest, 5000), None);
        assert_eq!(lookup(&bytes, &[8u8; 32], 0), None);
        for bad in [
            &b""[..],
            b"\xC1",
            &bytes[..40],
            b"garbage that is long enough to look like an entry......",
        ] {
            assert_eq!(Entry::decode(bad), None);
        }
    }

    #[test]
    fn slots_stay_within_bounds() {
        for i in 0..200u8 {
            let d = sha256(&[i]);
            assert!(slot(&d, 10) < 10);
        }
        assert_eq!(slot(&[0xff; 32], 1), 0);
    }
}
