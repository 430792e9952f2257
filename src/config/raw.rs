//! The plugin JSON as written: serde types, one per object of the schema. Unknown fields are
//! refused, absent ones are `None` (defaults are applied, and everything is checked, in
//! [`super::build`]). `docs/config.schema.json` is generated from these types, their doc
//! comments included.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

pub use crate::config::object::Obj;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(title = "llm-failover plugin configuration"))]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The JSON Schema an editor checks this file against; ignored by the filter.
    #[serde(rename = "$schema")]
    pub schema: Option<String>,
    /// "filter" (default): the filter, in a listener's HTTP filter chain. "upstream": the same
    /// module as an upstream HTTP filter of every target's cluster (`targets[].cluster`), which
    /// addresses each attempt of a streamed request for its target and lets every other request
    /// pass. It works from the filter's own configuration (it must share the filter's
    /// `vm_config`), so nothing else may be set.
    pub role: Option<Role>,
    /// How `"stream": true` requests fail over.
    #[serde(default, deserialize_with = "apart")]
    pub streaming: Option<Obj<RawStreaming>>,
    /// How attempts are judged and how the chain is walked.
    #[serde(default, deserialize_with = "apart")]
    pub strategy: Option<Obj<RawStrategy>>,
    /// The ordered chain of upstream targets (at least one).
    #[cfg_attr(test, schemars(required))]
    pub targets: Option<Vec<Obj<RawTarget>>>,
    /// Gateway keys. When present, every request must present one of them.
    #[serde(default, deserialize_with = "apart")]
    pub keys: Option<Vec<Obj<RawKey>>>,
    /// Response cache of non-streaming chat completions.
    #[serde(default, deserialize_with = "apart")]
    pub cache: Option<Obj<RawCache>>,
    /// The Responses API: how long and how many response ids are remembered with the target
    /// that created them.
    #[serde(default, deserialize_with = "apart")]
    pub responses: Option<Obj<RawResponses>>,
    /// Named routes: a request on a route's path is its operation, down its own chain.
    #[serde(default, deserialize_with = "apart")]
    pub routes: Option<Vec<Obj<RawRoute>>>,
    /// Apps written for Azure OpenAI: the model each deployment name they call stands for
    /// (deployment -> model). A deployment not listed is the model the Azure targets'
    /// `deployments` map to it, when exactly one does; else its own name is the model.
    pub deployment_models: Option<BTreeMap<String, String>>,
    /// The most a client waits for the whole chain (default "120s").
    #[serde(default, deserialize_with = "apart")]
    pub deadline: Option<Text<Dur>>,
    /// Larger request bodies get 413 (default 4194304, at most 67108864).
    pub max_request_body_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Strategy"))]
#[serde(deny_unknown_fields)]
pub struct RawStrategy {
    /// "fallback" (default): the ordered chain. "loadbalance": the first attempt goes to a
    /// target picked at random in proportion to its `weight`; the others, in order, are its
    /// fallbacks.
    pub mode: Option<Mode>,
    /// Upstream statuses that count as failure (default 429 and 500-599).
    pub on_status_codes: Option<Vec<u16>>,
    /// Fail over an Azure content-filter refusal (400 content_filter) when 400 is a failure
    /// status (default false).
    pub failover_on_content_filter: Option<bool>,
    /// Fail over (and cool down) a target that answers 401 or 403: it rejected the gateway's own
    /// credential for it, which the client cannot fix (default true).
    pub failover_on_credential_rejection: Option<bool>,
    /// Longest Retry-After the filter waits before retrying the same target (default "5s").
    pub max_retry_wait: Option<Text<Dur>>,
}

/// Reads a field of a configuration object in a function of its own. Inlined, the fields'
/// readers made the objects' readers 16-30 KB functions, which Envoy's V8 compiles at start-up
/// with its optimising compiler only, whose memory grows faster than a function's size
/// (docs/performance.md, "Footprint"). (Not on the fields whose schema `default` would change:
/// the required ones and the maps.)
#[inline(never)]
fn apart<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    T::deserialize(d)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Role"))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Filter,
    Upstream,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Streaming"))]
