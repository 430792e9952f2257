//! One request's journey through the chain, as the host sees it: the routed first attempt, then
//! callouts for retries and failovers. Decisions come from `chain`, `judge`, `rewrite`; this file
//! reads and writes headers and bodies, dispatches callouts and answers the client.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::types::{Action, BufferType, MapType};

use super::host::{self, Headers};
use super::metrics::{status_class, Metrics};
use super::shared;
use crate::auth;
use crate::body::Body;
use crate::cache::{self, Digest, Entry};
use crate::chain::{Chain, FailureKind, GiveUpReason, Hop, NoRetry, Outcome, Step};
use crate::config::{Config, Target};
use crate::cooldown;
use crate::judge;
use crate::provider::{self, CLIENT_CREDENTIAL_HEADERS};
use crate::quote;
use crate::reply::Rejection;
use crate::retry_after;
use crate::rewrite::{self, Operation};
use crate::usage::{self, UsageScanner};

pub const CLUSTER_HEADER: &str = "x-llm-failover-cluster";
const TARGET_HEADER: &str = "x-llm-failover-target";
const ATTEMPTS_HEADER: &str = "x-llm-failover-attempts";
const CACHE_HEADER: &str = "x-llm-failover-cache";

/// Client headers a callout does not carry: the rest go to every attempt alike, as they do to
/// the routed one. Credentials are replaced by the target's; `accept-encoding` is dropped from
/// every attempt so that the filter can read what comes back (error bodies, usage, the cache).
const NOT_FORWARDED: [&str; 14] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "expect",
    "proxy-connection",
    "proxy-authorization",
    "authorization",
    "api-key",
    "accept-encoding",
    CLUSTER_HEADER,
];

fn forwarded_to_callouts(name: &str) -> bool {
    !name.starts_with(':') && !name.starts_with("x-envoy-") && !NOT_FORWARDED.contains(&name)
}

/// Response headers never copied from a callout answer to the client.
const HOP_BY_HOP: [&str; 6] = [
    ":status",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "x-envoy-upstream-service-time",
];

