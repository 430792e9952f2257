//! Azure-shaped requests: apps written for Azure OpenAI (the SDKs' `AzureOpenAI` clients, or an
//! OpenAI client pointed at Azure's v1 API) call the gateway as they would call Azure. Each such
//! request is understood as its OpenAI-shaped twin (`/v1/<operation>`, `/v1/responses/<id>...`),
//! and from there goes down the chain like any other: every target gets it in its own shape.
//!
//! * deployments style: `POST /openai/deployments/<deployment>/<chat/completions | completions |
//!   embeddings>?api-version=<v>` and `/openai/responses[/<id>[/cancel | /input_items]]?api-version=<v>`;
//! * the v1 API: `/openai/v1/<chat/completions | embeddings | responses[/<id>...]>`, where the
//!   body's `model` names the deployment and `api-version` is optional.
//!
//! The client's `api-version` is checked as Azure checks it and never forwarded: each Azure
//! target sends its own. The deployment becomes the request's model ([`model_for_deployment`]).

use crate::config::Config;
use crate::request::body::Body;
use crate::request::intake::{self, Kind};
use crate::request::operation::{self, Operation};
use crate::target::rewrite;

/// Which of Azure's APIs the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Deployments,
    V1,
}

/// An Azure-shaped request, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureShaped {
    pub api: Api,
    /// What the request is: an operation or a stored response, as for its OpenAI-shaped twin.
    pub kind: Kind,
    /// The twin's path: `/v1/...`, with the client's query string less its `api-version`.
    pub twin_path: String,
    /// The deployment the path names (deployments style, except the Responses API, whose body's
    /// `model` names it, as on the v1 API).
    pub deployment: Option<String>,
}

/// Why an Azure-shaped request is refused before it goes anywhere (as Azure refuses it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadVersion {
    /// Deployments style without `api-version`: Azure answers 404 "Resource not found".
    Missing,
    /// Not an Azure `api-version` (the value, as sent): Azure answers 400 "API version not supported".
    Unsupported(String),
}

/// The Azure-shaped request `method path` is, if it is one the filter rewrites and fails over
/// (`None`: not Azure-shaped, or an Azure path the filter passes through as it is).
pub fn recognise(method: &str, path: &str) -> Option<Result<AzureShaped, BadVersion>> {
    let (api, deployment, rest) = parts(path)?;
    let mut version = None;
    let mut kept = url::form_urlencoded::Serializer::new(String::new());
    let mut any_kept = false;
    for (k, v) in url::form_urlencoded::parse(operation::query(path).unwrap_or("").as_bytes()) {
        if k == "api-version" {
            // The last one counts, as on Azure's side.
            version = Some(v.into_owned());
        } else {
            kept.append_pair(&k, &v);
            any_kept = true;
        }
    }
    let twin_path = match any_kept {
        true => format!("/v1/{rest}?{}", kept.finish()),
        false => format!("/v1/{rest}"),
    };
    let kind = match intake::classify(method, &twin_path) {
        Kind::PassThrough => return None,
        kind => kind,
    };
    if let Err(bad) = check_version(api, version) {
        return Some(Err(bad));
    }
    Some(Ok(AzureShaped {
        api,
        kind,
        twin_path,
        deployment: deployment.map(str::to_string),
    }))
}

/// An Azure path's API, the deployment its path names, and the rest of it as the tail of its
/// OpenAI twin (`chat/completions`, `responses/<id>`).
fn parts(path: &str) -> Option<(Api, Option<&str>, &str)> {
    let bare = operation::path_only(path);
    let bare = bare.strip_suffix('/').unwrap_or(bare);
    if let Some(rest) = bare.strip_prefix("/openai/v1/") {
        // The v1 API has no legacy completions: Azure's 404 is the client's answer.
        return (rest != "completions").then_some((Api::V1, None, rest));
    }
    if let Some(rest) = bare.strip_prefix("/openai/deployments/") {
        let (deployment, op) = rest.split_once('/')?;
        let known = matches!(op, "chat/completions" | "completions" | "embeddings");
        return (known && is_deployment_name(deployment)).then_some((
            Api::Deployments,
            Some(deployment),
            op,
        ));
    }
    let rest = bare.strip_prefix("/openai/")?;
    (rest == "responses" || rest.starts_with("responses/")).then_some((
        Api::Deployments,
        None,
        rest,
    ))
}

