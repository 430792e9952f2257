//! What a request knows of its targets' health, shared by all workers: the cooldowns (circuit
//! breakers) and the spill-overs (a target about to be rate-limited), read before an attempt and
//! updated after it.

use super::exchange::Exchange;
use super::host::Headers;
use super::shared;
use crate::duration::millis;
use crate::health::cooldown;
use crate::health::spillover;
use crate::policy::chain::{Availability, Failure, FailureKind};

impl Exchange {
    /// Whether target `target` may take an attempt now: cooling targets are skipped, spilled
    /// ones avoided.
    pub(super) fn availability(&self, target: usize, now: u64) -> Availability {
        if self.is_cooling(target, now) {
            Availability::Skip
        } else if self.is_spilled(target, now) {
            Availability::Avoid
        } else {
            Availability::Ready
        }
    }

    fn is_spilled(&self, target: usize, now: u64) -> bool {
        match self.target(target) {
            Some(t) if t.spillover.is_some() => shared::spilled_until(&t.name) > now,
            _ => false,
        }
    }

    /// Reads a target's rate-limit headers from one of its answers and, when it reports
    /// running low, avoids the target until its reset.
    pub(super) fn record_limits(&self, target: usize, headers: &Headers, now: u64) {
        let Some((t, policy)) = self.target(target).and_then(|t| Some((t, t.spillover?))) else {
            return;
        };
        let limits = spillover::limits(headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
        let Some(avoid) = spillover::avoid_for(&policy, &limits) else {
            return;
        };
        if shared::spill(&t.name, now.saturating_add(millis(avoid))) {
            self.rt.metrics.spillover(target);
            log::info!(
                "{} spillover target={} for {}ms (remaining requests {:?}, tokens {:?})",
                self.tag(),
                t.name,
                millis(avoid),
                limits.remaining_requests,
                limits.remaining_tokens
            );
        }
    }

    /// Logs and counts a target passed over, with why.
    pub(super) fn note_skip(&self, target: usize, now: u64) {
        if self.is_cooling(target, now) {
            self.note_cooldown_skip(target);
        } else {
            self.rt.metrics.spillover_skip(target);
            log::info!(
                "{} skip target={} reason=spillover",
                self.tag(),
                self.target_name(target)
            );
        }
    }

    /// Whether target `target` is cooling down (and so skipped).
    pub(super) fn is_cooling(&self, target: usize, now: u64) -> bool {
        match self.target(target) {
            Some(t) if t.cooldown.is_some() => {
                let state = shared::cooldown_state(&t.name);
                if cooldown::after_success(state).is_none() {
                    self.clean.set(self.clean.get() | bit(target));
                }
                state.cooling(now)
            }
            _ => false,
        }
    }

    /// Records how an attempt on `target` ended (`None`: an answer that is not a failure).
    pub(super) fn record_health(&self, target: usize, failure: Option<&Failure>, now: u64) {
        let Some(t) = self.target(target) else { return };
        if let Some(Failure {
            kind: FailureKind::Rejected(_),
            ..
        }) = failure
        {
            self.rt.metrics.credential_rejected(target);
        }
        let Some(policy) = &t.cooldown else { return };
        match failure {
            // Read clean earlier in this request: nothing to reset (one shared-data read less
            // per success). Another worker's failure since then is not reset by this success.
            None if self.clean.get() & bit(target) != 0 => {}
            None => shared::record_success(&t.name),
            Some(f) => {
                self.clean.set(self.clean.get() & !bit(target));
                let rejected = matches!(f.kind, FailureKind::Rejected(_));
                let cools_for = match f.kind {
                    FailureKind::Status(429) => f.retry_after,
                    // A refused credential stays refused: the target cools at once.
                    FailureKind::Rejected(_) => Some(policy.duration),
                    _ => None,
                };
                let Some(d) = shared::record_failure(&t.name, policy, cools_for, now) else {
                    return;
                };
                self.rt.metrics.cooldown_started(target);
                if rejected {
                    // Once per cooldown, so a revoked key does not flood the log.
                    log::warn!(
                        "{} credential_rejected target={} after {}: the target refused the \
                         gateway's credential for it (check its key or token); cooldown for {}ms",
                        self.tag(),
                        t.name,
                        crate::policy::judge::describe(f.kind.status(), None),
                        millis(d)
                    );
                } else {
                    log::info!(
                        "{} cooldown target={} for {}ms",
                        self.tag(),
                        t.name,
                        millis(d)
                    );
                }
            }
        }
    }

    pub(super) fn note_cooldown_skip(&self, target: usize) {
        self.rt.metrics.cooldown_skip(target);
        log::info!(
            "{} skip target={} reason=cooldown",
            self.tag(),
            self.target_name(target)
        );
    }
}

/// Target `target`'s bit in `Exchange::clean` (none past 63: such a target is read every time).
fn bit(target: usize) -> u64 {
    u32::try_from(target)
        .ok()
        .and_then(|t| 1u64.checked_shl(t))
        .unwrap_or(0)
}
