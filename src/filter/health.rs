//! What a request knows of its targets' health, shared by all workers: the cooldowns (circuit
//! breakers, `health::cooldown`) and the spill-overs (a target about to be rate-limited), read
//! before an attempt and updated after it. The downstream filter (`Exchange`) and a streamed
//! attempt (`upstream`) each keep their own `Attempting` and meet the targets through the same
//! narrow `Scope`.

use std::cell::Cell;
use std::time::Duration;

use super::exchange::Exchange;
use super::host::Headers;
use super::runtime::Runtime;
use super::shared;
use crate::config::{Step, Target};
use crate::duration::millis;
use crate::health::cooldown::{self, Change, Ending, Phase, Trip};
use crate::health::spillover;
use crate::policy::chain::{Availability, Failure, FailureKind};

/// A probe's lease outlives its attempt's timeout by this much: its failure is reported first.
const PROBE_GRACE_MS: u64 = 1000;

/// What the downstream filter and the streamed attempts of one request share: the runtime and
/// who the request is (for the targets, the steps of its route and its log lines).
#[derive(Clone, Copy)]
pub(super) struct Scope<'a> {
    pub rt: &'a Runtime,
    /// The downstream request's context.
    pub context_id: u32,
    pub request_id: &'a str,
    /// The named route the request is on (index into `Config::routes`).
    pub route: Option<usize>,
}

/// One side's attempts as the targets' health sees them: when the attempt in flight started,
/// and the probe it took of a target whose cooldown ended.
#[derive(Default)]
pub(super) struct Attempting {
    /// A Responses follow-up pinned to the owner of its previous response: it goes there
    /// whatever the owner's state, so it never probes nor moves a cooldown.
    pub pinned: bool,
    pub started_ms: u64,
    /// Targets (bit i: target i) seen with their cooldown over and no probe out: an attempt
    /// there tries to take the probe.
    awaiting_probe: Cell<u64>,
    /// The probe taken and not reported yet: target and lease end.
    probe: Cell<Option<(usize, u64)>>,
}

impl<'a> Scope<'a> {
    pub fn target(&self, i: usize) -> Option<&'a Target> {
        self.rt.config.targets.get(i)
    }

    pub fn target_name(&self, i: usize) -> &'a str {
        self.target(i).map_or("?", |t| t.name.as_str())
    }

    /// Target `target` as a step of this request's chain (its route's, or the top level's).
    pub fn step(&self, target: usize) -> Option<&'a Step> {
        let config = &self.rt.config;
        match self.route.and_then(|r| config.routes.get(r)) {
            Some(route) => route.steps.iter().find(|s| s.target == target),
            None => config.steps.get(target),
        }
    }

    pub fn route_name(&self) -> Option<&'a str> {
        let route = self.rt.config.routes.get(self.route?)?;
        Some(&route.name)
    }

    /// How every log line of this request starts.
    pub fn tag(&self) -> String {
        let mut tag = format!("[ctx={}", self.context_id);
        if !self.request_id.is_empty() {
            tag.push_str(" req=");
            tag.push_str(self.request_id);
        }
        if let Some(route) = self.route_name() {
            tag.push_str(" route=");
            tag.push_str(route);
        }
        tag.push(']');
        tag
    }

    fn is_spilled(&self, target: usize, now: u64) -> bool {
        match self.target(target) {
            Some(t) if t.spillover.is_some() => shared::spilled_until(&t.name) > now,
            _ => false,
        }
    }

    /// Reads a target's rate-limit headers from one of its answers and, when it reports
    /// running low, avoids the target until its reset.
    pub fn record_limits(&self, target: usize, headers: &Headers, now: u64) {
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

    pub fn note_cooldown_skip(&self, target: usize) {
        self.rt.metrics.cooldown_skip(target);
        log::info!(
            "{} skip target={} reason=cooldown",
            self.tag(),
            self.target_name(target)
        );
    }
}

impl Attempting {
    pub fn new(pinned: bool) -> Attempting {
        Attempting {
            pinned,
            ..Attempting::default()
        }
    }

    /// Whether target `target` may take an attempt now: cooling targets (and those whose probe
    /// is out) are skipped, spilled ones avoided.
    pub fn availability(&self, scope: &Scope, target: usize, now: u64) -> Availability {
        if self.breaker(scope, target, now).skipped() {
            Availability::Skip
        } else if scope.is_spilled(target, now) {
            Availability::Avoid
        } else {
            Availability::Ready
        }
    }

    /// Logs and counts a target passed over, with why.
    pub fn note_skip(&self, scope: &Scope, target: usize, now: u64) {
        if self.breaker(scope, target, now).skipped() {
            scope.note_cooldown_skip(target);
        } else {
            scope.rt.metrics.spillover_skip(target);
            log::info!(
                "{} skip target={} reason=spillover",
                scope.tag(),
                scope.target_name(target)
            );
        }
    }