#[serde(deny_unknown_fields)]
pub struct RawStreaming {
    /// "router" (default): a streamed request goes through Envoy's router, which retries it on
    /// the next target's own cluster before the first byte (README, streamed failover: the Envoy
    /// side), so the fallback's answer streams. "callout": it fails over through callouts like any other
    /// request, and the fallback's answer arrives in one piece when it is complete.
    pub failover: Option<StreamFailover>,
}

/// How a `"stream": true` request fails over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "StreamFailover"))]
#[serde(rename_all = "lowercase")]
pub enum StreamFailover {
    Router,
    Callout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Mode"))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Fallback,
    Loadbalance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Provider"))]
#[serde(rename_all = "lowercase")]
pub enum RawProvider {
    #[serde(rename = "openai")]
    OpenAi,
    Azure,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Target"))]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    /// Unique; defaults to the provider's name. Used in headers, stats, logs and `keys`.
    pub name: Option<String>,
    /// "openai" or "azure".
    #[cfg_attr(test, schemars(required))]
    pub provider: Option<RawProvider>,
    /// The Envoy cluster that reaches this target.
    #[cfg_attr(test, schemars(required))]
    pub cluster: Option<String>,
    /// The :authority sent (default api.openai.com, or <resource_name>.openai.azure.com).
    pub host: Option<String>,
    /// Environment variable (from vm_config.environment_variables) holding the provider key.
    pub api_key_env: Option<String>,
    /// Inline provider key, for local testing only.
    pub api_key: Option<String>,
    /// Azure only: environment variable holding an Entra ID token, sent as a bearer token.
    pub azure_ad_token_env: Option<String>,
    /// Azure only: Entra ID tokens the filter obtains and refreshes itself, from an app's
    /// client secret or the machine's managed identity.
    #[serde(default, deserialize_with = "apart")]
    pub azure_ad: Option<Obj<RawAzureAd>>,
    /// Extra attempts on this target before moving on (default 0, at most 10).
    pub retries: Option<u32>,
    /// Per attempt (default "60s").
    #[serde(default, deserialize_with = "apart")]
    pub timeout: Option<Text<Dur>>,
    /// The model sent to this target instead of the client's.
    pub model: Option<String>,
    /// Object deep-merged into the request body for this target.
    pub override_params: Option<Map<String, Value>>,
    /// Azure: the resource (host <resource_name>.openai.azure.com), unless `host` is set.
    pub resource_name: Option<String>,
    /// Azure: the api-version query parameter, or "v1" for Azure's v1 API (/openai/v1/...,
    /// the deployment in the body's model, no api-version).
    pub api_version: Option<String>,
    /// Azure: model -> deployment; "*" is the default.
    pub deployments: Option<BTreeMap<String, String>>,
    /// Azure: shorthand for {"*": deployment}.
    pub deployment: Option<String>,
    /// Circuit breaker shared by all workers: false disables it, an object tunes it.
    #[serde(default, deserialize_with = "apart")]
    pub cooldown: Option<RawCooldownSwitch>,
    /// Share of first attempts under "loadbalance" (default 1; 0: only ever a fallback).
    pub weight: Option<u32>,
    /// Skip this target before it starts answering 429: when an answer reports fewer remaining
    /// requests or tokens than these, until the reported reset time.
    #[serde(default, deserialize_with = "apart")]
    pub spillover: Option<Obj<RawSpillover>>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "AzureAd"))]
