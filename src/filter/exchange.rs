//! One request, as the glue carries it from its headers to its last log line: what is known of
//! it and where it is (`Phase`). Each phase has a room of its own, which adds to `Exchange`:
//! `intake` (request headers), `request_body` (the body, the cache and the plan), `routed` (the
//! first attempt, through Envoy's route), `failover` (the next step after a failed attempt),
//! `callout` (retries and failovers as callouts), `timers` (waiting out a Retry-After),
//! `delivery` (what the client gets), `health` (cooldowns), `affinity` (who owns a Responses
//! API id) and `limits` (the limits of gateway keys and routes).
//!
//! What a request holds in one phase only lives in that phase's variant (the chain of targets
//! from the first attempt to the answer, what is read from an answer passing through). Each
//! entry point gets the callback's `host::Now` and returns what the caller must do next: an
//! `Action` on the request's side, a `Turn` (the flow, a retry's wait, a dispatched callout)
//! once an attempt is out.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::types::Action;

use super::health::{Attempting, Scope};
use super::host::{self, Headers};
use super::runtime::{Runtime, Streamed};
use crate::answer::cache::Digest;
use crate::answer::reply::{ErrorShape, Rejection};
use crate::answer::usage::UsageScanner;
use crate::config::{CacheSettings, Config, Step, Target};
use crate::policy::chain::{Chain, FailureKind};
use crate::policy::judge::Source;
use crate::policy::plan;
use crate::request::azure::AzureShaped;
use crate::request::body::Body;
use crate::request::intake::{Access, Kind};
use crate::target::forward::ClientHeaders;

/// What one turn of an exchange (a host callback, or a retry's wait ending) leaves to its
/// caller, as one value: what becomes of the routed stream, a retry to wake up for, and a
/// callout whose answer must find its way back to this request.
#[must_use = "a turn's flow, wait and callout must each be followed"]
pub struct Turn {
    pub flow: Flow,
    /// Call `fire_retry` at this Unix ms.
    pub wait: Option<u64>,
    /// The token of a callout dispatched in this turn. Its answer comes to the context that
    /// dispatched it: the request's own, or the root's when a retry's wait ended in its tick.
    pub callout: Option<u32>,
}

impl From<Flow> for Turn {
    fn from(flow: Flow) -> Turn {
        Turn {
            flow,
            wait: None,
            callout: None,
        }
    }
}

/// What happens to the routed stream (the request or its response) after a decision.
pub enum Flow {
    /// Let it through.
    Resume,
    /// Keep holding it (a callout or timer will answer).
    Hold,
    /// The filter answered; the routed response is replaced.
    Replied,
}

impl Flow {
    pub fn action(self) -> Action {
        match self {
            Flow::Resume => Action::Continue,
            Flow::Hold | Flow::Replied => Action::Pause,
        }
    }
}

/// Where a request is, with what it holds there: the chain of targets exists from the first
/// attempt until a target's answer (or the filter's) is the client's.
pub(super) enum Phase {
    /// Request headers not seen yet.
    Start,
    /// An operation's headers are held until its body is complete.
    ReadingBody,
    /// A path the filter does not rewrite: routed once to `target` (none: no target allowed),
    /// no failover.
    Passthrough { target: Option<usize> },
    /// The first attempt is in flight through Envoy's route.
    Routed { chain: Chain },
    /// A target's answer, not a failure, is passing through to the client.
    Streaming(Passing),
    /// A streamed request is in Envoy's router, which retries it over its plan's targets; its
    /// attempts keep their record in `shared`.
    StreamRouted { chain: Chain, shared: Rc<Streamed> },
    /// The router gave up on a streamed request with a reply of its own (no target answered);
    /// its body is held until the filter's error replaces it.
    StreamSpent {
        /// The target of the last attempt.
        served: Option<usize>,
        failure: FailureKind,
        budget_spent: bool,
        attempts: u32,
        failed_over: bool,
    },
    /// The routed attempt answered with a failure candidate; its body is being collected.
    HoldingRouted {
        chain: Chain,
        status: Option<u16>,
        source: Source,
        retry_after: Option<Duration>,
    },
    /// A callout is in flight; the routed response (if any) is held.
    Callout { chain: Chain, token: u32 },
    /// Waiting for a Retry-After before the next attempt.
    Waiting {
        chain: Chain,
        target: usize,
        timeout: Duration,
    },
    /// The routed answer was judged and let through as it is: nothing left to watch.
    Delivered,
    /// The filter answered the client itself.
    Replied,
}

