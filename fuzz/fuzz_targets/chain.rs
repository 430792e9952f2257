//! The failover state machine driven by fuzzed outcome sequences, times and cooldowns.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use llm_failover::policy::chain::{
    Chain, Failure, FailureKind, GiveUpReason, Hop, Outcome, Next, MIN_ATTEMPT,
};

#[derive(Arbitrary, Debug)]
enum FuzzOutcome {
    Delivered,
    Status(u16, Option<u64>),
    Unreachable,
    Timeout,
    /// The target does not hold the response the request names.
    NotHere,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// (target, retries, timeout in ms)
    hops: Vec<(u8, u8, u64)>,
    start_ms: u64,
    deadline: (u64, u32),
    max_retry_wait_ms: u64,
    start_cooling: u64,
    /// (outcome, ms since the previous decision, cooling targets as bits)
    events: Vec<(FuzzOutcome, u32, u64)>,
}

fn cooling(mask: u64) -> impl Fn(usize) -> bool {
    move |t| t < 64 && mask & (1 << t) != 0
}

fuzz_target!(|input: Input| {
    let hops: Vec<Hop> = input
        .hops
        .iter()
        .take(16)
        .map(|&(target, retries, timeout_ms)| Hop {
            target: usize::from(target % 64),
            max_tries: u32::from(retries % 16) + 1,
            timeout: Duration::from_millis(timeout_ms),
        })
        .collect();
    let deadline = Duration::new(input.deadline.0, input.deadline.1 % 1_000_000_000);
    let max_retry_wait = Duration::from_millis(input.max_retry_wait_ms);
    let Some((mut chain, first)) = Chain::start(
        hops.clone(),
        input.start_ms,
        deadline,
        max_retry_wait,
        cooling(input.start_cooling),
    ) else {
        assert!(hops.is_empty());
        return;
    };
    let deadline_ms = input
        .start_ms
        .saturating_add(u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX));
    let left = |now: u64| Duration::from_millis(deadline_ms.saturating_sub(now));
    let sum_tries: u32 = hops.iter().map(|h| h.max_tries).sum();
    let mut pos = hops.iter().position(|h| h.target == first.target).unwrap();
    assert!(first.timeout <= hops[pos].timeout && first.timeout <= left(input.start_ms));
    let mut tries = vec![0u32; hops.len()];
    tries[pos] = 1;
    if input.events.is_empty() {
        return;
    }
    let mut now = input.start_ms;
    let mut steps = 0u32;
    for (event, advance, mask) in input.events.iter().cycle() {
        steps += 1;
        assert!(
            steps <= sum_tries,
            "the chain did not end within sum(max_tries) steps"
        );
        now = now.saturating_add(u64::from(*advance));
        let outcome = match event {
            FuzzOutcome::Delivered => Outcome::Delivered,
            FuzzOutcome::Status(s, wait) => Outcome::Failed(Failure {
                kind: FailureKind::Status(*s),
                retry_after: wait.map(Duration::from_millis),
            }),
            FuzzOutcome::Unreachable => Outcome::Failed(Failure {
                kind: FailureKind::Unreachable,
                retry_after: None,
            }),
            FuzzOutcome::Timeout => Outcome::Failed(Failure {
                kind: FailureKind::Timeout,
                retry_after: None,
            }),
            FuzzOutcome::NotHere => Outcome::Elsewhere,
        };
        let remaining = left(now);
        let (step, _) = chain.next(&outcome, now, cooling(*mask));
        match step {
            Next::Deliver => {
                assert_eq!(outcome, Outcome::Delivered);
                return;
            }
            Next::Retry {
                target,
                delay,
                timeout,
            } => {
                assert_eq!(target, hops[pos].target);
                assert_ne!(outcome, Outcome::Elsewhere, "retried where the response is not");
                assert!(tries[pos] < hops[pos].max_tries, "retry beyond max_tries");
                assert!(delay <= max_retry_wait);
                assert!(timeout <= hops[pos].timeout && delay + timeout <= remaining);
                tries[pos] += 1;
            }
            Next::Failover {
                from,
                to,
                timeout,
                skipped,
            } => {
                assert_eq!(from, hops[pos].target);
                let next = pos + 1 + hops[pos + 1..].iter().position(|h| h.target == to).unwrap();
                assert!(!cooling(*mask)(to));
                assert!(skipped.iter().all(|&t| cooling(*mask)(t)));
                assert!(timeout <= hops[next].timeout && timeout <= remaining);
                pos = next;
                tries[pos] += 1;
            }
            Next::GiveUp(reason) => {
                assert_ne!(outcome, Outcome::Delivered);
                if reason == GiveUpReason::Exhausted {
                    assert!(remaining >= MIN_ATTEMPT);
                    assert!(hops[pos + 1..].iter().all(|h| cooling(*mask)(h.target)));
                }
                return;
            }
        }
        assert_eq!(chain.attempts(), tries.iter().sum::<u32>());
        assert!(chain.attempts() <= sum_tries);
        assert_eq!(chain.current_target(), Some(hops[pos].target));
    }
});
