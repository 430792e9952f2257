//! Rate-limit headers (spill-over): any header names and values read without panicking; what is
//! read is what the header said, and a target is avoided only for a dimension below its
//! threshold, for that dimension's reset or the fallback window.
//! Input: [min requests][min tokens] then NUL-separated name=value pairs.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use llm_failover::config::Spillover;
use llm_failover::health::spillover::{self, FALLBACK_WINDOW};

fuzz_target!(|data: &[u8]| {
    let (policy, rest) = match data {
        [a, b, rest @ ..] => (
            Spillover {
                min_remaining_requests: (*a != 0).then_some(u64::from(*a)),
                min_remaining_tokens: (*b != 0).then_some(u64::from(*b) * 100),
            },
            rest,
        ),
        _ => return,
    };
    let pairs: Vec<(String, Vec<u8>)> = rest
        .split(|b| *b == 0)
        .filter_map(|pair| {
            let at = pair.iter().position(|b| *b == b'=')?;
            let (name, value) = pair.split_at(at);
            let name = String::from_utf8_lossy(name).to_ascii_lowercase();
            Some((name, value.get(1..).unwrap_or_default().to_vec()))
        })
        .collect();
    let limits = spillover::limits(pairs.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
    // The last occurrence of each header is what was read.
    let last = |name: &str| pairs.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v);
    let read = |name: &str| {
        last(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    assert_eq!(limits.remaining_requests, read("x-ratelimit-remaining-requests"));
    assert_eq!(limits.remaining_tokens, read("x-ratelimit-remaining-tokens"));
    for name in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        if let Some(v) = last(name) {
            let text = String::from_utf8_lossy(v);
            let _ = spillover::reset(text.trim());
        }
    }
    match spillover::avoid_for(&policy, &limits) {
        None => {}
        Some(d) => {
            let candidates = [limits.reset_requests, limits.reset_tokens, Some(FALLBACK_WINDOW)];
            assert!(candidates.contains(&Some(d)), "{d:?} from {limits:?}");
            let low_requests = matches!((policy.min_remaining_requests, limits.remaining_requests),
                (Some(min), Some(left)) if left < min);
            let low_tokens = matches!((policy.min_remaining_tokens, limits.remaining_tokens),
                (Some(min), Some(left)) if left < min);
            assert!(low_requests || low_tokens);
            assert!(d <= Duration::MAX);
        }
    }
});
