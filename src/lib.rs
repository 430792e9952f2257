//! llm-failover: an Envoy HTTP filter (proxy-wasm) that sends OpenAI requests down an ordered
//! chain of OpenAI / Azure OpenAI targets, retrying and failing over on 429, 5xx and transport
//! failures.
//!
//! Pure modules (no `proxy_wasm`, unit-tested on the host): `config`, `body`, `provider`,
//! `rewrite`, `judge`, `chain`, `cooldown`, `cache`, `auth`, `retry_after`, `duration`, `reply`,
//! `usage`. Glue (only built for wasm32): `filter`.

pub mod auth;
pub mod body;
pub mod cache;
pub mod chain;
pub mod config;
pub mod cooldown;
pub mod duration;
pub mod judge;
mod object;
pub mod provider;
pub mod reply;
pub mod retry_after;
pub mod rewrite;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod filter;

/// `s` as a JSON string (quotes and escapes), for names in errors and log lines.
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}
