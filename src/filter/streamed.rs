//! The streamed path of a request (`crate::streamed`): a `"stream": true` request that can fail
//! over is handed to Envoy's router with its plan, and the router's answer (from the first
//! target that answered, or its own reply when none did) is labelled or replaced here. Each
//! attempt is addressed, judged and counted by the upstream filter (`upstream`).

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::types::{BufferType, MapType};

use super::exchange::{Answer, Exchange, Flow, Phase, Tally, Turn};
use super::host::{self, Now};
use super::runtime::Streamed;
use crate::answer::reply::Rejection;
use crate::policy::chain::{Chain, FailureKind, GiveUpReason};
use crate::policy::judge;
use crate::quote;
use crate::request::operation::Operation;
use crate::streamed::{self, Handoff, Plan, Tries};

impl Exchange {
    /// Hands the request to the router when it takes the streamed path (what it shares with its
    /// attempts): its attempts' clusters, the retries and timeouts for it, and the handoff for
    /// the upstream filter. The body goes on as the client sent it; each attempt rewrites its own.
    pub(super) fn route_streamed(
        &mut self,
        op: Operation,
        chain: &Chain,
        timeout: Duration,
        now: u64,
        length: usize,
    ) -> Option<Rc<Streamed>> {
        let body = self.body.as_ref()?;
        // A probe judges each answer itself (a "not found" is no failure to the router).
        if self.owner_probe.is_some() {
            return None;
        }
        // Cheap checks first: most requests do not stream.
        if !streamed::may_take_stream_path(self.config(), op, body.stream) {
            return None;
        }
        let plan: Plan = chain
            .planned(|t| self.availability(t, now))
            .into_iter()
            .map(|(target, tries)| Tries { target, tries })
            .collect();
        if !streamed::takes_stream_path(self.config(), op, body.stream, &plan) {
            return None;
        }
        if streamed::known_unwired(self.rt.unwired_at.get(), now) {
            // Routed to its first target like any request: a healthy answer streams, and only
            // a failover (a callout) arrives whole.
            return None;
        }
        let left = chain.remaining(now);
        let router_headers = streamed::router_headers(self.config(), &plan, timeout, left);
        let handoff = Handoff {
            ctx: self.context_id,
            id: self.request.id.clone(),
            route: self.request.route,
            op,
            path: self.request.client_path.clone(),
            model: body.model.clone(),
            plan,
            per_try_ms: crate::duration::millis(timeout.min(left)),
            deadline_ms: now.saturating_add(crate::duration::millis(left)),
            length: length as u64,
            shape: self.request.shape,
            pinned: self.attempting.pinned,
        };
        // Shared first: a request that cannot be handed over is routed like any other, with
        // none of the streamed path's headers.
        let shared = self.rt.share_streamed(handoff)?;
        let map = MapType::HttpRequestHeaders;
        let client = self.request.client_has;
        // The client's credential never goes on: each attempt gets its target's.
        let own = [
            (client.authorization, "authorization"),
            (client.api_key, "api-key"),
            (client.accept_encoding, "accept-encoding"),
        ];
        for (_, name) in own.iter().filter(|(present, _)| *present) {
            host::set_header(map, name, None);
        }
        for name in client.controls() {
            host::set_header(map, name, None);
        }
        for (name, value) in router_headers {
            host::set_header(map, name, Some(&value));
        }
        // An Azure-shaped request's body is already its twin's copy.
        if streamed::compacts_body(length) && self.request.azure.is_none() {
            host::replace_buffer(BufferType::HttpRequestBody, length, body.raw());
        }
        let key = streamed::handoff_key(self.rt.root, self.context_id);
        host::set_filter_state(streamed::HANDOFF_STATE, &key);
        self.attempting.started_ms = now;
        Some(shared)
    }

