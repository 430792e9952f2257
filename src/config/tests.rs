//! The configuration's behaviour as an operator sees it: defaults, and each kind of mistake
//! refused with its field and problem.

use super::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

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
            "targets[0].cluster",
            Box::new(|v| v["targets"][0]["cluster"] = json!("openai,azure")),
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
            "targets[0].colour",
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
            // 64 characters, but "+f" is not two hex digits (a sign once slipped through)
            "keys[0].key_sha256",
            Box::new(|v| {
                let digest = format!("+f{}", "a".repeat(62));
                v["keys"] = json!([{"name": "app", "key_sha256": digest}]);
            }),
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
        ("unknown_top", Box::new(|v| v["unknown_top"] = json!(1))),
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
        KeyMatch::Sha256(crate::request::auth::sha256(b"gw-secret"))
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
    // The breaker's defaults: half of at least 10 attempts in 10 s, or 3 transport failures in
    // a row.
    assert_eq!(cd.failure_rate.per_10000(), 5_000);
    assert_eq!((cd.min_attempts, cd.window), (10, Duration::from_secs(10)));
    assert_eq!(cd.after_transport_failures, 3);
    let default = c.targets[0].cooldown.clone();
    assert!(default.is_none());
    v["targets"][0]["cooldown"] = json!({"failure_rate": 0.25, "min_attempts": 4, "window": "30s",
                                         "after_transport_failures": 0});
    let c = parse_value(&v).unwrap();
    let cd = c.targets[0].cooldown.as_ref().unwrap();
    assert_eq!(cd.failure_rate.per_10000(), 2_500);
    assert_eq!((cd.min_attempts, cd.window), (4, Duration::from_secs(30)));
    assert_eq!((cd.after_transport_failures, cd.after_failures), (0, 0));
    v["targets"][0]["cooldown"] = json!({"enabled": false, "failure_rate": 7});
    assert!(parse_value(&v).unwrap().targets[0].cooldown.is_none());
    v["cache"] = json!({"enabled": false});
    assert!(parse_value(&v).unwrap().cache.is_none());
}

#[test]
fn not_json_is_refused() {
    let e = parse(b"{not json", &env()).unwrap_err();
    assert_eq!(e.field, "configuration");
}

