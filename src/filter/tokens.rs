//! Entra ID tokens, fetched by the root context of one worker at a time and shared by all
//! through Envoy shared data: each tick reads every `azure_ad` target's state (refreshing this
//! worker's copy, which requests read), and the worker that wins the lease fetches when a token
//! is due. Neither the client secret nor a token is ever logged.

use std::time::Duration;

use proxy_wasm::types::{BufferType, MapType};

use super::host;
use super::runtime::Runtime;
use super::shared;
use crate::config::Credential;
use crate::policy::judge;
use crate::target::token::{self, State, FETCH_TIMEOUT};

/// A token request in flight: (callout token, target).
pub type Pending = (u32, usize);

/// Takes this worker's copies of the tokens shared data already holds (a configuration change
/// that keeps the `vm_id` keeps them), so the first requests after it need not wait for a tick.
pub fn adopt(rt: &Runtime, now: u64) {
    for (i, key) in rt.token_keys.iter().enumerate() {
        if let Some(key) = key {
            let (state, _) = shared::token_state(key);
            rt.set_token(i, state.valid(now).cloned());
        }
    }
}

/// Reads every token state, updates this worker's copies and the gauges, and starts the fetches
/// that are due (when this worker wins the lease). Returns the callouts it dispatched.
pub fn tick(rt: &Runtime, pending: &[Pending], now: u64) -> Vec<Pending> {
    let mut started = Vec::new();
    for (i, t) in rt.config.targets.iter().enumerate() {
        let (Credential::Entra(source), Some(Some(key))) = (&t.credential, rt.token_keys.get(i))
        else {
            continue;
        };
        let (state, cas) = shared::token_state(key);
        rt.set_token(i, state.valid(now).cloned());
        rt.metrics.token_seconds_left(i, state.seconds_left(now));
        if !state.wants_fetch(now) || pending.iter().any(|&(_, p)| p == i) {
            continue;
        }
        // One worker fetches: the one whose compare-and-swap takes the lease.
        if !shared::set_token_state(key, &state.leased(now), cas) {
            continue;
        }
        let Some(request) = token::request(source) else {
            continue;
        };
        let length = request.body.len().to_string();
        let mut headers = vec![
            (":method", request.method),
            (":path", request.path.as_str()),
            (":authority", source.authority.as_str()),
        ];
        headers.extend(request.headers.iter().copied());
        if !request.body.is_empty() {
            headers.push(("content-length", length.as_str()));
        }
        match host::dispatch(&source.cluster, &headers, &request.body, FETCH_TIMEOUT) {
            Ok(callout) => started.push((callout, i)),
            Err(_) => {
                log::warn!(
                    "token fetch for target={} could not be dispatched (is cluster {} defined?)",
                    t.name,
                    crate::quote(&source.cluster)
                );
                failed(rt, i, now, "no dispatch");
            }
        }
    }
    started
}

/// The answer of a token request for target `i`.
pub fn answered(rt: &Runtime, i: usize, body_size: usize, now: u64) {
    let Some(t) = rt.config.targets.get(i) else {
        return;
    };
    let status = host::header(MapType::HttpCallResponseHeaders, ":status")
        .and_then(|s| judge::parse_status(&s));
    let body = host::buffer(BufferType::HttpCallResponseBody, body_size);
    if status != Some(200) {
        let why = format!(
            "status={} error={}",
            status.map_or("none".to_string(), |s| s.to_string()),
            error_code(&body)
        );
        failed(rt, i, now, &why);
        return;
    }
    match token::read_answer(&body, now) {
        Ok(token) => {
            let lifetime = Duration::from_millis(token.expires_ms.saturating_sub(now));
            log::info!(
                "token for target={} fetched: valid {}s, refreshed in {}s",
                t.name,
                lifetime.as_secs(),
                token.refresh_ms.saturating_sub(now) / 1000
            );
            rt.set_token(i, Some(token.clone()));
            rt.metrics.token_fetch(i, true);
            store(rt, i, |_| State::fetched(token.clone()));
        }
        Err(why) => failed(rt, i, now, why.as_str()),
    }
}

fn failed(rt: &Runtime, i: usize, now: u64, why: &str) {
    let Some(t) = rt.config.targets.get(i) else {
        return;
    };
    rt.metrics.token_fetch(i, false);
    let state = store(rt, i, |s| s.failed(now));
    log::warn!(
        "token fetch for target={} failed ({why}); next try in {}s{}",
        t.name,
        state.retry_at_ms.saturating_sub(now) / 1000,
        if state.valid(now).is_some() {
            ", the current token serves meanwhile"
        } else {
            ", the target is skipped until then"
        }
    );
}

/// Writes target `i`'s token state `change` makes of the current one (compare-and-swap, a few
/// tries).
fn store(rt: &Runtime, i: usize, change: impl Fn(&State) -> State) -> State {
    let mut last = State::default();
    let Some(Some(key)) = rt.token_keys.get(i) else {
        return last;
    };
    for _ in 0..4 {
        let (state, cas) = shared::token_state(key);
        last = change(&state);
        if shared::set_token_state(key, &last, cas) {
            break;
        }
    }
    last
}

/// Entra's and IMDS's error code (`invalid_client`...): no description, which may quote input.
fn error_code(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Error {
        error: Option<String>,
    }
    serde_json::from_slice::<Error>(body)
        .ok()
        .and_then(|e| e.error)
        .filter(|e| e.len() <= 64 && e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .unwrap_or_else(|| "-".to_string())
}
