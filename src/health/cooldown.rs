//! Cooldowns: a circuit breaker per target, shared by every Envoy worker through shared data.
//! A target that answers 429 with a Retry-After, or fails `after_failures` times in a row, is
//! skipped until its cooldown ends. This module is the pure part: the state and its transitions.

use std::time::Duration;

use crate::config::Cooldown;

/// The shared state of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct State {
    /// Unix ms until which the target is skipped (0: not cooling).
    pub until_ms: u64,
    /// Consecutive failures since the last success or cooldown.
    pub failures: u32,
}

const ENCODED: usize = 12;

impl State {
    pub fn decode(bytes: &[u8]) -> State {
        let until = bytes
            .get(0..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes);
        let failures = bytes
            .get(8..12)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes);
        match (until, failures) {
            (Some(until_ms), Some(failures)) if bytes.len() == ENCODED => {
                State { until_ms, failures }
            }
            _ => State::default(),
        }
    }

    pub fn encode(&self) -> [u8; ENCODED] {
        let mut out = [0u8; ENCODED];
        let (a, b) = out.split_at_mut(8);
        a.copy_from_slice(&self.until_ms.to_le_bytes());
        b.copy_from_slice(&self.failures.to_le_bytes());
        out
    }

    pub fn cooling(&self, now_ms: u64) -> bool {
        self.until_ms > now_ms
    }
}

/// What a failure did to a target's cooldown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cooled {
    /// Counted, no cooldown (yet).
    No,
    /// The target was not cooling and now is, for this long.
    Started(Duration),
    /// The target was cooling already; it now cools at least this long from now.
    Extended(Duration),
}

impl Cooled {
    /// The cooldown this failure set, started or extended.
    pub fn set(self) -> Option<Duration> {
        match self {
            Cooled::No => None,
            Cooled::Started(d) | Cooled::Extended(d) => Some(d),
        }
    }

    /// The cooldown this failure started: a target cooling already is not starting a new one
    /// (no new log line or `cooldowns` count for it).
    pub fn started(self) -> Option<Duration> {
        match self {
            Cooled::Started(d) => Some(d),
            _ => None,
        }
    }
}

/// The state after a failure, and what it did to the cooldown.
pub fn after_failure(
    state: State,
    policy: &Cooldown,
    throttled_for: Option<Duration>,
    now_ms: u64,
) -> (State, Cooled) {
    let failures = state.failures.saturating_add(1);
    let mut cooldown = None;
    if let Some(wait) = throttled_for.filter(|w| !w.is_zero()) {
        cooldown = Some(wait.min(policy.max_duration));
    }
    if policy.after_failures > 0 && failures >= policy.after_failures {
        cooldown = Some(cooldown.map_or(policy.duration, |c| c.max(policy.duration)));
    }
    match cooldown {
        Some(d) => {
            let until = now_ms
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .max(state.until_ms);
            (
                State {
                    until_ms: until,
                    failures: 0,
                },
                if state.cooling(now_ms) {
                    Cooled::Extended(d)
                } else {
                    Cooled::Started(d)
                },
            )
        }
        None => (
            State {
                until_ms: state.until_ms,
                failures,
            },
            Cooled::No,
        ),
    }
}

/// The state after a success; `None` when nothing changes (no shared-data write needed).
pub fn after_success(state: State) -> Option<State> {
    (state.failures != 0).then_some(State {
        until_ms: state.until_ms,
        failures: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy() -> Cooldown {
        Cooldown {
            after_failures: 3,
            duration: 30 * S,
            max_duration: 60 * S,
        }
    }

    #[test]
    fn consecutive_failures_trip_the_cooldown() {
        let mut s = State::default();
        for _ in 0..2 {
            let (next, cooled) = after_failure(s, &policy(), None, 1000);
            assert_eq!(cooled.set(), None);
            s = next;
        }
        assert_eq!(s.failures, 2);
        assert!(!s.cooling(1000));
        let (s, cooled) = after_failure(s, &policy(), None, 1000);
        assert_eq!(cooled.set(), Some(30 * S));
        assert!(s.cooling(30_999));
        assert!(!s.cooling(31_000));
        assert_eq!(s.failures, 0);
    }

    #[test]
    fn a_throttle_with_retry_after_cools_for_that_long_capped() {
        let (s, cooled) = after_failure(State::default(), &policy(), Some(2 * S), 0);
        assert_eq!(cooled.set(), Some(2 * S));
        assert!(s.cooling(1999) && !s.cooling(2000));
        let (_, cooled) = after_failure(State::default(), &policy(), Some(600 * S), 0);
        assert_eq!(cooled.set(), Some(60 * S));
        let (_, cooled) = after_failure(State::default(), &policy(), Some(Duration::ZERO), 0);
        assert_eq!(cooled.set(), None);
    }

    #[test]
    fn success_resets_the_count_and_writes_only_when_needed() {
        assert_eq!(after_success(State::default()), None);
        assert_eq!(
            after_success(State {
                until_ms: 5,
                failures: 2
            }),
            Some(State {
                until_ms: 5,
                failures: 0
            })
        );
    }

    #[test]
    fn a_failure_while_cooling_extends_the_cooldown_without_starting_one() {
        let (s, cooled) = after_failure(State::default(), &policy(), Some(2 * S), 0);
        assert_eq!(cooled, Cooled::Started(2 * S));
        let (s, cooled) = after_failure(s, &policy(), Some(5 * S), 1000);
        assert_eq!(cooled, Cooled::Extended(5 * S));
        assert_eq!((cooled.started(), cooled.set()), (None, Some(5 * S)));
        assert!(s.cooling(5999) && !s.cooling(6000));
        let (_, cooled) = after_failure(s, &policy(), Some(S), 7000);
        assert_eq!(cooled, Cooled::Started(S), "the last cooldown had ended");
    }

    #[test]
    fn disabled_count_only_cools_on_throttle() {
        let p = Cooldown {
            after_failures: 0,
            ..policy()
        };
        let (s, cooled) = after_failure(
            State {
                until_ms: 0,
                failures: 100,
            },
            &p,
            None,
            0,
        );
        assert_eq!(cooled.set(), None);
        assert!(!s.cooling(0));
    }

    #[test]
    fn encoding_round_trips_and_garbage_reads_as_fresh() {
        let s = State {
            until_ms: 1_700_000_000_123,
            failures: 7,
        };
        assert_eq!(State::decode(&s.encode()), s);
        assert_eq!(State::decode(b""), State::default());
        assert_eq!(State::decode(b"short"), State::default());
        assert_eq!(State::decode(&[1u8; 13]), State::default());
    }
}