/// Each kind of mistake, with the whole line the operator reads.
#[test]
fn every_kind_of_mistake_is_refused_naming_field_and_problem() {
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "deployment_models[\"a/b\"]: deployment names are letters, digits, '-', '_' or '.'",
            Box::new(|v| v["deployment_models"] = json!({"a/b": "gpt-4o"})),
        ),
        (
            "deployment_models[\"team-a\"]: must be a model name (1-256 characters)",
            Box::new(|v| v["deployment_models"] = json!({"team-a": ""})),
        ),
        (
            "deployment_models[\"team-a\"]: expected a string, got 4",
            Box::new(|v| v["deployment_models"] = json!({"team-a": 4})),
        ),
        (
            "targets[1].api_version: missing (required for provider \"azure\")",
            Box::new(|v| {
                v["targets"][1].as_object_mut().unwrap().remove("api_version");
            }),
        ),
        (
            "targets[0].retries: expected an integer, got \"two\"",
            Box::new(|v| v["targets"][0]["retries"] = json!("two")),
        ),
        (
            "targets[0].retries: expected an integer up to 4294967295, got 5000000000",
            Box::new(|v| v["targets"][0]["retries"] = json!(5_000_000_000u64)),
        ),
        (
            "targets[0].retries: expected a non-negative integer, got -1",
            Box::new(|v| v["targets"][0]["retries"] = json!(-1)),
        ),
        (
            "targets[0].retries: expected an integer, got 1.5",
            Box::new(|v| v["targets"][0]["retries"] = json!(1.5)),
        ),
        (
            "targets[0].retries: at most 10 (use more targets instead)",
            Box::new(|v| v["targets"][0]["retries"] = json!(11)),
        ),
        (
            "targets[1].colldown: unknown field (expected one of `name`, `provider`, ...",
            Box::new(|v| v["targets"][1]["colldown"] = json!(false)),
        ),
        (
            "targets[0][\"Api-Key\"]: unknown field (expected one of `name`, `provider`, ...",
            Box::new(|v| v["targets"][0]["Api-Key"] = json!("k")),
        ),
        (
            "targets[0].provider: expected \"openai\" or \"azure\", got \"anthropic\"",
            Box::new(|v| v["targets"][0]["provider"] = json!("anthropic")),
        ),
        (
            "targets[0].timeout: expected a duration such as \"500ms\", \"10s\" or \"2m\", got \"10 parsecs\"",
            Box::new(|v| v["targets"][0]["timeout"] = json!("10 parsecs")),
        ),
        (
            "targets[0].timeout: expected a duration such as \"500ms\", \"10s\" or \"2m\", got 10",
            Box::new(|v| v["targets"][0]["timeout"] = json!(10)),
        ),
        (
            "targets[0].timeout: expected a duration such as \"500ms\", \"10s\" or \"2m\", got \"2d\"",
            Box::new(|v| v["targets"][0]["timeout"] = json!("2d")),
        ),
        (
            "targets[0]: expected an object, got an array",
            Box::new(|v| v["targets"][0] = json!(["openai"])),
        ),
        (
            "targets: expected an array, got an object",
            Box::new(|v| v["targets"] = json!({})),
        ),
        (
            "targets[1].deployments[\"gpt-4\"]: expected a string, got 4",
            Box::new(|v| v["targets"][1]["deployments"]["gpt-4"] = json!(4)),
        ),
        (
            "targets[1].deployments[\"gpt-4\"]: deployment names are letters, digits, '-', '_' or '.'",
            Box::new(|v| v["targets"][1]["deployments"]["gpt-4"] = json!("has space")),
        ),
        (
            "targets[0].cooldown: expected a boolean or an object, got \"off\"",
            Box::new(|v| v["targets"][0]["cooldown"] = json!("off")),
        ),
        (
            "targets[0].cooldown.after_failure: unknown field (expected one of `enabled`, `failure_rate`, `min_attempts`, `window`, `after_transport_failures`, `after_failures`, `duration`, `max_duration`)",
            Box::new(|v| v["targets"][0]["cooldown"] = json!({"after_failure": 2})),
        ),
        (
            "targets[0].cooldown.failure_rate: must be a number from 0 to 1 (0.5: half of the attempts; 0: off)",
            Box::new(|v| v["targets"][0]["cooldown"] = json!({"failure_rate": 50})),
        ),
        (
            "targets[1].cooldown.failure_rate: expected a number, got \"50%\"",
            Box::new(|v| v["targets"][1]["cooldown"] = json!({"failure_rate": "50%"})),
        ),
        (
            "targets[0].cooldown.min_attempts: must be at least 1 (to turn the rate off, set failure_rate to 0)",
            Box::new(|v| v["targets"][0]["cooldown"] = json!({"min_attempts": 0})),
        ),
        (
            "targets[0].cooldown.window: must be from \"1s\" to \"1h\"",
            Box::new(|v| v["targets"][0]["cooldown"] = json!({"window": "500ms"})),
        ),
        (
            "targets[0].cooldown.window: must be from \"1s\" to \"1h\"",
            Box::new(|v| v["targets"][0]["cooldown"] = json!({"window": "2h"})),
        ),
        (
            "strategy.mode: expected \"fallback\" or \"loadbalance\", got \"roundrobin\"",
            Box::new(|v| v["strategy"] = json!({"mode": "roundrobin"})),
        ),
        (
            "strategy.on_status_codes[1]: expected an integer up to 65535, got 70000",
            Box::new(|v| v["strategy"] = json!({"on_status_codes": [429, 70000]})),
        ),
        (
            "strategy.on_status_codes[1]: 200 is not a failure status (expected 100-199 or 300-599)",
            Box::new(|v| v["strategy"] = json!({"on_status_codes": [429, 200]})),
        ),
        (
            "keys[0].targets[0]: no target named \"nope\"",
            Box::new(|v| {
                v["keys"] = json!([{"name": "app", "key_env": "GW_KEY", "targets": ["nope"]}])
            }),
        ),
        (
            "cache.max_entries: must be between 1 and 1000000",
            Box::new(|v| v["cache"] = json!({"enabled": true, "max_entries": 0})),
        ),
        (
            "max_request_body_bytes: must be between 1 and 67108864",
            Box::new(|v| v["max_request_body_bytes"] = json!(0)),
        ),
        (
            "targets: missing",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("targets");
            }),
        ),
    ];
    for (want, mutate) in cases {
        let mut v = base();
        mutate(&mut v);
        match parse_value(&v) {
            Ok(_) => panic!("accepted: {v}"),
            // "..." ends a message whose list of fields grows with the schema.
            Err(e) => match want.strip_suffix("...") {
                Some(prefix) => assert!(e.to_string().starts_with(prefix), "{e}"),
                None => assert_eq!(e.to_string(), want),
            },
        }
    }
}

