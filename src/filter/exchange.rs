//! One request, as the glue carries it from its headers to its last log line: what is known of
//! it and where it is (`Phase`). Each phase has a room of its own, which adds to `Exchange`:
//! `intake` (request headers), `request_body` (the body, the cache and the plan), `routed` (the
//! first attempt, through Envoy's route), `failover` (the next step after a failed attempt),
//! `callout` (retries and failovers as callouts), `timers` (waiting out a Retry-After),
//! `delivery` (what the client gets), `health` (cooldowns), `affinity` (who owns a Responses
//! API id) and `limits` (the limits of gateway keys and routes).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::types::Action;

use super::host::{self, Headers};
use super::limits::LimitScopes;
use super::metrics::Metrics;
use crate::answer::cache::Digest;
use crate::answer::reply::{ErrorShape, Rejection};
use crate::answer::usage::UsageScanner;
use crate::config::{CacheSettings, Config, Credential, Step, Target};
use crate::policy::chain::{Chain, FailureKind};
use crate::policy::judge::Source;
use crate::policy::plan;
use crate::request::azure::AzureShaped;
use crate::request::body::Body;
use crate::request::intake::{Access, Kind};
use crate::target::forward::ClientHeaders;
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

/// What the caller must do after an exchange step beyond the returned action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Call `fire_retry` at this Unix ms.
    Wait(u64),
}

/// What happens to the routed response after a decision.
pub(super) enum Flow {
    /// Let it through.
    Resume,
    /// Keep holding it (a callout or timer will answer).
    Hold,
    /// The filter answered; the routed response is replaced.
    Replied,
}

impl Flow {
    pub(super) fn action(self) -> Action {
        match self {
            Flow::Resume => Action::Continue,
            Flow::Hold | Flow::Replied => Action::Pause,
        }
    }
}

pub(super) enum Phase {
    /// Request headers not seen yet.
    Start,
    /// An operation's headers are held until its body is complete.
    ReadingBody,
    /// A path the filter does not rewrite: routed to the first target, no failover.
    Passthrough,
    /// The first attempt is in flight through Envoy's route.
    Routed,
    /// The routed attempt answered and its response is passing through.
    Streaming,
    /// A streamed request is in Envoy's router, which retries it over its plan's targets.
    StreamRouted,
    /// The router gave up on a streamed request with a reply of its own (no target answered);
    /// its body is held until the filter's error replaces it.
    StreamSpent {
        failure: FailureKind,
        budget_spent: bool,
        attempts: u32,
        failed_over: bool,
    },
    /// The routed attempt answered with a failure candidate; its body is being collected.
    HoldingRouted {
        status: Option<u16>,
        source: Source,
        retry_after: Option<Duration>,
    },
    /// A callout is in flight; the routed response (if any) is held.
    Callout { token: u32 },
    /// Waiting for a Retry-After before the next attempt.
    Waiting { target: usize, timeout: Duration },
    /// The filter answered the client itself.
    Replied,
}

/// An attempt's answer, as needed to judge and deliver it.
pub(super) struct Answer {
    pub status: Option<u16>,
    /// The target's answer, or Envoy's own reply.
    pub source: Source,
    /// A callout answer's (the routed answer's stays in Envoy).
    pub content_type: Option<Vec<u8>>,
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
    /// Callout answers carry their headers; the routed answer is still in Envoy.
    pub headers: Option<Headers>,
}

/// A request naming a stored response whose owner is not known here, looking for it down the
/// chain.
pub(super) struct OwnerProbe {
    pub id: String,
    pub naming: crate::answer::affinity::Naming,
    /// The routed answer's headers, while it is held (a failure kept for the client needs them).
    pub routed_headers: Option<Headers>,
    /// The last failure on the way (target, answer, transport failure): a target that may hold
    /// the id but failed. The client gets it rather than a later target's "not found".
    pub failure: Option<(usize, Answer, Option<FailureKind>)>,
}

/// What the headers said, kept for the phases after them.
#[derive(Default)]
pub(super) struct Request {
    pub id: String,
    pub kind: Option<Kind>,
    /// The path the providers address: the client's, or on a route its operation's OpenAI
    /// path (with the client's query string).
    pub client_path: String,
    /// The `:path` as the client sent it.
    pub sent_path: String,
    /// Client headers every callout carries.
    pub forwarded: Vec<(String, String)>,
    pub client_has: ClientHeaders,
    pub access: Option<Access>,
    /// The named route the request is on (index into `Config::routes`).
    pub route: Option<usize>,
    pub no_cache: bool,
    /// An Azure-shaped request: its deployment becomes the model of its OpenAI-shaped twin.
    pub azure: Option<AzureShaped>,
    /// The shape of the filter's own errors: the client's API's.
    pub shape: ErrorShape,
}

