//! Limits per gateway key and per route (`limits`): requests and tokens per window, counted per
//! Envoy across its workers. This is the pure part: one bucket's state and its arithmetic, the
//! headers a client sees, and which limit a request shows.
//!
//! The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one number):
//! a bucket is the "theoretical arrival time" `tat`, the moment at which everything spent so far
//! would have been paid back at the limit's rate (`per / count` for each unit). Spending `n`
//! units moves `tat` on by `n * per / count`; a request fits while `tat` stays within `per` of
//! now. So the budget refills continuously rather than all at once at a window's edge (a fixed
//! window lets a client spend two windows' worth around the edge), the state is 8 bytes that one
//! compare-and-swap updates, and "remaining" and "reset" (the time until the bucket is full again)
//! are exact, as OpenAI's own `x-ratelimit-*` headers report them.
//!
//! Tokens are only known from the answer, so they are charged after it: a request is let in while
//! at least one token of the budget is left, and its answer may overrun the budget. The debt is
//! kept (the key then waits while it is paid back) but never beyond one more window.

use std::time::Duration;

use crate::config::{Limit, Limits};

const NS_PER_MS: u64 = 1_000_000;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Requests, Kind::Tokens];

    /// As in the headers (`x-ratelimit-limit-requests`), the error's `type` and the stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
        }
    }

    /// This kind's limit in `limits`, if set.
    pub fn of(self, limits: &Limits) -> Option<Limit> {
        match self {
            Kind::Requests => limits.requests,
            Kind::Tokens => limits.tokens,
        }
    }
}

/// One bucket's shared state: the theoretical arrival time, in Unix nanoseconds (0: never used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bucket {
    pub tat_ns: u64,
}

impl Bucket {
    /// Anything that is not 8 bytes reads as a fresh bucket.
    pub fn decode(bytes: &[u8]) -> Bucket {
        let tat_ns = <[u8; 8]>::try_from(bytes).map_or(0, u64::from_le_bytes);
        Bucket { tat_ns }
    }

    pub fn encode(&self) -> [u8; 8] {
        self.tat_ns.to_le_bytes()
    }

    /// How much of the window is spent now (0 when the bucket is full).
    fn backlog(&self, now_ns: u64) -> u64 {
        self.tat_ns.saturating_sub(now_ns)
    }
}

/// What a bucket says at one moment, as the `x-ratelimit-*` headers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// Whether a request may go on, by one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It may: the bucket to store (for requests, with this one spent) and what it then says.
    Allowed { next: Bucket, reading: Reading },
    /// It may not, for `wait` at least.
    Denied { wait: Duration, reading: Reading },
}

fn per_ns(limit: &Limit) -> u64 {
    u64::try_from(limit.per.as_nanos()).unwrap_or(u64::MAX)
}

/// What `units` cost in time: `units * per / count`, rounded down so that `count` units fit in
/// one window exactly.
fn cost_ns(limit: &Limit, units: u64) -> u64 {
    let count = u128::from(limit.count.max(1));
    let cost = u128::from(per_ns(limit)) * u128::from(units) / count;
    u64::try_from(cost).unwrap_or(u64::MAX)
}

/// What `bucket` says at `now_ms`.
pub fn reading(limit: &Limit, bucket: Bucket, now_ms: u64) -> Reading {
    let now = now_ms.saturating_mul(NS_PER_MS);
    let per = per_ns(limit);
    let backlog = bucket.backlog(now);
    let free = u128::from(per.saturating_sub(backlog));
    let remaining = free * u128::from(limit.count) / u128::from(per.max(1));
    Reading {
        limit: limit.count,
        remaining: u64::try_from(remaining)
            .unwrap_or(u64::MAX)
            .min(limit.count),
        reset: Duration::from_nanos(backlog),
    }
}

/// Whether a request fits in `bucket` at `now_ms`. A request limit spends one request; a token
/// limit needs one token left and spends nothing (the answer's tokens are charged after it).
pub fn admit(limit: &Limit, kind: Kind, bucket: Bucket, now_ms: u64) -> Admission {
    let now = now_ms.saturating_mul(NS_PER_MS);
    let per = per_ns(limit);
    let unit = cost_ns(limit, 1);
    let backlog = bucket.backlog(now);
    let after = backlog.saturating_add(unit);
    if after > per {
        return Admission::Denied {
            wait: Duration::from_nanos(after - per),
            reading: reading(limit, bucket, now_ms),
        };
    }
    let next = match kind {
        Kind::Requests => Bucket {
            tat_ns: now.saturating_add(after),
        },
        Kind::Tokens => bucket,
    };
    Admission::Allowed {
        next,
        reading: reading(limit, next, now_ms),
    }
}