#[test]
fn whole_document_mistakes_name_the_configuration() {
    for (text, want) in [
        (
            &b"{not json"[..],
            "configuration: invalid JSON (key must be a string at line 1 column 2)",
        ),
        (b"[]", "configuration: expected an object, got an array"),
        (
            b"{\"targets\": []} x",
            "configuration: invalid JSON (trailing characters at line 1 column 17)",
        ),
        (
            b"",
            "configuration: invalid JSON (EOF while parsing a value at line 1 column 0)",
        ),
    ] {
        assert_eq!(parse(text, &env()).unwrap_err().to_string(), want);
    }
}

#[test]
fn null_reads_as_absent() {
    let mut v = base();
    v["cache"] = Value::Null;
    v["targets"][0]["timeout"] = Value::Null;
    let c = parse_value(&v).unwrap();
    assert!(c.cache.is_none());
    assert_eq!(c.targets[0].timeout, DEFAULT_TIMEOUT);
}

#[test]
fn a_repeated_field_is_named() {
    let text =
        r#"{"targets": [{"provider": "openai", "cluster": "o", "api_key": "k", "cluster": "p"}]}"#;
    assert_eq!(
        parse(text.as_bytes(), &env()).unwrap_err().to_string(),
        "targets[0].cluster: given twice"
    );
}

/// `docs/config.schema.json` is what these types generate (`make schema` writes it).
#[test]
fn the_committed_json_schema_is_generated_from_the_configuration_types() {
    let schema = schemars::schema_for!(raw::RawConfig);
    let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/config.schema.json");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == text,
        "docs/config.schema.json is not what the configuration types generate: run `make schema`"
    );
}

#[test]
fn a_schema_reference_for_editors_is_ignored() {
    let mut v = base();
    v["$schema"] = json!("./docs/config.schema.json");
    assert_eq!(parse_value(&v).unwrap(), parse_value(&base()).unwrap());
}

