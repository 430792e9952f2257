//! Responses API affinity as a request meets it: which target owns a response id it names
//! (before its first attempt), the probe for that owner when it is not known here (a target's
//! "not found" sends the request on), and the owner of a response id it creates or finds.

use super::exchange::{Answer, Exchange, OwnerProbe};
use super::shared;
use crate::answer::affinity::{self, Naming, Owner};
use crate::duration::millis;
use crate::policy::chain::{FailureKind, Outcome};
use crate::request::intake::Kind;
use crate::request::operation::Operation;

impl Exchange {
    /// The target that created response `id`, if it is known and this request may use it.
    pub(super) fn owner_of(&self, id: &str, now: u64) -> Option<usize> {
        let name = shared::affinity_get(&self.config().responses, id, now)?;
        let i = self.config().target_index(&name)?;
        self.targets().contains(&i).then_some(i)
    }

    /// Whether this request's successful answer carries a new response id to remember.
    pub(super) fn creates_response(&self) -> bool {
        matches!(
            self.request.kind,
            Some(Kind::Operation(Operation::Responses))
        )
    }

    /// Starts looking for the owner of response `id` down the chain.
    pub(super) fn start_probe(&mut self, id: &str, naming: Naming) {
        log::info!(
            "{} owner of {} not known here: probing the chain",
            self.tag(),
            crate::quote(id)
        );
        self.owner_probe = Some(OwnerProbe {
            id: id.to_string(),
            naming,
            routed_headers: None,
            failure: None,
        });
    }

    /// Whether a routed answer of this status must be held: it may be a probe's "not found".
    pub(super) fn probe_holds(&self, status: Option<u16>) -> bool {
        self.owner_probe
            .as_ref()
            .is_some_and(|p| affinity::may_be_not_here(p.naming, status))
    }

    /// A probe's judgement of an answer: `Elsewhere` when the target does not hold the id.
    pub(super) fn probe_outcome(&self, answer: &Answer) -> Option<Outcome> {
        let probe = self.owner_probe.as_ref()?;
        affinity::not_here(probe.naming, answer.status, &answer.body).then_some(Outcome::Elsewhere)
    }

    /// Counts a probe's attempt on `target` and, when it answered 2xx, remembers it as the
    /// owner of the id: later requests for it go there at once.
    pub(super) fn probe_answered(
        &self,
        target: usize,
        status: Option<u16>,
        outcome: &Outcome,
        now: u64,
    ) {
        let Some(probe) = &self.owner_probe else {
            return;
        };
        let result = match outcome {
            Outcome::Elsewhere => "not_found",
            Outcome::Failed(_) => "failed",
            Outcome::Delivered if (200..300).contains(&status.unwrap_or(0)) => "found",
            Outcome::Delivered => "answered",
        };
        self.rt.metrics.affinity_probe(target, result);
        if result != "found" {
            return;
        }
        log::info!(
            "{} found {} on target={}",
            self.tag(),
            crate::quote(&probe.id),
            self.target_name(target)
        );
        self.remember(&probe.id, target, now);
    }

    /// Keeps a probe's failed answer (a target that may hold the id but failed), so that a
    /// later target's "not found" does not become the client's answer. The routed answer is
    /// kept with the headers it was held with.
    pub(super) fn keep_probe_failure(
        &mut self,
        target: usize,
        mut answer: Answer,
        kind: Option<FailureKind>,
    ) {
        let Some(probe) = &mut self.owner_probe else {
            return;
        };
        if answer.headers.is_none() {
            answer.headers = probe.routed_headers.take();
            if answer.headers.is_none() && answer.status.is_some() {
                return;
            }
        }
        probe.failure = Some((target, answer, kind));
    }

    /// The failure a probe keeps for the client, when its last target said "not found".
    pub(super) fn take_probe_failure(&mut self) -> Option<(usize, Answer, Option<FailureKind>)> {
        self.owner_probe.as_mut()?.failure.take()
    }

    /// Reads the response id from the beginning of the answer of target `target` and remembers
    /// its owner. `head` grows chunk by chunk until the id is found or `affinity::HEAD` is read;
    /// true once it is settled (found, or not to be found).
    pub(super) fn remember_response(&self, target: usize, head: &[u8], now: u64) -> bool {
        let Some(id) = affinity::response_id(head) else {
            return head.len() >= affinity::HEAD;
        };
        log::debug!(
            "{} response {id} belongs to target={}",
            self.tag(),
            self.target_name(target)
        );
        self.remember(&id, target, now);
        true
    }

    fn remember(&self, id: &str, target: usize, now: u64) {
        let settings = &self.config().responses;
        let owner = Owner {
            id: id.to_string(),
            target: self.target_name(target).to_string(),
            expires_ms: now.saturating_add(millis(settings.affinity_ttl)),
        };
        shared::affinity_put(settings, &owner, now);
    }
}
