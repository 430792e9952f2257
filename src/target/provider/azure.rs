//! Azure OpenAI's two APIs, built with `url` (every segment and query pair percent-encoded):
//!
//! * deployments style: `/openai/deployments/<deployment>/<operation>?api-version=<v>`, and for
//!   the Responses API `/openai/responses?api-version=<v>` with the deployment in the body;
//! * the v1 API (`api_version: "v1"`): `/openai/v1/<operation>`, the deployment in the body's
//!   `model`, no `api-version`; it has no legacy `/completions`.

use url::Url;

use super::Unservable;
use crate::config::{AzureApi, AzureSettings};
use crate::request::operation::{self, Operation, Resource};

/// The path (and query) of `op` for `model` on this Azure target.
pub fn operation_path(
    azure: &AzureSettings,
    op: Operation,
    model: Option<&str>,
) -> Result<String, Unservable> {
    let unsupported = match op {
        Operation::Completions => azure.api == AzureApi::V1,
        Operation::Responses => !azure.serves_responses(),
        _ => false,
    };
    if unsupported {
        return Err(Unservable::Unsupported);
    }
    let deployment = azure
        .deployment_for(model)
        .ok_or(Unservable::NoDeployment)?;
    let built = match (azure.api, op) {
        (AzureApi::V1, op) => build(["openai", "v1"], op.path(), &[], None),
        (AzureApi::Deployments, Operation::Responses) => {
            build(["openai", "responses"], "", &[], Some(&azure.api_version))
        }
        (AzureApi::Deployments, op) => build(
            ["openai", "deployments", deployment],
            op.path(),
            &[],
            Some(&azure.api_version),
        ),
    };
    built.ok_or(Unservable::NoDeployment)
}

/// The path of a request on a stored response: `/openai/v1/responses/<id>...` or
/// `/openai/responses/<id>...?api-version=<v>`, with the client's query parameters (pagination
/// of `input_items`, `include[]`) but its own `api-version`.
pub fn resource_path(
    azure: &AzureSettings,
    resource: &Resource,
    client_path: &str,
) -> Option<String> {
    let client_query: Vec<(String, String)> = operation::query(client_path)
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k != "api-version")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let tail = format!("{}{}", resource.id, resource.action.suffix());
    match azure.api {
        AzureApi::V1 => build(["openai", "v1", "responses"], &tail, &client_query, None),
        AzureApi::Deployments => build(
            ["openai", "responses"],
            &tail,
            &client_query,
            Some(&azure.api_version),
        ),
    }
}

/// Whether the body's `model` must name the deployment.
pub fn deployment_in_body(azure: &AzureSettings, op: Operation) -> bool {
    azure.api == AzureApi::V1 || op == Operation::Responses
}

/// `/<segments...>/<tail segments...>?<query>&api-version=<v>`. Empty segments are skipped.
fn build<const N: usize>(
    segments: [&str; N],
    tail: &str,
    query: &[(String, String)],
    api_version: Option<&str>,
) -> Option<String> {
    let mut url = Url::parse("https://azure.invalid/").ok()?;
    {
        let mut path = url.path_segments_mut().ok()?;
        path.clear();
        path.extend(segments.iter().copied().filter(|s| !s.is_empty()));
        path.extend(tail.split('/').filter(|s| !s.is_empty()));
    }
    if !query.is_empty() || api_version.is_some() {
        let mut pairs = url.query_pairs_mut();
        pairs.extend_pairs(query);
        if let Some(v) = api_version {
            pairs.append_pair("api-version", v);
        }
    }
    Some(url[url::Position::BeforePath..].to_string())
}
