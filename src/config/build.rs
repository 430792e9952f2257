//! One validation pass from [`RawConfig`] to [`Config`]: defaults, ranges, cross-references and
//! secrets from the environment. serde's own errors (types, unknown fields) are reworded here
//! too, so every refusal reads `<field path>: <problem>`.

use std::time::Duration;

use serde_path_to_error::Segment;

use super::raw::{
    Deferred, Dur, LongDur, Mode, Obj, RawAzureAd, RawCache, RawConfig, RawCooldown,
    RawCooldownSwitch, RawKey, RawLimit, RawLimits, RawOperation, RawProvider, RawResponses,
    RawRoute, RawStep, RawStrategy, RawTarget, Role, StreamFailover, Text, Window,
};
use super::*;
use crate::quote;
use crate::request::operation::Operation;

mod errors;
mod routes;
mod target;

use errors::{from_serde, invalid_json};
use routes::{key, routes};
use target::target;

// The breaker's defaults (docs/failure-semantics.md, section 5): at least half of at least 10
// attempts in 10 s, or 3 transport failures in a row, cool a target for 30 s.
const DEFAULT_FAILURE_RATE: Rate = Rate::from_per_10000(5_000);
const DEFAULT_MIN_ATTEMPTS: u32 = 10;
const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
const MIN_WINDOW: Duration = Duration::from_secs(1);
const MAX_WINDOW: Duration = Duration::from_secs(3600);
const DEFAULT_TRANSPORT_FAILURES: u32 = 3;
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);
const DEFAULT_COOLDOWN_MAX: Duration = Duration::from_secs(300);
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
const DEFAULT_CACHE_ENTRIES: u32 = 1024;
const DEFAULT_CACHE_BODY: usize = 256 * 1024;
const MAX_CACHE_ENTRIES: u32 = 1_000_000;
const MAX_CACHE_BODY: u64 = 4 * 1024 * 1024;
const MAX_REQUEST_BODY: u64 = 64 * 1024 * 1024;
const MAX_RETRIES: u32 = 10;
const DEFAULT_AFFINITY_TTL: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_AFFINITY_ENTRIES: u32 = 16384;

/// Parses and validates the plugin configuration of the filter itself.
pub fn parse(json: &[u8], env: &dyn Env) -> Result<Config, ConfigError> {
    match parse_plugin(json, env)? {
        Plugin::Filter(config) => Ok(*config),
        Plugin::Upstream => Err(ConfigError::new(
            "role",
            "\"upstream\" is the configuration of the upstream filter of the streamed-failover \
             clusters, not of the filter",
        )),
    }
}

/// Parses and validates a plugin configuration: the filter's, or the upstream filter's
/// (`{"role": "upstream"}`).
pub fn parse_plugin(json: &[u8], env: &dyn Env) -> Result<Plugin, ConfigError> {
    let raw = read(json)?;
    if raw.role == Some(Role::Upstream) {
        return match set_fields(&raw).first() {
            None => Ok(Plugin::Upstream),
            Some(field) => Err(ConfigError::new(
                *field,
                "not allowed with role \"upstream\" (the upstream filter works from the \
                 filter's own configuration)",
            )),
        };
    }
    build(raw, env).map(|c| Plugin::Filter(Box::new(c)))
}

/// The plugin JSON read into its raw types (kept out of line: see `build`).
#[inline(never)]
fn read(json: &[u8]) -> Result<RawConfig, ConfigError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let raw: Obj<RawConfig> = serde_path_to_error::deserialize(&mut de).map_err(from_serde)?;
    de.end().map_err(|e| invalid_json(&e))?;
    Ok(raw.0)
}

/// The top-level fields a configuration sets besides `role` and `$schema`.
fn set_fields(raw: &RawConfig) -> Vec<&'static str> {
    [
        ("streaming", raw.streaming.is_some()),
        ("strategy", raw.strategy.is_some()),
        ("targets", raw.targets.is_some()),
        ("keys", raw.keys.is_some()),
        ("cache", raw.cache.is_some()),
        ("responses", raw.responses.is_some()),
        ("routes", raw.routes.is_some()),
        ("deployment_models", raw.deployment_models.is_some()),
        ("deadline", raw.deadline.is_some()),
        (
            "max_request_body_bytes",
            raw.max_request_body_bytes.is_some(),
        ),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect()
}

