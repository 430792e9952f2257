//! After an attempt answered: judge it, count it, and take the chain's next step, with one log
//! line per decision: deliver, retry the same target (now, or after its Retry-After:
//! `timers`), fail over to the next one (`callout`), or give up (`delivery`).

use super::exchange::{Answer, Exchange, Flow, Phase, Tally, Turn};
use crate::duration::millis;
use crate::policy::chain::{Availability, Chain, GiveUpReason, Next, NoRetry, Outcome};
use crate::policy::judge;

impl Exchange {
    /// Counts and logs the end of a chain that delivered no success.
    pub(super) fn give_up(&self, reason: GiveUpReason, attempts: u32, last: usize, what: &str) {
        let what_ended = match reason {
            GiveUpReason::Exhausted => "chain exhausted",
            GiveUpReason::BudgetSpent => "deadline spent",
        };
        self.rt.metrics.gave_up(reason);
        log::info!(
            "{} {what_ended} after {attempts} attempt(s): last target={} {what}",
            self.tag(),
            self.target_name(last)
        );
    }

    /// Judges an answer of the chain's current target and takes the chain's next step.
    pub(super) fn decide(&mut self, mut chain: Chain, answer: Answer, now: u64) -> Turn {
        let current = chain.current_target().unwrap_or(0);
        let outcome = self.probe_outcome(&answer).unwrap_or_else(|| {
            judge::outcome(
                self.config(),
                answer.status,
                answer.source,
                &answer.body,
                answer.retry_after,
            )
        });
        let failure = match &outcome {
            Outcome::Delivered | Outcome::Elsewhere => None,
            Outcome::Failed(f) => Some(f.clone()),
        };
        let kind = failure.as_ref().map(|f| f.kind);
        self.rt.metrics.attempt(
            self.request.route,
            current,
            judge::status_class(answer.status, kind),
            now.saturating_sub(self.attempting.started_ms),
        );
        // A "not found" is an answer: the target is up.
        self.record_health(current, failure.as_ref(), now);
        self.probe_answered(current, answer.status, &outcome, now);

        // A probe's chain was ordered by availability when it started, and walks every target
        // (a cooling one may be the only one that holds the response).
        let probing = self.owner_probe.is_some();
        let (step, no_retry) = chain.next_with(&outcome, now, |t| {
            if probing {
                Availability::Ready
            } else {
                self.availability(t, now)
            }
        });
        let attempts = chain.attempts();
        let failed_over = chain.failed_over();
        let tally = |budget_spent| Tally {
            attempts,
            failed_over,
            budget_spent,
        };
        let mut what = judge::describe(answer.status, kind);
        if outcome == Outcome::Elsewhere {
            what.push_str(" (not found there)");
        }
        if let Some(why) = no_retry {
            let why = match why {
                NoRetry::RetryAfterTooLong => "is over max_retry_wait",
                NoRetry::RetryAfterOverBudget => "does not fit the deadline",
            };
            log::info!(
                "{} no retry on target={}: retry-after {}ms {why}",
                self.tag(),
                self.target_name(current),
                millis(answer.retry_after.unwrap_or_default())
            );
        }
        match step {
            Next::Deliver => Turn::from(self.deliver(answer, current, None, tally(false), now)),
            Next::GiveUp(reason) => {
                let kept = self.take_probe_failure();
                if outcome == Outcome::Elsewhere
                    && kept.is_none()
                    && reason == GiveUpReason::Exhausted
                {
                    // No target holds the response: the last "not found" is the answer, as the
                    // provider would give it. No target failed, so no chain was exhausted.
                    log::info!(
                        "{} owner probe: no target holds the response after {attempts} \
                         attempt(s): last target={} {what}",
                        self.tag(),
                        self.target_name(current)
                    );
                } else {
                    self.give_up(reason, attempts, current, &what);
                }
                let budget_spent = reason == GiveUpReason::BudgetSpent;
                let (answer, served, kind) = match kept {
                    // The last target did not hold the response, an earlier one failed: the
                    // client gets that failure, not the "not found".
                    Some((target, failed, kind)) if outcome == Outcome::Elsewhere => {
                        (failed, target, kind)
                    }
                    _ => (answer, current, kind),
                };
                let flow = self.deliver(answer, served, kind, tally(budget_spent), now);
                Turn::from(flow)
            }
            Next::Retry {
                target,
                delay,
                timeout,
            } => {
                if kind.is_some() {
                    self.keep_probe_failure(current, answer, kind);
                }
                self.rt.metrics.retry(target);
                log::info!(
                    "{} retry target={} after {what} delay={}ms attempt={attempts}",
                    self.tag(),
                    self.target_name(target),
                    millis(delay)
                );
                if delay.is_zero() {
                    self.attempt(chain, target, timeout, now)
                } else {
                    self.phase = Phase::Waiting {
                        chain,
                        target,
                        timeout,
                    };
                    Turn {
                        flow: Flow::Hold,
                        wait: Some(now.saturating_add(millis(delay))),
                        callout: None,
                    }
                }
            }
            Next::Failover {
                from,
                to,
                timeout,
                skipped,
            } => {
                if kind.is_some() {
                    self.keep_probe_failure(current, answer, kind);
                }
                for s in skipped {
                    self.note_skip(s, now);
                }
                if outcome == Outcome::Elsewhere {
                    // An owner probe moving on: counted in `affinity_probes`, not as a failover
                    // (the target answered; docs/failure-semantics.md, section 1b).
                    log::info!(
                        "{} owner probe: not found on target={}, asking target={} attempt={attempts}",
                        self.tag(),
                        self.target_name(from),
                        self.target_name(to)
                    );
                } else {
                    self.rt.metrics.fallback(self.request.route, from, to);
                    log::info!(
                        "{} failover from={} to={} after {what} attempt={attempts}",
                        self.tag(),
                        self.target_name(from),
                        self.target_name(to)
                    );
                }
                self.attempt(chain, to, timeout, now)
            }
        }
    }
}