/// Gives back the request `admit` spent (when another limit refused the request after all).
pub fn refund(limit: &Limit, bucket: Bucket) -> Bucket {
    Bucket {
        tat_ns: bucket.tat_ns.saturating_sub(cost_ns(limit, 1)),
    }
}

/// Charges an answer's `tokens`. A debt beyond the budget is kept, but at most one more window:
/// the key never waits longer than `per` for its next request.
pub fn charge(limit: &Limit, bucket: Bucket, tokens: u64, now_ms: u64) -> Bucket {
    let now = now_ms.saturating_mul(NS_PER_MS);
    let per = per_ns(limit);
    let start = bucket.tat_ns.max(now);
    // Debt up to the point where the next token is `per` away.
    let cap = now.saturating_add(per.saturating_mul(2).saturating_sub(cost_ns(limit, 1)));
    Bucket {
        tat_ns: start.saturating_add(cost_ns(limit, tokens)).min(cap),
    }
}

/// Of the readings of one kind (a key's and a route's), the one a client should pace itself by:
/// the fewest remaining, the later reset on a tie, the first (the key's) when equal.
pub fn tightest(readings: impl IntoIterator<Item = Reading>) -> Option<Reading> {
    readings
        .into_iter()
        .fold(None, |best: Option<Reading>, r| match best {
            Some(b)
                if (b.remaining, std::cmp::Reverse(b.reset))
                    <= (r.remaining, std::cmp::Reverse(r.reset)) =>
            {
                Some(b)
            }
            _ => Some(r),
        })
}

/// The `x-ratelimit-*` headers of one kind's reading, in OpenAI's formats.
pub fn headers(kind: Kind, r: &Reading) -> [(&'static str, String); 3] {
    let (limit, remaining, reset) = match kind {
        Kind::Requests => (
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ),
        Kind::Tokens => (
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ),
    };
    [
        (limit, r.limit.to_string()),
        (remaining, r.remaining.to_string()),
        (reset, go_duration(r.reset)),
    ]
}

/// Every `x-ratelimit-*` header, whichever kinds a request shows (the ones it does not show are
/// removed from an upstream answer).
pub const HEADER_NAMES: [&str; 6] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// `retry-after`: whole seconds, rounded up, at least 1 (a client that waits 0 s is refused again).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let ms = crate::duration::millis(wait);
    ms.div_ceil(1000).max(1)
}

