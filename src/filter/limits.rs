//! Limits per gateway key and per route: checked with the request's headers, before anything is
//! sent upstream (a refusal is the filter's own 429, never an attempt); tokens charged from the
//! answer's usage; every answer labelled with the `x-ratelimit-*` headers of its limits. The
//! arithmetic is `policy::limits`, the buckets live in shared data (`shared`).

use std::rc::Rc;

use proxy_wasm::types::{Action, MapType};

use super::exchange::{Exchange, Phase};
use super::host::{self, Now};
use super::shared;
use crate::answer::reply::Rejection;
use crate::config::{Config, Limit, Limits};
use crate::policy::limits::{self, Admission, Kind, Reading};

/// One key's or one route's limits, with the names of their shared buckets.
pub struct LimitScope {
    /// Whose limit, as the 429's message says it: `gateway key 'app'`, `route 'chat'`.
    by: String,
    buckets: Vec<(Kind, Limit, String)>,
}

/// Every key's and route's limits (`None`: that key or route has none), built once.
pub struct LimitScopes {
    keys: Vec<Option<LimitScope>>,
    routes: Vec<Option<LimitScope>>,
}

impl LimitScope {
    fn new(by: String, scope: &str, limits: &Option<Limits>) -> Option<LimitScope> {
        let limits = limits.as_ref()?;
        let buckets = Kind::ALL
            .iter()
            .filter_map(|&kind| Some((kind, kind.of(limits)?, shared::limit_key(scope, kind))))
            .collect();
        Some(LimitScope { by, buckets })
    }
}

impl LimitScopes {
    pub fn new(config: &Config) -> LimitScopes {
        let keys = config.keys.as_deref().unwrap_or_default().iter().map(|k| {
            let by = format!("gateway key '{}'", k.name);
            LimitScope::new(by, &format!("key.{}", k.name), &k.limits)
        });
        let routes = config.routes.iter().map(|r| {
            let by = format!("route '{}'", r.name);
            LimitScope::new(by, &format!("route.{}", r.name), &r.limits)
        });
        let scopes = LimitScopes {
            keys: keys.collect(),
            routes: routes.collect(),
        };
        // Created before any request, so every update is a compare-and-swap.
        for scope in scopes.keys.iter().chain(&scopes.routes).flatten() {
            for (_, _, key) in &scope.buckets {
                shared::limit_create(key);
            }
        }
        scopes
    }

    /// The limits a request with this key on this route is under: its key's, then its route's.
    fn of(&self, key: Option<usize>, route: Option<usize>) -> impl Iterator<Item = &LimitScope> {
        let key = key.and_then(|k| self.keys.get(k)?.as_ref());
        let route = route.and_then(|r| self.routes.get(r)?.as_ref());
        key.into_iter().chain(route)
    }
}

impl Exchange {
    fn key_index(&self) -> Option<usize> {
        self.request.access.and_then(|a| a.key)
    }

    /// Admits the request under its key's and route's limits (`None`), or answers 429.
    pub(super) fn check_limits(&mut self, now: &Now) -> Option<Action> {
        let rt = Rc::clone(&self.rt);
        let (key, route) = (self.key_index(), self.request.route);
        let buckets: Vec<(&LimitScope, &(Kind, Limit, String))> = rt
            .limits
            .of(key, route)
            .flat_map(|s| s.buckets.iter().map(move |b| (s, b)))
            .collect();
        if buckets.is_empty() {
            return None;
        }
        let now = now.ms();
        // Token limits first: they spend nothing, so refusing there leaves nothing to give back.
        let order = [Kind::Tokens, Kind::Requests]
            .into_iter()
            .flat_map(|kind| buckets.iter().filter(move |(_, b)| b.0 == kind));
        let mut shown: Vec<(Kind, Reading)> = Vec::with_capacity(buckets.len());
        let mut spent: Vec<(&str, &Limit)> = Vec::new();
        for (scope, (kind, limit, bucket)) in order {
            match shared::limit_admit(bucket, limit, *kind, now) {
                Admission::Allowed { reading, .. } => {
                    if *kind == Kind::Requests {
                        spent.push((bucket, limit));
                    }
                    shown.push((*kind, reading));
                }
                Admission::Denied { wait, reading } => {
                    for (bucket, limit) in spent {
                        shared::limit_refund(bucket, limit);
                    }
                    return Some(self.refuse(scope, *kind, limit, wait, &reading));
                }
            }
        }
        self.limit_headers = Kind::ALL
            .iter()
            .filter_map(|&kind| {
                let of_kind = shown.iter().filter(|(k, _)| *k == kind).map(|(_, r)| *r);
                Some(limits::headers(kind, &limits::tightest(of_kind)?))
            })
            .flatten()
            .collect();
        None
    }

    /// The filter's own 429, with what OpenAI's SDKs read to back off.
    fn refuse(
        &mut self,
        scope: &LimitScope,
        kind: Kind,
        limit: &Limit,
        wait: std::time::Duration,
        reading: &Reading,
    ) -> Action {
        self.rt
            .metrics
            .limited(self.key_index(), self.request.route, kind);
        log::info!(
            "{} rejected: {} is over its {} limit for {}ms",
            self.tag(),
            scope.by,
            kind.as_str(),
            crate::duration::millis(wait)
        );
        let rejection = Rejection::RateLimited {
            kind: kind.as_str(),
            by: scope.by.clone(),
            limit: limit.count,
            per: limits::go_duration(limit.per),
            retry_in: limits::go_duration(wait),
        };
        let reply = rejection.reply(self.request.shape);
        let retry_after = limits::retry_after_secs(wait).to_string();
        let retry_after_ms = crate::duration::millis(wait).max(1).to_string();
        let shown = limits::headers(kind, reading);
        let mut headers: Vec<(&str, &str)> = vec![
            ("content-type", "application/json"),
            ("retry-after", &retry_after),
            ("retry-after-ms", &retry_after_ms),
        ];
        headers.extend(shown.iter().map(|(n, v)| (*n, v.as_str())));
        self.phase = Phase::Replied;
        host::send_reply(reply.status, &headers, &reply.body);
        Action::Pause
    }

    /// Charges an answer's tokens to the token limits of its key and route.
    pub(super) fn charge_limits(&self, tokens: u64, now: u64) {
        for scope in self.rt.limits.of(self.key_index(), self.request.route) {
            for (kind, limit, bucket) in &scope.buckets {
                if *kind == Kind::Tokens {
                    shared::limit_charge(bucket, limit, tokens, now);
                }
            }
        }
    }

    /// Labels the response passing through with this request's limits, in place of the
    /// provider's own `x-ratelimit-*` headers (which describe the gateway's provider account).
    pub(super) fn label_limits(&self) {
        if self.limit_headers.is_empty() {
            return;
        }
        let map = MapType::HttpResponseHeaders;
        for name in limits::HEADER_NAMES {
            let ours = self.limit_headers.iter().find(|(n, _)| *n == name);
            host::set_header(map, name, ours.map(|(_, v)| v.as_str()));
        }
    }

    /// Whether an upstream header is one of the `x-ratelimit-*` this request's own replace.
    pub(super) fn replaced_by_limits(&self, name: &str) -> bool {
        !self.limit_headers.is_empty() && limits::HEADER_NAMES.contains(&name)
    }
}
