//! What a request is, from its headers alone: who sent it (the gateway key) and what the filter
//! does with it (an operation it rewrites and fails over, or a pass-through to the first target).

use crate::answer::reply::Rejection;
use crate::config::{Config, Route};
use crate::request::auth;
use crate::request::operation::{Operation, Resource};

/// What the filter does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An operation: its body is read, the request rewritten per target and failed over.
    Operation(Operation),
    /// A stored response of the Responses API: sent once to the target that created it (the
    /// first allowed target when that is not known), addressed for that target.
    Resource(Resource),
    /// Any other request: sent once to the first allowed target with that target's host and
    /// credential, not judged and never retried.
    PassThrough,
}

pub fn classify(method: &str, path: &str) -> Kind {
    if let Some(op) = Operation::from_request(method, path) {
        return Kind::Operation(op);
    }
    match Resource::from_request(method, path) {
        Some(resource) => Kind::Resource(resource),
        None => Kind::PassThrough,
    }
}

impl Kind {
    pub fn operation(&self) -> Option<Operation> {
        match self {
            Kind::Operation(op) => Some(*op),
            _ => None,
        }
    }
}

/// Who may do what: the gateway key presented (an index into `Config::keys`), if keys are
/// configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub key: Option<usize>,
}

impl Access {
    /// The key's name, for the cache key and logs ("" without gateway keys).
    pub fn key_name<'c>(&self, config: &'c Config) -> &'c str {
        self.key
            .and_then(|k| config.keys.as_ref()?.get(k))
            .map_or("", |k| k.name.as_str())
    }

    /// The targets this request may use, in chain order.
    pub fn targets<'c>(&self, config: &'c Config) -> &'c [usize] {
        match self.key.and_then(|k| config.keys.as_ref()?.get(k)) {
            Some(key) => &key.targets,
            None => &config.chain,
        }
    }
}

/// Checks the gateway key when `keys` is configured: `Authorization: Bearer <key>` or
/// `api-key: <key>`, and that a route's `keys` name it. Without `keys` every request is allowed
/// every target.
pub fn authorize(
    config: &Config,
    route: Option<&Route>,
    authorization: Option<&[u8]>,
    api_key: Option<&[u8]>,
) -> Result<Access, Rejection> {
    let Some(keys) = &config.keys else {
        return Ok(Access { key: None });
    };
    let presented = auth::presented_key(authorization, api_key);
    let key = auth::authenticate(keys, presented)
        .and_then(|found| keys.iter().position(|k| std::ptr::eq(k, found)))
        .ok_or(Rejection::Unauthorized)?;
    match route {
        Some(r)
            if r.keys
                .as_ref()
                .is_some_and(|allowed| !allowed.contains(&key)) =>
        {
            Err(Rejection::Forbidden {
                route: r.name.clone(),
            })
        }
        _ => Ok(Access { key: Some(key) }),
    }
}

/// The route a request is on: a `POST` to a route's path.
pub fn route_for(config: &Config, method: &str, path: &str) -> Option<usize> {
    (method == "POST").then(|| config.route_for(path)).flatten()
}

/// The request id as logs show it: printable ASCII, at most 64 characters.
pub fn request_id(header: Option<&[u8]>) -> String {
    header
        .unwrap_or_default()
        .iter()
        .filter(|b| b.is_ascii_graphic())
        .take(64)
        .map(|&b| char::from(b))
        .collect()
}

