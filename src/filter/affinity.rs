//! Responses API affinity as a request meets it: which target owns a response id it names
//! (before its first attempt), and the owner of a response id it creates (when it succeeds).

use super::exchange::Exchange;
use super::shared;
use crate::answer::affinity::{self, Owner};
use crate::duration::millis;
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

    /// Reads the response id from the beginning of the answer of target `target` and remembers
    /// its owner. `head` grows chunk by chunk until the id is found or `affinity::HEAD` is read;
    /// true once it is settled (found, or not to be found).
    pub(super) fn remember_response(&self, target: usize, head: &[u8], now: u64) -> bool {
        let Some(id) = affinity::response_id(head) else {
            return head.len() >= affinity::HEAD;
        };
        let settings = &self.config().responses;
        let owner = Owner {
            id,
            target: self.target_name(target).to_string(),
            expires_ms: now.saturating_add(millis(settings.affinity_ttl)),
        };
        log::debug!(
            "{} response {} belongs to target={}",
            self.tag(),
            owner.id,
            owner.target
        );
        shared::affinity_put(settings, &owner);
        true
    }
}
