//! Cooldowns: a circuit breaker per target, shared by every Envoy worker through shared data.
//! This module is the pure part, the state and its transitions; `filter::health` reads and
//! writes it (compare-and-swap) around each attempt.
//!
//! * **Closed** (the target takes traffic): every attempt is counted in a sliding window of
//!   `window` (ten buckets of a tenth each). The target starts cooling when at least
//!   `min_attempts` attempts in the window failed at `failure_rate` or more; when
//!   `after_transport_failures` transport failures (no answer: unreachable, timeout) came in a
//!   row; when `after_failures` failures of any kind came in a row (off by default: a brownout
//!   trips it); or, for exactly that long (capped at `max_duration`), on a 429 with a wait.
//! * **Cooling** until `until_ms`: new requests skip the target. Nothing an attempt reports
//!   changes the cooldown: attempts still in flight when it began, pinned Responses follow-ups
//!   and the forced attempts of a chain whose targets all cool neither extend nor end it.
//! * **Half-open** once `until_ms` has passed: the next attempt is the probe (one at a time,
//!   claimed with [`claim_probe`]; others skip the target while it is out). Its answer closes the
//!   breaker (full traffic at once); its failure starts a new cooldown.

use std::time::Duration;

use crate::config::Cooldown;

/// Buckets of the sliding window (each `window / BUCKETS` long).
pub const BUCKETS: usize = 10;

/// Attempts and failures counted in one tenth of the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bucket {
    /// Which tenth of time this bucket counts (`now_ms / bucket_ms`).
    pub slot: u64,
    pub attempts: u32,
    pub failures: u32,
}

/// The shared state of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct State {
    /// Unix ms until which the target cools (0: closed). Past it, half-open until its probe
    /// answers.
    pub until_ms: u64,
    /// When the last cooldown began: an attempt that started before it is stale.
    pub since_ms: u64,
    /// Half-open: the probe is out until this time (0: no probe out).
    pub probe_until_ms: u64,
    /// Transport failures in a row.
    pub transport_streak: u32,
    /// Failures of any kind in a row.
    pub failure_streak: u32,
    pub window: [Bucket; BUCKETS],
}

/// Where a target's breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Takes traffic.
    Closed,
    /// Skipped until its cooldown ends.
    Cooling,
    /// The cooldown ended and its probe is out: skipped until the probe answers.
    Probing,
    /// The cooldown ended: the next attempt is its probe.
    AwaitingProbe,
}

impl Phase {
    /// Whether new requests pass the target over.
    pub fn skipped(self) -> bool {
        matches!(self, Phase::Cooling | Phase::Probing)
    }
}

const HEAD: usize = 8 * 3 + 4 * 2;
const BUCKET: usize = 8 + 4 + 4;
const ENCODED: usize = HEAD + BUCKET * BUCKETS;

/// A little-endian reader over a byte slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*head))
    }

    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*head))
    }
}

