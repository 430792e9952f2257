//! Request headers: read once, the gateway key checked, and the request classified. An operation
//! is held until its body is complete (`request_body`); a pass-through is sent on at once to the
//! first allowed target.

use proxy_wasm::types::{Action, MapType};

use super::exchange::{Exchange, Phase};
use super::host::{self, Now};
use crate::answer::affinity::Naming;
use crate::answer::reply::Rejection;
use crate::policy::chain::{Availability, Chain};
use crate::policy::plan;
use crate::request::intake::{self, Kind};
use crate::target::forward::{self, ClientHeaders};

impl Exchange {
    pub fn on_request_headers(&mut self, end_of_stream: bool, now: &Now) -> Action {
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
        let understood = intake::understand(&self.rt.config, text(":method"), text(":path"));
        let route = understood.route;
        let shape = understood.shape();
        let on_route = route.and_then(|i| self.rt.config.routes.get(i));
        let kind = understood.kind;
        let held = matches!(kind, Kind::Operation(_));
        let r = &mut self.request;
        r.route = route;
        r.sent_path = text(":path").to_string();
        r.shape = shape;
        r.client_path = understood.client_path;
        let bad_version = match understood.azure {
            Some(Ok(shaped)) => {
                r.azure = Some(shaped);
                None
            }
            Some(Err(rejection)) => Some(rejection),
            None => None,
        };
        r.id = intake::request_id(get("x-request-id"));
        r.no_cache = intake::bypasses_cache(get("cache-control"));
        r.client_has = ClientHeaders {
            authorization: get("authorization").is_some(),
            api_key: get("api-key").is_some(),
            accept_encoding: get("accept-encoding").is_some(),
            controls: 0,
        };
        r.kind = Some(kind.clone());
        let access = intake::authorize(
            &self.rt.config,
            on_route,
            get("authorization"),
            get("api-key"),
        );
        for (name, value) in headers {
            if name.starts_with("x-envoy-") {
                self.request.client_has.controls |= forward::control_bit(&name);
            }
            if forward::forwarded_to_callouts(&name) {
                if let Ok(v) = String::from_utf8(value) {
                    self.request.forwarded.push((name, v));
                }
            }
        }
        self.rt.metrics.request(route);
        if let Some(name) = self.route_name() {
            host::set_filter_state("llm_failover.route", name);
        }

        match access {
            Ok(access) => {
                if let Some(key) = access
                    .key
                    .and_then(|k| self.rt.config.keys.as_ref()?.get(k))
                {
                    // A descriptor source for Envoy's own rate limiting (docs/deployment.md).
                    host::set_filter_state("llm_failover.key", &key.name);
                }
                self.request.access = Some(access);
                if let Some(refused) = self.check_limits(now) {
                    return refused;
                }
            }
            Err(rejection @ Rejection::Forbidden { .. }) => {
                log::info!(
                    "{} rejected: the gateway key may not use this route",
                    self.tag()
                );
                return self.reject(&rejection);
            }
            Err(rejection) => {
                log::info!("{} rejected: missing or invalid gateway key", self.tag());
                return self.reject(&rejection);
            }
        }
        if let Some(rejection) = bad_version {
            log::info!(
                "{} rejected: the Azure-shaped request's api-version is missing or not one",
                self.tag()
            );
            return self.reject(&rejection);
        }
        match kind {
            // Held: the body decides where it goes (`on_request_body` sets the cluster).
            Kind::Operation(_) if end_of_stream => self.reject(&Rejection::InvalidBody {
                reason: "the body is empty".to_string(),
            }),
            _ if held => {
                self.phase = Phase::ReadingBody;
                Action::Pause
            }
            Kind::Resource(resource) => {
                match self.owner_of(&resource.id, now.ms()) {
                    Some(owner) => self.pass_through(Some(owner), now),
                    // Probed only when there is no body to replay on the next target.
                    None if end_of_stream && self.targets().len() > 1 => {
                        self.probe_resource(&resource.id, now)
                    }
                    None => self.pass_through(None, now),
                }
                Action::Continue
            }
            Kind::Operation(_) | Kind::PassThrough => {
                self.pass_through(None, now);
                Action::Continue
            }
        }
    }

    /// A request on a stored response whose owner is not known here: down the chain, ready
    /// targets first, until one has it.
    fn probe_resource(&mut self, id: &str, clock: &Now) {
        let now = clock.ms();
        self.start_probe(id, Naming::Path);
        let hops = plan::resource_probe(self.config(), self.targets());
        let hops = plan::probing(hops, |t| self.availability(t, now));
        let config = self.config();
        let started = Chain::start_with(hops, now, config.deadline, config.max_retry_wait, |_| {
            Availability::Ready
        });
        let Some((chain, first)) = started else {
            return self.pass_through(None, clock);
        };
        self.address_routed(first.target, Some(first.timeout), now);
        self.begin_attempt(first.target, first.timeout, now);
        self.phase = Phase::Routed { chain };
    }

    /// Not an operation the filter rewrites: once to `target` (a stored response's owner) or
    /// the first allowed target, with its host and credential. The client never chooses the
    /// cluster: it is set here too.
    fn pass_through(&mut self, target: Option<usize>, now: &Now) {
        let first = plan::pass_through(self.config(), self.targets()).map(|hop| hop.target);
        let target = first.map(|first| target.unwrap_or(first));
        if let Some(target) = target {
            self.address_routed(target, None, now.ms());
        }
        self.phase = Phase::Passthrough { target };
    }
}
