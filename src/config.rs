//! Plugin JSON -> validated, immutable [`Config`]. Every error names the field it is about, so
//! `on_configure` can refuse a bad config with one clear log line.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::json::{self, Value};

/// A part of the config read by its own schema, so that the errors of a part can name its index.
type Part<'a> = &'a Value;

/// Environment lookup, injected so tests do not depend on the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment (in the VM: `vm_config.environment_variables`).
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl ConfigError {
    // One call per error site rather than the conversions inlined at each (Wasm size).
    #[inline(never)]
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.field, self.problem)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Azure,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Azure => "azure",
        }
    }
}

/// How a target authenticates to its provider. The secret itself, resolved at load.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// OpenAI: `Authorization: Bearer <key>`; Azure: `api-key: <key>`.
    ApiKey(String),
    /// Azure Entra ID token: `Authorization: Bearer <token>`.
    AzureAdToken(String),
}

// Secrets never reach a log line, even through `{:?}`.
impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::ApiKey(_) => f.write_str("ApiKey(<redacted>)"),
            Credential::AzureAdToken(_) => f.write_str("AzureAdToken(<redacted>)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureSettings {
    pub api_version: String,
    /// model -> deployment; the `"*"` entry is kept apart as `default_deployment`.
    pub deployments: BTreeMap<String, String>,
    pub default_deployment: Option<String>,
}

