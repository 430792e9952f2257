//! The routed attempt: the request pointed at its first target (Envoy's route sends it), and
//! that target's answer, either passed through as it streams or, when it may be a failure, held
//! until it can be judged.

use std::time::Duration;

use proxy_wasm::types::{BufferType, MapType};

use super::exchange::{Answer, Exchange, Flow, Passing, Phase, Turn};
use super::host::{self, Now};
use crate::answer::affinity;
use crate::answer::usage::{self, UsageScanner};
use crate::policy::chain::{Chain, Outcome};
use crate::policy::judge;
use crate::policy::plan;
use crate::policy::retry_after;
use crate::request::intake::Kind;
use crate::target::forward::{self, Edit, Routed};
use crate::target::provider;

impl Exchange {
    /// Points the routed request at target `i`: cluster, credential, path, host, and for an
    /// operation its per-attempt timeout.
    pub(super) fn address_routed(&mut self, i: usize, timeout: Option<Duration>, now: u64) {
        let Some(t) = self.target(i) else { return };
        let op = self.operation();
        let path = &self.request.client_path;
        let address = match &self.request.kind {
            Some(Kind::Resource(resource)) => Ok(provider::resource_address(t, resource, path)),
            _ => provider::address(t, op, self.model_for(i), path),
        };
        let (Ok(address), Some((name, value))) = (address, self.rt.credential(i, now)) else {
            // Not expected (the plan leaves out what cannot be addressed); the cluster is set
            // whatever happens, so the client never chooses it.
            let cluster = Some(t.cluster.as_str());
            host::set_header(
                MapType::HttpRequestHeaders,
                forward::CLUSTER_HEADER,
                cluster,
            );
            return;
        };
        let timeout_ms = timeout.map(|d| plan::route_timeout_ms(d).to_string());
        let routed = Routed {
            cluster: &t.cluster,
            credential: (name, value.as_str()),
            address: &address,
            client_path: &self.request.sent_path,
            timeout_ms: timeout_ms.as_deref(),
            operation: op.is_some(),
        };
        for edit in forward::routed(&routed, self.request.client_has) {
            let map = MapType::HttpRequestHeaders;
            match edit {
                Edit::Set(name, value) => host::set_header(map, name, Some(value)),
                Edit::Remove(name) => host::set_header(map, name, None),
            };
        }
    }

    pub fn on_response_headers(&mut self, end_of_stream: bool, now: &Now) -> Turn {
        match self.take_phase() {
            Phase::Routed { chain } => self.on_routed_answer(chain, end_of_stream, now),
            Phase::StreamRouted { chain, shared } => {
                self.on_stream_answer(chain, &shared, end_of_stream, now)
            }
            Phase::Passthrough { target } => {
                self.phase = Phase::Passthrough { target };
                self.add_outcome_headers(target, 1, false);
                Turn::from(Flow::Resume)
            }
            phase => {
                self.phase = phase;
                Turn::from(Flow::Resume)
            }
        }
    }

    /// The routed attempt's answer: let through when it is not a failure, else judged (held
    /// until its body is complete when it has one).
    fn on_routed_answer(&mut self, chain: Chain, end_of_stream: bool, now: &Now) -> Turn {
        let target = chain.current_target();
        let status = host::header(MapType::HttpResponseHeaders, ":status")
            .and_then(|s| judge::parse_status(&s));
        // A target that spills over has every answer's rate-limit headers read.
        let spills = target.filter(|&t| self.target(t).is_some_and(|t| t.spillover.is_some()));
        // Envoy's own replies are errors: a 2xx or 3xx came from the target, with no host call
        // to ask who made it.
        let source = if status.is_some_and(|s| s < 400) {
            judge::Source::Upstream
        } else {
            judge::routed_source(
                &host::property_text(&["response", "code_details"]).unwrap_or_default(),
            )
        };
        if source == judge::Source::Filter {
            // Not an answer of the target's: passed on as it is, with nothing to record.
            self.add_outcome_headers(target, 1, false);
            self.phase = Phase::Passthrough { target };
            return Turn::from(Flow::Resume);
        }
        if !judge::needs_judging(self.config(), status, source) && !self.probe_holds(status) {
            if let Some(spilling) = spills {
                let headers = host::headers(MapType::HttpResponseHeaders);
                self.record_limits(spilling, &headers, now.ms());
            }
            self.add_outcome_headers(target, 1, false);
            self.routed_answered(target, status, now.ms());
            return Turn::from(Flow::Resume);
        }
        // A failure candidate: `deliver` labels whatever answer the client finally gets.
        let headers = host::headers(MapType::HttpResponseHeaders);
        if let Some(spilling) = spills {
            self.record_limits(spilling, &headers, now.ms());
        }
        let retry_after = retry_after::parse(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            now.ms() / 1000,
        );
        if let Some(probe) = &mut self.owner_probe {
            probe.routed_headers = Some(headers);
        }
        if end_of_stream {
            let answer = Answer {
                status,
                source,
                content_type: None,
                retry_after,
                body: Vec::new(),
                headers: None,
            };
            return self.decide(chain, answer, now.ms());
        }
        self.phase = Phase::HoldingRouted {
            chain,
            status,
            source,
            retry_after,
        };
        Turn::from(Flow::Hold)
    }