/// The parsed config and what is derived from it once.
pub struct Runtime {
    pub config: Config,
    pub metrics: Metrics,
    /// Credential header of each target, built once.
    credentials: Vec<(&'static str, String)>,
    all_targets: Vec<usize>,
}

impl Runtime {
    pub fn new(config: Config) -> Runtime {
        let metrics = Metrics::define(&config);
        let credentials = config
            .targets
            .iter()
            .map(provider::credential_header)
            .collect();
        let all_targets = (0..config.targets.len()).collect();
        Runtime {
            config,
            metrics,
            credentials,
            all_targets,
        }
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
enum Flow {
    /// Let it through.
    Resume,
    /// Keep holding it (a callout or timer will answer).
    Hold,
    /// The filter answered; the routed response is replaced.
    Replied,
}

enum Phase {
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
    /// The routed attempt answered with a failure candidate; its body is being collected.
    HoldingRouted {
        status: Option<u16>,
        content_type: Option<Vec<u8>>,
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
struct Answer {
    status: Option<u16>,
    content_type: Option<Vec<u8>>,
    retry_after: Option<Duration>,
    body: Vec<u8>,
    /// Callout answers carry their headers; the routed answer is still in Envoy.
    headers: Option<Headers>,
}

pub struct Exchange {
    rt: Rc<Runtime>,
    context_id: u32,
    phase: Phase,
    request_id: String,
    op: Option<Operation>,
    client_path: String,
    forwarded: Vec<(String, String)>,
    allowed: Option<Vec<usize>>,
    key_name: String,
    no_cache: bool,
    /// The request body, read once; kept while a further attempt may need it.
    body: Option<Body>,
    chain: Option<Chain>,
    attempt_started_ms: u64,
    cache_key: Option<Digest>,
    cache_body: Option<Vec<u8>>,
    usage: Option<UsageScanner>,
    dispatched: Option<u32>,
    /// Client headers that `address_routed` must remove, if present.
    client_has: [bool; 3],
    /// The filter state last written (target, attempts, failed over): only changes are written.
    recorded: Option<(String, u32, bool)>,
    /// Targets (bit i: target i) whose shared cooldown state this request read and found with no
    /// failures: a success on them has nothing to reset, so it skips reading the state again.
    clean: Cell<u64>,
    /// The time, read once per host callback (0: not read yet in this one).
    clock: Cell<u64>,
}

impl Exchange {
    pub fn new(rt: Rc<Runtime>, context_id: u32) -> Exchange {
        Exchange {
            rt,
            context_id,
            phase: Phase::Start,
            request_id: String::new(),
            op: None,
            client_path: String::new(),
            forwarded: Vec::new(),
            allowed: None,
            key_name: String::new(),
            no_cache: false,
            body: None,
            chain: None,
            attempt_started_ms: 0,
            cache_key: None,
            cache_body: None,
            usage: None,
            dispatched: None,
            client_has: [false; 3],
            recorded: None,
            clean: Cell::new(0),
            clock: Cell::new(0),
        }
    }

    /// Unix ms, read from the host once per callback: decisions taken in one callback share it.
    fn now(&self) -> u64 {
        if self.clock.get() == 0 {
            self.clock.set(host::now_ms());
        }
        self.clock.get()
    }

    fn config(&self) -> &Config {
        &self.rt.config
    }

    /// The token of a callout dispatched during the last call, if any.
    pub fn take_dispatched(&mut self) -> Option<u32> {
        self.dispatched.take()
    }

    fn targets(&self) -> &[usize] {
        self.allowed.as_deref().unwrap_or(&self.rt.all_targets)
    }

    fn target(&self, i: usize) -> Option<&Target> {
        self.config().targets.get(i)
    }

    /// The client's model, if the body said one.
    fn model(&self) -> Option<&str> {
        self.body.as_ref().and_then(|b| b.model.as_deref())
    }

    /// The model `t` is asked for: its own, else the client's.
    fn model_for<'a>(&'a self, t: &'a Target) -> Option<&'a str> {
        t.model.as_deref().or(self.model())
    }

    fn target_name(&self, i: usize) -> &str {
        self.target(i).map_or("?", |t| t.name.as_str())
    }

    // ---- request phase ----------------------------------------------------------------------

    pub fn on_request_headers(&mut self, end_of_stream: bool) -> Action {
        self.clock.set(0);
        let headers = host::headers(MapType::HttpRequestHeaders);
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_slice())
        };
        let text = |name: &str| {
            get(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or("")
        };
        let method = text(":method").to_string();
        self.client_path = text(":path").to_string();
        self.request_id = text("x-request-id")
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect();
        self.no_cache = get("cache-control")
            .is_some_and(|v| v.windows(8).any(|w| w.eq_ignore_ascii_case(b"no-cache")));
        self.client_has = [
            get("authorization").is_some(),
            get("api-key").is_some(),
            get("accept-encoding").is_some(),
        ];
        // Copied only when gateway keys are configured (the headers move to `forwarded` below).
        let credentials = match self.rt.config.keys {
            Some(_) => [get("authorization"), get("api-key")].map(|v| v.map(<[u8]>::to_vec)),
            None => [None, None],
        };
        for (name, value) in headers {
            if forwarded_to_callouts(&name) {
                if let Ok(v) = String::from_utf8(value) {
                    self.forwarded.push((name, v));
                }
            }
        }
        host::increment(self.rt.metrics.requests, 1);

        // Whatever happens next, a client never chooses the cluster: operations pause here and
        // are answered locally or addressed by `address_routed`, which sets it.
        let is_op = Operation::from_request(&method, &self.client_path).is_some();
        if !is_op {
            let first = self.targets().first().copied();
            let first_cluster = first
                .and_then(|i| self.target(i))
                .map(|t| t.cluster.clone())
                .unwrap_or_default();
            host::set_header(
                MapType::HttpRequestHeaders,
                CLUSTER_HEADER,
                Some(&first_cluster),
            );
        }

        if let Some(keys) = &self.rt.config.keys {
            let presented =
                auth::presented_key(credentials[0].as_deref(), credentials[1].as_deref());
            match auth::authenticate(keys, presented) {
                Some(key) => {
                    self.key_name = key.name.clone();
                    let allowed = key.targets.clone();
                    let cluster = allowed
                        .first()
                        .and_then(|i| self.target(*i))
                        .map(|t| t.cluster.clone())
                        .unwrap_or_default();
                    if !is_op {
                        host::set_header(
                            MapType::HttpRequestHeaders,
                            CLUSTER_HEADER,
                            Some(&cluster),
                        );
                    }
                    self.allowed = Some(allowed);
                }
                None => {
                    log::info!("{} rejected: missing or invalid gateway key", self.tag());
                    return self.reject(&Rejection::Unauthorized);
                }
            }
        }

        self.op = Operation::from_request(&method, &self.client_path);
        if self.op.is_none() {
            // Not an operation we rewrite: to the first target, with its host and credential.
            if let Some(i) = self.targets().first().copied() {
                self.address_routed(
                    i,
                    None,
                    host::header(MapType::HttpRequestHeaders, "content-length").is_some(),
                );
                self.chain = Chain::start(
                    vec![Hop {
                        target: i,
                        max_tries: 1,
                        timeout: self.config().deadline,
                    }],
                    self.now(),
                    self.config().deadline,
                    Duration::ZERO,
                    |_| false,
                )
                .map(|(c, _)| c);
            }
            self.phase = Phase::Passthrough;
            return Action::Continue;
        }
        if end_of_stream {
            return self.reject(&Rejection::InvalidBody {
                reason: "the body is empty".to_string(),
            });
        }
        self.phase = Phase::ReadingBody;
        Action::Pause
    }

    pub fn on_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.clock.set(0);
        if !matches!(self.phase, Phase::ReadingBody) {
            return Action::Continue;
        }
        let limit = self.config().max_request_body_bytes;
        if body_size > limit {
            log::info!(
                "{} rejected: body of {body_size} bytes is over the {limit} byte limit",
                self.tag()
            );
            return self.reject(&Rejection::BodyTooLarge { limit });
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let raw = host::buffer(BufferType::HttpRequestBody, body_size);
        let cacheable = self.config().cache.is_some()
            && self.op == Some(Operation::ChatCompletions)
            && !self.no_cache;
        let chain = self.targets().iter().filter_map(|&i| self.target(i));
        let keep = rewrite::keep_for(chain, cacheable);
        let body = match Body::parse(raw, keep) {
            Ok(body) => body,
            Err(reason) => {
                log::info!("{} rejected: {reason}", self.tag());
                return self.reject(&Rejection::InvalidBody { reason });
            }
        };
        self.body = Some(body);
        let now = self.now();

        if let Some(action) = self.try_cache(now) {
            return action;
        }

        let hops = self.plan();
        let cooling = |t: usize| self.is_cooling(t, now);
        let started = Chain::start(
            hops,
            now,
            self.config().deadline,
            self.config().max_retry_wait,
            cooling,
        );
        let Some((chain, first)) = started else {
            log::info!(
                "{} rejected: no target serves model {}",
                self.tag(),
                quote(self.model().unwrap_or(""))
            );
            return self.reject(&Rejection::NoTarget {
                model: self.model().map(str::to_string),
            });
        };
        for skipped in &first.skipped {
            self.note_cooldown_skip(*skipped);
        }
        self.chain = Some(chain);
        let replaced = match self
            .target(first.target)
            .zip(self.body.as_ref())
            .and_then(|(t, body)| rewrite::body_for(t, body))
        {
            Some(new_body) => {
                host::replace_buffer(BufferType::HttpRequestBody, body_size, &new_body)
                    .then_some(new_body.len())
            }
            None => None,
        };
        self.address_routed(first.target, Some(first.timeout), false);
        if let Some(len) = replaced {
            host::set_header(
                MapType::HttpRequestHeaders,
                "content-length",
                Some(&len.to_string()),
            );
        }
        if !self.chain.as_ref().is_some_and(Chain::has_more) {
            // No failover possible: the body copy is not needed.
            self.body = None;
        }
        self.attempt_started_ms = now;
        self.phase = Phase::Routed;
        Action::Continue
    }

    /// The targets this request may use, in chain order, without those that cannot serve it.
    fn plan(&self) -> Vec<Hop> {
        let mut hops = Vec::new();
        for &i in self.targets() {
            let Some(t) = self.target(i) else { continue };
            let model = self.model_for(t);
            if provider::address(t, self.op, model, &self.client_path).is_err() {
                log::info!(
                    "{} skip target={} reason=no_deployment model={}",
                    self.tag(),
                    t.name,
                    quote(model.unwrap_or(""))
                );
                host::increment(
                    self.rt.metrics.target(i).and_then(|m| m.deployment_skips),
                    1,
                );
                continue;
            }
            hops.push(Hop {
                target: i,
                max_tries: t.retries + 1,
                timeout: t.timeout,
            });
        }
        hops
    }

    /// Points the routed request at target `i`: path, host, credential, cluster, timeout.
    fn address_routed(&mut self, i: usize, timeout: Option<Duration>, _has_body: bool) {
        let map = MapType::HttpRequestHeaders;
        let Some(t) = self.target(i) else { return };
        host::set_header(map, CLUSTER_HEADER, Some(&t.cluster));
        let model = self.model_for(t);
        let Ok(addr) = provider::address(t, self.op, model, &self.client_path) else {
            return;
        };
        let credential = self.rt.credentials.get(i);
        for (name, present) in CLIENT_CREDENTIAL_HEADERS.iter().zip(self.client_has) {
            // Setting the target's credential replaces a client header of the same name.
            if present && credential.is_none_or(|(c, _)| c != name) {
                host::set_header(map, name, None);
            }
        }
        if let Some((name, value)) = credential {
            host::set_header(map, name, Some(value));
        }
        if addr.path != self.client_path {
            host::set_header(map, ":path", Some(&addr.path));
        }
        host::set_header(map, ":authority", Some(&addr.authority));
        if let Some(timeout) = timeout {
            host::set_header(
                map,
                "x-envoy-upstream-rq-timeout-ms",
                Some(&(timeout.as_millis() as u64).max(1).to_string()),
            );
        }
        if self.op.is_some() && self.client_has[2] {
            // Identity bodies, so error bodies, usage and cache entries can be read.
            host::set_header(map, "accept-encoding", None);
        }
    }

    fn try_cache(&mut self, now: u64) -> Option<Action> {
        let settings = self.config().cache.clone()?;
        let body = self.body.as_ref()?;
        if self.op != Some(Operation::ChatCompletions) || body.stream || self.no_cache {
            return None;
        }
        let digest = cache::key(&self.key_name, Operation::ChatCompletions, body)?;
        if let Some(entry) = shared::cache_get(&settings, &digest, now) {
            host::increment(self.rt.metrics.cache_hits, 1);
            log::debug!("{} cache hit target={}", self.tag(), entry.target);
            self.phase = Phase::Replied;
            let headers = [
                ("content-type", entry.content_type.as_str()),
                (CACHE_HEADER, "hit"),
                (TARGET_HEADER, entry.target.as_str()),
                (ATTEMPTS_HEADER, "0"),
            ];
            host::send_reply(200, &headers, &entry.body);
            self.record_state(&entry.target, 0, false);
            return Some(Action::Pause);
        }
        host::increment(self.rt.metrics.cache_misses, 1);
        self.cache_key = Some(digest);
        None
    }

    fn reject(&mut self, rejection: &Rejection) -> Action {
        self.rt.metrics.rejected(rejection.code());
        let reply = rejection.reply();
        self.phase = Phase::Replied;
        host::send_reply(
            reply.status,
            &[("content-type", "application/json")],
            &reply.body,
        );
        Action::Pause
    }

    // ---- response phase ---------------------------------------------------------------------

    pub fn on_response_headers(&mut self, end_of_stream: bool) -> (Action, Effect) {
        self.clock.set(0);
        match self.phase {
            Phase::Routed => {}
            Phase::Passthrough => {
                self.add_outcome_headers(1);
                return (Action::Continue, Effect::None);
            }
            _ => return (Action::Continue, Effect::None),
        }
        let status =
            host::header(MapType::HttpResponseHeaders, ":status").and_then(|s| parse_status(&s));
        if !judge::needs_judging(self.config(), status) {
            self.add_outcome_headers(1);
            self.routed_answered(status);
            return (Action::Continue, Effect::None);
        }
        // A failure candidate: `deliver` labels whatever answer the client finally gets.
        let headers = host::headers(MapType::HttpResponseHeaders);
        let content_type = headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .map(|(_, v)| v.clone());
        let retry_after = retry_after::parse(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            self.now() / 1000,
        );
        if end_of_stream {
            let answer = Answer {
                status,
                content_type,
                retry_after,
                body: Vec::new(),
                headers: None,
            };
            let (flow, effect) = self.decide(answer);
            return (self.action(flow), effect);
        }
        self.phase = Phase::HoldingRouted {
            status,
            content_type,
            retry_after,
        };
        (Action::Pause, Effect::None)
    }

    pub fn on_response_body(&mut self, body_size: usize, end_of_stream: bool) -> (Action, Effect) {
        self.clock.set(0);
        match &mut self.phase {
            Phase::Streaming => {
                self.observe_chunk(body_size, end_of_stream);
                (Action::Continue, Effect::None)
            }
            Phase::HoldingRouted {
                status,
                content_type,
                retry_after,
            } => {
                if !end_of_stream {
                    return (Action::Pause, Effect::None);
                }
                let status = *status;
                let body = if judge::needs_body(&self.rt.config, status) {
                    host::buffer(BufferType::HttpResponseBody, body_size)
                } else {
                    // Judged on its status; the held body stays in Envoy for the client.
                    Vec::new()
                };
                let answer = Answer {
                    status,
                    content_type: content_type.take(),
                    retry_after: *retry_after,
                    body,
                    headers: None,
                };
                let (flow, effect) = self.decide(answer);
                (self.action(flow), effect)
            }
            Phase::Callout { .. } | Phase::Waiting { .. } => (Action::Pause, Effect::None),
            _ => (Action::Continue, Effect::None),
        }
    }

    fn action(&self, flow: Flow) -> Action {
        match flow {
            Flow::Resume => Action::Continue,
            Flow::Hold | Flow::Replied => Action::Pause,
        }
    }

    /// The routed attempt answered with something that is not a failure: it streams through.
    fn routed_answered(&mut self, status: Option<u16>) {
        let now = self.now();
        if let Some(target) = self.chain.as_ref().and_then(Chain::current_target) {
            self.rt.metrics.attempt(
                target,
                status_class(status, None),
                now.saturating_sub(self.attempt_started_ms),
            );
            // Any answer that is not a failure shows the target is up.
            if let Some(t) = self.target(target) {
                if t.cooldown.is_some() {
                    let bit = 1u64.checked_shl(target as u32).unwrap_or(0);
                    if self.clean.get() & bit == 0 {
                        shared::record_success(&t.name);
                    }
                }
            }
            if (200..300).contains(&status.unwrap_or(0)) {
                self.usage = Some(UsageScanner::default());
            }
        }
        self.body = None;
        if status == Some(200) && self.cache_key.is_some() {
            self.cache_body = Some(Vec::new());
        }
        self.phase = Phase::Streaming;
    }

    /// Looks at a passing chunk of a successful routed response: token usage and the cache copy.
    fn observe_chunk(&mut self, body_size: usize, end_of_stream: bool) {
        let max_cache = self.config().cache.as_ref().map_or(0, |c| c.max_body_bytes);
        if let Some(buf) = &mut self.cache_body {
            if buf.len() + body_size > max_cache {
                self.cache_body = None;
            }
        }
        let want_all = self.cache_body.is_some();
        let chunk = if want_all {
            host::buffer(BufferType::HttpResponseBody, body_size)
        } else if self.usage.is_some() && body_size > 0 {
            let take = body_size.min(usage::TAIL);
            host::buffer_range(BufferType::HttpResponseBody, body_size - take, take)
        } else {
            Vec::new()
        };
        if let Some(scanner) = &mut self.usage {
            scanner.push(&chunk);
        }
        if let Some(buf) = &mut self.cache_body {
            buf.extend_from_slice(&chunk);
        }
        if end_of_stream {
            self.finish_success(None);
        }
    }

    /// Counts tokens and fills the cache once a successful answer is complete.
    fn finish_success(&mut self, body: Option<(&[u8], &str)>) {
        let Some(target) = self.chain.as_ref().and_then(Chain::current_target) else {
            return;
        };
        let tokens = match (&mut self.usage, body) {
            (_, Some((b, _))) => usage::from_body(b),
            (Some(scanner), None) => scanner.finish(),
            (None, None) => None,
        };
        if let (Some(u), Some(m)) = (tokens, self.rt.metrics.target(target)) {
            host::increment(m.prompt_tokens, u.prompt);
            host::increment(m.completion_tokens, u.completion);
        }
        let Some(settings) = self.config().cache.clone() else {
            return;
        };
        let Some(digest) = self.cache_key else { return };
        let (cached, content_type) = match body {
            Some((b, ct)) => (Some(b.to_vec()), ct.to_string()),
            None => (self.cache_body.take(), "application/json".to_string()),
        };
        let Some(cached) = cached.filter(|b| b.len() <= settings.max_body_bytes && !b.is_empty())
        else {
            return;
        };
        let entry = Entry {
            digest,
            expires_ms: self.now() + settings.ttl.as_millis() as u64,
            target: self.target_name(target).to_string(),
            content_type,
            body: cached,
        };
        shared::cache_put(&settings, &entry);
    }

    fn add_outcome_headers(&mut self, attempts: u32) {
        let map = MapType::HttpResponseHeaders;
        let target = self.chain.as_ref().and_then(Chain::current_target);
        let name = target.map_or("", |t| self.target_name(t)).to_string();
        if !name.is_empty() {
            host::set_header(map, TARGET_HEADER, Some(&name));
        }
        host::set_header(map, ATTEMPTS_HEADER, Some(&attempts.to_string()));
        self.record_state(&name, attempts, false);
        if self.config().cache.is_some() {
            host::set_header(map, CACHE_HEADER, Some("miss"));
        }
    }

    // ---- callouts ---------------------------------------------------------------------------

    pub fn on_callout_response(&mut self, token: u32, body_size: usize) -> Effect {
        self.clock.set(0);
        match self.phase {
            Phase::Callout { token: t } if t == token => {}
            _ => {
                log::debug!("{} ignoring answer of unknown callout {token}", self.tag());
                return Effect::None;
            }
        }
        let headers = host::headers(MapType::HttpCallResponseHeaders);
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let status = find(":status").and_then(|s| parse_status(&s));
        let content_type = find("content-type");
        let retry_after = retry_after::parse(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            self.now() / 1000,
        );
        let body = host::buffer(BufferType::HttpCallResponseBody, body_size);
        let answer = Answer {
            status,
            content_type,
            retry_after,
            body,
            headers: Some(headers),
        };
        self.decide(answer).1
    }

    /// A Retry-After wait is over: send the retry.
    pub fn fire_retry(&mut self) -> Effect {
        self.clock.set(0);
        let Phase::Waiting { target, timeout } = self.phase else {
            return Effect::None;
        };
        self.attempt(target, timeout).1
    }

    /// Judges an answer and takes the chain's next step.
    fn decide(&mut self, answer: Answer) -> (Flow, Effect) {
        let Some(mut chain) = self.chain.take() else {
            return (Flow::Resume, Effect::None);
        };
        let now = self.now();
        let current = chain.current_target().unwrap_or(0);
        let outcome = judge::outcome(
            self.config(),
            answer.status,
            answer.content_type.as_deref(),
            &answer.body,
            answer.retry_after,
        );
        let failure = match &outcome {
            Outcome::Delivered => None,
            Outcome::Failed(f) => Some(f.clone()),
        };
        self.rt.metrics.attempt(
            current,
            status_class(answer.status, failure.as_ref().map(|f| f.kind)),
            now.saturating_sub(self.attempt_started_ms),
        );
        self.record_cooldown(current, failure.as_ref(), now);

        let (step, no_retry) = chain.next(&outcome, now, |t| self.is_cooling(t, now));
        let attempts = chain.attempts();
        let failed_over = chain.failed_over();
        self.chain = Some(chain);
        let what = describe(&answer, failure.as_ref().map(|f| f.kind));
        if let Some(why) = no_retry {
            let why = match why {
                NoRetry::RetryAfterTooLong => "is over max_retry_wait",
                NoRetry::RetryAfterOverBudget => "does not fit the deadline",
            };
            log::info!(
                "{} no retry on target={}: retry-after {}ms {why}",
                self.tag(),
                self.target_name(current),
                answer.retry_after.unwrap_or_default().as_millis() as u64
            );
        }
        match step {
            Step::Deliver => (
                self.deliver(answer, None, attempts, failed_over, false),
                Effect::None,
            ),
            Step::GiveUp(reason) => {
                match reason {
                    GiveUpReason::Exhausted => {
                        host::increment(self.rt.metrics.exhausted, 1);
                        log::info!(
                            "{} chain exhausted after {attempts} attempt(s): last target={} {what}",
                            self.tag(),
                            self.target_name(current)
                        );
                    }
                    GiveUpReason::BudgetSpent => {
                        host::increment(self.rt.metrics.budget_spent, 1);
                        log::info!(
                            "{} deadline spent after {attempts} attempt(s): last target={} {what}",
                            self.tag(),
                            self.target_name(current)
                        );
                    }
                }
                let budget_spent = reason == GiveUpReason::BudgetSpent;
                let failure = failure.map(|f| f.kind);
                let flow = self.deliver(answer, failure, attempts, failed_over, budget_spent);
                (flow, Effect::None)
            }
            Step::Retry {
                target,
                delay,
                timeout,
            } => {
                host::increment(self.rt.metrics.retries, 1);
                host::increment(self.rt.metrics.target(target).and_then(|m| m.retries), 1);
                log::info!(
                    "{} retry target={} after {what} delay={}ms attempt={attempts}",
                    self.tag(),
                    self.target_name(target),
                    delay.as_millis() as u64
                );
                if delay.is_zero() {
                    self.attempt(target, timeout)
                } else {
                    self.phase = Phase::Waiting { target, timeout };
                    (Flow::Hold, Effect::Wait(now + delay.as_millis() as u64))
                }
            }
            Step::Failover {
                from,
                to,
                timeout,
                skipped,
            } => {
                for s in skipped {
                    self.note_cooldown_skip(s);
                }
                self.rt.metrics.fallback(from, to);
                log::info!(
                    "{} failover from={} to={} after {what} attempt={attempts}",
                    self.tag(),
                    self.target_name(from),
                    self.target_name(to)
                );
                self.attempt(to, timeout)
            }
        }
    }

    /// Sends the next attempt to `target` as a callout. A callout the host refuses (e.g. an
    /// unknown cluster) counts as an unreachable target.
    fn attempt(&mut self, target: usize, timeout: Duration) -> (Flow, Effect) {
        self.attempt_started_ms = self.now();
        let dispatched = self
            .build_callout(target)
            .and_then(|(cluster, headers, body)| {
                let pairs: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                host::dispatch(
                    &cluster,
                    &pairs,
                    body.as_deref()
                        .or(self.body.as_ref().map(Body::raw))
                        .unwrap_or_default(),
                    timeout,
                )
                .ok()
            });
        match dispatched {
            Some(token) => {
                self.phase = Phase::Callout { token };
                self.dispatched = Some(token);
                // So the access log shows the failover even if the client leaves before the end.
                if let Some((attempts, failed_over)) =
                    self.chain.as_ref().map(|c| (c.attempts(), c.failed_over()))
                {
                    let name = self.target_name(target).to_string();
                    self.record_state(&name, attempts, failed_over);
                }
                (Flow::Hold, Effect::None)
            }
            None => {
                log::warn!(
                    "{} could not dispatch to target={} (is cluster {} defined?)",
                    self.tag(),
                    self.target_name(target),
                    quote(self.target(target).map_or("", |t| t.cluster.as_str()))
                );
                self.decide(Answer {
                    status: None,
                    content_type: None,
                    retry_after: None,
                    body: Vec::new(),
                    headers: None,
                })
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn build_callout(&self, i: usize) -> Option<(String, Vec<(String, String)>, Option<Vec<u8>>)> {
        let t = self.target(i)?;
        let model = self.model_for(t);
        let addr = provider::address(t, self.op, model, &self.client_path).ok()?;
        let body = self.body.as_ref().and_then(|b| rewrite::body_for(t, b));
        let len = body
            .as_ref()
            .map_or(self.body.as_ref().map_or(0, |b| b.raw().len()), Vec::len);
        let mut headers: Vec<(String, String)> = vec![
            (":method".into(), "POST".into()),
            (":path".into(), addr.path),
            (":authority".into(), addr.authority),
            ("content-length".into(), len.to_string()),
        ];
        if let Some((name, value)) = self.rt.credentials.get(i) {
            headers.push(((*name).to_string(), value.clone()));
        }
        for (name, value) in &self.forwarded {
            headers.push((name.clone(), value.clone()));
        }
        Some((t.cluster.clone(), headers, body))
    }

    /// Gives the client `answer`: the routed response resumes; a callout's answer replaces it;
    /// a transport failure becomes an OpenAI-shaped error.
    fn deliver(
        &mut self,
        answer: Answer,
        failure: Option<FailureKind>,
        attempts: u32,
        failed_over: bool,
        budget_spent: bool,
    ) -> Flow {
        let target = self
            .chain
            .as_ref()
            .and_then(Chain::current_target)
            .unwrap_or(0);
        let name = self.target_name(target).to_string();
        self.record_state(&name, attempts, failed_over);
        let attempts_text = attempts.to_string();
        let mut ours: Vec<(&str, &str)> = vec![
            (TARGET_HEADER, name.as_str()),
            (ATTEMPTS_HEADER, attempts_text.as_str()),
        ];
        if self.config().cache.is_some() {
            ours.push((CACHE_HEADER, "miss"));
        }
        if let Some(kind @ (FailureKind::Unreachable | FailureKind::Timeout)) = failure {
            let rejection = if kind == FailureKind::Timeout && budget_spent {
                // The attempt's timeout was what was left of the deadline.
                Rejection::DeadlineExceeded
            } else {
                Rejection::UpstreamUnavailable {
                    target: name.clone(),
                    timeout: kind == FailureKind::Timeout,
                }
            };
            let reply = rejection.reply();
            ours.push(("content-type", "application/json"));
            self.phase = Phase::Replied;
            host::send_reply(reply.status, &ours, &reply.body);
            return Flow::Replied;
        }
        let Some(headers) = answer.headers else {
            // The routed response itself, still held: label it.
            for (name, value) in &ours {
                host::set_header(MapType::HttpResponseHeaders, name, Some(value));
            }
            return Flow::Resume;
        };
        let status = u32::from(answer.status.unwrap_or(502));
        if failure.is_none() && status == 200 {
            let ct = answer
                .content_type
                .as_deref()
                .and_then(|c| std::str::from_utf8(c).ok())
                .unwrap_or("application/json")
                .to_string();
            let encoded = headers.iter().any(|(n, _)| n == "content-encoding");
            if encoded {
                self.cache_key = None;
            }
            self.finish_success(Some((&answer.body, &ct)));
        }
        let mut out: Vec<(&str, &str)> = headers
            .iter()
            .filter(|(n, _)| {
                !HOP_BY_HOP.contains(&n.as_str())
                    && !n.starts_with(":")
                    && !ours.iter().any(|(o, _)| o == n)
            })
            .filter_map(|(n, v)| std::str::from_utf8(v).ok().map(|v| (n.as_str(), v)))
            .collect();
        out.extend(ours.iter().copied());
        self.phase = Phase::Replied;
        host::send_reply(status, &out, &answer.body);
        Flow::Replied
    }

    // ---- cooldowns ---------------------------------------------------------------------------

    fn is_cooling(&self, target: usize, now: u64) -> bool {
        match self.target(target) {
            Some(t) if t.cooldown.is_some() => {
                let state = shared::cooldown_state(&t.name);
                if cooldown::after_success(state).is_none() && target < 64 {
                    self.clean.set(self.clean.get() | 1 << target);
                }
                state.cooling(now)
            }
            _ => false,
        }
    }

    fn record_cooldown(&self, target: usize, failure: Option<&crate::chain::Failure>, now: u64) {
        let Some(t) = self.target(target) else { return };
        let Some(policy) = &t.cooldown else { return };
        let bit = 1u64.checked_shl(target as u32).unwrap_or(0);
        match failure {
            // Read clean earlier in this request: nothing to reset (one shared-data read less
            // per success). Another worker's failure since then is not reset by this success.
            None if self.clean.get() & bit != 0 => {}
            None => shared::record_success(&t.name),
            Some(f) => {
                self.clean.set(self.clean.get() & !bit);
                let throttled = match f.kind {
                    FailureKind::Status(429) => f.retry_after,
                    _ => None,
                };
                if let Some(d) = shared::record_failure(&t.name, policy, throttled, now) {
                    host::increment(
                        self.rt
                            .metrics
                            .target(target)
                            .and_then(|m| m.cooldowns_started),
                        1,
                    );
                    log::info!(
                        "{} cooldown target={} for {}ms",
                        self.tag(),
                        t.name,
                        d.as_millis() as u64
                    );
                }
            }
        }
    }

    fn note_cooldown_skip(&self, target: usize) {
        host::increment(
            self.rt
                .metrics
                .target(target)
                .and_then(|m| m.cooldown_skips),
            1,
        );
        log::info!(
            "{} skip target={} reason=cooldown",
            self.tag(),
            self.target_name(target)
        );
    }

    pub fn on_log(&mut self) {
        if let Phase::Callout { .. } | Phase::Waiting { .. } = self.phase {
            log::debug!("{} client went away during failover", self.tag());
        }
    }

    /// Filter state for the access log: `%FILTER_STATE(wasm.llm_failover.<field>:PLAIN)%`.
    /// Each value is written when it differs from the last written (a host call each).
    fn record_state(&mut self, target: &str, attempts: u32, failed_over: bool) {
        let last = self.recorded.take();
        if last.as_ref().is_none_or(|(t, _, _)| t != target) {
            host::set_filter_state("llm_failover.target", target);
        }
        if last.as_ref().is_none_or(|(_, a, _)| *a != attempts) {
            host::set_filter_state("llm_failover.attempts", &attempts.to_string());
        }
        if last.as_ref().is_none_or(|(_, _, f)| *f != failed_over) {
            let failover = if failed_over { "true" } else { "false" };
            host::set_filter_state("llm_failover.failover", failover);
        }
        self.recorded = Some((target.to_string(), attempts, failed_over));
    }

    fn tag(&self) -> String {
        if self.request_id.is_empty() {
            format!("[ctx={}]", self.context_id)
        } else {
            format!("[ctx={} req={}]", self.context_id, self.request_id)
        }
    }
}

fn parse_status(bytes: &[u8]) -> Option<u16> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

fn describe(answer: &Answer, failure: Option<FailureKind>) -> String {
    match (failure, answer.status) {
        (Some(FailureKind::Timeout), _) => "failure=timeout".to_string(),
        (Some(FailureKind::Unreachable), _) | (_, None) => "failure=unreachable".to_string(),
        (_, Some(s)) => format!("status={s}"),
    }
}
