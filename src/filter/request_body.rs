//! An operation's body: read once when complete, checked, answered from the cache if it can be,
//! planned into a chain, and the first attempt sent on through Envoy's route.

use proxy_wasm::types::{Action, BufferType, MapType};

use super::exchange::{Exchange, Phase};
use super::host::{self, Now};
use super::shared;
use crate::answer::affinity::Naming;
use crate::answer::cache;
use crate::answer::reply::Rejection;
use crate::policy::balance;
use crate::policy::chain::{Availability, Chain, Hop};
use crate::policy::plan;
use crate::quote;
use crate::request::azure;
use crate::request::body::{Body, Keep};
use crate::target::forward::{ATTEMPTS_HEADER, CACHE_HEADER, TARGET_HEADER};
use crate::target::rewrite::{self, Operation};

impl Exchange {
    pub fn on_request_body(&mut self, body_size: usize, end_of_stream: bool, now: &Now) -> Action {
        let (Phase::ReadingBody, Some(op)) = (&self.phase, self.operation()) else {
            return Action::Continue;
        };
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
        let config = &self.rt.config;
        let cacheable =
            plan::cache(config, self.request.route, op, self.request.no_cache).is_some();
        let keep = plan::keep(config, &self.steps(), op, cacheable);
        match Body::parse(raw, keep) {
            Ok(body) => self.body = Some(body),
            Err(reason) => {
                log::info!("{} rejected: {reason}", self.tag());
                return self.reject(&Rejection::InvalidBody { reason });
            }
        }
        let body_size = self.become_twin(body_size, keep);
        let now = now.ms();
        if cacheable && self.answer_from_cache(op, now) {
            return Action::Pause;
        }
        self.start_chain(op, body_size, now)
    }

    /// An Azure-shaped request goes on as its OpenAI-shaped twin, whose body names the model its
    /// deployment stands for: that body replaces the client's. Returns the body's size.
    fn become_twin(&mut self, body_size: usize, keep: Keep) -> usize {
        let (Some(shaped), Some(body)) = (&self.request.azure, &self.body) else {
            return body_size;
        };
        let Some(twin) = azure::twin_body(&self.rt.config, shaped, body) else {
            return body_size;
        };
        let Ok(parsed) = Body::parse(twin, keep) else {
            return body_size;
        };
        if !host::replace_buffer(BufferType::HttpRequestBody, body_size, parsed.raw()) {
            return body_size;
        }
        let size = parsed.raw().len();
        host::set_header(
            MapType::HttpRequestHeaders,
            "content-length",
            Some(&size.to_string()),
        );
        self.body = Some(parsed);
        size
    }

