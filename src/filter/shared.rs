//! Envoy shared data (one store for every worker of the VM): cooldown state, cache slots, the
//! owners of Responses API ids and the buckets of `limits`. Writers use compare-and-swap.

use super::host;
use crate::answer::affinity::{self, Owner, Set};
use crate::answer::cache::{self, Digest, Entry};
use crate::config::{CacheSettings, Cooldown, Limit, ResponsesSettings};
use crate::health::cooldown::{self, Change, State};
use crate::health::spillover;
use crate::policy::limits::{self, Admission, Bucket, Kind};
use crate::target::token::State as TokenState;

const CAS_TRIES: usize = 4;

fn cooldown_key(target: &str) -> String {
    format!("llm_failover.cooldown.{target}")
}

/// A target's shared cooldown state (the default, clean state when it has none).
pub fn cooldown_state(target: &str) -> State {
    let (bytes, _) = host::shared_get(&cooldown_key(target));
    bytes.map(|b| State::decode(&b)).unwrap_or_default()
}

/// Records how an attempt ended; returns what that did to the breaker.
pub fn record_attempt(
    target: &str,
    policy: &Cooldown,
    attempt: cooldown::Attempt,
    ending: cooldown::Ending,
    now_ms: u64,
) -> Change {
    let key = cooldown_key(target);
    for _ in 0..CAS_TRIES {
        let (bytes, cas) = host::shared_get(&key);
        let state = bytes.map(|b| State::decode(&b)).unwrap_or_default();
        let (next, change) = cooldown::after_attempt(state, policy, attempt, ending, now_ms);
        if change == Change::None || host::shared_set(&key, &next.encode(), cas).is_ok() {
            return change;
        }
    }
    Change::None
}

/// Takes a target's probe (true) when its cooldown ended and no probe is out.
pub fn claim_probe(target: &str, now_ms: u64, lease_until_ms: u64) -> bool {
    update(target, |s| cooldown::claim_probe(s, now_ms, lease_until_ms))
}

/// Hands back a probe that will not answer.
pub fn release_probe(target: &str, lease_until_ms: u64) {
    update(target, |s| cooldown::release_probe(s, lease_until_ms));
}

/// Writes `change(state)` with compare-and-swap; false when there was nothing to write (or the
/// store kept refusing).
fn update(target: &str, change: impl Fn(State) -> Option<State>) -> bool {
    let key = cooldown_key(target);
    for _ in 0..CAS_TRIES {
        let (bytes, cas) = host::shared_get(&key);
        let state = bytes.map(|b| State::decode(&b)).unwrap_or_default();
        let Some(next) = change(state) else {
            return false;
        };
        if host::shared_set(&key, &next.encode(), cas).is_ok() {
            return true;
        }
    }
    false
}

/// The shared bucket of one limit; `scope` is `key.<name>` or `route.<name>`.
pub fn limit_key(scope: &str, kind: Kind) -> String {
    format!("llm_failover.limit.{scope}.{}", kind.as_str())
}

/// Whether a request fits in the bucket at `key`, spending one request of a request limit.
/// Should another worker keep winning the compare-and-swap, the request goes on uncounted.
pub fn limit_admit(key: &str, limit: &Limit, kind: Kind, now_ms: u64) -> Admission {
    let mut last = None;
    for _ in 0..CAS_TRIES {
        let (bytes, cas) = host::shared_get(key);
        let bucket = bytes.map(|b| Bucket::decode(&b)).unwrap_or_default();
        let admission = limits::admit(limit, kind, bucket, now_ms);
        match admission {
            Admission::Allowed { next, .. } if next != bucket => {
                if host::shared_set(key, &next.encode(), cas).is_ok() {
                    return admission;
                }
                last = Some(admission);
            }
            _ => return admission,
        }
    }
    last.unwrap_or(limits::admit(limit, kind, Bucket::default(), now_ms))
}

/// Creates a bucket that does not exist yet, so that every later update is a compare-and-swap
/// (two first writers would otherwise both win).
pub fn limit_create(key: &str) {
    if let (None, _) = host::shared_get(key) {
        let _ = host::shared_set(key, &Bucket::default().encode(), None);
    }
}

/// Gives back a request `limit_admit` spent.
pub fn limit_refund(key: &str, limit: &Limit) {
    update_bucket(key, |b| limits::refund(limit, b));
}

/// Charges an answer's tokens.
pub fn limit_charge(key: &str, limit: &Limit, tokens: u64, now_ms: u64) {
    update_bucket(key, |b| limits::charge(limit, b, tokens, now_ms));
}

fn update_bucket(key: &str, update: impl Fn(Bucket) -> Bucket) {
    for _ in 0..CAS_TRIES {
        let (bytes, cas) = host::shared_get(key);
        let bucket = bytes.map(|b| Bucket::decode(&b)).unwrap_or_default();
        if host::shared_set(key, &update(bucket).encode(), cas).is_ok() {
            return;
        }
    }
}

