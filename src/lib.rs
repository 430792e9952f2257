//! llm-failover: an Envoy HTTP filter (proxy-wasm) that sends OpenAI requests down an ordered
//! chain of OpenAI / Azure OpenAI targets, retrying and failing over on 429, 5xx and transport
//! failures.
//!
//! The pure modules (no `proxy_wasm`, unit-tested on the host) follow a request's journey:
//!
//! * `config`: the plugin JSON, read and validated once into an immutable `Config`.
//! * `request`: what arrives: the operation (`operation`; `azure` for apps written for Azure
//!   OpenAI), the gateway key (`auth`, `intake`), the body, parsed once (`body`).
//! * `policy`: where it goes: the plan (`plan`, `balance`), how an answer ends an attempt
//!   (`judge`, `retry_after`), the failover state machine (`chain`) and the limits of keys and
//!   routes (`limits`).
//! * `health`: what all workers know about each target: cooldowns and spill-over.
//! * `target`: one target's request: addressing and credentials (`provider`), its body
//!   (`rewrite`), its headers (`forward`), Entra ID tokens (`token`).
//! * `answer`: what comes back: the filter's own replies, usage, the cache, Responses affinity.
//! * `streamed`: a streamed request's failover through Envoy's router.
//! * `duration`: the duration strings of the config.
//!
//! Glue (only built for wasm32): `filter`, one module per phase of a request. A request's state
//! is a `Phase` whose variants hold what that phase needs; each step returns one `#[must_use]`
//! `Turn` (the flow, a retry's wait, a dispatched callout); the clock is read by the callback
//! and passed down; a callback that finds the state in use fails closed
//! (`answer::reply::when_state_in_use`).

pub mod answer;
pub mod config;
pub mod duration;
pub mod health;
pub mod policy;
pub mod request;
pub mod streamed;
pub mod target;

#[cfg(target_arch = "wasm32")]
mod filter;

/// `s` as a JSON string (quotes and escapes), for names in errors and log lines.
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}
