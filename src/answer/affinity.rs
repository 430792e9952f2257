//! Responses API affinity: a response id belongs to the target that created it, so a request
//! that continues it (`previous_response_id`) or reads it (`/v1/responses/{id}`) goes there.
//!
//! The owners live in Envoy shared data, bounded and collision-tolerant: the store is
//! set-associative. An id hashes to one of `max_affinity_entries / WAYS` sets (one shared-data
//! key each), and a set holds up to `WAYS` owners; only when all of a set's ways hold unexpired
//! owners does a new one evict the one that expires first (the oldest, under one TTL). A direct-
//! mapped store (one owner per slot) loses an owner at every collision: with 16,384 slots,
//! 6,500 ids already lose about 1,300 owners; this one loses none of them (`tests` below).
//!
//! An owner that is not known here (another Envoy created it, it expired or was evicted) is
//! found by probing: the request goes down the chain, and a target's "not found" answer for the
//! id ([`not_here`]) means "try the next one", not the client's answer.

use serde::Deserialize;
use serde_json::Value;

use crate::config::object::Obj;
use crate::request::auth::sha256;

/// Owners per set.
pub const WAYS: usize = 16;

/// Shared-data key prefix; a set's key is `<prefix><set>`.
pub const SET_PREFIX: &str = "llm_failover.owners.";

/// How much of an answer's beginning is read for its id.
pub const HEAD: usize = 1024;

/// The number of sets that hold `max_entries` owners.
pub fn sets(max_entries: u32) -> u32 {
    max_entries.div_ceil(WAYS as u32).max(1)
}

/// Where an id lives: its set, and the fingerprint it is known by there (another part of the
/// same digest, so two ids of one set are told apart with 2^-64 odds of a mix-up).
pub fn place(id: &str, max_entries: u32) -> (u32, u64) {
    let digest = sha256(id.as_bytes());
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = digest.get(at + i).copied().unwrap_or_default();
        }
        u64::from_le_bytes(bytes)
    };
    let set = (word(0) % u64::from(sets(max_entries))) as u32;
    (set, word(8))
}

pub fn set_key(set: u32) -> String {
    format!("{SET_PREFIX}{set}")
}

/// The target that created a response id, until `expires_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub id: String,
    pub target: String,
    pub expires_ms: u64,
}

/// One way of a set: an owner as stored (its id by fingerprint).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Way {
    fingerprint: u64,
    expires_ms: u64,
    target: String,
}

/// The owners of one set, as stored in its shared-data value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Set {
    ways: Vec<Way>,
}

const MAGIC: u8 = 0xA2;

impl Set {
    /// A set's value read back; anything unreadable (another format, a cut value) is empty.
    pub fn decode(bytes: &[u8]) -> Set {
        Set::try_decode(bytes).unwrap_or_default()
    }

    fn try_decode(bytes: &[u8]) -> Option<Set> {
        let (&magic, mut rest) = bytes.split_first()?;
        if magic != MAGIC {
            return None;
        }
        let mut ways = Vec::new();
        while !rest.is_empty() && ways.len() < WAYS {
            let (fingerprint, tail) = rest.split_at_checked(8)?;
            let (expires, tail) = tail.split_at_checked(8)?;
            let (&len, tail) = tail.split_first()?;
            let (target, tail) = tail.split_at_checked(usize::from(len))?;
            ways.push(Way {
                fingerprint: u64::from_le_bytes(fingerprint.try_into().ok()?),
                expires_ms: u64::from_le_bytes(expires.try_into().ok()?),
                target: String::from_utf8(target.to_vec()).ok()?,
            });
            rest = tail;
        }
        Some(Set { ways })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.ways.len() * 28);
        out.push(MAGIC);
        for way in &self.ways {
            let Ok(len) = u8::try_from(way.target.len()) else {
                continue;
            };
            out.extend_from_slice(&way.fingerprint.to_le_bytes());
            out.extend_from_slice(&way.expires_ms.to_le_bytes());
            out.push(len);
            out.extend_from_slice(way.target.as_bytes());
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.ways.is_empty()
    }

    /// The owner of the id with this fingerprint, if this set holds it unexpired.
    pub fn owner(&self, fingerprint: u64, now_ms: u64) -> Option<&str> {
        self.ways
            .iter()
            .find(|w| w.fingerprint == fingerprint && w.expires_ms > now_ms)
            .map(|w| w.target.as_str())
    }

    /// Stores the owner of the id with this fingerprint: over its own way, else over an expired
    /// one, else in a free one, else over the way that expires first. A target name longer
    /// than 255 bytes is not stored (names are short; the config does not bound them).
    pub fn put(&mut self, fingerprint: u64, target: &str, expires_ms: u64, now_ms: u64) {
        if u8::try_from(target.len()).is_err() {
            return;
        }
        let way = Way {
            fingerprint,
            expires_ms,
            target: target.to_string(),
        };
        self.ways
            .retain(|w| w.fingerprint != fingerprint && w.expires_ms > now_ms);
        if self.ways.len() >= WAYS {
            let oldest = self
                .ways
                .iter()
                .enumerate()
                .min_by_key(|(_, w)| w.expires_ms)
                .map(|(i, _)| i);
            if let Some(i) = oldest {
                self.ways.swap_remove(i);
            }
        }
        self.ways.push(way);
    }