/// A route as BricksLLM's guide writes it, and every mistake in one refused with its field.
#[test]
fn routes_are_checked_naming_the_field() {
    fn route() -> Value {
        json!({"name": "test", "path": "/api/routes/test/chat/completion", "operation": "chat",
               "targets": [{"target": "openai", "retries": 2, "timeout": "10s", "model": "gpt-4"},
                           {"target": "azure", "retries": 2, "timeout": "10s"}],
               "cache": {"enabled": true, "ttl": "5s"}, "keys": ["app"]})
    }
    let with = |mutate: &dyn Fn(&mut Value)| {
        let mut v = base();
        v["keys"] = json!([{"name": "app", "key_env": "GW_KEY"}]);
        v["routes"] = json!([route()]);
        mutate(&mut v);
        parse_value(&v)
    };
    let c = with(&|_| {}).unwrap();
    let [r] = c.routes.as_slice() else {
        panic!("{:?}", c.routes)
    };
    assert_eq!(r.path, "/api/routes/test/chat/completion");
    assert_eq!(
        r.operation,
        crate::request::operation::Operation::ChatCompletions
    );
    let steps: Vec<(usize, u32, Option<&str>)> = r
        .steps
        .iter()
        .map(|s| (s.target, s.retries, s.model.as_deref()))
        .collect();
    assert_eq!(steps, vec![(0, 2, Some("gpt-4")), (1, 2, None)]);
    assert_eq!(r.cache.as_ref().map(|c| c.scope.as_str()), Some("test"));
    assert_eq!(r.keys, Some(vec![0]));

    type Case = (&'static str, Box<dyn Fn(&mut Value)>);
    let cases: Vec<Case> = vec![
        (
            "routes[0].operation: the path is an Azure OpenAI path of operation \"embeddings\": an app calling it sends that",
            Box::new(|v| v["routes"][0]["path"] = json!("/openai/deployments/team-a/embeddings")),
        ),
        (
            "routes[0].targets[1].target: unknown target \"azur\"",
            Box::new(|v| v["routes"][0]["targets"][1]["target"] = json!("azur")),
        ),
        (
            "routes[0].targets[1]: unknown target \"azur\"",
            Box::new(|v| v["routes"][0]["targets"][1] = json!("azur")),
        ),
        (
            "routes[0].targets[1]: the target is already a step of this route",
            Box::new(|v| v["routes"][0]["targets"][1] = json!("openai")),
        ),
        (
            "routes[1].path: \"/api/routes/test/chat/completion\" is already the path of route \"test\"",
            Box::new(|v| {
                let mut other = route();
                other["name"] = json!("other");
                v["routes"].as_array_mut().unwrap().push(other);
            }),
        ),
        (
            "routes[0].path: must be a path starting with '/', without a query string (e.g. \"/api/routes/test/chat/completion\")",
            Box::new(|v| v["routes"][0]["path"] = json!("api/routes/test")),
        ),
        (
            "routes[0].operation: expected one of \"chat\", \"completions\", \"embeddings\", \"responses\", got \"images\"",
            Box::new(|v| v["routes"][0]["operation"] = json!("images")),
        ),
        (
            "routes[0].keys[0]: no key named \"nobody\"",
            Box::new(|v| v["routes"][0]["keys"] = json!(["nobody"])),
        ),
        (
            "routes[0].keys: the top-level `keys` is absent, so no request presents a gateway key (add `keys`)",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("keys");
            }),
        ),
        (
            "routes[0].cache: only chat routes are cached (responses are state, embeddings and completions are not cached)",
            Box::new(|v| v["routes"][0]["operation"] = json!("embeddings")),
        ),
        (
            "routes[0].targets[0].retries: at most 10 (use more targets instead)",
            Box::new(|v| v["routes"][0]["targets"][0]["retries"] = json!(11)),
        ),
        (
            "routes[0].targets[0].timeot: unknown field (expected one of `target`, `retries`, `timeout`, `model`, `override_params`)",
            Box::new(|v| v["routes"][0]["targets"][0]["timeot"] = json!("1s")),
        ),
        (
            "routes[0].targets: empty (at least one target)",
            Box::new(|v| v["routes"][0]["targets"] = json!([])),
        ),
        (
            "routes[0].name: missing",
            Box::new(|v| {
                v["routes"][0].as_object_mut().unwrap().remove("name");
            }),
        ),
    ];
    for (want, mutate) in cases {
        match with(&*mutate) {
            Ok(_) => panic!("accepted: {want}"),
            Err(e) => assert_eq!(e.to_string(), want),
        }
    }
}

