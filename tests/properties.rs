//! Property tests of the pure modules (issue 9, fuzzing part): whatever the input, the filter's
//! decisions never panic and keep their invariants.
//!
//! Each property runs proptest's default number of cases (256); set `PROPTEST_CASES` for more,
//! e.g. `PROPTEST_CASES=20000 cargo test --release --test properties`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Map, Value};

use llm_failover::answer::affinity;
use llm_failover::answer::cache::{self, Entry};
use llm_failover::answer::reply::{ErrorShape, Rejection};
use llm_failover::answer::usage::{self, Usage, UsageScanner};
use llm_failover::config::Cooldown;
use llm_failover::config::{
    self, AzureApi, Config, ConfigError, Credential, Env, KeyMatch, Provider,
};
use llm_failover::health::cooldown::{self, Attempt, Change, Ending, Phase, Rate, State, Trip};
use llm_failover::policy::chain::{
    Chain, Failure, FailureKind, GiveUpReason, Hop, Next, NoRetry, Outcome, MIN_ATTEMPT,
};
use llm_failover::policy::plan;
use llm_failover::policy::retry_after;
use llm_failover::request::auth;
use llm_failover::request::azure::{self, BadVersion};
use llm_failover::request::body::{Body, Keep};
use llm_failover::target::provider;
use llm_failover::target::rewrite::{self, Operation};

// ---- shared generators ---------------------------------------------------------------------

struct MapEnv(HashMap<String, String>);

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// Every name of the configuration schema, so generated JSON reaches past the first check.
const SCHEMA_NAMES: &[&str] = &[
    "strategy",
    "mode",
    "on_status_codes",
    "failover_on_content_filter",
    "max_retry_wait",
    "targets",
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
    "enabled",
    "after_failures",
    "duration",
    "max_duration",
    "keys",
    "key_sha256",
    "key_env",
    "cache",
    "ttl",
    "max_entries",
    "max_body_bytes",
    "deadline",
    "max_request_body_bytes",
];

/// String values the schema gives a meaning to.
const SCHEMA_VALUES: &[&str] = &[
    "openai",
    "azure",
    "fallback",
    "loadbalance",
    "*",
    "10s",
    "250ms",
    "1.5s",
    "2m",
    "0s",
    "2024-10-21",
    "KEY",
    "EMPTY",
    "res",
    "api.openai.com",
    "gpt-4",
    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
];

fn schema_env() -> MapEnv {
    MapEnv(HashMap::from([
        ("KEY".to_string(), "secret".to_string()),
        ("EMPTY".to_string(), " ".to_string()),
        ("SPACEY".to_string(), "has space".to_string()),
    ]))
}

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(SCHEMA_NAMES).prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

fn arb_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u32..700).prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        prop::sample::select(SCHEMA_VALUES).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    arb_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(arb_key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON without floats: two such values are equal exactly when their canonical texts are.
fn arb_exact_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        "[a-c]{0,3}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 40, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(prop_oneof![any::<String>(), "[a-c]{0,2}"], inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A duration in one of the accepted spellings, with its value.
fn arb_duration(max_ms: u64) -> impl Strategy<Value = (String, Duration)> {
    prop_oneof![
        (0..=max_ms).prop_map(|ms| (format!("{ms}ms"), ms)),
        (0..=max_ms / 1000).prop_map(|s| (format!("{s}s"), s * 1000)),
        (0..=max_ms / 60_000).prop_map(|m| (format!("{m}m"), m * 60_000)),
        (0..=max_ms / 100).prop_map(|t| (format!("{}.{}s", t / 10, t % 10), t * 100)),
        (0..=max_ms / 1000).prop_map(|s| (format!(" {s}s "), s * 1000)),
    ]
    .prop_map(|(text, ms)| (text, Duration::from_millis(ms)))
}

const DAY_MS: u64 = 86_400_000;

// ---- valid configurations ------------------------------------------------------------------

#[derive(Debug, Clone)]
enum CooldownSpec {
    Absent,
    Off,
    On,
    Disabled,
    Custom {
        after: Option<u32>,
        duration: Option<(String, Duration)>,
        extra_ms: Option<u64>,
    },
}

#[derive(Debug, Clone)]
struct TargetSpec {
    azure: bool,
    name_stem: Option<String>,
    cluster: String,
    /// 0: inline `api_key`, 1: `api_key_env`, 2: `azure_ad_token_env` (Azure only).
    credential_kind: u8,
    secret: String,
    retries: Option<u32>,
    timeout: Option<(String, Duration)>,
    model: Option<String>,
    override_params: Option<Map<String, Value>>,
    host: Option<String>,
    resource_name: String,
    api_version: String,
    deployments: BTreeMap<String, String>,
    /// The `"*"` deployment, given as `deployment` (true) or `deployments["*"]` (false).
    default_deployment: Option<(bool, String)>,
    cooldown: CooldownSpec,
}

#[derive(Debug, Clone)]
struct KeySpec {
    name_stem: String,
    /// Some: `key_sha256` with these bytes (upper-case hex if the bool); None: `key_env`.
    sha: Option<([u8; 32], bool)>,
    targets: Option<Vec<usize>>,
}

#[derive(Debug, Clone)]
enum CacheSpec {
    Absent,
    Disabled,
    Enabled {
        ttl: Option<(String, Duration)>,
        max_entries: Option<u32>,
        max_body_bytes: Option<u64>,
    },
}

#[derive(Debug, Clone)]
struct ConfigSpec {
    on_status_codes: Option<Vec<u16>>,
    max_retry_wait: Option<(String, Duration)>,
    failover_on_content_filter: Option<bool>,
    targets: Vec<TargetSpec>,
    keys: Vec<KeySpec>,
    cache: CacheSpec,
    deadline: Option<(String, Duration)>,
    max_request_body_bytes: Option<u64>,
}

fn arb_model_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["gpt-4", "gpt-4o", "text-embedding-3-small"])
            .prop_map(str::to_string),
        any::<String>(),
        Just("gpt-4\r\nx-injected: 1".to_string()),
        Just("gpt 4/../../admin?x=1#".to_string()),
    ]
}

fn arb_cooldown() -> impl Strategy<Value = CooldownSpec> {
    prop_oneof![
        Just(CooldownSpec::Absent),
        Just(CooldownSpec::Off),
        Just(CooldownSpec::On),
        Just(CooldownSpec::Disabled),
        (
            proptest::option::of(0u32..20),
            proptest::option::of(arb_duration(DAY_MS)),
            proptest::option::of(0..DAY_MS),
        )
            .prop_map(|(after, duration, extra_ms)| CooldownSpec::Custom {
                after,
                duration,
                extra_ms,
            }),
    ]
}

/// A deployment name. "." and ".." are not: a URL resolves them away (refused at load).
fn arb_deployment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,30}".prop_filter("not a dot segment", |d| d != "." && d != "..")
}

fn arb_target() -> impl Strategy<Value = TargetSpec> {
    let common = (
        any::<bool>(),
        proptest::option::of("[A-Za-z0-9_]{1,20}"),
        // A cluster name: anything but spaces, control characters and commas (the list separator).
        "[^ ,\\p{Cc}]{1,20}",
        0u8..3,
        "[!-~]{1,40}",
        proptest::option::of(0u32..=10),
        proptest::option::of(arb_duration(DAY_MS)),
        proptest::option::of(arb_model_name().prop_filter("non-empty", |m| !m.is_empty())),
    );
    let overrides = proptest::option::of(
        // No floats: serde_json reads some decimals one ULP off, which is not what this checks.
        prop::collection::btree_map(arb_key(), arb_exact_json(), 0..4).prop_map(|m| {
            m.into_iter()
                .filter(|(k, _)| k != "model")
                .collect::<Map<String, Value>>()
        }),
    );
    let azure = (
        proptest::option::of("[a-z0-9-]{1,20}(\\.[a-z0-9-]{1,10}){0,2}(:[0-9]{1,5})?"),
        "[A-Za-z0-9-]{1,63}",
        "[A-Za-z0-9._-]{1,20}",
        prop::collection::btree_map(arb_model_name(), arb_deployment(), 0..4),
        proptest::option::of((any::<bool>(), arb_deployment())),
        arb_cooldown(),
    );
    (common, overrides, azure).prop_map(
        |(
            (azure, name_stem, cluster, kind, secret, retries, timeout, model),
            override_params,
            (host, resource_name, api_version, mut deployments, mut star, cooldown),
        )| {
            deployments.remove("*");
            if deployments.is_empty() && star.is_none() {
                star = Some((true, "fallback-dep".to_string()));
            }
            TargetSpec {
                azure,
                name_stem,
                cluster,
                credential_kind: if azure { kind } else { kind % 2 },
                secret,
                retries,
                timeout,
                model,
                override_params,
                host,
                resource_name,
                api_version,
                deployments,
                default_deployment: star,
                cooldown,
            }
        },
    )
}

