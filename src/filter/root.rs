//! Root context: parses the config once, defines metrics, and drives timers (delayed retries) and
//! the sweeps of expired cache and affinity slots from its tick.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use super::exchange::{Exchange, Turn};
use super::host::{self, Now};
use super::http::{self, Http};
use super::runtime::Runtime;
use super::shared;
use super::timers::Timers;
use super::tokens;
use super::upstream::Attempt;
use crate::answer::affinity;
use crate::answer::reply::{Callback, Rejection};
use crate::config::{self, Credential, Plugin, ProcessEnv};

/// How often a chunk of the cache and affinity slots is swept.
const SWEEP_EVERY_MS: u64 = 1000;
const SWEEP_CHUNK: u32 = 4096;

thread_local! {
    /// The filter configurations of this VM (root context id, runtime): the upstream filter of
    /// the streamed-failover clusters, another root context of the same VM, works from them.
    static FILTERS: RefCell<Vec<(u32, Weak<Runtime>)>> = const { RefCell::new(Vec::new()) };
}

/// The runtime of the filter whose root context is `root`, if it lives in this VM.
pub fn runtime_of(root: u32) -> Option<Rc<Runtime>> {
    FILTERS.with(|f| {
        let filters = f.try_borrow().ok()?;
        filters
            .iter()
            .find(|(id, _)| *id == root)
            .and_then(|(_, rt)| rt.upgrade())
    })
}

fn register(root: u32, runtime: &Rc<Runtime>) {
    FILTERS.with(|f| {
        if let Ok(mut filters) = f.try_borrow_mut() {
            filters.retain(|(id, rt)| *id != root && rt.strong_count() > 0);
            filters.push((root, Rc::downgrade(runtime)));
        }
    });
}

pub struct Root {
    id: u32,
    /// The upstream filter of the streamed-failover clusters (`{"role": "upstream"}`).
    upstream: bool,
    runtime: Option<Rc<Runtime>>,
    timers: Rc<RefCell<Timers>>,
    /// Callout token -> the request it belongs to, for callouts dispatched from the tick (a few
    /// entries at most: retries whose wait ended in the last tick).
    callouts: Vec<(u32, u32, Weak<RefCell<Exchange>>)>,
    /// Entra ID token requests in flight (callout token, target).
    token_callouts: Vec<tokens::Pending>,
    /// When the last sweep ran (Unix ms).
    swept_ms: u64,
    /// One per cache: the top-level one first (if any), then the routes' in order.
    cache_sweeps: Vec<Sweep>,
    affinity_sweep: Sweep,
}

/// Where a sweep of `0..slots` goes on next.
#[derive(Default)]
struct Sweep {
    next: u32,
}

impl Sweep {
    fn next(&mut self, slots: u32) -> std::ops::Range<u32> {
        let start = self.next.min(slots);
        let end = start.saturating_add(SWEEP_CHUNK).min(slots);
        self.next = if end >= slots { 0 } else { end };
        start..end
    }
}

impl Root {
    pub fn new(id: u32) -> Root {
        Root {
            id,
            upstream: false,
            runtime: None,
            timers: Rc::new(RefCell::new(Timers::default())),
            callouts: Vec::new(),
            token_callouts: Vec::new(),
            swept_ms: 0,
            cache_sweeps: Vec::new(),
            affinity_sweep: Sweep::default(),
        }
    }

    fn fire_due_timers(&mut self, now: u64) {
        let due = match self.timers.try_borrow_mut() {
            Ok(mut timers) => timers.take_due(now),
            Err(_) => return,
        };
        for (context_id, exchange) in due {
            if !host::set_effective_context(context_id) {
                continue;
            }
            let Ok(mut ex) = exchange.try_borrow_mut() else {
                http::state_in_use(context_id, Callback::Resumed);
                continue;
            };
            let turn = ex.fire_retry(&Now::at(now));
            self.follow(context_id, &Rc::downgrade(&exchange), turn);
        }
    }

    /// Records what a turn of an exchange taken from the root leaves to it: a callout to route
    /// back, a new timer. There is no action to give: the held response was replaced by a
    /// reply, or stays held for the next attempt's answer.
    fn follow(&mut self, context_id: u32, weak: &Weak<RefCell<Exchange>>, turn: Turn) {
        let Turn {
            flow: _,
            wait,
            callout,
        } = turn;
        if let Some(token) = callout {
            self.callouts.push((token, context_id, weak.clone()));
        }
        if let Some(due) = wait {
            if let Ok(mut timers) = self.timers.try_borrow_mut() {
                timers.schedule(due, context_id, weak.clone());
            }
        }
    }

