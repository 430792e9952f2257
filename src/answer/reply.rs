//! Replies the filter itself gives, in OpenAI's error shape:
//! `{"error": {"message": "...", "type": "...", "param": null, "code": "..."}}`.

use serde::Serialize;

use crate::policy::chain::FailureKind;

/// Every reason the filter answers a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// No or wrong gateway key.
    Unauthorized,
    /// A valid gateway key that the route does not name.
    Forbidden { route: String },
    /// The request body is larger than `max_request_body_bytes`.
    BodyTooLarge { limit: usize },
    /// The body of an operation that must be rewritten is not a JSON object.
    InvalidBody { reason: String },
    /// No target in the chain can serve this request (e.g. no Azure deployment for the model).
    NoTarget { model: Option<String> },
    /// An attempt failed in transport (connect failure, reset, timeout) and it was the last one.
    UpstreamUnavailable { target: String, timeout: bool },
    /// The request budget (`deadline`) ran out before any attempt answered.
    DeadlineExceeded,
    /// The filter has no valid configuration.
    NotConfigured,
    /// Every target that could serve the request authenticates with Entra ID tokens and none
    /// has one (the token endpoint failed since start-up).
    NoCredential,
    /// The Envoy side of streamed failover disagrees with the filter (see Envoy's log).
    Misconfigured,
    /// A gateway key's or a route's `limits` are spent (`kind`: "requests" or "tokens"; `by`:
    /// whose limit, e.g. `gateway key 'app'`).
    RateLimited {
        kind: &'static str,
        by: String,
        limit: u64,
        per: String,
        retry_in: String,
    },
}

pub struct LocalReply {
    pub status: u32,
    pub body: Vec<u8>,
}

impl Rejection {
    pub fn status(&self) -> u32 {
        match self {
            Rejection::Unauthorized => 401,
            Rejection::Forbidden { .. } => 403,
            Rejection::BodyTooLarge { .. } => 413,
            Rejection::InvalidBody { .. } => 400,
            Rejection::NoTarget { .. } => 400,
            Rejection::UpstreamUnavailable { timeout: true, .. } => 504,
            Rejection::UpstreamUnavailable { timeout: false, .. } => 502,
            Rejection::DeadlineExceeded => 504,
            Rejection::NotConfigured => 503,
            Rejection::NoCredential => 503,
            Rejection::Misconfigured => 500,
            Rejection::RateLimited { .. } => 429,
        }
    }

    /// The `code` field, stable for clients to match on.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Unauthorized => "invalid_api_key",
            Rejection::Forbidden { .. } => "permission_denied",
            Rejection::BodyTooLarge { .. } => "request_too_large",
            Rejection::InvalidBody { .. } => "invalid_request_body",
            Rejection::NoTarget { .. } => "model_not_available",
            Rejection::UpstreamUnavailable { timeout: true, .. } => "upstream_timeout",
            Rejection::UpstreamUnavailable { timeout: false, .. } => "upstream_unavailable",
            Rejection::DeadlineExceeded => "deadline_exceeded",
            Rejection::NotConfigured => "gateway_not_configured",
            Rejection::NoCredential => "credential_unavailable",
            Rejection::Misconfigured => "gateway_misconfigured",
            Rejection::RateLimited { .. } => "rate_limit_exceeded",
        }
    }

    /// The `type` field.
    fn kind(&self) -> &'static str {
        match self {
            // As OpenAI's own 429s: the kind of limit that was reached.
            Rejection::RateLimited { kind, .. } => kind,
            Rejection::Unauthorized
            | Rejection::Forbidden { .. }
            | Rejection::BodyTooLarge { .. }
            | Rejection::InvalidBody { .. }
            | Rejection::NoTarget { .. } => "invalid_request_error",
            Rejection::UpstreamUnavailable { .. }
            | Rejection::DeadlineExceeded
            | Rejection::NotConfigured
            | Rejection::NoCredential
            | Rejection::Misconfigured => "server_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Rejection::Unauthorized => {
                "Missing or invalid gateway key. Send it as 'Authorization: Bearer <key>' or 'api-key: <key>'.".to_string()
            }
            Rejection::Forbidden { route } => format!("This gateway key may not use route '{route}'."),
            Rejection::BodyTooLarge { limit } => format!("Request body is larger than the gateway's limit of {limit} bytes."),
            Rejection::InvalidBody { reason } => format!("Request body must be a JSON object: {reason}."),
            Rejection::NoTarget { model: Some(m) } => format!("No configured target can serve model '{m}'."),
            Rejection::NoTarget { model: None } => "No configured target can serve this request.".to_string(),
            Rejection::UpstreamUnavailable { target, timeout: true } => {
                format!("The upstream '{target}' did not answer in time and no other target was left.")
            }
            Rejection::UpstreamUnavailable { target, timeout: false } => {
                format!("The upstream '{target}' could not be reached and no other target was left.")
            }
            Rejection::DeadlineExceeded => "The gateway's request deadline was spent before any target answered.".to_string(),
            Rejection::NotConfigured => "The gateway has no valid configuration; see Envoy's log.".to_string(),
            Rejection::NoCredential => "No target that could serve this request has an Entra ID token yet; see Envoy's log.".to_string(),
            Rejection::Misconfigured => "The gateway's Envoy configuration does not match its filter configuration; see Envoy's log.".to_string(),
            Rejection::RateLimited { kind, by, limit, per, retry_in } => format!(
                "Rate limit reached for {by} on {kind}: limit {limit} per {per}. Please try again in {retry_in}."
            ),
        }
    }

    /// What the client gets when the chain ends on a transport failure of `target` (a status,
    /// the provider's own answer, is passed on as it is: `None`).
    pub fn for_failure(kind: FailureKind, budget_spent: bool, target: &str) -> Option<Rejection> {
        match kind {
            FailureKind::Status(_) => None,
            // The attempt's timeout was what was left of the deadline.
            FailureKind::Timeout if budget_spent => Some(Rejection::DeadlineExceeded),
            FailureKind::Timeout | FailureKind::Unreachable => {
                Some(Rejection::UpstreamUnavailable {
                    target: target.to_string(),
                    timeout: kind == FailureKind::Timeout,
                })
            }
        }
    }

    pub fn reply(&self) -> LocalReply {
        LocalReply {
            status: self.status(),
            body: error_body(&self.message(), self.kind(), self.code()),
        }
    }
}

