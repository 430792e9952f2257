//! Streamed failover: a `"stream": true` request whose chain can fail over is handed to Envoy's
//! router, which retries it on the next target before the first response byte, so the
//! fallback's answer streams to the client as it is generated.
//!
//! The router walks an aggregate cluster (`llm_failover.stream.<target>.<tries>...`) whose
//! members (`llm_failover.try.<target>.<n>`, copies of the target's cluster whose endpoints name
//! the target in their metadata) are the request's planned attempts in order; the retry priority
//! `previous_priorities` moves each retry to the next member. The filter picks the aggregate of
//! the attempts it plans and enables the retries for this one request with `x-envoy-retry-on`,
//! `x-envoy-retriable-status-codes` and `x-envoy-max-retries`. The same module, as the upstream
//! filter of the aggregates (`{"role": "upstream"}`), addresses each attempt for the target its
//! host names: path, host, credential and body, from the [`Handoff`] the filter left in the
//! request's filter state. Everything here is pure: names, plans, headers and the records kept
//! between attempts; `tools/envoy_side.py` writes the clusters from [`envoy_side`].

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::answer::reply::ErrorShape;
use crate::config::{Config, Step};
use crate::request::operation::Operation;

/// Prefix of the aggregate clusters.
pub const STREAM_PREFIX: &str = "llm_failover.stream";
/// Prefix of their member clusters.
pub const TRY_PREFIX: &str = "llm_failover.try";
/// The prefix of an aggregate's marker: a cluster with no endpoints (and no filters) written
/// with each aggregate, which tells the filter that Envoy has the aggregate (see
/// [`ready_name`]).
pub const READY_PREFIX: &str = "llm_failover.ready";
/// Endpoint metadata namespace (`filter_metadata.llm_failover.target`) naming a member's target.
pub const METADATA_NAMESPACE: &str = "llm_failover";
/// Filter state the filter leaves for the upstream filter.
pub const HANDOFF_STATE: &str = "llm_failover.handoff";
/// Filter state the upstream filter keeps across attempts, read back by the filter.
pub const RECORD_STATE: &str = "llm_failover.attempt";
/// Filter state the upstream filter sets when it refused an attempt with its own error reply
/// (which the filter then passes on as it is).
pub const REFUSED_STATE: &str = "llm_failover.refused";
/// How long a worker trusts what a probe found (clusters come and go with xDS).
pub const PROBE_VALID: std::time::Duration = std::time::Duration::from_secs(60);
/// Targets a streamed request's plan holds at most (the rest of its chain is not tried): the
/// clusters to declare grow with the subsets of a chain.
pub const MAX_TARGETS: usize = 4;
/// Retries the aggregates' circuit breaker allows at once (Envoy's default, 3, would turn
/// failover off under any concurrency).
pub const MAX_CONCURRENT_RETRIES: u32 = 100_000;

/// One target of a streamed request's plan and the attempts it gets (its `retries` + 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tries {
    pub target: usize,
    pub tries: u32,
}

/// The attempts a streamed request makes, in order, if each one fails.
pub type Plan = Vec<Tries>;

/// The plan's attempts in all.
pub fn attempts(plan: &[Tries]) -> u32 {
    plan.iter().map(|t| t.tries).fold(0, u32::saturating_add)
}

/// Whether a request takes the streamed path: a `"stream": true` request of an operation that
/// streams, on a config that fails streams over through the router, whose plan can fail over
/// at all (a single attempt needs no aggregate: it is routed to its target like any other).
pub fn takes_stream_path(config: &Config, op: Operation, stream: bool, plan: &[Tries]) -> bool {
    may_take_stream_path(config, op, stream) && attempts(plan) > 1
}

/// [`takes_stream_path`] before the plan is made.
pub fn may_take_stream_path(config: &Config, op: Operation, stream: bool) -> bool {
    config.stream_failover && stream && op != Operation::Embeddings
}

