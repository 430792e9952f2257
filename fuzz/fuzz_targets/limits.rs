//! Limits (`policy::limits`): any limit and any sequence of admissions, charges and refunds at
//! any clock, read without panicking; what a bucket reports stays within its limit (remaining at
//! most `count`, never waiting or resetting beyond the debt it may owe), and the durations it
//! prints are what OpenAI's clients parse back.
//! Input: [count: 8][per ms: 4][clock ms: 4] (the first bucket: bytes 4..12) then ops of 13 bytes:
//! [op][clock step ms: 4][amount: 8].
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use llm_failover::config::Limit;
use llm_failover::policy::limits::{self, Admission, Bucket, Kind};

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fuzz_target!(|data: &[u8]| {
    let (Some(count), Some(per_ms)) = (u64_at(data, 0), u32_at(data, 8)) else {
        return;
    };
    // As the configuration allows: at least 1, one second to 30 days.
    let limit = Limit {
        count: count.max(1),
        per: Duration::from_millis(u64::from(per_ms).clamp(1000, 30 * 86_400_000)),
    };
    let bound = limit.per * 2;
    let mut bucket = Bucket::decode(data.get(4..12).unwrap_or_default());
    let mut now: u64 = u64::from(u32_at(data, 12).unwrap_or(0));
    for op in data.get(16..).unwrap_or_default().chunks_exact(13) {
        let step = u64::from(u32_at(op, 1).unwrap_or(0));
        let amount = u64_at(op, 5).unwrap_or(0);
        now = now.saturating_add(step);
        match op.first().copied().unwrap_or(0) % 4 {
            0 | 1 => {
                let kind = if op.first().copied().unwrap_or(0) % 4 == 0 { Kind::Requests } else { Kind::Tokens };
                match limits::admit(&limit, kind, bucket, now) {
                    Admission::Allowed { next, reading } => {
                        assert!(reading.remaining <= limit.count);
                        if kind == Kind::Tokens {
                            assert_eq!(next, bucket, "a token gate spends nothing");
                        }
                        bucket = next;
                    }
                    Admission::Denied { wait, reading } => {
                        assert_eq!(reading.remaining, 0);
                        let later = now.saturating_add(llm_failover::duration::millis(wait)).saturating_add(1);
                        if later < u64::MAX / 1_000_000 && bucket.tat_ns < u64::MAX / 2 {
                            assert!(matches!(limits::admit(&limit, kind, bucket, later), Admission::Allowed { .. }));
                        }
                    }
                }
            }
            2 => bucket = limits::charge(&limit, bucket, amount, now),
            _ => bucket = limits::refund(&limit, bucket),
        }
        let reading = limits::reading(&limit, bucket, now);
        assert!(reading.remaining <= limit.count);
        let printed = limits::go_duration(reading.reset);
        let parsed = llm_failover::duration::parse(&printed).expect("parses back");
        assert!(parsed >= reading.reset && parsed - reading.reset < Duration::from_millis(1));
        if bucket.tat_ns <= now.saturating_mul(1_000_000).saturating_add(u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX)) {
            assert!(reading.reset <= bound);
        }
        for (_, value) in limits::headers(Kind::Requests, &reading) {
            assert!(!value.is_empty());
        }
    }
});