#[serde(deny_unknown_fields)]
pub struct RawAzureAd {
    /// The Envoy cluster that reaches the token endpoint (login.microsoftonline.com, or IMDS).
    #[cfg_attr(test, schemars(required))]
    pub cluster: Option<String>,
    /// The :authority sent (default login.microsoftonline.com, or 169.254.169.254 for IMDS).
    pub host: Option<String>,
    /// Client credentials: the directory (tenant) id.
    pub tenant_id: Option<String>,
    /// Client credentials: the app's client id; managed identity: a user-assigned identity's.
    pub client_id: Option<String>,
    /// Client credentials: environment variable holding the client secret.
    pub client_secret_env: Option<String>,
    /// true: the machine's managed identity, through Azure IMDS.
    pub managed_identity: Option<bool>,
    /// The resource tokens are for (default "https://cognitiveservices.azure.com").
    pub resource: Option<String>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Spillover"))]
#[serde(deny_unknown_fields)]
pub struct RawSpillover {
    /// Spill over when `x-ratelimit-remaining-requests` is below this.
    pub min_remaining_requests: Option<u64>,
    /// Spill over when `x-ratelimit-remaining-tokens` is below this.
    pub min_remaining_tokens: Option<u64>,
}

/// `true`/`false`, or the policy as an object.
#[derive(Debug)]
pub enum RawCooldownSwitch {
    Enabled(bool),
    Policy(RawCooldown),
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Cooldown"))]
#[serde(deny_unknown_fields)]
pub struct RawCooldown {
    /// false turns the cooldown off.
    pub enabled: Option<bool>,
    /// Share of the window's attempts that, once failed, starts a cooldown: a number from 0 to
    /// 1 (default 0.5; 0: never by rate). A brownout below it keeps the target in use.
    pub failure_rate: Option<f64>,
    /// Attempts the window must hold before its failure rate is judged (default 10, at least 1).
    pub min_attempts: Option<u32>,
    /// The sliding window the failure rate is judged over (default "10s", from "1s" to "1h").
    pub window: Option<Deferred<Dur>>,
    /// Transport failures in a row (no answer: connection refused or reset, timeout) that start
    /// a cooldown (default 3; 0: never by them). Unlike failure statuses, they say the target
    /// cannot be reached, and each can cost a whole timeout, so a short streak is enough.
    pub after_transport_failures: Option<u32>,
    /// Failures of any kind in a row (statuses included) that start a cooldown (default 0:
    /// never by them; a brownout trips this, so prefer failure_rate).
    pub after_failures: Option<u32>,
    /// How long a tripped target stays out before one probe request tries it again, and again
    /// after a failed probe (default "30s").
    pub duration: Option<Deferred<Dur>>,
    /// Cap on a cooldown asked for by a 429's Retry-After (default "5m").
    pub max_duration: Option<Deferred<Dur>>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Key"))]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    /// Unique name of the key (it appears in logs and scopes cache entries).
    pub name: Option<String>,
    /// Hex SHA-256 of the gateway key.
    pub key_sha256: Option<String>,
    /// Environment variable holding the gateway key itself.
    pub key_env: Option<String>,
    /// The targets this key may use (default: all).
    pub targets: Option<Vec<String>>,
    /// How many requests and tokens this key may spend, on every path, per Envoy.
    pub limits: Option<Obj<RawLimits>>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Limits"))]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Requests per window: one more is refused with 429 before it is sent upstream.
    pub requests: Option<Obj<RawLimit>>,
    /// Tokens (prompt + completion, from each answer's usage) per window: once spent, requests
    /// are refused with 429 until enough of the window has passed.
    pub tokens: Option<Obj<RawLimit>>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Limit"))]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    /// How many (at least 1).
    #[cfg_attr(test, schemars(required))]
    pub count: Option<u64>,
    /// Per how long: "1s" to "30d".
    #[cfg_attr(test, schemars(required))]
    pub per: Option<Text<Window>>,
}

/// The window of a limit: one second to 30 days.
#[derive(Debug, Clone, Copy)]
pub struct Window(pub Duration);

impl FromText for Window {
    const EXPECTED: &'static str =
        "a duration from \"1s\" to \"30d\" such as \"1m\", \"1h\" or \"1d\"";
    fn from_text(text: &str) -> Option<Window> {
        crate::duration::parse(text)
            .filter(|d| *d >= Duration::from_secs(1) && *d <= Duration::from_secs(30 * 24 * 3600))
            .map(Window)
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Cache"))]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// true turns the cache on.
    pub enabled: Option<bool>,
    /// How long an entry is served (default "60s").
    pub ttl: Option<Deferred<Dur>>,
    /// Slots in Envoy shared data (default 1024, at most 1000000).
    pub max_entries: Option<u32>,
    /// Larger answers are not cached (default 262144, at most 4194304).
    pub max_body_bytes: Option<u64>,
}

impl<'de> Deserialize<'de> for RawCooldownSwitch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SwitchVisitor;
        impl<'de> Visitor<'de> for SwitchVisitor {
            type Value = RawCooldownSwitch;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a boolean or an object")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<RawCooldownSwitch, E> {
                Ok(RawCooldownSwitch::Enabled(b))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawCooldownSwitch, A::Error> {
                RawCooldown::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawCooldownSwitch::Policy)
            }
        }
        d.deserialize_any(SwitchVisitor)
    }
}

