//! The parsed config and what is derived from it once, shared by every request of a worker
//! (and by the upstream filter's attempts, through `root::runtime_of`).

use std::cell::{Cell, RefCell};

use super::limits::LimitScopes;
use super::metrics::Metrics;
use crate::config::{Config, Credential};
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
