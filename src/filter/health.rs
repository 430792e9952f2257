//! What a request knows of its targets' health, shared by all workers: the cooldowns (circuit
//! breakers, `health::cooldown`) and the spill-overs (a target about to be rate-limited), read
//! before an attempt and updated after it.

use std::time::Duration;

use super::exchange::Exchange;
use super::host::Headers;
use super::shared;
use crate::duration::millis;
use crate::health::cooldown::{self, Change, Ending, Phase, Trip};
use crate::health::spillover;
use crate::policy::chain::{Availability, Failure, FailureKind};

/// A probe's lease outlives its attempt's timeout by this much: its failure is reported first.
const PROBE_GRACE_MS: u64 = 1000;

impl Exchange {
    /// Whether target `target` may take an attempt now: cooling targets (and those whose probe
    /// is out) are skipped, spilled ones avoided.
    pub(super) fn availability(&self, target: usize, now: u64) -> Availability {
        if self.breaker(target, now).skipped() {
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
        if self.breaker(target, now).skipped() {
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

    /// Where target `target`'s circuit breaker stands (closed when it has none).
    pub(super) fn breaker(&self, target: usize, now: u64) -> Phase {
        match self.target(target) {
            Some(t) if t.cooldown.is_some() => {
                let phase = shared::cooldown_state(&t.name).phase(now);
                if phase == Phase::AwaitingProbe {
                    self.awaiting_probe
                        .set(self.awaiting_probe.get() | bit(target));
                }
                phase
            }
            _ => Phase::Closed,
        }
    }

    /// An attempt goes to `target` now, bounded by `timeout`. When the target's cooldown is over
    /// and no probe is out, this attempt is its probe: other requests pass the target over
    /// until it answers (or its lease, the timeout, runs out).
    pub(super) fn begin_attempt(&mut self, target: usize, timeout: Duration, now: u64) {
        self.attempt_started_ms = now;
        if self.pinned || self.awaiting_probe.get() & bit(target) == 0 {
            return;
        }
        let Some(t) = self.target(target) else { return };
        let lease = now
            .saturating_add(millis(timeout))
            .saturating_add(PROBE_GRACE_MS);
        if shared::claim_probe(&t.name, now, lease) {
            self.probe.set(Some((target, lease)));
            log::info!(
                "{} probe target={} (its cooling time is over)",
                self.tag(),
                t.name
            );
        }
    }

    /// Hands back a probe this request took and will not report (its client left), so the next
    /// request probes instead of waiting for the lease to run out.
    pub(super) fn release_probe(&self) {
        if let Some((target, lease)) = self.probe.take() {
            if let Some(t) = self.target(target) {
                shared::release_probe(&t.name, lease);
            }
        }
    }

    /// Records how the attempt on `target` ended (`None`: an answer that is not a failure).
    pub(super) fn record_health(&self, target: usize, failure: Option<&Failure>, now: u64) {
        if self.probe.get().is_some_and(|(t, _)| t == target) {
            self.probe.set(None);
        }
        let Some(t) = self.target(target) else { return };
        let Some(policy) = &t.cooldown else { return };
        let ending = match failure {
            None => Ending::Answered,
            Some(f) => match f.kind {
                FailureKind::Status(429) => Ending::Status {
                    wait: f.retry_after,
                },
                FailureKind::Status(_) => Ending::Status { wait: None },
                FailureKind::Unreachable | FailureKind::Timeout => Ending::Transport,
            },
        };
        let attempt = cooldown::Attempt {
            started_ms: self.attempt_started_ms,
            pinned: self.pinned,
        };
        match shared::record_attempt(&t.name, policy, attempt, ending, now) {
            Change::Cooled(d, trip) => {
                self.rt.metrics.cooldown_started(target);
                let why = match trip {
                    Trip::RetryAfter => "the wait a 429 asked for".to_string(),
                    Trip::FailureRate { failures, attempts } => format!(
                        "{failures} of {attempts} attempts failed in {}ms",
                        millis(policy.window)
                    ),
                    Trip::TransportStreak(n) => format!("{n} transport failures in a row"),
                    Trip::Streak(n) => format!("{n} failures in a row"),
                    Trip::Probe => "its probe failed".to_string(),
                };
                log::info!(
                    "{} cooldown target={} for {}ms ({why})",
                    self.tag(),
                    t.name,
                    millis(d)
                );
            }
            Change::Recovered => {
                self.rt.metrics.recovered(target);
                log::info!(
                    "{} recovered target={} (its probe was answered)",
                    self.tag(),
                    t.name
                );
            }
            Change::None | Change::Counted => {}
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

/// Target `target`'s bit in `Exchange::awaiting_probe` (none past 63: such a target is never
/// probed by claim, its cooldown ends for every request at once).
fn bit(target: usize) -> u64 {
    u32::try_from(target)
        .ok()
        .and_then(|t| 1u64.checked_shl(t))
        .unwrap_or(0)
}
