//! How a request is addressed and authenticated on each provider: OpenAI keeps the client's
//! path (`openai.rs`); Azure OpenAI has its deployment URLs or its v1 API (`azure.rs`).
//! Credentials: OpenAI `Authorization: Bearer <key>`, Azure `api-key: <key>` or
//! `Authorization: Bearer <Entra ID token>`.

mod azure;
mod openai;

use crate::config::{Credential, Provider, Target};
use crate::request::operation::{Operation, Resource};

/// Where one attempt goes on its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub path: String,
    pub authority: String,
}

/// Why a target cannot take a request at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unservable {
    /// Azure target whose `deployments` has neither the model nor `"*"`.
    NoDeployment,
    /// The target's API has no such operation (Azure's v1 API: the legacy `/completions`).
    Unsupported,
}

impl Unservable {
    /// As the decision log and stats name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Unservable::NoDeployment => "no_deployment",
            Unservable::Unsupported => "unsupported_operation",
        }
    }
}

/// Address of `op` (None: a path the filter does not rewrite) on `target`.
pub fn address(
    target: &Target,
    op: Option<Operation>,
    model: Option<&str>,
    client_path: &str,
) -> Result<Address, Unservable> {
    let path = match (op, &target.azure) {
        (Some(op), Some(azure)) => azure::operation_path(azure, op, model)?,
        // OpenAI, and paths we do not rewrite: as the client sent them.
        _ => openai::path(client_path),
    };
    Ok(Address {
        path,
        authority: target.host.clone(),
    })
}

/// Address of a request on a stored response (`/v1/responses/{id}...`) on `target`.
pub fn resource_address(target: &Target, resource: &Resource, client_path: &str) -> Address {
    let path = match &target.azure {
        Some(azure) => azure::resource_path(azure, resource, client_path),
        None => None,
    };
    Address {
        path: path.unwrap_or_else(|| openai::path(client_path)),
        authority: target.host.clone(),
    }
}

/// The model a target's body must carry for `op` (`None`: the client's, unchanged), given the
/// model its step sets (a route step's, or the target's own) and the client's: an Azure target
/// addressed by its v1 API, or by the Responses API, names the deployment of the model asked;
/// any other target the step's model, if it sets one.
pub fn body_model<'a>(
    target: &'a Target,
    op: Operation,
    step_model: Option<&'a str>,
    client_model: Option<&'a str>,
) -> Option<&'a str> {
    match &target.azure {
        Some(azure) if azure::deployment_in_body(azure, op) => {
            azure.deployment_for(step_model.or(client_model))
        }
        _ => step_model,
    }
}

/// Whether `target`'s API names the deployment in the body for `op`.
pub fn deployment_in_body(target: &Target, op: Operation) -> bool {
    target
        .azure
        .as_ref()
        .is_some_and(|azure| azure::deployment_in_body(azure, op))
}

/// The header that carries the target's credential; for Entra ID tokens the filter fetches
/// itself, the value is the current token's (`None`: the target has no token yet).
pub fn credential_header(target: &Target) -> (&'static str, String) {
    match (&target.credential, target.provider) {
        (Credential::ApiKey(key), Provider::Azure) => ("api-key", key.clone()),
        (Credential::ApiKey(key), Provider::OpenAi) => ("authorization", format!("Bearer {key}")),
        (Credential::AzureAdToken(token), _) => ("authorization", format!("Bearer {token}")),
        // Set per request from the token store (see `bearer`).
        (Credential::Entra(_), _) => ("authorization", String::new()),
    }
}