    /// The chain of targets that can serve the request, its first attempt sent on.
    fn start_chain(&mut self, op: Operation, body_size: usize, now: u64) -> Action {
        let Some(body) = self.body.as_ref() else {
            return Action::Continue;
        };
        let config = &self.rt.config;
        let steps = self.steps();
        let (mut hops, skipped) = plan::hops(config, &steps, op, &self.request.client_path, body);
        for skip in &skipped {
            log::info!(
                "{} skip target={} reason={} model={}",
                self.tag(),
                self.target_name(skip.target),
                skip.reason.as_str(),
                quote(skip.model.unwrap_or(""))
            );
            self.rt.metrics.unservable(skip.target, skip.reason);
        }
        // An Entra ID target without a valid token (yet) cannot take an attempt.
        let before = hops.len();
        hops.retain(|h| {
            let ok = self.rt.credential(h.target, now).is_some();
            if !ok {
                log::info!(
                    "{} skip target={} reason=no_token",
                    self.tag(),
                    self.target_name(h.target)
                );
                self.rt.metrics.token_skip(h.target);
            }
            ok
        });
        if hops.is_empty() && before > 0 {
            return self.reject(&Rejection::NoCredential);
        }
        let previous = body.previous_response_id.clone();
        if let Some(previous) = previous.as_deref() {
            let owner_hop = self
                .owner_of(previous, now)
                .and_then(|owner| plan::pinned(&hops, owner));
            if let Some(owner_hop) = owner_hop {
                log::info!(
                    "{} pinned to target={} (it holds previous_response_id {})",
                    self.tag(),
                    self.target_name(owner_hop.first().map_or(0, |h| h.target)),
                    quote(previous)
                );
                self.rt.metrics.affinity_pin();
                self.attempting.pinned = true;
                hops = owner_hop;
            } else if hops.len() > 1 {
                self.start_probe(previous, Naming::FollowUp);
                hops = plan::probing(hops, |t| self.availability(t, now));
            }
        }
        let config = &self.rt.config;
        if config.loadbalance && !self.attempting.pinned && self.owner_probe.is_none() {
            hops = self.balance(hops, now);
        }
        // A pinned request goes to its owner even while it cools (no other target has the
        // response); a probe's order already put the cooling targets last.
        let fixed = self.attempting.pinned || self.owner_probe.is_some();
        let availability = |t: usize| {
            if fixed {
                Availability::Ready
            } else {
                self.availability(t, now)
            }
        };
        let started = Chain::start_with(
            hops,
            now,
            config.deadline,
            config.max_retry_wait,
            availability,
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
        for &skipped in &first.skipped {
            self.note_skip(skipped, now);
        }
        if let Some(shared) = self.route_streamed(op, &chain, first.timeout, now, body_size) {
            self.phase = Phase::StreamRouted { chain, shared };
            return Action::Continue;
        }
        let new_body = match (
            self.target(first.target),
            self.step(first.target),
            &self.body,
        ) {
            (Some(t), Some(step), Some(body)) => rewrite::body_for_step(t, step, op, body),
            _ => None,
        };
        let replaced =
            new_body.filter(|b| host::replace_buffer(BufferType::HttpRequestBody, body_size, b));
        self.address_routed(first.target, Some(first.timeout), now);
        if let Some(b) = replaced {
            let len = b.len().to_string();
            host::set_header(MapType::HttpRequestHeaders, "content-length", Some(&len));
        }
        if !chain.has_more() {
            // No failover possible: the body is not needed any more.
            self.body = None;
        }
        self.begin_attempt(first.target, first.timeout, now);
        self.phase = Phase::Routed { chain };
        Action::Continue
    }

    /// Load balancing: the first attempt to a target picked by weight among the available ones,
    /// the rest of the chain in order after it.
    fn balance(&self, hops: Vec<Hop>, now: u64) -> Vec<Hop> {
        let candidates: Vec<(usize, u32)> = hops
            .iter()
            .enumerate()
            .filter(|(_, h)| self.availability(h.target, now) == Availability::Ready)
            .filter_map(|(i, h)| Some((i, self.target(h.target)?.weight)))
            .filter(|&(_, w)| w > 0)
            .collect();
        let total = balance::total(&candidates);
        if total == 0 {
            return hops;
        }
        let roll = self.rt.rng.borrow_mut().u64(0..total);
        let Some(first) = balance::pick(&candidates, roll) else {
            return hops;
        };
        if let Some(target) = hops.get(first).map(|h| h.target) {
            self.rt.metrics.pick(target);
        }
        balance::first_then_the_rest(hops, first)
    }

    /// Answers from the cache when it holds this request's answer (true); otherwise remembers
    /// the key, so a successful answer is stored under it.
    fn answer_from_cache(&mut self, op: Operation, now: u64) -> bool {
        let config = &self.rt.config;
        let (Some(settings), Some(body), Some(access)) =
            (self.cache_settings(), &self.body, self.request.access)
        else {
            return false;
        };
        if body.stream {
            return false;
        }
        let Some(digest) = cache::key(&settings.scope, access.key_name(config), op, body) else {
            return false;
        };
        let Some(entry) = shared::cache_get(settings, &digest, now) else {
            self.rt.metrics.cache_miss(self.request.route);
            self.cache_key = Some(digest);
            return false;
        };
        self.rt.metrics.cache_hit(self.request.route);
        log::debug!("{} cache hit target={}", self.tag(), entry.target);
        self.phase = Phase::Replied;
        let mut headers = vec![
            ("content-type", entry.content_type.as_str()),
            (CACHE_HEADER, "hit"),
            (TARGET_HEADER, entry.target.as_str()),
            (ATTEMPTS_HEADER, "0"),
        ];
        headers.extend(self.limit_headers.iter().map(|(n, v)| (*n, v.as_str())));
        host::send_reply(200, &headers, &entry.body);
        self.record_state(&entry.target, 0, false);
        true
    }
}
