//! The failover state machine: given how an attempt ended, what happens next.
//!
//! A request's chain is the ordered list of targets it may use (`Hop`s). The routed attempt goes
//! to the first usable hop; each failure either retries the same hop (its `retries`, when a
//! Retry-After wait fits the budget and the cap), fails over to the next usable hop, or gives up.
//! Every attempt's timeout is cut to what is left of the request's `deadline`.

use std::time::Duration;

/// An attempt needs at least this much budget to be worth sending.
pub const MIN_ATTEMPT: Duration = Duration::from_millis(20);

/// One target of a request's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// Index into `Config::targets`.
    pub target: usize,
    /// `retries + 1`.
    pub max_tries: u32,
    pub timeout: Duration,
}

/// How an attempt ended, as far as the failover policy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx, or any status that is not a failure: the client gets it.
    Delivered,
    /// A status in `on_status_codes` or a transport failure.
    Failed(Failure),
    /// The target answered that it does not hold the stored response the request names (a
    /// probe for its owner): the next target may, so the chain moves on without a retry here.
    Elsewhere,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// The upstream's Retry-After, if any.
    pub retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Status(u16),
    /// 401/403: the target refused the gateway's credential for it. Not retried on that target
    /// (the same credential would be refused again).
    Rejected(u16),
    /// Connect failure or reset: no HTTP answer from the target.
    Unreachable,
    /// The per-attempt timeout fired.
    Timeout,
}

impl FailureKind {
    /// The status of a failure that had one.
    pub fn status(self) -> Option<u16> {
        match self {
            FailureKind::Status(s) | FailureKind::Rejected(s) => Some(s),
            FailureKind::Unreachable | FailureKind::Timeout => None,
        }
    }
}

/// What happens next, after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The attempt's response goes to the client.
    Deliver,
    /// Try the same target again after `delay`.
    Retry {
        target: usize,
        delay: Duration,
        timeout: Duration,
    },
    /// Move on to `to`; `skipped` are targets passed over because they are cooling down.
    Failover {
        from: usize,
        to: usize,
        timeout: Duration,
        skipped: Vec<usize>,
    },
    /// No attempt left: the client gets this (last) failure.
    GiveUp(GiveUpReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    /// Every target (and its retries) was tried or skipped.
    Exhausted,
    /// The request's deadline leaves no time for another attempt.
    BudgetSpent,
}

/// Why a retry was not taken although the target had tries left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRetry {
    /// The Retry-After is longer than `max_retry_wait`.
    RetryAfterTooLong,
    /// Waiting the Retry-After would leave no budget for the retry.
    RetryAfterOverBudget,
}

#[derive(Debug, Clone)]
pub struct Chain {
    hops: Vec<Hop>,
    pos: usize,
    tries_here: u32,
    attempts: u32,
    deadline_ms: u64,
    max_retry_wait: Duration,
    failed_over: bool,
}

/// Whether a target may take an attempt now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Ready,
    /// Spilled over (about to be rate-limited): passed over while another target is ready, but
    /// tried when it is the only one left.
    Avoid,
    /// Cooling down: passed over on a failover; at the start of a chain it is tried only when
    /// every target is cooling (a request is never refused because of cooldowns).
    Skip,
}

impl Availability {
    fn from_cooling(cooling: bool) -> Availability {
        if cooling {
            Availability::Skip
        } else {
            Availability::Ready
        }
    }
}

/// The first attempt of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstAttempt {
    pub target: usize,
    pub timeout: Duration,
    pub skipped: Vec<usize>,
}

impl Chain {
    /// Starts a chain at `now_ms`. `cooling(target)` says whether a target is in cooldown; cooling
    /// hops are skipped unless every hop is cooling, in which case the first is tried anyway (a
    /// request is never refused because of cooldowns). `None` when `hops` is empty.
    pub fn start(
        hops: Vec<Hop>,
        now_ms: u64,
        deadline: Duration,
        max_retry_wait: Duration,
        cooling: impl Fn(usize) -> bool,
    ) -> Option<(Chain, FirstAttempt)> {
        let availability = |t| Availability::from_cooling(cooling(t));
        Chain::start_with(hops, now_ms, deadline, max_retry_wait, availability)
    }

