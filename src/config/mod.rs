//! Plugin JSON -> validated, immutable [`Config`]. The JSON is read into serde types
//! ([`raw`]), then checked and completed with defaults in one pass ([`build`]). Every error names
//! the field it is about, so `on_configure` can refuse a bad config with one clear log line.

mod build;
pub(crate) mod object;
pub mod raw;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

pub use crate::health::cooldown::Rate;
pub use build::{parse, parse_plugin};

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

/// No environment at all: every variable is unset (tests, fuzzing, and configs that name none).
pub struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// Why a configuration was refused: the field's path (`targets[1].api_version`, or
/// `configuration` for the whole document) and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for ConfigError {}

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
    /// Azure Entra ID tokens the filter fetches and refreshes itself (`azure_ad`).
    Entra(EntraSource),
}

// Secrets never reach a log line, even through `{:?}`.
impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::ApiKey(_) => f.write_str("ApiKey(<redacted>)"),
            Credential::AzureAdToken(_) => f.write_str("AzureAdToken(<redacted>)"),
            Credential::Entra(source) => write!(f, "Entra({source:?})"),
        }
    }
}

/// Where a target's Entra ID tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraSource {
    /// The Envoy cluster of the token endpoint.
    pub cluster: String,
    /// Its `:authority` (login.microsoftonline.com, or 169.254.169.254 for IMDS).
    pub authority: String,
    /// The resource the token is for (`https://cognitiveservices.azure.com`).
    pub resource: String,
    pub kind: EntraKind,
}

#[derive(Clone, PartialEq, Eq)]
pub enum EntraKind {
    /// An app registration's client secret (`POST /<tenant>/oauth2/v2.0/token`).
    ClientCredentials {
        tenant_id: String,
        client_id: String,
        client_secret: String,
    },
    /// The managed identity of the machine (Azure IMDS); `client_id` picks a user-assigned one.
    ManagedIdentity { client_id: Option<String> },
}

impl fmt::Debug for EntraKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntraKind::ClientCredentials {
                tenant_id,
                client_id,
                ..
            } => write!(
                f,
                "ClientCredentials {{ tenant_id: {tenant_id:?}, client_id: {client_id:?}, client_secret: <redacted> }}"
            ),
            EntraKind::ManagedIdentity { client_id } => {
                write!(f, "ManagedIdentity {{ client_id: {client_id:?} }}")
            }
        }
    }
}

/// Which of Azure OpenAI's APIs a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AzureApi {
    /// `/openai/deployments/<deployment>/<operation>?api-version=<v>`.
    Deployments,
    /// The v1 API (`api_version: "v1"`): `/openai/v1/<operation>`, the deployment in the body's
    /// `model`, no `api-version`.
    V1,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureSettings {
    pub api: AzureApi,
    /// The `api-version` query parameter (`"v1"` for the v1 API, which sends none).
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

/// A target's circuit breaker (`health::cooldown` says how it moves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cooldown {
    /// Failed share of the window's attempts that starts a cooldown (0: never by rate).
    pub failure_rate: Rate,
    /// Attempts the window must hold before its rate is judged.
    pub min_attempts: u32,
    /// The sliding window the rate is judged over.
    pub window: Duration,
    /// Transport failures in a row that start a cooldown (0: never by them).
    pub after_transport_failures: u32,
    /// Failures of any kind in a row that start a cooldown (0: never by them).
    pub after_failures: u32,
    /// How long a tripped target stays out before its probe (and after a failed probe).
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
    pub override_params: Option<Map<String, Value>>,
    pub azure: Option<AzureSettings>,
    pub cooldown: Option<Cooldown>,
    /// Share of first attempts under load balancing (0: only ever a fallback).
    pub weight: u32,
    pub spillover: Option<Spillover>,
}

/// When a target is skipped before it starts answering 429 (its answers' rate-limit headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spillover {
    pub min_remaining_requests: Option<u64>,
    pub min_remaining_tokens: Option<u64>,
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
    pub limits: Option<Limits>,
}

/// At most `count` (requests or tokens) per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// At least 1.
    pub count: u64,
    /// One second to 30 days.
    pub per: Duration,
}

/// The limits of a gateway key or a route; at least one is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub requests: Option<Limit>,
    pub tokens: Option<Limit>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// Which cache: "" for the top-level one, the route's name for a route's (each has its own
    /// slots in shared data).
    pub scope: String,
    pub ttl: Duration,
    pub max_entries: u32,
    pub max_body_bytes: usize,
}

/// One target of a chain with the settings it has there: its own, or a route step's.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Index into `Config::targets`.
    pub target: usize,
    pub retries: u32,
    pub timeout: Duration,
    /// The model sent instead of (or when the client sends none) the client's.
    pub model: Option<String>,
    pub override_params: Option<Map<String, Value>>,
}

impl Step {
    /// A target with its own settings.
    pub fn of(index: usize, target: &Target) -> Step {
        Step {
            target: index,
            retries: target.retries,
            timeout: target.timeout,
            model: target.model.clone(),
            override_params: target.override_params.clone(),
        }
    }
}

/// A named route (as BricksLLM's): requests on `path` are `operation`s down its own chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    /// Matched exactly, without the query string.
    pub path: String,
    pub operation: crate::request::operation::Operation,
    /// In chain order; a target appears once.
    pub steps: Vec<Step>,
    /// This route's own cache (the top-level one is not used on routes).
    pub cache: Option<CacheSettings>,
    /// Indices into `Config::keys` of the gateway keys that may call it (`None`: every key).
    pub keys: Option<Vec<usize>>,
    /// Shared by every request on the route, whatever its key.
    pub limits: Option<Limits>,
}

/// The Responses API's affinity: which target created each response id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsesSettings {
    /// How long the owner of a response id is remembered.
    pub affinity_ttl: Duration,
    /// Slots in Envoy shared data (a new id evicts the one in its slot).
    pub max_affinity_entries: u32,
}

/// A plugin configuration: the filter's, or the upstream filter's.
#[derive(Debug, Clone, PartialEq)]
pub enum Plugin {
    Filter(Box<Config>),
    /// The upstream filter of the streamed-failover clusters (`{"role": "upstream"}`).
    Upstream,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `streaming.failover: "router"` (the default): streamed requests fail over through
    /// Envoy's router over the streamed-failover clusters, and keep streaming.
    pub stream_failover: bool,
    /// `strategy.mode: "loadbalance"`: first attempts spread by weight.
    pub loadbalance: bool,
    pub on_status_codes: Vec<u16>,
    pub failover_on_content_filter: bool,
    pub max_retry_wait: Duration,
    pub targets: Vec<Target>,
    /// Every target in order (indices into `targets`): the chain of a request that no gateway
    /// key limits.
    pub chain: Vec<usize>,
    /// Every target with its own settings, in order: the steps of a request on no route.
    pub steps: Vec<Step>,
    pub keys: Option<Vec<GatewayKey>>,
    pub routes: Vec<Route>,
    pub cache: Option<CacheSettings>,
    pub responses: ResponsesSettings,
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

    /// The route whose path is `path` (without its query string), if any.
    pub fn route_for(&self, path: &str) -> Option<usize> {
        let path = crate::request::operation::path_only(path);
        self.routes.iter().position(|r| r.path == path)
    }
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;
pub const DEFAULT_MAX_RETRY_WAIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests;