#[test]
fn load_balancing_and_spillover_settings() {
    let mut v = base();
    v["strategy"] = json!({"mode": "loadbalance"});
    v["targets"][0]["weight"] = json!(3);
    v["targets"][1]["spillover"] = json!({"min_remaining_requests": 5});
    let c = parse_value(&v).unwrap();
    assert!(c.loadbalance);
    assert_eq!((c.targets[0].weight, c.targets[1].weight), (3, 1));
    assert_eq!(
        c.targets[1].spillover,
        Some(Spillover {
            min_remaining_requests: Some(5),
            min_remaining_tokens: None
        })
    );
    assert!(!parse_value(&base()).unwrap().loadbalance);

    type Case = (&'static str, Box<dyn Fn(&mut Value)>);
    let cases: Vec<Case> = vec![
        (
            "targets: no target has a weight above 0 for strategy.mode \"loadbalance\"",
            Box::new(|v| {
                v["strategy"] = json!({"mode": "loadbalance"});
                v["targets"][0]["weight"] = json!(0);
                v["targets"][1]["weight"] = json!(0);
            }),
        ),
        (
            "targets[0].weight: expected an integer, got \"heavy\"",
            Box::new(|v| v["targets"][0]["weight"] = json!("heavy")),
        ),
        (
            "targets[1].spillover: set min_remaining_requests, min_remaining_tokens or both",
            Box::new(|v| v["targets"][1]["spillover"] = json!({})),
        ),
        (
            "targets[1].spillover.min_remaining_request: unknown field (expected `min_remaining_requests` or `min_remaining_tokens`)",
            Box::new(|v| v["targets"][1]["spillover"] = json!({"min_remaining_request": 5})),
        ),
    ];
    for (want, mutate) in cases {
        let mut v = base();
        mutate(&mut v);
        assert_eq!(parse_value(&v).unwrap_err().to_string(), want);
    }
}

#[test]
fn streamed_requests_fail_over_through_the_router_unless_told_otherwise() {
    assert!(parse_value(&base()).unwrap().stream_failover);
    let mut v = base();
    v["streaming"] = json!({"failover": "callout"});
    assert!(!parse_value(&v).unwrap().stream_failover);
    v["streaming"] = json!({"failover": "router"});
    assert!(parse_value(&v).unwrap().stream_failover);
    let e = parse_value(&{
        let mut v = base();
        v["streaming"] = json!({"failover": "sometimes"});
        v
    })
    .unwrap_err();
    assert_eq!(e.field, "streaming.failover");
    assert_eq!(
        error_field(|v| v["streaming"] = json!({"falover": "router"})),
        "streaming.falover"
    );
}

#[test]
fn the_upstream_filter_takes_no_settings_of_its_own() {
    let upstream = |v: Value| parse_plugin(v.to_string().as_bytes(), &env());
    assert_eq!(upstream(json!({"role": "upstream"})), Ok(Plugin::Upstream));
    // The filter's own role, spelled out, is the filter.
    let mut filter = base();
    filter["role"] = json!("filter");
    assert!(matches!(upstream(filter), Ok(Plugin::Filter(_))));
    let mut both = base();
    both["role"] = json!("upstream");
    let e = upstream(both).unwrap_err();
    assert_eq!(e.field, "targets");
    assert!(
        e.problem.contains("not allowed with role \"upstream\""),
        "{e}"
    );
    let e = upstream(json!({"role": "upstream", "deadline": "5s"})).unwrap_err();
    assert_eq!(e.field, "deadline");
    let e = upstream(json!({"role": "sidecar"})).unwrap_err();
    assert_eq!(e.field, "role");
    // The filter refuses the upstream filter's configuration, naming the field.
    let e = parse_value(&json!({"role": "upstream"})).unwrap_err();
    assert_eq!(e.field, "role");
}

/// `limits` on keys and routes (SPEC 2d): read into counts and windows, and every mistake
/// refused naming its field.
#[test]
fn limits_of_keys_and_routes_are_checked_naming_the_field() {
    let with = |mutate: &dyn Fn(&mut Value)| {
        let mut v = base();
        v["keys"] = json!([{"name": "app", "key_env": "GW_KEY",
            "limits": {"requests": {"count": 600, "per": "1m"}, "tokens": {"count": 200000, "per": "1d"}}}]);
        v["routes"] = json!([{"name": "chat", "path": "/chat", "operation": "chat", "targets": ["openai"],
            "limits": {"tokens": {"count": 1, "per": "1s"}}}]);
        mutate(&mut v);
        parse_value(&v)
    };
    let c = with(&|_| {}).unwrap();
    let key = &c.keys.as_ref().unwrap()[0];
    let limit = |count, secs| {
        Some(Limit {
            count,
            per: Duration::from_secs(secs),
        })
    };
    assert_eq!(
        key.limits,
        Some(Limits {
            requests: limit(600, 60),
            tokens: limit(200_000, 86_400),
        })
    );
    assert_eq!(
        c.routes[0].limits,
        Some(Limits {
            requests: None,
            tokens: limit(1, 1),
        })
    );
    // Huge counts and the longest window are accepted.
    let huge = with(&|v| {
        v["keys"][0]["limits"] = json!({"requests": {"count": u64::MAX, "per": "30d"}});
    })
    .unwrap();
    assert_eq!(
        huge.keys.unwrap()[0].limits.unwrap().requests,
        limit(u64::MAX, 30 * 86_400)
    );

    type Case = (&'static str, Box<dyn Fn(&mut Value)>);
    let window = "expected a duration from \"1s\" to \"30d\" such as \"1m\", \"1h\" or \"1d\"";
    let cases: Vec<Case> = vec![
        (
            "keys[0].limits.requests.count: must be at least 1 (to stop a key, remove it from `keys`)",
            Box::new(|v| v["keys"][0]["limits"]["requests"]["count"] = json!(0)),
        ),
        (
            "keys[0].limits.requests.count: expected a non-negative integer, got -5",
            Box::new(|v| v["keys"][0]["limits"]["requests"]["count"] = json!(-5)),
        ),
        (
            "keys[0].limits.requests.count: expected an integer, got \"600\"",
            Box::new(|v| v["keys"][0]["limits"]["requests"]["count"] = json!("600")),
        ),
        (
            "keys[0].limits.tokens.count: expected an integer, got 1e+30",
            Box::new(|v| v["keys"][0]["limits"]["tokens"]["count"] = json!(1e30)),
        ),
        (
            "keys[0].limits.requests.count: missing",
            Box::new(|v| v["keys"][0]["limits"]["requests"] = json!({"per": "1m"})),
        ),
        (
            "keys[0].limits.tokens.per: missing",
            Box::new(|v| v["keys"][0]["limits"]["tokens"] = json!({"count": 5})),
        ),
        (
            "keys[0].limits: empty (set `requests`, `tokens` or both; omit `limits` for no limit)",
            Box::new(|v| v["keys"][0]["limits"] = json!({})),
        ),
        (
            "keys[0].limits.request: unknown field (expected `requests` or `tokens`)",
            Box::new(|v| v["keys"][0]["limits"]["request"] = json!({"count": 1, "per": "1s"})),
        ),
        (
            "keys[0].limits.requests.window: unknown field (expected `count` or `per`)",
            Box::new(|v| v["keys"][0]["limits"]["requests"]["window"] = json!("1s")),
        ),
        (
            "keys[0].limits: expected an object, got 600",
            Box::new(|v| v["keys"][0]["limits"] = json!(600)),
        ),
        (
            "routes[0].limits.tokens: expected an object, got an array",
            Box::new(|v| v["routes"][0]["limits"]["tokens"] = json!([1, "1s"])),
        ),
        (
            "routes[0].limits.tokens.count: must be at least 1 (to stop a key, remove it from `keys`)",
            Box::new(|v| v["routes"][0]["limits"]["tokens"]["count"] = json!(0)),
        ),
    ];
    for (want, mutate) in cases {
        match with(&*mutate) {
            Ok(_) => panic!("accepted: {want}"),
            Err(e) => assert_eq!(e.to_string(), want),
        }
    }
    for (per, ok) in [
        ("500ms", false),
        ("0s", false),
        ("31d", false),
        ("1 minute", false),
        ("1s", true),
        ("2s", true),
        ("1h30m", true),
        ("30d", true),
        ("720h", true),
    ] {
        let got = with(&|v| v["routes"][0]["limits"]["tokens"]["per"] = json!(per));
        match got {
            Ok(_) => assert!(ok, "{per} accepted"),
            Err(e) => {
                assert!(!ok, "{per} refused: {e}");
                assert_eq!(e.field, "routes[0].limits.tokens.per");
                assert_eq!(e.problem, format!("{window}, got \"{per}\""));
            }
        }
    }
}