    /// [`Chain::start`] with each target's [`Availability`]: the first ready hop; else the
    /// first avoided one; else the first hop (every target cooling).
    pub fn start_with(
        hops: Vec<Hop>,
        now_ms: u64,
        deadline: Duration,
        max_retry_wait: Duration,
        availability: impl Fn(usize) -> Availability,
    ) -> Option<(Chain, FirstAttempt)> {
        let states: Vec<Availability> = hops.iter().map(|h| availability(h.target)).collect();
        let first = |want| states.iter().position(|s| *s == want);
        let chosen = first(Availability::Ready).or_else(|| first(Availability::Avoid));
        let pos = chosen.unwrap_or(0);
        let skipped = match chosen {
            Some(p) => hops.iter().take(p).map(|h| h.target).collect(),
            None => Vec::new(),
        };
        let hop = hops.get(pos)?.clone();
        // Saturating: a `Duration` can hold more milliseconds than a `u64`.
        let deadline_ms =
            now_ms.saturating_add(u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX));
        let chain = Chain {
            hops,
            pos,
            tries_here: 1,
            attempts: 1,
            deadline_ms,
            max_retry_wait,
            failed_over: false,
        };
        let timeout = chain.cut(hop.timeout, now_ms);
        Some((
            chain,
            FirstAttempt {
                target: hop.target,
                timeout,
                skipped,
            },
        ))
    }

    /// Upstream attempts made so far (the one in flight included).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The target of the attempt in flight (or the last one).
    pub fn current_target(&self) -> Option<usize> {
        self.hops.get(self.pos).map(|h| h.target)
    }

    pub fn failed_over(&self) -> bool {
        self.failed_over
    }

    /// Whether any further attempt is possible at all (cheap check before holding a response).
    pub fn has_more(&self) -> bool {
        let here = self
            .hops
            .get(self.pos)
            .is_some_and(|h| self.tries_here < h.max_tries);
        here || self.pos + 1 < self.hops.len()
    }

    pub fn remaining(&self, now_ms: u64) -> Duration {
        Duration::from_millis(self.deadline_ms.saturating_sub(now_ms))
    }

    fn cut(&self, timeout: Duration, now_ms: u64) -> Duration {
        timeout.min(self.remaining(now_ms))
    }

    /// The attempts the chain would make from the one in flight on if every one failed with no
    /// wait asked (each target with its tries, in order): what a streamed request hands to
    /// Envoy's router, which retries at once. A failover goes where [`Chain::next_with`] would
    /// send it: the next ready target, else the next avoided one; cooling ones are passed over.
    pub fn planned(&self, availability: impl Fn(usize) -> Availability) -> Vec<(usize, u32)> {
        let mut plan = Vec::new();
        let Some(hop) = self.hops.get(self.pos) else {
            return plan;
        };
        plan.push((
            hop.target,
            hop.max_tries.saturating_sub(self.tries_here) + 1,
        ));
        let mut pos = self.pos;
        loop {
            let rest: Vec<(usize, Availability)> = (pos + 1..self.hops.len())
                .filter_map(|i| self.hops.get(i).map(|h| (i, availability(h.target))))
                .collect();
            let pick = |want| rest.iter().find(|(_, s)| *s == want).map(|(i, _)| *i);
            let Some(next) = pick(Availability::Ready).or_else(|| pick(Availability::Avoid)) else {
                return plan;
            };
            if let Some(hop) = self.hops.get(next) {
                plan.push((hop.target, hop.max_tries));
            }
            pos = next;
        }
    }

    /// Decides the next step after the attempt in flight ended with `outcome`, and records the
    /// attempt it starts. Also returns why a retry was passed over, for the log.
    pub fn next(
        &mut self,
        outcome: &Outcome,
        now_ms: u64,
        cooling: impl Fn(usize) -> bool,
    ) -> (Next, Option<NoRetry>) {
        self.next_with(outcome, now_ms, |t| Availability::from_cooling(cooling(t)))
    }

    /// [`Chain::next`] with each target's [`Availability`]: a failover goes to the next ready
    /// hop; else to the next avoided one; cooling hops are passed over.
    pub fn next_with(
        &mut self,
        outcome: &Outcome,
        now_ms: u64,
        availability: impl Fn(usize) -> Availability,
    ) -> (Next, Option<NoRetry>) {
        let failure = match outcome {
            Outcome::Delivered => return (Next::Deliver, None),
            Outcome::Failed(f) => Some(f),
            Outcome::Elsewhere => None,
        };
        let remaining = self.remaining(now_ms);
        if remaining < MIN_ATTEMPT {
            return (Next::GiveUp(GiveUpReason::BudgetSpent), None);
        }
        let Some(hop) = self.hops.get(self.pos).cloned() else {
            return (Next::GiveUp(GiveUpReason::Exhausted), None);
        };
        let mut no_retry = None;
        // A refused credential is not retried on the same target: it would be refused again.
        let retriable = |f: &&Failure| !matches!(f.kind, FailureKind::Rejected(_));
        if let Some(failure) = failure
            .filter(retriable)
            .filter(|_| self.tries_here < hop.max_tries)
        {
            let delay = failure.retry_after.unwrap_or(Duration::ZERO);
            if delay > self.max_retry_wait {
                no_retry = Some(NoRetry::RetryAfterTooLong);
            } else if delay.saturating_add(MIN_ATTEMPT) <= remaining {
                self.tries_here += 1;
                self.attempts += 1;
                let timeout = hop.timeout.min(remaining - delay);
                return (
                    Next::Retry {
                        target: hop.target,
                        delay,
                        timeout,
                    },
                    None,
                );
            } else {
                no_retry = Some(NoRetry::RetryAfterOverBudget);
            }
        }
        let rest: Vec<(usize, Availability)> = (self.pos + 1..self.hops.len())
            .filter_map(|i| self.hops.get(i).map(|h| (i, availability(h.target))))
            .collect();
        let pick = |want| rest.iter().find(|(_, s)| *s == want).map(|(i, _)| *i);
        if let Some(i) = pick(Availability::Ready).or_else(|| pick(Availability::Avoid)) {
            let skipped = rest
                .iter()
                .filter(|(j, _)| *j < i)
                .filter_map(|(j, _)| self.hops.get(*j).map(|h| h.target))
                .collect();
            let Some(next) = self.hops.get(i) else {
                return (Next::GiveUp(GiveUpReason::Exhausted), no_retry);
            };
            self.pos = i;
            self.tries_here = 1;
            self.attempts += 1;
            // An owner probe moving on after a "not found" is not a failover: the target answered.
            self.failed_over |= failure.is_some();
            let step = Next::Failover {
                from: hop.target,
                to: next.target,
                timeout: next.timeout.min(remaining),
                skipped,
            };
            return (step, no_retry);
        }
        let reason = match no_retry {
            Some(NoRetry::RetryAfterOverBudget) => GiveUpReason::BudgetSpent,
            _ => GiveUpReason::Exhausted,
        };
        (Next::GiveUp(reason), no_retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn hops(spec: &[(usize, u32, u64)]) -> Vec<Hop> {
        spec.iter()
            .map(|&(target, retries, secs)| Hop {
                target,
                max_tries: retries + 1,
                timeout: Duration::from_secs(secs),
            })
            .collect()
    }

    fn status(code: u16) -> Outcome {
        Outcome::Failed(Failure {
            kind: FailureKind::Status(code),
            retry_after: None,
        })
    }

    fn throttled(after: Duration) -> Outcome {
        Outcome::Failed(Failure {
            kind: FailureKind::Status(429),
            retry_after: Some(after),
        })
    }

    fn none(_: usize) -> bool {
        false
    }

    fn start(spec: &[(usize, u32, u64)], deadline: u64) -> Chain {
        Chain::start(hops(spec), 0, Duration::from_secs(deadline), 5 * S, none)
            .unwrap()
            .0
    }

    #[test]
    fn the_plan_of_a_streamed_request_is_what_failures_would_walk() {
        // Every availability of three targets (with retries 1, 0, 2): the plan names the
        // attempts `next_with` makes when each one fails with no wait.
        let states = [Availability::Ready, Availability::Avoid, Availability::Skip];
        for a in states {
            for b in states {
                for c in states {
                    let avail = |t: usize| [a, b, c][t];
                    let spec = [(0, 1, 10), (1, 0, 10), (2, 2, 10)];
                    let (mut chain, first) =
                        Chain::start_with(hops(&spec), 0, 60 * S, 5 * S, avail).unwrap();
                    let plan = chain.planned(avail);
                    let mut walked = vec![first.target];
                    while let (Next::Retry { target, .. } | Next::Failover { to: target, .. }, _) =
                        chain.next_with(&status(500), 0, avail)
                    {
                        walked.push(target);
                    }
                    let expanded: Vec<usize> = plan
                        .iter()
                        .flat_map(|&(t, n)| std::iter::repeat_n(t, n as usize))
                        .collect();
                    assert_eq!(expanded, walked, "{a:?} {b:?} {c:?}");
                }
            }
        }
    }

    #[test]
    fn a_rejected_credential_is_not_retried_on_the_same_target() {
        let rejected = Outcome::Failed(Failure {
            kind: FailureKind::Rejected(401),
            retry_after: None,
        });
        let mut chain = start(&[(0, 2, 10), (1, 0, 10)], 60);
        let (next, _) = chain.next_with(&rejected, 0, |_| Availability::Ready);
        assert!(
            matches!(next, Next::Failover { from: 0, to: 1, .. }),
            "{next:?}"
        );
        let (next, _) = chain.next_with(&rejected, 0, |_| Availability::Ready);
        assert_eq!(next, Next::GiveUp(GiveUpReason::Exhausted));
    }

    #[test]
    fn first_attempt_goes_to_first_ready_target_with_cut_timeout() {
        let (_, first) =
            Chain::start(hops(&[(0, 0, 10), (1, 0, 10)]), 0, 4 * S, 5 * S, none).unwrap();
        assert_eq!(
            first,
            FirstAttempt {
                target: 0,
                timeout: 4 * S,
                skipped: vec![]
            }
        );
        let (_, first) = Chain::start(hops(&[(0, 0, 10), (1, 0, 10)]), 0, 40 * S, 5 * S, |t| {
            t == 0
        })
        .unwrap();
        assert_eq!(
            first,
            FirstAttempt {
                target: 1,
                timeout: 10 * S,
                skipped: vec![0]
            }
        );
        // Every target cooling: try the first anyway rather than refuse the request.
        let (_, first) =
            Chain::start(hops(&[(0, 0, 10), (1, 0, 10)]), 0, 40 * S, 5 * S, |_| true).unwrap();
        assert_eq!(first.target, 0);
        assert!(Chain::start(vec![], 0, S, S, none).is_none());
    }

    #[test]
    fn success_is_delivered() {
        let mut c = start(&[(0, 2, 10), (1, 0, 10)], 60);
        assert_eq!(c.next(&Outcome::Delivered, 5, none).0, Next::Deliver);
        assert_eq!(c.attempts(), 1);
    }

    #[test]
    fn retries_then_fails_over_then_gives_up() {
        let mut c = start(&[(0, 1, 10), (1, 1, 10)], 60);
        let steps: Vec<Next> = (0..4).map(|_| c.next(&status(503), 1000, none).0).collect();
        assert_eq!(
            steps,
            vec![
                Next::Retry {
                    target: 0,
                    delay: Duration::ZERO,
                    timeout: 10 * S
                },
                Next::Failover {
                    from: 0,
                    to: 1,
                    timeout: 10 * S,
                    skipped: vec![]
                },
                Next::Retry {
                    target: 1,
                    delay: Duration::ZERO,
                    timeout: 10 * S
                },
                Next::GiveUp(GiveUpReason::Exhausted),
            ]
        );
        assert_eq!(c.attempts(), 4);
        assert!(c.failed_over());
        assert!(!c.has_more());
    }

    #[test]
    fn chains_of_any_length_and_order() {
        let mut c = start(&[(2, 0, 10), (0, 0, 10), (3, 0, 10), (1, 0, 10)], 60);
        let mut served = vec![c.current_target().unwrap()];
        while let (Next::Failover { to, .. }, _) = c.next(&status(500), 0, none) {
            served.push(to);
        }
        assert_eq!(served, vec![2, 0, 3, 1]);
    }

    #[test]
    fn cooling_targets_are_skipped_on_failover() {
        let mut c = start(&[(0, 0, 10), (1, 0, 10), (2, 0, 10)], 60);
        let (step, _) = c.next(&status(500), 0, |t| t == 1);
        assert_eq!(
            step,
            Next::Failover {
                from: 0,
                to: 2,
                timeout: 10 * S,
                skipped: vec![1]
            }
        );
        let mut c = start(&[(0, 0, 10), (1, 0, 10)], 60);
        assert_eq!(
            c.next(&status(500), 0, |t| t == 1).0,
            Next::GiveUp(GiveUpReason::Exhausted)
        );
    }

    #[test]
    fn a_spilled_target_is_avoided_while_another_is_ready_and_tried_when_it_is_the_last() {
        use Availability::*;
        let states = |s: [Availability; 3]| move |t: usize| s[t];
        let spec = [(0, 0, 10), (1, 0, 10), (2, 0, 10)];
        // At the start: the first ready; else the first avoided; else the first.
        let first = |s| {
            Chain::start_with(hops(&spec), 0, 60 * S, 5 * S, states(s))
                .unwrap()
                .1
        };
        assert_eq!(first([Avoid, Ready, Ready]).target, 1);
        assert_eq!(first([Avoid, Ready, Ready]).skipped, vec![0]);
        assert_eq!(first([Skip, Avoid, Skip]).target, 1);
        assert_eq!(first([Skip, Skip, Skip]).target, 0);
        // On a failover: the next ready, else the next avoided; cooling ones never.
        let after = |s| {
            let mut c = Chain::start_with(hops(&spec), 0, 60 * S, 5 * S, |_| Ready)
                .unwrap()
                .0;
            c.next_with(&status(503), 0, states(s)).0
        };
        let failover = |to, skipped: Vec<usize>| Next::Failover {
            from: 0,
            to,
            timeout: 10 * S,
            skipped,
        };
        assert_eq!(after([Ready, Avoid, Ready]), failover(2, vec![1]));
        assert_eq!(after([Ready, Avoid, Skip]), failover(1, vec![]));
        assert_eq!(after([Ready, Skip, Avoid]), failover(2, vec![1]));
        assert_eq!(
            after([Ready, Skip, Skip]),
            Next::GiveUp(GiveUpReason::Exhausted)
        );
    }

    #[test]
    fn retry_after_decides_whether_a_retry_is_worth_it() {
        // Fits the cap (5 s) and the budget: retry after the wait, timeout cut by the wait.
        let mut c = start(&[(0, 1, 10), (1, 0, 10)], 12);
        assert_eq!(
            c.next(&throttled(2 * S), 0, none).0,
            Next::Retry {
                target: 0,
                delay: 2 * S,
                timeout: 10 * S
            }
        );
        // Longer than the cap: move on at once.
        let mut c = start(&[(0, 1, 10), (1, 0, 10)], 60);
        assert_eq!(
            c.next(&throttled(30 * S), 0, none),
            (
                Next::Failover {
                    from: 0,
                    to: 1,
                    timeout: 10 * S,
                    skipped: vec![]
                },
                Some(NoRetry::RetryAfterTooLong)
            )
        );
        // Fits the cap but not the budget: fail over at once with what is left...
        let mut c = start(&[(0, 1, 10), (1, 0, 10)], 3);
        assert_eq!(
            c.next(&throttled(4 * S), 0, none),
            (
                Next::Failover {
                    from: 0,
                    to: 1,
                    timeout: 3 * S,
                    skipped: vec![]
                },
                Some(NoRetry::RetryAfterOverBudget)
            )
        );
        // ... and with no other target, the budget is what ended the chain.
        let mut c = start(&[(0, 1, 10)], 3);
        assert_eq!(
            c.next(&throttled(4 * S), 0, none).0,
            Next::GiveUp(GiveUpReason::BudgetSpent)
        );
    }

    #[test]
    fn deadline_cuts_every_attempt_and_ends_the_chain() {
        let mut c = start(&[(0, 0, 10), (1, 0, 10), (2, 0, 10)], 15);
        assert_eq!(
            c.next(&status(500), 10_000, none).0,
            Next::Failover {
                from: 0,
                to: 1,
                timeout: 5 * S,
                skipped: vec![]
            }
        );
        assert_eq!(
            c.next(&status(500), 14_990, none).0,
            Next::GiveUp(GiveUpReason::BudgetSpent)
        );
        assert_eq!(c.attempts(), 2);
    }

    #[test]
    fn a_target_without_the_named_response_is_passed_at_once() {
        // Not found on the first target: no retry there (it would say the same), the next
        // target, whatever its tries; not found on the last: the chain is spent.
        let mut c = start(&[(0, 2, 10), (1, 2, 10)], 60);
        assert_eq!(
            c.next(&Outcome::Elsewhere, 0, none).0,
            Next::Failover {
                from: 0,
                to: 1,
                timeout: 10 * S,
                skipped: vec![]
            }
        );
        assert_eq!(
            c.next(&Outcome::Elsewhere, 0, none).0,
            Next::GiveUp(GiveUpReason::Exhausted)
        );
        assert_eq!(c.attempts(), 2);
        assert!(
            !c.failed_over(),
            "moving on after a \"not found\" is no failover"
        );
    }

    #[test]
    fn transport_failures_count_like_statuses() {
        for kind in [FailureKind::Unreachable, FailureKind::Timeout] {
            let mut c = start(&[(0, 0, 10), (1, 0, 10)], 60);
            let outcome = Outcome::Failed(Failure {
                kind,
                retry_after: None,
            });
            assert!(matches!(
                c.next(&outcome, 0, none).0,
                Next::Failover { to: 1, .. }
            ));
        }
    }
}