/// The `Authorization` value of a bearer token.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Credential headers a client may send; none of them ever reaches an upstream as sent.
pub const CLIENT_CREDENTIAL_HEADERS: [&str; 2] = ["authorization", "api-key"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, NoEnv};
    use serde_json::json;

    fn targets() -> Vec<Target> {
        let cfg = json!({"targets": [
            {"name": "openai", "provider": "openai", "cluster": "o", "api_key": "sk-o"},
            {"name": "azure", "provider": "azure", "cluster": "a", "resource_name": "res", "api_key": "az-k",
             "api_version": "2024-10-21", "deployments": {"gpt-4": "gpt4-prod"}},
            {"name": "azure-ad", "provider": "azure", "cluster": "a", "host": "custom.example:8443", "api_key": "x",
             "api_version": "2024-06-01", "deployment": "dflt"},
            {"name": "azure-v1", "provider": "azure", "cluster": "a", "resource_name": "res1", "api_key": "x",
             "api_version": "v1", "deployments": {"gpt-4o": "gpt-4o-prod"}},
            {"name": "azure-resp", "provider": "azure", "cluster": "a", "resource_name": "res2", "api_key": "x",
             "api_version": "2025-04-01-preview", "deployment": "dep one"},
        ]});
        let mut cfg = cfg;
        // Not a valid deployment name at load; set below to show the encoding.
        cfg["targets"][4]["deployment"] = json!("dep-one");
        let mut c = config::parse(cfg.to_string().as_bytes(), &NoEnv).unwrap();
        c.targets[4].azure.as_mut().unwrap().default_deployment = Some("dep one/x".into());
        c.targets[2].credential = Credential::AzureAdToken("tok".into());
        c.targets
    }

    #[test]
    fn addresses_per_provider_and_operation() {
        let t = targets();
        let cases = [
            (
                0,
                Some(Operation::ChatCompletions),
                Some("gpt-4"),
                "/v1/chat/completions?x=1",
                "/v1/chat/completions?x=1",
                "api.openai.com",
            ),
            (
                1,
                Some(Operation::ChatCompletions),
                Some("gpt-4"),
                "/v1/chat/completions?x=1",
                "/openai/deployments/gpt4-prod/chat/completions?api-version=2024-10-21",
                "res.openai.azure.com",
            ),
            (
                1,
                Some(Operation::Completions),
                Some("gpt-4"),
                "/v1/completions",
                "/openai/deployments/gpt4-prod/completions?api-version=2024-10-21",
                "res.openai.azure.com",
            ),
            (
                1,
                Some(Operation::Embeddings),
                Some("gpt-4"),
                "/v1/embeddings",
                "/openai/deployments/gpt4-prod/embeddings?api-version=2024-10-21",
                "res.openai.azure.com",
            ),
            (
                2,
                Some(Operation::Embeddings),
                None,
                "/v1/embeddings",
                "/openai/deployments/dflt/embeddings?api-version=2024-06-01",
                "custom.example:8443",
            ),
            (
                1,
                None,
                None,
                "/v1/models",
                "/v1/models",
                "res.openai.azure.com",
            ),
            (
                0,
                Some(Operation::Responses),
                Some("o4"),
                "/v1/responses",
                "/v1/responses",
                "api.openai.com",
            ),
            (
                4,
                Some(Operation::Responses),
                None,
                "/v1/responses?x=1",
                "/openai/responses?api-version=2025-04-01-preview",
                "res2.openai.azure.com",
            ),
            (
                3,
                Some(Operation::ChatCompletions),
                Some("gpt-4o"),
                "/v1/chat/completions?x=1",
                "/openai/v1/chat/completions",
                "res1.openai.azure.com",
            ),
            (
                3,
                Some(Operation::Embeddings),
                Some("gpt-4o"),
                "/v1/embeddings",
                "/openai/v1/embeddings",
                "res1.openai.azure.com",
            ),
            (
                3,
                Some(Operation::Responses),
                Some("gpt-4o"),
                "/v1/responses",
                "/openai/v1/responses",
                "res1.openai.azure.com",
            ),
            (
                4,
                Some(Operation::ChatCompletions),
                None,
                "/v1/chat/completions",
                "/openai/deployments/dep%20one%2Fx/chat/completions?api-version=2025-04-01-preview",
                "res2.openai.azure.com",
            ),
        ];
        for (i, op, model, client, path, authority) in cases {
            let a = address(&t[i], op, model, client).unwrap();
            assert_eq!((a.path.as_str(), a.authority.as_str()), (path, authority));
        }
    }

    #[test]
    fn azure_without_a_deployment_for_the_model_is_unservable() {
        let t = targets();
        assert_eq!(
            address(
                &t[1],
                Some(Operation::ChatCompletions),
                Some("gpt-3.5"),
                "/v1/chat/completions"
            ),
            Err(Unservable::NoDeployment)
        );
        assert_eq!(
            address(
                &t[1],
                Some(Operation::ChatCompletions),
                None,
                "/v1/chat/completions"
            ),
            Err(Unservable::NoDeployment)
        );
    }

    #[test]
    fn deployments_style_versions_before_2025_03_01_have_no_responses_api() {
        let t = targets();
        let responses = |i: usize| {
            let model = Some("gpt-4o");
            address(&t[i], Some(Operation::Responses), model, "/v1/responses")
        };
        // 2024-10-21 and 2024-06-01: Azure answers 400, so the target is not sent it.
        assert_eq!(responses(1), Err(Unservable::Unsupported));
        assert_eq!(responses(2), Err(Unservable::Unsupported));
        assert!(responses(3).is_ok(), "v1");
        assert!(responses(4).is_ok(), "2025-04-01-preview");
        let version = |v: &str| crate::config::AzureSettings {
            api: crate::config::AzureApi::Deployments,
            api_version: v.to_string(),
            deployments: Default::default(),
            default_deployment: Some("d".to_string()),
        };
        let cases = [
            ("2025-03-01-preview", true),
            ("2025-02-28-preview", false),
            ("2024-12-01-preview", false),
            ("2026-01-01", true),
            ("preview", true),
            ("2025-3-1", true),
        ];
        for (v, serves) in cases {
            assert_eq!(version(v).serves_responses(), serves, "{v}");
        }
    }

    #[test]
    fn the_v1_api_has_no_legacy_completions_and_needs_a_deployment() {
        let t = targets();
        let address = |op, model| address(&t[3], Some(op), model, "/v1/completions");
        assert_eq!(
            address(Operation::Completions, Some("gpt-4o")),
            Err(Unservable::Unsupported)
        );
        assert_eq!(
            address(Operation::ChatCompletions, Some("gpt-3.5")),
            Err(Unservable::NoDeployment)
        );
    }

    #[test]
    fn the_body_names_the_deployment_where_the_api_wants_it() {
        let t = targets();
        let cases = [
            (0, Operation::Responses, Some("o4"), None),
            (1, Operation::ChatCompletions, Some("gpt-4"), None),
            (1, Operation::Responses, Some("gpt-4"), Some("gpt4-prod")),
            (
                3,
                Operation::ChatCompletions,
                Some("gpt-4o"),
                Some("gpt-4o-prod"),
            ),
            (
                3,
                Operation::Embeddings,
                Some("gpt-4o"),
                Some("gpt-4o-prod"),
            ),
        ];
        for (i, op, model, want) in cases {
            assert_eq!(body_model(&t[i], op, None, model), want, "{i} {op:?}");
        }
    }

    #[test]
    fn stored_responses_are_addressed_on_the_target_that_has_them() {
        use crate::request::operation::ResourceAction::*;
        let t = targets();
        let resource = |action| Resource {
            id: "resp_1".into(),
            action,
        };
        let cases = [
            (
                0,
                Retrieve,
                "/v1/responses/resp_1?include%5B%5D=x",
                "/v1/responses/resp_1?include%5B%5D=x",
            ),
            (
                1,
                Retrieve,
                "/v1/responses/resp_1",
                "/openai/responses/resp_1?api-version=2024-10-21",
            ),
            (
                1,
                Cancel,
                "/v1/responses/resp_1/cancel",
                "/openai/responses/resp_1/cancel?api-version=2024-10-21",
            ),
            (
                1,
                InputItems,
                "/v1/responses/resp_1/input_items?limit=2&api-version=evil",
                "/openai/responses/resp_1/input_items?limit=2&api-version=2024-10-21",
            ),
            (
                3,
                Delete,
                "/v1/responses/resp_1",
                "/openai/v1/responses/resp_1",
            ),
            (
                3,
                InputItems,
                "/v1/responses/resp_1/input_items?order=asc",
                "/openai/v1/responses/resp_1/input_items?order=asc",
            ),
        ];
        for (i, action, client, want) in cases {
            let a = resource_address(&t[i], &resource(action), client);
            assert_eq!(a.path, want, "{i} {action:?}");
            assert_eq!(a.authority, t[i].host);
        }
    }

    #[test]
    fn each_provider_gets_its_own_credential_header() {
        let t = targets();
        assert_eq!(
            credential_header(&t[0]),
            ("authorization", "Bearer sk-o".to_string())
        );
        assert_eq!(credential_header(&t[1]), ("api-key", "az-k".to_string()));
        assert_eq!(
            credential_header(&t[2]),
            ("authorization", "Bearer tok".to_string())
        );
    }
}