/// The validation pass. Its parts are kept out of line (`#[inline(never)]`): inlined, they made
/// one 29 KB function, which Envoy's V8 compiles at start-up with its optimising compiler only,
/// whose memory grows faster than a function's size (docs/performance.md, "Footprint").
#[inline(never)]
fn build(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigError> {
    let stream_failover = raw
        .streaming
        .and_then(|Obj(s)| s.failover)
        .unwrap_or(StreamFailover::Router);
    let strategy = raw.strategy.map(|s| s.0);
    let loadbalance = strategy.as_ref().and_then(|s| s.mode) == Some(Mode::Loadbalance);
    let Strategy {
        on_status_codes,
        failover_on_content_filter,
        failover_on_credential_rejection,
        max_retry_wait,
    } = strategy_settings(strategy)?;

    let raw_targets = raw
        .targets
        .ok_or_else(|| ConfigError::new("targets", "missing"))?;
    if raw_targets.is_empty() {
        return Err(ConfigError::new("targets", "empty (at least one target)"));
    }
    let mut targets: Vec<Target> = Vec::with_capacity(raw_targets.len());
    for (i, Obj(t)) in raw_targets.into_iter().enumerate() {
        let field = format!("targets[{i}]");
        let t = target(t, &field, env)?;
        if targets.iter().any(|o| o.name == t.name) {
            return Err(ConfigError::new(
                format!("{field}.name"),
                format!("duplicate target name {}", quote(&t.name)),
            ));
        }
        targets.push(t);
    }

    let keys = match raw.keys {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(ConfigError::new(
                "keys",
                "empty list would reject every request (omit `keys` to disable gateway keys)",
            ))
        }
        Some(list) => {
            let mut keys: Vec<GatewayKey> = Vec::with_capacity(list.len());
            for (i, Obj(k)) in list.into_iter().enumerate() {
                let field = format!("keys[{i}]");
                let k = key(k, &field, &targets, env)?;
                if keys.iter().any(|o| o.name == k.name) {
                    return Err(ConfigError::new(
                        format!("{field}.name"),
                        format!("duplicate key name {}", quote(&k.name)),
                    ));
                }
                if keys.iter().any(|o| o.digest == k.digest) {
                    return Err(ConfigError::new(
                        field,
                        "same key as an earlier entry (each gateway key must be distinct)",
                    ));
                }
                keys.push(k);
            }
            Some(keys)
        }
    };

    let cache = match raw.cache {
        None => None,
        Some(Obj(c)) => cache(c, "cache", "")?,
    };
    let routes = routes(raw.routes.unwrap_or_default(), &targets, keys.as_deref())?;
    if loadbalance {
        if targets.iter().all(|t| t.weight == 0) {
            return Err(ConfigError::new(
                "targets",
                "no target has a weight above 0 for strategy.mode \"loadbalance\"",
            ));
        }
        for (i, r) in routes.iter().enumerate() {
            let weighed = r
                .steps
                .iter()
                .any(|s| targets.get(s.target).is_some_and(|t| t.weight > 0));
            if !weighed {
                return Err(ConfigError::new(
                    format!("routes[{i}].targets"),
                    "no step's target has a weight above 0 for strategy.mode \"loadbalance\"",
                ));
            }
        }
    }
    let responses = responses(raw.responses.map(|Obj(r)| r))?;
    let deployment_models = deployment_models(raw.deployment_models, &targets)?;
    let deadline = duration(raw.deadline, DEFAULT_DEADLINE);
    let max_request_body_bytes = match raw.max_request_body_bytes {
        None => DEFAULT_MAX_BODY,
        Some(n) => bounded(n, 1, MAX_REQUEST_BODY, "max_request_body_bytes")?,
    };

    Ok(Config {
        stream_failover: stream_failover == StreamFailover::Router,
        loadbalance,
        on_status_codes,
        failover_on_content_filter,
        failover_on_credential_rejection,
        max_retry_wait,
        chain: (0..targets.len()).collect(),
        steps: targets
            .iter()
            .enumerate()
            .map(|(i, t)| Step::of(i, t))
            .collect(),
        targets,
        routes,
        deployment_models,
        keys,
        cache,
        responses,
        deadline,
        max_request_body_bytes,
    })
}

/// `deployment_models` checked, completed with every deployment that the Azure targets'
/// `deployments` map exactly one model to (the explicit entries win).
fn deployment_models(
    raw: Option<BTreeMap<String, String>>,
    targets: &[Target],
) -> Result<BTreeMap<String, String>, ConfigError> {
    let explicit = raw.unwrap_or_default();
    for (deployment, model) in &explicit {
        let field = || format!("deployment_models[{}]", quote(deployment));
        target::check_deployment(Some(deployment), field)?;
        if model.is_empty() || model.len() > 256 || model.chars().any(char::is_control) {
            return Err(ConfigError::new(
                field(),
                "must be a model name (1-256 characters)",
            ));
        }
    }
    let mut models: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    let azure_maps = targets.iter().filter_map(|t| t.azure.as_ref());
    for (model, deployment) in azure_maps.flat_map(|a| a.deployments.iter()) {
        models
            .entry(deployment)
            .and_modify(|seen| {
                if *seen != Some(model.as_str()) {
                    *seen = None;
                }
            })
            .or_insert(Some(model));
    }
    let mut merged: BTreeMap<String, String> = models
        .into_iter()
        .filter_map(|(d, m)| Some((d.to_string(), m?.to_string())))
        .collect();
    merged.extend(explicit);
    Ok(merged)
}

