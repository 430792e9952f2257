//! One validation pass from [`RawConfig`] to [`Config`]: defaults, ranges, cross-references and
//! secrets from the environment. serde's own errors (types, unknown fields) are reworded here
//! too, so every refusal reads `<field path>: <problem>`.

use std::time::Duration;

use serde_path_to_error::Segment;

use super::raw::{
    Deferred, Dur, LongDur, Mode, Obj, RawAzureAd, RawCache, RawConfig, RawCooldown,
    RawCooldownSwitch, RawKey, RawOperation, RawProvider, RawResponses, RawRoute, RawStep,
    RawStrategy, RawTarget, Role, StreamFailover, Text,
};
use super::*;
use crate::operation::Operation;
use crate::quote;

const DEFAULT_COOLDOWN_FAILURES: u32 = 3;
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
    let mut de = serde_json::Deserializer::from_slice(json);
    let raw: Obj<RawConfig> = serde_path_to_error::deserialize(&mut de).map_err(from_serde)?;
    de.end().map_err(|e| invalid_json(&e))?;
    let raw = raw.0;
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

fn build(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigError> {
    let stream_failover = raw
        .streaming
        .and_then(|Obj(s)| s.failover)
        .unwrap_or(StreamFailover::Router);
    let strategy = raw.strategy.map(|s| s.0);
    let loadbalance = strategy.as_ref().and_then(|s| s.mode) == Some(Mode::Loadbalance);
    let (on_status_codes, failover_on_content_filter, max_retry_wait) =
        strategy_settings(strategy)?;

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
        max_retry_wait,
        chain: (0..targets.len()).collect(),
        steps: targets
            .iter()
            .enumerate()
            .map(|(i, t)| Step::of(i, t))
            .collect(),
        targets,
        routes,
        keys,
        cache,
        responses,
        deadline,
        max_request_body_bytes,
    })
}

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