/// The operation an Azure path names, whatever its `api-version` (a route on such a path must
/// be that operation: the app calling it expects it).
pub fn operation_of(path: &str) -> Option<Operation> {
    let (_, _, rest) = parts(path)?;
    Operation::from_request("POST", &format!("/v1/{rest}"))
}

/// Azure's `api-version` rules: deployments style needs one, a date (`2024-10-21`) or a preview
/// (`2025-04-01-preview`); the v1 API takes none, `preview` or `latest`.
fn check_version(api: Api, version: Option<String>) -> Result<(), BadVersion> {
    match (api, version) {
        (Api::Deployments, None) => Err(BadVersion::Missing),
        (Api::V1, None) => Ok(()),
        (Api::V1, Some(v)) if v == "preview" || v == "latest" => Ok(()),
        (Api::Deployments, Some(v)) if is_dated_version(&v) => Ok(()),
        (_, Some(v)) => Err(BadVersion::Unsupported(v)),
    }
}

/// `YYYY-MM-DD` or `YYYY-MM-DD-preview`, a real month and day.
fn is_dated_version(v: &str) -> bool {
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let parts: Vec<&str> = date.split('-').collect();
    let number = |s: &str, len: usize| -> Option<u32> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match parts.as_slice() {
        [y, m, d] => matches!(
            (number(y, 4), number(m, 2), number(d, 2)),
            (Some(_), Some(1..=12), Some(1..=31))
        ),
        _ => false,
    }
}

/// Azure's deployment names: letters, digits, `-`, `_`, `.` (at most 64).
fn is_deployment_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The model a deployment name stands for: `deployment_models`, else the one model the Azure
/// targets' `deployments` map to it, else the name itself (apps often name a deployment after
/// its model). Both maps are merged into `Config::deployment_models` at load.
pub fn model_for_deployment<'a>(config: &'a Config, deployment: &'a str) -> &'a str {
    config
        .deployment_models
        .get(deployment)
        .map_or(deployment, String::as_str)
}

/// The model an Azure-shaped request asks for: its path's deployment's, else (v1 API, Responses
/// API) its body's `model`'s, mapped the same way. `None`: the body names none.
pub fn model_of<'a>(
    config: &'a Config,
    shaped: &'a AzureShaped,
    body_model: Option<&'a str>,
) -> Option<&'a str> {
    shaped
        .deployment
        .as_deref()
        .or(body_model)
        .map(|d| model_for_deployment(config, d))
}

