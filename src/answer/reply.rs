//! Replies the filter itself gives, in the error shape the client's SDK expects: OpenAI's
//! `{"error": {"message": "...", "type": "...", "param": null, "code": "..."}}`, or for an
//! Azure-shaped request Azure's `{"error": {"code": "...", "message": "..."}}`.

use serde::{Deserialize, Serialize};

use crate::policy::chain::FailureKind;
use crate::request::azure::BadVersion;

/// The error shape of the filter's own replies: the client's API's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorShape {
    #[default]
    OpenAi,
    /// An Azure-shaped request (`/openai/...`).
    Azure,
}

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
    /// The request's state was in use when a host callback came for it (not expected: the
    /// filter failed closed rather than let the request go on unaddressed; see Envoy's log).
    Internal,
    /// An Azure-shaped request without a usable `api-version`, refused as Azure refuses it.
    ApiVersion(BadVersion),
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
            Rejection::Internal => 500,
            Rejection::ApiVersion(BadVersion::Missing) => 404,
            Rejection::ApiVersion(BadVersion::Unsupported(_)) => 400,
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
            Rejection::Internal => "gateway_internal_error",
            Rejection::RateLimited { .. } => "rate_limit_exceeded",
            // Azure's own codes, which Azure clients already handle.
            Rejection::ApiVersion(BadVersion::Missing) => "404",
            Rejection::ApiVersion(BadVersion::Unsupported(_)) => "BadRequest",
        }
    }

    /// The reason stats count it under (`llm_failover.rejected.reason.<reason>`): its code, but
    /// for Azure's own codes, which say nothing on their own.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::ApiVersion(_) => "invalid_api_version",
            other => other.code(),
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
            | Rejection::NoTarget { .. }
            | Rejection::ApiVersion(_) => "invalid_request_error",
            Rejection::UpstreamUnavailable { .. }
            | Rejection::DeadlineExceeded
            | Rejection::NotConfigured
            | Rejection::NoCredential
            | Rejection::Misconfigured
            | Rejection::Internal => "server_error",
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
            Rejection::Internal => "The gateway hit an internal error handling this request and did not send it on; see Envoy's log.".to_string(),
            // Azure's words first: what its users search for.
            Rejection::ApiVersion(BadVersion::Missing) => "Resource not found".to_string(),
            Rejection::ApiVersion(BadVersion::Unsupported(v)) => {
                let v: String = v.chars().take(64).collect();
                format!("API version not supported: '{v}' is not an Azure OpenAI api-version (e.g. 2024-10-21 or 2025-04-01-preview; on /openai/v1/ none, preview or latest).")
            }
            Rejection::RateLimited { kind, by, limit, per, retry_in } => format!(
                "Rate limit reached for {by} on {kind}: limit {limit} per {per}. Please try again in {retry_in}."
            ),
        }
    }

    /// What the client gets when the chain ends on a transport failure of `target` (a status,
    /// the provider's own answer, is passed on as it is: `None`).
    pub fn for_failure(kind: FailureKind, budget_spent: bool, target: &str) -> Option<Rejection> {
        match kind {
            FailureKind::Status(_) | FailureKind::Rejected(_) => None,
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

    pub fn reply(&self, shape: ErrorShape) -> LocalReply {
        let message = self.message();
        let body = match shape {
            ErrorShape::OpenAi => error_body(&message, self.kind(), self.code()),
            ErrorShape::Azure => azure_error_body(&message, self.code()),
        };
        LocalReply {
            status: self.status(),
            body,
        }
    }
}

/// The host callbacks of a request, as the filter's state rules see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callback {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    /// A callout's answer, or a retry's wait ended (the root's tick).
    Resumed,
    Log,
}

