//! The router's upstream filter: one context per attempt the router makes; every
//! request but a streamed one passes untouched. A streamed attempt is addressed for its target
//! (the plan's attempt of that number, on the cluster the route chose for it): path, host,
//! credential, and the body when the target needs its own. It logs and counts the decision the
//! attempt stands for (a retry or a failover), and judges how the attempt ended for the
//! cooldowns, the spill-overs and the stats. The request's facts come from the filter's handoff,
//! never from the headers, which all attempts share and which carry the last attempt's rewrite.
//! An attempt shares only a narrow `Scope` with the downstream filter (runtime, context, request
//! id, route) and keeps its own `Attempting`: none of the downstream request's state.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};

use super::health::{Attempting, Scope};
use super::host::{self, Now};
use super::root;
use super::runtime::{Runtime, Streamed};
use crate::answer::reply::{ErrorShape, Rejection};
use crate::policy::chain::{Failure, FailureKind};
use crate::policy::judge;
use crate::policy::retry_after;
use crate::request::body::{Body, Keep};
use crate::streamed::{self, Decision, Ended, Handoff, Record};
use crate::target::provider::{self, CLIENT_CREDENTIAL_HEADERS};
use crate::target::rewrite;

pub struct Attempt {
    context_id: u32,
    state: Option<State>,
    /// The shape of this attempt's own errors: the client's API's, once the handoff is read.
    shape: ErrorShape,
}

/// An attempt that was addressed.
struct State {
    rt: Rc<Runtime>,
    /// The request's facts, as the filter handed them over, and the attempts' record.
    shared: Rc<Streamed>,
    /// This attempt as the targets' health sees it.
    attempting: Attempting,
    target: usize,
    /// This attempt's record (its number, target and ending); the shared one is the last
    /// attempt's.
    record: Record,
    answered: bool,
    /// The target's body differs from the client's: held until complete, then rewritten.
    rewrite: bool,
}

/// What the attempt shares with the downstream filter of its request.
fn scope<'a>(rt: &'a Runtime, handoff: &'a Handoff) -> Scope<'a> {
    Scope {
        rt,
        context_id: handoff.ctx,
        request_id: &handoff.id,
        route: handoff.route,
    }
}

impl State {
    fn scope(&self) -> Scope<'_> {
        scope(&self.rt, &self.shared.handoff)
    }
}

impl Attempt {
    pub fn new(context_id: u32) -> Attempt {
        Attempt {
            context_id,
            state: None,
            shape: ErrorShape::OpenAi,
        }
    }

