//! Spill-over: OpenAI and Azure announce a coming 429 in every answer
//! (`x-ratelimit-remaining-requests` / `-tokens`, `x-ratelimit-reset-requests` / `-tokens`). A
//! target whose answer reports fewer remaining than its `spillover` thresholds is avoided until
//! the reported reset (shared by all workers, like a cooldown).

use std::time::Duration;

use crate::config::Spillover;

/// How long a target is avoided when its answer says it is low but not when it resets.
pub const FALLBACK_WINDOW: Duration = Duration::from_secs(10);

/// What an answer's rate-limit headers say (each `None` when absent or malformed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

/// Reads the rate-limit headers from (lower-case name, value) pairs (a repeated header: its
/// last value, which must be well-formed).
pub fn limits<'a>(headers: impl Iterator<Item = (&'a str, &'a [u8])>) -> Limits {
    let mut limits = Limits::default();
    for (name, value) in headers {
        let text = std::str::from_utf8(value).map_or("", str::trim);
        match name {
            "x-ratelimit-remaining-requests" => limits.remaining_requests = count(text),
            "x-ratelimit-remaining-tokens" => limits.remaining_tokens = count(text),
            "x-ratelimit-reset-requests" => limits.reset_requests = reset(text),
            "x-ratelimit-reset-tokens" => limits.reset_tokens = reset(text),
            _ => {}
        }
    }
    limits
}

/// A count: a non-negative integer (Azure reports -1 when it does not know: ignored).
fn count(text: &str) -> Option<u64> {
    text.parse().ok()
}

/// A reset time: OpenAI's Go durations (`6ms`, `1s`, `6m0s`, `1h2m3.5s`) or Azure's seconds
/// (`"60"`, `"0.5"`).
pub fn reset(text: &str) -> Option<Duration> {
    if let Some(ms) = crate::duration::scaled_decimal(text, 1000) {
        return Some(Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)));
    }
    crate::duration::parse(text)
}

/// How long to avoid the target after this answer: until the reset of every dimension that is
/// below its threshold (the longest), or [`FALLBACK_WINDOW`] when that reset is not reported.
/// `None` when nothing is low.
pub fn avoid_for(policy: &Spillover, limits: &Limits) -> Option<Duration> {
    let low = |min: Option<u64>, remaining: Option<u64>, reset: Option<Duration>| match (
        min, remaining,
    ) {
        (Some(min), Some(left)) if left < min => Some(reset.unwrap_or(FALLBACK_WINDOW)),
        _ => None,
    };
    let requests = low(
        policy.min_remaining_requests,
        limits.remaining_requests,
        limits.reset_requests,
    );
    let tokens = low(
        policy.min_remaining_tokens,
        limits.remaining_tokens,
        limits.reset_tokens,
    );
    requests.max(tokens)
}

/// The shared state of one target: Unix ms until which it is avoided.
pub fn encode(until_ms: u64) -> [u8; 8] {
    until_ms.to_le_bytes()
}

/// 0 (not avoided) for anything that is not what `encode` wrote.
pub fn decode(bytes: &[u8]) -> u64 {
    <[u8; 8]>::try_from(bytes).map_or(0, u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Limits {
        limits(pairs.iter().map(|(n, v)| (*n, v.as_bytes())))
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn reset_times_in_every_form_the_providers_send() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("6ms", ms(6)),
            ("1s", S),
            ("6m0s", ms(360_000)),
            ("1h2m3.5s", ms(3_723_500)),
            ("0s", ms(0)),
            ("60", 60 * S),
            ("0.5", ms(500)),
            ("17.2s", ms(17_200)),
        ] {
            assert_eq!(reset(text), Some(want), "{text}");
        }
        for text in ["", "soon", "-1", "1 s", "1e3"] {
            assert_eq!(reset(text), None, "{text:?}");
        }
    }

    #[test]
    fn malformed_headers_are_ignored() {
        let l = headers(&[
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-remaining-tokens", "lots"),
            ("x-ratelimit-reset-requests", "whenever"),
            ("x-ratelimit-reset-tokens", " 2s "),
        ]);
        assert_eq!(
            l,
            Limits {
                remaining_requests: None,
                remaining_tokens: None,
                reset_requests: None,
                reset_tokens: Some(2 * S),
            }
        );
    }

    #[test]
    fn a_target_is_avoided_until_the_reset_of_what_runs_low() {
        let policy = Spillover {
            min_remaining_requests: Some(5),
            min_remaining_tokens: Some(1000),
        };
        let cases = [
            (vec![("x-ratelimit-remaining-requests", "9999")], None),
            (
                vec![
                    ("x-ratelimit-remaining-requests", "2"),
                    ("x-ratelimit-reset-requests", "1.5s"),
                ],
                Some(Duration::from_millis(1500)),
            ),
            (
                vec![("x-ratelimit-remaining-requests", "4")],
                Some(FALLBACK_WINDOW),
            ),
            (
                vec![
                    ("x-ratelimit-remaining-requests", "1"),
                    ("x-ratelimit-reset-requests", "1s"),
                    ("x-ratelimit-remaining-tokens", "10"),
                    ("x-ratelimit-reset-tokens", "6m0s"),
                ],
                Some(360 * S),
            ),
            (vec![("x-ratelimit-remaining-requests", "5")], None),
            (vec![], None),
        ];
        for (pairs, want) in cases {
            assert_eq!(avoid_for(&policy, &headers(&pairs)), want, "{pairs:?}");
        }
        let requests_only = Spillover {
            min_remaining_requests: Some(5),
            min_remaining_tokens: None,
        };
        let low_tokens = headers(&[("x-ratelimit-remaining-tokens", "0")]);
        assert_eq!(avoid_for(&requests_only, &low_tokens), None);
    }

    #[test]
    fn state_round_trips_and_garbage_is_not_avoided() {
        assert_eq!(decode(&encode(1_700_000_000_000)), 1_700_000_000_000);
        assert_eq!(decode(b""), 0);
        assert_eq!(decode(&[1; 9]), 0);
    }
}
