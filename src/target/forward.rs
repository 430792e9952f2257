//! Which headers go where: what the routed request changes to reach its target, what a callout
//! carries of the client's request, and what the client gets of a callout's answer.

use crate::target::provider::{Address, CLIENT_CREDENTIAL_HEADERS};

/// The route reads the chosen target's cluster from this header; the filter always sets it.
pub const CLUSTER_HEADER: &str = "x-llm-failover-cluster";
pub const TARGET_HEADER: &str = "x-llm-failover-target";
pub const ATTEMPTS_HEADER: &str = "x-llm-failover-attempts";
pub const CACHE_HEADER: &str = "x-llm-failover-cache";

/// Client headers a callout does not carry: the rest go to every attempt alike, as they do to
/// the routed one. Credentials are replaced by the target's; `accept-encoding` is dropped from
/// every attempt so that the filter can read what comes back (error bodies, usage, the cache).
const NOT_FORWARDED: [&str; 14] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "expect",
    "proxy-connection",
    "proxy-authorization",
    "authorization",
    "api-key",
    "accept-encoding",
    CLUSTER_HEADER,
];

/// Whether a callout carries this client request header.
pub fn forwarded_to_callouts(name: &str) -> bool {
    !name.starts_with(':') && !name.starts_with("x-envoy-") && !NOT_FORWARDED.contains(&name)
}

/// Response headers never copied from a callout's answer to the client (the filter's own are
/// set apart).
const HOP_BY_HOP: [&str; 5] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "x-envoy-upstream-service-time",
];

/// Whether the client gets this header of a callout's answer.
pub fn copied_to_client(name: &str) -> bool {
    !name.starts_with(':')
        && !HOP_BY_HOP.contains(&name)
        && ![TARGET_HEADER, ATTEMPTS_HEADER, CACHE_HEADER].contains(&name)
}

/// Router control headers a client could send to make Envoy retry its request, or time it out
/// differently: removed from every request the filter routes (the filter sets its own).
pub const CLIENT_CONTROL_HEADERS: [&str; 8] = [
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-upstream-rq-timeout-alt-response",
];

/// The bit of a control header in [`ClientHeaders::controls`].
pub fn control_bit(name: &str) -> u8 {
    CLIENT_CONTROL_HEADERS
        .iter()
        .position(|h| *h == name)
        .map_or(0, |i| 1 << i)
}

/// The client headers the routed request must not keep as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientHeaders {
    pub authorization: bool,
    pub api_key: bool,
    pub accept_encoding: bool,
    /// Router control headers the client sent (bit i: `CLIENT_CONTROL_HEADERS[i]`).
    pub controls: u8,
}

impl ClientHeaders {
    /// The control headers to remove.
    pub fn controls(&self) -> impl Iterator<Item = &'static str> + '_ {
        CLIENT_CONTROL_HEADERS
            .iter()
            .enumerate()
            .filter(|(i, _)| self.controls & (1 << i) != 0)
            .map(|(_, h)| *h)
    }
}

/// One change to the routed request's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit<'a> {
    Set(&'static str, &'a str),
    Remove(&'static str),
}

/// Where the routed request goes and how it authenticates there.
pub struct Routed<'a> {
    pub cluster: &'a str,
    /// (header, value) of the target's credential.
    pub credential: (&'static str, &'a str),
    pub address: &'a Address,
    pub client_path: &'a str,
    /// The per-attempt timeout, for an operation (a pass-through keeps the route's).
    pub timeout_ms: Option<&'a str>,
    /// An operation (its answers are read: identity bodies).
    pub operation: bool,
}

/// The header changes that point the routed request at its target. Only what changes is
/// written: the client's credential headers are removed only when present and not replaced.
pub fn routed<'a>(r: &Routed<'a>, client: ClientHeaders) -> Vec<Edit<'a>> {
    let mut edits = vec![Edit::Set(CLUSTER_HEADER, r.cluster)];
    let present = [client.authorization, client.api_key];
    for (name, present) in CLIENT_CREDENTIAL_HEADERS.iter().zip(present) {
        if present && *name != r.credential.0 {
            edits.push(Edit::Remove(name));
        }
    }
    edits.push(Edit::Set(r.credential.0, r.credential.1));
    if r.address.path != r.client_path {
        edits.push(Edit::Set(":path", &r.address.path));
    }
    edits.push(Edit::Set(":authority", &r.address.authority));
    if let Some(ms) = r.timeout_ms {
        edits.push(Edit::Set("x-envoy-upstream-rq-timeout-ms", ms));
    }
    if r.operation && client.accept_encoding {
        edits.push(Edit::Remove("accept-encoding"));
    }
    edits.extend(client.controls().map(Edit::Remove));
    edits
}