impl State {
    /// Reads an encoded state; anything else (another version's, garbage) reads as closed.
    pub fn decode(bytes: &[u8]) -> State {
        if bytes.len() != ENCODED {
            return State::default();
        }
        let mut r = Reader(bytes);
        let mut read = || -> Option<State> {
            let mut s = State {
                until_ms: r.u64()?,
                since_ms: r.u64()?,
                probe_until_ms: r.u64()?,
                transport_streak: r.u32()?,
                failure_streak: r.u32()?,
                window: [Bucket::default(); BUCKETS],
            };
            for b in &mut s.window {
                *b = Bucket {
                    slot: r.u64()?,
                    attempts: r.u32()?,
                    failures: r.u32()?,
                };
            }
            Some(s)
        };
        read().unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED);
        for v in [self.until_ms, self.since_ms, self.probe_until_ms] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.transport_streak, self.failure_streak] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for b in &self.window {
            out.extend_from_slice(&b.slot.to_le_bytes());
            out.extend_from_slice(&b.attempts.to_le_bytes());
            out.extend_from_slice(&b.failures.to_le_bytes());
        }
        out
    }

    pub fn phase(&self, now_ms: u64) -> Phase {
        if self.until_ms == 0 {
            Phase::Closed
        } else if self.until_ms > now_ms {
            Phase::Cooling
        } else if self.probe_until_ms > now_ms {
            Phase::Probing
        } else {
            Phase::AwaitingProbe
        }
    }

    /// Attempts and failures in the window ending at `now_ms`.
    pub fn window_counts(&self, window: Duration, now_ms: u64) -> (u32, u32) {
        let current = now_ms / bucket_ms(window);
        self.window
            .iter()
            .filter(|b| current.saturating_sub(b.slot) < BUCKETS as u64)
            .fold((0u32, 0u32), |(a, f), b| {
                (a.saturating_add(b.attempts), f.saturating_add(b.failures))
            })
    }

    fn count(&mut self, window: Duration, now_ms: u64, failed: bool) {
        let slot = now_ms / bucket_ms(window);
        let index = usize::try_from(slot % BUCKETS as u64).unwrap_or(0);
        if let Some(b) = self.window.get_mut(index) {
            if b.slot != slot {
                *b = Bucket {
                    slot,
                    ..Bucket::default()
                };
            }
            b.attempts = b.attempts.saturating_add(1);
            b.failures = b.failures.saturating_add(u32::from(failed));
        }
    }

    /// A cooldown of `d` starting at `now_ms`: the counts start over.
    fn cooled(now_ms: u64, d: Duration) -> State {
        State {
            // Never 0 (closed), even for a zero-length cooldown at time 0.
            until_ms: now_ms.saturating_add(ms(d)).max(1),
            since_ms: now_ms,
            ..State::default()
        }
    }
}

fn bucket_ms(window: Duration) -> u64 {
    (ms(window) / BUCKETS as u64).max(1)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A failure rate as parts per 10,000 (0: the rate trigger is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(u16);

impl Rate {
    pub const ONE: u16 = 10_000;

    /// `n` parts per 10,000 (at most all of them).
    pub const fn from_per_10000(n: u16) -> Rate {
        Rate(if n > Rate::ONE { Rate::ONE } else { n })
    }

    /// `fraction` in [0, 1]; `None` otherwise.
    pub fn from_fraction(fraction: f64) -> Option<Rate> {
        (0.0..=1.0)
            .contains(&fraction)
            .then(|| Rate((fraction * f64::from(Rate::ONE)).round() as u16))
    }

    pub fn per_10000(self) -> u16 {
        self.0
    }

    /// Whether `failures` of `attempts` reach this rate.
    pub fn reached(self, failures: u32, attempts: u32) -> bool {
        self.0 > 0
            && attempts > 0
            && u64::from(failures) * u64::from(Rate::ONE) >= u64::from(attempts) * u64::from(self.0)
    }
}

/// The attempt a report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// When it was sent (unix ms).
    pub started_ms: u64,
    /// A Responses follow-up pinned to its previous response's owner: sent whatever the
    /// owner's state, so while the owner cools or awaits its probe it tells nothing.
    pub pinned: bool,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// An answer that is not a failure: the target is up.
    Answered,
    /// A failure status; `wait`: a 429's Retry-After.
    Status { wait: Option<Duration> },
    /// No answer: unreachable, reset or timed out.
    Transport,
}

/// Why a cooldown started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    /// A 429 asked for a wait.
    RetryAfter,
    /// `failures` of `attempts` in the window failed.
    FailureRate { failures: u32, attempts: u32 },
    /// Transport failures in a row.
    TransportStreak(u32),
    /// Failures of any kind in a row (`after_failures`).
    Streak(u32),
    /// The half-open probe failed.
    Probe,
}

/// What a report did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing (no shared-data write needed).
    None,
    /// Counted; the breaker stays closed.
    Counted,
    /// A cooldown started, for this long.
    Cooled(Duration, Trip),
    /// The probe was answered: the target takes full traffic again.
    Recovered,
}