fn arb_config_spec() -> impl Strategy<Value = ConfigSpec> {
    let failure_codes: Vec<u16> = (100..200).chain(300..600).collect();
    (
        proptest::option::of(prop::collection::vec(
            prop::sample::select(failure_codes),
            1..5,
        )),
        proptest::option::of(arb_duration(DAY_MS)),
        proptest::option::of(any::<bool>()),
        prop::collection::vec(arb_target(), 1..5),
        prop::collection::vec(
            (
                "[A-Za-z0-9_-]{1,20}",
                proptest::option::of((any::<[u8; 32]>(), any::<bool>())),
                proptest::option::of(prop::collection::vec(0usize..8, 1..4)),
            )
                .prop_map(|(name_stem, sha, targets)| KeySpec {
                    name_stem,
                    sha,
                    targets,
                }),
            0..3,
        ),
        prop_oneof![
            Just(CacheSpec::Absent),
            Just(CacheSpec::Disabled),
            (
                proptest::option::of(
                    arb_duration(DAY_MS).prop_filter("positive", |(_, d)| !d.is_zero())
                ),
                proptest::option::of(1u32..=1_000_000),
                proptest::option::of(1u64..=4 * 1024 * 1024),
            )
                .prop_map(|(ttl, max_entries, max_body_bytes)| CacheSpec::Enabled {
                    ttl,
                    max_entries,
                    max_body_bytes,
                }),
        ],
        proptest::option::of(arb_duration(DAY_MS)),
        proptest::option::of(1u64..=64 * 1024 * 1024),
    )
        .prop_map(
            |(
                on_status_codes,
                max_retry_wait,
                failover_on_content_filter,
                targets,
                keys,
                cache,
                deadline,
                max_request_body_bytes,
            )| ConfigSpec {
                on_status_codes,
                max_retry_wait,
                failover_on_content_filter,
                targets,
                keys,
                cache,
                deadline,
                max_request_body_bytes,
            },
        )
}

impl ConfigSpec {
    /// The effective target names: a target without a name gets its provider's, when free.
    fn target_names(&self) -> Vec<(String, bool)> {
        let mut defaults_used = Vec::new();
        self.targets
            .iter()
            .enumerate()
            .map(|(i, t)| match &t.name_stem {
                Some(stem) => (format!("{stem}-{i}"), true),
                None => {
                    let default = if t.azure { "azure" } else { "openai" };
                    if defaults_used.contains(&default) {
                        (format!("t-{i}"), true)
                    } else {
                        defaults_used.push(default);
                        (default.to_string(), false)
                    }
                }
            })
            .collect()
    }

    fn key_secret(j: usize) -> String {
        format!("gw-key-{j}")
    }

    fn render(&self) -> (Value, MapEnv) {
        let mut env = HashMap::new();
        let names = self.target_names();
        let mut top = Map::new();
        let mut strategy = Map::new();
        if let Some(codes) = &self.on_status_codes {
            strategy.insert("on_status_codes".into(), json!(codes));
        }
        if let Some((text, _)) = &self.max_retry_wait {
            strategy.insert("max_retry_wait".into(), json!(text));
        }
        if let Some(b) = self.failover_on_content_filter {
            strategy.insert("failover_on_content_filter".into(), json!(b));
        }
        if !strategy.is_empty() {
            strategy.insert("mode".into(), json!("fallback"));
            top.insert("strategy".into(), Value::Object(strategy));
        }
        let mut targets = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            let mut o = Map::new();
            let (name, explicit) = &names[i];
            if *explicit {
                o.insert("name".into(), json!(name));
            }
            o.insert(
                "provider".into(),
                json!(if t.azure { "azure" } else { "openai" }),
            );
            o.insert("cluster".into(), json!(t.cluster));
            let var = format!("T{i}_KEY");
            match t.credential_kind {
                0 => {
                    o.insert("api_key".into(), json!(t.secret));
                }
                1 => {
                    o.insert("api_key_env".into(), json!(var));
                    env.insert(var, format!(" {} ", t.secret));
                }
                _ => {
                    o.insert("azure_ad_token_env".into(), json!(var));
                    env.insert(var, t.secret.clone());
                }
            }
            if let Some(r) = t.retries {
                o.insert("retries".into(), json!(r));
            }
            if let Some((text, _)) = &t.timeout {
                o.insert("timeout".into(), json!(text));
            }
            if let Some(m) = &t.model {
                o.insert("model".into(), json!(m));
            }
            if let Some(p) = &t.override_params {
                o.insert("override_params".into(), Value::Object(p.clone()));
            }
            if let Some(h) = &t.host {
                o.insert("host".into(), json!(h));
            }
            if t.azure {
                if t.host.is_none() {
                    o.insert("resource_name".into(), json!(t.resource_name));
                }
                o.insert("api_version".into(), json!(t.api_version));
                let mut deployments = t.deployments.clone();
                match &t.default_deployment {
                    Some((true, d)) => {
                        o.insert("deployment".into(), json!(d));
                    }
                    Some((false, d)) => {
                        deployments.insert("*".into(), d.clone());
                    }
                    None => {}
                }
                if !deployments.is_empty() {
                    o.insert("deployments".into(), json!(deployments));
                }
            }
            match &t.cooldown {
                CooldownSpec::Absent => {}
                CooldownSpec::Off => {
                    o.insert("cooldown".into(), json!(false));
                }
                CooldownSpec::On => {
                    o.insert("cooldown".into(), json!(true));
                }
                CooldownSpec::Disabled => {
                    o.insert("cooldown".into(), json!({"enabled": false}));
                }
                CooldownSpec::Custom {
                    after,
                    duration,
                    extra_ms,
                } => {
                    let mut c = Map::new();
                    if let Some(a) = after {
                        c.insert("after_failures".into(), json!(a));
                    }
                    if let Some((text, _)) = duration {
                        c.insert("duration".into(), json!(text));
                    }
                    if let Some(max) = cooldown_max_ms(duration, *extra_ms) {
                        c.insert("max_duration".into(), json!(format!("{max}ms")));
                    }
                    o.insert("cooldown".into(), Value::Object(c));
                }
            }
            targets.push(Value::Object(o));
        }
        top.insert("targets".into(), Value::Array(targets));
        if !self.keys.is_empty() {
            let mut keys = Vec::new();
            for (j, k) in self.keys.iter().enumerate() {
                let mut o = Map::new();
                o.insert("name".into(), json!(format!("{}-{j}", k.name_stem)));
                match &k.sha {
                    Some((bytes, upper)) => {
                        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                        let hex = if *upper { hex.to_uppercase() } else { hex };
                        o.insert("key_sha256".into(), json!(hex));
                    }
                    None => {
                        let var = format!("K{j}_KEY");
                        o.insert("key_env".into(), json!(var));
                        env.insert(var, Self::key_secret(j));
                    }
                }
                if let Some(ts) = &k.targets {
                    let listed: Vec<&str> = ts
                        .iter()
                        .map(|i| names[i % names.len()].0.as_str())
                        .collect();
                    o.insert("targets".into(), json!(listed));
                }
                keys.push(Value::Object(o));
            }
            top.insert("keys".into(), Value::Array(keys));
        }
        match &self.cache {
            CacheSpec::Absent => {}
            CacheSpec::Disabled => {
                top.insert("cache".into(), json!({"enabled": false, "ttl": "bogus"}));
            }
            CacheSpec::Enabled {
                ttl,
                max_entries,
                max_body_bytes,
            } => {
                let mut c = Map::new();
                c.insert("enabled".into(), json!(true));
                if let Some((text, _)) = ttl {
                    c.insert("ttl".into(), json!(text));
                }
                if let Some(n) = max_entries {
                    c.insert("max_entries".into(), json!(n));
                }
                if let Some(n) = max_body_bytes {
                    c.insert("max_body_bytes".into(), json!(n));
                }
                top.insert("cache".into(), Value::Object(c));
            }
        }
        if let Some((text, _)) = &self.deadline {
            top.insert("deadline".into(), json!(text));
        }
        if let Some(n) = self.max_request_body_bytes {
            top.insert("max_request_body_bytes".into(), json!(n));
        }
        (Value::Object(top), MapEnv(env))
    }

    /// Asserts that `c` says what the spec asked for.
    fn check(&self, c: &Config) {
        let names = self.target_names();
        match &self.on_status_codes {
            Some(codes) => assert_eq!(&c.on_status_codes, codes),
            None => {
                assert!(c.is_failure_status(429) && c.is_failure_status(500));
                assert!(c.is_failure_status(599) && !c.is_failure_status(200));
            }
        }
        assert_eq!(
            c.max_retry_wait,
            self.max_retry_wait
                .as_ref()
                .map_or(config::DEFAULT_MAX_RETRY_WAIT, |d| d.1)
        );
        assert_eq!(
            c.failover_on_content_filter,
            self.failover_on_content_filter.unwrap_or(false)
        );
        assert_eq!(c.targets.len(), self.targets.len());
        for (i, (t, spec)) in c.targets.iter().zip(&self.targets).enumerate() {
            assert_eq!(t.name, names[i].0);
            assert_eq!(c.target_index(&t.name), Some(i));
            let want_provider = if spec.azure {
                Provider::Azure
            } else {
                Provider::OpenAi
            };
            assert_eq!(t.provider, want_provider);
            assert_eq!(t.cluster, spec.cluster);
            let secret = spec.secret.clone();
            let want_credential = match spec.credential_kind {
                2 => Credential::AzureAdToken(secret),
                _ => Credential::ApiKey(secret),
            };
            assert_eq!(t.credential, want_credential);
            assert_eq!(t.retries, spec.retries.unwrap_or(0));
            assert_eq!(
                t.timeout,
                spec.timeout
                    .as_ref()
                    .map_or(config::DEFAULT_TIMEOUT, |d| d.1)
            );
            assert_eq!(t.model, spec.model);
            assert_eq!(
                t.override_params.as_ref().map(to_serde),
                spec.override_params
            );
            let want_host = match (&spec.host, spec.azure) {
                (Some(h), _) => h.clone(),
                (None, true) => format!("{}.openai.azure.com", spec.resource_name),
                (None, false) => "api.openai.com".to_string(),
            };
            assert_eq!(t.host, want_host);
            match &t.azure {
                None => assert!(!spec.azure),
                Some(az) => {
                    assert!(spec.azure);
                    assert_eq!(az.api_version, spec.api_version);
                    assert_eq!(az.deployments, spec.deployments);
                    let default = spec.default_deployment.as_ref().map(|d| d.1.as_str());
                    assert_eq!(az.default_deployment.as_deref(), default);
                    for (model, dep) in &spec.deployments {
                        assert_eq!(az.deployment_for(Some(model)), Some(dep.as_str()));
                    }
                    assert_eq!(az.deployment_for(None), default);
                }
            }
            let want_cooldown = match &spec.cooldown {
                CooldownSpec::Off | CooldownSpec::Disabled => None,
                CooldownSpec::Absent | CooldownSpec::On => Some((0, 30_000, 300_000)),
                CooldownSpec::Custom {
                    after,
                    duration,
                    extra_ms,
                } => {
                    let d = duration.as_ref().map_or(30_000, |d| d.1.as_millis() as u64);
                    let max = cooldown_max_ms(duration, *extra_ms).unwrap_or(d.max(300_000));
                    Some((after.unwrap_or(0), d, max))
                }
            };
            let got = t.cooldown.as_ref().map(|c| {
                (
                    c.after_failures,
                    c.duration.as_millis() as u64,
                    c.max_duration.as_millis() as u64,
                )
            });
            assert_eq!(got, want_cooldown);
        }
        match &c.keys {
            None => assert!(self.keys.is_empty()),
            Some(keys) => {
                assert_eq!(keys.len(), self.keys.len());
                for (j, (k, spec)) in keys.iter().zip(&self.keys).enumerate() {
                    assert_eq!(k.name, format!("{}-{j}", spec.name_stem));
                    let want = match &spec.sha {
                        Some((bytes, _)) => *bytes,
                        None => auth::sha256(Self::key_secret(j).as_bytes()),
                    };
                    assert_eq!(k.digest, KeyMatch::Sha256(want));
                    let want_targets: Vec<usize> = match &spec.targets {
                        None => (0..self.targets.len()).collect(),
                        Some(ts) => {
                            let mut v: Vec<usize> =
                                ts.iter().map(|i| i % self.targets.len()).collect();
                            v.sort_unstable();
                            v.dedup();
                            v
                        }
                    };
                    assert_eq!(k.targets, want_targets);
                }
            }
        }
        match (&self.cache, &c.cache) {
            (CacheSpec::Absent | CacheSpec::Disabled, None) => {}
            (
                CacheSpec::Enabled {
                    ttl,
                    max_entries,
                    max_body_bytes,
                },
                Some(got),
            ) => {
                assert_eq!(
                    got.ttl,
                    ttl.as_ref().map_or(Duration::from_secs(60), |d| d.1)
                );
                assert_eq!(got.max_entries, max_entries.unwrap_or(1024));
                assert_eq!(
                    got.max_body_bytes as u64,
                    max_body_bytes.unwrap_or(256 * 1024)
                );
            }
            (want, got) => panic!("cache: wanted {want:?}, got {got:?}"),
        }
        assert_eq!(
            c.deadline,
            self.deadline
                .as_ref()
                .map_or(config::DEFAULT_DEADLINE, |d| d.1)
        );
        assert_eq!(
            c.max_request_body_bytes as u64,
            self.max_request_body_bytes
                .unwrap_or(config::DEFAULT_MAX_BODY as u64)
        );
    }
}

