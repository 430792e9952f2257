//! Waiting out a Retry-After: a request whose retry must wait is parked here with its due time,
//! and the root's tick fires it (`Exchange::fire_retry` sends the retry as a callout).

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::Duration;

use super::exchange::{Exchange, Flow, Phase, Turn};
use super::host::{self, Now};

/// The root's tick while a retry waits (it fires within a tick of its due time) and, with Entra
/// ID targets, always (their tokens are fetched and shared from the tick).
pub const FAST_TICK: Duration = Duration::from_millis(25);
/// The tick otherwise (the sweeps): each tick costs Envoy about 150 us of CPU per VM, so a
/// 25 ms tick kept an idle Envoy with one worker 12 ms a second busy (docs/performance.md).
pub const SLOW_TICK: Duration = Duration::from_secs(1);

/// Requests waiting for their retry: (due Unix ms, context id, the request); and the period the
/// root's tick runs at.
#[derive(Default)]
pub struct Timers {
    due: Vec<(u64, u32, Weak<RefCell<Exchange>>)>,
    fast: bool,
    always_fast: bool,
}

impl Timers {
    /// Starts the root's tick (from its configure): fast for good when `always_fast`.
    pub fn start(&mut self, always_fast: bool) {
        self.always_fast = always_fast;
        self.fast = always_fast || !self.due.is_empty();
        host::set_tick_period(if self.fast { FAST_TICK } else { SLOW_TICK });
    }

    /// Parks a request until `due_ms`; the tick speeds up for it (a host call from a request's
    /// context sets its root's tick).
    pub fn schedule(&mut self, due_ms: u64, context_id: u32, exchange: Weak<RefCell<Exchange>>) {
        self.due.push((due_ms, context_id, exchange));
        if !self.fast {
            self.fast = true;
            host::set_tick_period(FAST_TICK);
        }
    }

    /// After a tick: slows the tick down again when nothing waits.
    pub fn settle(&mut self) {
        if self.fast && !self.always_fast && self.due.is_empty() {
            self.fast = false;
            host::set_tick_period(SLOW_TICK);
        }
    }

    /// Takes the requests due at `now`, leaving the others; requests gone meanwhile are dropped.
    pub fn take_due(&mut self, now: u64) -> Vec<(u32, Rc<RefCell<Exchange>>)> {
        let mut ready = Vec::new();
        self.due.retain(|(at, context_id, weak)| {
            if weak.strong_count() == 0 {
                return false;
            }
            if *at > now {
                return true;
            }
            if let Some(exchange) = weak.upgrade() {
                ready.push((*context_id, exchange));
            }
            false
        });
        ready
    }
}

impl Exchange {
    /// The Retry-After wait is over: send the retry.
    pub fn fire_retry(&mut self, now: &Now) -> Turn {
        match self.take_phase() {
            Phase::Waiting {
                chain,
                target,
                timeout,
            } => self.attempt(chain, target, timeout, now.ms()),
            phase => {
                self.phase = phase;
                Turn::from(Flow::Hold)
            }
        }
    }
}