/// What a request gets when a host callback finds its state already in use (a re-entrant call:
/// not expected). It fails closed: the filter's 500 rather than a request going on unaddressed
/// (to the route's `cluster_header`, never set) or an answer going out unjudged. The log has
/// nobody left to answer.
pub fn when_state_in_use(callback: Callback) -> Option<Rejection> {
    match callback {
        Callback::Log => None,
        Callback::RequestHeaders
        | Callback::RequestBody
        | Callback::ResponseHeaders
        | Callback::ResponseBody
        | Callback::Resumed => Some(Rejection::Internal),
    }
}

/// Azure OpenAI's `{"error": {"code", "message"}}`.
pub fn azure_error_body(message: &str, code: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        error: Detail<'a>,
    }
    #[derive(Serialize)]
    struct Detail<'a> {
        code: &'a str,
        message: &'a str,
    }
    let body = Body {
        error: Detail { code, message },
    };
    serde_json::to_vec(&body).unwrap_or_default()
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
            (Rejection::Internal, 500, "gateway_internal_error"),
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
            let reply = rejection.reply(ErrorShape::OpenAi);
            assert_eq!(reply.status, status);
            let v: Value = serde_json::from_slice(&reply.body).unwrap();
            let err = &v["error"];
            assert_eq!(err["code"], code);
            assert!(err["message"].as_str().unwrap().len() > 10);
            assert!(err["type"].is_string());
            assert!(err["param"].is_null());
        }
    }

    #[test]
    fn a_request_whose_state_is_in_use_fails_closed_with_a_500() {
        use Callback::*;
        for callback in [
            RequestHeaders,
            RequestBody,
            ResponseHeaders,
            ResponseBody,
            Resumed,
        ] {
            let rejection = when_state_in_use(callback);
            assert_eq!(rejection, Some(Rejection::Internal), "{callback:?}");
            let reply = rejection.unwrap().reply(ErrorShape::OpenAi);
            assert_eq!(reply.status, 500);
            let v: Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(v["error"]["code"], "gateway_internal_error");
            assert_eq!(v["error"]["type"], "server_error");
        }
        assert_eq!(when_state_in_use(Log), None, "nobody to answer at the log");
    }

    #[test]
    fn azure_shaped_requests_get_azures_error_shape() {
        let cases = [
            (Rejection::Unauthorized, 401, "invalid_api_key"),
            (
                Rejection::BodyTooLarge { limit: 10 },
                413,
                "request_too_large",
            ),
            (
                Rejection::UpstreamUnavailable {
                    target: "t".into(),
                    timeout: false,
                },
                502,
                "upstream_unavailable",
            ),
            (Rejection::ApiVersion(BadVersion::Missing), 404, "404"),
            (
                Rejection::ApiVersion(BadVersion::Unsupported("2024-13-01".into())),
                400,
                "BadRequest",
            ),
        ];
        for (rejection, status, code) in cases {
            let reply = rejection.reply(ErrorShape::Azure);
            assert_eq!(reply.status, status);
            let v: Value = serde_json::from_slice(&reply.body).unwrap();
            let err = v["error"].as_object().unwrap();
            assert_eq!(err.keys().collect::<Vec<_>>(), ["code", "message"]);
            assert_eq!(err["code"], code);
        }
        assert_eq!(
            Rejection::ApiVersion(BadVersion::Missing).reason(),
            "invalid_api_version"
        );
        assert_eq!(Rejection::Unauthorized.reason(), "invalid_api_key");
        let missing = Rejection::ApiVersion(BadVersion::Missing).reply(ErrorShape::Azure);
        let v: Value = serde_json::from_slice(&missing.body).unwrap();
        assert_eq!(v["error"]["message"], "Resource not found");
        let bad = Rejection::ApiVersion(BadVersion::Unsupported("x\"y".repeat(50)));
        let v: Value = serde_json::from_slice(&bad.reply(ErrorShape::Azure).body).unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("API version not supported: 'x\"yx"),
            "{message}"
        );
        assert!(message.len() < 250, "the client's value is cut short");
    }
}
