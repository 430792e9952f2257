//! Responses API affinity: a response id belongs to the target that created it, so a request
//! that continues it (`previous_response_id`) or reads it (`/v1/responses/{id}`) goes there. The
//! owners live in Envoy shared data in `max_affinity_entries` fixed slots (a new id evicts the
//! one in its slot), each with its expiry, so memory is bounded however many responses pass.

use crate::request::auth::sha256;

/// Shared-data key prefix; a slot's key is `<prefix><slot>`.
pub const SLOT_PREFIX: &str = "llm_failover.affinity.";

/// How much of an answer's beginning is read for its id.
pub const HEAD: usize = 1024;

pub fn slot(id: &str, max_entries: u32) -> u32 {
    let digest = sha256(id.as_bytes());
    let first = u64::from_le_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ]);
    (first % u64::from(max_entries.max(1))) as u32
}

pub fn slot_key(slot: u32) -> String {
    format!("{SLOT_PREFIX}{slot}")
}

/// The target that created a response id, until `expires_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub id: String,
    pub target: String,
    pub expires_ms: u64,
}

const MAGIC: u8 = 0xA1;

impl Owner {
    /// Empty (read back as no owner) when the id is longer than its length field holds.
    pub fn encode(&self) -> Vec<u8> {
        let Ok(id_len) = u16::try_from(self.id.len()) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(11 + self.id.len() + self.target.len());
        out.push(MAGIC);
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        out.extend_from_slice(&id_len.to_le_bytes());
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.target.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Owner> {
        let (&magic, rest) = bytes.split_first()?;
        if magic != MAGIC {
            return None;
        }
        let (expires, rest) = rest.split_at_checked(8)?;
        let (len, rest) = rest.split_at_checked(2)?;
        let len = usize::from(u16::from_le_bytes(len.try_into().ok()?));
        let (id, target) = rest.split_at_checked(len)?;
        Some(Owner {
            id: String::from_utf8(id.to_vec()).ok()?,
            target: String::from_utf8(target.to_vec()).ok()?,
            expires_ms: u64::from_le_bytes(expires.try_into().ok()?),
        })
    }

    /// Only the expiry (for the sweep).
    pub fn expiry(bytes: &[u8]) -> Option<u64> {
        let expires = bytes.get(1..9)?;
        (bytes.first() == Some(&MAGIC))
            .then(|| u64::from_le_bytes(expires.try_into().unwrap_or_default()))
    }
}

/// The owner of `id` held in a slot's bytes, if it is that id's and still fresh.
pub fn lookup(bytes: &[u8], id: &str, now_ms: u64) -> Option<String> {
    let owner = Owner::decode(bytes)?;
    (owner.id == id && owner.expires_ms > now_ms).then_some(owner.target)
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

    #[test]
    fn owners_round_trip_and_expire() {
        let o = Owner {
            id: "resp_abc".into(),
            target: "azure".into(),
            expires_ms: 5000,
        };
        let bytes = o.encode();
        assert_eq!(Owner::decode(&bytes), Some(o.clone()));
        assert_eq!(Owner::expiry(&bytes), Some(5000));
        assert_eq!(lookup(&bytes, "resp_abc", 4999), Some("azure".into()));
        assert_eq!(lookup(&bytes, "resp_abc", 5000), None);
        assert_eq!(lookup(&bytes, "resp_abd", 0), None);
        for bad in [
            &b""[..],
            b"\xA1",
            &bytes[..9],
            b"not an owner at all",
            &bytes[..12],
        ] {
            assert_eq!(Owner::decode(bad), None, "{bad:?}");
        }
        let long = Owner {
            id: "x".repeat(70_000),
            ..o
        };
        assert_eq!(Owner::decode(&long.encode()), None);
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

    #[test]
    fn slots_stay_within_bounds() {
        for i in 0..200 {
            assert!(slot(&format!("resp_{i}"), 7) < 7);
        }
        assert_eq!(slot("x", 0), 0);
    }
}
