//! What the client gets: the routed answer labelled and let through, a callout's answer in its
//! place, or one of the filter's own errors; then the outcome headers, the access-log filter
//! state, token usage and the cache entry of a success.

use proxy_wasm::types::MapType;

use super::exchange::{Answer, Exchange, Flow, Phase, Tally};
use super::host::{self, Now};
use super::shared;
use crate::answer::affinity;
use crate::answer::cache::Entry;
use crate::answer::reply::Rejection;
use crate::answer::usage::{self, Usage, UsageScanner};
use crate::duration::millis;
use crate::policy::chain::FailureKind;
use crate::target::forward::{self, ATTEMPTS_HEADER, CACHE_HEADER, TARGET_HEADER};

impl Exchange {
    /// Gives the client `answer`, `target`'s: the routed response resumes; a callout's answer
    /// replaces it; a transport failure becomes an OpenAI-shaped error.
    pub(super) fn deliver(
        &mut self,
        answer: Answer,
        target: usize,
        failure: Option<FailureKind>,
        chain: Tally,
        now: u64,
    ) -> Flow {
        let Tally {
            attempts,
            failed_over,
            budget_spent,
        } = chain;
        let name = self.target_name(target).to_string();
        self.record_state(&name, attempts, failed_over);
        let attempts_text = attempts.to_string();
        let mut ours: Vec<(&str, &str)> = vec![
            (TARGET_HEADER, name.as_str()),
            (ATTEMPTS_HEADER, attempts_text.as_str()),
        ];
        if self.cache_settings().is_some() {
            ours.push((CACHE_HEADER, "miss"));
        }
        // The filter's replies carry the limits' headers with its own; the routed response gets
        // them from `label_limits`.
        let limit_headers = self.limit_headers.clone();
        let limits = limit_headers.iter().map(|(n, v)| (*n, v.as_str()));
        if let Some(rejection) =
            failure.and_then(|k| Rejection::for_failure(k, budget_spent, &name))
        {
            let reply = rejection.reply(self.request.shape);
            ours.extend(limits);
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
            self.label_limits();
            self.phase = Phase::Delivered;
            return Flow::Resume;
        };
        let status = u32::from(answer.status.unwrap_or(502));
        if failure.is_none() && status == 200 && self.operation().is_some() {
            let content_type = answer
                .content_type
                .as_deref()
                .and_then(|c| std::str::from_utf8(c).ok())
                .unwrap_or("application/json")
                .to_string();
            if headers.iter().any(|(n, _)| n == "content-encoding") {
                self.cache_key = None;
            }
            if self.creates_response() {
                let head = answer.body.get(..affinity::HEAD).unwrap_or(&answer.body);
                self.remember_response(target, head, now);
            }
            let tokens = usage::from_body(&answer.body);
            let copy = Some((answer.body.as_slice(), content_type.as_str()));
            self.finish_success(target, tokens, copy, &Now::at(now));
        }
        let mut out: Vec<(&str, &str)> = headers
            .iter()
            .filter(|(n, _)| forward::copied_to_client(n) && !self.replaced_by_limits(n))
            .filter_map(|(n, v)| std::str::from_utf8(v).ok().map(|v| (n.as_str(), v)))
            .collect();
        out.extend(ours.iter().copied());
        out.extend(limits);
        self.phase = Phase::Replied;
        host::send_reply(status, &out, &answer.body);
        Flow::Replied
    }

    /// Labels the routed answer that is passing through: who served it (`target`), after how
    /// many attempts.
    pub(super) fn add_outcome_headers(
        &mut self,
        target: Option<usize>,
        attempts: u32,
        failed_over: bool,
    ) {
        let map = MapType::HttpResponseHeaders;
        let name = target.map_or("", |t| self.target_name(t)).to_string();
        if !name.is_empty() {
            host::set_header(map, TARGET_HEADER, Some(&name));
        }
        host::set_header(map, ATTEMPTS_HEADER, Some(&attempts.to_string()));
        self.label_limits();
        self.record_state(&name, attempts, failed_over);
        if self.cache_settings().is_some() {
            host::set_header(map, CACHE_HEADER, Some("miss"));
        }
    }

    /// Counts the `tokens` and fills the cache once a successful answer of `target` is
    /// complete (`copy`: its body and content type, when the cache may take it).
    pub(super) fn finish_success(
        &mut self,
        target: usize,
        tokens: Option<Usage>,
        copy: Option<(&[u8], &str)>,
        now: &Now,
    ) {
        if let Some(u) = tokens {
            self.spend(target, u, now);
        }
        let (Some(settings), Some(digest)) = (self.cache_settings(), self.cache_key) else {
            return;
        };
        let Some((cached, content_type)) =
            copy.filter(|(b, _)| b.len() <= settings.max_body_bytes && !b.is_empty())
        else {
            return;
        };
        let entry = Entry {
            digest,
            expires_ms: now.ms().saturating_add(millis(settings.ttl)),
            target: self.target_name(target).to_string(),
            content_type: content_type.to_string(),
            body: cached.to_vec(),
        };
        shared::cache_put(settings, &entry);
    }

    /// Counts the tokens an answer of `target` spent, and charges them to the token limits.
    fn spend(&self, target: usize, u: Usage, now: &Now) {
        self.rt.metrics.tokens(target, u);
        self.charge_limits(u.prompt.saturating_add(u.completion), now.ms());
    }

    /// Filter state for the access log: `%FILTER_STATE(wasm.llm_failover.<field>:PLAIN)%`.
    /// Each value is written when it differs from the last written (a host call each).
    pub(super) fn record_state(&mut self, target: &str, attempts: u32, failed_over: bool) {
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

    pub fn on_log(&mut self, now: &Now) {
        self.release_probe();
        // A client that stops reading at the stream's `[DONE]` may close before Envoy passes the
        // answer's end on (the SDKs do): the usage it was sent was still spent upstream.
        if let Phase::Streaming(passing) = &mut self.phase {
            let tokens = passing.usage.take().as_ref().and_then(UsageScanner::finish);
            if let (Some(target), Some(u)) = (passing.target, tokens) {
                self.spend(target, u, now);
            }
        }
        if let Phase::Callout { .. } | Phase::Waiting { .. } = self.phase {
            log::debug!("{} client went away during failover", self.tag());
        }
    }
}