/// The `max_duration` a custom cooldown spec writes (None: left to the default).
fn cooldown_max_ms(duration: &Option<(String, Duration)>, extra_ms: Option<u64>) -> Option<u64> {
    let base = duration.as_ref().map_or(30_000, |d| d.1.as_millis() as u64);
    extra_ms.map(|e| (base + e).min(DAY_MS))
}

// ---- error fields --------------------------------------------------------------------------

#[derive(Debug)]
enum Segment {
    Name(String),
    Index(usize),
    /// A map key as `{:?}` prints it.
    Quoted(String),
}

fn segments(field: &str) -> Option<Vec<Segment>> {
    let mut out = Vec::new();
    let chars: Vec<char> = field.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' if !out.is_empty() => i += 1,
            '[' if chars.get(i + 1) == Some(&'"') => {
                let start = i + 1;
                let mut j = start + 1;
                let mut escaped = false;
                loop {
                    let c = *chars.get(j)?;
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                    j += 1;
                }
                if chars.get(j + 1) != Some(&']') {
                    return None;
                }
                out.push(Segment::Quoted(chars[start..=j].iter().collect()));
                i = j + 2;
            }
            '[' => {
                let end = i + chars[i..].iter().position(|c| *c == ']')?;
                let n: String = chars[i + 1..end].iter().collect();
                out.push(Segment::Index(n.parse().ok()?));
                i = end + 1;
            }
            c if c.is_ascii_lowercase() || c == '_' => {
                let n = chars[i..]
                    .iter()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || **c == '_')
                    .count();
                out.push(Segment::Name(chars[i..i + n].iter().collect()));
                i += n;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// An error names "configuration" or a place in the input: every step of its path exists in
/// `input`, except that its last step may be a schema field that is missing (or a defaulted
/// `name`).
fn check_error_field(input: &Value, e: &ConfigError) -> Result<(), String> {
    if e.field.is_empty() || e.problem.is_empty() {
        return Err(format!("empty field or problem: {e:?}"));
    }
    if e.field == "configuration" {
        return Ok(());
    }
    let segs = segments(&e.field).ok_or_else(|| format!("unparsable field {:?}", e.field))?;
    let mut cur = input;
    for (i, seg) in segs.iter().enumerate() {
        let next = match seg {
            Segment::Name(n) => cur.get(n),
            Segment::Index(n) => cur.get(n),
            Segment::Quoted(lit) => cur.as_object().and_then(|m| {
                m.iter()
                    // Field paths quote a key as a JSON string.
                    .find(|(k, _)| serde_json::to_string(k).unwrap() == *lit)
                    .map(|(_, v)| v)
            }),
        };
        match next {
            Some(v) => cur = v,
            None => {
                let last = i + 1 == segs.len();
                let missing_field = matches!(seg, Segment::Name(n)
                    if SCHEMA_NAMES.contains(&n.as_str())
                        && (e.problem.starts_with("missing") || n == "name"));
                if last && cur.is_object() && missing_field {
                    return Ok(());
                }
                return Err(format!("{e:?} does not name a place in {input}"));
            }
        }
    }
    Ok(())
}

/// Every place in `v` as a JSON pointer.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                pointers(child, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(Value),
    Remove,
    Insert(String, Value),
}

/// Values that break a field of the right type.
const BAD_STRINGS: &[&str] = &["", " ", "has space", "a\r\nb", "nul\0", "é", "-1s", "x.y/z"];

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        arb_json().prop_map(Mutation::Replace),
        prop::sample::select(BAD_STRINGS).prop_map(|s| Mutation::Replace(Value::from(s))),
        Just(Mutation::Remove),
        (arb_key(), arb_json()).prop_map(|(k, v)| Mutation::Insert(k, v)),
    ]
}

fn mutate(v: &mut Value, at: Index, m: &Mutation) {
    let mut all = Vec::new();
    pointers(v, String::new(), &mut all);
    let ptr = at.get(&all).clone();
    match m {
        Mutation::Replace(new) => {
            if let Some(slot) = v.pointer_mut(&ptr) {
                *slot = new.clone();
            }
        }
        Mutation::Remove => {
            let Some((parent, key)) = ptr.rsplit_once('/') else {
                return;
            };
            let key = key.replace("~1", "/").replace("~0", "~");
            match v.pointer_mut(parent) {
                Some(Value::Object(o)) => {
                    o.remove(&key);
                }
                Some(Value::Array(a)) => {
                    if let Ok(i) = key.parse::<usize>() {
                        if i < a.len() {
                            a.remove(i);
                        }
                    }
                }
                _ => {}
            }
        }
        Mutation::Insert(k, new) => {
            if let Some(Value::Object(o)) = v.pointer_mut(&ptr) {
                o.insert(k.clone(), new.clone());
            }
        }
    }
}

