//! llm-failover: an Envoy HTTP filter (proxy-wasm) that sends OpenAI requests down an ordered
//! chain of OpenAI / Azure OpenAI targets, retrying and failing over on 429, 5xx and transport
//! failures.
//!
//! Pure modules (no `proxy_wasm`, unit-tested on the host), in the order a request meets them:
//! `config` (the plugin JSON), `intake` (what a request is, who sent it: `auth`), `body` (its
//! body, read once), `plan` (its chain), `provider` and `rewrite` (each target's request),
//! `forward` (which headers go where), `judge` (how an answer ends an attempt), `chain` (the
//! failover state machine), `cooldown`, `retry_after`, `cache`, `usage`, `reply`, `duration`.
//! Glue (only built for wasm32): `filter`, one module per phase of a request.

pub mod affinity;
pub mod auth;
pub mod balance;
pub mod body;
pub mod cache;
pub mod chain;
pub mod config;
pub mod cooldown;
pub mod duration;
pub mod forward;
pub mod intake;
pub mod judge;
mod object;
pub mod operation;
pub mod plan;
pub mod provider;
pub mod reply;
pub mod retry_after;
pub mod rewrite;
pub mod spillover;
pub mod stream;
pub mod token;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod filter;

/// `s` as a JSON string (quotes and escapes), for names in errors and log lines.
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}