/// The state after an attempt on the target ended at `now_ms`, and what that did.
pub fn after_attempt(
    state: State,
    policy: &Cooldown,
    attempt: Attempt,
    ending: Ending,
    now_ms: u64,
) -> (State, Change) {
    if state.until_ms != 0 {
        // Only the probe speaks while the breaker is open: an attempt sent after the cooldown
        // ended that is not a pinned follow-up.
        let probe = state.until_ms <= now_ms && attempt.started_ms >= state.until_ms;
        if !probe || attempt.pinned {
            return (state, Change::None);
        }
        return match ending {
            Ending::Answered => (
                State {
                    since_ms: state.since_ms,
                    ..State::default()
                },
                Change::Recovered,
            ),
            Ending::Status { wait: Some(w) } if !w.is_zero() => {
                let d = w.min(policy.max_duration);
                (
                    State::cooled(now_ms, d),
                    Change::Cooled(d, Trip::RetryAfter),
                )
            }
            _ => (
                State::cooled(now_ms, policy.duration),
                Change::Cooled(policy.duration, Trip::Probe),
            ),
        };
    }
    if attempt.started_ms < state.since_ms {
        // In flight when the last cooldown began: it tells of the outage that is over.
        return (state, Change::None);
    }
    let mut next = state;
    let counting = policy.failure_rate.per_10000() > 0;
    let failed = ending != Ending::Answered;
    if counting {
        next.count(policy.window, now_ms, failed);
    }
    match ending {
        Ending::Answered => {
            next.transport_streak = 0;
            next.failure_streak = 0;
        }
        Ending::Status { wait: Some(w) } if !w.is_zero() => {
            let d = w.min(policy.max_duration);
            return (
                State::cooled(now_ms, d),
                Change::Cooled(d, Trip::RetryAfter),
            );
        }
        Ending::Status { .. } => {
            next.transport_streak = 0;
            next.failure_streak = next.failure_streak.saturating_add(1);
        }
        Ending::Transport => {
            next.transport_streak = next.transport_streak.saturating_add(1);
            next.failure_streak = next.failure_streak.saturating_add(1);
        }
    }
    if failed {
        let (attempts, failures) = next.window_counts(policy.window, now_ms);
        let trip = if counting
            && attempts >= policy.min_attempts
            && policy.failure_rate.reached(failures, attempts)
        {
            Some(Trip::FailureRate { failures, attempts })
        } else if policy.after_transport_failures > 0
            && next.transport_streak >= policy.after_transport_failures
        {
            Some(Trip::TransportStreak(next.transport_streak))
        } else if policy.after_failures > 0 && next.failure_streak >= policy.after_failures {
            Some(Trip::Streak(next.failure_streak))
        } else {
            None
        };
        if let Some(trip) = trip {
            return (
                State::cooled(now_ms, policy.duration),
                Change::Cooled(policy.duration, trip),
            );
        }
    }
    if next == state {
        (state, Change::None)
    } else {
        (next, Change::Counted)
    }
}

/// Takes the probe of a target whose cooldown ended, out until `lease_until_ms` (its attempt's
/// timeout, past which another request may probe); `None` unless one is wanted now.
pub fn claim_probe(state: State, now_ms: u64, lease_until_ms: u64) -> Option<State> {
    (state.phase(now_ms) == Phase::AwaitingProbe).then_some(State {
        probe_until_ms: lease_until_ms.max(now_ms.saturating_add(1)),
        ..state
    })
}