/// A target's answer passing through: what is read from it on the way.
pub(super) struct Passing {
    /// The target that answered.
    pub target: Option<usize>,
    /// Token usage, counted as the answer passes (a success that can carry it).
    pub usage: Option<UsageScanner>,
    /// The answer's copy for the cache (a 200 of a cacheable request, up to the cache's limit).
    pub cache_body: Option<Vec<u8>>,
    /// The beginning of a Responses API answer, read until its response id is found.
    pub response_head: Option<Vec<u8>>,
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

/// Where a chain stands when the client gets its answer: the outcome headers and filter state.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tally {
    pub attempts: u32,
    pub failed_over: bool,
    /// The request's deadline ran out (a transport failure is then `deadline_exceeded`).
    pub budget_spent: bool,
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
    /// Looking for the owner of a stored response the request names.
    pub(super) owner_probe: Option<OwnerProbe>,
    /// The cache key a success is stored under (a cacheable request the cache missed).
    pub(super) cache_key: Option<Digest>,
    /// The filter state last written (target, attempts, failed over): only changes are written.
    pub(super) recorded: Option<(String, u32, bool)>,
    /// Its attempts as the targets' health sees them (the probe it took, a pinned request).
    pub(super) attempting: Attempting,
    /// The `x-ratelimit-*` headers of the limits this request was admitted under (none: it is
    /// under no limit, and the provider's own pass through).
    pub(super) limit_headers: Vec<(&'static str, String)>,
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // A streamed request's attempts hold what they share with it; nothing else needs it.
        self.rt.forget_streamed(self.context_id);
    }
}

impl Exchange {
    pub fn new(rt: Rc<Runtime>, context_id: u32) -> Exchange {
        Exchange {
            rt,
            context_id,
            phase: Phase::Start,
            request: Request::default(),
            body: None,
            owner_probe: None,
            cache_key: None,
            recorded: None,
            attempting: Attempting::default(),
            limit_headers: Vec::new(),
        }
    }

    /// The phase, moved out to be moved on: every caller sets the next one (until then the
    /// request reads as answered, so nothing else acts on it).
    pub(super) fn take_phase(&mut self) -> Phase {
        std::mem::replace(&mut self.phase, Phase::Replied)
    }

    pub(super) fn config(&self) -> &Config {
        &self.rt.config
    }

    /// What this request shares with its streamed attempts: the runtime and who it is.
    pub(super) fn scope(&self) -> Scope<'_> {
        Scope {
            rt: &self.rt,
            context_id: self.context_id,
            request_id: &self.request.id,
            route: self.request.route,
        }
    }

    /// The targets this request may use, in chain order.
    pub(super) fn targets(&self) -> &[usize] {
        match self.request.access {
            Some(access) => access.targets(&self.rt.config),
            None => &self.rt.config.chain,
        }
    }

    pub(super) fn target(&self, i: usize) -> Option<&Target> {
        self.scope().target(i)
    }

    pub(super) fn target_name(&self, i: usize) -> &str {
        self.scope().target_name(i)
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
        self.scope().step(target)
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
        self.scope().route_name()
    }

    /// The operation, for a request that is one.
    pub(super) fn operation(&self) -> Option<crate::request::operation::Operation> {
        self.request.kind.as_ref().and_then(Kind::operation)
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
        self.scope().tag()
    }
}