fn strategy_settings(s: Option<RawStrategy>) -> Result<(Vec<u16>, bool, Duration), ConfigError> {
    let s = s.unwrap_or(RawStrategy {
        mode: None,
        on_status_codes: None,
        failover_on_content_filter: None,
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
    Ok((
        codes,
        s.failover_on_content_filter.unwrap_or(false),
        duration(s.max_retry_wait, DEFAULT_MAX_RETRY_WAIT),
    ))
}

fn target(raw: RawTarget, field: &str, env: &dyn Env) -> Result<Target, ConfigError> {
    let at = |name: &str| format!("{field}.{name}");
    let provider = match raw.provider {
        Some(RawProvider::OpenAi) => Provider::OpenAi,
        Some(RawProvider::Azure) => Provider::Azure,
        None => return Err(ConfigError::new(at("provider"), "missing")),
    };
    let credential = credential(&raw, provider, field, env)?;
    let name = raw.name.unwrap_or_else(|| provider.as_str().to_string());
    if !is_name(&name) {
        return Err(ConfigError::new(
            at("name"),
            "must be 1-64 characters of letters, digits, '_' or '-' (it appears in stats and headers)",
        ));
    }
    let cluster = raw
        .cluster
        .ok_or_else(|| ConfigError::new(at("cluster"), "missing"))?;
    if cluster.is_empty() || cluster.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(ConfigError::new(
            at("cluster"),
            "must be a non-empty Envoy cluster name",
        ));
    }
    let retries = raw.retries.unwrap_or(0);
    if retries > MAX_RETRIES {
        return Err(ConfigError::new(
            at("retries"),
            format!("at most {MAX_RETRIES} (use more targets instead)"),
        ));
    }
    if raw.model.as_deref() == Some("") {
        return Err(ConfigError::new(at("model"), "empty"));
    }

    let (host, azure) = match provider {
        Provider::OpenAi => {
            for (set, name) in [
                (raw.resource_name.is_some(), "resource_name"),
                (raw.api_version.is_some(), "api_version"),
                (raw.deployments.is_some(), "deployments"),
                (raw.deployment.is_some(), "deployment"),
                (raw.azure_ad_token_env.is_some(), "azure_ad_token_env"),
            ] {
                if set {
                    return Err(ConfigError::new(
                        at(name),
                        "only valid for provider \"azure\"",
                    ));
                }
            }
            let host = raw.host.unwrap_or_else(|| "api.openai.com".to_string());
            (host, None)
        }
        Provider::Azure => {
            let host = match (raw.host, &raw.resource_name) {
                (Some(h), _) => h,
                (None, Some(r)) if is_dns_label(r) => format!("{r}.openai.azure.com"),
                (None, Some(_)) => {
                    return Err(ConfigError::new(
                        at("resource_name"),
                        "must be a DNS label (letters, digits, '-')",
                    ))
                }
                (None, None) => {
                    return Err(ConfigError::new(
                        at("resource_name"),
                        "missing (required for provider \"azure\" unless `host` is set)",
                    ))
                }
            };
            let azure = azure_settings(raw.api_version, raw.deployments, raw.deployment, field)?;
            (host, Some(azure))
        }
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    {
        return Err(ConfigError::new(
            at("host"),
            "must be a host name, optionally with :port",
        ));
    }
    let cooldown = cooldown(raw.cooldown, &at("cooldown"))?;
    let spillover = match raw.spillover {
        None => None,
        Some(Obj(s)) => {
            if s.min_remaining_requests.is_none() && s.min_remaining_tokens.is_none() {
                return Err(ConfigError::new(
                    at("spillover"),
                    "set min_remaining_requests, min_remaining_tokens or both",
                ));
            }
            Some(Spillover {
                min_remaining_requests: s.min_remaining_requests,
                min_remaining_tokens: s.min_remaining_tokens,
            })
        }
    };

    Ok(Target {
        name,
        provider,
        cluster,
        host,
        credential,
        retries,
        timeout: duration(raw.timeout, DEFAULT_TIMEOUT),
        model: raw.model,
        override_params: raw.override_params,
        azure,
        cooldown,
        weight: raw.weight.unwrap_or(1),
        spillover,
    })
}

fn azure_settings(
    api_version: Option<String>,
    deployments: Option<std::collections::BTreeMap<String, String>>,
    deployment: Option<String>,
    field: &str,
) -> Result<AzureSettings, ConfigError> {
    let api_version = api_version.ok_or_else(|| {
        ConfigError::new(
            format!("{field}.api_version"),
            "missing (required for provider \"azure\")",
        )
    })?;
    if api_version.is_empty() || !api_version.bytes().all(is_url_safe) {
        return Err(ConfigError::new(
            format!("{field}.api_version"),
            "must be a version like \"2024-10-21\"",
        ));
    }
    let mut deployments = deployments.unwrap_or_default();
    let mut default_deployment = deployments.remove("*");
    // In key order, `"*"` among the others: the first bad one is named.
    for (model, dep) in &deployments {
        if model.as_str() > "*" {
            check_deployment(default_deployment.as_deref(), || {
                format!("{field}.deployments[\"*\"]")
            })?;
        }
        check_deployment(Some(dep), || {
            format!("{field}.deployments[{}]", quote(model))
        })?;
    }
    check_deployment(default_deployment.as_deref(), || {
        format!("{field}.deployments[\"*\"]")
    })?;
    if let Some(d) = deployment {
        if default_deployment.is_some() {
            return Err(ConfigError::new(
                format!("{field}.deployment"),
                "conflicts with deployments[\"*\"]; set one of them",
            ));
        }
        check_deployment(Some(&d), || format!("{field}.deployment"))?;
        default_deployment = Some(d);
    }
    if deployments.is_empty() && default_deployment.is_none() {
        return Err(ConfigError::new(
            format!("{field}.deployments"),
            "missing (required for provider \"azure\": a model -> deployment map, or `deployment`)",
        ));
    }
    let api = if api_version == "v1" {
        AzureApi::V1
    } else {
        AzureApi::Deployments
    };
    Ok(AzureSettings {
        api,
        api_version,
        deployments,
        default_deployment,
    })
}

fn check_deployment(dep: Option<&str>, field: impl Fn() -> String) -> Result<(), ConfigError> {
    match dep {
        Some(d) if d.is_empty() || !d.bytes().all(is_url_safe) => Err(ConfigError::new(
            field(),
            "deployment names are letters, digits, '-', '_' or '.'",
        )),
        // A URL resolves these path segments away.
        Some("." | "..") => Err(ConfigError::new(
            field(),
            "\".\" and \"..\" cannot name a deployment in a URL",
        )),
        _ => Ok(()),
    }
}

fn credential(
    raw: &RawTarget,
    provider: Provider,
    field: &str,
    env: &dyn Env,
) -> Result<Credential, ConfigError> {
    // Errors name a field the target sets, in the order the fields are read.
    let set: Vec<&str> = [
        ("api_key_env", raw.api_key_env.is_some()),
        ("azure_ad_token_env", raw.azure_ad_token_env.is_some()),
        ("azure_ad", raw.azure_ad.is_some()),
        ("api_key", raw.api_key.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    let used = match set.as_slice() {
        [] => {
            let hint = match provider {
                Provider::OpenAi => "api_key_env",
                Provider::Azure => "api_key_env, azure_ad or azure_ad_token_env",
            };
            return Err(ConfigError::new(
                format!("{field}.api_key_env"),
                format!("missing: set {hint}"),
            ));
        }
        [one] => *one,
        [first, ..] => {
            return Err(ConfigError::new(
                format!("{field}.{first}"),
                "set only one of api_key_env, api_key, azure_ad_token_env, azure_ad",
            ))
        }
    };
    if let Some(Obj(ad)) = &raw.azure_ad {
        if provider != Provider::Azure {
            return Err(ConfigError::new(
                format!("{field}.azure_ad"),
                "only valid for provider \"azure\"",
            ));
        }
        return entra(ad, &format!("{field}.azure_ad"), env).map(Credential::Entra);
    }
    let from_env = |var: &str| -> Result<String, ConfigError> {
        let value = env.var(var).unwrap_or_default().trim().to_string();
        if value.is_empty() {
            return Err(ConfigError::new(
                format!("{field}.{used}"),
                format!(
                    "environment variable {} is not set or empty in the VM \
                     (list it in vm_config.environment_variables)",
                    quote(var)
                ),
            ));
        }
        Ok(value)
    };
    let credential = match (&raw.api_key_env, &raw.azure_ad_token_env, &raw.api_key) {
        (Some(var), _, _) => Credential::ApiKey(from_env(var)?),
        (_, Some(var), _) => Credential::AzureAdToken(from_env(var)?),
        (_, _, key) => {
            let key = key.as_deref().unwrap_or_default().trim();
            if key.is_empty() {
                return Err(ConfigError::new(format!("{field}.api_key"), "empty"));
            }
            Credential::ApiKey(key.to_string())
        }
    };
    let (Credential::ApiKey(secret) | Credential::AzureAdToken(secret)) = &credential else {
        return Ok(credential);
    };
    if !secret.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(ConfigError::new(
            format!("{field}.{used}"),
            "the credential has characters not allowed in a header value",
        ));
    }
    Ok(credential)
}

const ENTRA_LOGIN_HOST: &str = "login.microsoftonline.com";
const IMDS_HOST: &str = "169.254.169.254";
const COGNITIVE_SERVICES: &str = "https://cognitiveservices.azure.com";

fn entra(raw: &RawAzureAd, field: &str, env: &dyn Env) -> Result<EntraSource, ConfigError> {
    let at = |name: &str| format!("{field}.{name}");
    let cluster = raw
        .cluster
        .clone()
        .ok_or_else(|| ConfigError::new(at("cluster"), "missing"))?;
    if cluster.is_empty() || cluster.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(ConfigError::new(
            at("cluster"),
            "must be a non-empty Envoy cluster name",
        ));
    }
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    let managed = raw.managed_identity == Some(true);
    let kind = if managed {
        for (set, name) in [
            (raw.tenant_id.is_some(), "tenant_id"),
            (raw.client_secret_env.is_some(), "client_secret_env"),
        ] {
            if set {
                return Err(ConfigError::new(
                    at(name),
                    "not used with managed_identity (IMDS needs no secret)",
                ));
            }
        }
        if raw.client_id.as_deref().is_some_and(|c| !plain(c)) {
            return Err(ConfigError::new(at("client_id"), "must be an id"));
        }
        EntraKind::ManagedIdentity {
            client_id: raw.client_id.clone(),
        }
    } else {
        let need = |value: &Option<String>, name: &str| -> Result<String, ConfigError> {
            let v = value.clone().ok_or_else(|| {
                ConfigError::new(
                    at(name),
                    "missing (client credentials need tenant_id, client_id and client_secret_env; or set managed_identity: true)",
                )
            })?;
            if plain(&v) {
                Ok(v)
            } else {
                Err(ConfigError::new(at(name), "must be an id without spaces"))
            }
        };
        let tenant_id = need(&raw.tenant_id, "tenant_id")?;
        let client_id = need(&raw.client_id, "client_id")?;
        let var = need(&raw.client_secret_env, "client_secret_env")?;
        let client_secret = env.var(&var).unwrap_or_default().trim().to_string();
        if client_secret.is_empty() {
            return Err(ConfigError::new(
                at("client_secret_env"),
                format!(
                    "environment variable {} is not set or empty in the VM \
                     (list it in vm_config.environment_variables)",
                    quote(&var)
                ),
            ));
        }
        EntraKind::ClientCredentials {
            tenant_id,
            client_id,
            client_secret,
        }
    };
    let default_host = if managed { IMDS_HOST } else { ENTRA_LOGIN_HOST };
    let authority = raw.host.clone().unwrap_or_else(|| default_host.to_string());
    if !plain(&authority) {
        return Err(ConfigError::new(
            at("host"),
            "must be a host name, optionally with :port",
        ));
    }
    let resource = raw
        .resource
        .clone()
        .unwrap_or_else(|| COGNITIVE_SERVICES.to_string());
    if !resource.starts_with("https://") || !plain(&resource) {
        return Err(ConfigError::new(
            at("resource"),
            "must be an https:// resource URI (e.g. \"https://cognitiveservices.azure.com\")",
        ));
    }
    Ok(EntraSource {
        cluster,
        authority,
        resource,
        kind,
    })
}

fn cooldown(raw: Option<RawCooldownSwitch>, field: &str) -> Result<Option<Cooldown>, ConfigError> {
    let default = Cooldown {
        after_failures: DEFAULT_COOLDOWN_FAILURES,
        duration: DEFAULT_COOLDOWN,
        max_duration: DEFAULT_COOLDOWN_MAX,
    };
    let raw: RawCooldown = match raw {
        None | Some(RawCooldownSwitch::Enabled(true)) => return Ok(Some(default)),
        Some(RawCooldownSwitch::Enabled(false)) => return Ok(None),
        Some(RawCooldownSwitch::Policy(p)) => p,
    };
    if raw.enabled == Some(false) {
        return Ok(None);
    }
    let duration_ = deferred(raw.duration, &format!("{field}.duration"), DEFAULT_COOLDOWN)?;
    let max_duration = deferred(
        raw.max_duration,
        &format!("{field}.max_duration"),
        DEFAULT_COOLDOWN_MAX.max(duration_),
    )?;
    if max_duration < duration_ {
        return Err(ConfigError::new(
            format!("{field}.max_duration"),
            "must not be shorter than duration",
        ));
    }
    Ok(Some(Cooldown {
        after_failures: raw.after_failures.unwrap_or(DEFAULT_COOLDOWN_FAILURES),
        duration: duration_,
        max_duration,
    }))
}

fn key(
    raw: RawKey,
    field: &str,
    targets: &[Target],
    env: &dyn Env,
) -> Result<GatewayKey, ConfigError> {
    let name = raw
        .name
        .ok_or_else(|| ConfigError::new(format!("{field}.name"), "missing"))?;
    if !is_name(&name) {
        return Err(ConfigError::new(
            format!("{field}.name"),
            "must be 1-64 characters of letters, digits, '_' or '-'",
        ));
    }
    let digest = match (raw.key_sha256, raw.key_env) {
        (Some(hex), None) => KeyMatch::Sha256(parse_sha256_hex(&hex).ok_or_else(|| {
            ConfigError::new(
                format!("{field}.key_sha256"),
                "must be 64 hex digits (the SHA-256 of the gateway key)",
            )
        })?),
        (None, Some(var)) => {
            let key = env.var(&var).unwrap_or_default();
            let key = key.trim();
            if key.is_empty() {
                return Err(ConfigError::new(
                    format!("{field}.key_env"),
                    format!(
                        "environment variable {} is not set or empty in the VM",
                        quote(&var)
                    ),
                ));
            }
            KeyMatch::Sha256(crate::auth::sha256(key.as_bytes()))
        }
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                format!("{field}.key_sha256"),
                "set only one of key_sha256 and key_env",
            ))
        }
        (None, None) => {
            return Err(ConfigError::new(
                format!("{field}.key_sha256"),
                "missing: set key_sha256 or key_env",
            ))
        }
    };
    let allowed = match raw.targets {
        None => (0..targets.len()).collect(),
        Some(names) if names.is_empty() => {
            return Err(ConfigError::new(
                format!("{field}.targets"),
                "empty (omit it to allow every target)",
            ))
        }
        Some(names) => {
            let mut allowed = Vec::with_capacity(names.len());
            for (j, n) in names.iter().enumerate() {
                let i = targets.iter().position(|t| &t.name == n).ok_or_else(|| {
                    ConfigError::new(
                        format!("{field}.targets[{j}]"),
                        format!("no target named {}", quote(n)),
                    )
                })?;
                allowed.push(i);
            }
            // Chain order is the order of `targets`, whatever order the key lists them in.
            allowed.sort_unstable();
            allowed.dedup();
            allowed
        }
    };
    Ok(GatewayKey {
        name,
        digest,
        targets: allowed,
    })
}