    /// The router's answer to a streamed request: the first answer a target gave that is not a
    /// failure, the last failure when the plan is spent, or its own reply when no attempt
    /// answered.
    pub(super) fn on_stream_answer(
        &mut self,
        chain: Chain,
        shared: &Streamed,
        end_of_stream: bool,
        now: &Now,
    ) -> Turn {
        let details = host::property_text(&["response", "code_details"]).unwrap_or_default();
        if details == "cluster_not_found" {
            return self.stream_clusters_missing(chain, now.ms());
        }
        let record = shared.record.get();
        let first = chain.current_target();
        let via_upstream = details == "via_upstream";
        if record.is_none() && via_upstream {
            log::error!(
                "{} a streamed request was answered without the upstream filter: the router needs \
                 the llm_failover upstream filter (README, streamed failover)",
                self.tag()
            );
        }
        let (served, attempts, failed_over) = match record {
            Some(r) => (Some(r.target), r.attempts, r.failed_over),
            None => (first, 1, false),
        };
        let last = served.unwrap_or(0);
        let refused = if via_upstream {
            None
        } else {
            host::property_text(&[streamed::REFUSED_STATE])
        };
        let deadline_spent = refused.as_deref() == Some(Rejection::DeadlineExceeded.code());
        if refused.is_some() && !deadline_spent {
            // The upstream filter's own error (it logged why): passed on as it is.
            self.add_outcome_headers(served, attempts, failed_over);
            self.pass_answer(served, None);
            return Turn::from(Flow::Resume);
        }
        if !via_upstream {
            // No attempt answered: reset, refused, timed out, or the deadline ran out.
            let (failure, reason) = match details.as_str() {
                // The upstream filter did not start an attempt after the deadline.
                // (the last attempt's answer, if it had one, is gone: the client gets 504
                // deadline_exceeded).
                _ if deadline_spent => (FailureKind::Timeout, GiveUpReason::BudgetSpent),
                "response_timeout" => (FailureKind::Timeout, GiveUpReason::BudgetSpent),
                d if d.starts_with("upstream_per_try_timeout") => {
                    (FailureKind::Timeout, GiveUpReason::Exhausted)
                }
                _ => (FailureKind::Unreachable, GiveUpReason::Exhausted),
            };
            self.give_up(
                reason,
                attempts,
                last,
                &judge::describe(None, Some(failure)),
            );
            let tally = Tally {
                attempts,
                failed_over,
                budget_spent: reason == GiveUpReason::BudgetSpent,
            };
            if end_of_stream {
                self.deliver_spent(served, failure, tally, now.ms());
                return Turn::from(Flow::Hold);
            }
            let budget_spent = tally.budget_spent;
            self.phase = Phase::StreamSpent {
                served,
                failure,
                budget_spent,
                attempts,
                failed_over,
            };
            return Turn::from(Flow::Hold);
        }
        let status = host::header(MapType::HttpResponseHeaders, ":status")
            .and_then(|s| judge::parse_status(&s));
        if status.is_some_and(|s| streamed::fails_over(self.config(), s)) {
            self.give_up(
                GiveUpReason::Exhausted,
                attempts,
                last,
                &judge::describe(status, None),
            );
        }
        self.add_outcome_headers(served, attempts, failed_over);
        self.pass_answer(served, status);
        Turn::from(Flow::Resume)
    }

    /// The router's own reply, complete: replaced by the filter's error.
    pub(super) fn on_stream_spent_body(&mut self, end_of_stream: bool, now: &Now) -> Flow {
        let Phase::StreamSpent {
            served,
            failure,
            budget_spent,
            attempts,
            failed_over,
        } = self.phase
        else {
            return Flow::Resume;
        };
        if end_of_stream {
            let tally = Tally {
                attempts,
                failed_over,
                budget_spent,
            };
            self.deliver_spent(served, failure, tally, now.ms());
        }
        Flow::Hold
    }

    fn deliver_spent(
        &mut self,
        served: Option<usize>,
        failure: FailureKind,
        tally: Tally,
        now: u64,
    ) {
        let answer = Answer {
            status: None,
            source: judge::Source::Envoy {
                timeout: failure == FailureKind::Timeout,
            },
            content_type: None,
            retry_after: None,
            body: Vec::new(),
            headers: None,
        };
        // A transport failure: always the filter's own reply.
        self.deliver(answer, served.unwrap_or(0), Some(failure), tally, now);
    }

    /// The route did not take the attempts' clusters from the list (it read
    /// `x-llm-failover-cluster` as one cluster name): the request fails over through callouts
    /// (its fallback's answer then arrives whole), this worker routes the next streamed requests
    /// like any request for a while (a healthy answer streams), and the operator is told once
    /// per worker.
    fn stream_clusters_missing(&mut self, chain: Chain, now: u64) -> Turn {
        let cluster = host::header(
            MapType::HttpRequestHeaders,
            crate::target::forward::CLUSTER_HEADER,
        )
        .and_then(|v| String::from_utf8(v).ok())
        .unwrap_or_default();
        self.rt.unwired_at.set(Some(now));
        if !self.rt.stream_warned.replace(true) {
            log::warn!(
                "{} cluster {} is not defined in Envoy: streamed requests fail over through \
                 callouts until the route takes each attempt's cluster from that list (README, \
                 streamed failover), or set streaming.failover to \"callout\"",
                self.tag(),
                quote(&cluster)
            );
        }
        let Some(target) = chain.current_target() else {
            self.phase = Phase::Delivered;
            return Turn::from(Flow::Resume);
        };
        let left = chain.remaining(now);
        let timeout = self.step(target).map_or(left, |s| s.timeout.min(left));
        self.attempt(chain, target, timeout, now)
    }
}