/// A `json` object as serde_json reads its text.
fn to_serde(o: &Map<String, Value>) -> Map<String, Value> {
    o.clone()
}

/// The body as the filter reads it for a request that only needs its typed fields.
fn inspect(body: &[u8]) -> Result<Body, String> {
    Body::parse(body.to_vec(), Keep::Typed)
}

/// The cache key of a body as the filter computes it (`None` when the body is refused).
fn cache_key(name: &str, op: Operation, body: &[u8]) -> Option<cache::Digest> {
    let body = Body::parse(body.to_vec(), Keep::Document).ok()?;
    cache::key("", name, op, &body)
}

/// Objects shaped like the configuration, with arbitrary values in the known places.
fn arb_config_shaped() -> impl Strategy<Value = Value> {
    let target = prop::collection::btree_map(
        prop::sample::select(SCHEMA_NAMES).prop_map(str::to_string),
        arb_json(),
        0..8,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()))
    .boxed();
    (
        prop::collection::btree_map(
            prop::sample::select(SCHEMA_NAMES).prop_map(str::to_string),
            arb_json(),
            0..5,
        ),
        proptest::option::of(prop::collection::vec(target.clone(), 0..4)),
        proptest::option::of(prop::collection::vec(target, 0..3)),
    )
        .prop_map(|(top, targets, keys)| {
            let mut o: Map<String, Value> = top.into_iter().collect();
            if let Some(t) = targets {
                o.insert("targets".into(), Value::Array(t));
            }
            if let Some(k) = keys {
                o.insert("keys".into(), Value::Array(k));
            }
            Value::Object(o)
        })
}

proptest! {
    #[test]
    fn config_parse_never_panics_on_arbitrary_bytes(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            arb_json().prop_map(|v| v.to_string().into_bytes()),
        ],
    ) {
        if let Err(e) = config::parse(&bytes, &schema_env()) {
            prop_assert!(!e.field.is_empty() && !e.problem.is_empty(), "{e:?}");
        }
    }

    #[test]
    fn config_errors_name_a_field_of_arbitrary_json(v in prop_oneof![arb_json(), arb_config_shaped()]) {
        if let Err(e) = config::parse(v.to_string().as_bytes(), &schema_env()) {
            prop_assert_eq!(check_error_field(&v, &e), Ok(()));
        }
    }

    #[test]
    fn valid_configs_round_trip_their_essentials(spec in arb_config_spec()) {
        let (v, env) = spec.render();
        let parsed = config::parse(v.to_string().as_bytes(), &env);
        prop_assert!(parsed.is_ok(), "{:?} for {}", parsed.err(), v);
        spec.check(&parsed.unwrap());
        // Pretty-printed (different white space), the same document parses the same.
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        prop_assert_eq!(config::parse(&pretty, &env).ok(), config::parse(v.to_string().as_bytes(), &env).ok());
    }

    #[test]
    fn broken_valid_configs_name_the_broken_field(
        spec in arb_config_spec(),
        at in any::<Index>(),
        m in arb_mutation(),
    ) {
        let (mut v, env) = spec.render();
        mutate(&mut v, at, &m);
        if let Err(e) = config::parse(v.to_string().as_bytes(), &env) {
            prop_assert_eq!(check_error_field(&v, &e), Ok(()));
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

// ---- request rewriting ---------------------------------------------------------------------

fn arb_client_path() -> impl Strategy<Value = String> {
    let op = prop::sample::select(vec![
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/chat/completions/",
    ]);
    prop_oneof![
        op.clone().prop_map(str::to_string),
        (op.clone(), any::<String>()).prop_map(|(p, s)| format!("{p}?{s}")),
        (op, "[\r\n\0 #?a-z]{0,8}").prop_map(|(p, s)| format!("{p}{s}")),
        any::<String>(),
    ]
}

fn arb_method() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("POST".to_string()),
        1 => prop::sample::select(vec!["GET", "post", "PUT", "POST "]).prop_map(str::to_string),
    ]
}

fn bad_byte(b: u8) -> bool {
    matches!(b, b'\r' | b'\n' | 0 | b' ')
}

/// A JSON object body with the given model and stream, extra fields and white space.
fn arb_body() -> impl Strategy<Value = (Vec<u8>, Option<Value>, Option<Value>)> {
    let model = proptest::option::of(prop_oneof![
        4 => arb_model_name().prop_map(Value::from),
        1 => arb_leaf(),
    ]);
    let stream = proptest::option::of(prop_oneof![
        Just(Value::Bool(true)),
        Just(Value::Bool(false)),
        Just(Value::Null),
        arb_leaf(),
    ]);
    (
        model,
        stream,
        prop::collection::btree_map("[a-z_]{1,10}", arb_json(), 0..4),
        "[ \t\r\n]{0,3}",
    )
        .prop_map(|(model, stream, extra, ws)| {
            let mut o: Map<String, Value> = extra
                .into_iter()
                .filter(|(k, _)| k != "model" && k != "stream")
                .collect();
            if let Some(m) = &model {
                o.insert("model".into(), m.clone());
            }
            if let Some(s) = &stream {
                o.insert("stream".into(), s.clone());
            }
            let body = format!("{ws}{}{ws}", serde_json::to_string_pretty(&o).unwrap());
            (body.into_bytes(), model, stream)
        })
}

proptest! {
    #[test]
    fn inspect_never_panics_and_accepts_only_json_objects(
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..128),
            arb_json().prop_map(|v| v.to_string().into_bytes()),
            arb_body().prop_map(|b| b.0),
            // Valid object, then damaged.
            (arb_body(), any::<Index>(), any::<u8>()).prop_map(|((mut b, _, _), at, byte)| {
                let i = at.index(b.len());
                b[i] = byte;
                b
            }),
        ],
    ) {
        if inspect(&body).is_ok() {
            // What the typed read accepts, serde_json reads as an object, and the document read
            // (for a rewrite or the cache key) accepts too.
            let doc = serde_json::from_slice::<Map<String, Value>>(&body);
            prop_assert!(doc.is_ok(), "inspect accepted {:?}: {:?}", String::from_utf8_lossy(&body), doc.err());
            prop_assert!(cache_key("k", Operation::ChatCompletions, &body).is_some());
        } else {
            prop_assert!(Body::parse(body.clone(), Keep::Document).is_err());
        }
    }

    #[test]
    fn inspect_reads_model_and_stream((body, model, stream) in arb_body()) {
        let want_model = match &model {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(()),
        };
        let want_stream = match &stream {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(()),
        };
        match (inspect(&body), want_model, want_stream) {
            (Ok(info), Ok(m), Ok(s)) => {
                prop_assert_eq!(info.model, m);
                prop_assert_eq!(info.stream, s);
            }
            (Err(e), Err(()), _) | (Err(e), _, Err(())) => prop_assert!(!e.is_empty()),
            (got, m, s) => prop_assert!(false, "got {:?}, wanted model {:?} stream {:?}", got, m, s),
        }
    }

    #[test]
    fn addresses_never_carry_header_breaking_bytes(
        spec in arb_config_spec(),
        method in arb_method(),
        client_path in arb_client_path(),
        model in proptest::option::of(arb_model_name()),
        pick in any::<Index>(),
    ) {
        let (v, env) = spec.render();
        let c = config::parse(v.to_string().as_bytes(), &env).unwrap();
        let op = Operation::from_request(&method, &client_path);
        prop_assert!(op.is_none() || method == "POST");
        for t in &c.targets {
            // Also a model the target has a deployment for (these keys may hold CR/LF too).
            let known = t.azure.as_ref().and_then(|a| {
                let models: Vec<&String> = a.deployments.keys().collect();
                (!models.is_empty()).then(|| pick.get(&models).to_string())
            });
            for model in [model.as_deref(), known.as_deref(), t.model.as_deref()] {
                let addr = provider::address(t, op, model, &client_path);
                match (t.provider, op, addr) {
                    (Provider::Azure, Some(op), Ok(a)) => {
                        let az = t.azure.as_ref().unwrap();
                        let dep = az.deployment_for(model).unwrap();
                        let v = &az.api_version;
                        let want = match (az.api, op) {
                            (AzureApi::V1, op) => format!("/openai/v1/{}", op.path()),
                            (_, Operation::Responses) => format!("/openai/responses?api-version={v}"),
                            (_, op) => format!("/openai/deployments/{dep}/{}?api-version={v}", op.path()),
                        };
                        prop_assert_eq!(a.path.clone(), want);
                        prop_assert!(!a.path.bytes().any(bad_byte), "{:?}", a.path);
                        prop_assert!(!a.authority.bytes().any(bad_byte));
                        prop_assert_eq!(&a.authority, &t.host);
                    }
                    (Provider::Azure, Some(_), Err(provider::Unservable::NoDeployment)) => {
                        prop_assert!(t.azure.as_ref().unwrap().deployment_for(model).is_none());
                    }
                    (Provider::Azure, Some(op), Err(provider::Unservable::Unsupported)) => {
                        prop_assert_eq!(t.azure.as_ref().unwrap().api, AzureApi::V1);
                        prop_assert_eq!(op, Operation::Completions);
                    }
                    (_, _, Ok(a)) => {
                        // Passed through: exactly what Envoy already validated, nothing added.
                        prop_assert_eq!(&a.path, &client_path);
                        prop_assert!(!a.authority.bytes().any(bad_byte));
                        prop_assert_eq!(&a.authority, &t.host);
                    }
                    (_, _, Err(e)) => prop_assert!(false, "{e:?} on a pass-through"),
                }
            }
            let (name, value) = provider::credential_header(t);
            prop_assert!(name == "authorization" || name == "api-key");
            prop_assert!(!value.bytes().any(|b| b.is_ascii_control()));
        }
    }

    #[test]
    fn target_bodies_carry_the_target_model_and_overrides(
        spec in arb_config_spec(),
        body in prop_oneof![
            arb_body().prop_map(|b| b.0),
            prop::collection::vec(any::<u8>(), 0..64),
        ],
    ) {
        let (v, env) = spec.render();
        let c = config::parse(v.to_string().as_bytes(), &env).unwrap();
        let parsed = Body::parse(body.clone(), Keep::Document).ok();
        let client: Option<Map<String, Value>> = parsed.as_ref().map(|_| serde_json::from_slice(&body).unwrap());
        let op = Operation::ChatCompletions;
        for t in &c.targets {
            let out = parsed.as_ref().and_then(|b| rewrite::body_for(t, op, b));
            // The model the target's body carries: its own, or its deployment where its API
            // names it in the body (Azure's v1 API).
            let body_model = parsed
                .as_ref()
                .and_then(|b| provider::body_model(t, op, t.model.as_deref(), b.model.as_deref()));
            let same_model = parsed.as_ref().is_some_and(|b| body_model == b.model.as_deref());
            if t.override_params.is_none() && (body_model.is_none() || same_model) {
                prop_assert!(out.is_none());
                continue;
            }
            let Some(client) = &client else {
                prop_assert!(out.is_none());
                continue;
            };
            let out: Map<String, Value> = serde_json::from_slice(&out.unwrap()).unwrap();
            if let Some(m) = body_model {
                prop_assert_eq!(out.get("model"), Some(&Value::from(m)));
            }
            let overrides = t.override_params.as_ref().map(to_serde);
            for (k, want) in overrides.iter().flatten() {
                if !want.is_object() || !client.get(k).is_some_and(Value::is_object) {
                    prop_assert_eq!(out.get(k), Some(want));
                }
            }
            for (k, was) in client {
                let overridden = k == "model" && body_model.is_some()
                    || overrides.as_ref().is_some_and(|p| p.contains_key(k));
                if !overridden {
                    prop_assert_eq!(out.get(k), Some(was));
                }
            }
        }
    }
}