    pub fn on_response_body(&mut self, body_size: usize, end_of_stream: bool, now: &Now) -> Turn {
        match self.take_phase() {
            Phase::Streaming(mut passing) => {
                self.observe_chunk(&mut passing, body_size, end_of_stream, now);
                self.phase = Phase::Streaming(passing);
                Turn::from(Flow::Resume)
            }
            Phase::HoldingRouted {
                chain,
                status,
                source,
                retry_after,
            } => {
                if !end_of_stream {
                    self.phase = Phase::HoldingRouted {
                        chain,
                        status,
                        source,
                        retry_after,
                    };
                    return Turn::from(Flow::Hold);
                }
                let answer = Answer {
                    status,
                    source,
                    content_type: None,
                    retry_after,
                    // Judged on its status unless the body decides; the held body stays in
                    // Envoy for the client.
                    // A probe reads it: it may be a "not found", or a failure kept for the client.
                    body: if judge::needs_body(&self.rt.config, status)
                        || self.owner_probe.is_some()
                    {
                        host::buffer(BufferType::HttpResponseBody, body_size)
                    } else {
                        Vec::new()
                    },
                    headers: None,
                };
                self.decide(chain, answer, now.ms())
            }
            phase @ Phase::StreamSpent { .. } => {
                self.phase = phase;
                Turn::from(self.on_stream_spent_body(end_of_stream, now))
            }
            phase @ (Phase::Callout { .. } | Phase::Waiting { .. }) => {
                self.phase = phase;
                Turn::from(Flow::Hold)
            }
            phase => {
                self.phase = phase;
                Turn::from(Flow::Resume)
            }
        }
    }

    /// The routed attempt answered with something that is not a failure: it streams through.
    fn routed_answered(&mut self, target: Option<usize>, status: Option<u16>, now: u64) {
        if let Some(target) = target {
            self.rt.metrics.attempt(
                self.request.route,
                target,
                judge::status_class(status, None),
                now.saturating_sub(self.attempting.started_ms),
            );
            // Any answer that is not a failure shows the target is up.
            self.record_health(target, None, now);
            self.probe_answered(target, status, &Outcome::Delivered, now);
        }
        self.pass_answer(target, status);
    }

    /// The answer of `target` passes through from here on: its usage counted, its response id
    /// remembered, its copy cached.
    pub(super) fn pass_answer(&mut self, target: Option<usize>, status: Option<u16>) {
        let mut passing = Passing {
            target,
            usage: None,
            cache_body: None,
            response_head: None,
        };
        if (200..300).contains(&status.unwrap_or(0)) && target.is_some() {
            // A stored response read back (a resource request) is not new usage.
            if self.operation().is_some() && self.answer_may_carry_usage(target) {
                passing.usage = Some(UsageScanner::default());
            }
            if self.creates_response() {
                passing.response_head = Some(Vec::new());
            }
        }
        self.body = None;
        if status == Some(200) && self.cache_key.is_some() {
            passing.cache_body = Some(Vec::new());
        }
        self.phase = Phase::Streaming(passing);
    }

    /// Whether this request's answer from `target` can hold usage (see `usage::in_answer`).
    fn answer_may_carry_usage(&self, target: Option<usize>) -> bool {
        let Some(body) = &self.body else {
            return true;
        };
        let overridden = target
            .and_then(|t| self.step(t))
            .and_then(|s| s.override_params.as_ref())
            .is_some_and(|p| p.contains_key("stream_options"));
        usage::in_answer(
            body.stream,
            self.creates_response(),
            body.include_usage,
            overridden,
        )
    }

    /// A Responses API answer passing through: its beginning, until its id is known.
    fn read_response_id(&mut self, passing: &mut Passing, body_size: usize, now: &Now) {
        let (Some(mut head), Some(target)) = (passing.response_head.take(), passing.target) else {
            return;
        };
        let want = body_size.min(affinity::HEAD.saturating_sub(head.len()));
        head.extend(host::buffer_range(BufferType::HttpResponseBody, 0, want));
        if !self.remember_response(target, &head, now.ms()) {
            passing.response_head = Some(head);
        }
    }

    /// Looks at a passing chunk of a successful answer: token usage and the cache copy.
    fn observe_chunk(
        &mut self,
        passing: &mut Passing,
        body_size: usize,
        end_of_stream: bool,
        now: &Now,
    ) {
        let max_cache = self.cache_settings().map_or(0, |c| c.max_body_bytes);
        if let Some(buf) = &mut passing.cache_body {
            if buf.len() + body_size > max_cache {
                passing.cache_body = None;
            }
        }
        let chunk = if passing.cache_body.is_some() {
            host::buffer(BufferType::HttpResponseBody, body_size)
        } else if passing.usage.is_some() && body_size > 0 {
            let take = body_size.min(usage::TAIL);
            host::buffer_range(BufferType::HttpResponseBody, body_size - take, take)
        } else {
            Vec::new()
        };
        if let Some(scanner) = &mut passing.usage {
            scanner.push(&chunk);
        }
        self.read_response_id(passing, body_size, now);
        if let Some(buf) = &mut passing.cache_body {
            buf.extend_from_slice(&chunk);
        }
        if end_of_stream {
            if let Some(target) = passing.target {
                let tokens = passing.usage.take().as_ref().and_then(UsageScanner::finish);
                let copy = passing.cache_body.take();
                let copy = copy.as_deref().map(|b| (b, "application/json"));
                self.finish_success(target, tokens, copy, now);
            }
        }
    }
}
