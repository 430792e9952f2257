//! Entra ID tokens the filter obtains itself (`azure_ad` on an Azure target): the token request
//! (client credentials or managed identity), the answer read, and the timing: when a token is
//! refreshed (ahead of expiry), who fetches it (one worker, holding a lease), how a failing
//! endpoint is retried (backoff, while a still-valid token keeps serving). The state lives in
//! Envoy shared data, one record per target, so all workers share one token and one fetch.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::config::{EntraKind, EntraSource};
use crate::duration::millis;

/// A token is refreshed this long before it expires at the latest (or at half its lifetime when
/// that is shorter).
pub const REFRESH_AHEAD: Duration = Duration::from_secs(300);
/// A token this close to its expiry is not sent any more.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(1);
/// The longest wait between two fetches of a failing token endpoint.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long the worker that fetches holds the lease (the fetch's timeout, and some).
pub const LEASE: Duration = Duration::from_secs(15);
/// The token request's timeout.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub value: String,
    /// Unix ms.
    pub expires_ms: u64,
    /// Unix ms from which it is fetched anew.
    pub refresh_ms: u64,
}

// The token itself never reaches a log line, even through `{:?}`.
impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("expires_ms", &self.expires_ms)
            .field("refresh_ms", &self.refresh_ms)
            .finish()
    }
}

/// One target's shared token state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub token: Option<Token>,
    /// Unix ms until which a worker is fetching (the others wait).
    pub lease_until_ms: u64,
    /// Failed fetches in a row.
    pub failures: u32,
    /// Unix ms before which a failing endpoint is not asked again.
    pub retry_at_ms: u64,
}

impl State {
    pub fn decode(bytes: &[u8]) -> State {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The token, if it may still be sent.
    pub fn valid(&self, now_ms: u64) -> Option<&Token> {
        self.token
            .as_ref()
            .filter(|t| t.expires_ms > now_ms.saturating_add(millis(EXPIRY_MARGIN)))
    }

    /// Whether a worker should fetch now: the token is missing or due for refresh, no worker
    /// holds the lease, and a failing endpoint's backoff is over.
    pub fn wants_fetch(&self, now_ms: u64) -> bool {
        let due = self.token.as_ref().is_none_or(|t| now_ms >= t.refresh_ms);
        due && self.lease_until_ms <= now_ms && self.retry_at_ms <= now_ms
    }

    /// The state with this worker holding the lease.
    pub fn leased(&self, now_ms: u64) -> State {
        State {
            lease_until_ms: now_ms.saturating_add(millis(LEASE)),
            ..self.clone()
        }
    }

    /// The state after a successful fetch.
    pub fn fetched(token: Token) -> State {
        State {
            token: Some(token),
            ..State::default()
        }
    }

    /// The state after a failed fetch: the token (while valid) stays, the next try waits.
    pub fn failed(&self, now_ms: u64) -> State {
        let failures = self.failures.saturating_add(1);
        State {
            token: self.token.clone(),
            lease_until_ms: 0,
            failures,
            retry_at_ms: now_ms.saturating_add(millis(backoff(failures))),
        }
    }

    /// Seconds left on the token (0 when there is none), for the gauge.
    pub fn seconds_left(&self, now_ms: u64) -> u64 {
        self.token
            .as_ref()
            .map_or(0, |t| t.expires_ms.saturating_sub(now_ms) / 1000)
    }
}

/// 1 s, 2 s, 4 s ... at most [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// When a token that lives `lifetime` from `now_ms` is fetched anew: 5 minutes before it
/// expires at the latest, or at half its lifetime when that is shorter.
pub fn refresh_at(now_ms: u64, lifetime: Duration) -> u64 {
    let ahead = REFRESH_AHEAD.min(lifetime / 2);
    now_ms.saturating_add(millis(lifetime.saturating_sub(ahead)))
}

/// The token endpoint's answer: `access_token` and `expires_in` (Entra: a number; IMDS: a
/// string of digits).
pub fn read_answer(body: &[u8], now_ms: u64) -> Result<Token, String> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seconds {
        Number(u64),
        Text(String),
    }
    #[derive(Deserialize)]
    struct Answer {
        access_token: Option<String>,
        expires_in: Option<Seconds>,
    }
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|_| "the answer is not the expected JSON".to_string())?;
    let value = answer
        .access_token
        .filter(|t| !t.is_empty() && t.bytes().all(|b| (0x21..0x7f).contains(&b)))
        .ok_or("no usable access_token")?;
    let secs = match answer.expires_in {
        Some(Seconds::Number(n)) => n,
        Some(Seconds::Text(t)) => t.trim().parse().map_err(|_| "expires_in is not a number")?,
        None => return Err("no expires_in".to_string()),
    };
    if secs == 0 {
        return Err("expires_in is 0".to_string());
    }
    let lifetime = Duration::from_secs(secs);
    Ok(Token {
        value,
        expires_ms: now_ms.saturating_add(millis(lifetime)),
        refresh_ms: refresh_at(now_ms, lifetime),
    })
}