fn routes(
    raw: Vec<Obj<RawRoute>>,
    targets: &[Target],
    keys: Option<&[GatewayKey]>,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes: Vec<Route> = Vec::with_capacity(raw.len());
    for (i, Obj(r)) in raw.into_iter().enumerate() {
        let field = format!("routes[{i}]");
        let route = route(r, &field, targets, keys)?;
        if routes.iter().any(|o| o.name == route.name) {
            return Err(ConfigError::new(
                format!("{field}.name"),
                format!("duplicate route name {}", quote(&route.name)),
            ));
        }
        if let Some(other) = routes.iter().find(|o| o.path == route.path) {
            return Err(ConfigError::new(
                format!("{field}.path"),
                format!(
                    "{} is already the path of route {}",
                    quote(&route.path),
                    quote(&other.name)
                ),
            ));
        }
        routes.push(route);
    }
    Ok(routes)
}

fn route(
    raw: RawRoute,
    field: &str,
    targets: &[Target],
    keys: Option<&[GatewayKey]>,
) -> Result<Route, ConfigError> {
    let at = |name: &str| format!("{field}.{name}");
    let name = raw
        .name
        .ok_or_else(|| ConfigError::new(at("name"), "missing"))?;
    if !is_name(&name) {
        return Err(ConfigError::new(
            at("name"),
            "must be 1-64 characters of letters, digits, '_' or '-' (it appears in stats and logs)",
        ));
    }
    let path = raw
        .path
        .ok_or_else(|| ConfigError::new(at("path"), "missing"))?;
    let printable = path.bytes().all(|b| b.is_ascii_graphic());
    if !path.starts_with('/') || !printable || path.contains(['?', '#']) {
        return Err(ConfigError::new(
            at("path"),
            "must be a path starting with '/', without a query string (e.g. \"/api/routes/test/chat/completion\")",
        ));
    }
    let operation = match raw.operation {
        Some(RawOperation::Chat) => Operation::ChatCompletions,
        Some(RawOperation::Completions) => Operation::Completions,
        Some(RawOperation::Embeddings) => Operation::Embeddings,
        Some(RawOperation::Responses) => Operation::Responses,
        None => return Err(ConfigError::new(at("operation"), "missing")),
    };
    let raw_steps = raw
        .targets
        .ok_or_else(|| ConfigError::new(at("targets"), "missing"))?;
    if raw_steps.is_empty() {
        return Err(ConfigError::new(
            at("targets"),
            "empty (at least one target)",
        ));
    }
    let mut steps: Vec<Step> = Vec::with_capacity(raw_steps.len());
    for (j, raw_step) in raw_steps.into_iter().enumerate() {
        let step_field = format!("{field}.targets[{j}]");
        let step = step(raw_step, &step_field, targets)?;
        if steps.iter().any(|s| s.target == step.target) {
            return Err(ConfigError::new(
                step_field,
                "the target is already a step of this route",
            ));
        }
        steps.push(step);
    }
    let cache = match raw.cache {
        None => None,
        Some(Obj(c)) => cache(c, &at("cache"), &name)?,
    };
    if cache.is_some() && operation != Operation::ChatCompletions {
        return Err(ConfigError::new(
            at("cache"),
            "only chat routes are cached (responses are state, embeddings and completions are not cached)",
        ));
    }
    let keys =
        match (raw.keys, keys) {
            (None, _) => None,
            (Some(_), None) => return Err(ConfigError::new(
                at("keys"),
                "the top-level `keys` is absent, so no request presents a gateway key (add `keys`)",
            )),
            (Some(names), Some(_)) if names.is_empty() => {
                return Err(ConfigError::new(
                    at("keys"),
                    "empty list would refuse every request (omit it to allow every key)",
                ))
            }
            (Some(names), Some(keys)) => {
                let mut allowed = Vec::with_capacity(names.len());
                for (j, n) in names.iter().enumerate() {
                    let k = keys.iter().position(|k| &k.name == n).ok_or_else(|| {
                        ConfigError::new(
                            format!("{field}.keys[{j}]"),
                            format!("no key named {}", quote(n)),
                        )
                    })?;
                    allowed.push(k);
                }
                Some(allowed)
            }
        };
    Ok(Route {
        name,
        path,
        operation,
        steps,
        cache,
        keys,
    })
}