proptest! {
    /// The body is parsed once: a request whose plan reads it without its document (the typed
    /// fields only) never needs the document, since no target of its chain rewrites it.
    #[test]
    fn a_body_read_without_its_document_is_never_rewritten(
        spec in arb_config_spec(),
        body in arb_body().prop_map(|b| b.0),
        mask in any::<u8>(),
    ) {
        let (v, env) = spec.render();
        let c = config::parse(v.to_string().as_bytes(), &env).unwrap();
        let chain: Vec<usize> = (0..c.targets.len()).filter(|i| mask & (1 << (i % 8)) != 0).collect();
        let steps = plan::steps(&c, None, &chain);
        for op in [Operation::ChatCompletions, Operation::Embeddings, Operation::Responses] {
            prop_assert_eq!(plan::keep(&c, &steps, op, true), Keep::Document);
            if plan::keep(&c, &steps, op, false) == Keep::Typed {
                let Ok(parsed) = Body::parse(body.clone(), Keep::Typed) else { return Ok(()) };
                for &i in &chain {
                    prop_assert!(rewrite::body_for(&c.targets[i], op, &parsed).is_none());
                }
            }
        }
    }
}

// ---- the failover state machine ------------------------------------------------------------

#[derive(Debug, Clone)]
struct ChainCase {
    hops: Vec<Hop>,
    start_ms: u64,
    deadline: Duration,
    max_retry_wait: Duration,
    start_cooling: u8,
    /// Outcome, milliseconds passed since the previous decision, targets cooling (a bit each).
    events: Vec<(Outcome, u64, u8)>,
}

fn arb_outcome(max_wait_ms: u64) -> impl Strategy<Value = Outcome> {
    let kind = prop_oneof![
        (100u16..600).prop_map(FailureKind::Status),
        Just(FailureKind::Unreachable),
        Just(FailureKind::Timeout),
    ];
    let wait = proptest::option::of(prop_oneof![
        (0..=max_wait_ms).prop_map(Duration::from_millis),
        (0..=30_000u64).prop_map(Duration::from_millis),
    ]);
    prop_oneof![
        1 => Just(Outcome::Delivered),
        1 => Just(Outcome::Elsewhere),
        5 => (kind, wait).prop_map(|(kind, retry_after)| Outcome::Failed(Failure { kind, retry_after })),
    ]
}

fn arb_chain_case() -> impl Strategy<Value = ChainCase> {
    (
        Just((0..8usize).collect::<Vec<_>>()).prop_shuffle(),
        prop::collection::vec((1u32..=11, 0u64..=120_000), 1..6),
        0u64..=u64::MAX / 2,
        0u64..=200_000,
        0u64..=10_000,
        any::<u8>(),
        prop::collection::vec((arb_outcome(DAY_MS), 0u64..=30_000, any::<u8>()), 1..40),
    )
        .prop_map(
            |(ids, hops, start_ms, deadline_ms, wait_ms, start_cooling, events)| ChainCase {
                hops: hops
                    .iter()
                    .zip(ids)
                    .map(|(&(max_tries, timeout_ms), target)| Hop {
                        target,
                        max_tries,
                        timeout: Duration::from_millis(timeout_ms),
                    })
                    .collect(),
                start_ms,
                deadline: Duration::from_millis(deadline_ms),
                max_retry_wait: Duration::from_millis(wait_ms),
                start_cooling,
                events,
            },
        )
}

fn cooling_in(mask: u8) -> impl Fn(usize) -> bool {
    move |t| t < 8 && mask & (1 << t) != 0
}

/// Runs a chain over `case`'s events (cycled), checking every step; returns the steps taken.
fn run_chain(case: &ChainCase) -> Result<Vec<Next>, TestCaseError> {
    let hops = &case.hops;
    let sum_tries: u32 = hops.iter().map(|h| h.max_tries).sum();
    let deadline_ms = case
        .start_ms
        .saturating_add(u64::try_from(case.deadline.as_millis()).unwrap_or(u64::MAX));
    let remaining = |now: u64| Duration::from_millis(deadline_ms.saturating_sub(now));
    let cooling = cooling_in(case.start_cooling);
    let (mut chain, first) = Chain::start(
        hops.clone(),
        case.start_ms,
        case.deadline,
        case.max_retry_wait,
        &cooling,
    )
    .unwrap();
    let mut pos = hops
        .iter()
        .position(|h| !cooling(h.target))
        .unwrap_or_default();
    prop_assert_eq!(first.target, hops[pos].target);
    let want_skipped: Vec<usize> = if hops.iter().all(|h| cooling(h.target)) {
        vec![]
    } else {
        hops[..pos].iter().map(|h| h.target).collect()
    };
    prop_assert_eq!(&first.skipped, &want_skipped);
    prop_assert_eq!(
        first.timeout,
        hops[pos].timeout.min(remaining(case.start_ms))
    );
    let mut tries = vec![0u32; hops.len()];
    let mut moved_after_failure = false;
    tries[pos] = 1;
    let mut now = case.start_ms;
    let mut steps = Vec::new();
    for (outcome, advance, mask) in case.events.iter().cycle() {
        prop_assert!(
            steps.len() < sum_tries as usize,
            "no end after {} steps",
            steps.len()
        );
        now = now.saturating_add(*advance);
        let cooling = cooling_in(*mask);
        let left = remaining(now);
        let hop = hops[pos].clone();
        let (step, no_retry) = chain.next(outcome, now, &cooling);
        steps.push(step.clone());
        let failure = match outcome {
            Outcome::Delivered => {
                prop_assert_eq!(step, Next::Deliver);
                break;
            }
            Outcome::Failed(f) => Some(f),
            // "Not here": never retried on the same target.
            Outcome::Elsewhere => None,
        };
        let delay = failure
            .and_then(|f| f.retry_after)
            .unwrap_or(Duration::ZERO);
        let tries_left = failure.is_some() && tries[pos] < hop.max_tries;
        let wait_fits = delay <= case.max_retry_wait;
        let later_ready = hops[pos + 1..].iter().any(|h| !cooling(h.target));
        let over_budget = delay.checked_add(MIN_ATTEMPT).is_none_or(|d| d > left);
        // A retry the policy allows unless its wait does not fit what is left of the deadline.
        let retry_allowed = left >= MIN_ATTEMPT && tries_left;
        let want_no_retry = match (retry_allowed, wait_fits, over_budget) {
            (true, false, _) => Some(NoRetry::RetryAfterTooLong),
            (true, true, true) => Some(NoRetry::RetryAfterOverBudget),
            _ => None,
        };
        prop_assert_eq!(no_retry, want_no_retry);
        match &step {
            Next::Deliver => prop_assert!(false, "delivered a failure"),
            Next::Retry {
                target,
                delay: d,
                timeout,
            } => {
                prop_assert_eq!(*target, hop.target);
                prop_assert!(tries_left, "retry beyond max_tries");
                prop_assert_eq!(*d, delay);
                prop_assert!(*d <= case.max_retry_wait);
                prop_assert!(*timeout <= hop.timeout);
                prop_assert!(*d + *timeout <= left, "retry past the deadline");
                prop_assert!(*timeout >= MIN_ATTEMPT.min(hop.timeout));
                tries[pos] += 1;
            }
            Next::Failover {
                from,
                to,
                timeout,
                skipped,
            } => {
                prop_assert_eq!(*from, hop.target);
                prop_assert!(
                    !tries_left || want_no_retry.is_some(),
                    "failed over with a retry left"
                );
                let next = pos
                    + 1
                    + hops[pos + 1..]
                        .iter()
                        .position(|h| h.target == *to)
                        .unwrap();
                prop_assert!(!cooling(*to));
                let passed: Vec<usize> = hops[pos + 1..next].iter().map(|h| h.target).collect();
                prop_assert_eq!(skipped, &passed);
                prop_assert!(skipped.iter().all(|t| cooling(*t)));
                prop_assert!(*timeout <= hops[next].timeout && *timeout <= left);
                pos = next;
                tries[pos] += 1;
                // Moving on after a "not found" (an owner probe) is not a failover.
                moved_after_failure |= failure.is_some();
            }
            Next::GiveUp(GiveUpReason::BudgetSpent) => {
                let over = want_no_retry == Some(NoRetry::RetryAfterOverBudget);
                prop_assert!(left < MIN_ATTEMPT || (over && !later_ready));
                break;
            }
            Next::GiveUp(GiveUpReason::Exhausted) => {
                prop_assert!(left >= MIN_ATTEMPT);
                prop_assert!(!tries_left || !wait_fits);
                prop_assert!(!later_ready, "gave up with a ready target left");
                break;
            }
        }
        prop_assert_eq!(chain.attempts(), tries.iter().sum::<u32>());
        prop_assert!(chain.attempts() <= sum_tries);
        prop_assert_eq!(chain.current_target(), Some(hops[pos].target));
        prop_assert_eq!(chain.failed_over(), moved_after_failure);
        prop_assert_eq!(
            chain.has_more(),
            tries[pos] < hops[pos].max_tries || pos + 1 < hops.len()
        );
    }
    prop_assert!(chain.attempts() <= sum_tries);
    prop_assert!(steps.len() <= sum_tries as usize);
    Ok(steps)
}