/// The token request: method, path (with query), extra headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: Vec<u8>,
}

/// The shared-data key of a target's token state: its name and the identity the token is for
/// (token endpoint, resource, tenant and client; not the secret), so that a configuration change
/// that gives the target another identity does not reuse the old identity's token.
pub fn state_key(target: &str, source: &EntraSource) -> String {
    let (tenant, client) = match &source.kind {
        EntraKind::ClientCredentials {
            tenant_id,
            client_id,
            ..
        } => (tenant_id.as_str(), client_id.as_str()),
        EntraKind::ManagedIdentity { client_id } => ("", client_id.as_deref().unwrap_or("")),
    };
    let identity = [
        source.cluster.as_str(),
        &source.authority,
        &source.resource,
        tenant,
        client,
    ]
    .join("\n");
    let digest = crate::request::auth::sha256(identity.as_bytes());
    let short: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("llm_failover.token.{target}.{short}")
}

/// Client credentials: `POST /<tenant>/oauth2/v2.0/token` with a form body; managed identity:
/// `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=...` with
/// `Metadata: true`.
pub fn request(source: &EntraSource) -> Option<Request> {
    let mut url = Url::parse("https://entra.invalid/").ok()?;
    match &source.kind {
        EntraKind::ClientCredentials {
            tenant_id,
            client_id,
            client_secret,
        } => {
            url.path_segments_mut().ok()?.clear().extend([
                tenant_id.as_str(),
                "oauth2",
                "v2.0",
                "token",
            ]);
            let scope = format!("{}/.default", source.resource.trim_end_matches('/'));
            let body = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("grant_type", "client_credentials")
                .append_pair("client_id", client_id)
                .append_pair("client_secret", client_secret)
                .append_pair("scope", &scope)
                .finish();
            Some(Request {
                method: "POST",
                path: url[url::Position::BeforePath..].to_string(),
                headers: vec![("content-type", "application/x-www-form-urlencoded")],
                body: body.into_bytes(),
            })
        }
        EntraKind::ManagedIdentity { client_id } => {
            url.path_segments_mut()
                .ok()?
                .clear()
                .extend(["metadata", "identity", "oauth2", "token"]);
            {
                let mut query = url.query_pairs_mut();
                query
                    .append_pair("api-version", "2018-02-01")
                    .append_pair("resource", &source.resource);
                if let Some(id) = client_id {
                    query.append_pair("client_id", id);
                }
            }
            Some(Request {
                method: "GET",
                path: url[url::Position::BeforePath..].to_string(),
                headers: vec![("metadata", "true")],
                body: Vec::new(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000;

    fn token(expires_ms: u64, refresh_ms: u64) -> Token {
        Token {
            value: "tok".into(),
            expires_ms,
            refresh_ms,
        }
    }

    #[test]
    fn tokens_are_refreshed_five_minutes_ahead_or_at_half_their_life() {
        assert_eq!(refresh_at(0, Duration::from_secs(3600)), 3300 * S);
        assert_eq!(refresh_at(0, Duration::from_secs(300)), 150 * S);
        assert_eq!(refresh_at(1000, Duration::from_secs(3)), 2500);
        assert_eq!(refresh_at(0, Duration::from_secs(600)), 300 * S);
    }

    #[test]
    fn one_fetch_at_a_time_and_only_when_due() {
        let fresh = State::fetched(token(100 * S, 50 * S));
        assert!(!fresh.wants_fetch(10 * S));
        assert!(fresh.wants_fetch(50 * S));
        let leased = fresh.leased(50 * S);
        assert!(
            !leased.wants_fetch(51 * S),
            "another worker holds the lease"
        );
        assert!(
            leased.wants_fetch(50 * S + millis(LEASE)),
            "a lease that ran out"
        );
        assert!(State::default().wants_fetch(0), "no token yet");
    }

    #[test]
    fn a_failing_endpoint_is_retried_with_backoff_while_the_token_serves() {
        let mut s = State::fetched(token(100 * S, 50 * S)).leased(50 * S);
        let mut waits = Vec::new();
        for _ in 0..8 {
            s = s.failed(60 * S);
            waits.push((s.retry_at_ms - 60 * S) / S);
            assert!(!s.wants_fetch(60 * S));
            assert!(s.valid(60 * S).is_some(), "the old token keeps serving");
        }
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        assert!(
            s.valid(99 * S).is_none(),
            "not within a second of its expiry"
        );
        assert_eq!(s.seconds_left(40 * S), 60);
        assert_eq!(State::default().seconds_left(0), 0);
        let again = State::fetched(token(200 * S, 150 * S));
        assert_eq!(
            (again.failures, again.retry_at_ms, again.lease_until_ms),
            (0, 0, 0)
        );
    }

    #[test]
    fn answers_of_entra_and_imds_are_read() {
        let entra = br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0.a.b"}"#;
        let t = read_answer(entra, 1000).unwrap();
        assert_eq!(
            (t.value.as_str(), t.expires_ms),
            ("eyJ0.a.b", 1000 + 3_599_000)
        );
        let imds = br#"{"access_token":"eyJ1.c.d","expires_in":"3","expires_on":"1700000003","resource":"https://cognitiveservices.azure.com","token_type":"Bearer"}"#;
        let t = read_answer(imds, 0).unwrap();
        assert_eq!(
            (t.value.as_str(), t.expires_ms, t.refresh_ms),
            ("eyJ1.c.d", 3000, 1500)
        );
        for bad in [
            &b"{}"[..],
            br#"{"access_token":"x"}"#,
            br#"{"access_token":"x","expires_in":"soon"}"#,
            br#"{"access_token":"","expires_in":5}"#,
            br#"{"access_token":"a b","expires_in":5}"#,
            br#"{"access_token":"x","expires_in":0}"#,
            br#"{"error":"invalid_client"}"#,
            b"not json",
        ] {
            assert!(
                read_answer(bad, 0).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_token_requests_are_encoded_with_url() {
        let source = |kind| EntraSource {
            cluster: "entra".into(),
            authority: "login.microsoftonline.com".into(),
            resource: "https://cognitiveservices.azure.com".into(),
            kind,
        };
        let cc = request(&source(EntraKind::ClientCredentials {
            tenant_id: "my-tenant".into(),
            client_id: "app id".into(),
            client_secret: "s&cr=t+".into(),
        }))
        .unwrap();
        assert_eq!(
            (cc.method, cc.path.as_str()),
            ("POST", "/my-tenant/oauth2/v2.0/token")
        );
        assert_eq!(
            String::from_utf8(cc.body).unwrap(),
            "grant_type=client_credentials&client_id=app+id&client_secret=s%26cr%3Dt%2B&scope=https%3A%2F%2Fcognitiveservices.azure.com%2F.default"
        );
        let mi = request(&source(EntraKind::ManagedIdentity {
            client_id: Some("uai-1".into()),
        }))
        .unwrap();
        assert_eq!(mi.method, "GET");
        assert_eq!(
            mi.path,
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fcognitiveservices.azure.com&client_id=uai-1"
        );
        assert_eq!(mi.headers, vec![("metadata", "true")]);
    }

    #[test]
    fn a_token_is_kept_under_its_identity_not_its_secret() {
        let source = |tenant: &str, secret: &str| EntraSource {
            cluster: "entra".into(),
            authority: "login.microsoftonline.com".into(),
            resource: "https://cognitiveservices.azure.com".into(),
            kind: EntraKind::ClientCredentials {
                tenant_id: tenant.into(),
                client_id: "app".into(),
                client_secret: secret.into(),
            },
        };
        let key = state_key("azure", &source("t1", "s1"));
        assert!(key.starts_with("llm_failover.token.azure."), "{key}");
        assert_eq!(key, state_key("azure", &source("t1", "another secret")));
        assert!(!key.contains("s1"));
        assert_ne!(key, state_key("azure", &source("t2", "s1")));
        assert_ne!(key, state_key("azure2", &source("t1", "s1")));
        let mi = |client: Option<&str>| EntraSource {
            kind: EntraKind::ManagedIdentity {
                client_id: client.map(str::to_string),
            },
            ..source("t1", "s1")
        };
        assert_ne!(
            state_key("azure", &mi(None)),
            state_key("azure", &mi(Some("uai")))
        );
    }

    #[test]
    fn state_round_trips_and_garbage_reads_as_empty() {
        let s = State::fetched(token(5, 3)).leased(1).failed(2);
        assert_eq!(State::decode(&s.encode()), s);
        assert_eq!(State::decode(b"garbage"), State::default());
        assert!(!format!("{s:?}").contains("tok\""), "{s:?}");
    }
}
