//! Gateway keys: which configured key (if any) a request presents.

use sha2::{Digest, Sha256};

use crate::config::{GatewayKey, KeyMatch};

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The credential a client presented: `Authorization: Bearer <key>` or `api-key: <key>`.
pub fn presented_key<'a>(
    authorization: Option<&'a [u8]>,
    api_key: Option<&'a [u8]>,
) -> Option<&'a [u8]> {
    if let Some(auth) = authorization {
        let auth = trim(auth);
        // A header too short to be a bearer token leaves the choice to `api-key`.
        let scheme = auth.get(..7).unwrap_or_default();
        if scheme.eq_ignore_ascii_case(b"bearer ") {
            let key = trim(auth.get(7..).unwrap_or_default());
            if !key.is_empty() {
                return Some(key);
            }
        }
    }
    api_key.map(trim).filter(|k| !k.is_empty())
}

/// Finds the key whose digest matches. Every configured digest is compared in constant time,
/// so the time taken does not tell how much of a guess was right.
pub fn authenticate<'k>(
    keys: &'k [GatewayKey],
    presented: Option<&[u8]>,
) -> Option<&'k GatewayKey> {
    let digest = sha256(presented?);
    let mut found = None;
    for key in keys {
        let KeyMatch::Sha256(want) = &key.digest;
        if constant_time_eq(want, &digest) && found.is_none() {
            found = Some(key);
        }
    }
    found
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    diff == 0
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    s.get(start..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<GatewayKey> {
        vec![
            GatewayKey {
                name: "app".into(),
                digest: KeyMatch::Sha256(sha256(b"gw-app")),
                targets: vec![0, 1],
                limits: None,
            },
            GatewayKey {
                name: "batch".into(),
                digest: KeyMatch::Sha256(sha256(b"gw-batch")),
                targets: vec![1],
                limits: None,
            },
        ]
    }

    #[test]
    fn bearer_or_api_key_header_is_the_presented_key() {
        assert_eq!(
            presented_key(Some(b"Bearer gw-app"), None),
            Some(&b"gw-app"[..])
        );
        assert_eq!(
            presented_key(Some(b"bearer  gw-app "), None),
            Some(&b"gw-app"[..])
        );
        assert_eq!(presented_key(None, Some(b"gw-app")), Some(&b"gw-app"[..]));
        assert_eq!(
            presented_key(Some(b"Basic abc"), Some(b"k")),
            Some(&b"k"[..])
        );
        assert_eq!(presented_key(Some(b"Bearer "), None), None);
        assert_eq!(presented_key(Some(b"Bear"), None), None);
        assert_eq!(presented_key(None, None), None);
    }

    #[test]
    fn matching_key_is_found_by_digest() {
        let keys = keys();
        assert_eq!(
            authenticate(&keys, Some(b"gw-batch")).map(|k| k.name.as_str()),
            Some("batch")
        );
        assert_eq!(
            authenticate(&keys, Some(b"gw-app")).map(|k| k.name.as_str()),
            Some("app")
        );
        assert!(authenticate(&keys, Some(b"gw-ap")).is_none());
        assert!(authenticate(&keys, Some(b"")).is_none());
        assert!(authenticate(&keys, None).is_none());
    }

    #[test]
    fn sha256_matches_known_vector() {
        let hex: String = sha256(b"abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
