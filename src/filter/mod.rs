//! proxy-wasm glue: the root context (config, metrics, timers, cache sweep) and one HTTP context
//! per request, whose journey is split by phase (see `exchange`). Decisions are made by the pure
//! modules; this layer only moves data in and out.

mod affinity;
mod callout;
mod delivery;
mod exchange;
mod failover;
mod health;
mod host;
mod http;
mod intake;
mod limits;
mod metrics;
mod request_body;
mod root;
mod routed;
mod runtime;
mod shared;
mod streamed;
mod timers;
mod tokens;
mod upstream;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(root::Root::new(id)) });
}}