/// Hands back a probe that will not answer (its client left): the next request probes.
/// `None` when that probe is no longer out.
pub fn release_probe(state: State, lease_until_ms: u64) -> Option<State> {
    (state.until_ms != 0 && state.probe_until_ms == lease_until_ms).then_some(State {
        probe_until_ms: 0,
        ..state
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const T0: u64 = 1_700_000_000_000;

    fn policy() -> Cooldown {
        Cooldown {
            failure_rate: Rate::from_fraction(0.5).unwrap(),
            min_attempts: 10,
            window: 10 * S,
            after_transport_failures: 3,
            after_failures: 0,
            duration: 30 * S,
            max_duration: 60 * S,
        }
    }

    fn sent(started_ms: u64) -> Attempt {
        Attempt {
            started_ms,
            pinned: false,
        }
    }

    const FAILED: Ending = Ending::Status { wait: None };

    /// Reports `endings` one per `gap_ms`, each attempt sent when it ends; the last change.
    fn run(
        mut s: State,
        p: &Cooldown,
        endings: &[Ending],
        t: &mut u64,
        gap_ms: u64,
    ) -> (State, Change) {
        let mut last = Change::None;
        for &e in endings {
            *t += gap_ms;
            let (next, change) = after_attempt(s, p, sent(*t), e, *t);
            s = next;
            last = change;
        }
        (s, last)
    }

    fn pattern(fail_every: &[bool], n: usize) -> Vec<Ending> {
        fail_every
            .iter()
            .cycle()
            .take(n)
            .map(|&f| if f { FAILED } else { Ending::Answered })
            .collect()
    }

    #[test]
    fn a_brownout_under_the_rate_never_trips() {
        // 30% of answers fail, spread out: over 1,000 attempts at 20 per second.
        let mut t = T0;
        let endings = pattern(
            &[
                true, false, false, true, false, false, false, true, false, false,
            ],
            1000,
        );
        let mut s = State::default();
        for e in endings {
            t += 50;
            let (next, change) = after_attempt(s, &policy(), sent(t), e, t);
            assert!(
                !matches!(change, Change::Cooled(..)),
                "tripped at {t}: {next:?}"
            );
            s = next;
        }
        let (attempts, failures) = s.window_counts(10 * S, t);
        assert!((180..=200).contains(&attempts), "{attempts}");
        assert!(
            (28..=32).contains(&(failures * 100 / attempts)),
            "{failures} of {attempts}"
        );
    }

    #[test]
    fn an_outage_trips_at_min_attempts() {
        let mut t = T0;
        let mut s = State::default();
        for i in 1..=9 {
            let (next, change) = run(s, &policy(), &[FAILED], &mut t, 100);
            assert_eq!(change, Change::Counted, "attempt {i}");
            s = next;
        }
        let (s, change) = run(s, &policy(), &[FAILED], &mut t, 100);
        assert_eq!(
            change,
            Change::Cooled(
                30 * S,
                Trip::FailureRate {
                    failures: 10,
                    attempts: 10
                }
            )
        );
        assert_eq!(s.phase(t), Phase::Cooling);
        assert_eq!(s.phase(t + 29_999), Phase::Cooling);
        assert_eq!(s.phase(t + 30_000), Phase::AwaitingProbe);
        assert_eq!(s.window_counts(10 * S, t), (0, 0), "the counts start over");
    }

    #[test]
    fn the_rate_is_judged_over_the_window_only() {
        let mut t = T0;
        // 8 failures, then 11 s of quiet: they left the window.
        let (s, _) = run(State::default(), &policy(), &[FAILED; 8], &mut t, 10);
        t += 11_000;
        assert_eq!(s.window_counts(10 * S, t), (0, 0));
        let (s, change) = run(s, &policy(), &[FAILED; 9], &mut t, 10);
        assert_eq!(change, Change::Counted);
        assert_eq!(s.window_counts(10 * S, t), (9, 9));
        // Half fail: 5 of 10 reaches 50%.
        let mut t = T0;
        let endings = pattern(&[false, true], 10);
        let (_, change) = run(State::default(), &policy(), &endings, &mut t, 10);
        assert_eq!(
            change,
            Change::Cooled(
                30 * S,
                Trip::FailureRate {
                    failures: 5,
                    attempts: 10
                }
            )
        );
        // 4 of 10 does not.
        let mut t = T0;
        let endings = pattern(&[false, true, false, false, true], 10);
        let (_, change) = run(State::default(), &policy(), &endings, &mut t, 10);
        assert_eq!(change, Change::Counted);
    }

    #[test]
    fn window_buckets_are_tenths_of_the_window() {
        let p = policy();
        let mut s = State::default();
        for i in 0..20u64 {
            // One failure per second, 20 s.
            s.count(p.window, T0 + i * 1000, true);
        }
        assert_eq!(s.window_counts(p.window, T0 + 19_000), (10, 10));
        assert_eq!(s.window_counts(p.window, T0 + 19_999), (10, 10));
        assert_eq!(s.window_counts(p.window, T0 + 25_000), (4, 4));
        assert_eq!(s.window_counts(p.window, T0 + 40_000), (0, 0));
    }

    #[test]
    fn a_transport_streak_trips_without_min_attempts() {
        let mut t = T0;
        let (s, change) = run(
            State::default(),
            &policy(),
            &[Ending::Transport; 2],
            &mut t,
            1000,
        );
        assert_eq!(change, Change::Counted);
        // An answer, even a failing one, ends the streak.
        let (s, _) = run(
            s,
            &policy(),
            &[FAILED, Ending::Transport, Ending::Transport],
            &mut t,
            1000,
        );
        assert_eq!(s.transport_streak, 2);
        let (_, change) = run(s, &policy(), &[Ending::Transport], &mut t, 1000);
        assert_eq!(change, Change::Cooled(30 * S, Trip::TransportStreak(3)));
    }

    #[test]
    fn after_failures_counts_any_failure_in_a_row_when_set() {
        let p = Cooldown {
            after_failures: 3,
            ..policy()
        };
        let mut t = T0;
        let (s, _) = run(
            State::default(),
            &p,
            &[FAILED, FAILED, Ending::Answered, FAILED, FAILED],
            &mut t,
            1000,
        );
        assert_eq!(s.failure_streak, 2);
        let (_, change) = run(s, &p, &[FAILED], &mut t, 1000);
        assert_eq!(change, Change::Cooled(30 * S, Trip::Streak(3)));
        // Off by default: three 503s are only counted.
        let mut t = T0;
        let (_, change) = run(State::default(), &policy(), &[FAILED; 3], &mut t, 1000);
        assert_eq!(change, Change::Counted);
    }

    #[test]
    fn a_throttle_cools_for_exactly_its_wait_capped() {
        let wait = |w| Ending::Status { wait: Some(w) };
        let (s, change) = after_attempt(State::default(), &policy(), sent(T0), wait(2 * S), T0);
        assert_eq!(change, Change::Cooled(2 * S, Trip::RetryAfter));
        assert_eq!(s.phase(T0 + 1999), Phase::Cooling);
        assert_eq!(s.phase(T0 + 2000), Phase::AwaitingProbe);
        let (_, change) = after_attempt(State::default(), &policy(), sent(T0), wait(600 * S), T0);
        assert_eq!(change, Change::Cooled(60 * S, Trip::RetryAfter));
        let (_, change) = after_attempt(
            State::default(),
            &policy(),
            sent(T0),
            wait(Duration::ZERO),
            T0,
        );
        assert_eq!(change, Change::Counted);
    }

    fn cooling_since(t: u64, d: Duration) -> State {
        after_attempt(
            State::default(),
            &policy(),
            sent(t),
            Ending::Status { wait: Some(d) },
            t,
        )
        .0
    }

    #[test]
    fn nothing_extends_a_cooldown_in_progress() {
        let s = cooling_since(T0, 5 * S);
        let endings = [
            FAILED,
            Ending::Transport,
            Ending::Status { wait: Some(20 * S) },
            Ending::Answered,
        ];
        for started in [T0 - 3000, T0 - 1, T0, T0 + 100, T0 + 4999] {
            for pinned in [false, true] {
                for e in endings {
                    // In flight when the cooldown began, forced while it cools, or pinned.
                    let a = Attempt {
                        started_ms: started,
                        pinned,
                    };
                    for at in [T0 + 10, T0 + 4999, T0 + 5000, T0 + 6000] {
                        assert_eq!(
                            after_attempt(s, &policy(), a, e, at),
                            (s, Change::None),
                            "{a:?} {e:?} at {at}"
                        );
                    }
                }
            }
        }
        // So the target is back on time: its probe goes when the wait is over.
        assert_eq!(s.phase(T0 + 5000), Phase::AwaitingProbe);
    }

    #[test]
    fn half_open_one_probe_then_full_traffic() {
        let s = cooling_since(T0, 5 * S);
        let end = T0 + 5000;
        assert_eq!(claim_probe(s, end - 1, end + 60_000), None, "still cooling");
        let probing = claim_probe(s, end, end + 60_000).unwrap();
        assert_eq!(probing.phase(end), Phase::Probing);
        assert!(probing.phase(end).skipped());
        assert_eq!(
            claim_probe(probing, end + 10, end + 70_000),
            None,
            "one probe at a time"
        );
        // The probe's lease runs out: another request may probe.
        assert_eq!(probing.phase(end + 60_000), Phase::AwaitingProbe);
        // The probe answers: closed, counts fresh, full traffic.
        let (s, change) = after_attempt(probing, &policy(), sent(end), Ending::Answered, end + 300);
        assert_eq!(change, Change::Recovered);
        assert_eq!(s.phase(end + 300), Phase::Closed);
        assert_eq!(s.window_counts(10 * S, end + 300), (0, 0));
        // A late failure of an attempt sent before the cooldown is not counted afterwards.
        assert_eq!(
            after_attempt(s, &policy(), sent(T0 - 1), FAILED, end + 400),
            (s, Change::None)
        );
        // One sent during the cooldown is.
        assert_eq!(
            after_attempt(s, &policy(), sent(T0 + 1), FAILED, end + 400).1,
            Change::Counted
        );
    }

    #[test]
    fn a_failed_probe_cools_again() {
        let s = cooling_since(T0, 5 * S);
        let end = T0 + 5000;
        let probing = claim_probe(s, end, end + 60_000).unwrap();
        let (again, change) =
            after_attempt(probing, &policy(), sent(end), Ending::Transport, end + 200);
        assert_eq!(change, Change::Cooled(30 * S, Trip::Probe));
        assert_eq!(again.phase(end + 200), Phase::Cooling);
        assert_eq!(again.phase(end + 30_200), Phase::AwaitingProbe);
        let (again, change) = after_attempt(
            probing,
            &policy(),
            sent(end),
            Ending::Status { wait: Some(3 * S) },
            end + 200,
        );
        assert_eq!(change, Change::Cooled(3 * S, Trip::RetryAfter));
        assert_eq!(again.phase(end + 3200), Phase::AwaitingProbe);
        // A pinned follow-up sent after the end is no probe: it neither re-cools nor closes.
        let pinned = Attempt {
            started_ms: end,
            pinned: true,
        };
        for e in [FAILED, Ending::Answered] {
            assert_eq!(
                after_attempt(probing, &policy(), pinned, e, end + 200),
                (probing, Change::None)
            );
        }
    }

    #[test]
    fn a_probe_whose_client_left_is_handed_back() {
        let s = cooling_since(T0, 5 * S);
        let end = T0 + 5000;
        let probing = claim_probe(s, end, end + 60_000).unwrap();
        let back = release_probe(probing, end + 60_000).unwrap();
        assert_eq!(back.phase(end + 1), Phase::AwaitingProbe);
        assert_eq!(
            release_probe(probing, end + 1),
            None,
            "another request's probe"
        );
        let (closed, _) = after_attempt(probing, &policy(), sent(end), Ending::Answered, end + 1);
        assert_eq!(release_probe(closed, end + 60_000), None);
    }

    #[test]
    fn successes_write_only_when_something_changes() {
        let off = Cooldown {
            failure_rate: Rate::from_fraction(0.0).unwrap(),
            ..policy()
        };
        assert_eq!(
            after_attempt(State::default(), &off, sent(T0), Ending::Answered, T0).1,
            Change::None
        );
        assert_eq!(
            after_attempt(State::default(), &policy(), sent(T0), Ending::Answered, T0).1,
            Change::Counted
        );
        let (s, _) = after_attempt(State::default(), &off, sent(T0), Ending::Transport, T0);
        assert_eq!(
            after_attempt(s, &off, sent(T0), Ending::Answered, T0).1,
            Change::Counted
        );
    }

    #[test]
    fn rates_compare_exactly() {
        let half = Rate::from_fraction(0.5).unwrap();
        assert!(half.reached(5, 10) && !half.reached(4, 10) && !half.reached(0, 0));
        assert!(!Rate::from_fraction(0.0).unwrap().reached(10, 10));
        assert!(Rate::from_fraction(1.0).unwrap().reached(3, 3));
        assert!(!Rate::from_fraction(1.0).unwrap().reached(2, 3));
        assert_eq!(Rate::from_fraction(1.5), None);
        assert_eq!(Rate::from_fraction(-0.1), None);
        assert_eq!(Rate::from_fraction(f64::NAN), None);
    }

    #[test]
    fn encoding_round_trips_and_garbage_reads_as_closed() {
        let mut s = cooling_since(T0, 5 * S);
        s.probe_until_ms = 7;
        s.transport_streak = 2;
        s.failure_streak = 9;
        s.count(10 * S, T0, true);
        assert_eq!(State::decode(&s.encode()), s);
        assert_eq!(State::decode(b""), State::default());
        assert_eq!(
            State::decode(&[1u8; 12]),
            State::default(),
            "the earlier format"
        );
        assert_eq!(State::decode(&[1u8; ENCODED + 1]), State::default());
    }
}