/// The body of the request's OpenAI-shaped twin: the client's with `model` set to the model its
/// deployment stands for (`None`: the client's bytes already are that body). Every target's
/// body is then made from it, as from an OpenAI client's.
pub fn twin_body(config: &Config, shaped: &AzureShaped, body: &Body) -> Option<Vec<u8>> {
    let model = model_of(config, shaped, body.model.as_deref())?;
    if Some(model) == body.model.as_deref() {
        return None;
    }
    rewrite::rewrite(body, Some(model), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, NoEnv};
    use crate::request::operation::{Resource, ResourceAction};
    use serde_json::json;

    fn op(op: Operation) -> Kind {
        Kind::Operation(op)
    }

    fn stored(id: &str, action: ResourceAction) -> Kind {
        Kind::Resource(Resource {
            id: id.into(),
            action,
        })
    }

    #[test]
    fn azure_paths_are_understood_as_their_openai_twins() {
        use Operation::*;
        use ResourceAction::*;
        let v = "?api-version=2024-10-21";
        // (method, path, api, kind, twin path, deployment)
        type Case<'a> = (&'a str, String, Api, Kind, &'a str, Option<&'a str>);
        let cases: Vec<Case> = vec![
            (
                "POST",
                format!("/openai/deployments/gpt-4o/chat/completions{v}"),
                Api::Deployments,
                op(ChatCompletions),
                "/v1/chat/completions",
                Some("gpt-4o"),
            ),
            (
                "POST",
                format!("/openai/deployments/my_dep.v2/completions{v}"),
                Api::Deployments,
                op(Completions),
                "/v1/completions",
                Some("my_dep.v2"),
            ),
            (
                "POST",
                "/openai/deployments/emb/embeddings/?api-version=2024-06-01&x=1".into(),
                Api::Deployments,
                op(Embeddings),
                "/v1/embeddings?x=1",
                Some("emb"),
            ),
            (
                "POST",
                "/openai/responses?api-version=2025-04-01-preview".into(),
                Api::Deployments,
                op(Responses),
                "/v1/responses",
                None,
            ),
            (
                "GET",
                format!("/openai/responses/resp_1{v}&include[]=x"),
                Api::Deployments,
                stored("resp_1", Retrieve),
                "/v1/responses/resp_1?include%5B%5D=x",
                None,
            ),
            (
                "DELETE",
                format!("/openai/responses/resp_1{v}"),
                Api::Deployments,
                stored("resp_1", Delete),
                "/v1/responses/resp_1",
                None,
            ),
            (
                "POST",
                format!("/openai/responses/resp_1/cancel{v}"),
                Api::Deployments,
                stored("resp_1", Cancel),
                "/v1/responses/resp_1/cancel",
                None,
            ),
            (
                "POST",
                "/openai/v1/chat/completions".into(),
                Api::V1,
                op(ChatCompletions),
                "/v1/chat/completions",
                None,
            ),
            (
                "POST",
                "/openai/v1/embeddings?api-version=preview".into(),
                Api::V1,
                op(Embeddings),
                "/v1/embeddings",
                None,
            ),
            (
                "POST",
                "/openai/v1/responses?api-version=latest".into(),
                Api::V1,
                op(Responses),
                "/v1/responses",
                None,
            ),
            (
                "GET",
                "/openai/v1/responses/resp_2/input_items?limit=2".into(),
                Api::V1,
                stored("resp_2", InputItems),
                "/v1/responses/resp_2/input_items?limit=2",
                None,
            ),
        ];
        for (method, path, api, kind, twin, deployment) in cases {
            let got = recognise(method, &path).unwrap().unwrap();
            assert_eq!(
                (
                    got.api,
                    got.kind,
                    got.twin_path.as_str(),
                    got.deployment.as_deref()
                ),
                (api, kind, twin, deployment),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn other_paths_are_not_azure_shaped_operations() {
        let v = "?api-version=2024-10-21";
        for (method, path) in [
            ("POST", "/v1/chat/completions".to_string()),
            (
                "GET",
                format!("/openai/deployments/gpt-4o/chat/completions{v}"),
            ),
            (
                "POST",
                format!("/openai/deployments/gpt-4o/images/generations{v}"),
            ),
            (
                "POST",
                format!("/openai/deployments/a%2Fb/chat/completions{v}"),
            ),
            (
                "POST",
                format!("/openai/deployments/../chat/completions{v}"),
            ),
            ("POST", format!("/openai/deployments//chat/completions{v}")),
            (
                "POST",
                format!("/openai/deployments/gpt-4o/chat/completions/x{v}"),
            ),
            ("GET", format!("/openai/models{v}")),
            ("GET", format!("/openai/responses{v}")),
            ("PUT", format!("/openai/responses/resp_1{v}")),
            ("POST", "/openai/v1/completions".to_string()),
            ("GET", "/openai/v1/models".to_string()),
            (
                "POST",
                "/openai/v1/deployments/x/chat/completions".to_string(),
            ),
            (
                "POST",
                format!("/OPENAI/deployments/gpt-4o/chat/completions{v}"),
            ),
            (
                "POST",
                format!("/x/openai/deployments/gpt-4o/chat/completions{v}"),
            ),
        ] {
            assert_eq!(recognise(method, &path), None, "{method} {path}");
        }
    }

    #[test]
    fn an_azure_path_names_its_operation() {
        let cases = [
            (
                "/openai/deployments/team-a/chat/completions",
                Some(Operation::ChatCompletions),
            ),
            (
                "/openai/deployments/e/embeddings",
                Some(Operation::Embeddings),
            ),
            ("/openai/v1/responses", Some(Operation::Responses)),
            ("/openai/responses", Some(Operation::Responses)),
            ("/openai/responses/resp_1", None),
            ("/openai/v1/completions", None),
            ("/api/routes/test/chat/completion", None),
            ("/v1/chat/completions", None),
        ];
        for (path, want) in cases {
            assert_eq!(operation_of(path), want, "{path}");
        }
    }

    #[test]
    fn api_versions_are_checked_as_azure_checks_them() {
        let chat = "/openai/deployments/d/chat/completions";
        let cases = [
            (format!("{chat}?api-version=2024-10-21"), Ok(())),
            (format!("{chat}?api-version=2025-04-01-preview"), Ok(())),
            (chat.to_string(), Err(BadVersion::Missing)),
            (format!("{chat}?x=1"), Err(BadVersion::Missing)),
            ("/openai/responses".to_string(), Err(BadVersion::Missing)),
            (
                format!("{chat}?api-version="),
                Err(BadVersion::Unsupported(String::new())),
            ),
            (
                format!("{chat}?api-version=2024-13-01"),
                Err(BadVersion::Unsupported("2024-13-01".into())),
            ),
            (
                format!("{chat}?api-version=2024-10-21-beta"),
                Err(BadVersion::Unsupported("2024-10-21-beta".into())),
            ),
            (
                format!("{chat}?api-version=v1"),
                Err(BadVersion::Unsupported("v1".into())),
            ),
            (
                format!("{chat}?api-version=preview"),
                Err(BadVersion::Unsupported("preview".into())),
            ),
            (
                format!("{chat}?api-version=24-10-21"),
                Err(BadVersion::Unsupported("24-10-21".into())),
            ),
            (
                format!("{chat}?api-version=2024-1-021"),
                Err(BadVersion::Unsupported("2024-1-021".into())),
            ),
            (
                format!("{chat}?api-version=2024-10-21&api-version=nope"),
                Err(BadVersion::Unsupported("nope".into())),
            ),
            ("/openai/v1/chat/completions".to_string(), Ok(())),
            (
                "/openai/v1/chat/completions?api-version=preview".to_string(),
                Ok(()),
            ),
            (
                "/openai/v1/chat/completions?api-version=2024-10-21".to_string(),
                Err(BadVersion::Unsupported("2024-10-21".into())),
            ),
        ];
        for (path, want) in cases {
            let got = recognise("POST", &path).unwrap().map(|_| ());
            assert_eq!(got, want, "{path}");
        }
    }

    fn config(extra: serde_json::Value) -> Config {
        let mut c = json!({"targets": [
            {"name": "openai", "provider": "openai", "cluster": "o", "api_key": "k"},
            {"name": "east", "provider": "azure", "cluster": "a", "api_key": "k", "resource_name": "r",
             "api_version": "2024-10-21",
             "deployments": {"gpt-4o": "chat-prod", "gpt-4o-mini": "mini", "*": "fallback"}},
            {"name": "west", "provider": "azure", "cluster": "b", "api_key": "k", "resource_name": "w",
             "api_version": "v1",
             "deployments": {"gpt-4o": "chat-prod", "gpt-4.1": "mini", "o4-mini": "reasoning"}},
        ]});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        config::parse(c.to_string().as_bytes(), &NoEnv).unwrap()
    }

    #[test]
    fn a_deployment_becomes_its_model() {
        let plain = config(json!({}));
        let mapped =
            config(json!({"deployment_models": {"mini": "gpt-4o-mini", "team-a": "gpt-4.1"}}));
        let cases = [
            // Both Azure targets map gpt-4o to it: one model, unambiguous.
            (&plain, "chat-prod", "gpt-4o"),
            (&plain, "reasoning", "o4-mini"),
            // Two models map to "mini": ambiguous, so the name itself.
            (&plain, "mini", "mini"),
            // "*" is no model.
            (&plain, "fallback", "fallback"),
            // Named after its model, in no map.
            (&plain, "gpt-4o", "gpt-4o"),
            // The explicit map comes first.
            (&mapped, "mini", "gpt-4o-mini"),
            (&mapped, "team-a", "gpt-4.1"),
            (&mapped, "chat-prod", "gpt-4o"),
        ];
        for (config, deployment, model) in cases {
            assert_eq!(
                model_for_deployment(config, deployment),
                model,
                "{deployment}"
            );
        }
    }

    #[test]
    fn the_path_names_the_deployment_else_the_body() {
        let c = config(json!({}));
        let shaped = |path: &str| recognise("POST", path).unwrap().unwrap();
        let chat = shaped("/openai/deployments/chat-prod/chat/completions?api-version=2024-10-21");
        assert_eq!(model_of(&c, &chat, Some("whatever")), Some("gpt-4o"));
        let v1 = shaped("/openai/v1/chat/completions");
        assert_eq!(model_of(&c, &v1, Some("reasoning")), Some("o4-mini"));
        assert_eq!(model_of(&c, &v1, Some("gpt-4o")), Some("gpt-4o"));
        assert_eq!(model_of(&c, &v1, None), None);
        let responses = shaped("/openai/responses?api-version=2025-04-01-preview");
        assert_eq!(model_of(&c, &responses, Some("chat-prod")), Some("gpt-4o"));
    }

    #[test]
    fn the_twins_body_names_the_model() {
        use crate::request::body::Keep;
        let c = config(json!({}));
        let shaped = |path: &str| recognise("POST", path).unwrap().unwrap();
        let body = |text: &str| Body::parse(text.as_bytes().to_vec(), Keep::Typed).unwrap();
        let text = |b: Option<Vec<u8>>| b.map(|b| String::from_utf8(b).unwrap());
        let chat = shaped("/openai/deployments/chat-prod/chat/completions?api-version=2024-10-21");
        // The SDK repeats the deployment in the body; the path is what Azure goes by.
        assert_eq!(
            text(twin_body(
                &c,
                &chat,
                &body(r#"{"model":"chat-prod","messages":[]}"#)
            )),
            Some(r#"{"model":"gpt-4o","messages":[]}"#.into())
        );
        assert_eq!(
            text(twin_body(&c, &chat, &body(r#"{"messages":[],"n":1}"#))),
            Some(r#"{"model":"gpt-4o","messages":[],"n":1}"#.into())
        );
        assert_eq!(twin_body(&c, &chat, &body(r#"{"model":"gpt-4o"}"#)), None);
        let v1 = shaped("/openai/v1/chat/completions");
        assert_eq!(twin_body(&c, &v1, &body(r#"{"model":"gpt-4o"}"#)), None);
        assert_eq!(twin_body(&c, &v1, &body(r#"{"messages":[]}"#)), None);
        assert_eq!(
            text(twin_body(
                &c,
                &v1,
                &body(r#"{"model":"reasoning","input":"x"}"#)
            )),
            Some(r#"{"model":"o4-mini","input":"x"}"#.into())
        );
    }
}
