//! A target: its provider and address, Azure's settings, its credential (a key from the
//! environment or Entra ID), its cooldown.

use super::*;

#[inline(never)] // kept out of `build` (see there)
pub(super) fn target(raw: RawTarget, field: &str, env: &dyn Env) -> Result<Target, ConfigError> {
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
    // A comma would split the list of a streamed request's clusters (x-llm-failover-cluster).
    if cluster.is_empty()
        || cluster
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b',')
    {
        return Err(ConfigError::new(
            at("cluster"),
            "must be a non-empty Envoy cluster name without spaces or commas",
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

pub(super) fn azure_settings(
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

pub(super) fn check_deployment(
    dep: Option<&str>,
    field: impl Fn() -> String,
) -> Result<(), ConfigError> {
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

#[inline(never)] // kept out of `build` (see there)
pub(super) fn credential(
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

pub(super) fn entra(
    raw: &RawAzureAd,
    field: &str,
    env: &dyn Env,
) -> Result<EntraSource, ConfigError> {
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

#[inline(never)] // kept out of `build` (see there)
pub(super) fn cooldown(
    raw: Option<RawCooldownSwitch>,
    field: &str,
) -> Result<Option<Cooldown>, ConfigError> {
    let default = Cooldown {
        failure_rate: DEFAULT_FAILURE_RATE,
        min_attempts: DEFAULT_MIN_ATTEMPTS,
        window: DEFAULT_WINDOW,
        after_transport_failures: DEFAULT_TRANSPORT_FAILURES,
        after_failures: 0,
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
    let failure_rate = match raw.failure_rate {
        None => DEFAULT_FAILURE_RATE,
        Some(r) => Rate::from_fraction(r).ok_or_else(|| {
            ConfigError::new(
                format!("{field}.failure_rate"),
                "must be a number from 0 to 1 (0.5: half of the attempts; 0: off)",
            )
        })?,
    };
    let min_attempts = raw.min_attempts.unwrap_or(DEFAULT_MIN_ATTEMPTS);
    if min_attempts == 0 {
        return Err(ConfigError::new(
            format!("{field}.min_attempts"),
            "must be at least 1 (to turn the rate off, set failure_rate to 0)",
        ));
    }
    let window = deferred(raw.window, &format!("{field}.window"), DEFAULT_WINDOW)?;
    if !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
        return Err(ConfigError::new(
            format!("{field}.window"),
            "must be from \"1s\" to \"1h\"",
        ));
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
        failure_rate,
        min_attempts,
        window,
        after_transport_failures: raw
            .after_transport_failures
            .unwrap_or(DEFAULT_TRANSPORT_FAILURES),
        after_failures: raw.after_failures.unwrap_or(0),
        duration: duration_,
        max_duration,
    }))
}