fn step(raw: RawStep, field: &str, targets: &[Target]) -> Result<Step, ConfigError> {
    let find = |name: &str, field: String| {
        targets
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| ConfigError::new(field, format!("unknown target {}", quote(name))))
    };
    let s = match raw {
        RawStep::Name(name) => {
            let i = find(&name, field.to_string())?;
            return Ok(Step::of(
                i,
                targets.get(i).ok_or_else(|| ConfigError::new(field, "?"))?,
            ));
        }
        RawStep::Step(s) => s,
    };
    let name = s
        .target
        .ok_or_else(|| ConfigError::new(format!("{field}.target"), "missing"))?;
    let i = find(&name, format!("{field}.target"))?;
    let Some(t) = targets.get(i) else {
        return Err(ConfigError::new(
            format!("{field}.target"),
            "unknown target",
        ));
    };
    let retries = s.retries.unwrap_or(t.retries);
    if retries > MAX_RETRIES {
        return Err(ConfigError::new(
            format!("{field}.retries"),
            format!("at most {MAX_RETRIES} (use more targets instead)"),
        ));
    }
    if s.model.as_deref() == Some("") {
        return Err(ConfigError::new(format!("{field}.model"), "empty"));
    }
    Ok(Step {
        target: i,
        retries,
        timeout: duration(s.timeout, t.timeout),
        model: s.model.or_else(|| t.model.clone()),
        override_params: s.override_params.or_else(|| t.override_params.clone()),
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
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
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

// ---- serde's errors, as field paths and problems --------------------------------------------

fn invalid_json(e: &serde_json::Error) -> ConfigError {
    ConfigError::new("configuration", format!("invalid JSON ({e})"))
}

fn from_serde(e: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let inner = e.inner();
    if !inner.is_data() {
        return invalid_json(inner);
    }
    let mut field = String::new();
    for segment in e.path().iter() {
        match segment {
            Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            Segment::Map { key } => push_member(&mut field, key),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    // serde_json appends the position; the field path says where.
    let message = inner.to_string();
    let message = message
        .rfind(" at line ")
        .and_then(|at| message.get(..at))
        .unwrap_or(&message);
    let (field, problem) = reword(field, message);
    let field = if field.is_empty() {
        "configuration".to_string()
    } else {
        field
    };
    ConfigError::new(field, problem)
}

/// `.name` for a plain field name, `["key"]` for any other key (a model name, say).
fn push_member(field: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !key.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(key);
    } else {
        field.push('[');
        field.push_str(&quote(key));
        field.push(']');
    }
}

/// serde's message as `expected <what>, got <value>` (or `unknown field`), with the field an
/// unknown or repeated member names added to the path.
fn reword(mut field: String, message: &str) -> (String, String) {
    // serde_path_to_error's path already ends with an unknown member...
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let known = rest
            .split_once(", expected ")
            .map(|(_, k)| format!(" (expected {k})"))
            .unwrap_or_else(|| " (this object has no fields)".to_string());
        return (field, format!("unknown field{known}"));
    }
    // ... but not yet a repeated one (always a field of the schema).
    if let Some(name) = message
        .strip_prefix("duplicate field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        push_member(&mut field, name);
        return (field, "given twice".to_string());
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            let got = got.trim_matches('`');
            let expected = expected.replace('`', "\"");
            return (field, format!("expected {expected}, got {}", quote(got)));
        }
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((got, expected)) = rest.rsplit_once(", expected ") {
                let got = unexpected(got);
                let expected = expected_text(expected, &got, prefix == "invalid value: ");
                return (field, format!("expected {expected}, got {got}"));
            }
        }
    }
    (field, message.to_string())
}