/// `cache-control: no-cache` (anywhere in the value, any case) bypasses the cache.
pub fn bypasses_cache(cache_control: Option<&[u8]>) -> bool {
    cache_control.is_some_and(|v| v.windows(8).any(|w| w.eq_ignore_ascii_case(b"no-cache")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, NoEnv};
    use crate::request::operation::ResourceAction;
    use serde_json::json;

    fn sha(key: &str) -> String {
        auth::sha256(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn config(keys: Option<serde_json::Value>) -> Config {
        let mut c = json!({"targets": [
            {"name": "openai", "provider": "openai", "cluster": "o", "api_key": "k"},
            {"name": "azure", "provider": "azure", "cluster": "a", "api_key": "k",
             "resource_name": "r", "api_version": "2024-10-21", "deployment": "d"},
        ]});
        if let Some(keys) = keys {
            c["keys"] = keys;
        }
        config::parse(c.to_string().as_bytes(), &NoEnv).unwrap()
    }

    #[test]
    fn without_keys_every_request_may_use_every_target() {
        let c = config(None);
        let access = authorize(&c, None, Some(b"Bearer anything"), None).unwrap();
        assert_eq!(access.targets(&c), &[0, 1]);
        assert_eq!(access.key_name(&c), "");
    }

    #[test]
    fn a_key_allows_its_targets_and_nothing_else_passes() {
        let c = config(Some(json!([
            {"name": "app", "key_sha256": sha("gw-app")},
            {"name": "batch", "key_sha256": sha("gw-batch"), "targets": ["azure"]},
        ])));
        type Case<'a> = (
            Option<&'a [u8]>,
            Option<&'a [u8]>,
            Option<(&'a str, &'a [usize])>,
        );
        let cases: [Case; 6] = [
            (Some(b"Bearer gw-app"), None, Some(("app", &[0, 1]))),
            (None, Some(b"gw-batch"), Some(("batch", &[1]))),
            (Some(b"Basic x"), Some(b"gw-batch"), Some(("batch", &[1]))),
            (Some(b"Bearer gw-ap"), None, None),
            (None, None, None),
            (Some(b"Bearer "), Some(b""), None),
        ];
        for (authorization, api_key, want) in cases {
            let got = authorize(&c, None, authorization, api_key);
            match want {
                Some((name, targets)) => {
                    let access = got.unwrap();
                    assert_eq!((access.key_name(&c), access.targets(&c)), (name, targets));
                }
                None => assert_eq!(got, Err(Rejection::Unauthorized)),
            }
        }
    }

    #[test]
    fn a_route_admits_the_keys_it_names_and_refuses_other_valid_keys() {
        let mut c = config(Some(json!([
            {"name": "app", "key_sha256": sha("gw-app")},
            {"name": "batch", "key_sha256": sha("gw-batch")},
        ])));
        c.routes.push(crate::config::Route {
            name: "r".into(),
            path: "/r".into(),
            operation: Operation::ChatCompletions,
            steps: c.steps.clone(),
            cache: None,
            keys: Some(vec![1]),
            limits: None,
        });
        let route = c.routes.first();
        assert!(authorize(&c, route, Some(b"Bearer gw-batch"), None).is_ok());
        assert_eq!(
            authorize(&c, route, Some(b"Bearer gw-app"), None),
            Err(Rejection::Forbidden { route: "r".into() })
        );
        assert_eq!(
            authorize(&c, route, Some(b"Bearer nope"), None),
            Err(Rejection::Unauthorized)
        );
        assert!(authorize(&c, None, Some(b"Bearer gw-app"), None).is_ok());
        assert_eq!(route_for(&c, "POST", "/r?x=1"), Some(0));
        assert_eq!(route_for(&c, "GET", "/r"), None);
        assert_eq!(route_for(&c, "POST", "/r/"), None);
    }

    #[test]
    fn requests_are_operations_or_pass_throughs() {
        assert_eq!(
            classify("POST", "/v1/chat/completions?x=1"),
            Kind::Operation(Operation::ChatCompletions)
        );
        assert_eq!(classify("GET", "/v1/models"), Kind::PassThrough);
        assert_eq!(
            classify("DELETE", "/v1/responses/resp_9"),
            Kind::Resource(Resource {
                id: "resp_9".into(),
                action: ResourceAction::Delete
            })
        );
        assert_eq!(classify("PUT", "/v1/responses/resp_9"), Kind::PassThrough);
        assert_eq!(classify("GET", "/v1/chat/completions"), Kind::PassThrough);
    }

    #[test]
    fn request_ids_and_cache_bypass() {
        assert_eq!(request_id(Some(b"abc-1 \r\n\x00x")), "abc-1x");
        assert_eq!(request_id(Some("é".repeat(40).as_bytes())), "");
        assert_eq!(request_id(Some(&[b'a'; 100])).len(), 64);
        assert_eq!(request_id(None), "");
        assert!(bypasses_cache(Some(b"max-age=0, No-Cache")));
        assert!(!bypasses_cache(Some(b"no-store")));
        assert!(!bypasses_cache(None));
    }
}
