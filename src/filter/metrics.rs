//! Envoy stats. Names carry their labels as `.route.<r>`, `.target.<name>`, `.status.<class>`,
//! `.from.<a>.to.<b>` segments; the shipped `stats_config` turns them into Prometheus labels. A
//! request on a route is counted in the route's series (`route` label), any other in the series
//! without one; the unlabelled totals count both.

use std::collections::BTreeMap;

use proxy_wasm::types::MetricType;

use super::host;
use crate::answer::usage::Usage;
use crate::config::Config;
use crate::policy::chain::GiveUpReason;
use crate::policy::limits::Kind;
use crate::target::provider::Unservable;

/// The labels of `limited`: key, route, kind.
type LimitedLabels = (Option<usize>, Option<usize>, &'static str);

pub const STATUS_CLASSES: [&str; 6] = ["2xx", "3xx", "4xx", "429", "5xx", "transport"];

const REJECTIONS: [&str; 7] = [
    "credential_unavailable",
    "invalid_api_version",
    "invalid_api_key",
    "permission_denied",
    "request_too_large",
    "invalid_request_body",
    "model_not_available",
];

struct TargetMetrics {
    retries: Option<u32>,
    cooldown_skips: Option<u32>,
    cooldowns_started: Option<u32>,
    credential_rejections: Option<u32>,
    recoveries: Option<u32>,
    deployment_skips: Option<u32>,
    operation_skips: Option<u32>,
    picks: Option<u32>,
    spillovers: Option<u32>,
    spillover_skips: Option<u32>,
    token_fetches_ok: Option<u32>,
    token_fetches_error: Option<u32>,
    token_skips: Option<u32>,
    token_seconds_left: Option<u32>,
    latency_ms: Option<u32>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    /// `[PROBE_RESULTS index]`
    affinity_probes: Vec<Option<u32>>,
}

/// How a probe for a response's owner ended on one target: it had it (2xx), said it does not,
/// failed (cannot tell), or gave another answer (the client's, e.g. a 400 about the request).
pub const PROBE_RESULTS: [&str; 4] = ["found", "not_found", "failed", "answered"];

/// The series of one scope: the plain paths (no `route` label) or one route.
struct Scoped {
    requests: Option<u32>,
    cache_hits: Option<u32>,
    cache_misses: Option<u32>,
    /// `[target * STATUS_CLASSES.len() + class]`
    attempts: Vec<Option<u32>>,
    /// `[from * n + to]`
    fallbacks: Vec<Option<u32>>,
}

pub struct Metrics {
    totals: Scoped,
    exhausted: Option<u32>,
    budget_spent: Option<u32>,
    retries: Option<u32>,
    fallbacks: Option<u32>,
    attempts: Option<u32>,
    affinity_pins: Option<u32>,
    affinity_probes: Option<u32>,
    targets: Vec<TargetMetrics>,
    /// Index 0: the plain paths; 1 + r: route r.
    scopes: Vec<Scoped>,
    rejected: Vec<Option<u32>>,
    /// `limited` by (key, route, kind), for every pair of key and route under a limit.
    limited: BTreeMap<LimitedLabels, Option<u32>>,
}

fn counter(name: &str) -> Option<u32> {
    host::define(MetricType::Counter, &format!("llm_failover.{name}"))
}

impl Scoped {
    /// `label`: "" for the plain paths, `route.<name>.` for a route.
    fn define(label: &str, names: &[&str]) -> Scoped {
        let attempts = names
            .iter()
            .flat_map(|t| {
                STATUS_CLASSES
                    .iter()
                    .map(move |c| counter(&format!("attempts.{label}target.{t}.status.{c}")))
            })
            .collect();
        let fallbacks = names
            .iter()
            .flat_map(|from| {
                names.iter().map(move |to| {
                    (from != to)
                        .then(|| counter(&format!("fallbacks.{label}from.{from}.to.{to}")))?
                })
            })
            .collect();
        let label = label.trim_end_matches('.');
        let scoped = |name: &str| {
            if label.is_empty() {
                None
            } else {
                counter(&format!("{name}.{label}"))
            }
        };
        Scoped {
            requests: scoped("requests"),
            cache_hits: scoped("cache_hits"),
            cache_misses: scoped("cache_misses"),
            attempts,
            fallbacks,
        }
    }
}

impl TargetMetrics {
    /// Kept out of line, like `Metrics::define`.
    #[inline(never)]
    fn define(t: &str) -> TargetMetrics {
        TargetMetrics {
            retries: counter(&format!("retries.target.{t}")),
            cooldown_skips: counter(&format!("cooldown_skips.target.{t}")),
            cooldowns_started: counter(&format!("cooldowns.target.{t}")),
            credential_rejections: counter(&format!("credential_rejections.target.{t}")),
            recoveries: counter(&format!("recoveries.target.{t}")),
            deployment_skips: counter(&format!("deployment_skips.target.{t}")),
            operation_skips: counter(&format!("operation_skips.target.{t}")),
            picks: counter(&format!("picks.target.{t}")),
            spillovers: counter(&format!("spillovers.target.{t}")),
            spillover_skips: counter(&format!("spillover_skips.target.{t}")),
            token_fetches_ok: counter(&format!("token_fetches.target.{t}.result.ok")),
            token_fetches_error: counter(&format!("token_fetches.target.{t}.result.error")),
            token_skips: counter(&format!("token_skips.target.{t}")),
            token_seconds_left: host::define(
                MetricType::Gauge,
                &format!("llm_failover.token_seconds_left.target.{t}"),
            ),
            latency_ms: host::define(
                MetricType::Histogram,
                &format!("llm_failover.attempt_latency_ms.target.{t}"),
            ),
            prompt_tokens: counter(&format!("tokens.target.{t}.kind.prompt")),
            completion_tokens: counter(&format!("tokens.target.{t}.kind.completion")),
            affinity_probes: PROBE_RESULTS
                .iter()
                .map(|r| counter(&format!("affinity_probes.target.{t}.result.{r}")))
                .collect(),
        }
    }
}

impl Metrics {
    /// Kept out of line: inlined into the runtime's set-up, it made a 13 KB function that
    /// Envoy's V8 compiles at start-up (docs/performance.md, "Footprint").
    #[inline(never)]
    pub fn define(config: &Config) -> Metrics {
        let names: Vec<&str> = config.targets.iter().map(|t| t.name.as_str()).collect();
        let targets = names.iter().map(|t| TargetMetrics::define(t)).collect();
        let mut scopes = vec![Scoped::define("", &names)];
        for r in &config.routes {
            scopes.push(Scoped::define(&format!("route.{}.", r.name), &names));
        }
        Metrics {
            totals: Scoped {
                requests: counter("requests"),
                cache_hits: counter("cache_hits"),
                cache_misses: counter("cache_misses"),
                attempts: Vec::new(),
                fallbacks: Vec::new(),
            },
            exhausted: counter("exhausted"),
            budget_spent: counter("deadline_exceeded"),
            retries: counter("retries"),
            fallbacks: counter("fallbacks"),
            attempts: counter("attempts"),
            affinity_pins: counter("affinity_pins"),
            affinity_probes: counter("affinity_probes"),
            targets,
            scopes,
            rejected: REJECTIONS
                .iter()
                .map(|code| counter(&format!("rejected.reason.{code}")))
                .collect(),
            limited: limited(config),
        }
    }

    fn per_target(&self, i: usize, counter: impl Fn(&TargetMetrics) -> Option<u32>, by: u64) {
        host::increment(self.targets.get(i).and_then(counter), by);
    }

    fn scope(&self, route: Option<usize>) -> Option<&Scoped> {
        self.scopes.get(route.map_or(0, |r| r + 1))
    }

    pub fn request(&self, route: Option<usize>) {
        host::increment(self.totals.requests, 1);
        host::increment(self.scope(route).and_then(|s| s.requests), 1);
    }

    pub fn cache_hit(&self, route: Option<usize>) {
        host::increment(self.totals.cache_hits, 1);
        host::increment(self.scope(route).and_then(|s| s.cache_hits), 1);
    }

    pub fn cache_miss(&self, route: Option<usize>) {
        host::increment(self.totals.cache_misses, 1);
        host::increment(self.scope(route).and_then(|s| s.cache_misses), 1);
    }

    pub fn retry(&self, target: usize) {
        host::increment(self.retries, 1);
        self.per_target(target, |m| m.retries, 1);
    }

    pub fn gave_up(&self, reason: GiveUpReason) {
        match reason {
            GiveUpReason::Exhausted => host::increment(self.exhausted, 1),
            GiveUpReason::BudgetSpent => host::increment(self.budget_spent, 1),
        }
    }

    /// A target left out of a request's chain because it cannot serve it.
    pub fn unservable(&self, target: usize, why: Unservable) {
        match why {
            Unservable::NoDeployment => self.per_target(target, |m| m.deployment_skips, 1),
            Unservable::Unsupported => self.per_target(target, |m| m.operation_skips, 1),
        }
    }

    pub fn affinity_pin(&self) {
        host::increment(self.affinity_pins, 1);
    }

    /// One attempt of a probe for a response's owner on `target`, by [`PROBE_RESULTS`].
    pub fn affinity_probe(&self, target: usize, result: &str) {
        let Some(i) = PROBE_RESULTS.iter().position(|r| *r == result) else {
            return;
        };
        host::increment(self.affinity_probes, 1);
        self.per_target(target, |m| m.affinity_probes.get(i).copied().flatten(), 1);
    }

    pub fn cooldown_skip(&self, target: usize) {
        self.per_target(target, |m| m.cooldown_skips, 1);
    }

    /// The load balancer gave a request's first attempt to `target`.
    pub fn pick(&self, target: usize) {
        self.per_target(target, |m| m.picks, 1);
    }

    pub fn spillover(&self, target: usize) {
        self.per_target(target, |m| m.spillovers, 1);
    }

    pub fn spillover_skip(&self, target: usize) {
        self.per_target(target, |m| m.spillover_skips, 1);
    }

    pub fn token_fetch(&self, target: usize, ok: bool) {
        if ok {
            self.per_target(target, |m| m.token_fetches_ok, 1);
        } else {
            self.per_target(target, |m| m.token_fetches_error, 1);
        }
    }

    pub fn token_skip(&self, target: usize) {
        self.per_target(target, |m| m.token_skips, 1);
    }

    pub fn token_seconds_left(&self, target: usize, seconds: u64) {
        host::record(
            self.targets.get(target).and_then(|m| m.token_seconds_left),
            seconds,
        );
    }

    pub fn cooldown_started(&self, target: usize) {
        self.per_target(target, |m| m.cooldowns_started, 1);
    }

    pub fn credential_rejected(&self, target: usize) {
        self.per_target(target, |m| m.credential_rejections, 1);
    }

    pub fn recovered(&self, target: usize) {
        self.per_target(target, |m| m.recoveries, 1);
    }

    pub fn tokens(&self, target: usize, usage: Usage) {
        self.per_target(target, |m| m.prompt_tokens, usage.prompt);
        self.per_target(target, |m| m.completion_tokens, usage.completion);
    }

    pub fn attempt(&self, route: Option<usize>, target: usize, class: &str, latency_ms: u64) {
        host::increment(self.attempts, 1);
        let class = STATUS_CLASSES
            .iter()
            .position(|c| *c == class)
            .unwrap_or(STATUS_CLASSES.len() - 1);
        let at = target * STATUS_CLASSES.len() + class;
        host::increment(
            self.scope(route)
                .and_then(|s| s.attempts.get(at).copied().flatten()),
            1,
        );
        host::record(
            self.targets.get(target).and_then(|t| t.latency_ms),
            latency_ms,
        );
    }

    pub fn fallback(&self, route: Option<usize>, from: usize, to: usize) {
        host::increment(self.fallbacks, 1);
        let at = from * self.targets.len() + to;
        host::increment(
            self.scope(route)
                .and_then(|s| s.fallbacks.get(at).copied().flatten()),
            1,
        );
    }

    /// A request refused by its key's or route's `limits`.
    pub fn limited(&self, key: Option<usize>, route: Option<usize>, kind: Kind) {
        let counter = self.limited.get(&(key, route, kind.as_str()));
        host::increment(counter.copied().flatten(), 1);
    }

    pub fn rejected(&self, code: &str) {
        if let Some(i) = REJECTIONS.iter().position(|c| *c == code) {
            host::increment(self.rejected.get(i).copied().flatten(), 1);
        }
    }
}

/// `limited.[route.<r>.][key.<k>.]kind.<kind>` for every key (or none, without keys) and route
/// (or none, off routes) that a request can be refused with: the key or the route has a limit
/// of that kind, and the key may use the route.
fn limited(config: &Config) -> BTreeMap<LimitedLabels, Option<u32>> {
    let keys: Vec<Option<usize>> = match &config.keys {
        Some(keys) => (0..keys.len()).map(Some).collect(),
        None => vec![None],
    };
    let routes = std::iter::once(None).chain((0..config.routes.len()).map(Some));
    let mut out = BTreeMap::new();
    for route in routes {
        let r = route.and_then(|r| config.routes.get(r));
        for &key in &keys {
            let k = key.and_then(|k| config.keys.as_ref()?.get(k));
            if r.and_then(|r| r.keys.as_ref())
                .is_some_and(|allowed| !key.is_some_and(|k| allowed.contains(&k)))
            {
                continue;
            }
            for kind in Kind::ALL {
                let limited = [k.and_then(|k| k.limits), r.and_then(|r| r.limits)]
                    .iter()
                    .flatten()
                    .any(|l| kind.of(l).is_some());
                if !limited {
                    continue;
                }
                let mut name = "limited.".to_string();
                if let Some(r) = r {
                    name.push_str(&format!("route.{}.", r.name));
                }
                if let Some(k) = k {
                    name.push_str(&format!("key.{}.", k.name));
                }
                name.push_str(&format!("kind.{}", kind.as_str()));
                out.insert((key, route, kind.as_str()), counter(&name));
            }
        }
    }
    out
}
