//! Streamed failover: a `"stream": true` request whose chain can fail over is handed to Envoy's
//! router, which retries it on the next target before the first response byte, so the
//! fallback's answer streams to the client as it is generated.
//!
//! The request's plan names the cluster of each attempt, in order, in `x-llm-failover-cluster`
//! (`openai,openai,azure`: the targets' own clusters, one per attempt). Envoy's side is written
//! by hand once (README, "Streamed failover"): a Lua filter after this one turns that list into
//! the dynamic metadata `llm_failover.priority_groups`, the route's `priority_group` cluster
//! specifier takes attempt *n*'s cluster from it, and its `refresh_cluster_on_retry` makes every
//! retry choose again. The filter enables the retries for this one request with
//! `x-envoy-retry-on`, `x-envoy-retriable-status-codes` and `x-envoy-max-retries`. The same
//! module, as the router's upstream filter (`{"role": "upstream"}`), addresses each
//! attempt for its target (the plan's attempt of that number, on the cluster it names): path,
//! host, credential and body, from the [`Handoff`] the filter left in the request's filter state.
//! Everything here is pure: the plan, its headers and the records kept between attempts.

use std::time::Duration;

use crate::answer::reply::ErrorShape;
use crate::config::Config;
use crate::request::operation::Operation;

/// Filter state the filter leaves for the upstream filter: where the request's handoff is
/// ([`handoff_key`]). The handoff itself and the attempts' record stay in the VM, which both
/// filters share (no copy out to Envoy and back, no JSON).
pub const HANDOFF_STATE: &str = "llm_failover.handoff";
/// Filter state the upstream filter sets when it refused an attempt with its own error reply
/// (which the filter then passes on as it is).
pub const REFUSED_STATE: &str = "llm_failover.refused";
/// How long a worker keeps streaming without the router's failover after Envoy showed that the
/// route lacks the streamed wiring: past it one streamed request tries the router again (a route
/// change may have added the wiring) and, if it still lacks it, is served through a callout.
pub const UNWIRED_RECHECK: std::time::Duration = std::time::Duration::from_secs(300);

/// A streamed request's body under this size is copied into a buffer of its own before the
/// router takes it: the router keeps the request for its retries as long as the stream is open,
/// and a small body arrives in one of Envoy's 16 KiB read slices, which it would keep whole
/// (measured: 12 KiB less per open stream, docs/performance.md). A larger body fills its slices.
pub const COMPACT_BODY_BELOW: usize = 8 * 1024;

/// Whether a streamed request's body of `length` bytes is worth copying (`COMPACT_BODY_BELOW`).
pub fn compacts_body(length: usize) -> bool {
    (1..COMPACT_BODY_BELOW).contains(&length)
}

/// Whether a worker that last saw the route without the streamed wiring at `seen_ms` (if ever)
/// still routes streamed requests like any request at `now_ms`.
pub fn known_unwired(seen_ms: Option<u64>, now_ms: u64) -> bool {
    seen_ms.is_some_and(|at| now_ms.saturating_sub(at) < crate::duration::millis(UNWIRED_RECHECK))
}
/// One target of a streamed request's plan and the attempts it gets (its `retries` + 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
/// at all (a single attempt is routed to its target like any other).
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

/// The cluster of each attempt of a plan, in order, comma-separated: the value of
/// `x-llm-failover-cluster` that the route's `priority_group` specifier walks.
pub fn cluster_list(config: &Config, plan: &[Tries]) -> String {
    let mut list = String::new();
    for t in plan {
        let cluster = config
            .targets
            .get(t.target)
            .map_or("", |t| t.cluster.as_str());
        for _ in 0..t.tries {
            if !list.is_empty() {
                list.push(',');
            }
            list.push_str(cluster);
        }
    }
    list
}

/// The target of attempt `n` (1-based) of a plan: Envoy's `priority_group` stays on the last
/// group once the attempts go past the list, and so does this.
pub fn attempt_target(plan: &[Tries], n: u32) -> Option<usize> {
    let mut left = n.max(1);
    for t in plan {
        if left <= t.tries {
            return Some(t.target);
        }
        left -= t.tries;
    }
    plan.last().map(|t| t.target)
}

/// The headers that hand a streamed request to the router: its attempts' clusters, the retries
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
            cluster_list(config, plan),
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
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
    pub shape: ErrorShape,
    /// A Responses follow-up pinned to its previous response's owner (it never probes nor moves
    /// a cooldown).
    pub pinned: bool,
}

/// The value of [`HANDOFF_STATE`]: the filter's root context (which configuration the request is
/// under) and its request's context.
pub fn handoff_key(root: u32, ctx: u32) -> String {
    format!("{root}/{ctx}")
}