fn arb_extreme_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::MAX),
        Just(Duration::ZERO),
        Just(Duration::from_millis(u64::MAX)),
        Just(Duration::from_secs(u64::MAX / 1000 + 1)),
        any::<u64>().prop_map(Duration::from_millis),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (0u64..=DAY_MS).prop_map(Duration::from_millis),
    ]
}

proptest! {
    #[test]
    fn chains_keep_their_invariants(case in arb_chain_case()) {
        run_chain(&case)?;
    }

    #[test]
    fn chains_survive_extreme_times_and_waits(
        mut case in arb_chain_case(),
        start in prop_oneof![Just(u64::MAX), Just(0u64), any::<u64>()],
        deadline in arb_extreme_duration(),
        max_retry_wait in arb_extreme_duration(),
        waits in prop::collection::vec(proptest::option::of(arb_extreme_duration()), 1..8),
        timeouts in prop::collection::vec(arb_extreme_duration(), 1..6),
    ) {
        case.start_ms = start;
        case.deadline = deadline;
        case.max_retry_wait = max_retry_wait;
        for (h, t) in case.hops.iter_mut().zip(timeouts) {
            h.timeout = t;
        }
        for ((outcome, _, _), w) in case.events.iter_mut().zip(waits.iter().cycle()) {
            if let Outcome::Failed(f) = outcome {
                f.retry_after = *w;
            }
        }
        run_chain(&case)?;
    }
}

// ---- cache keys and entries ----------------------------------------------------------------

/// Writes `v` as JSON with its object keys in an order chosen by `seed`, white space between
/// tokens, and (by `seed`) string characters as `\u` escapes.
fn write_scrambled(v: &Value, seed: &mut u64, out: &mut String) {
    fn next(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        *seed >> 33
    }
    fn ws(seed: &mut u64, out: &mut String) {
        for _ in 0..next(seed) % 3 {
            out.push([' ', '\n', '\t', '\r'][(next(seed) % 4) as usize]);
        }
    }
    fn string(s: &str, seed: &mut u64, out: &mut String) {
        if next(seed).is_multiple_of(2) {
            out.push_str(&serde_json::to_string(s).unwrap());
            return;
        }
        out.push('"');
        for c in s.chars() {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04X}"));
            }
        }
        out.push('"');
    }
    ws(seed, out);
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            for i in (1..entries.len()).rev() {
                entries.swap(i, (next(seed) % (i as u64 + 1)) as usize);
            }
            out.push('{');
            for (i, (k, child)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                ws(seed, out);
                string(k, seed, out);
                ws(seed, out);
                out.push(':');
                write_scrambled(child, seed, out);
            }
            ws(seed, out);
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, child) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_scrambled(child, seed, out);
            }
            ws(seed, out);
            out.push(']');
        }
        Value::String(s) => string(s, seed, out),
        other => out.push_str(&other.to_string()),
    }
    ws(seed, out);
}

fn arb_op() -> impl Strategy<Value = Operation> {
    prop::sample::select(vec![
        Operation::ChatCompletions,
        Operation::Completions,
        Operation::Embeddings,
    ])
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    (
        any::<[u8; 32]>(),
        any::<u64>(),
        any::<String>(),
        prop_oneof![any::<String>(), Just("application/json".to_string())],
        prop::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(digest, expires_ms, target, content_type, body)| Entry {
            digest,
            expires_ms,
            target,
            content_type,
            body,
        })
}

proptest! {
    #[test]
    fn cache_key_ignores_key_order_spacing_and_escapes(
        v in arb_exact_json(),
        seed in any::<u64>(),
        name in "[A-Za-z0-9_-]{0,64}",
        op in arb_op(),
    ) {
        // A request body is an object: the value goes in one of its members.
        let v = json!({"input": v});
        let mut seed = seed;
        let mut scrambled = String::new();
        write_scrambled(&v, &mut seed, &mut scrambled);
        prop_assert_eq!(serde_json::from_str::<Value>(&scrambled).unwrap(), v.clone());
        let plain = cache_key(&name, op, v.to_string().as_bytes());
        prop_assert!(plain.is_some());
        prop_assert_eq!(plain, cache_key(&name, op, scrambled.as_bytes()));
    }

    #[test]
    fn cache_key_changes_with_content_key_name_and_operation(
        a in arb_exact_json(),
        b in arb_exact_json(),
        names in ("[A-Za-z0-9_-]{0,8}", "[A-Za-z0-9_-]{0,8}"),
        ops in (arb_op(), arb_op()),
    ) {
        let (a, b) = (json!({"input": a}), json!({"input": b}));
        let ka = cache_key(&names.0, ops.0, a.to_string().as_bytes()).unwrap();
        let kb = cache_key(&names.1, ops.1, b.to_string().as_bytes()).unwrap();
        prop_assert_eq!(ka == kb, a == b && names.0 == names.1 && ops.0 == ops.1);
    }

    #[test]
    fn cache_key_never_panics(body in prop::collection::vec(any::<u8>(), 0..256), name in any::<String>(), op in arb_op()) {
        let k = cache_key(&name, op, &body);
        prop_assert_eq!(k.is_some(), Body::parse(body.clone(), Keep::Typed).is_ok());
    }

    #[test]
    fn entries_round_trip(e in arb_entry(), now in any::<u64>(), max_entries in any::<u32>()) {
        let bytes = e.encode();
        prop_assert_eq!(Entry::decode(&bytes), Some(e.clone()));
        prop_assert_eq!(Entry::expiry(&bytes), Some(e.expires_ms));
        let fresh = cache::lookup(&bytes, &e.digest, now);
        prop_assert_eq!(fresh.is_some(), e.expires_ms > now);
        let slot = cache::slot(&e.digest, max_entries);
        prop_assert!(slot < max_entries.max(1));
        prop_assert!(cache::slot_key(slot).starts_with(cache::SLOT_PREFIX));
    }

    #[test]
    fn entry_decode_never_panics_and_reads_only_what_encode_writes(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..128),
            (arb_entry(), any::<Index>(), any::<u8>()).prop_map(|(e, at, byte)| {
                let mut b = e.encode();
                let i = at.index(b.len());
                b[i] = byte;
                b
            }),
            (arb_entry(), any::<Index>()).prop_map(|(e, at)| {
                let b = e.encode();
                let n = at.index(b.len() + 1);
                b[..n].to_vec()
            }),
        ],
    ) {
        match Entry::decode(&bytes) {
            Some(e) => {
                prop_assert_eq!(e.encode(), bytes.clone());
                prop_assert_eq!(Entry::expiry(&bytes), Some(e.expires_ms));
            }
            None => prop_assert!(cache::lookup(&bytes, &[0; 32], 0).is_none()),
        }
    }
}