pub struct Exchange {
    pub(super) rt: Rc<Runtime>,
    pub(super) context_id: u32,
    pub(super) phase: Phase,
    pub(super) request: Request,
    /// The request body, read once; kept while a further attempt may need it.
    pub(super) body: Option<Body>,
    pub(super) chain: Option<Chain>,
    /// The target whose answer the client gets when it is not the chain's current one: on the
    /// streamed path (the router chose it), or a probe's kept failure.
    pub(super) served: Option<usize>,
    /// Looking for the owner of a stored response the request names.
    pub(super) owner_probe: Option<OwnerProbe>,
    pub(super) attempt_started_ms: u64,
    pub(super) cache_key: Option<Digest>,
    pub(super) cache_body: Option<Vec<u8>>,
    pub(super) usage: Option<UsageScanner>,
    /// The beginning of a Responses API answer, read until its response id is found.
    pub(super) response_head: Option<Vec<u8>>,
    pub(super) dispatched: Option<u32>,
    /// The filter state last written (target, attempts, failed over): only changes are written.
    pub(super) recorded: Option<(String, u32, bool)>,
    /// A Responses follow-up pinned to the owner of its previous response: it goes there
    /// whatever the owner's state, so it never probes nor moves a cooldown.
    pub(super) pinned: bool,
    /// Targets (bit i: target i) this request saw with their cooldown over and no probe out:
    /// an attempt there tries to take the probe.
    pub(super) awaiting_probe: Cell<u64>,
    /// The probe this request took and has not reported yet: target and lease end.
    pub(super) probe: Cell<Option<(usize, u64)>>,
    /// The time, read once per host callback (0: not read yet in this one).
    pub(super) clock: Cell<u64>,
    /// The `x-ratelimit-*` headers of the limits this request was admitted under (none: it is
    /// under no limit, and the provider's own pass through).
    pub(super) limit_headers: Vec<(&'static str, String)>,
}

impl Exchange {
    pub fn new(rt: Rc<Runtime>, context_id: u32) -> Exchange {
        Exchange {
            rt,
            context_id,
            phase: Phase::Start,
            request: Request::default(),
            body: None,
            chain: None,
            served: None,
            owner_probe: None,
            attempt_started_ms: 0,
            cache_key: None,
            cache_body: None,
            usage: None,
            response_head: None,
            dispatched: None,
            recorded: None,
            pinned: false,
            awaiting_probe: Cell::new(0),
            probe: Cell::new(None),
            clock: Cell::new(0),
            limit_headers: Vec::new(),
        }
    }

    /// A new host callback: decisions taken in it share one reading of the clock.
    pub(super) fn callback(&self) {
        self.clock.set(0);
    }

    /// Unix ms, read from the host once per callback.
    pub(super) fn now(&self) -> u64 {
        if self.clock.get() == 0 {
            self.clock.set(host::now_ms());
        }
        self.clock.get()
    }

    pub(super) fn config(&self) -> &Config {
        &self.rt.config
    }

    /// The token of a callout dispatched during the last call, if any.
    pub fn take_dispatched(&mut self) -> Option<u32> {
        self.dispatched.take()
    }

    /// The targets this request may use, in chain order.
    pub(super) fn targets(&self) -> &[usize] {
        match self.request.access {
            Some(access) => access.targets(&self.rt.config),
            None => &self.rt.config.chain,
        }
    }

    pub(super) fn target(&self, i: usize) -> Option<&Target> {
        self.config().targets.get(i)
    }

    pub(super) fn target_name(&self, i: usize) -> &str {
        self.target(i).map_or("?", |t| t.name.as_str())
    }

    /// The client's model, if the body said one.
    pub(super) fn model(&self) -> Option<&str> {
        self.body.as_ref().and_then(|b| b.model.as_deref())
    }

    /// The steps of this request's chain: its route's or every target's, without the targets
    /// its gateway key may not use.
    pub(super) fn steps(&self) -> Vec<&Step> {
        plan::steps(&self.rt.config, self.request.route, self.targets())
    }

    /// Target `target` as a step of this request's chain.
    pub(super) fn step(&self, target: usize) -> Option<&Step> {
        let config = &self.rt.config;
        match self.request.route.and_then(|r| config.routes.get(r)) {
            Some(route) => route.steps.iter().find(|s| s.target == target),
            None => config.steps.get(target),
        }
    }

    /// The model target `target` is asked for: its step's, else the client's.
    pub(super) fn model_for(&self, target: usize) -> Option<&str> {
        self.step(target)
            .and_then(|s| s.model.as_deref())
            .or(self.model())
    }

    /// The cache this request's scope has (its route's, or the top-level one off routes).
    pub(super) fn cache_settings(&self) -> Option<&CacheSettings> {
        let config = &self.rt.config;
        match self.request.route {
            Some(r) => config.routes.get(r)?.cache.as_ref(),
            None => config.cache.as_ref(),
        }
    }

    pub(super) fn route_name(&self) -> Option<&str> {
        let route = self.rt.config.routes.get(self.request.route?)?;
        Some(&route.name)
    }

    /// The operation, for a request that is one.
    pub(super) fn operation(&self) -> Option<crate::request::operation::Operation> {
        self.request.kind.as_ref().and_then(Kind::operation)
    }

    /// The target of the attempt in flight (or the last one).
    pub(super) fn current_target(&self) -> Option<usize> {
        self.served
            .or_else(|| self.chain.as_ref().and_then(Chain::current_target))
    }

    /// Answers the client with one of the filter's own errors.
    pub(super) fn reject(&mut self, rejection: &Rejection) -> Action {
        self.rt.metrics.rejected(rejection.reason());
        let reply = rejection.reply(self.request.shape);
        self.phase = Phase::Replied;
        host::send_reply(
            reply.status,
            &[("content-type", "application/json")],
            &reply.body,
        );
        Action::Pause
    }

    /// How every log line of this request starts.
    pub(super) fn tag(&self) -> String {
        let mut tag = format!("[ctx={}", self.context_id);
        if !self.request.id.is_empty() {
            tag.push_str(" req=");
            tag.push_str(&self.request.id);
        }
        if let Some(route) = self.route_name() {
            tag.push_str(" route=");
            tag.push_str(route);
        }
        tag.push(']');
        tag
    }
}
