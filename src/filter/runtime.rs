//! The parsed config and what is derived from it once, shared by every request of a worker
//! (and by the upstream filter's attempts, through `root::runtime_of`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use super::limits::LimitScopes;
use super::metrics::Metrics;
use crate::config::{Config, Credential};
use crate::streamed::{Handoff, Record};
use crate::target::provider;
use crate::target::token::{self, Token};

/// The parsed config and what is derived from it once.
pub struct Runtime {
    /// The root context that parsed the config (streamed attempts name it in their handoff).
    pub root: u32,
    pub config: Config,
    pub metrics: Metrics,
    /// The `limits` of keys and routes, with their shared buckets.
    pub limits: LimitScopes,
    /// Credential header of each target, built once.
    pub credentials: Vec<(&'static str, String)>,
    /// The shared-data key of each `azure_ad` target's token, built once.
    pub token_keys: Vec<Option<String>>,
    /// Load balancing's random source (one per VM, so per worker).
    pub rng: RefCell<fastrand::Rng>,
    /// This worker's copy of each `azure_ad` target's current token (kept by the root's tick).
    tokens: RefCell<Vec<Option<Token>>>,
    /// Whether the missing streamed-failover wiring was logged (once per worker).
    pub stream_warned: Cell<bool>,
    /// When (Unix ms) Envoy last showed this worker that the route lacks the streamed wiring.
    pub unwired_at: Cell<Option<u64>>,
    /// The streamed requests in the router, by the filter's context: what their attempts (the
    /// upstream filter, in the same VM) share with them. Removed when the request ends.
    pub streamed: RefCell<HashMap<u32, Rc<Streamed>>>,
}

/// What a streamed request and its attempts share: the filter's handoff, and the record of the
/// attempts so far (the last attempt's number, target and ending).
pub struct Streamed {
    pub handoff: Handoff,
    pub record: Cell<Option<Record>>,
}

impl Runtime {
    pub fn new(config: Config, root: u32) -> Runtime {
        let metrics = Metrics::define(&config);
        let limits = LimitScopes::new(&config);
        let credentials = config
            .targets
            .iter()
            .map(provider::credential_header)
            .collect();
        let token_keys = config
            .targets
            .iter()
            .map(|t| match &t.credential {
                Credential::Entra(source) => Some(token::state_key(&t.name, source)),
                _ => None,
            })
            .collect();
        Runtime {
            root,
            config,
            metrics,
            limits,
            credentials,
            token_keys,
            rng: RefCell::new(fastrand::Rng::new()),
            tokens: RefCell::new(Vec::new()),
            stream_warned: Cell::new(false),
            unwired_at: Cell::new(None),
            streamed: RefCell::new(HashMap::new()),
        }
    }

    /// Shares a streamed request's handoff with its attempts; `None` if the table is in use (not
    /// expected: it is never held across a host call).
    pub fn share_streamed(&self, handoff: Handoff) -> Option<Rc<Streamed>> {
        let ctx = handoff.ctx;
        let shared = Rc::new(Streamed {
            handoff,
            record: Cell::new(None),
        });
        let mut table = self.streamed.try_borrow_mut().ok()?;
        table.insert(ctx, Rc::clone(&shared));
        Some(shared)
    }

    /// The streamed request of the filter's context `ctx`, for one of its attempts.
    pub fn streamed_of(&self, ctx: u32) -> Option<Rc<Streamed>> {
        self.streamed.try_borrow().ok()?.get(&ctx).cloned()
    }

    /// The request of context `ctx` ended: its attempts keep what they hold.
    pub fn forget_streamed(&self, ctx: u32) {
        // Every request ends here: most never streamed, and find nothing to hash for.
        if let Ok(mut table) = self.streamed.try_borrow_mut() {
            if !table.is_empty() {
                table.remove(&ctx);
            }
        }
    }

    pub fn set_token(&self, target: usize, token: Option<Token>) {
        if let Ok(mut tokens) = self.tokens.try_borrow_mut() {
            if tokens.len() <= target {
                tokens.resize(target + 1, None);
            }
            if let Some(slot) = tokens.get_mut(target) {
                *slot = token;
            }
        }
    }

    /// The credential header of target `i` now: its key, or its current Entra ID token
    /// (`None`: an `azure_ad` target without a valid token).
    pub fn credential(&self, i: usize, now: u64) -> Option<(&'static str, String)> {
        let target = self.config.targets.get(i)?;
        if !matches!(target.credential, Credential::Entra(_)) {
            return self.credentials.get(i).cloned();
        }
        let copy = self
            .tokens
            .try_borrow()
            .ok()
            .and_then(|tokens| tokens.get(i).cloned().flatten())
            .filter(|t| t.usable(now));
        // This worker's copy is refreshed every tick; a newer token another worker fetched
        // since is read from shared data at once.
        let token = match copy {
            Some(token) => token,
            None => {
                let key = self.token_keys.get(i)?.as_deref()?;
                let fresh = super::shared::token_state(key).0.valid(now).cloned()?;
                self.set_token(i, Some(fresh.clone()));
                fresh
            }
        };
        Some(("authorization", provider::bearer(&token.value)))
    }
}
