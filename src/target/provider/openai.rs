//! OpenAI: every request keeps the client's path and query (the filter speaks OpenAI's API).

pub fn path(client_path: &str) -> String {
    client_path.to_string()
}
