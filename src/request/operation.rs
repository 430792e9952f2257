//! The requests the filter understands, from the client's method and path: the operations it
//! rewrites and fails over, and the Responses API's stored responses (`/v1/responses/{id}...`),
//! which go to the target that created them.

/// The operations the filter rewrites and fails over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
    /// The Responses API: `POST /v1/responses`.
    Responses,
}

impl Operation {
    /// From the client's `:path` (query string allowed). Only `POST` is an operation.
    pub fn from_request(method: &str, path: &str) -> Option<Operation> {
        if method != "POST" {
            return None;
        }
        match path_only(path).strip_suffix('/').unwrap_or(path_only(path)) {
            "/v1/chat/completions" => Some(Operation::ChatCompletions),
            "/v1/completions" => Some(Operation::Completions),
            "/v1/embeddings" => Some(Operation::Embeddings),
            "/v1/responses" => Some(Operation::Responses),
            _ => None,
        }
    }

    /// The operation's path segments after `/v1/` (OpenAI) or `/openai/v1/` (Azure's v1 API).
    pub fn path(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat/completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
        }
    }

    /// The operation's OpenAI path, with `query` (without `?`) if any.
    pub fn openai_path(self, query: Option<&str>) -> String {
        match query {
            Some(q) => format!("/v1/{}?{q}", self.path()),
            None => format!("/v1/{}", self.path()),
        }
    }

    /// The name used in cache keys and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat.completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
            Operation::Responses => "responses",
        }
    }
}

/// A request on a stored response of the Responses API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The response id (letters, digits, `_` and `-`).
    pub id: String,
    pub action: ResourceAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceAction {
    /// `GET /v1/responses/{id}`
    Retrieve,
    /// `DELETE /v1/responses/{id}`
    Delete,
    /// `POST /v1/responses/{id}/cancel`
    Cancel,
    /// `GET /v1/responses/{id}/input_items`
    InputItems,
}

impl ResourceAction {
    /// The HTTP method of the request.
    pub fn method(self) -> &'static str {
        match self {
            ResourceAction::Retrieve | ResourceAction::InputItems => "GET",
            ResourceAction::Delete => "DELETE",
            ResourceAction::Cancel => "POST",
        }
    }

    /// What follows the id in the path.
    pub fn suffix(self) -> &'static str {
        match self {
            ResourceAction::Retrieve | ResourceAction::Delete => "",
            ResourceAction::Cancel => "/cancel",
            ResourceAction::InputItems => "/input_items",
        }
    }
}

impl Resource {
    pub fn from_request(method: &str, path: &str) -> Option<Resource> {
        let rest = path_only(path).strip_prefix("/v1/responses/")?;
        let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
        let action = match (method, tail) {
            ("GET", "") => ResourceAction::Retrieve,
            ("DELETE", "") => ResourceAction::Delete,
            ("POST", "cancel") => ResourceAction::Cancel,
            ("GET", "input_items") => ResourceAction::InputItems,
            _ => return None,
        };
        let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
        if id.is_empty() || id.len() > 256 || !id.bytes().all(plain) {
            return None;
        }
        Some(Resource {
            id: id.to_string(),
            action,
        })
    }
}

/// The path without its query string or fragment.
pub fn path_only(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or(path)
}

/// The query string (without `?`), if any.
pub fn query(path: &str) -> Option<&str> {
    let before_fragment = path.split('#').next().unwrap_or(path);
    before_fragment.split_once('?').map(|(_, q)| q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_recognised_by_method_and_path() {
        let cases = [
            (
                "POST",
                "/v1/chat/completions",
                Some(Operation::ChatCompletions),
            ),
            (
                "POST",
                "/v1/chat/completions?foo=bar",
                Some(Operation::ChatCompletions),
            ),
            (
                "POST",
                "/v1/chat/completions/",
                Some(Operation::ChatCompletions),
            ),
            ("POST", "/v1/completions", Some(Operation::Completions)),
            ("POST", "/v1/embeddings", Some(Operation::Embeddings)),
            ("POST", "/v1/responses", Some(Operation::Responses)),
            ("POST", "/v1/responses?x=1", Some(Operation::Responses)),
            ("GET", "/v1/chat/completions", None),
            ("GET", "/v1/responses", None),
            ("POST", "/v1/models", None),
            ("POST", "/v1/chat/completions/x", None),
            ("POST", "/V1/CHAT/COMPLETIONS", None),
        ];
        for (method, path, want) in cases {
            assert_eq!(
                Operation::from_request(method, path),
                want,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn stored_responses_are_recognised_with_their_id_and_action() {
        use ResourceAction::*;
        let cases = [
            ("GET", "/v1/responses/resp_1", Some(("resp_1", Retrieve))),
            (
                "GET",
                "/v1/responses/resp_1?include[]=x",
                Some(("resp_1", Retrieve)),
            ),
            ("DELETE", "/v1/responses/resp_1", Some(("resp_1", Delete))),
            (
                "POST",
                "/v1/responses/resp_1/cancel",
                Some(("resp_1", Cancel)),
            ),
            (
                "GET",
                "/v1/responses/resp_1/input_items?limit=2",
                Some(("resp_1", InputItems)),
            ),
            ("POST", "/v1/responses/resp_1", None),
            ("GET", "/v1/responses/resp_1/cancel", None),
            ("GET", "/v1/responses/", None),
            ("GET", "/v1/responses/a%2Fb", None),
            ("GET", "/v1/responses/../x", None),
            ("GET", "/v1/responses/resp_1/input_items/x", None),
        ];
        for (method, path, want) in cases {
            let got = Resource::from_request(method, path);
            let got = got.as_ref().map(|r| (r.id.as_str(), r.action));
            assert_eq!(got, want, "{method} {path}");
        }
    }

    #[test]
    fn query_strings() {
        assert_eq!(query("/p?a=1&b=2#f"), Some("a=1&b=2"));
        assert_eq!(query("/p#f?x"), None);
        assert_eq!(query("/p"), None);
        assert_eq!(path_only("/p?a#b"), "/p");
    }
}
