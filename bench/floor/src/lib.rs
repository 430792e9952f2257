//! The floor: the least a filter of llm-failover's design must do per request, with nothing
//! else. `make bench` runs it next to llm-failover, so what the filter costs above it is measured
//! in the same run, and what it costs below the no-op filter is what Envoy and proxy-wasm charge
//! for these host calls.
//!
//! Hard-wired to the bench's setup (clusters `openai` then `azure`, one deployment, no config,
//! no checks), but with what the product contract (SPEC.md) asks of every request: the counters
//! `requests`, `attempts` by target and status class and `fallbacks`, the response headers
//! naming the target and the attempts, and one info log line per failover. Per request, on the
//! success path:
//!
//! * request headers: read once (the path says which operation; the headers are what a
//!   failover's callout carries, with the request id) and held until the body is complete;
//! * request body: read once (the copy a failover needs, and where `model` is) and searched for
//!   `"model"` (a byte search, not a JSON check);
//! * the routed attempt addressed: cluster, credential, host, per-attempt timeout (4 writes);
//! * response: `:status` read; the target and attempts headers written (2 writes);
//! * two counters (`requests`, the attempt's target and status class).
//!
//! When the first target answers 429: its answer is held to the end and dropped (its body is
//! not read), one callout goes to the second target with the body copy, one log line, its answer
//! (headers and body read) is the local reply; two counters more for the attempts and one for the
//! failover.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(FloorRoot { counters: Counters::default() }) });
}}

#[derive(Clone, Copy, Default)]
struct Counters {
    requests: Option<u32>,
    openai_2xx: Option<u32>,
    openai_429: Option<u32>,
    azure_2xx: Option<u32>,
    fallbacks: Option<u32>,
}

fn increment(counter: Option<u32>) {
    if let Some(id) = counter {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

struct FloorRoot {
    counters: Counters,
}

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        self.counters = Counters {
            requests: counter("floor.requests"),
            openai_2xx: counter("floor.attempts.target.openai.status.2xx"),
            openai_429: counter("floor.attempts.target.openai.status.429"),
            azure_2xx: counter("floor.attempts.target.azure.status.2xx"),
            fallbacks: counter("floor.fallbacks.from.openai.to.azure"),
        };
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FloorHttp {
            counters: self.counters,
            request_id: String::new(),
            forwarded: Vec::new(),
            body: Vec::new(),
            failing_over: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct FloorHttp {
    counters: Counters,
    request_id: String,
    forwarded: Vec<(String, String)>,
    body: Vec<u8>,
    failing_over: bool,
}

const REQ: MapType = MapType::HttpRequestHeaders;

/// The routed attempt addressed: cluster, credential, host, per-attempt timeout.
fn address() {
    let _ = hostcalls::set_map_value(REQ, "x-llm-failover-cluster", Some("openai"));
    if !cfg!(feature = "native-rewrite") {
        let _ = hostcalls::set_map_value(REQ, "authorization", Some("Bearer sk-floor"));
        let _ = hostcalls::set_map_value(REQ, ":authority", Some("api.openai.com"));
    }
    let _ = hostcalls::set_map_value(REQ, "x-envoy-upstream-rq-timeout-ms", Some("10000"));
}
const RESP: MapType = MapType::HttpResponseHeaders;

impl Context for FloorHttp {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _t: usize) {
        let headers =
            hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default();
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut status = 502;
        let mut out: Vec<(&str, &str)> = Vec::new();
        for (name, value) in &headers {
            let Ok(value) = std::str::from_utf8(value) else {
                continue;
            };
            if name == ":status" {
                status = value.parse().unwrap_or(502);
            } else if !name.starts_with(':') && name != "content-length" {
                out.push((name, value));
            }
        }
        increment(self.counters.azure_2xx);
        out.push(("x-llm-failover-target", "azure"));
        out.push(("x-llm-failover-attempts", "2"));
        let _ = hostcalls::send_http_response(status, out, Some(&body));
    }
}

impl HttpContext for FloorHttp {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let headers = hostcalls::get_map_bytes(REQ).unwrap_or_default();
        for (name, value) in headers {
            if name.starts_with(':')
                || name == "authorization"
                || name == "content-length"
                || name == "x-llm-failover-cluster"
            {
                continue;
            }
            if let Ok(value) = String::from_utf8(value) {
                if name == "x-request-id" {
                    self.request_id = value.clone();
                }
                self.forwarded.push((name, value));
            }
        }
        if cfg!(feature = "no-pause") {
            address();
            increment(self.counters.requests);
            return Action::Continue;
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if cfg!(feature = "no-pause") {
            let chunk = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
            self.body.extend_from_slice(&chunk);
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let _has_model = self.body.windows(7).any(|w| w == b"\"model\"");
        address();
        increment(self.counters.requests);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let status = hostcalls::get_map_value_bytes(RESP, ":status")
            .ok()
            .flatten();
        if status.as_deref() == Some(b"429") {
            increment(self.counters.openai_429);
            self.failing_over = true;
            return Action::Pause;
        }
        increment(self.counters.openai_2xx);
        let _ = hostcalls::set_map_value(RESP, "x-llm-failover-target", Some("openai"));
        let _ = hostcalls::set_map_value(RESP, "x-llm-failover-attempts", Some("1"));
        Action::Continue
    }

    fn on_http_response_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
        if !self.failing_over {
            return Action::Continue;
        }
        if end_of_stream {
            let len = self.body.len().to_string();
            let mut headers: Vec<(&str, &str)> = vec![
                (":method", "POST"),
                (
                    ":path",
                    "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21",
                ),
                (":authority", "llmf-local.openai.azure.com"),
                ("content-length", &len),
                ("api-key", "floor-azure-key"),
            ];
            for (name, value) in &self.forwarded {
                headers.push((name, value));
            }
            increment(self.counters.fallbacks);
            let line = format!(
                "[req={}] failover from=openai to=azure after status=429",
                self.request_id
            );
            let _ = hostcalls::log(LogLevel::Info, &line);
            let _ = hostcalls::dispatch_http_call(
                "azure",
                headers,
                Some(&self.body),
                vec![],
                Duration::from_secs(10),
            );
        }
        Action::Pause
    }
}
