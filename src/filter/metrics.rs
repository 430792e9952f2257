//! Envoy stats. Names carry their labels as `.target.<name>`, `.status.<class>`, `.from.<a>.to.<b>`
//! segments; the shipped `stats_config` turns them into Prometheus labels.

use proxy_wasm::types::MetricType;

use super::host;
use crate::chain::FailureKind;
use crate::config::Config;

pub const STATUS_CLASSES: [&str; 6] = ["2xx", "3xx", "4xx", "429", "5xx", "transport"];

pub struct TargetMetrics {
    attempts: Vec<Option<u32>>,
    pub retries: Option<u32>,
    pub cooldown_skips: Option<u32>,
    pub cooldowns_started: Option<u32>,
    pub deployment_skips: Option<u32>,
    pub latency_ms: Option<u32>,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
}

pub struct Metrics {
    pub requests: Option<u32>,
    pub exhausted: Option<u32>,
    pub budget_spent: Option<u32>,
    pub cache_hits: Option<u32>,
    pub cache_misses: Option<u32>,
    pub retries: Option<u32>,
    pub fallbacks: Option<u32>,
    pub attempts: Option<u32>,
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
            targets,
            fallback_pairs,
            rejected,
        }
    }

    pub fn target(&self, i: usize) -> Option<&TargetMetrics> {
        self.targets.get(i)
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

/// The status class an attempt is counted under.
pub fn status_class(status: Option<u16>, failure: Option<FailureKind>) -> &'static str {
    match (failure, status) {
        (Some(FailureKind::Unreachable | FailureKind::Timeout), _) | (_, None) => "transport",
        (_, Some(429)) => "429",
        (_, Some(s)) if s < 300 => "2xx",
        (_, Some(s)) if s < 400 => "3xx",
        (_, Some(s)) if s < 500 => "4xx",
        _ => "5xx",
    }
}
