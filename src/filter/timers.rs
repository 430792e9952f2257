//! Waiting out a Retry-After: a request whose retry must wait is parked here with its due time,
//! and the root's tick fires it (`Exchange::fire_retry` sends the retry as a callout).

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use super::exchange::{Exchange, Flow, Phase, Turn};
use super::host::Now;

/// Requests waiting for their retry: (due Unix ms, context id, the request).
#[derive(Default)]
pub struct Timers {
    due: Vec<(u64, u32, Weak<RefCell<Exchange>>)>,
}

impl Timers {
    pub fn schedule(&mut self, due_ms: u64, context_id: u32, exchange: Weak<RefCell<Exchange>>) {
        self.due.push((due_ms, context_id, exchange));
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