    /// Drops the expired owners; true when any was dropped.
    pub fn sweep(&mut self, now_ms: u64) -> bool {
        let before = self.ways.len();
        self.ways.retain(|w| w.expires_ms > now_ms);
        self.ways.len() != before
    }
}

/// What a request names a stored response by: `previous_response_id` in its body (a follow-up),
/// or the id in its path (`GET`/`DELETE /v1/responses/{id}`, `/cancel`, `/input_items`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    FollowUp,
    Path,
}

/// Whether a target's answer says it does not hold the response the request names: a
/// follow-up gets `previous_response_not_found` (400 from OpenAI and Azure), a request on the
/// id's path a 404. Only such an answer sends a probe on to the next target.
pub fn not_here(naming: Naming, status: Option<u16>, body: &[u8]) -> bool {
    match (naming, status) {
        (Naming::Path, Some(404)) => true,
        (Naming::FollowUp, Some(400 | 404)) => {
            error_code(body).as_deref() == Some("previous_response_not_found")
        }
        _ => false,
    }
}

/// Whether judging an answer of this status for such a request needs its body.
pub fn not_here_needs_body(naming: Naming, status: Option<u16>) -> bool {
    naming == Naming::FollowUp && matches!(status, Some(400 | 404))
}

/// Whether an answer of this status may be a "not found" (so it must be held and judged).
pub fn may_be_not_here(naming: Naming, status: Option<u16>) -> bool {
    match naming {
        Naming::Path => status == Some(404),
        Naming::FollowUp => matches!(status, Some(400 | 404)),
    }
}

/// `error.code` of an OpenAI-shaped error body.
fn error_code(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Error {
        error: Obj<Detail>,
    }
    #[derive(Deserialize)]
    struct Detail {
        code: Option<Value>,
    }
    let Obj(error) = serde_json::from_slice::<Obj<Error>>(body).ok()?;
    let Obj(detail) = error.error;
    detail.code?.as_str().map(str::to_string)
}