/// Whether the router fails a streamed attempt over on this status (a 400 that may be a
/// content-filter refusal is delivered: only its body could tell).
pub fn fails_over(config: &Config, status: u16) -> bool {
    config.is_failure_status(status) && (status != 400 || config.failover_on_content_filter)
}

/// The aggregate cluster of a plan.
pub fn cluster_name(config: &Config, plan: &[Tries]) -> String {
    let mut name = String::from(STREAM_PREFIX);
    for t in plan {
        let target = config
            .targets
            .get(t.target)
            .map_or("?", |t| t.name.as_str());
        name.push('.');
        name.push_str(target);
        name.push('.');
        name.push_str(&t.tries.to_string());
    }
    name
}

/// The marker of an aggregate cluster (`llm_failover.ready.openai.2.azure.2` for
/// `llm_failover.stream.openai.2.azure.2`). The filter asks Envoy whether it has the marker
/// before it routes a request to the aggregate: a callout to a cluster Envoy does not have is
/// refused as a bad argument, one to a cluster with no endpoints fails at once, and neither
/// sends anything anywhere (a callout to the aggregate itself would start its upstream filter,
/// in the filter's own VM, inside the filter's call).
pub fn ready_name(aggregate: &str) -> String {
    match aggregate.strip_prefix(STREAM_PREFIX) {
        Some(rest) => format!("{READY_PREFIX}{rest}"),
        None => format!("{READY_PREFIX}.{aggregate}"),
    }
}

/// The member cluster of try `n` (1-based) on a target.
pub fn member_name(target: &str, n: u32) -> String {
    format!("{TRY_PREFIX}.{target}.{n}")
}

/// The headers that hand a streamed request to the router: its aggregate cluster, the retries
/// enabled for it alone (every failure status of the config except a 400 that may be a
/// content-filter refusal, which only the body tells apart; resets, per-try timeouts and
/// refused connections), one attempt per planned try, and the per-try timeout (to the response
/// headers: the first target's, cut to what is left of the deadline). No whole-response
/// timeout: an answer that started streams as long as it takes (`stream_idle_timeout` guards a
/// stalled one); Envoy ignores the per-try timeout once the response has started.
pub fn router_headers(
    config: &Config,
    plan: &[Tries],
    per_try: Duration,
    left: Duration,
) -> Vec<(&'static str, String)> {
    let mut statuses: Vec<u16> = config.on_status_codes.clone();
    statuses.extend(
        [401, 403]
            .into_iter()
            .filter(|&s| config.is_credential_rejection(s)),
    );
    statuses.sort_unstable();
    statuses.dedup();
    let codes: Vec<String> = statuses
        .iter()
        .filter(|&&c| fails_over(config, c))
        .map(u16::to_string)
        .collect();
    let mut on = String::from("reset,connect-failure");
    if !codes.is_empty() {
        on.push_str(",retriable-status-codes");
    }
    let ms = |d: Duration| crate::duration::millis(d).max(1).to_string();
    let mut headers = vec![
        (
            crate::target::forward::CLUSTER_HEADER,
            cluster_name(config, plan),
        ),
        ("x-envoy-retry-on", on),
        (
            "x-envoy-max-retries",
            attempts(plan).saturating_sub(1).to_string(),
        ),
        // 0: no timeout over the whole response (the route's `timeout` would cut a long answer).
        ("x-envoy-upstream-rq-timeout-ms", "0".to_string()),
        (
            "x-envoy-upstream-rq-per-try-timeout-ms",
            ms(per_try.min(left)),
        ),
    ];
    if !codes.is_empty() {
        headers.push(("x-envoy-retriable-status-codes", codes.join(",")));
    }
    headers
}