/// A value written as a string and read by `T`'s parser (e.g. a duration).
#[derive(Debug, Clone, Copy)]
pub struct Text<T>(pub T);

/// How a string field is read.
pub trait FromText: Sized {
    /// What the error says is expected, e.g. `a duration such as "10s"`.
    const EXPECTED: &'static str;
    fn from_text(text: &str) -> Option<Self>;
}

/// A duration of at most one day.
#[derive(Debug, Clone, Copy)]
pub struct Dur(pub Duration);

impl FromText for Dur {
    const EXPECTED: &'static str = "a duration such as \"500ms\", \"10s\" or \"2m\"";
    fn from_text(text: &str) -> Option<Dur> {
        crate::duration::parse(text)
            .filter(|d| *d <= Duration::from_secs(24 * 3600))
            .map(Dur)
    }
}

impl<'de, T: FromText> Deserialize<'de> for Text<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor<T>(PhantomData<T>);
        impl<T: FromText> Visitor<'_> for TextVisitor<T> {
            type Value = Text<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(T::EXPECTED)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text<T>, E> {
                T::from_text(s)
                    .map(Text)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(s), &T::EXPECTED))
            }
        }
        d.deserialize_str(TextVisitor(PhantomData))
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Route"))]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Unique; appears in logs, stats (`route` label) and the access log (`llmf_route`).
    #[cfg_attr(test, schemars(required))]
    pub name: Option<String>,
    /// The request path this route answers, matched exactly without the query string.
    #[cfg_attr(test, schemars(required))]
    pub path: Option<String>,
    /// What a request on the path is.
    #[cfg_attr(test, schemars(required))]
    pub operation: Option<RawOperation>,
    /// The route's chain: target names, or steps overriding a target's settings on this route.
    #[cfg_attr(test, schemars(required))]
    pub targets: Option<Vec<RawStep>>,
    /// This route's response cache (chat routes only).
    #[serde(default, deserialize_with = "apart")]
    pub cache: Option<Obj<RawCache>>,
    /// Names of the gateway keys that may call this route (default: every key).
    pub keys: Option<Vec<String>>,
    /// How many requests and tokens this route may spend, all keys together, per Envoy.
    #[serde(default, deserialize_with = "apart")]
    pub limits: Option<Obj<RawLimits>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Operation"))]