impl AzureSettings {
    /// The deployment that serves `model`, if any.
    pub fn deployment_for(&self, model: Option<&str>) -> Option<&str> {
        model
            .and_then(|m| self.deployments.get(m))
            .or(self.default_deployment.as_ref())
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cooldown {
    /// Consecutive failures that put the target in cooldown (0: never by count).
    pub after_failures: u32,
    /// How long a target stays out after `after_failures` failures.
    pub duration: Duration,
    /// Cap on a cooldown asked for by a 429's Retry-After.
    pub max_duration: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub provider: Provider,
    pub cluster: String,
    pub host: String,
    pub credential: Credential,
    pub retries: u32,
    pub timeout: Duration,
    pub model: Option<String>,
    /// An object, keys sorted and not repeated.
    pub override_params: Option<json::Object>,
    pub azure: Option<AzureSettings>,
    pub cooldown: Option<Cooldown>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMatch {
    /// SHA-256 digest of the gateway key.
    Sha256([u8; 32]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayKey {
    pub name: String,
    pub digest: KeyMatch,
    /// Indices into `Config::targets`, in chain order; all targets when the key names none.
    pub targets: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    pub ttl: Duration,
    pub max_entries: u32,
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub on_status_codes: Vec<u16>,
    pub failover_on_content_filter: bool,
    pub max_retry_wait: Duration,
    pub targets: Vec<Target>,
    pub keys: Option<Vec<GatewayKey>>,
    pub cache: Option<CacheSettings>,
    pub deadline: Duration,
    pub max_request_body_bytes: usize,
}

impl Config {
    pub fn is_failure_status(&self, status: u16) -> bool {
        self.on_status_codes.contains(&status)
    }

    pub fn target_index(&self, name: &str) -> Option<usize> {
        self.targets.iter().position(|t| t.name == name)
    }
}

// ---- raw JSON shape -------------------------------------------------------------------------

struct RawConfig<'a> {
    strategy: Option<Part<'a>>,
    targets: Option<&'a [Value]>,
    keys: Option<&'a [Value]>,
    cache: Option<Part<'a>>,
    deadline: Option<String>,
    max_request_body_bytes: Option<u64>,
}

struct RawStrategy {
    mode: Option<String>,
    on_status_codes: Option<Vec<u16>>,
    failover_on_content_filter: Option<bool>,
    max_retry_wait: Option<String>,
}

struct RawTarget<'a> {
    name: Option<String>,
    provider: Option<String>,
    cluster: Option<String>,
    host: Option<String>,
    api_key_env: Option<String>,
    api_key: Option<String>,
    azure_ad_token_env: Option<String>,
    retries: Option<u32>,
    timeout: Option<String>,
    model: Option<String>,
    override_params: Option<json::Object>,
    resource_name: Option<String>,
    api_version: Option<String>,
    /// The model -> deployment map, and its `"*"` entry apart.
    deployments: Option<(BTreeMap<String, String>, Option<String>)>,
    deployment: Option<String>,
    cooldown: Option<Part<'a>>,
}

struct RawCooldown {
    enabled: Option<bool>,
    after_failures: Option<u32>,
    duration: Option<String>,
    max_duration: Option<String>,
}

struct RawKey {
    name: Option<String>,
    key_sha256: Option<String>,
    key_env: Option<String>,
    targets: Option<Vec<String>>,
}

struct RawCache {
    enabled: Option<bool>,
    ttl: Option<String>,
    max_entries: Option<u32>,
    max_body_bytes: Option<u64>,
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;
pub const DEFAULT_MAX_RETRY_WAIT: Duration = Duration::from_secs(5);
const DEFAULT_COOLDOWN_FAILURES: u32 = 3;
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);
const DEFAULT_COOLDOWN_MAX: Duration = Duration::from_secs(300);
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
const DEFAULT_CACHE_ENTRIES: u32 = 1024;
const DEFAULT_CACHE_BODY: usize = 256 * 1024;
const MAX_CACHE_ENTRIES: u32 = 1_000_000;

/// Parses and validates the plugin configuration.
pub fn parse(json: &[u8], env: &dyn Env) -> Result<Config, ConfigError> {
    let text = std::str::from_utf8(json)
        .map_err(|_| ConfigError::new("configuration", "is not UTF-8 text"))?;
    let doc = json::parse(text.as_bytes())
        .map_err(|e| ConfigError::new("configuration", format!("invalid JSON ({e})")))?;
    let raw = RawConfig::read(&doc)?;

    let strategy = match raw.strategy {
        Some(part) => RawStrategy::read(part)?,
        None => RawStrategy {
            mode: None,
            on_status_codes: None,
            failover_on_content_filter: None,
            max_retry_wait: None,
        },
    };
    match strategy.mode.as_deref() {
        None | Some("fallback") => {}
        Some("loadbalance") => {
            return Err(ConfigError::new(
                "strategy.mode",
                "\"loadbalance\" is not supported yet; use \"fallback\"",
            ))
        }
        Some(other) => {
            return Err(ConfigError::new(
                "strategy.mode",
                format!(
                    "unknown mode {} (expected \"fallback\")",
                    json::quote(other)
                ),
            ))
        }
    }
    let on_status_codes = match strategy.on_status_codes {
        None => {
            let mut codes = vec![429];
            codes.extend(500..=599);
            codes
        }
        Some(codes) => {
            if codes.is_empty() {
                return Err(ConfigError::new(
                    "strategy.on_status_codes",
                    "empty list (omit it for the default [429, 500..599])",
                ));
            }
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
    let max_retry_wait = opt_duration(
        strategy.max_retry_wait.as_deref(),
        "strategy.max_retry_wait",
        DEFAULT_MAX_RETRY_WAIT,
    )?;

    let raw_targets = raw
        .targets
        .ok_or_else(|| ConfigError::new("targets", "missing"))?;
    if raw_targets.is_empty() {
        return Err(ConfigError::new("targets", "empty (at least one target)"));
    }
    let mut targets: Vec<Target> = Vec::with_capacity(raw_targets.len());
    for (i, value) in raw_targets.iter().enumerate() {
        let field = format!("targets[{i}]");
        let t = parse_target(value, &field, env)?;
        if targets.iter().any(|o| o.name == t.name) {
            return Err(ConfigError::new(
                sub(&field, "name"),
                format!("duplicate target name {}", json::quote(&t.name)),
            ));
        }
        targets.push(t);
    }

    let keys = match raw.keys {
        None => None,
        Some(list) => {
            if list.is_empty() {
                return Err(ConfigError::new(
                    "keys",
                    "empty list would reject every request (omit `keys` to disable gateway keys)",
                ));
            }
            let mut keys: Vec<GatewayKey> = Vec::with_capacity(list.len());
            for (i, value) in list.iter().enumerate() {
                let field = format!("keys[{i}]");
                let k = parse_key(value, &field, &targets, env)?;
                if keys.iter().any(|o| o.name == k.name) {
                    return Err(ConfigError::new(
                        sub(&field, "name"),
                        format!("duplicate key name {}", json::quote(&k.name)),
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
        Some(value) => parse_cache(value)?,
    };

    let deadline = opt_duration(raw.deadline.as_deref(), "deadline", DEFAULT_DEADLINE)?;
    let max_request_body_bytes = match raw.max_request_body_bytes {
        None => DEFAULT_MAX_BODY,
        Some(0) => {
            return Err(ConfigError::new(
                "max_request_body_bytes",
                "must be greater than 0",
            ))
        }
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| *n <= 64 * 1024 * 1024)
            .ok_or_else(|| {
                ConfigError::new("max_request_body_bytes", "at most 67108864 (64 MiB)")
            })?,
    };

    Ok(Config {
        on_status_codes,
        failover_on_content_filter: strategy.failover_on_content_filter.unwrap_or(false),
        max_retry_wait,
        targets,
        keys,
        cache,
        deadline,
        max_request_body_bytes,
    })
}

/// The members of one object of the schema. Unknown and repeated fields are refused (naming the
/// object) as serde's `deny_unknown_fields` structs did; a null member counts as absent. A member
/// of the wrong type reads as absent and is reported by [`Fields::done`] (the first one read).
struct Fields<'a, 'f> {
    at: &'f str,
    members: &'a json::Object,
    error: Option<ConfigError>,
}

impl<'a, 'f> Fields<'a, 'f> {
    /// `field` is empty for the whole configuration.
    fn of(v: &'a Value, field: &'f str, known: &[&str]) -> Result<Fields<'a, 'f>, ConfigError> {
        let at = if field.is_empty() {
            "configuration"
        } else {
            field
        };
        let Value::Object(members) = v else {
            return Err(ConfigError::new(at, "must be a JSON object"));
        };
        for (i, (k, _)) in members.iter().enumerate() {
            if !known.contains(&k.as_str()) {
                let mut problem = format!("unknown field `{k}`, expected one of ");
                for (j, name) in known.iter().enumerate() {
                    if j > 0 {
                        problem.push_str(", ");
                    }
                    problem.push('`');
                    problem.push_str(name);
                    problem.push('`');
                }
                return Err(ConfigError::new(at, problem));
            }
            if members.iter().take(i).any(|(p, _)| p == k) {
                return Err(ConfigError::new(at, format!("duplicate field `{k}`")));
            }
        }
        Ok(Fields {
            at,
            members,
            error: None,
        })
    }

    /// The first type error, if any.
    fn done(self) -> Result<(), ConfigError> {
        self.error.map_or(Ok(()), Err)
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        json::get(self.members, name).filter(|v| **v != Value::Null)
    }

    /// `read` of the member, if it is present; a type error if `read` refuses it.
    fn read<T>(
        &mut self,
        name: &str,
        expected: &str,
        read: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Option<T> {
        let out = read(self.get(name)?);
        if out.is_none() {
            self.wrong_type(name, expected);
        }
        out
    }

    #[inline(never)]
    fn wrong_type(&mut self, name: &str, expected: &str) {
        if self.error.is_none() {
            self.error = Some(ConfigError::new(
                self.at,
                format!("invalid type for `{name}`: expected {expected}"),
            ));
        }
    }

    fn string(&mut self, name: &str) -> Option<String> {
        self.read(name, "a string", |v| v.as_str().map(str::to_string))
    }

    fn bool(&mut self, name: &str) -> Option<bool> {
        self.read(name, "a boolean", |v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })
    }

    fn u64(&mut self, name: &str) -> Option<u64> {
        self.read(name, "an unsigned integer", Value::as_u64)
    }

    fn u32(&mut self, name: &str) -> Option<u32> {
        self.read(name, "an integer up to 4294967295", |v| {
            v.as_u64().and_then(|n| u32::try_from(n).ok())
        })
    }

    fn array(&mut self, name: &str) -> Option<&'a [Value]> {
        self.read(name, "an array", |v| match v {
            Value::Array(items) => Some(items.as_slice()),
            _ => None,
        })
    }

    fn object(&mut self, name: &str, expected: &str) -> Option<&'a json::Object> {
        self.read(name, expected, |v| match v {
            Value::Object(o) => Some(o),
            _ => None,
        })
    }
}

impl<'a> RawConfig<'a> {
    fn read(v: &'a Value) -> Result<Self, ConfigError> {
        let mut f = Fields::of(
            v,
            "",
            &[
                "strategy",
                "targets",
                "keys",
                "cache",
                "deadline",
                "max_request_body_bytes",
            ],
        )?;
        let raw = RawConfig {
            strategy: f.get("strategy"),
            targets: f.array("targets"),
            keys: f.array("keys"),
            cache: f.get("cache"),
            deadline: f.string("deadline"),
            max_request_body_bytes: f.u64("max_request_body_bytes"),
        };
        f.done().map(|_| raw)
    }
}

impl RawStrategy {
    fn read(v: &Value) -> Result<Self, ConfigError> {
        let mut f = Fields::of(
            v,
            "strategy",
            &[
                "mode",
                "on_status_codes",
                "failover_on_content_filter",
                "max_retry_wait",
            ],
        )?;
        let raw = RawStrategy {
            mode: f.string("mode"),
            on_status_codes: f.read("on_status_codes", "integers up to 65535", |v| match v {
                Value::Array(items) => items
                    .iter()
                    .map(|v| v.as_u64().and_then(|n| u16::try_from(n).ok()))
                    .collect(),
                _ => None,
            }),
            failover_on_content_filter: f.bool("failover_on_content_filter"),
            max_retry_wait: f.string("max_retry_wait"),
        };
        f.done().map(|_| raw)
    }
}

impl<'a> RawTarget<'a> {
    fn read(v: &'a Value, field: &str) -> Result<Self, ConfigError> {
        let mut f = Fields::of(
            v,
            field,
            &[
                "name",
                "provider",
                "cluster",
                "host",
                "api_key_env",
                "api_key",
                "azure_ad_token_env",
                "retries",
                "timeout",
                "model",
                "override_params",
                "resource_name",
                "api_version",
                "deployments",
                "deployment",
                "cooldown",
            ],
        )?;
        let raw = RawTarget {
            name: f.string("name"),
            provider: f.string("provider"),
            cluster: f.string("cluster"),
            host: f.string("host"),
            api_key_env: f.string("api_key_env"),
            api_key: f.string("api_key"),
            azure_ad_token_env: f.string("azure_ad_token_env"),
            retries: f.u32("retries"),
            timeout: f.string("timeout"),
            model: f.string("model"),
            override_params: f.object("override_params", "an object").and_then(|o| {
                match json::into_canonical(Value::Object(o.clone())) {
                    Value::Object(o) => Some(o),
                    _ => None,
                }
            }),
            resource_name: f.string("resource_name"),
            api_version: f.string("api_version"),
            deployments: f.read("deployments", "an object of strings", |v| {
                let Value::Object(members) = v else {
                    return None;
                };
                let (mut map, mut star) = (BTreeMap::new(), None);
                for (model, dep) in members {
                    let dep = dep.as_str()?.to_string();
                    // A repeated model: the last one counts.
                    if model == "*" {
                        star = Some(dep);
                    } else {
                        map.insert(model.clone(), dep);
                    }
                }
                Some((map, star))
            }),
            deployment: f.string("deployment"),
            cooldown: f.get("cooldown"),
        };
        f.done().map(|_| raw)
    }
}

impl RawCooldown {
    fn read(v: &Value, field: &str) -> Result<Self, ConfigError> {
        let mut f = Fields::of(
            v,
            field,
            &["enabled", "after_failures", "duration", "max_duration"],
        )?;
        let raw = RawCooldown {
            enabled: f.bool("enabled"),
            after_failures: f.u32("after_failures"),
            duration: f.string("duration"),
            max_duration: f.string("max_duration"),
        };
        f.done().map(|_| raw)
    }
}

impl RawKey {
    fn read(v: &Value, field: &str) -> Result<Self, ConfigError> {
        let mut f = Fields::of(v, field, &["name", "key_sha256", "key_env", "targets"])?;
        let raw = RawKey {
            name: f.string("name"),
            key_sha256: f.string("key_sha256"),
            key_env: f.string("key_env"),
            targets: f.read("targets", "an array of strings", |v| match v {
                Value::Array(items) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => None,
            }),
        };
        f.done().map(|_| raw)
    }
}

impl RawCache {
    fn read(v: &Value) -> Result<Self, ConfigError> {
        let mut f = Fields::of(
            v,
            "cache",
            &["enabled", "ttl", "max_entries", "max_body_bytes"],
        )?;
        let raw = RawCache {
            enabled: f.bool("enabled"),
            ttl: f.string("ttl"),
            max_entries: f.u32("max_entries"),
            max_body_bytes: f.u64("max_body_bytes"),
        };
        f.done().map(|_| raw)
    }
}

/// `field.name`: the path of a member of the object at `field`.
#[inline(never)]
fn sub(field: &str, name: &str) -> String {
    let mut path = String::with_capacity(field.len() + 1 + name.len());
    path.push_str(field);
    path.push('.');
    path.push_str(name);
    path
}

fn parse_target(v: &Value, field: &str, env: &dyn Env) -> Result<Target, ConfigError> {
    let raw = RawTarget::read(v, field)?;
    let provider = match raw.provider.as_deref() {
        Some("openai") => Provider::OpenAi,
        Some("azure") => Provider::Azure,
        Some(other) => {
            return Err(ConfigError::new(
                sub(field, "provider"),
                format!(
                    "unknown provider {} (expected \"openai\" or \"azure\")",
                    json::quote(other)
                ),
            ))
        }
        None => return Err(ConfigError::new(sub(field, "provider"), "missing")),
    };
    let credential = resolve_credential(&raw, provider, field, env)?;
    let name = raw.name.unwrap_or_else(|| provider.as_str().to_string());
    if !is_name(&name) {
        return Err(ConfigError::new(
            sub(field, "name"),
            "must be 1-64 characters of letters, digits, '_' or '-' (it appears in stats and headers)",
        ));
    }
    let cluster = raw
        .cluster
        .ok_or_else(|| ConfigError::new(sub(field, "cluster"), "missing"))?;
    if cluster.is_empty() || cluster.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(ConfigError::new(
            sub(field, "cluster"),
            "must be a non-empty Envoy cluster name",
        ));
    }
    let retries = raw.retries.unwrap_or(0);
    if retries > 10 {
        return Err(ConfigError::new(
            sub(field, "retries"),
            "at most 10 (use more targets instead)",
        ));
    }
    let timeout = opt_duration(
        raw.timeout.as_deref(),
        &sub(field, "timeout"),
        DEFAULT_TIMEOUT,
    )?;
    if let Some(model) = &raw.model {
        if model.is_empty() {
            return Err(ConfigError::new(sub(field, "model"), "empty"));
        }
    }

    let (host, azure) = match provider {
        Provider::OpenAi => {
            for (set, what) in [
                (raw.resource_name.is_some(), "resource_name"),
                (raw.api_version.is_some(), "api_version"),
                (raw.deployments.is_some(), "deployments"),
                (raw.deployment.is_some(), "deployment"),
                (raw.azure_ad_token_env.is_some(), "azure_ad_token_env"),
            ] {
                if set {
                    return Err(ConfigError::new(
                        format!("{field}.{what}"),
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
                (None, Some(r)) => {
                    if !is_dns_label(r) {
                        return Err(ConfigError::new(
                            sub(field, "resource_name"),
                            "must be a DNS label (letters, digits, '-')",
                        ));
                    }
                    format!("{r}.openai.azure.com")
                }
                (None, None) => {
                    return Err(ConfigError::new(
                        sub(field, "resource_name"),
                        "missing (required for provider \"azure\" unless `host` is set)",
                    ))
                }
            };
            let api_version = raw.api_version.ok_or_else(|| {
                ConfigError::new(
                    sub(field, "api_version"),
                    "missing (required for provider \"azure\")",
                )
            })?;
            if api_version.is_empty() || !api_version.bytes().all(is_url_safe) {
                return Err(ConfigError::new(
                    sub(field, "api_version"),
                    "must be a version like \"2024-10-21\"",
                ));
            }
            let (deployments, mut default_deployment) = raw.deployments.unwrap_or_default();
            if let Some(d) = raw.deployment {
                if default_deployment.is_some() {
                    return Err(ConfigError::new(
                        sub(field, "deployment"),
                        "conflicts with deployments[\"*\"]; set one of them",
                    ));
                }
                // Checked here so the error names `deployment`, not `deployments["*"]`.
                if d.is_empty() || !d.bytes().all(is_url_safe) {
                    return Err(ConfigError::new(
                        sub(field, "deployment"),
                        "deployment names are letters, digits, '-', '_' or '.'",
                    ));
                }
                default_deployment = Some(d);
            }
            if deployments.is_empty() && default_deployment.is_none() {
                return Err(ConfigError::new(
                    sub(field, "deployments"),
                    "missing (required for provider \"azure\": a model -> deployment map, or `deployment`)",
                ));
            }
            // In key order, `"*"` among the others: the first bad one is named.
            let star = default_deployment.as_deref().map(|d| ("*", d));
            let (before, after): (Vec<_>, Vec<_>) = deployments
                .iter()
                .map(|(m, d)| (m.as_str(), d.as_str()))
                .partition(|(m, _)| *m < "*");
            for (model, dep) in before.into_iter().chain(star).chain(after) {
                if dep.is_empty() || !dep.bytes().all(is_url_safe) {
                    return Err(ConfigError::new(
                        format!("{field}.deployments[{}]", json::quote(model)),
                        "deployment names are letters, digits, '-', '_' or '.'",
                    ));
                }
            }
            (
                host,
                Some(AzureSettings {
                    api_version,
                    deployments,
                    default_deployment,
                }),
            )
        }
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    {
        return Err(ConfigError::new(
            sub(field, "host"),
            "must be a host name, optionally with :port",
        ));
    }
    let cooldown = parse_cooldown(raw.cooldown, &sub(field, "cooldown"))?;

    Ok(Target {
        name,
        provider,
        cluster,
        host,
        credential,
        retries,
        timeout,
        model: raw.model,
        override_params: raw.override_params,
        azure,
        cooldown,
    })
}

fn resolve_credential(
    raw: &RawTarget<'_>,
    provider: Provider,
    field: &str,
    env: &dyn Env,
) -> Result<Credential, ConfigError> {
    let set = [
        raw.api_key_env.is_some(),
        raw.api_key.is_some(),
        raw.azure_ad_token_env.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set == 0 {
        let hint = match provider {
            Provider::OpenAi => "api_key_env",
            Provider::Azure => "api_key_env or azure_ad_token_env",
        };
        return Err(ConfigError::new(
            sub(field, "api_key_env"),
            format!("missing: set {hint}"),
        ));
    }
    // Errors below name a field the target sets, in the order the fields are read.
    let used = if raw.api_key_env.is_some() {
        "api_key_env"
    } else if raw.azure_ad_token_env.is_some() {
        "azure_ad_token_env"
    } else {
        "api_key"
    };
    if set > 1 {
        return Err(ConfigError::new(
            format!("{field}.{used}"),
            "set only one of api_key_env, api_key, azure_ad_token_env",
        ));
    }
    let from_env = |var: &str, what: &str| -> Result<String, ConfigError> {
        let value = env.var(var).unwrap_or_default();
        let value = value.trim().to_string();
        if value.is_empty() {
            return Err(ConfigError::new(
                format!("{field}.{what}"),
                format!(
                    "environment variable {} is not set or empty in the VM \
                     (list it in vm_config.environment_variables)",
                    json::quote(var)
                ),
            ));
        }
        Ok(value)
    };
    let credential = if let Some(var) = &raw.api_key_env {
        Credential::ApiKey(from_env(var, "api_key_env")?)
    } else if let Some(var) = &raw.azure_ad_token_env {
        Credential::AzureAdToken(from_env(var, "azure_ad_token_env")?)
    } else {
        let key = raw.api_key.clone().unwrap_or_default();
        if key.trim().is_empty() {
            return Err(ConfigError::new(sub(field, "api_key"), "empty"));
        }
        Credential::ApiKey(key.trim().to_string())
    };
    let secret = match &credential {
        Credential::ApiKey(s) | Credential::AzureAdToken(s) => s,
    };
    if !secret.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(ConfigError::new(
            format!("{field}.{used}"),
            "the credential has characters not allowed in a header value",
        ));
    }
    Ok(credential)
}

fn parse_cooldown(part: Option<Part<'_>>, field: &str) -> Result<Option<Cooldown>, ConfigError> {
    let default = Cooldown {
        after_failures: DEFAULT_COOLDOWN_FAILURES,
        duration: DEFAULT_COOLDOWN,
        max_duration: DEFAULT_COOLDOWN_MAX,
    };
    let raw: RawCooldown = match part {
        None => return Ok(Some(default)),
        Some(Value::Bool(false)) => return Ok(None),
        Some(Value::Bool(true)) => return Ok(Some(default)),
        Some(part) => RawCooldown::read(part, field)?,
    };
    if raw.enabled == Some(false) {
        return Ok(None);
    }
    let duration = opt_duration(
        raw.duration.as_deref(),
        &sub(field, "duration"),
        DEFAULT_COOLDOWN,
    )?;
    let max_duration = opt_duration(
        raw.max_duration.as_deref(),
        &sub(field, "max_duration"),
        DEFAULT_COOLDOWN_MAX.max(duration),
    )?;
    if max_duration < duration {
        return Err(ConfigError::new(
            sub(field, "max_duration"),
            "must not be shorter than duration",
        ));
    }
    Ok(Some(Cooldown {
        after_failures: raw.after_failures.unwrap_or(DEFAULT_COOLDOWN_FAILURES),
        duration,
        max_duration,
    }))
}

fn parse_key(
    v: &Value,
    field: &str,
    targets: &[Target],
    env: &dyn Env,
) -> Result<GatewayKey, ConfigError> {
    let raw = RawKey::read(v, field)?;
    let name = raw
        .name
        .ok_or_else(|| ConfigError::new(sub(field, "name"), "missing"))?;
    if !is_name(&name) {
        return Err(ConfigError::new(
            sub(field, "name"),
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
                    sub(field, "key_env"),
                    format!(
                        "environment variable {} is not set or empty in the VM",
                        json::quote(&var)
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
        Some(names) => {
            if names.is_empty() {
                return Err(ConfigError::new(
                    sub(field, "targets"),
                    "empty (omit it to allow every target)",
                ));
            }
            let mut idx: Vec<usize> = Vec::with_capacity(names.len());
            for (j, n) in names.iter().enumerate() {
                let i = targets.iter().position(|t| &t.name == n).ok_or_else(|| {
                    ConfigError::new(
                        format!("{field}.targets[{j}]"),
                        format!("no target named {}", json::quote(n)),
                    )
                })?;
                // Chain order is the order of `targets`, whatever order the key lists them in.
                if let Err(at) = idx.binary_search(&i) {
                    idx.insert(at, i);
                }
            }
            idx
        }
    };
    Ok(GatewayKey {
        name,
        digest,
        targets: allowed,
    })
}

fn parse_cache(v: &Value) -> Result<Option<CacheSettings>, ConfigError> {
    let raw = RawCache::read(v)?;
    if raw.enabled != Some(true) {
        return Ok(None);
    }
    let ttl = opt_duration(raw.ttl.as_deref(), "cache.ttl", DEFAULT_CACHE_TTL)?;
    if ttl.is_zero() {
        return Err(ConfigError::new("cache.ttl", "must be greater than 0"));
    }
    let max_entries = raw.max_entries.unwrap_or(DEFAULT_CACHE_ENTRIES);
    if max_entries == 0 || max_entries > MAX_CACHE_ENTRIES {
        return Err(ConfigError::new(
            "cache.max_entries",
            format!("must be between 1 and {MAX_CACHE_ENTRIES}"),
        ));
    }
    let max_body_bytes = match raw.max_body_bytes {
        None => DEFAULT_CACHE_BODY,
        Some(n) if (1..=4 * 1024 * 1024).contains(&n) => n as usize,
        Some(_) => {
            return Err(ConfigError::new(
                "cache.max_body_bytes",
                "must be between 1 and 4194304",
            ))
        }
    };
    Ok(Some(CacheSettings {
        ttl,
        max_entries,
        max_body_bytes,
    }))
}

fn opt_duration(s: Option<&str>, field: &str, default: Duration) -> Result<Duration, ConfigError> {
    match s {
        None => Ok(default),
        Some(s) => parse_duration(s).ok_or_else(|| {
            ConfigError::new(
                field,
                format!(
                    "{} is not a duration (use e.g. \"500ms\", \"10s\", \"2m\")",
                    json::quote(s)
                ),
            )
        }),
    }
}

/// `"250ms"`, `"10s"`, `"1.5s"`, `"2m"`. At most one day.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        return None;
    };
    let ms = crate::retry_after::scaled_decimal(num, unit_ms)?;
    (ms <= 86_400_000).then(|| Duration::from_millis(ms))
}

fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hi = (*chunk.first()? as char).to_digit(16)?;
        let lo = (*chunk.get(1)? as char).to_digit(16)?;
        *out.get_mut(i)? = (hi * 16 + lo) as u8;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::collections::HashMap;

    pub struct MapEnv(pub HashMap<&'static str, &'static str>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|s| s.to_string())
        }
    }

    fn env() -> MapEnv {
        MapEnv(HashMap::from([
            ("OPENAI_API_KEY", "sk-test"),
            ("AZURE_KEY", "az-test"),
            ("GW_KEY", "gw-secret"),
        ]))
    }

    fn base() -> Value {
        json!({
            "targets": [
                {"name": "openai", "provider": "openai", "cluster": "openai", "api_key_env": "OPENAI_API_KEY", "retries": 2, "timeout": "10s"},
                {"name": "azure", "provider": "azure", "cluster": "azure", "resource_name": "res",
                 "api_key_env": "AZURE_KEY", "api_version": "2024-10-21",
                 "deployments": {"gpt-4": "gpt4-prod", "*": "default-dep"}}
            ]
        })
    }

    fn parse_value(v: &Value) -> Result<Config, ConfigError> {
        parse(v.to_string().as_bytes(), &env())
    }

    fn error_field(mutate: impl FnOnce(&mut Value)) -> String {
        let mut v = base();
        mutate(&mut v);
        match parse_value(&v) {
            Ok(_) => "<accepted>".to_string(),
            Err(e) => e.field,
        }
    }

    #[test]
    fn valid_config_gets_spec_defaults() {
        let c = parse_value(&base()).unwrap();
        assert_eq!(c.targets.len(), 2);
        assert!(c.is_failure_status(429));
        assert!(c.is_failure_status(503));
        assert!(!c.is_failure_status(400));
        assert_eq!(c.deadline, Duration::from_secs(120));
        assert_eq!(c.max_request_body_bytes, 4 * 1024 * 1024);
        let openai = &c.targets[0];
        assert_eq!(openai.host, "api.openai.com");
        assert_eq!(openai.credential, Credential::ApiKey("sk-test".into()));
        assert_eq!(openai.retries, 2);
        assert_eq!(openai.timeout, Duration::from_secs(10));
        let azure = &c.targets[1];
        assert_eq!(azure.host, "res.openai.azure.com");
        assert_eq!(azure.timeout, DEFAULT_TIMEOUT);
        let az = azure.azure.as_ref().unwrap();
        assert_eq!(az.deployment_for(Some("gpt-4")), Some("gpt4-prod"));
        assert_eq!(az.deployment_for(Some("other")), Some("default-dep"));
        assert_eq!(az.deployment_for(None), Some("default-dep"));
        assert!(azure.cooldown.is_some());
        assert!(c.keys.is_none());
        assert!(c.cache.is_none());
    }

    type Mutation = Box<dyn FnOnce(&mut Value)>;

    #[test]
    fn invalid_configs_name_the_field() {
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "targets[1].api_version",
                Box::new(|v| {
                    v["targets"][1]
                        .as_object_mut()
                        .unwrap()
                        .remove("api_version");
                }),
            ),
            (
                "targets[1].resource_name",
                Box::new(|v| {
                    v["targets"][1]
                        .as_object_mut()
                        .unwrap()
                        .remove("resource_name");
                }),
            ),
            (
                "targets[1].deployments",
                Box::new(|v| {
                    v["targets"][1]
                        .as_object_mut()
                        .unwrap()
                        .remove("deployments");
                }),
            ),
            (
                "targets[0].provider",
                Box::new(|v| v["targets"][0]["provider"] = json!("anthropic")),
            ),
            (
                "targets[0].cluster",
                Box::new(|v| {
                    v["targets"][0].as_object_mut().unwrap().remove("cluster");
                }),
            ),
            (
                "targets[0].timeout",
                Box::new(|v| v["targets"][0]["timeout"] = json!("10 parsecs")),
            ),
            (
                "targets[0].api_key_env",
                Box::new(|v| v["targets"][0]["api_key_env"] = json!("NOT_SET")),
            ),
            (
                "targets[0].api_key_env",
                Box::new(|v| {
                    v["targets"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("api_key_env");
                }),
            ),
            (
                "targets[0].name",
                Box::new(|v| v["targets"][0]["name"] = json!("has.dot")),
            ),
            (
                "targets[1].name",
                Box::new(|v| v["targets"][1]["name"] = json!("openai")),
            ),
            (
                "targets[0].api_version",
                Box::new(|v| v["targets"][0]["api_version"] = json!("2024-10-21")),
            ),
            (
                "targets[0]",
                Box::new(|v| v["targets"][0]["colour"] = json!("blue")),
            ),
            ("targets", Box::new(|v| v["targets"] = json!([]))),
            (
                "strategy.mode",
                Box::new(|v| v["strategy"] = json!({"mode": "roundrobin"})),
            ),
            (
                "strategy.on_status_codes[1]",
                Box::new(|v| v["strategy"] = json!({"on_status_codes": [429, 200]})),
            ),
            ("deadline", Box::new(|v| v["deadline"] = json!("forever"))),
            (
                "max_request_body_bytes",
                Box::new(|v| v["max_request_body_bytes"] = json!(0)),
            ),
            (
                "keys[0].key_sha256",
                Box::new(|v| v["keys"] = json!([{"name": "app", "key_sha256": "xyz"}])),
            ),
            (
                "keys[0].targets[0]",
                Box::new(|v| {
                    v["keys"] = json!([{"name": "app", "key_env": "GW_KEY", "targets": ["nope"]}])
                }),
            ),
            (
                "keys[0].key_env",
                Box::new(|v| v["keys"] = json!([{"name": "app", "key_env": "MISSING"}])),
            ),
            (
                "cache.max_entries",
                Box::new(|v| v["cache"] = json!({"enabled": true, "max_entries": 0})),
            ),
            (
                "targets[1].cooldown.duration",
                Box::new(|v| v["targets"][1]["cooldown"] = json!({"duration": "x"})),
            ),
            ("configuration", Box::new(|v| v["unknown_top"] = json!(1))),
        ];
        for (want, mutate) in cases {
            assert_eq!(error_field(mutate), want);
        }
    }

    #[test]
    fn error_message_reads_like_the_spec_example() {
        let mut v = base();
        v["targets"][1]
            .as_object_mut()
            .unwrap()
            .remove("api_version");
        let e = parse_value(&v).unwrap_err();
        assert_eq!(
            e.to_string(),
            "targets[1].api_version: missing (required for provider \"azure\")"
        );
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let c = parse_value(&base()).unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("sk-test"));
        assert!(!dump.contains("az-test"));
    }

    #[test]
    fn deployment_shorthand_and_ad_token() {
        let mut v = base();
        let t = v["targets"][1].as_object_mut().unwrap();
        t.remove("deployments");
        t.remove("api_key_env");
        t.insert("deployment".into(), json!("only-dep"));
        t.insert("azure_ad_token_env".into(), json!("AZURE_KEY"));
        let c = parse_value(&v).unwrap();
        let azure = &c.targets[1];
        assert_eq!(azure.credential, Credential::AzureAdToken("az-test".into()));
        assert_eq!(
            azure.azure.as_ref().unwrap().deployment_for(Some("x")),
            Some("only-dep")
        );
    }

    #[test]
    fn azure_without_default_deployment_serves_only_mapped_models() {
        let mut v = base();
        v["targets"][1]["deployments"] = json!({"gpt-4": "gpt4-prod"});
        let c = parse_value(&v).unwrap();
        let az = c.targets[1].azure.as_ref().unwrap();
        assert_eq!(az.deployment_for(Some("gpt-3.5")), None);
    }

    #[test]
    fn keys_resolve_targets_in_chain_order() {
        let mut v = base();
        v["keys"] = json!([
            {"name": "all", "key_env": "GW_KEY"},
            {"name": "azure-only", "key_sha256": "a".repeat(64), "targets": ["azure", "openai"]},
        ]);
        let c = parse_value(&v).unwrap();
        let keys = c.keys.unwrap();
        assert_eq!(keys[0].targets, vec![0, 1]);
        assert_eq!(keys[1].targets, vec![0, 1]);
        assert_eq!(
            keys[0].digest,
            KeyMatch::Sha256(crate::auth::sha256(b"gw-secret"))
        );
    }

    #[test]
    fn cache_and_cooldown_switches() {
        let mut v = base();
        v["cache"] = json!({"enabled": true, "ttl": "5s", "max_entries": 10});
        v["targets"][0]["cooldown"] = json!(false);
        v["targets"][1]["cooldown"] = json!({"after_failures": 5, "duration": "10s"});
        let c = parse_value(&v).unwrap();
        let cache = c.cache.unwrap();
        assert_eq!(cache.ttl, Duration::from_secs(5));
        assert_eq!(cache.max_entries, 10);
        assert!(c.targets[0].cooldown.is_none());
        let cd = c.targets[1].cooldown.as_ref().unwrap();
        assert_eq!(cd.after_failures, 5);
        assert_eq!(cd.duration, Duration::from_secs(10));
        v["cache"] = json!({"enabled": false});
        assert!(parse_value(&v).unwrap().cache.is_none());
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("250ms", 250),
            ("10s", 10_000),
            ("1.5s", 1500),
            ("2m", 120_000),
            (" 3s ", 3000),
        ] {
            assert_eq!(parse_duration(s), Some(Duration::from_millis(ms)), "{s}");
        }
        for s in [
            "",
            "s",
            "10",
            "-1s",
            "1h",
            "1e3s",
            "99999999m",
            "NaNs",
            "1..2s",
        ] {
            assert_eq!(parse_duration(s), None, "{s}");
        }
    }

    #[test]
    fn not_json_is_refused() {
        let e = parse(b"{not json", &env()).unwrap_err();
        assert_eq!(e.field, "configuration");
    }
}