/// What the filter knows of a request that the upstream filter needs on every attempt (the
/// request headers it sees are shared by all attempts and carry the last attempt's rewrite, so
/// it never reads the request's facts from them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// The filter's root context: which configuration the request is under.
    pub root: u32,
    /// The filter's context of the request (log lines).
    pub ctx: u32,
    /// The client's `x-request-id` (log lines).
    pub id: String,
    pub route: Option<usize>,
    pub op: Operation,
    /// The OpenAI path the providers address (the client's, or its route's operation's).
    pub path: String,
    /// The client's `model`.
    pub model: Option<String>,
    pub plan: Plan,
    /// The router's per-try timeout (ms): an attempt that ends with no answer after it timed out.
    pub per_try_ms: u64,
    /// Unix ms at which the request's deadline is spent: no attempt starts after it (the
    /// router has no timeout over the whole answer, so an answer that started is not cut).
    pub deadline_ms: u64,
    /// The client's body length: every attempt gets the client's body from the router, and the
    /// headers an earlier attempt rewrote for its own body are shared.
    pub length: u64,
    /// The shape of the upstream filter's own errors (an Azure-shaped request's are Azure's).
    #[serde(default)]
    pub shape: ErrorShape,
    /// A Responses follow-up pinned to its previous response's owner (it never probes nor moves
    /// a cooldown).
    #[serde(default)]
    pub pinned: bool,
}

impl Handoff {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Option<Handoff> {
        serde_json::from_slice(bytes).ok()
    }

    /// Whether target `target` is in the plan (an attempt on any other is refused).
    pub fn plans(&self, target: usize) -> bool {
        self.plan.iter().any(|t| t.target == target)
    }

    /// Whether a retry or failover may still start at `now_ms` (the first attempt always goes).
    pub fn may_start(&self, now_ms: u64) -> bool {
        now_ms.saturating_add(crate::duration::millis(crate::policy::chain::MIN_ATTEMPT))
            <= self.deadline_ms
    }
}

/// How a streamed attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ended {
    /// Still in flight (or ended with its answer passing to the client).
    Pending,
    /// Answered with this status.
    Status(u16),
    /// No answer: refused, reset, or no healthy host.
    Unreachable,
    /// No answer within the per-try timeout.
    Timeout,
}

/// What the attempts of a streamed request did so far: kept by the upstream filter in filter
/// state, read by the next attempt (its decision log line) and by the filter (the client's
/// headers, the access log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub attempts: u32,
    /// The target of the last attempt.
    pub target: usize,
    pub ended: Ended,
    /// Whether an attempt went to another target than the first.
    pub failed_over: bool,
}

impl Record {
    /// The record of attempt `attempts + 1`, on `target`.
    pub fn next(previous: Option<Record>, first: usize, target: usize) -> Record {
        match previous {
            None => Record {
                attempts: 1,
                target,
                ended: Ended::Pending,
                failed_over: target != first,
            },
            Some(p) => Record {
                attempts: p.attempts.saturating_add(1),
                target,
                ended: Ended::Pending,
                failed_over: p.failed_over || target != p.target || target != first,
            },
        }
    }

    /// Whether this attempt's record may be written over `current`, the one in filter state
    /// now: only while that is still this attempt's own. An attempt that ends late (its stream
    /// torn down after the router started the next one) never overwrites the newer attempt's
    /// record, which the attempt after it and the filter read.
    pub fn may_overwrite(&self, current: Option<&Record>) -> bool {
        current.is_none_or(|c| c.attempts <= self.attempts)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Option<Record> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The decision an attempt after the first one stands for, for the log and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Retry { target: usize },
    Failover { from: usize, to: usize },
}

/// What attempt `now` on `target` is, after the attempt `previous` recorded.
pub fn decision(previous: &Record, target: usize) -> Decision {
    if previous.target == target {
        Decision::Retry { target }
    } else {
        Decision::Failover {
            from: previous.target,
            to: target,
        }
    }
}

/// How an attempt that ended with no answer failed: a timeout when it lasted the per-try
/// timeout, else an unreachable target.
pub fn no_answer(elapsed_ms: u64, per_try_ms: u64) -> Ended {
    if per_try_ms > 0 && elapsed_ms >= per_try_ms {
        Ended::Timeout
    } else {
        Ended::Unreachable
    }
}

/// A member cluster: try `n` of target `target`, a copy of the target's `cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub name: String,
    pub target: String,
    pub cluster: String,
    #[serde(rename = "try")]
    pub n: u32,
}

