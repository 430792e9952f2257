//! Envoy stats. Names carry their labels as `.target.<name>`, `.status.<class>`, `.from.<a>.to.<b>`
//! segments; the shipped `stats_config` turns them into Prometheus labels.

use proxy_wasm::types::MetricType;

use super::host;
use crate::chain::GiveUpReason;
use crate::config::Config;
use crate::provider::Unservable;
use crate::usage::Usage;

pub const STATUS_CLASSES: [&str; 6] = ["2xx", "3xx", "4xx", "429", "5xx", "transport"];

struct TargetMetrics {
    attempts: Vec<Option<u32>>,
    retries: Option<u32>,
    cooldown_skips: Option<u32>,
    cooldowns_started: Option<u32>,
    deployment_skips: Option<u32>,
    operation_skips: Option<u32>,
    latency_ms: Option<u32>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
}

pub struct Metrics {
    requests: Option<u32>,
    exhausted: Option<u32>,
    budget_spent: Option<u32>,
    cache_hits: Option<u32>,
    cache_misses: Option<u32>,
    retries: Option<u32>,
    fallbacks: Option<u32>,
    attempts: Option<u32>,
    affinity_pins: Option<u32>,
    targets: Vec<TargetMetrics>,
    /// `[from * n + to]`
    fallback_pairs: Vec<Option<u32>>,
    rejected: Vec<(&'static str, Option<u32>)>,
}

fn counter(name: &str) -> Option<u32> {
    host::define(MetricType::Counter, &format!("llm_failover.{name}"))
}

impl Metrics {
    pub fn define(config: &Config) -> Metrics {
        let names: Vec<&str> = config.targets.iter().map(|t| t.name.as_str()).collect();
        let targets = names
            .iter()
            .map(|t| TargetMetrics {
                attempts: STATUS_CLASSES
                    .iter()
                    .map(|c| counter(&format!("attempts.target.{t}.status.{c}")))
                    .collect(),
                retries: counter(&format!("retries.target.{t}")),
                cooldown_skips: counter(&format!("cooldown_skips.target.{t}")),
                cooldowns_started: counter(&format!("cooldowns.target.{t}")),
                deployment_skips: counter(&format!("deployment_skips.target.{t}")),
                operation_skips: counter(&format!("operation_skips.target.{t}")),
                latency_ms: host::define(
                    MetricType::Histogram,
                    &format!("llm_failover.attempt_latency_ms.target.{t}"),
                ),
                prompt_tokens: counter(&format!("tokens.target.{t}.kind.prompt")),
                completion_tokens: counter(&format!("tokens.target.{t}.kind.completion")),
            })
            .collect();
        let mut fallback_pairs = Vec::with_capacity(names.len() * names.len());
        for from in &names {
            for to in &names {
                fallback_pairs.push(if from == to {
                    None
                } else {
                    counter(&format!("fallbacks.from.{from}.to.{to}"))
                });
            }
        }
        let rejected = [
            "invalid_api_key",
            "request_too_large",
            "invalid_request_body",
            "model_not_available",
        ]
        .into_iter()
        .map(|code| (code, counter(&format!("rejected.reason.{code}"))))
        .collect();
        Metrics {
            requests: counter("requests"),
            exhausted: counter("exhausted"),
            budget_spent: counter("deadline_exceeded"),
            cache_hits: counter("cache_hits"),
            cache_misses: counter("cache_misses"),
            retries: counter("retries"),
            fallbacks: counter("fallbacks"),
            attempts: counter("attempts"),
            affinity_pins: counter("affinity_pins"),
            targets,
            fallback_pairs,
            rejected,
        }
    }

    fn target(&self, i: usize) -> Option<&TargetMetrics> {
        self.targets.get(i)
    }

    fn per_target(&self, i: usize, counter: impl Fn(&TargetMetrics) -> Option<u32>, by: u64) {
        host::increment(self.target(i).and_then(counter), by);
    }

    pub fn request(&self) {
        host::increment(self.requests, 1);
    }

    pub fn cache_hit(&self) {
        host::increment(self.cache_hits, 1);
    }

    pub fn cache_miss(&self) {
        host::increment(self.cache_misses, 1);
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

    pub fn cooldown_skip(&self, target: usize) {
        self.per_target(target, |m| m.cooldown_skips, 1);
    }

    pub fn cooldown_started(&self, target: usize) {
        self.per_target(target, |m| m.cooldowns_started, 1);
    }

    pub fn tokens(&self, target: usize, usage: Usage) {
        self.per_target(target, |m| m.prompt_tokens, usage.prompt);
        self.per_target(target, |m| m.completion_tokens, usage.completion);
    }

    pub fn attempt(&self, target: usize, class: &str, latency_ms: u64) {
        host::increment(self.attempts, 1);
        if let Some(t) = self.targets.get(target) {
            let i = STATUS_CLASSES
                .iter()
                .position(|c| *c == class)
                .unwrap_or(STATUS_CLASSES.len() - 1);
            host::increment(t.attempts.get(i).copied().flatten(), 1);
            host::record(t.latency_ms, latency_ms);
        }
    }

    pub fn fallback(&self, from: usize, to: usize) {
        host::increment(self.fallbacks, 1);
        let n = self.targets.len();
        host::increment(self.fallback_pairs.get(from * n + to).copied().flatten(), 1);
    }

    pub fn rejected(&self, code: &str) {
        if let Some((_, id)) = self.rejected.iter().find(|(c, _)| *c == code) {
            host::increment(*id, 1);
        }
    }
}