// ---- Retry-After ---------------------------------------------------------------------------

const RETRY_AFTER_MAX: Duration = Duration::from_secs(24 * 3600);

fn arb_header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "retry-after",
            "Retry-After",
            "RETRY-AFTER",
            "retry-after-ms",
            "x-ms-retry-after-ms",
            "X-Ms-Retry-After-Ms",
            "content-type",
        ])
        .prop_map(str::to_string),
        any::<String>(),
    ]
}

fn arb_header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        "[0-9. ]{0,25}".prop_map(String::into_bytes),
        any::<u64>().prop_map(|n| n.to_string().into_bytes()),
        (any::<u32>(), any::<u32>()).prop_map(|(a, b)| format!("{a}.{b}").into_bytes()),
        arb_http_date().prop_map(|(s, _)| s.into_bytes()),
        "[A-Za-z]{3}, [0-9]{1,3} [A-Za-z]{3} [0-9]{1,5} [0-9]{1,3}:[0-9]{1,3}:[0-9]{1,3} [A-Z]{3}"
            .prop_map(String::into_bytes),
    ]
}

/// An IMF-fixdate and its Unix time, computed independently of the module.
fn arb_http_date() -> impl Strategy<Value = (String, u64)> {
    (
        1970u64..=9999,
        1u64..=12,
        1u64..=28,
        0u64..24,
        0u64..60,
        0u64..=60,
    )
        .prop_map(|(y, mo, d, h, mi, s)| {
            let leap =
                |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
            let mut days: u64 = (1970..y).map(|y| if leap(y) { 366 } else { 365 }).sum();
            let month_days = [
                31,
                if leap(y) { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            days += month_days[..(mo - 1) as usize].iter().sum::<u64>() + d - 1;
            let unix = days * 86_400 + h * 3600 + mi * 60 + s;
            let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
            let month = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ][(mo - 1) as usize];
            (
                format!("{weekday}, {d:02} {month} {y} {h:02}:{mi:02}:{s:02} GMT"),
                unix,
            )
        })
}

fn parse_headers(headers: &[(String, Vec<u8>)], now: u64) -> Option<Duration> {
    retry_after::parse(headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())), now)
}

proptest! {
    #[test]
    fn retry_after_never_panics_and_stays_bounded(
        headers in prop::collection::vec((arb_header_name(), arb_header_value()), 0..6),
        now in any::<u64>(),
    ) {
        if let Some(d) = parse_headers(&headers, now) {
            prop_assert!(d <= RETRY_AFTER_MAX);
        }
    }

    #[test]
    fn retry_after_reads_seconds_milliseconds_and_dates(
        secs in any::<u32>(),
        ms in any::<u32>(),
        (date, at) in arb_http_date(),
        now in 0u64..=300_000_000_000,
    ) {
        let h = |n: &str, v: String| vec![(n.to_string(), v.into_bytes())];
        prop_assert_eq!(
            parse_headers(&h("retry-after", secs.to_string()), now),
            Some(Duration::from_secs(u64::from(secs)).min(RETRY_AFTER_MAX))
        );
        prop_assert_eq!(
            parse_headers(&h("retry-after-ms", ms.to_string()), now),
            Some(Duration::from_millis(u64::from(ms)).min(RETRY_AFTER_MAX))
        );
        prop_assert_eq!(
            parse_headers(&h("Retry-After", date), now),
            Some(Duration::from_secs(at.saturating_sub(now)).min(RETRY_AFTER_MAX))
        );
        let both = vec![
            ("retry-after".to_string(), secs.to_string().into_bytes()),
            ("x-ms-retry-after-ms".to_string(), ms.to_string().into_bytes()),
        ];
        prop_assert_eq!(
            parse_headers(&both, now),
            Some(Duration::from_millis(u64::from(ms)).min(RETRY_AFTER_MAX))
        );
    }
}

// ---- cooldowns -----------------------------------------------------------------------------

fn arb_policy() -> impl Strategy<Value = Cooldown> {
    (
        0u16..=10_000,
        1u32..20,
        1_000u64..60_000,
        0u32..5,
        0u32..5,
        0..=DAY_MS,
        0..=DAY_MS,
    )
        .prop_map(|(rate, min, window, transport, any, d, extra)| Cooldown {
            failure_rate: Rate::from_per_10000(rate),
            min_attempts: min,
            window: Duration::from_millis(window),
            after_transport_failures: transport,
            after_failures: any,
            duration: Duration::from_millis(d),
            max_duration: Duration::from_millis((d + extra).min(DAY_MS)),
        })
}

fn arb_ending(waits: BoxedStrategy<Duration>) -> impl Strategy<Value = Ending> {
    prop_oneof![
        3 => Just(Ending::Answered),
        2 => Just(Ending::Status { wait: None }),
        1 => proptest::option::of(waits).prop_map(|wait| Ending::Status { wait }),
        1 => Just(Ending::Transport),
    ]
}

