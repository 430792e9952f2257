//! How a request is addressed and authenticated for each provider.
//! OpenAI: same path, `Authorization: Bearer <key>`.
//! Azure OpenAI: `/openai/deployments/<deployment>/<operation>?api-version=<v>`, `api-key: <key>`
//! (or `Authorization: Bearer <Entra ID token>`).

use url::Url;

use crate::config::{AzureSettings, Credential, Provider, Target};
use crate::rewrite::Operation;

/// Where one attempt goes on its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub path: String,
    pub authority: String,
}

/// Why a target cannot take a request at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unservable {
    /// Azure target whose `deployments` has neither the model nor `"*"`.
    NoDeployment,
}

/// Address of `op` (None: a path the filter does not rewrite) on `target`.
pub fn address(
    target: &Target,
    op: Option<Operation>,
    model: Option<&str>,
    client_path: &str,
) -> Result<Address, Unservable> {
    let path = match (target.provider, op, &target.azure) {
        (Provider::Azure, Some(op), Some(azure)) => {
            let deployment = azure
                .deployment_for(model)
                .ok_or(Unservable::NoDeployment)?;
            azure_path(azure, deployment, op).ok_or(Unservable::NoDeployment)?
        }
        // OpenAI, and paths we do not rewrite: as the client sent them.
        _ => client_path.to_string(),
    };
    Ok(Address {
        path,
        authority: target.host.clone(),
    })
}

/// `/openai/deployments/<deployment>/<operation>?api-version=<v>`, each part percent-encoded.
fn azure_path(azure: &AzureSettings, deployment: &str, op: Operation) -> Option<String> {
    let mut url = Url::parse("https://azure.invalid/").ok()?;
    url.path_segments_mut()
        .ok()?
        .clear()
        .extend(["openai", "deployments", deployment])
        .extend(op.azure_suffix().split('/'));
    url.query_pairs_mut()
        .append_pair("api-version", &azure.api_version);
    Some(url[url::Position::BeforePath..].to_string())
}

/// The header that carries the target's credential.
pub fn credential_header(target: &Target) -> (&'static str, String) {
    match (&target.credential, target.provider) {
        (Credential::ApiKey(key), Provider::Azure) => ("api-key", key.clone()),
        (Credential::ApiKey(key), Provider::OpenAi) => ("authorization", format!("Bearer {key}")),
        (Credential::AzureAdToken(token), _) => ("authorization", format!("Bearer {token}")),
    }
}

/// Credential headers a client may send; none of them ever reaches an upstream as sent.
pub const CLIENT_CREDENTIAL_HEADERS: [&str; 2] = ["authorization", "api-key"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Env};
    use serde_json::json;

    struct NoEnv;
    impl Env for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }

    fn targets() -> Vec<Target> {
        let cfg = json!({"targets": [
            {"name": "openai", "provider": "openai", "cluster": "o", "api_key": "sk-o"},
            {"name": "azure", "provider": "azure", "cluster": "a", "resource_name": "res", "api_key": "az-k",
             "api_version": "2024-10-21", "deployments": {"gpt-4": "gpt4-prod"}},
            {"name": "azure-ad", "provider": "azure", "cluster": "a", "host": "custom.example:8443", "api_key": "x",
             "api_version": "2024-06-01", "deployment": "dflt"},
        ]});
        let mut c = config::parse(cfg.to_string().as_bytes(), &NoEnv).unwrap();
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