/// An aggregate cluster: a plan's members in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Aggregate {
    pub name: String,
    pub members: Vec<String>,
    /// Its marker cluster ([`ready_name`]).
    pub ready: String,
}

/// The Envoy side of streamed failover for a config: every member and aggregate cluster a
/// request's plan may name. A plan is an order-preserving part of a chain (the top-level one,
/// or a route's: gateway keys, unservable targets, cooldowns and spill-overs leave targets out,
/// a Responses API follow-up keeps its owner only), at most [`MAX_TARGETS`] long; under load
/// balancing any of its targets may come first. Plans of one attempt need no cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvoySide {
    pub members: Vec<Member>,
    pub aggregates: Vec<Aggregate>,
}

pub fn envoy_side(config: &Config) -> EnvoySide {
    if !config.stream_failover {
        return EnvoySide {
            members: Vec::new(),
            aggregates: Vec::new(),
        };
    }
    let chains = std::iter::once(config.steps.as_slice())
        .chain(config.routes.iter().map(|r| r.steps.as_slice()));
    let mut plans: BTreeSet<Plan> = BTreeSet::new();
    for steps in chains {
        let chain: Plan = steps.iter().map(tries_of).collect();
        for plan in parts(&chain, config.loadbalance) {
            if attempts(&plan) > 1 {
                plans.insert(plan);
            }
        }
    }
    let mut most: Vec<u32> = vec![0; config.targets.len()];
    for t in plans.iter().flatten() {
        if let Some(m) = most.get_mut(t.target) {
            *m = (*m).max(t.tries);
        }
    }
    let members = config
        .targets
        .iter()
        .zip(&most)
        .flat_map(|(t, &most)| {
            (1..=most).map(move |n| Member {
                name: member_name(&t.name, n),
                target: t.name.clone(),
                cluster: t.cluster.clone(),
                n,
            })
        })
        .collect();
    let aggregates = plans
        .iter()
        .map(|plan| Aggregate {
            ready: ready_name(&cluster_name(config, plan)),
            name: cluster_name(config, plan),
            members: plan
                .iter()
                .flat_map(|t| {
                    let name = config
                        .targets
                        .get(t.target)
                        .map_or("?", |t| t.name.as_str());
                    (1..=t.tries).map(move |n| member_name(name, n))
                })
                .collect(),
        })
        .collect();
    EnvoySide {
        members,
        aggregates,
    }
}

fn tries_of(step: &Step) -> Tries {
    Tries {
        target: step.target,
        tries: step.retries.saturating_add(1),
    }
}

/// Every order-preserving part of `chain` of at most [`MAX_TARGETS`] targets, and under load
/// balancing each of them with any one of its targets moved to the front.
fn parts(chain: &[Tries], loadbalance: bool) -> Vec<Plan> {
    let n = chain.len().min(16);
    let mut out = Vec::new();
    for mask in 1u32..(1u32 << n) {
        if mask.count_ones() as usize > MAX_TARGETS {
            continue;
        }
        let part: Plan = chain
            .iter()
            .take(n)
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, t)| *t)
            .collect();
        if loadbalance {
            for first in 1..part.len() {
                let mut moved = part.clone();
                let picked = moved.remove(first);
                moved.insert(0, picked);
                out.push(moved);
            }
        }
        out.push(part);
    }
    out
}

