//! Plugin configuration: any bytes give a `Config` or an error naming a field, never a panic;
//! what is accepted holds the invariants the filter relies on.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use llm_failover::config::{self, Credential, Env, KeyMatch};

struct FuzzEnv;

impl Env for FuzzEnv {
    fn var(&self, name: &str) -> Option<String> {
        match name {
            "KEY" => Some("secret".into()),
            "PADDED" => Some("  secret2 \n".into()),
            "BLANK" => Some(" ".into()),
            "SPACED" => Some("has space".into()),
            _ => None,
        }
    }
}

fn header_safe(s: &str) -> bool {
    !s.is_empty() && !s.bytes().any(|b| b.is_ascii_control() || b == b' ')
}

fuzz_target!(|data: &[u8]| {
    let c = match config::parse(data, &FuzzEnv) {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.field.is_empty() && !e.problem.is_empty(), "{e:?}");
            return;
        }
    };
    assert!(!c.targets.is_empty());
    assert!(!c.on_status_codes.is_empty());
    assert!(c.on_status_codes.iter().all(|s| !(200..300).contains(s)));
    assert!(c.max_request_body_bytes > 0);
    for (i, t) in c.targets.iter().enumerate() {
        assert_eq!(c.target_index(&t.name), Some(i), "target names are unique");
        assert!(header_safe(&t.name) && header_safe(&t.cluster) && header_safe(&t.host));
        assert!(t.retries <= 10);
        match &t.credential {
            Credential::ApiKey(s) | Credential::AzureAdToken(s) => assert!(header_safe(s)),
            Credential::Entra(source) => {
                assert!(t.azure.is_some(), "Entra ID tokens only for Azure targets");
                assert!(header_safe(&source.cluster) && header_safe(&source.authority));
                assert!(source.resource.starts_with("https://"));
            }
        }
        if let Some(az) = &t.azure {
            let url_safe = |s: &str| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            };
            assert!(url_safe(&az.api_version));
            assert!(az.deployments.values().all(|d| url_safe(d)));
            assert!(az.default_deployment.as_deref().is_none_or(url_safe));
            assert!(!az.deployments.is_empty() || az.default_deployment.is_some());
        }
        if let Some(cd) = &t.cooldown {
            assert!(cd.max_duration >= cd.duration);
            assert!(cd.min_attempts >= 1);
            assert!(cd.failure_rate.per_10000() <= 10_000);
            assert!(cd.window >= Duration::from_secs(1) && cd.window <= Duration::from_secs(3600));
        }
    }
    if let Some(keys) = &c.keys {
        assert!(!keys.is_empty());
        for (j, k) in keys.iter().enumerate() {
            assert!(k.targets.windows(2).all(|w| w[0] < w[1]));
            assert!(k.targets.iter().all(|&i| i < c.targets.len()));
            assert!(!k.targets.is_empty());
            let KeyMatch::Sha256(d) = &k.digest;
            assert!(keys[..j]
                .iter()
                .all(|o| o.name != k.name && o.digest != KeyMatch::Sha256(*d)));
        }
    }
    if let Some(cache) = &c.cache {
        assert!(!cache.ttl.is_zero() && cache.max_entries > 0 && cache.max_body_bytes > 0);
    }
    for (i, r) in c.routes.iter().enumerate() {
        assert!(r.path.starts_with('/') && !r.path.contains('?'));
        assert!(c.routes[..i].iter().all(|o| o.path != r.path && o.name != r.name));
        assert_eq!(c.route_for(&r.path), Some(i));
        assert!(!r.steps.is_empty());
        for (j, s) in r.steps.iter().enumerate() {
            assert!(s.target < c.targets.len() && s.retries <= 10);
            assert!(r.steps[..j].iter().all(|o| o.target != s.target));
        }
        let keys = c.keys.as_ref().map_or(0, Vec::len);
        assert!(r.keys.iter().flatten().all(|&k| k < keys));
    }
    // The same bytes always give the same configuration.
    assert_eq!(config::parse(data, &FuzzEnv).ok(), Some(c));
});