/// `{"error": {"message", "type", "param": null, "code"}}`, in the order OpenAI writes them.
pub fn error_body(message: &str, kind: &str, code: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        error: Detail<'a>,
    }
    #[derive(Serialize)]
    struct Detail<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<&'a str>,
        code: &'a str,
    }
    let body = Body {
        error: Detail {
            message,
            kind,
            param: None,
            code,
        },
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn a_chain_ending_on_a_transport_failure_gets_an_openai_shaped_error() {
        use FailureKind::*;
        assert_eq!(Rejection::for_failure(Status(503), true, "a"), None);
        assert_eq!(
            Rejection::for_failure(Timeout, true, "a"),
            Some(Rejection::DeadlineExceeded)
        );
        assert_eq!(
            Rejection::for_failure(Timeout, false, "a").map(|r| r.code()),
            Some("upstream_timeout")
        );
        assert_eq!(
            Rejection::for_failure(Unreachable, true, "a").map(|r| r.code()),
            Some("upstream_unavailable")
        );
    }

    #[test]
    fn every_rejection_is_openai_shaped_with_its_status_and_code() {
        let cases = [
            (Rejection::Unauthorized, 401, "invalid_api_key"),
            (
                Rejection::Forbidden { route: "r".into() },
                403,
                "permission_denied",
            ),
            (
                Rejection::BodyTooLarge { limit: 10 },
                413,
                "request_too_large",
            ),
            (
                Rejection::InvalidBody { reason: "x".into() },
                400,
                "invalid_request_body",
            ),
            (
                Rejection::NoTarget {
                    model: Some("m".into()),
                },
                400,
                "model_not_available",
            ),
            (
                Rejection::UpstreamUnavailable {
                    target: "t".into(),
                    timeout: true,
                },
                504,
                "upstream_timeout",
            ),
            (
                Rejection::UpstreamUnavailable {
                    target: "t".into(),
                    timeout: false,
                },
                502,
                "upstream_unavailable",
            ),
            (Rejection::DeadlineExceeded, 504, "deadline_exceeded"),
            (Rejection::NotConfigured, 503, "gateway_not_configured"),
            (Rejection::NoCredential, 503, "credential_unavailable"),
            (Rejection::Misconfigured, 500, "gateway_misconfigured"),
            (
                Rejection::RateLimited {
                    kind: "tokens",
                    by: "gateway key 'app'".into(),
                    limit: 100,
                    per: "1m0s".into(),
                    retry_in: "1.5s".into(),
                },
                429,
                "rate_limit_exceeded",
            ),
        ];
        for (rejection, status, code) in cases {
            let reply = rejection.reply();
            assert_eq!(reply.status, status);
            let v: Value = serde_json::from_slice(&reply.body).unwrap();
            let err = &v["error"];
            assert_eq!(err["code"], code);
            assert!(err["message"].as_str().unwrap().len() > 10);
            assert!(err["type"].is_string());
            assert!(err["param"].is_null());
        }
    }
}
