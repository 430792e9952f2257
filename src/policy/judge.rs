//! How an upstream answer is judged: delivered to the client, or a failure that may be retried
//! or failed over. Envoy's own replies for connect failures, resets and timeouts (to the routed
//! attempt and to callouts) are recognised as transport failures.

use crate::policy::chain::{Failure, FailureKind, Outcome};
use serde::Deserialize;
use serde_json::Value;

use crate::config::object::Obj;
use crate::config::Config;

/// Whether an answer with this status needs its body read before it can be judged (a failure
/// status, something Envoy may have generated, or a possible content-filter refusal).
pub fn needs_judging(config: &Config, status: Option<u16>) -> bool {
    match status {
        None => true,
        Some(s) => config.is_failure_status(s) || matches!(s, 502..=504),
    }
}

/// Whether judging a held answer with this status reads its body: only Envoy's own
/// transport-failure replies (502-504) and content-filter refusals (400, when they are not failed
/// over) are told apart by their bodies. The rest is judged on the status alone, so a held 429 or
/// 500 is never copied out of Envoy.
pub fn needs_body(config: &Config, status: Option<u16>) -> bool {
    match status {
        Some(502..=504) => true,
        Some(400) => config.is_failure_status(400) && !config.failover_on_content_filter,
        _ => false,
    }
}

/// What the answer was, for the log and for the client reply of a transport failure.
pub fn outcome(
    config: &Config,
    status: Option<u16>,
    content_type: Option<&[u8]>,
    body: &[u8],
    retry_after: Option<std::time::Duration>,
) -> Outcome {
    let Some(status) = status else {
        return failed(FailureKind::Unreachable, None);
    };
    if let Some(kind) = envoy_transport_failure(status, content_type, body) {
        return failed(kind, None);
    }
    if !config.is_failure_status(status) {
        return Outcome::Delivered;
    }
    if status == 400 && !config.failover_on_content_filter && is_content_filter(body) {
        return Outcome::Delivered;
    }
    failed(FailureKind::Status(status), retry_after)
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

/// Envoy answers a failed upstream connection with a short text/plain body of its own.
fn envoy_transport_failure(
    status: u16,
    content_type: Option<&[u8]>,
    body: &[u8],
) -> Option<FailureKind> {
    if !matches!(status, 502..=504) {
        return None;
    }
    let plain = content_type.is_none_or(|ct| ct.starts_with(b"text/plain"));
    if !plain {
        return None;
    }
    if body.starts_with(b"upstream request timeout")
        || body.starts_with(b"upstream per-try timeout")
    {
        return Some(FailureKind::Timeout);
    }
    const UNREACHABLE: [&[u8]; 4] = [
        b"upstream connect error or disconnect/reset before headers",
        b"no healthy upstream",
        b"upstream reset",
        b"no cluster match",
    ];
    UNREACHABLE
        .iter()
        .any(|p| body.starts_with(p))
        .then_some(FailureKind::Unreachable)
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
        let types = [
            None,
            Some(&b"text/plain"[..]),
            Some(&b"application/json"[..]),
        ];
        let configs = [
            config(json!({})),
            config(json!({"on_status_codes": [400, 429, 500]})),
            config(json!({"on_status_codes": [400], "failover_on_content_filter": true})),
            config(json!({"on_status_codes": [429]})),
        ];
        let mut read = 0;
        for c in &configs {
            for status in (100..=599).map(Some).chain([None]) {
                if needs_body(c, status) {
                    read += 1;
                    continue;
                }
                for body in bodies {
                    for ct in types {
                        let ra = Some(Duration::from_secs(2));
                        assert_eq!(
                            outcome(c, status, ct, body, ra),
                            outcome(c, status, ct, b"", ra),
                            "{status:?} {ct:?} {}",
                            String::from_utf8_lossy(body)
                        );
                    }
                }
            }
        }
        // 502-504 always, and 400 where a content filter refusal is not failed over.
        assert_eq!(read, 3 * 4 + 1);
    }

    #[test]
    fn statuses_are_judged_by_on_status_codes() {
        let c = config(json!({}));
        let json = Some(&b"application/json"[..]);
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
                kind(&outcome(&c, status, json, b"{}", None)),
                want,
                "{status:?}"
            );
        }
        let only_429 = config(json!({"on_status_codes": [429]}));
        assert_eq!(
            kind(&outcome(&only_429, Some(500), json, b"{}", None)),
            None
        );
    }

    #[test]
    fn envoy_generated_replies_are_transport_failures_whatever_the_codes() {
        let c = config(json!({"on_status_codes": [429]}));
        let plain = Some(&b"text/plain"[..]);
        let cases: [(u16, &[u8], FailureKind); 3] = [
            (504, b"upstream request timeout", FailureKind::Timeout),
            (503, b"upstream connect error or disconnect/reset before headers. reset reason: connection failure", FailureKind::Unreachable),
            (503, b"no healthy upstream", FailureKind::Unreachable),
        ];
        for (status, body, want) in cases {
            assert!(needs_judging(&c, Some(status)));
            assert_eq!(
                kind(&outcome(&c, Some(status), plain, body, None)),
                Some(want)
            );
        }
        // An upstream's own JSON 503 is not a transport failure.
        assert_eq!(
            kind(&outcome(
                &c,
                Some(503),
                Some(b"application/json"),
                br#"{"error":{}}"#,
                None
            )),
            None
        );
    }

    #[test]
    fn content_filter_refusals_are_not_failed_over_unless_switched_on() {
        let c = config(json!({"on_status_codes": [400, 429]}));
        assert_eq!(kind(&outcome(&c, Some(400), None, CF, None)), None);
        assert_eq!(
            kind(&outcome(
                &c,
                Some(400),
                None,
                b"{\"error\":{\"code\":\"other\"}}",
                None
            )),
            Some(FailureKind::Status(400))
        );
        let inner =
            br#"{"error":{"code":"x","innererror":{"code":"ResponsibleAIPolicyViolation"}}}"#;
        assert_eq!(kind(&outcome(&c, Some(400), None, inner, None)), None);
        let on = config(json!({"on_status_codes": [400, 429], "failover_on_content_filter": true}));
        assert_eq!(
            kind(&outcome(&on, Some(400), None, CF, None)),
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
        let o = outcome(&c, Some(429), None, b"{}", Some(Duration::from_secs(2)));
        assert_eq!(
            o,
            Outcome::Failed(Failure {
                kind: FailureKind::Status(429),
                retry_after: Some(Duration::from_secs(2))
            })
        );
    }
}
