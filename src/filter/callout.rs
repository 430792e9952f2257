//! Retries and failovers after the routed attempt: each one an HTTP callout to the target's
//! cluster, carrying the client's headers and the target's body, and its answer read back.

use std::time::Duration;

use proxy_wasm::types::{BufferType, MapType};

use super::exchange::{Answer, Exchange, Flow, Phase, Turn};
use super::host::{self, Now};
use crate::policy::chain::Chain;
use crate::policy::judge;
use crate::policy::retry_after;
use crate::quote;
use crate::request::body::Body;
use crate::request::intake::Kind;
use crate::target::forward;
use crate::target::provider;
use crate::target::rewrite;

impl Exchange {
    /// Sends the next attempt to `target` as a callout. A callout the host refuses (e.g. an
    /// unknown cluster) counts as an unreachable target.
    pub(super) fn attempt(
        &mut self,
        chain: Chain,
        target: usize,
        timeout: Duration,
        now: u64,
    ) -> Turn {
        self.begin_attempt(target, timeout, now);
        match self.dispatch(target, timeout, now) {
            Some(token) => {
                // So the access log shows the failover even if the client leaves before the end.
                let name = self.target_name(target).to_string();
                self.record_state(&name, chain.attempts(), chain.failed_over());
                self.phase = Phase::Callout { chain, token };
                Turn {
                    flow: Flow::Hold,
                    wait: None,
                    callout: Some(token),
                }
            }
            None => {
                log::warn!(
                    "{} could not dispatch to target={} (is cluster {} defined?)",
                    self.tag(),
                    self.target_name(target),
                    quote(self.target(target).map_or("", |t| t.cluster.as_str()))
                );
                let refused = Answer {
                    status: None,
                    source: judge::Source::Envoy { timeout: false },
                    content_type: None,
                    retry_after: None,
                    body: Vec::new(),
                    headers: None,
                };
                self.decide(chain, refused, now)
            }
        }
    }

    /// The callout to target `i`: its address, credential and body, the client's headers.
    fn dispatch(&self, i: usize, timeout: Duration, now: u64) -> Option<u32> {
        let t = self.target(i)?;
        if let Some(Kind::Resource(resource)) = &self.request.kind {
            // A probe for a stored response: the same request, addressed for this target.
            let address = provider::resource_address(t, resource, &self.request.client_path);
            let (name, value) = self.rt.credential(i, now)?;
            let method = resource.action.method();
            let headers = forward::callout(
                method,
                &address,
                (name, value.as_str()),
                (method == "POST").then_some("0"),
                &self.request.forwarded,
            );
            return host::dispatch(&t.cluster, &headers, &[], timeout).ok();
        }
        let op = self.operation()?;
        let step = self.step(i)?;
        let model = self.model_for(i);
        let address = provider::address(t, Some(op), model, &self.request.client_path).ok()?;
        let changed = self
            .body
            .as_ref()
            .and_then(|b| rewrite::body_for_step(t, step, op, b));
        let body = changed
            .as_deref()
            .or(self.body.as_ref().map(Body::raw))
            .unwrap_or_default();
        let (name, value) = self.rt.credential(i, now)?;
        let length = body.len().to_string();
        let headers = forward::callout(
            "POST",
            &address,
            (name, value.as_str()),
            Some(&length),
            &self.request.forwarded,
        );
        host::dispatch(&t.cluster, &headers, body, timeout).ok()
    }

    pub fn on_callout_response(&mut self, token: u32, body_size: usize, now: &Now) -> Turn {
        let chain = match self.take_phase() {
            Phase::Callout { chain, token: t } if t == token => chain,
            phase => {
                self.phase = phase;
                log::debug!("{} ignoring answer of unknown callout {token}", self.tag());
                return Turn::from(Flow::Hold);
            }
        };
        let now = now.ms();
        let headers = host::headers(MapType::HttpCallResponseHeaders);
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let status = find(":status").and_then(|s| judge::parse_status(&s));
        let content_type = find("content-type");
        let source = judge::callout_source(find(judge::UPSTREAM_SERVICE_TIME).is_some(), status);
        let retry_after = retry_after::parse(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            now / 1000,
        );
        let body = host::buffer(BufferType::HttpCallResponseBody, body_size);
        if let Some(target) = chain.current_target() {
            self.record_limits(target, &headers, now);
        }
        let answer = Answer {
            status,
            source,
            content_type,
            retry_after,
            body,
            headers: Some(headers),
        };
        self.decide(chain, answer, now)
    }
}