#[inline(never)] // kept out of `build` (see there)
fn responses(raw: Option<RawResponses>) -> Result<ResponsesSettings, ConfigError> {
    let raw = raw.unwrap_or(RawResponses {
        affinity_ttl: None,
        max_affinity_entries: None,
    });
    let max_affinity_entries = match raw.max_affinity_entries {
        None => DEFAULT_AFFINITY_ENTRIES,
        Some(n) => bounded(
            u64::from(n),
            1,
            u64::from(MAX_CACHE_ENTRIES),
            "responses.max_affinity_entries",
        )? as u32,
    };
    Ok(ResponsesSettings {
        affinity_ttl: raw
            .affinity_ttl
            .map_or(DEFAULT_AFFINITY_TTL, |Text(LongDur(d))| d),
        max_affinity_entries,
    })
}

/// How attempts are judged, from `strategy`.
struct Strategy {
    on_status_codes: Vec<u16>,
    failover_on_content_filter: bool,
    failover_on_credential_rejection: bool,
    max_retry_wait: Duration,
}

#[inline(never)] // kept out of `build` (see there)
fn strategy_settings(s: Option<RawStrategy>) -> Result<Strategy, ConfigError> {
    let s = s.unwrap_or(RawStrategy {
        mode: None,
        on_status_codes: None,
        failover_on_content_filter: None,
        failover_on_credential_rejection: None,
        max_retry_wait: None,
    });
    let codes = match s.on_status_codes {
        None => std::iter::once(429).chain(500..=599).collect(),
        Some(codes) if codes.is_empty() => {
            return Err(ConfigError::new(
                "strategy.on_status_codes",
                "empty list (omit it for the default [429, 500..599])",
            ))
        }
        Some(codes) => {
            for (i, c) in codes.iter().enumerate() {
                if !(100..=599).contains(c) || (200..300).contains(c) {
                    return Err(ConfigError::new(
                        format!("strategy.on_status_codes[{i}]"),
                        format!("{c} is not a failure status (expected 100-199 or 300-599)"),
                    ));
                }
            }
            codes
        }
    };
    Ok(Strategy {
        on_status_codes: codes,
        failover_on_content_filter: s.failover_on_content_filter.unwrap_or(false),
        failover_on_credential_rejection: s.failover_on_credential_rejection.unwrap_or(true),
        max_retry_wait: duration(s.max_retry_wait, DEFAULT_MAX_RETRY_WAIT),
    })
}

fn cache(raw: RawCache, field: &str, scope: &str) -> Result<Option<CacheSettings>, ConfigError> {
    if raw.enabled != Some(true) {
        return Ok(None);
    }
    let ttl = deferred(raw.ttl, &format!("{field}.ttl"), DEFAULT_CACHE_TTL)?;
    if ttl.is_zero() {
        return Err(ConfigError::new(
            format!("{field}.ttl"),
            "must be greater than 0",
        ));
    }
    let max_entries = match raw.max_entries {
        None => DEFAULT_CACHE_ENTRIES,
        Some(n) => bounded(
            u64::from(n),
            1,
            u64::from(MAX_CACHE_ENTRIES),
            &format!("{field}.max_entries"),
        )? as u32,
    };
    let max_body_bytes = match raw.max_body_bytes {
        None => DEFAULT_CACHE_BODY,
        Some(n) => bounded(n, 1, MAX_CACHE_BODY, &format!("{field}.max_body_bytes"))?,
    };
    Ok(Some(CacheSettings {
        scope: scope.to_string(),
        ttl,
        max_entries,
        max_body_bytes,
    }))
}

fn duration(d: Option<Text<Dur>>, default: Duration) -> Duration {
    d.map_or(default, |Text(Dur(d))| d)
}

fn deferred(
    d: Option<Deferred<Dur>>,
    field: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    d.map_or(Ok(default), |d| d.read(field).map(|Dur(d)| d))
}

fn bounded(n: u64, min: u64, max: u64, field: &str) -> Result<usize, ConfigError> {
    if (min..=max).contains(&n) {
        usize::try_from(n).map_err(|_| ConfigError::new(field, "too large"))
    } else {
        Err(ConfigError::new(
            field,
            format!("must be between {min} and {max}"),
        ))
    }
}

fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    hex::FromHex::from_hex(s.trim()).ok()
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn is_url_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.".contains(&b)
}