fn cache_slot_key(settings: &CacheSettings, digest: &Digest) -> String {
    cache::slot_key_in(&settings.scope, cache::slot(digest, settings.max_entries))
}

/// A target's Entra ID token state at `key` ([`crate::target::token::state_key`]), and its
/// compare-and-swap value.
pub fn token_state(key: &str) -> (TokenState, Option<u32>) {
    let (bytes, cas) = host::shared_get(key);
    (
        bytes.map(|b| TokenState::decode(&b)).unwrap_or_default(),
        cas,
    )
}

/// Writes a token state unless another worker wrote it since `cas` was read.
pub fn set_token_state(key: &str, state: &TokenState, cas: Option<u32>) -> bool {
    host::shared_set(key, &state.encode(), cas).is_ok()
}

fn spill_key(target: &str) -> String {
    format!("llm_failover.spill.{target}")
}

/// Unix ms until which a target is avoided (0: it is not).
pub fn spilled_until(target: &str) -> u64 {
    let (bytes, _) = host::shared_get(&spill_key(target));
    bytes.map_or(0, |b| spillover::decode(&b))
}

/// Avoids a target until `until_ms`, unless it already is until later. True when this started
/// (or lengthened) a spill-over.
pub fn spill(target: &str, until_ms: u64) -> bool {
    let key = spill_key(target);
    for _ in 0..CAS_TRIES {
        let (bytes, cas) = host::shared_get(&key);
        if bytes.map_or(0, |b| spillover::decode(&b)) >= until_ms {
            return false;
        }
        if host::shared_set(&key, &spillover::encode(until_ms), cas).is_ok() {
            return true;
        }
    }
    false
}

pub fn cache_get(settings: &CacheSettings, digest: &Digest, now_ms: u64) -> Option<Entry> {
    let (bytes, _) = host::shared_get(&cache_slot_key(settings, digest));
    cache::lookup(&bytes?, digest, now_ms)
}

/// Stores an entry in its slot unless another worker wrote the slot meanwhile (then theirs wins).
pub fn cache_put(settings: &CacheSettings, entry: &Entry) {
    let key = cache_slot_key(settings, &entry.digest);
    let (_, cas) = host::shared_get(&key);
    let _ = host::shared_set(&key, &entry.encode(), cas);
}

/// Empties expired slots in `range` of the cache of `scope`; the sweep walks all slots a chunk
/// per tick.
pub fn cache_sweep(scope: &str, range: std::ops::Range<u32>, now_ms: u64) {
    for slot in range {
        expire(&cache::slot_key_in(scope, slot), now_ms, Entry::expiry);
    }
}

/// The target that created response `id`, if known and not expired.
pub fn affinity_get(settings: &ResponsesSettings, id: &str, now_ms: u64) -> Option<String> {
    let (set, fingerprint) = affinity::place(id, settings.max_affinity_entries);
    let (bytes, _) = host::shared_get(&affinity::set_key(set));
    Set::decode(&bytes?)
        .owner(fingerprint, now_ms)
        .map(str::to_string)
}

/// Remembers that `owner.target` created `owner.id`, in the id's set (compare-and-swap: another
/// worker's write to the same set is read again, not overwritten).
pub fn affinity_put(settings: &ResponsesSettings, owner: &Owner, now_ms: u64) {
    let (set, fingerprint) = affinity::place(&owner.id, settings.max_affinity_entries);
    let key = affinity::set_key(set);
    for _ in 0..CAS_TRIES {
        let (bytes, cas) = host::shared_get(&key);
        let mut owners = bytes.map(|b| Set::decode(&b)).unwrap_or_default();
        owners.put(fingerprint, &owner.target, owner.expires_ms, now_ms);
        if host::shared_set(&key, &owners.encode(), cas).is_ok() {
            return;
        }
    }
}

/// Drops the expired owners of the sets in `range`.
pub fn affinity_sweep(range: std::ops::Range<u32>, now_ms: u64) {
    for set in range {
        let key = affinity::set_key(set);
        let (Some(bytes), cas) = host::shared_get(&key) else {
            continue;
        };
        let mut owners = Set::decode(&bytes);
        if owners.sweep(now_ms) {
            let _ = host::shared_set(&key, &owners.encode(), cas);
        }
    }
}

/// Empties the slot at `key` if what it holds has expired.
fn expire(key: &str, now_ms: u64, expiry: fn(&[u8]) -> Option<u64>) {
    let (bytes, cas) = host::shared_get(key);
    let expired = bytes
        .as_deref()
        .and_then(expiry)
        .is_some_and(|exp| exp <= now_ms);
    if expired {
        let _ = host::shared_set(key, &[], cas);
    }
}