/// [`handoff_key`] read back.
pub fn parse_handoff_key(value: &[u8]) -> Option<(u32, u32)> {
    let (root, ctx) = std::str::from_utf8(value).ok()?.split_once('/')?;
    Some((root.parse().ok()?, ctx.parse().ok()?))
}

impl Handoff {
    /// Whether a retry or failover may still start at `now_ms` (the first attempt always goes).
    pub fn may_start(&self, now_ms: u64) -> bool {
        now_ms.saturating_add(crate::duration::millis(crate::policy::chain::MIN_ATTEMPT))
            <= self.deadline_ms
    }
}

/// How a streamed attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// What the attempts of a streamed request did so far: kept by the upstream filter next to the
/// handoff, read by the next attempt (its decision log line) and by the filter (the client's
/// headers, the access log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    #[test]
    fn only_a_small_body_is_copied_before_the_router_keeps_it() {
        assert!(!compacts_body(0));
        assert!(compacts_body(150));
        assert!(compacts_body(COMPACT_BODY_BELOW - 1));
        assert!(!compacts_body(COMPACT_BODY_BELOW));
        assert!(!compacts_body(4 << 20));
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
    fn a_route_seen_without_the_wiring_is_tried_again_after_five_minutes() {
        assert!(!known_unwired(None, 5_000));
        assert!(known_unwired(Some(1_000), 1_000));
        assert!(known_unwired(Some(1_000), 300_999));
        assert!(!known_unwired(Some(1_000), 301_000));
    }

    #[test]
    fn the_cluster_list_names_each_attempts_cluster_in_order() {
        let c = config(json!({"targets": [target("openai", 1), target("azure", 0)]}));
        assert_eq!(
            cluster_list(&c, &[tries(0, 2), tries(1, 1)]),
            "c_openai,c_openai,c_azure"
        );
        assert_eq!(
            cluster_list(&c, &[tries(1, 1), tries(0, 1)]),
            "c_azure,c_openai"
        );
        // No cap on the plan's length: six targets, six clusters.
        let targets: Vec<_> = (0..6).map(|i| target(&format!("t{i}"), 0)).collect();
        let c = config(json!({ "targets": targets }));
        let plan: Vec<Tries> = (0..6).map(|t| tries(t, 1)).collect();
        assert_eq!(cluster_list(&c, &plan), "c_t0,c_t1,c_t2,c_t3,c_t4,c_t5");
    }

    #[test]
    fn each_attempt_number_names_its_planned_target() {
        let plan = [tries(2, 2), tries(0, 1), tries(1, 3)];
        let got: Vec<Option<usize>> = (1..=8).map(|n| attempt_target(&plan, n)).collect();
        // Past the plan, Envoy stays on its last cluster.
        let want = [2, 2, 0, 1, 1, 1, 1, 1].map(Some);
        assert_eq!(got, want);
        assert_eq!(attempt_target(&plan, 0), Some(2));
        assert_eq!(attempt_target(&[], 1), None);
    }

    #[test]
    fn callout_streaming_takes_no_stream_path() {
        let c = config(json!({"streaming": {"failover": "callout"},
                              "targets": [target("a", 1), target("b", 0)]}));
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
        assert_eq!(get("x-llm-failover-cluster"), Some("c_a,c_a,c_b"));
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
    fn the_handoff_is_found_by_its_key() {
        assert_eq!(
            parse_handoff_key(handoff_key(3, 4_000_000_000).as_bytes()),
            Some((3, 4_000_000_000))
        );
        for bad in [
            &b""[..],
            b"3",
            b"3/",
            b"/4",
            b"3/4/5",
            b"-3/4",
            b"3/x",
            b"\xff/1",
        ] {
            assert_eq!(parse_handoff_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_handoff_and_its_records() {
        let h = Handoff {
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
        assert!(h.may_start(999_980) && !h.may_start(999_981));

        let first = Record::next(None, 0, 0);
        assert_eq!((first.attempts, first.failed_over), (1, false));
        let retry = Record::next(Some(first), 0, 0);
        assert_eq!((retry.attempts, retry.failed_over), (2, false));
        assert_eq!(decision(&first, 0), Decision::Retry { target: 0 });
        let over = Record::next(Some(retry), 0, 1);
        assert_eq!((over.attempts, over.failed_over), (3, true));
        assert_eq!(decision(&retry, 1), Decision::Failover { from: 0, to: 1 });
        // A first attempt on another target than the plan's first is a failover.
        assert!(Record::next(None, 0, 1).failed_over);
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
