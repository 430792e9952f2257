//! Gateway keys, and the named routes with their steps (which target, with what overrides).

use super::*;

#[inline(never)] // kept out of `build` (see there)
pub(super) fn key(
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
            KeyMatch::Sha256(crate::request::auth::sha256(key.as_bytes()))
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
        limits: limits(raw.limits, &format!("{field}.limits"))?,
    })
}

#[inline(never)] // kept out of `build` (see there)
pub(super) fn routes(
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

pub(super) fn route(
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
    if let Some(named) = crate::request::azure::operation_of(&path) {
        if named != operation {
            return Err(ConfigError::new(
                at("operation"),
                format!(
                    "the path is an Azure OpenAI path of operation {}: an app calling it sends that",
                    quote(named.as_str())
                ),
            ));
        }
    }
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
        limits: limits(raw.limits, &at("limits"))?,
    })
}

/// `limits` of a key or a route: `None` when absent.
fn limits(raw: Option<Obj<RawLimits>>, field: &str) -> Result<Option<Limits>, ConfigError> {
    let Some(Obj(raw)) = raw else {
        return Ok(None);
    };
    if raw.requests.is_none() && raw.tokens.is_none() {
        return Err(ConfigError::new(
            field,
            "empty (set `requests`, `tokens` or both; omit `limits` for no limit)",
        ));
    }
    let one = |raw: Option<Obj<RawLimit>>, name: &str| -> Result<Option<Limit>, ConfigError> {
        let Some(Obj(raw)) = raw else {
            return Ok(None);
        };
        let at = |part: &str| format!("{field}.{name}.{part}");
        let count = match raw.count {
            None => return Err(ConfigError::new(at("count"), "missing")),
            Some(0) => {
                return Err(ConfigError::new(
                    at("count"),
                    "must be at least 1 (to stop a key, remove it from `keys`)",
                ))
            }
            Some(n) => n,
        };
        let Some(Text(Window(per))) = raw.per else {
            return Err(ConfigError::new(at("per"), "missing"));
        };
        Ok(Some(Limit { count, per }))
    };
    Ok(Some(Limits {
        requests: one(raw.requests, "requests")?,
        tokens: one(raw.tokens, "tokens")?,
    }))
}

pub(super) fn step(raw: RawStep, field: &str, targets: &[Target]) -> Result<Step, ConfigError> {
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