/// The headers of a callout to a target: pseudo-headers, length (`None`: a request without a
/// body, such as a `GET`), the target's credential, then the client's forwarded headers.
pub fn callout<'a>(
    method: &'a str,
    address: &'a Address,
    credential: (&'static str, &'a str),
    content_length: Option<&'a str>,
    forwarded: &'a [(String, String)],
) -> Vec<(&'a str, &'a str)> {
    let mut headers = Vec::with_capacity(5 + forwarded.len());
    headers.push((":method", method));
    headers.push((":path", address.path.as_str()));
    headers.push((":authority", address.authority.as_str()));
    if let Some(length) = content_length {
        headers.push(("content-length", length));
    }
    headers.push(credential);
    headers.extend(forwarded.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(path: &str) -> Address {
        Address {
            path: path.to_string(),
            authority: "res.openai.azure.com".to_string(),
        }
    }

    #[test]
    fn the_routed_request_gets_the_targets_cluster_credential_path_and_host() {
        let addr = address("/openai/deployments/d/chat/completions?api-version=v");
        let r = Routed {
            cluster: "azure",
            credential: ("api-key", "az-key"),
            address: &addr,
            client_path: "/v1/chat/completions",
            timeout_ms: Some("10000"),
            operation: true,
        };
        let all = ClientHeaders {
            authorization: true,
            api_key: true,
            accept_encoding: true,
            controls: control_bit("x-envoy-max-retries") | control_bit("x-envoy-retry-on"),
        };
        assert_eq!(
            routed(&r, all),
            vec![
                Edit::Set(CLUSTER_HEADER, "azure"),
                Edit::Remove("authorization"),
                Edit::Set("api-key", "az-key"),
                Edit::Set(
                    ":path",
                    "/openai/deployments/d/chat/completions?api-version=v"
                ),
                Edit::Set(":authority", "res.openai.azure.com"),
                Edit::Set("x-envoy-upstream-rq-timeout-ms", "10000"),
                Edit::Remove("accept-encoding"),
                // A client may not make Envoy retry its request.
                Edit::Remove("x-envoy-retry-on"),
                Edit::Remove("x-envoy-max-retries"),
            ]
        );
        assert_eq!(control_bit("x-request-id"), 0);
    }

    #[test]
    fn only_what_changes_is_written() {
        let addr = address("/v1/models");
        let r = Routed {
            cluster: "openai",
            credential: ("authorization", "Bearer sk"),
            address: &addr,
            client_path: "/v1/models",
            timeout_ms: None,
            operation: false,
        };
        let edits = routed(
            &r,
            ClientHeaders {
                accept_encoding: true,
                ..Default::default()
            },
        );
        assert_eq!(
            edits,
            vec![
                Edit::Set(CLUSTER_HEADER, "openai"),
                Edit::Set("authorization", "Bearer sk"),
                Edit::Set(":authority", "res.openai.azure.com"),
            ]
        );
    }

    #[test]
    fn callouts_carry_the_clients_headers_but_never_its_credentials_or_hop_headers() {
        for name in [
            "x-request-id",
            "traceparent",
            "content-type",
            "user-agent",
            "openai-beta",
        ] {
            assert!(forwarded_to_callouts(name), "{name}");
        }
        for name in [
            ":path",
            "authorization",
            "api-key",
            "host",
            "accept-encoding",
            "x-envoy-retry-on",
            CLUSTER_HEADER,
            "transfer-encoding",
        ] {
            assert!(!forwarded_to_callouts(name), "{name}");
        }
        let addr = address("/p");
        let forwarded = vec![("x-request-id".to_string(), "r1".to_string())];
        assert_eq!(
            callout("POST", &addr, ("api-key", "k"), Some("12"), &forwarded),
            vec![
                (":method", "POST"),
                (":path", "/p"),
                (":authority", "res.openai.azure.com"),
                ("content-length", "12"),
                ("api-key", "k"),
                ("x-request-id", "r1"),
            ]
        );
        // A request on a stored response has no body to announce.
        assert_eq!(
            callout("GET", &addr, ("api-key", "k"), None, &[]),
            vec![
                (":method", "GET"),
                (":path", "/p"),
                (":authority", "res.openai.azure.com"),
                ("api-key", "k"),
            ]
        );
    }

    #[test]
    fn the_client_gets_an_answers_headers_but_not_its_framing_or_ours() {
        for name in [
            "content-type",
            "x-ratelimit-remaining-requests",
            "retry-after",
        ] {
            assert!(copied_to_client(name), "{name}");
        }
        for name in [
            ":status",
            "content-length",
            "transfer-encoding",
            TARGET_HEADER,
            CACHE_HEADER,
        ] {
            assert!(!copied_to_client(name), "{name}");
        }
    }
}