/// The id of a Responses API answer from its beginning: the response object's `id` (its first
/// member), in a plain body or in a stream's first event (`response.created`, whose `response`
/// begins with its `id`). `None` when the beginning holds none, or no plausible id.
pub fn response_id(head: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"\"id\"";
    let at = head.windows(KEY.len()).position(|w| w == KEY)?;
    let rest = head.get(at + KEY.len()..)?;
    let rest = rest.trim_ascii_start().strip_prefix(b":")?;
    let mut de = serde_json::Deserializer::from_slice(rest);
    let id: String = serde::Deserialize::deserialize(&mut de).ok()?;
    let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    (!id.is_empty() && id.len() <= 256 && id.bytes().all(plain)).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_set_round_trips_and_unreadable_values_are_empty() {
        let mut set = Set::default();
        set.put(1, "azure", 5000, 0);
        set.put(2, "openai", 6000, 0);
        let back = Set::decode(&set.encode());
        assert_eq!(back, set);
        assert_eq!(back.owner(1, 4999), Some("azure"));
        assert_eq!(back.owner(1, 5000), None, "expired");
        assert_eq!(back.owner(3, 0), None);
        let bytes = set.encode();
        for bad in [
            &b""[..],
            b"\xA1old slot",
            b"\xA2\x01",
            &bytes[..bytes.len() - 1],
        ] {
            assert!(Set::decode(bad).is_empty(), "{bad:?}");
        }
        // A name too long for its length byte is not stored (and nothing else is lost).
        set.put(4, &"x".repeat(256), 9000, 0);
        assert_eq!(Set::decode(&set.encode()), set);
        assert_eq!(set.owner(4, 0), None);
    }

    #[test]
    fn a_full_set_keeps_its_newest_owners() {
        let mut set = Set::default();
        for i in 0..WAYS as u64 {
            set.put(i, "openai", 1000 + i, 0);
        }
        // The same id again: its way is renewed, nothing evicted.
        set.put(0, "azure", 5000, 0);
        assert!((0..WAYS as u64).all(|i| set.owner(i, 0).is_some()));
        assert_eq!(set.owner(0, 0), Some("azure"));
        // A new id evicts the owner that expires first (id 1 now).
        set.put(99, "azure", 6000, 0);
        assert_eq!(set.owner(1, 0), None);
        assert_eq!(set.owner(99, 0), Some("azure"));
        assert_eq!(set.owner(2, 0), Some("openai"));
        // Expired owners make room before any live one is evicted.
        set.put(100, "azure", 7000, 1005);
        assert_eq!(set.owner(6, 1005), Some("openai"));
        assert_eq!(set.owner(100, 1005), Some("azure"));
        assert!(set.sweep(2000));
        assert_eq!(set.ways.len(), 3, "0, 99 and 100 outlive the sweep");
        assert!(!set.sweep(2000));
    }

    /// Owners kept when `ids` distinct ids are stored one after the other.
    fn kept(ids: u32, max_entries: u32) -> usize {
        let mut sets: HashMap<u32, Set> = HashMap::new();
        for i in 0..ids {
            let (set, fp) = place(&format!("resp_{i:048x}"), max_entries);
            sets.entry(set).or_default().put(fp, "azure", 10_000, 0);
        }
        (0..ids)
            .filter(|i| {
                let (set, fp) = place(&format!("resp_{i:048x}"), max_entries);
                sets.get(&set).and_then(|s| s.owner(fp, 0)).is_some()
            })
            .count()
    }

    #[test]
    fn colliding_ids_keep_their_owners_up_to_the_bound() {
        // A direct-mapped store of 16,384 slots keeps one id per slot: 6,500 ids lose ~1,100.
        let direct: std::collections::HashSet<u64> = (0..6500)
            .map(|i| {
                let digest = sha256(format!("resp_{i:048x}").as_bytes());
                u64::from(digest[0]) << 8 | u64::from(digest[1]) // 65,536 values
            })
            .map(|v| v % 16_384)
            .collect();
        assert!(6500 - direct.len() > 1000, "{}", direct.len());
        // The set-associative store keeps every one of them...
        assert_eq!(kept(6500, 16_384), 6500);
        // ... and at its bound still nearly all: 16,384 ids in 16,384 entries.
        let full = kept(16_384, 16_384);
        assert!(full > 16_384 * 9 / 10, "{full}");
        // Never more than the bound.
        assert!(kept(40_000, 1024) <= sets(1024) as usize * WAYS);
    }

    #[test]
    fn sets_cover_the_bound() {
        assert_eq!(sets(16_384), 1024);
        assert_eq!(sets(17), 2);
        assert_eq!(sets(1), 1);
        assert_eq!(sets(0), 1);
        for i in 0..200 {
            assert!(place(&format!("resp_{i}"), 40).0 < sets(40));
        }
    }

    #[test]
    fn only_a_not_found_for_the_named_response_sends_a_probe_on() {
        let prev = br#"{"error": {"message": "Previous response with id 'resp_1' not found.", "type": "invalid_request_error", "param": "previous_response_id", "code": "previous_response_not_found"}}"#;
        let other_400 = br#"{"error": {"message": "Invalid 'input'", "type": "invalid_request_error", "param": "input", "code": "invalid_value"}}"#;
        let stored = br#"{"error": {"message": "Response with id 'resp_1' not found.", "type": "invalid_request_error", "param": null, "code": null}}"#;
        use Naming::*;
        let cases: [(Naming, Option<u16>, &[u8], bool); 9] = [
            (FollowUp, Some(400), prev, true),
            (FollowUp, Some(404), prev, true),
            (FollowUp, Some(400), other_400, false),
            (FollowUp, Some(400), b"not json", false),
            (FollowUp, Some(200), prev, false),
            (FollowUp, Some(503), b"", false),
            (Path, Some(404), stored, true),
            (Path, Some(404), b"", true),
            (Path, Some(400), prev, false),
        ];
        for (naming, status, body, want) in cases {
            assert_eq!(
                not_here(naming, status, body),
                want,
                "{naming:?} {status:?}"
            );
            if want {
                assert!(may_be_not_here(naming, status));
            }
        }
        assert!(!may_be_not_here(Path, None));
        assert!(not_here_needs_body(FollowUp, Some(400)) && !not_here_needs_body(Path, Some(404)));
    }

    #[test]
    fn the_id_is_read_from_a_plain_answer_or_the_first_event() {
        let plain = br#"{"id":"resp_67ccd2bed1ec8190","object":"response","created_at":1741476542,"status":"completed","output":[{"id":"msg_1"}]}"#;
        assert_eq!(response_id(plain).as_deref(), Some("resp_67ccd2bed1ec8190"));
        let spaced = b"{\n  \"id\" : \"resp_1\",\n  \"object\": \"response\"";
        assert_eq!(response_id(spaced).as_deref(), Some("resp_1"));
        let stream = b"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_s1\",\"object\":\"response\",\"status\":\"in_progress\"";
        assert_eq!(response_id(stream).as_deref(), Some("resp_s1"));
        for none in [
            &b""[..],
            b"{\"object\":\"response\"}",
            b"{\"id\":",
            b"{\"id\":\"resp_cut",
            b"{\"id\":5}",
            b"{\"id\":\"has space\"}",
            b"{\"id\":\"\"}",
        ] {
            assert_eq!(response_id(none), None, "{}", String::from_utf8_lossy(none));
        }
    }
}
