//! The only place that calls `proxy_wasm::hostcalls`. Every call's error is handled here (the
//! SDK's convenience trait methods would `unwrap()` them and kill the VM).

use std::cell::OnceCell;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};

pub type Headers = Vec<(String, Vec<u8>)>;

/// The time of one host callback, created by the callback and passed down: its decisions share
/// one reading, taken from the host when the first of them needs it (most chunks of a response
/// never do).
#[derive(Default)]
pub struct Now(OnceCell<u64>);

impl Now {
    /// A callback that has read the clock already (the root's tick).
    pub fn at(ms: u64) -> Now {
        Now(OnceCell::from(ms))
    }

    /// Unix ms.
    pub fn ms(&self) -> u64 {
        *self.0.get_or_init(now_ms)
    }
}

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Unix time in ns (the timing probe build).
#[cfg(llmf_probe = "timing")]
pub fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Envoy's log level for this VM; the SDK formats every message at its own level otherwise.
pub fn envoy_log_level() -> LogLevel {
    hostcalls::get_log_level().unwrap_or(LogLevel::Info)
}

pub fn headers(map: MapType) -> Headers {
    hostcalls::get_map_bytes(map).unwrap_or_default()
}

pub fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(map, name).ok().flatten()
}

/// Sets (or with `None` removes) a header. Returns false when the host refused.
pub fn set_header(map: MapType, name: &str, value: Option<&str>) -> bool {
    hostcalls::set_map_value(map, name, value).is_ok()
}

pub fn buffer(kind: BufferType, size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    hostcalls::get_buffer(kind, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn buffer_range(kind: BufferType, start: usize, len: usize) -> Vec<u8> {
    hostcalls::get_buffer(kind, start, len)
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn replace_buffer(kind: BufferType, old_size: usize, data: &[u8]) -> bool {
    hostcalls::set_buffer(kind, 0, old_size, data).is_ok()
}

pub fn send_reply(status: u32, headers: &[(&str, &str)], body: &[u8]) -> bool {
    hostcalls::send_http_response(status, headers.to_vec(), Some(body)).is_ok()
}

pub fn dispatch(
    cluster: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<u32, Status> {
    hostcalls::dispatch_http_call(cluster, headers.to_vec(), Some(body), vec![], timeout)
}

// Probe builds (`RUSTFLAGS='--cfg llmf_probe="<what>"'`, docs/performance.md) leave out one host
// mechanism to measure what it costs; never shipped.

pub fn shared_get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    if cfg!(llmf_probe = "no_shared") {
        return (None, None);
    }
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
    if cfg!(llmf_probe = "no_shared") {
        return Ok(());
    }
    hostcalls::set_shared_data(key, Some(value), cas)
}

pub fn define(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name).ok()
}

pub fn increment(metric: Option<u32>, by: u64) {
    if cfg!(llmf_probe = "no_metrics") {
        return;
    }
    if let Some(id) = metric {
        let _ = hostcalls::increment_metric(id, by as i64);
    }
}

pub fn record(metric: Option<u32>, value: u64) {
    if cfg!(llmf_probe = "no_metrics") {
        return;
    }
    if let Some(id) = metric {
        let _ = hostcalls::record_metric(id, value);
    }
}

/// Filter state readable by access logs as `%FILTER_STATE(wasm.<name>:PLAIN)%`.
pub fn set_filter_state(name: &str, value: &str) {
    if cfg!(llmf_probe = "no_state") {
        return;
    }
    let _ = hostcalls::set_property(vec![name], Some(value.as_bytes()));
}

/// A property of the stream (`["response", "code_details"]`), or filter state set with
/// [`set_filter_state`] (`[name]`).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

/// A property as text.
pub fn property_text(path: &[&str]) -> Option<String> {
    property(path).and_then(|b| String::from_utf8(b).ok())
}

pub fn set_effective_context(context_id: u32) -> bool {
    hostcalls::set_effective_context(context_id).is_ok()
}

pub fn set_tick_period(period: Duration) {
    let _ = hostcalls::set_tick_period(period);
}

pub fn plugin_configuration() -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
        .ok()
        .flatten()
}
