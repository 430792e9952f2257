//! How an upstream answer is judged: delivered to the client, or a failure that may be retried
//! or failed over. An answer that came from the target is judged by its status, whatever its
//! body or content type (OpenAI's own edge answers a plain-text 503 that reads like Envoy's);
//! only Envoy's own local replies (connect failure, reset, timeout, no cluster) are transport
//! failures, told apart by what Envoy reports ([`Source`]), never by the body.

use crate::policy::chain::{Failure, FailureKind, Outcome};
use serde::Deserialize;
use serde_json::Value;

use crate::config::object::Obj;
use crate::config::Config;

/// Who made an answer: the target, or Envoy itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The target's own answer.
    Upstream,
    /// A local reply of Envoy's: no answer came from the target.
    Envoy { timeout: bool },
    /// A reply another filter of the chain made before the request reached the router (a local
    /// rate limit, an authorization filter): not the target's answer, and not a failure to reach
    /// it. It goes to the client as it is.
    Filter,
}

/// The response code details Envoy gives an answer that came from the upstream.
pub const VIA_UPSTREAM: &str = "via_upstream";

/// The routed attempt's answer, by its `response.code_details` property (`via_upstream` for the
/// target's answer; `upstream_reset_before_response_started{...}`, `upstream_per_try_timeout`,
/// `response_timeout`, `cluster_not_found`... for Envoy's own).
pub fn routed_source(code_details: &str) -> Source {
    if code_details == VIA_UPSTREAM {
        Source::Upstream
    } else if router_failure(code_details) {
        Source::Envoy {
            timeout: code_details.contains("timeout"),
        }
    } else {
        Source::Filter
    }
}

/// The code details of the router's replies when it got no answer from the upstream (Envoy's
/// `ResponseCodeDetails`: `upstream_*`, `response_timeout`, `no_healthy_upstream`,
/// `cluster_not_found`, `maintenance_mode`). Other filters' replies have details of their own
/// (`local_rate_limited`, `ext_authz_denied`, ...).
fn router_failure(code_details: &str) -> bool {
    code_details.starts_with("upstream_")
        || matches!(
            code_details,
            "response_timeout" | "no_healthy_upstream" | "cluster_not_found" | "maintenance_mode"
        )
        || code_details.is_empty()
}

/// The header Envoy's router adds to every answer it received from an upstream (callouts go
/// through a router that does not suppress it); its local replies never carry it.
pub const UPSTREAM_SERVICE_TIME: &str = "x-envoy-upstream-service-time";

/// A callout's answer: the target's when the router timed it (`x-envoy-upstream-service-time`);
/// otherwise Envoy's local reply, whose 504 is the callout's timeout.
pub fn callout_source(timed_by_router: bool, status: Option<u16>) -> Source {
    if timed_by_router {
        Source::Upstream
    } else {
        Source::Envoy {
            timeout: status == Some(504),
        }
    }
}

/// Whether an answer must be held until it is judged: a failure status, or Envoy's own reply.
pub fn needs_judging(config: &Config, status: Option<u16>, source: Source) -> bool {
    match (source, status) {
        (Source::Filter, _) => false,
        (Source::Envoy { .. }, _) | (_, None) => true,
        (Source::Upstream, Some(s)) => config.is_failure_status(s),
    }
}

/// Whether judging a held answer with this status reads its body: only a content-filter
/// refusal (400, when it is not failed over) is told apart by its body. The rest is judged on
/// the status alone, so a held 429 or 500 is never copied out of Envoy.
pub fn needs_body(config: &Config, status: Option<u16>) -> bool {
    status == Some(400)
        && config.on_status_codes.contains(&400)
        && !config.failover_on_content_filter
}

/// What the answer was, for the log and for the client reply of a transport failure.
pub fn outcome(
    config: &Config,
    status: Option<u16>,
    source: Source,
    body: &[u8],
    retry_after: Option<std::time::Duration>,
) -> Outcome {
    let Some(status) = status else {
        return failed(FailureKind::Unreachable, None);
    };
    if let Source::Envoy { timeout } = source {
        let kind = if timeout {
            FailureKind::Timeout
        } else {
            FailureKind::Unreachable
        };
        return failed(kind, None);
    }
    if !config.is_failure_status(status) {
        return Outcome::Delivered;
    }
    if status == 400 && !config.failover_on_content_filter && is_content_filter(body) {
        return Outcome::Delivered;
    }
    failed(status_failure(config, status), retry_after)
}

/// The failure a failure status is: a rejection of the target's credential, or a status.
pub fn status_failure(config: &Config, status: u16) -> FailureKind {
    if config.is_credential_rejection(status) {
        FailureKind::Rejected(status)
    } else {
        FailureKind::Status(status)
    }
}

/// The `:status` header's value as a number.
pub fn parse_status(value: &[u8]) -> Option<u16> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// The status class an attempt is counted under in stats.
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

