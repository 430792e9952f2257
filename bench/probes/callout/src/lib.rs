//! Probe: Lua's design (bench/lua/failover.lua) in Rust proxy-wasm: body -> callout to openai ->
//! (on 429/5xx) callout to azure -> local reply. Same counters/headers as bench/floor.
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { c: Counters::default() }) });
}}

#[derive(Clone, Copy, Default)]
struct Counters {
    requests: Option<u32>,
    openai_2xx: Option<u32>,
    openai_429: Option<u32>,
    azure_2xx: Option<u32>,
    fallbacks: Option<u32>,
}
fn inc(c: Option<u32>) {
    if let Some(id) = c {
        let _ = hostcalls::increment_metric(id, 1);
    }
}
struct Root {
    c: Counters,
}
impl Context for Root {}
impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let m = |n: &str| hostcalls::define_metric(MetricType::Counter, n).ok();
        self.c = Counters {
            requests: m("floor.requests"),
            openai_2xx: m("floor.attempts.target.openai.status.2xx"),
            openai_429: m("floor.attempts.target.openai.status.429"),
            azure_2xx: m("floor.attempts.target.azure.status.2xx"),
            fallbacks: m("floor.fallbacks.from.openai.to.azure"),
        };
        true
    }
    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(H {
            c: self.c,
            body: Vec::new(),
            content_type: String::new(),
            request_id: String::new(),
            attempt: 0,
        }))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
struct H {
    c: Counters,
    body: Vec<u8>,
    content_type: String,
    request_id: String,
    attempt: u32,
}
impl H {
    fn send(&self, azure: bool) {
        let len = self.body.len().to_string();
        let (cluster, path, authority, cred) = if azure {
            (
                "azure",
                "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21",
                "llmf-local.openai.azure.com",
                ("api-key", "local-azure-mock-key"),
            )
        } else {
            (
                "openai",
                "/v1/chat/completions",
                "api.openai.com",
                ("authorization", "Bearer sk-local-openai-mock-key"),
            )
        };
        let headers = vec![
            (":method", "POST"),
            (":path", path),
            (":authority", authority),
            cred,
            ("content-type", self.content_type.as_str()),
            ("content-length", len.as_str()),
            ("x-request-id", self.request_id.as_str()),
        ];
        let _ = hostcalls::dispatch_http_call(
            cluster,
            headers,
            Some(&self.body),
            vec![],
            Duration::from_secs(10),
        );
    }
}
impl Context for H {
    fn on_http_call_response(&mut self, _t: u32, _h: usize, body_size: usize, _tr: usize) {
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .unwrap_or_default();
        let code: u32 = status.parse().unwrap_or(502);
        if self.attempt == 1 && (code == 429 || code >= 500) {
            inc(self.c.openai_429);
            inc(self.c.fallbacks);
            let _ = hostcalls::log(
                LogLevel::Info,
                &format!(
                    "[req={}] failover from=openai to=azure after status={code}",
                    self.request_id
                ),
            );
            self.attempt = 2;
            self.send(true);
            return;
        }
        inc(if self.attempt == 1 {
            self.c.openai_2xx
        } else {
            self.c.azure_2xx
        });
        let ct = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, "content-type")
            .ok()
            .flatten()
            .unwrap_or_default();
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let (t, a) = if self.attempt == 1 {
            ("openai", "1")
        } else {
            ("azure", "2")
        };
        let _ = hostcalls::send_http_response(
            code,
            vec![
                ("content-type", ct.as_str()),
                ("x-llm-failover-target", t),
                ("x-llm-failover-attempts", a),
            ],
            Some(&body),
        );
    }
}
impl HttpContext for H {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.content_type = hostcalls::get_map_value(MapType::HttpRequestHeaders, "content-type")
            .ok()
            .flatten()
            .unwrap_or_else(|| "application/json".into());
        self.request_id = hostcalls::get_map_value(MapType::HttpRequestHeaders, "x-request-id")
            .ok()
            .flatten()
            .unwrap_or_default();
        Action::Pause
    }
    fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
        if !eos {
            return Action::Pause;
        }
        self.body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        inc(self.c.requests);
        self.attempt = 1;
        self.send(false);
        Action::Pause
    }
}
