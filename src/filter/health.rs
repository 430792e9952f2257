//! What a request knows of its targets' health: the cooldowns (circuit breakers) shared by all
//! workers, read before an attempt and updated after it.

use super::exchange::Exchange;
use super::shared;
use crate::chain::{Failure, FailureKind};
use crate::cooldown;
use crate::duration::millis;

impl Exchange {
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
        let Some(policy) = &t.cooldown else { return };
        match failure {
            // Read clean earlier in this request: nothing to reset (one shared-data read less
            // per success). Another worker's failure since then is not reset by this success.
            None if self.clean.get() & bit(target) != 0 => {}
            None => shared::record_success(&t.name),
            Some(f) => {
                self.clean.set(self.clean.get() & !bit(target));
                let throttled = match f.kind {
                    FailureKind::Status(429) => f.retry_after,
                    _ => None,
                };
                if let Some(d) = shared::record_failure(&t.name, policy, throttled, now) {
                    self.rt.metrics.cooldown_started(target);
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