/// A duration as Go prints it and OpenAI sends it (`20ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`),
/// to the millisecond, rounded up (a client that waits the reset finds the budget back).
pub fn go_duration(d: Duration) -> String {
    let ms = crate::duration::millis(d)
        .saturating_add(u64::from(!d.subsec_nanos().is_multiple_of(1_000_000)));
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, frac) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&s.to_string());
    if frac > 0 {
        let digits = format!("{frac:03}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limit(count: u64, per_ms: u64) -> Limit {
        Limit {
            count,
            per: Duration::from_millis(per_ms),
        }
    }

    /// Sends requests at `now`, storing what each admission gives; the statuses in order.
    fn send(l: &Limit, bucket: &mut Bucket, now: u64, n: usize) -> Vec<bool> {
        (0..n)
            .map(|_| match admit(l, Kind::Requests, *bucket, now) {
                Admission::Allowed { next, .. } => {
                    *bucket = next;
                    true
                }
                Admission::Denied { .. } => false,
            })
            .collect()
    }

    #[test]
    fn count_requests_fit_in_a_window_and_the_next_is_denied() {
        for (count, per) in [(3, 2000), (1, 1000), (7, 60_000), (600, 60_000), (3, 1000)] {
            let l = limit(count, per);
            let mut b = Bucket::default();
            let got = send(&l, &mut b, 1_000_000, count as usize + 1);
            let mut want = vec![true; count as usize];
            want.push(false);
            assert_eq!(got, want, "{count} per {per}ms");
        }
    }

    #[test]
    fn headers_count_down_and_reset_when_the_window_has_passed() {
        let l = limit(3, 2000);
        let now = 5_000_000;
        let mut b = Bucket::default();
        let mut remaining = vec![];
        for _ in 0..3 {
            match admit(&l, Kind::Requests, b, now) {
                Admission::Allowed { next, reading } => {
                    b = next;
                    remaining.push(reading.remaining);
                    assert_eq!(reading.limit, 3);
                }
                Admission::Denied { .. } => panic!("denied"),
            }
        }
        assert_eq!(remaining, vec![2, 1, 0]);
        let Admission::Denied { wait, reading } = admit(&l, Kind::Requests, b, now) else {
            panic!("allowed");
        };
        assert_eq!(reading.remaining, 0);
        assert!(
            reading.reset <= Duration::from_secs(2) && reading.reset > Duration::from_millis(1990)
        );
        // One request's worth comes back after per / count.
        assert!(wait <= Duration::from_millis(667) && wait >= Duration::from_millis(666));
        assert_eq!(send(&l, &mut b, now + 667, 2), vec![true, false]);
        // After a whole window, the whole budget.
        assert_eq!(
            send(&l, &mut b, now + 667 + 2000, 4),
            vec![true, true, true, false]
        );
        assert_eq!(reading_at(&l, b, now + 667 + 4000).remaining, 3);
        assert_eq!(reading_at(&l, b, now + 667 + 4000).reset, Duration::ZERO);
    }

    fn reading_at(l: &Limit, b: Bucket, now: u64) -> Reading {
        reading(l, b, now)
    }

    #[test]
    fn tokens_let_a_request_in_while_one_is_left_and_charge_the_answer() {
        let l = limit(100, 10_000);
        let now = 1_000;
        let b = Bucket::default();
        let Admission::Allowed { next, reading } = admit(&l, Kind::Tokens, b, now) else {
            panic!("denied");
        };
        assert_eq!(next, b, "a token gate spends nothing");
        assert_eq!(reading.remaining, 100);
        let b = charge(&l, b, 60, now);
        assert_eq!(reading_at(&l, b, now).remaining, 40);
        assert!(matches!(
            admit(&l, Kind::Tokens, b, now),
            Admission::Allowed { .. }
        ));
        // The next answer overruns the budget: the key waits while it is paid back.
        let b = charge(&l, b, 90, now);
        assert_eq!(reading_at(&l, b, now).remaining, 0);
        let Admission::Denied { wait, .. } = admit(&l, Kind::Tokens, b, now) else {
            panic!("allowed");
        };
        // 150 tokens spent of 100 per 10 s: 50 over, plus one to let a request in = 5.1 s.
        assert_eq!(wait, Duration::from_millis(5100));
        assert!(matches!(
            admit(&l, Kind::Tokens, b, now + 5100),
            Admission::Allowed { .. }
        ));
    }

    #[test]
    fn a_huge_answer_owes_at_most_one_more_window() {
        let l = limit(10, 2000);
        let b = charge(&l, Bucket::default(), u64::MAX, 1_000);
        let Admission::Denied { wait, reading } = admit(&l, Kind::Tokens, b, 1_000) else {
            panic!("allowed");
        };
        assert!(wait <= Duration::from_secs(2), "{wait:?}");
        assert_eq!(wait, Duration::from_secs(2));
        assert_eq!(reading.reset, Duration::from_millis(3800));
        assert!(matches!(
            admit(&l, Kind::Tokens, b, 3_000),
            Admission::Allowed { .. }
        ));
    }

    #[test]
    fn huge_counts_and_extreme_clocks_neither_overflow_nor_deny() {
        let l = limit(u64::MAX, 30 * 24 * 3_600_000);
        let mut b = Bucket::default();
        assert_eq!(
            send(&l, &mut b, u64::MAX / NS_PER_MS, 1000),
            vec![true; 1000]
        );
        let b = charge(&l, b, u64::MAX, u64::MAX);
        let _ = admit(&l, Kind::Tokens, b, u64::MAX);
        assert_eq!(reading_at(&l, Bucket { tat_ns: u64::MAX }, 0).remaining, 0);
    }

    #[test]
    fn a_refund_gives_back_exactly_one_request() {
        let l = limit(2, 1000);
        let mut b = Bucket::default();
        assert_eq!(send(&l, &mut b, 10, 2), vec![true, true]);
        b = refund(&l, b);
        assert_eq!(send(&l, &mut b, 10, 2), vec![true, false]);
    }

    #[test]
    fn the_state_is_eight_bytes_and_anything_else_reads_fresh() {
        let b = Bucket {
            tat_ns: 0x0102_0304_0506_0708,
        };
        assert_eq!(Bucket::decode(&b.encode()), b);
        for bad in [&b""[..], b"1234567", b"123456789"] {
            assert_eq!(Bucket::decode(bad), Bucket::default());
        }
    }

    #[test]
    fn durations_print_as_openai_sends_them() {
        let ms = Duration::from_millis;
        for (d, want) in [
            (ms(0), "0s"),
            (ms(20), "20ms"),
            (Duration::from_micros(1), "1ms"),
            (ms(999), "999ms"),
            (ms(1000), "1s"),
            (ms(1500), "1.5s"),
            (ms(59_999), "59.999s"),
            (ms(360_000), "6m0s"),
            (ms(3_600_000), "1h0m0s"),
            (ms(3_723_500), "1h2m3.5s"),
        ] {
            assert_eq!(go_duration(d), want);
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_never_zero() {
        let ms = Duration::from_millis;
        assert_eq!(retry_after_secs(ms(0)), 1);
        assert_eq!(retry_after_secs(ms(1)), 1);
        assert_eq!(retry_after_secs(ms(1000)), 1);
        assert_eq!(retry_after_secs(ms(1001)), 2);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX / 1000 + 1);
    }

    #[test]
    fn a_request_shows_the_tighter_of_its_limits() {
        let r = |remaining, reset_ms| Reading {
            limit: 10,
            remaining,
            reset: Duration::from_millis(reset_ms),
        };
        assert_eq!(tightest([r(5, 100), r(3, 50)]), Some(r(3, 50)));
        assert_eq!(tightest([r(3, 100), r(3, 500)]), Some(r(3, 500)));
        assert_eq!(tightest([r(3, 100), r(3, 100)]), Some(r(3, 100)));
        assert_eq!(tightest([]), None);
    }

    proptest! {
        /// However requests arrive, the ones let in between two moments never outrun the rate:
        /// `n` of them within `d` cost at most `d + per` (a full bucket, then `count` per `per`),
        /// and a denied request is let in after its `wait`.
        #[test]
        fn admissions_never_outrun_the_rate(
            count in 1u64..20,
            per in 1000u64..10_000,
            gaps in proptest::collection::vec(0u64..1500, 1..120),
        ) {
            let l = limit(count, per);
            let mut b = Bucket::default();
            let mut now = 1_000_000u64;
            let mut admitted: Vec<u64> = vec![];
            for gap in gaps {
                now += gap;
                match admit(&l, Kind::Requests, b, now) {
                    Admission::Allowed { next, reading } => {
                        prop_assert!(reading.remaining < count);
                        prop_assert!(reading.reset <= l.per);
                        b = next;
                        admitted.push(now);
                    }
                    Admission::Denied { wait, reading } => {
                        prop_assert_eq!(reading.remaining, 0);
                        let later = now + crate::duration::millis(wait) + 1;
                        let allowed = matches!(admit(&l, Kind::Requests, b, later), Admission::Allowed { .. });
                        prop_assert!(allowed);
                    }
                }
            }
            let unit = u128::from(cost_ns(&l, 1));
            for (i, &t) in admitted.iter().enumerate() {
                for (j, &u) in admitted.iter().enumerate().skip(i) {
                    let n = (j - i + 1) as u128;
                    let span = u128::from(u - t) * u128::from(NS_PER_MS) + u128::from(per_ns(&l));
                    prop_assert!(n * unit <= span, "{} admitted from {} to {}", n, t, u);
                }
            }
        }

        /// Charged tokens never lose budget: the remaining count falls by what was charged (or
        /// to 0), and the bucket owes at most one more window.
        #[test]
        fn charges_are_accounted_exactly(
            count in 1u64..1_000_000,
            per in 1000u64..100_000,
            charges in proptest::collection::vec(0u64..2_000_000, 1..10),
        ) {
            let l = limit(count, per);
            let now = 42_000;
            let mut b = Bucket::default();
            let mut spent = 0u64;
            for tokens in charges {
                b = charge(&l, b, tokens, now);
                spent = spent.saturating_add(tokens);
                let r = reading(&l, b, now);
                let want = count.saturating_sub(spent);
                // Rounding to nanoseconds may leave one unit either way.
                prop_assert!(r.remaining.abs_diff(want) <= 1, "{} vs {}", r.remaining, want);
                prop_assert!(r.reset <= 2 * l.per);
            }
        }

        /// What OpenAI's clients read back is what was written, to the millisecond.
        #[test]
        fn go_durations_parse_back(ms in 0u64..10_000_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(crate::duration::parse(&go_duration(d)), Some(d));
        }
    }
}