/// A plan cut to [`MAX_TARGETS`] targets.
pub fn bounded(mut plan: Plan) -> Plan {
    plan.truncate(MAX_TARGETS);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Env};
    use serde_json::json;

    struct AnyEnv;
    impl Env for AnyEnv {
        fn var(&self, _: &str) -> Option<String> {
            Some("secret".to_string())
        }
    }

    fn config(v: serde_json::Value) -> Config {
        config::parse(v.to_string().as_bytes(), &AnyEnv).unwrap()
    }

    fn target(name: &str, retries: u32) -> serde_json::Value {
        json!({"name": name, "provider": "openai", "cluster": format!("c_{name}"),
               "api_key_env": "K", "retries": retries})
    }

    fn header<'a>(headers: &'a [(&str, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    fn tries(target: usize, tries: u32) -> Tries {
        Tries { target, tries }
    }

    #[test]
    fn each_aggregate_has_a_marker_named_after_it() {
        assert_eq!(
            ready_name("llm_failover.stream.openai.2.azure.2"),
            "llm_failover.ready.openai.2.azure.2"
        );
        let c = config(json!({"targets": [target("a", 1), target("b", 0)]}));
        let side = envoy_side(&c);
        assert!(!side.aggregates.is_empty());
        for a in &side.aggregates {
            assert_eq!(a.ready, ready_name(&a.name));
        }
    }

    #[test]
    fn names_say_each_target_and_its_tries() {
        let c = config(json!({"targets": [target("openai", 1), target("azure", 0)]}));
        let plan = vec![tries(0, 2), tries(1, 1)];
        assert_eq!(
            cluster_name(&c, &plan),
            "llm_failover.stream.openai.2.azure.1"
        );
        assert_eq!(member_name("azure", 1), "llm_failover.try.azure.1");
    }

    #[test]
    fn the_envoy_side_has_a_cluster_for_every_plan_that_can_fail_over() {
        let c = config(json!({"targets": [target("a", 1), target("b", 0), target("c", 0)]}));
        let side = envoy_side(&c);
        let names: Vec<&str> = side.aggregates.iter().map(|a| a.name.as_str()).collect();
        // Every order-preserving part of [a*2, b, c] with two attempts or more ([b] and [c]
        // alone cannot fail over).
        let mut want = vec![
            "llm_failover.stream.a.2",
            "llm_failover.stream.a.2.b.1",
            "llm_failover.stream.a.2.c.1",
            "llm_failover.stream.a.2.b.1.c.1",
            "llm_failover.stream.b.1.c.1",
        ];
        want.sort();
        let mut got = names.clone();
        got.sort();
        assert_eq!(got, want);
        let abc = side
            .aggregates
            .iter()
            .find(|a| a.name == "llm_failover.stream.a.2.b.1.c.1")
            .unwrap();
        assert_eq!(
            abc.members,
            vec![
                "llm_failover.try.a.1",
                "llm_failover.try.a.2",
                "llm_failover.try.b.1",
                "llm_failover.try.c.1"
            ]
        );
        let members: Vec<(&str, &str, u32)> = side
            .members
            .iter()
            .map(|m| (m.name.as_str(), m.cluster.as_str(), m.n))
            .collect();
        assert_eq!(
            members,
            vec![
                ("llm_failover.try.a.1", "c_a", 1),
                ("llm_failover.try.a.2", "c_a", 2),
                ("llm_failover.try.b.1", "c_b", 1),
                ("llm_failover.try.c.1", "c_c", 1),
            ]
        );
    }

    #[test]
    fn load_balancing_adds_each_target_first() {
        let c = config(json!({"strategy": {"mode": "loadbalance"},
                              "targets": [target("a", 0), target("b", 0)]}));
        let mut names: Vec<String> = envoy_side(&c)
            .aggregates
            .into_iter()
            .map(|a| a.name)
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec!["llm_failover.stream.a.1.b.1", "llm_failover.stream.b.1.a.1"]
        );
    }

    #[test]
    fn routes_add_their_own_chains_and_tries() {
        let c = config(json!({
            "targets": [target("a", 0), target("b", 0)],
            "routes": [{"name": "r", "path": "/r", "operation": "chat",
                        "targets": [{"target": "b", "retries": 2}, "a"]}]
        }));
        let names: Vec<String> = envoy_side(&c)
            .aggregates
            .into_iter()
            .map(|a| a.name)
            .collect();
        assert!(
            names.contains(&"llm_failover.stream.b.3.a.1".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"llm_failover.stream.b.3".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"llm_failover.stream.a.1.b.1".to_string()),
            "{names:?}"
        );
        let members: Vec<String> = envoy_side(&c).members.into_iter().map(|m| m.name).collect();
        assert_eq!(
            members,
            vec![
                "llm_failover.try.a.1",
                "llm_failover.try.b.1",
                "llm_failover.try.b.2",
                "llm_failover.try.b.3"
            ]
        );
    }

    #[test]
    fn plans_are_at_most_four_targets_long() {
        let targets: Vec<_> = (0..6).map(|i| target(&format!("t{i}"), 0)).collect();
        let c = config(json!({ "targets": targets }));
        let side = envoy_side(&c);
        assert!(side
            .aggregates
            .iter()
            .all(|a| a.members.len() <= MAX_TARGETS));
        // C(6,2) + C(6,3) + C(6,4)
        assert_eq!(side.aggregates.len(), 15 + 20 + 15);
        assert_eq!(bounded(vec![tries(0, 1); 6]).len(), MAX_TARGETS);
    }

    #[test]
    fn callout_streaming_needs_no_envoy_side() {
        let c = config(json!({"streaming": {"failover": "callout"},
                              "targets": [target("a", 1), target("b", 0)]}));
        assert!(envoy_side(&c).aggregates.is_empty());
        assert!(!takes_stream_path(
            &c,
            Operation::ChatCompletions,
            true,
            &[tries(0, 2), tries(1, 1)]
        ));
    }

    #[test]
    fn only_streamed_requests_that_can_fail_over_take_the_stream_path() {
        let c = config(json!({"targets": [target("a", 0), target("b", 0)]}));
        let two = [tries(0, 1), tries(1, 1)];
        assert!(takes_stream_path(
            &c,
            Operation::ChatCompletions,
            true,
            &two
        ));
        assert!(takes_stream_path(&c, Operation::Responses, true, &two));
        assert!(takes_stream_path(&c, Operation::Completions, true, &two));
        assert!(!takes_stream_path(
            &c,
            Operation::ChatCompletions,
            false,
            &two
        ));
        assert!(!takes_stream_path(&c, Operation::Embeddings, true, &two));
        assert!(!takes_stream_path(
            &c,
            Operation::ChatCompletions,
            true,
            &two[..1]
        ));
        assert!(takes_stream_path(
            &c,
            Operation::ChatCompletions,
            true,
            &[tries(0, 2)]
        ));
    }

    #[test]
    fn the_router_retries_every_failure_status_once_per_planned_try() {
        let c = config(json!({"strategy": {"on_status_codes": [429, 503, 400]},
                              "targets": [target("a", 1), target("b", 0)]}));
        let plan = [tries(0, 2), tries(1, 1)];
        let h = router_headers(
            &c,
            &plan,
            Duration::from_secs(10),
            Duration::from_millis(2500),
        );
        let get = |n: &str| header(&h, n);
        assert_eq!(
            get("x-llm-failover-cluster"),
            Some("llm_failover.stream.a.2.b.1")
        );
        assert_eq!(
            get("x-envoy-retry-on"),
            Some("reset,connect-failure,retriable-status-codes")
        );
        // 400 may be a content-filter refusal, which only its body tells apart.
        // 401 and 403: the target refused the gateway's credential.
        assert_eq!(
            get("x-envoy-retriable-status-codes"),
            Some("401,403,429,503")
        );
        assert_eq!(get("x-envoy-max-retries"), Some("2"));
        // An answer that started is not cut: only the per-try timeout, to its headers.
        assert_eq!(get("x-envoy-upstream-rq-timeout-ms"), Some("0"));
        // The per-try timeout never exceeds what is left of the deadline.
        assert_eq!(get("x-envoy-upstream-rq-per-try-timeout-ms"), Some("2500"));

        let c = config(json!({"strategy": {"on_status_codes": [400],
                                           "failover_on_content_filter": true},
                              "targets": [target("a", 0), target("b", 0)]}));
        let h = router_headers(&c, &plan, Duration::from_secs(1), Duration::from_secs(9));
        let get = |n: &str| header(&h, n);
        assert_eq!(get("x-envoy-retriable-status-codes"), Some("400,401,403"));
        assert_eq!(get("x-envoy-upstream-rq-per-try-timeout-ms"), Some("1000"));

        let c = config(json!({"strategy": {"on_status_codes": [400],
                                           "failover_on_credential_rejection": false},
                              "targets": [target("a", 0), target("b", 0)]}));
        let h = router_headers(&c, &plan, Duration::from_secs(1), Duration::from_secs(9));
        let get = |n: &str| header(&h, n);
        assert_eq!(get("x-envoy-retry-on"), Some("reset,connect-failure"));
        assert_eq!(get("x-envoy-retriable-status-codes"), None);
    }

    #[test]
    fn the_handoff_and_the_record_survive_filter_state() {
        let h = Handoff {
            root: 3,
            ctx: 7,
            id: "req-1".to_string(),
            route: Some(0),
            op: Operation::Responses,
            path: "/v1/responses".to_string(),
            model: Some("gpt-4o".to_string()),
            plan: vec![tries(0, 2), tries(1, 1)],
            per_try_ms: 5000,
            deadline_ms: 1_000_000,
            length: 76,
            shape: ErrorShape::Azure,
            pinned: true,
        };
        assert_eq!(Handoff::from_json(h.to_json().as_bytes()), Some(h.clone()));
        assert!(h.plans(1) && !h.plans(2));
        assert!(h.may_start(999_980) && !h.may_start(999_981));
        assert_eq!(Handoff::from_json(b"{\"root\": 1}"), None);
        assert_eq!(Handoff::from_json(b"\xff"), None);

        let first = Record::next(None, 0, 0);
        assert_eq!((first.attempts, first.failed_over), (1, false));
        let retry = Record::next(Some(first), 0, 0);
        assert_eq!((retry.attempts, retry.failed_over), (2, false));
        assert_eq!(decision(&first, 0), Decision::Retry { target: 0 });
        let over = Record::next(Some(retry), 0, 1);
        assert_eq!((over.attempts, over.failed_over), (3, true));
        assert_eq!(decision(&retry, 1), Decision::Failover { from: 0, to: 1 });
        // An unhealthy first member makes the router start on the second.
        assert!(Record::next(None, 0, 1).failed_over);
        let mut ended = over;
        ended.ended = Ended::Status(429);
        assert_eq!(Record::from_json(ended.to_json().as_bytes()), Some(ended));
    }

    #[test]
    fn an_attempt_with_no_answer_timed_out_only_after_the_per_try_timeout() {
        assert_eq!(no_answer(10, 5000), Ended::Unreachable);
        assert_eq!(no_answer(5000, 5000), Ended::Timeout);
        assert_eq!(no_answer(9000, 0), Ended::Unreachable);
    }

    #[test]
    fn a_late_ending_never_overwrites_a_newer_attempts_record() {
        let first = Record::next(None, 0, 0);
        let second = Record::next(Some(first), 0, 1);
        let mut first_ended = first;
        first_ended.ended = Ended::Timeout;
        // The first attempt's stream is torn down after the router started the second one.
        assert!(!first_ended.may_overwrite(Some(&second)));
        // Its own record, or none read: written.
        assert!(first_ended.may_overwrite(Some(&first)));
        assert!(first_ended.may_overwrite(None));
        let mut second_ended = second;
        second_ended.ended = Ended::Unreachable;
        assert!(second_ended.may_overwrite(Some(&second)));
    }
}