/// How an attempt ended, for the decision log: `status=429`, `failure=timeout`.
pub fn describe(status: Option<u16>, failure: Option<FailureKind>) -> String {
    match (failure, status) {
        (Some(FailureKind::Timeout), _) => "failure=timeout".to_string(),
        (Some(FailureKind::Unreachable), _) | (_, None) => "failure=unreachable".to_string(),
        (_, Some(s)) => format!("status={s}"),
    }
}

fn failed(kind: FailureKind, retry_after: Option<std::time::Duration>) -> Outcome {
    Outcome::Failed(Failure { kind, retry_after })
}

/// Azure's content filter: `{"error": {"code": "content_filter", ...}}` (also seen with the code
/// in `innererror`). Each level must be an object (or absent / null below the top).
fn is_content_filter(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Refusal {
        error: Obj<Detail>,
    }
    #[derive(Deserialize)]
    struct Detail {
        code: Option<Value>,
        innererror: Option<Obj<Inner>>,
    }
    #[derive(Deserialize)]
    struct Inner {
        code: Option<Value>,
    }
    let Ok(Obj(refusal)) = serde_json::from_slice::<Obj<Refusal>>(body) else {
        return false;
    };
    let Obj(error) = refusal.error;
    let inner = error.innererror.and_then(|Obj(i)| i.code);
    error.code.as_ref().and_then(Value::as_str) == Some("content_filter")
        || inner.as_ref().and_then(Value::as_str) == Some("ResponsibleAIPolicyViolation")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, NoEnv};
    use serde_json::json;
    use std::time::Duration;

    fn config(strategy: serde_json::Value) -> Config {
        let cfg = json!({"strategy": strategy, "targets": [{"provider": "openai", "cluster": "o", "api_key": "k"}]});
        config::parse(cfg.to_string().as_bytes(), &NoEnv).unwrap()
    }

    fn kind(o: &Outcome) -> Option<FailureKind> {
        match o {
            Outcome::Delivered | Outcome::Elsewhere => None,
            Outcome::Failed(f) => Some(f.kind),
        }
    }

    const CF: &[u8] = br#"{"error":{"message":"filtered","type":null,"param":"prompt","code":"content_filter","status":400}}"#;

    const UP: Source = Source::Upstream;

    #[test]
    fn a_body_not_read_never_changes_the_judgement() {
        // The filter skips reading a held answer's body when `needs_body` says so: for every
        // status, the outcome must then be the same as with the body it did not read.
        let bodies: [&[u8]; 5] = [
            b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
            b"upstream request timeout",
            b"no healthy upstream",
            CF,
            br#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#,
        ];
        let configs = [
            config(json!({})),
            config(json!({"on_status_codes": [400, 429, 500]})),
            config(json!({"on_status_codes": [400], "failover_on_content_filter": true})),
            config(json!({"on_status_codes": [429]})),
        ];
        let sources = [
            UP,
            Source::Envoy { timeout: true },
            Source::Envoy { timeout: false },
        ];
        let mut read = 0;
        for c in &configs {
            for status in (100..=599).map(Some).chain([None]) {
                if needs_body(c, status) {
                    read += 1;
                    continue;
                }
                for body in bodies {
                    for source in sources {
                        let ra = Some(Duration::from_secs(2));
                        assert_eq!(
                            outcome(c, status, source, body, ra),
                            outcome(c, status, source, b"", ra),
                            "{status:?} {source:?} {}",
                            String::from_utf8_lossy(body)
                        );
                    }
                }
            }
        }
        // Only 400, where a content filter refusal is not failed over.
        assert_eq!(read, 1);
    }

    #[test]
    fn statuses_are_judged_by_on_status_codes() {
        let c = config(json!({}));
        let cases = [
            (Some(200), None),
            (Some(400), None),
            (Some(404), None),
            (Some(429), Some(FailureKind::Status(429))),
            (Some(500), Some(FailureKind::Status(500))),
            (Some(503), Some(FailureKind::Status(503))),
            (None, Some(FailureKind::Unreachable)),
        ];
        for (status, want) in cases {
            assert_eq!(
                kind(&outcome(&c, status, UP, b"{}", None)),
                want,
                "{status:?}"
            );
        }
        let only_429 = config(json!({"on_status_codes": [429]}));
        assert_eq!(kind(&outcome(&only_429, Some(500), UP, b"{}", None)), None);
    }

    #[test]
    fn an_upstreams_plain_text_503_is_its_status_not_a_transport_failure() {
        // OpenAI's edge (an Envoy itself) answers this when its backend resets.
        let body = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination";
        let only_429 = config(json!({"on_status_codes": [429]}));
        assert_eq!(kind(&outcome(&only_429, Some(503), UP, body, None)), None);
        assert!(!needs_judging(&only_429, Some(503), UP));
        let all = config(json!({}));
        let o = outcome(&all, Some(503), UP, body, None);
        assert_eq!(kind(&o), Some(FailureKind::Status(503)));
        assert_eq!(status_class(Some(503), kind(&o)), "5xx");
    }

    #[test]
    fn envoys_own_replies_are_transport_failures_whatever_the_codes() {
        let c = config(json!({"on_status_codes": [429]}));
        let cases = [
            (
                "upstream_reset_before_response_started{connection_failure}",
                Some(503),
                FailureKind::Unreachable,
            ),
            ("upstream_per_try_timeout", Some(504), FailureKind::Timeout),
            ("upstream_response_timeout", Some(504), FailureKind::Timeout),
            ("no_healthy_upstream", Some(503), FailureKind::Unreachable),
            ("cluster_not_found", Some(503), FailureKind::Unreachable),
        ];
        for (details, status, want) in cases {
            let source = routed_source(details);
            assert!(needs_judging(&c, status, source), "{details}");
            assert_eq!(
                kind(&outcome(&c, status, source, b"", None)),
                Some(want),
                "{details}"
            );
        }
        assert_eq!(routed_source("via_upstream"), UP);
        // Callouts: the router's timing header says the target answered.
        assert_eq!(callout_source(true, Some(503)), UP);
        assert_eq!(
            callout_source(false, Some(504)),
            Source::Envoy { timeout: true }
        );
        assert_eq!(
            callout_source(false, Some(503)),
            Source::Envoy { timeout: false }
        );
    }

    #[test]
    fn another_filters_reply_goes_to_the_client_as_it_is() {
        let c = config(json!({}));
        for details in ["local_rate_limited", "ext_authz_denied", "direct_response"] {
            let source = routed_source(details);
            assert_eq!(source, Source::Filter, "{details}");
            assert!(!needs_judging(&c, Some(429), source), "{details}");
        }
    }

    #[test]
    fn a_rejected_credential_fails_over_unless_switched_off() {
        let c = config(json!({"on_status_codes": [429]}));
        for status in [401, 403] {
            assert!(needs_judging(&c, Some(status), UP));
            assert_eq!(
                kind(&outcome(&c, Some(status), UP, b"{}", None)),
                Some(FailureKind::Rejected(status))
            );
        }
        let off = config(json!({"failover_on_credential_rejection": false}));
        assert!(!needs_judging(&off, Some(401), UP));
        assert_eq!(kind(&outcome(&off, Some(401), UP, b"{}", None)), None);
        // Listed in on_status_codes, it is a plain failure status again.
        let listed =
            config(json!({"on_status_codes": [401], "failover_on_credential_rejection": false}));
        assert_eq!(
            kind(&outcome(&listed, Some(401), UP, b"{}", None)),
            Some(FailureKind::Status(401))
        );
    }

    #[test]
    fn content_filter_refusals_are_not_failed_over_unless_switched_on() {
        let c = config(json!({"on_status_codes": [400, 429]}));
        assert_eq!(kind(&outcome(&c, Some(400), UP, CF, None)), None);
        assert_eq!(
            kind(&outcome(
                &c,
                Some(400),
                UP,
                b"{\"error\":{\"code\":\"other\"}}",
                None
            )),
            Some(FailureKind::Status(400))
        );
        let inner =
            br#"{"error":{"code":"x","innererror":{"code":"ResponsibleAIPolicyViolation"}}}"#;
        assert_eq!(kind(&outcome(&c, Some(400), UP, inner, None)), None);
        let on = config(json!({"on_status_codes": [400, 429], "failover_on_content_filter": true}));
        assert_eq!(
            kind(&outcome(&on, Some(400), UP, CF, None)),
            Some(FailureKind::Status(400))
        );
    }

    #[test]
    fn attempts_are_counted_and_logged_by_class() {
        let timeout = Some(FailureKind::Timeout);
        let cases = [
            (Some(200), None, "2xx", "status=200"),
            (Some(302), None, "3xx", "status=302"),
            (Some(404), None, "4xx", "status=404"),
            (
                Some(429),
                Some(FailureKind::Status(429)),
                "429",
                "status=429",
            ),
            (
                Some(503),
                Some(FailureKind::Status(503)),
                "5xx",
                "status=503",
            ),
            (Some(504), timeout, "transport", "failure=timeout"),
            (
                Some(503),
                Some(FailureKind::Unreachable),
                "transport",
                "failure=unreachable",
            ),
            (None, None, "transport", "failure=unreachable"),
        ];
        for (status, failure, class, text) in cases {
            assert_eq!(status_class(status, failure), class, "{status:?}");
            assert_eq!(describe(status, failure), text, "{status:?}");
        }
        assert_eq!(parse_status(b" 429 "), Some(429));
        assert_eq!(parse_status(b"abc"), None);
        assert_eq!(parse_status(b"99999"), None);
    }

    #[test]
    fn retry_after_travels_with_the_failure() {
        let c = config(json!({}));
        let o = outcome(&c, Some(429), UP, b"{}", Some(Duration::from_secs(2)));
        assert_eq!(
            o,
            Outcome::Failed(Failure {
                kind: FailureKind::Status(429),
                retry_after: Some(Duration::from_secs(2))
            })
        );
    }
}