/// Attempts reported one after another: (ending, ms since the last report, how long the attempt
/// took, pinned, whether it claimed the probe first).
fn arb_reports(
    waits: BoxedStrategy<Duration>,
) -> impl Strategy<Value = Vec<(Ending, u64, u64, bool, bool)>> {
    prop::collection::vec(
        (
            arb_ending(waits),
            0u64..20_000,
            0u64..40_000,
            prop::bool::weighted(0.1),
            any::<bool>(),
        ),
        0..60,
    )
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs `reports` from a closed breaker and checks every transition against the rules of
/// docs/failure-semantics.md (section 5), and the window's counts against a plain list of the
/// attempts counted.
fn run_breaker(
    policy: &Cooldown,
    now0: u64,
    reports: &[(Ending, u64, u64, bool, bool)],
) -> Result<(), TestCaseError> {
    let mut s = State::default();
    let mut now = now0;
    // (time, failed) of every attempt counted since the breaker last closed or cooled.
    let mut counted: Vec<(u64, bool)> = Vec::new();
    let bucket = (ms(policy.window) / cooldown::BUCKETS as u64).max(1);
    for &(ending, advance, took, pinned, claim) in reports {
        now = now.saturating_add(advance);
        if claim {
            if let Some(next) = cooldown::claim_probe(s, now, now.saturating_add(60_000)) {
                prop_assert_eq!(s.phase(now), Phase::AwaitingProbe);
                prop_assert_eq!(next.phase(now), Phase::Probing);
                s = next;
            }
        }
        let started = now.saturating_sub(took);
        let attempt = Attempt {
            started_ms: started,
            pinned,
        };
        let before = s;
        let (next, change) = cooldown::after_attempt(s, policy, attempt, ending, now);
        prop_assert_eq!(change == Change::None, next == before);
        match change {
            Change::None | Change::Counted => {
                prop_assert_eq!(
                    next.until_ms,
                    before.until_ms,
                    "only a trip or a probe moves it"
                );
            }
            Change::Cooled(d, trip) => {
                let expected = match (trip, ending) {
                    (Trip::RetryAfter, Ending::Status { wait: Some(w) }) => {
                        w.min(policy.max_duration)
                    }
                    (Trip::RetryAfter, _) => return Err(TestCaseError::fail("a wait with no 429")),
                    _ => policy.duration,
                };
                prop_assert_eq!(d, expected);
                prop_assert!(ending != Ending::Answered);
                prop_assert!(
                    !pinned || before.until_ms == 0,
                    "a pinned follow-up moved a cooldown"
                );
                prop_assert_eq!(next.until_ms, now.saturating_add(ms(d)).max(1));
                prop_assert_eq!(next.since_ms, now);
                prop_assert_eq!(next.window_counts(policy.window, now), (0, 0));
            }
            Change::Recovered => {
                prop_assert_eq!(ending, Ending::Answered);
                prop_assert!(!pinned);
                prop_assert_eq!(next.phase(now), Phase::Closed);
            }
        }
        if before.until_ms != 0 {
            // Open: only the probe (sent after the cooldown ended, not pinned) speaks.
            let probe = before.until_ms <= now && started >= before.until_ms && !pinned;
            if !probe {
                prop_assert_eq!(change, Change::None);
            }
            if before.phase(now) == Phase::Cooling {
                prop_assert_eq!(next, before, "a cooldown in progress moved");
            }
            if !matches!(change, Change::None) {
                counted.clear();
            }
        } else if started < before.since_ms {
            prop_assert_eq!(
                change,
                Change::None,
                "an attempt in flight when it cooled counted"
            );
        } else {
            if policy.failure_rate.per_10000() > 0 {
                counted.push((now, ending != Ending::Answered));
            }
            let current = now / bucket;
            let in_window: Vec<bool> = counted
                .iter()
                .filter(|(t, _)| current - t / bucket < cooldown::BUCKETS as u64)
                .map(|&(_, f)| f)
                .collect();
            let attempts = in_window.len() as u32;
            let failures = in_window.iter().filter(|f| **f).count() as u32;
            match change {
                Change::Cooled(
                    _,
                    Trip::FailureRate {
                        failures: f,
                        attempts: a,
                    },
                ) => {
                    prop_assert_eq!((a, f), (attempts, failures));
                    prop_assert!(a >= policy.min_attempts && policy.failure_rate.reached(f, a));
                }
                Change::Cooled(..) => {}
                _ => {
                    prop_assert_eq!(next.window_counts(policy.window, now), (attempts, failures));
                    if ending != Ending::Answered && attempts >= policy.min_attempts {
                        prop_assert!(
                            !policy.failure_rate.reached(failures, attempts),
                            "did not trip"
                        );
                    }
                }
            }
            if matches!(change, Change::Cooled(..)) {
                counted.clear();
            }
        }
        prop_assert_eq!(State::decode(&next.encode()), next);
        s = next;
    }
    Ok(())
}

proptest! {
    #[test]
    fn cooldown_state_decodes_anything(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let s = State::decode(&bytes);
        if bytes.len() == State::default().encode().len() {
            prop_assert_eq!(&s.encode()[..], &bytes[..]);
        } else {
            prop_assert_eq!(s, State::default());
        }
    }

    #[test]
    fn the_breaker_follows_its_rules(
        policy in arb_policy(),
        now in 0u64..=4_000_000_000_000,
        reports in arb_reports((0..=2 * DAY_MS).prop_map(Duration::from_millis).boxed()),
    ) {
        run_breaker(&policy, now, &reports)?;
    }

    #[test]
    fn the_breaker_survives_extreme_durations(
        policy in arb_policy(),
        duration in arb_extreme_duration(),
        max_duration in arb_extreme_duration(),
        now in any::<u64>(),
        reports in arb_reports(arb_extreme_duration().boxed()),
    ) {
        let policy = Cooldown { duration, max_duration, ..policy };
        run_breaker(&policy, now, &reports)?;
    }
}

// ---- usage, gateway keys, replies ----------------------------------------------------------

proptest! {
    #[test]
    fn usage_scanning_never_panics(chunks in prop::collection::vec(
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            "(\"usage\"|[{}:, 0-9\"a-z_])*".prop_map(String::into_bytes),
        ],
        0..20,
    )) {
        let mut s = UsageScanner::default();
        let mut whole = Vec::new();
        for c in &chunks {
            s.push(c);
            whole.extend_from_slice(c);
        }
        let _ = s.finish();
        let _ = usage::from_body(&whole);
    }

    #[test]
    fn usage_of_the_final_stream_chunk_is_found_however_the_stream_is_cut(
        noise in prop::collection::vec(any::<u8>(), 0..6000),
        prompt in any::<u64>(),
        completion in any::<u64>(),
        cuts in prop::collection::vec(any::<Index>(), 0..10),
    ) {
        let mut stream = noise;
        stream.extend_from_slice(
            format!(
                "\n\ndata: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion}}}}}\n\ndata: [DONE]\n\n"
            )
            .as_bytes(),
        );
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        at.push(0);
        at.push(stream.len());
        at.sort_unstable();
        let mut s = UsageScanner::default();
        for w in at.windows(2) {
            s.push(&stream[w[0]..w[1]]);
        }
        let want = Some(Usage { prompt, completion });
        prop_assert_eq!(s.finish(), want);
        prop_assert_eq!(usage::from_body(&stream), want);
    }

    #[test]
    fn the_presented_key_is_the_bearer_token_else_the_api_key(
        authorization in proptest::option::of(prop_oneof![
            prop::collection::vec(any::<u8>(), 0..20),
            "(Bearer|bearer|BEARER|Basic|Bear|) ?[ -~]{0,12}".prop_map(String::into_bytes),
        ]),
        api_key in proptest::option::of(prop_oneof![
            prop::collection::vec(any::<u8>(), 0..20),
            "[ -~]{0,12}".prop_map(String::into_bytes),
        ]),
    ) {
        let trim = |t: &[u8]| -> Vec<u8> {
            let start = t.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(t.len());
            let end = t.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
            t[start..end].to_vec()
        };
        let bearer = authorization.as_deref().and_then(|a| {
            let a = trim(a);
            let is_bearer = a.len() >= 7 && a[..7].eq_ignore_ascii_case(b"bearer ");
            is_bearer.then(|| trim(&a[7..])).filter(|k| !k.is_empty())
        });
        let want = bearer.or_else(|| api_key.as_deref().map(trim).filter(|k| !k.is_empty()));
        let got = auth::presented_key(authorization.as_deref(), api_key.as_deref());
        prop_assert_eq!(got.map(<[u8]>::to_vec), want);
    }

    #[test]
    fn any_path_is_azure_shaped_or_not_without_panicking(
        method in prop::sample::select(vec!["POST", "GET", "DELETE", "PUT"]),
        tail in "[a-z0-9/._%?&=-]{0,40}",
        version in proptest::option::of("[0-9a-z-]{0,20}"),
        prefix in prop::sample::select(vec!["/openai/deployments/", "/openai/v1/", "/openai/", "/v1/"]),
    ) {
        let mut path = format!("{prefix}{tail}");
        if let Some(v) = version {
            path.push_str(if path.contains('?') { "&api-version=" } else { "?api-version=" });
            path.push_str(&v);
        }
        if let Some(Ok(shaped)) = azure::recognise(method, &path) {
            // The twin is an OpenAI path without the client's api-version.
            prop_assert!(shaped.twin_path.starts_with("/v1/"), "{}", shaped.twin_path);
            prop_assert!(!shaped.twin_path.contains("api-version"), "{}", shaped.twin_path);
        }
    }

    #[test]
    fn local_replies_are_openai_or_azure_json_whatever_the_text(
        reason in any::<String>(),
        model in proptest::option::of(any::<String>()),
        target in any::<String>(),
        timeout in any::<bool>(),
        limit in any::<usize>(),
    ) {
        for r in [
            Rejection::InvalidBody { reason: reason.clone() },
            Rejection::NoTarget { model: model.clone() },
            Rejection::UpstreamUnavailable { target: target.clone(), timeout },
            Rejection::BodyTooLarge { limit },
            Rejection::Unauthorized,
            Rejection::DeadlineExceeded,
            Rejection::ApiVersion(BadVersion::Unsupported(reason.clone())),
        ] {
            for shape in [ErrorShape::OpenAi, ErrorShape::Azure] {
                let reply = r.reply(shape);
                let v: Value = serde_json::from_slice(&reply.body).unwrap();
                let message = r.message();
                prop_assert_eq!(v["error"]["message"].as_str(), Some(message.as_str()));
                prop_assert_eq!(v["error"]["code"].as_str(), Some(r.code()));
                match shape {
                    ErrorShape::OpenAi => prop_assert!(v["error"]["param"].is_null()),
                    ErrorShape::Azure => prop_assert_eq!(v["error"].as_object().map(|o| o.len()), Some(2)),
                }
                prop_assert_eq!(reply.status, r.status());
            }
        }
    }
}

// ---- Responses API owners ------------------------------------------------------------------

proptest! {
    #[test]
    fn an_owner_set_read_from_any_bytes_is_bounded_and_re_encodes_to_itself(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..600),
            prop::collection::vec(any::<u8>(), 0..600).prop_map(|mut b| { b.insert(0, 0xA2); b }),
        ],
    ) {
        let set = affinity::Set::decode(&bytes);
        prop_assert_eq!(affinity::Set::decode(&set.encode()), set);
    }

    #[test]
    fn a_stored_owner_is_found_until_it_expires_whatever_else_the_set_holds(
        others in prop::collection::vec((any::<u64>(), "[a-z0-9_-]{1,12}", 0u64..20_000), 0..40),
        fingerprint in any::<u64>(),
        target in "[a-z0-9_-]{1,300}",
        ttl in 1u64..10_000,
        now in 0u64..10_000,
    ) {
        let mut set = affinity::Set::default();
        for (fp, t, expires) in &others {
            set.put(*fp, t, *expires, now);
        }
        set.put(fingerprint, &target, now + ttl, now);
        let set = affinity::Set::decode(&set.encode());
        let stored = target.len() <= 255;
        prop_assert_eq!(set.owner(fingerprint, now).is_some(), stored);
        if stored {
            prop_assert_eq!(set.owner(fingerprint, now), Some(target.as_str()));
        }
        prop_assert_eq!(set.owner(fingerprint, now + ttl), None);
        prop_assert!(affinity::Set::decode(&set.encode()).encode().len() <= 1 + affinity::WAYS * (17 + 255));
    }

    #[test]
    fn judging_a_not_found_never_panics(status in proptest::option::of(any::<u16>()),
                                        body in prop::collection::vec(any::<u8>(), 0..300)) {
        for naming in [affinity::Naming::FollowUp, affinity::Naming::Path] {
            let found = affinity::not_here(naming, status, &body);
            prop_assert!(!found || affinity::may_be_not_here(naming, status));
        }
    }
}
