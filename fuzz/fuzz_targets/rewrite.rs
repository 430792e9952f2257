//! Request rewriting: the body read, an Azure-shaped request's twin, `provider::address` and
//! `rewrite::body_for` on any method, path, model and body.
//! Input: [method][path length][path][model length][model][body].
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llm_failover::request::azure;
use llm_failover::request::body::{Body, Keep};
use llm_failover::answer::cache;
use llm_failover::config::{self, AzureApi, Config, NoEnv, Provider};
use llm_failover::target::provider;
use llm_failover::target::rewrite::{self, Operation};

const CONFIG: &str = r#"{"targets": [
  {"name": "openai", "provider": "openai", "cluster": "openai", "api_key": "sk-o"},
  {"name": "openai-mini", "provider": "openai", "cluster": "openai", "api_key": "sk-o",
   "model": "gpt-4o-mini", "override_params": {"temperature": 0, "stream_options": {"include_usage": true}}},
  {"name": "azure", "provider": "azure", "cluster": "azure", "resource_name": "res", "api_key": "az",
   "api_version": "2024-10-21", "deployments": {"gpt-4": "gpt4-prod", "gpt-4\r\nx: y": "crlf-model", "": "empty-model"}},
  {"name": "azure-default", "provider": "azure", "cluster": "azure", "host": "h.example:8443",
   "api_key": "x", "api_version": "2024-06-01", "deployment": "dflt"},
  {"name": "azure-v1", "provider": "azure", "cluster": "azure", "resource_name": "res1", "api_key": "az",
   "api_version": "v1", "deployments": {"gpt-4o": "gpt-4o-prod"}}
]}"#;

fn config() -> &'static Config {
    static CONFIG_ONCE: OnceLock<Config> = OnceLock::new();
    CONFIG_ONCE.get_or_init(|| config::parse(CONFIG.as_bytes(), &NoEnv).unwrap())
}

fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let n = data.first().map_or(0, |&n| usize::from(n));
    let rest = data.get(1..).unwrap_or_default();
    let n = n.min(rest.len());
    let (head, tail) = rest.split_at(n);
    *data = tail;
    head
}

fn bad_byte(b: u8) -> bool {
    matches!(b, b'\r' | b'\n' | 0 | b' ')
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let method = match data.first().copied().unwrap_or(0) % 4 {
        0 | 1 => "POST",
        2 => "GET",
        _ => "post",
    };
    data = data.get(1..).unwrap_or_default();
    let path = String::from_utf8_lossy(take(&mut data)).into_owned();
    let extra_model = String::from_utf8_lossy(take(&mut data)).into_owned();
    let body = data;

    let op = Operation::from_request(method, &path);
    assert!(op.is_none() || method == "POST");
    let inspected = Body::parse(body.to_vec(), Keep::Document);
    if let Ok(b) = &inspected {
        // Whatever is accepted, the cache key can read.
        assert!(cache::key("", "k", Operation::ChatCompletions, b).is_some());
    }
    if let Some(Ok(shaped)) = azure::recognise(method, &path) {
        assert!(shaped.twin_path.starts_with("/v1/") && !shaped.twin_path.bytes().any(bad_byte));
        if let Ok(b) = &inspected {
            let model = azure::model_of(config(), &shaped, b.model.as_deref());
            if let Some(twin) = azure::twin_body(config(), &shaped, b) {
                let after = Body::parse(twin, Keep::Typed).expect("the twin's body is still a request");
                assert_eq!(after.model.as_deref(), model);
                assert_eq!((after.stream, &after.previous_response_id), (b.stream, &b.previous_response_id));
            }
        }
    }
    let empty = Body::parse(b"{}".to_vec(), Keep::Typed).unwrap();
    let info = inspected.as_ref().unwrap_or(&empty);

    for t in &config().targets {
        let target_model = rewrite::model_for(t, info);
        for model in [target_model, Some(extra_model.as_str()), None] {
            match provider::address(t, op, model, &path) {
                Ok(a) => {
                    assert_eq!(a.authority, t.host);
                    assert!(!a.authority.bytes().any(bad_byte));
                    if t.provider == Provider::Azure && op.is_some() {
                        assert!(a.path.starts_with("/openai/"));
                        assert!(!a.path.bytes().any(bad_byte), "{:?}", a.path);
                    } else {
                        assert_eq!(a.path, path, "passed through unchanged");
                    }
                }
                Err(provider::Unservable::NoDeployment) => {
                    assert!(t.provider == Provider::Azure && op.is_some());
                    assert!(t.azure.as_ref().unwrap().deployment_for(model).is_none());
                }
                Err(provider::Unservable::Unsupported) => {
                    assert_eq!(op, Some(Operation::Completions));
                    assert_eq!(t.azure.as_ref().unwrap().api, AzureApi::V1);
                }
            }
        }
        let Ok(before) = &inspected else { continue };
        let op = op.unwrap_or(Operation::ChatCompletions);
        let out = rewrite::body_for(t, op, before);
        let body_model = provider::body_model(t, op, t.model.as_deref(), before.model.as_deref());
        if t.override_params.is_none() && (body_model.is_none() || body_model == before.model.as_deref()) {
            assert!(out.is_none());
            continue;
        }
        let out = out.expect("an accepted body can be rewritten");
        let after = Body::parse(out, Keep::Typed).expect("a rewritten body is still a request");
        assert_eq!(after.model.as_deref(), body_model.or(before.model.as_deref()));
        assert_eq!(after.stream, before.stream);
        assert_eq!(after.previous_response_id, before.previous_response_id);
    }
});