    /// Addresses the attempt of a streamed request; every other request the router sends (the
    /// routed first attempt of one that is not streamed) passes untouched. `Err` names why the attempt cannot be sent (the
    /// client gets a 500: the request must never go on unaddressed or with another target's
    /// credential).
    fn begin(&mut self, end_of_stream: bool, now: &Now) -> Result<Action, Refusal> {
        let Some(key) = host::property(&[streamed::HANDOFF_STATE]) else {
            return Ok(Action::Continue);
        };
        let not_shared = Refusal::Misconfigured(
            "the upstream filter does not share the filter's Wasm VM (give it the filter's \
             vm_config: same vm_id and code)",
        );
        let (root, ctx) = streamed::parse_handoff_key(&key).ok_or(not_shared)?;
        let rt = root::runtime_of(root).ok_or(not_shared)?;
        let shared = rt.streamed_of(ctx).ok_or(not_shared)?;
        let handoff = &shared.handoff;
        self.shape = handoff.shape;
        let previous = shared.record.get();
        let attempt = previous.map_or(1, |p| p.attempts.saturating_add(1));
        let target = streamed::attempt_target(&handoff.plan, attempt).ok_or(
            Refusal::Misconfigured("a streamed request with an empty plan"),
        )?;
        let cluster = host::property_text(&["xds", "cluster_name"]).unwrap_or_default();
        if rt.config.targets.get(target).map(|t| t.cluster.as_str()) != Some(cluster.as_str()) {
            return Err(Refusal::Misconfigured(
                "a streamed attempt reached another cluster than its target's: the route must \
                 take each attempt's cluster from x-llm-failover-cluster (README, streamed \
                 failover: the Lua filter and the priority_group cluster specifier)",
            ));
        }
        let now = now.ms();
        if previous.is_some() && !handoff.may_start(now) {
            return Err(Refusal::DeadlineSpent);
        }
        let first = handoff.plan.first().map_or(target, |t| t.target);
        let record = Record::next(previous, first, target);
        let scope = scope(&rt, handoff);
        if let Some(previous) = previous {
            log_decision(&scope, &previous, target, record.attempts);
        }

        let (Some(t), Some(step)) = (scope.target(target), scope.step(target)) else {
            return Err(Refusal::Misconfigured("target out of range"));
        };
        let model = step.model.as_deref().or(handoff.model.as_deref());
        let address =
            provider::address(t, Some(handoff.op), model, &handoff.path).map_err(|_| {
                Refusal::Misconfigured("the request's plan names a target that cannot serve it")
            })?;
        let (credential, value) = rt.credential(target, now).ok_or(Refusal::NoCredential)?;
        let rewrite = rewrite::may_change_body(t, step, handoff.op);
        let map = MapType::HttpRequestHeaders;
        // The headers are shared by all attempts: any provider's credential a previous attempt
        // set goes, this target's is set.
        for header in CLIENT_CREDENTIAL_HEADERS {
            if header != credential {
                host::set_header(map, header, None);
            }
        }
        host::set_header(map, credential, Some(&value));
        host::set_header(map, ":path", Some(&address.path));
        host::set_header(map, ":authority", Some(&address.authority));
        if previous.is_some() && !rewrite {
            // An earlier attempt may have set the length of its own body.
            set_length(handoff.length);
        }
        shared.record.set(Some(record));
        // Read here (the plan was made by the filter): an attempt on a target whose cooldown
        // ended takes its probe.
        let mut attempting = Attempting::new(handoff.pinned);
        attempting.breaker(&scope, target, now);
        let per_try = Duration::from_millis(handoff.per_try_ms);
        attempting.begin(&scope, target, per_try, now);
        log::debug!(
            "{} streamed attempt {} to target={}",
            scope.tag(),
            record.attempts,
            scope.target_name(target)
        );
        self.state = Some(State {
            rt,
            shared,
            attempting,
            target,
            record,
            answered: false,
            rewrite,
        });
        Ok(if rewrite && !end_of_stream {
            Action::Pause
        } else {
            Action::Continue
        })
    }

    /// The target's body, in place of the client's (the router hands every attempt the
    /// client's, as it arrived).
    fn rewrite_body(&mut self, body_size: usize) {
        let Some(st) = &self.state else { return };
        let raw = host::buffer(BufferType::HttpRequestBody, body_size);
        let Ok(body) = Body::parse(raw, Keep::Document) else {
            return;
        };
        let scope = st.scope();
        let (Some(t), Some(step)) = (scope.target(st.target), scope.step(st.target)) else {
            return;
        };
        let new = rewrite::body_for_step(t, step, st.shared.handoff.op, &body);
        match new {
            Some(new) if host::replace_buffer(BufferType::HttpRequestBody, body_size, &new) => {
                set_length(new.len() as u64);
            }
            _ => set_length(st.shared.handoff.length),
        }
    }

    /// The attempt's answer: counted, and judged for the target's health.
    fn answered(&mut self, now: &Now) {
        let Some(st) = &mut self.state else { return };
        st.answered = true;
        let now = now.ms();
        let scope = scope(&st.rt, &st.shared.handoff);
        let status = host::header(MapType::HttpResponseHeaders, ":status")
            .and_then(|s| judge::parse_status(&s));
        let config = &st.rt.config;
        let failed = status.filter(|&s| streamed::fails_over(config, s));
        let spills = scope
            .target(st.target)
            .is_some_and(|t| t.spillover.is_some());
        let headers = if failed.is_some() || spills {
            host::headers(MapType::HttpResponseHeaders)
        } else {
            Vec::new()
        };
        let failure = failed.map(|s| Failure {
            kind: judge::status_failure(config, s),
            retry_after: retry_after::parse(
                headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
                now / 1000,
            ),
        });
        st.rt.metrics.attempt(
            st.shared.handoff.route,
            st.target,
            judge::status_class(status, None),
            now.saturating_sub(st.attempting.started_ms),
        );
        st.attempting
            .record_health(&scope, st.target, failure.as_ref(), now);
        if spills {
            scope.record_limits(st.target, &headers, now);
        }
        st.record.ended = status.map_or(Ended::Unreachable, Ended::Status);
        st.shared.record.set(Some(st.record));
    }