    /// Where target `target`'s circuit breaker stands (closed when it has none).
    pub fn breaker(&self, scope: &Scope, target: usize, now: u64) -> Phase {
        match scope.target(target) {
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
    pub fn begin(&mut self, scope: &Scope, target: usize, timeout: Duration, now: u64) {
        self.started_ms = now;
        if self.pinned || self.awaiting_probe.get() & bit(target) == 0 {
            return;
        }
        let Some(t) = scope.target(target) else {
            return;
        };
        let lease = now
            .saturating_add(millis(timeout))
            .saturating_add(PROBE_GRACE_MS);
        if shared::claim_probe(&t.name, now, lease) {
            self.probe.set(Some((target, lease)));
            log::info!(
                "{} probe target={} (its cooling time is over)",
                scope.tag(),
                t.name
            );
        }
    }

    /// Hands back a probe taken and never to be reported (its client left), so the next
    /// request probes instead of waiting for the lease to run out.
    pub fn release_probe(&self, scope: &Scope) {
        if let Some((target, lease)) = self.probe.take() {
            if let Some(t) = scope.target(target) {
                shared::release_probe(&t.name, lease);
            }
        }
    }

    /// Records how the attempt on `target` ended (`None`: an answer that is not a failure).
    pub fn record_health(&self, scope: &Scope, target: usize, failure: Option<&Failure>, now: u64) {
        if self.probe.get().is_some_and(|(t, _)| t == target) {
            self.probe.set(None);
        }
        let Some(t) = scope.target(target) else {
            return;
        };
        if let Some(Failure {
            kind: FailureKind::Rejected(_),
            ..
        }) = failure
        {
            scope.rt.metrics.credential_rejected(target);
        }
        let Some(policy) = &t.cooldown else { return };
        let ending = match failure {
            None => Ending::Answered,
            Some(f) => match f.kind {
                FailureKind::Status(429) => Ending::Status {
                    wait: f.retry_after,
                },
                FailureKind::Status(_) => Ending::Status { wait: None },
                FailureKind::Rejected(_) => Ending::Rejected,
                FailureKind::Unreachable | FailureKind::Timeout => Ending::Transport,
            },
        };
        let attempt = cooldown::Attempt {
            started_ms: self.started_ms,
            pinned: self.pinned,
        };
        let tag = || scope.tag();
        match shared::record_attempt(&t.name, policy, attempt, ending, now) {
            Change::Cooled(d, trip) => {
                scope.rt.metrics.cooldown_started(target);
                let why = match trip {
                    Trip::RetryAfter => "the wait a 429 asked for".to_string(),
                    Trip::CredentialRejected => "its credential was refused".to_string(),
                    Trip::FailureRate { failures, attempts } => format!(
                        "{failures} of {attempts} attempts failed in {}ms",
                        millis(policy.window)
                    ),
                    Trip::TransportStreak(n) => format!("{n} transport failures in a row"),
                    Trip::Streak(n) => format!("{n} failures in a row"),
                    Trip::Probe => "its probe failed".to_string(),
                };
                if trip == Trip::CredentialRejected {
                    // Once per cooldown, so a revoked key does not flood the log.
                    log::warn!(
                        "{} credential_rejected target={}: the target refused the gateway's \
                         credential for it (check its key or token); cooldown for {}ms",
                        tag(),
                        t.name,
                        millis(d)
                    );
                } else {
                    log::info!(
                        "{} cooldown target={} for {}ms ({why})",
                        tag(),
                        t.name,
                        millis(d)
                    );
                }
            }
            Change::Recovered => {
                scope.rt.metrics.recovered(target);
                log::info!(
                    "{} recovered target={} (its probe was answered)",
                    tag(),
                    t.name
                );
            }
            Change::None | Change::Counted => {}
        }
    }
}

/// The downstream filter's side: its own `Attempting`, met through its `Scope`.
impl Exchange {
    pub(super) fn availability(&self, target: usize, now: u64) -> Availability {
        self.attempting.availability(&self.scope(), target, now)
    }

    pub(super) fn note_skip(&self, target: usize, now: u64) {
        self.attempting.note_skip(&self.scope(), target, now);
    }

    pub(super) fn record_limits(&self, target: usize, headers: &Headers, now: u64) {
        self.scope().record_limits(target, headers, now);
    }

    pub(super) fn begin_attempt(&mut self, target: usize, timeout: Duration, now: u64) {
        let scope = Scope {
            rt: &self.rt,
            context_id: self.context_id,
            request_id: &self.request.id,
            route: self.request.route,
        };
        self.attempting.begin(&scope, target, timeout, now);
    }

    pub(super) fn release_probe(&self) {
        self.attempting.release_probe(&self.scope());
    }

    pub(super) fn record_health(&self, target: usize, failure: Option<&Failure>, now: u64) {
        self.attempting
            .record_health(&self.scope(), target, failure, now);
    }
}

/// Target `target`'s bit in `Attempting::awaiting_probe` (none past 63: such a target is never
/// probed by claim, its cooldown ends for every request at once).
fn bit(target: usize) -> u64 {
    u32::try_from(target)
        .ok()
        .and_then(|t| 1u64.checked_shl(t))
        .unwrap_or(0)
}