    /// Empties a chunk of expired cache and affinity slots (shared data keeps entries forever).
    fn sweep(&mut self, now: u64) {
        let Some(rt) = self.runtime.clone() else {
            return;
        };
        let caches = rt.config.cache.iter();
        let caches = caches.chain(rt.config.routes.iter().filter_map(|r| r.cache.as_ref()));
        for (cache, sweep) in caches.zip(self.cache_sweeps.iter_mut()) {
            shared::cache_sweep(&cache.scope, sweep.next(cache.max_entries), now);
        }
        let sets = affinity::sets(rt.config.responses.max_affinity_entries);
        shared::affinity_sweep(self.affinity_sweep.next(sets), now);
    }
}

/// Answers every request with 503 when there is no valid configuration.
struct Unconfigured;

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let reply = Rejection::NotConfigured.reply(http::request_error_shape());
        host::send_reply(
            reply.status,
            &[("content-type", "application/json")],
            &reply.body,
        );
        Action::Pause
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some(i) = self.token_callouts.iter().position(|&(t, _)| t == token_id) {
            let (_, target) = self.token_callouts.swap_remove(i);
            if let Some(rt) = &self.runtime {
                tokens::answered(rt, target, body_size, host::now_ms());
            }
            return;
        }
        let at = self.callouts.iter().position(|(t, _, _)| *t == token_id);
        let Some((_, context_id, weak)) = at.map(|i| self.callouts.swap_remove(i)) else {
            log::debug!("root: callout {token_id} answered for no known request");
            return;
        };
        let Some(exchange) = weak.upgrade() else {
            return;
        };
        if !host::set_effective_context(context_id) {
            return;
        }
        let Ok(mut ex) = exchange.try_borrow_mut() else {
            http::state_in_use(context_id, Callback::Resumed);
            return;
        };
        let turn = ex.on_callout_response(token_id, body_size, &Now::default());
        self.follow(context_id, &weak, turn);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        proxy_wasm::set_log_level(host::envoy_log_level());
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        proxy_wasm::set_log_level(host::envoy_log_level());
        let raw = host::plugin_configuration().unwrap_or_default();
        match config::parse_plugin(&raw, &ProcessEnv) {
            Ok(Plugin::Upstream) => {
                log::info!("configured as the upstream filter of the streamed-failover clusters");
                self.upstream = true;
                true
            }
            Ok(Plugin::Filter(config)) => {
                let chain: Vec<String> = config
                    .targets
                    .iter()
                    .map(|t| {
                        format!(
                            "{} ({} via cluster {})",
                            t.name,
                            t.provider.as_str(),
                            t.cluster
                        )
                    })
                    .collect();
                let chain = chain.join(" -> ");
                log::info!("configured {} target(s): {chain}", config.targets.len());
                for warning in config.warnings() {
                    log::warn!("{warning}");
                }
                let caches = usize::from(config.cache.is_some())
                    + config.routes.iter().filter(|r| r.cache.is_some()).count();
                self.cache_sweeps = (0..caches).map(|_| Sweep::default()).collect();
                let entra = config
                    .targets
                    .iter()
                    .any(|t| matches!(t.credential, Credential::Entra(_)));
                let runtime = Rc::new(Runtime::new(*config, self.id));
                tokens::adopt(&runtime, host::now_ms());
                register(self.id, &runtime);
                self.runtime = Some(runtime);
                if let Ok(mut timers) = self.timers.try_borrow_mut() {
                    timers.start(entra);
                }
                true
            }
            Err(e) => {
                log::error!("invalid configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let now = host::now_ms();
        if let Some(rt) = self.runtime.clone() {
            let started = tokens::tick(&rt, &self.token_callouts, now);
            self.token_callouts.extend(started);
        }
        self.fire_due_timers(now);
        if now.saturating_sub(self.swept_ms) >= SWEEP_EVERY_MS {
            self.swept_ms = now;
            self.sweep(now);
        }
        if let Ok(mut timers) = self.timers.try_borrow_mut() {
            timers.settle();
        }
        // Callouts whose request is gone (client disconnected) are forgotten.
        self.callouts.retain(|(_, _, weak)| weak.strong_count() > 0);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.upstream {
            return Some(Box::new(Attempt::new(context_id)));
        }
        match self.runtime.clone() {
            Some(runtime) => Some(Box::new(Http::new(
                runtime,
                context_id,
                self.timers.clone(),
            ))),
            // Envoy refuses a filter whose configure failed, so this is not expected; the SDK
            // would panic on `None`, so answer instead.
            None => Some(Box::new(Unconfigured)),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