#[serde(rename_all = "lowercase")]
pub enum RawOperation {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

/// A target name, or a step object.
#[derive(Debug)]
pub enum RawStep {
    Name(String),
    Step(RawStepSettings),
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Step"))]
#[serde(deny_unknown_fields)]
pub struct RawStepSettings {
    /// The target's name.
    #[cfg_attr(test, schemars(required))]
    pub target: Option<String>,
    /// Extra attempts on this target on this route (default: the target's).
    pub retries: Option<u32>,
    /// Per attempt on this route (default: the target's).
    pub timeout: Option<Text<Dur>>,
    /// The model sent to this target on this route; fills in the model when the client sends
    /// none.
    pub model: Option<String>,
    /// Object deep-merged into the request body on this route (default: the target's).
    pub override_params: Option<Map<String, Value>>,
}

impl<'de> Deserialize<'de> for RawStep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StepVisitor;
        impl<'de> Visitor<'de> for StepVisitor {
            type Value = RawStep;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a target name or a step object")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawStep, E> {
                Ok(RawStep::Name(s.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawStep, A::Error> {
                RawStepSettings::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawStep::Step)
            }
        }
        d.deserialize_any(StepVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[cfg_attr(test, schemars(rename = "Responses"))]
#[serde(deny_unknown_fields)]
pub struct RawResponses {
    /// How long the target that created a response id is remembered (default "24h", at most
    /// "720h").
    pub affinity_ttl: Option<Text<LongDur>>,
    /// Ids remembered at most, in Envoy shared data (default 16384, at most 1000000).
    pub max_affinity_entries: Option<u32>,
}

/// A duration of at most 30 days.
#[derive(Debug, Clone, Copy)]
pub struct LongDur(pub Duration);

impl FromText for LongDur {
    const EXPECTED: &'static str =
        "a duration such as \"30m\", \"24h\" or \"720h\" (at most 30 days)";
    fn from_text(text: &str) -> Option<LongDur> {
        crate::duration::parse(text)
            .filter(|d| *d <= Duration::from_secs(30 * 24 * 3600))
            .map(LongDur)
    }
}

/// A string read by `T`'s parser only when its object is switched on (`enabled: false` turns a
/// cache or a cooldown off whatever its other settings say).
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct Deferred<T> {
    text: String,
    #[serde(skip)]
    kind: PhantomData<T>,
}

impl<T: FromText> Deferred<T> {
    /// The value, or the error a `Text<T>` would have given at `field`.
    pub fn read(&self, field: &str) -> Result<T, super::ConfigError> {
        T::from_text(&self.text).ok_or_else(|| {
            super::ConfigError::new(
                field,
                format!("expected {}, got {}", T::EXPECTED, crate::quote(&self.text)),
            )
        })
    }
}

#[cfg(test)]
mod schema {
    //! How the hand-written `Deserialize` types above look in the JSON Schema.
    use super::*;
    use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
    use std::borrow::Cow;

    impl<T: JsonSchema> JsonSchema for Obj<T> {
        fn schema_name() -> Cow<'static, str> {
            T::schema_name()
        }
        fn json_schema(generator: &mut SchemaGenerator) -> Schema {
            T::json_schema(generator)
        }
        fn inline_schema() -> bool {
            T::inline_schema()
        }
    }

    impl JsonSchema for Text<Dur> {
        fn schema_name() -> Cow<'static, str> {
            "Duration".into()
        }
        fn json_schema(_: &mut SchemaGenerator) -> Schema {
            json_schema!({
                "type": "string",
                "description": "A duration: one or more <number><unit> parts, units ms, s, m, h, d (\"500ms\", \"10s\", \"1.5s\", \"2m\", \"1m30s\"); at most one day.",
                "pattern": "^\\s*([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(ns|us|µs|ms|s|m|h|d)(([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(ns|us|µs|ms|s|m|h|d))*\\s*$"
            })
        }
    }

    impl JsonSchema for Text<LongDur> {
        fn schema_name() -> Cow<'static, str> {
            "LongDuration".into()
        }
        fn json_schema(generator: &mut SchemaGenerator) -> Schema {
            let mut schema = Text::<Dur>::json_schema(generator);
            schema.insert(
                "description".into(),
                "A duration as for Duration, at most 30 days (\"720h\").".into(),
            );
            schema
        }
    }

    impl JsonSchema for Text<Window> {
        fn schema_name() -> Cow<'static, str> {
            "Window".into()
        }
        fn json_schema(generator: &mut SchemaGenerator) -> Schema {
            let mut schema = Text::<Dur>::json_schema(generator);
            schema.insert(
                "description".into(),
                "A duration as for Duration, from one second to 30 days (\"1m\", \"1h\", \"1d\")."
                    .into(),
            );
            schema
        }
    }

    impl JsonSchema for Deferred<Dur> {
        fn schema_name() -> Cow<'static, str> {
            Text::<Dur>::schema_name()
        }
        fn json_schema(generator: &mut SchemaGenerator) -> Schema {
            Text::<Dur>::json_schema(generator)
        }
    }

    impl JsonSchema for RawStep {
        fn schema_name() -> Cow<'static, str> {
            "StepOrName".into()
        }
        fn json_schema(generator: &mut SchemaGenerator) -> Schema {
            let step = generator.subschema_for::<RawStepSettings>();
            json_schema!({
                "anyOf": [{"type": "string", "description": "A target's name."}, step]
            })
        }
    }

    impl JsonSchema for RawCooldownSwitch {
        fn schema_name() -> Cow<'static, str> {
            "CooldownSwitch".into()
        }
        fn json_schema(generator: &mut SchemaGenerator) -> Schema {
            let policy = generator.subschema_for::<RawCooldown>();
            json_schema!({
                "anyOf": [{"type": "boolean"}, policy]
            })
        }
    }
}