    /// The attempt ended: one that never answered failed in transport (unless the client left).
    /// Its ending is recorded only over its own record: it may end after the router started
    /// the next attempt, whose record stands (`Record::may_overwrite`).
    fn done(&mut self, now: &Now) {
        let Some(st) = &mut self.state else { return };
        if st.answered {
            return;
        }
        let now = now.ms();
        let scope = scope(&st.rt, &st.shared.handoff);
        if client_left() {
            log::debug!("{} client went away during a streamed attempt", scope.tag());
            st.attempting.release_probe(&scope);
            return;
        }
        let started = st.attempting.started_ms;
        let ended = streamed::no_answer(now.saturating_sub(started), st.shared.handoff.per_try_ms);
        let kind = match ended {
            Ended::Timeout => FailureKind::Timeout,
            _ => FailureKind::Unreachable,
        };
        st.rt.metrics.attempt(
            st.shared.handoff.route,
            st.target,
            judge::status_class(None, Some(kind)),
            now.saturating_sub(started),
        );
        let failure = Failure {
            kind,
            retry_after: None,
        };
        st.attempting
            .record_health(&scope, st.target, Some(&failure), now);
        st.record.ended = ended;
        let current = st.shared.record.get();
        if st.record.may_overwrite(current.as_ref()) {
            st.shared.record.set(Some(st.record));
        } else {
            log::debug!(
                "{} streamed attempt {} ended after attempt {} began: its record stands",
                scope.tag(),
                st.record.attempts,
                current.map_or(0, |c| c.attempts)
            );
        }
    }
}

/// Why an attempt is not sent.
#[derive(Clone, Copy)]
enum Refusal {
    Misconfigured(&'static str),
    NoCredential,
    /// The request's deadline is spent: the chain stops (the filter says so to the client).
    DeadlineSpent,
}

/// The decision the attempt after `previous` stands for: logged and counted once, by the
/// attempt that carries it out.
fn log_decision(scope: &Scope, previous: &Record, target: usize, attempt: u32) {
    let what = match previous.ended {
        Ended::Status(s) => judge::describe(Some(s), None),
        Ended::Timeout => judge::describe(None, Some(FailureKind::Timeout)),
        Ended::Unreachable | Ended::Pending => judge::describe(None, None),
    };
    match streamed::decision(previous, target) {
        Decision::Retry { target } => {
            scope.rt.metrics.retry(target);
            log::info!(
                "{} retry target={} after {what} delay=0ms attempt={attempt}",
                scope.tag(),
                scope.target_name(target)
            );
        }
        Decision::Failover { from, to } => {
            scope.rt.metrics.fallback(scope.route, from, to);
            log::info!(
                "{} failover from={} to={} after {what} attempt={attempt}",
                scope.tag(),
                scope.target_name(from),
                scope.target_name(to)
            );
        }
    }
}

/// The attempt's `content-length` (the headers go on after the body is read, so it can change).
fn set_length(length: u64) {
    let len = length.to_string();
    host::set_header(MapType::HttpRequestHeaders, "content-length", Some(&len));
}

/// Envoy's response flag DC (downstream connection termination).
const DOWNSTREAM_TERMINATED: u64 = 1 << 14;

fn client_left() -> bool {
    host::property(&["response", "flags"])
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .is_some_and(|b| u64::from_le_bytes(b) & DOWNSTREAM_TERMINATED != 0)
}

impl Context for Attempt {
    fn on_done(&mut self) -> bool {
        self.done(&Now::default());
        true
    }
}

impl HttpContext for Attempt {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        match self.begin(end_of_stream, &Now::default()) {
            Ok(action) => action,
            Err(refusal) => {
                let rejection = match refusal {
                    Refusal::Misconfigured(why) => {
                        log::error!("[ctx={}] streamed attempt refused: {why}", self.context_id);
                        Rejection::Misconfigured
                    }
                    Refusal::NoCredential => Rejection::NoCredential,
                    Refusal::DeadlineSpent => Rejection::DeadlineExceeded,
                };
                let reply = rejection.reply(self.shape);
                host::set_filter_state(streamed::REFUSED_STATE, rejection.code());
                host::send_reply(
                    reply.status,
                    &[("content-type", "application/json")],
                    &reply.body,
                );
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.state.as_ref().is_some_and(|s| s.rewrite) {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.rewrite_body(body_size);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.answered(&Now::default());
        Action::Continue
    }
}