/// serde's `Unexpected` as JSON: `string "x"` -> `"x"`, `integer `5`` -> `5`, `map` -> `an object`.
fn unexpected(text: &str) -> String {
    for prefix in ["integer ", "floating point ", "boolean "] {
        if let Some(v) = text.strip_prefix(prefix) {
            return v.trim_matches('`').to_string();
        }
    }
    if let Some(s) = text.strip_prefix("string ") {
        return s.to_string();
    }
    match text {
        "map" => "an object".to_string(),
        "sequence" => "an array".to_string(),
        "unit" | "null" => "null".to_string(),
        other => other.to_string(),
    }
}

fn expected_text(expected: &str, got: &str, out_of_range: bool) -> String {
    let max = match expected {
        "u8" => Some(u64::from(u8::MAX)),
        "u16" => Some(u64::from(u16::MAX)),
        "u32" => Some(u64::from(u32::MAX)),
        "u64" | "usize" => Some(u64::MAX),
        _ => None,
    };
    match max {
        Some(_) if out_of_range && got.starts_with('-') => "a non-negative integer".to_string(),
        Some(max) if out_of_range => format!("an integer up to {max}"),
        Some(_) => "an integer".to_string(),
        None => match expected {
            "a sequence" => "an array".to_string(),
            "a map" => "an object".to_string(),
            other if other.starts_with("enum ") => "a string".to_string(),
            other => other.to_string(),
        },
    }
}
