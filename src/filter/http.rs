//! One request's HTTP context: forwards the host's callbacks to its `Exchange`.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use super::exchange::{Exchange, Flow, Turn};
use super::host::{self, Now};
use super::runtime::Runtime;
use super::timers::Timers;
use crate::answer::reply::{self, Callback, ErrorShape};
use crate::request::azure;

pub struct Http {
    exchange: Rc<RefCell<Exchange>>,
    timers: Rc<RefCell<Timers>>,
    context_id: u32,
}

impl Http {
    pub fn new(runtime: Rc<Runtime>, context_id: u32, timers: Rc<RefCell<Timers>>) -> Http {
        Http {
            exchange: Rc::new(RefCell::new(Exchange::new(runtime, context_id))),
            timers,
            context_id,
        }
    }

    /// Runs `f` on the request's state; when it is in use (not expected), the request fails
    /// closed (`state_in_use`) and `f` does not run.
    fn with<R>(&self, callback: Callback, busy: R, f: impl FnOnce(&mut Exchange) -> R) -> R {
        match self.exchange.try_borrow_mut() {
            Ok(mut ex) => f(&mut ex),
            Err(_) => {
                state_in_use(self.context_id, callback);
                busy
            }
        }
    }

    /// Carries out what a turn leaves to the request's context; the host gets its action.
    fn follow(&self, turn: Turn) -> Action {
        // A callout dispatched from this context answers to it: nothing to route.
        let Turn {
            flow,
            wait,
            callout: _,
        } = turn;
        if let Some(due) = wait {
            if let Ok(mut timers) = self.timers.try_borrow_mut() {
                timers.schedule(due, self.context_id, Rc::downgrade(&self.exchange));
            }
        }
        flow.action()
    }
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let busy = Turn::from(Flow::Hold);
        let turn = self.with(Callback::Resumed, busy, |ex| {
            ex.on_callout_response(token_id, body_size, &Now::default())
        });
        // No action to give back here: the held response was replaced by a reply, or stays held
        // for the next attempt's answer.
        self.follow(turn);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let t = probe::start();
        let a = self.with(Callback::RequestHeaders, Action::Pause, |ex| {
            ex.on_request_headers(end_of_stream, &Now::default())
        });
        probe::stop(0, t);
        a
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let t = probe::start();
        let a = self.with(Callback::RequestBody, Action::Pause, |ex| {
            ex.on_request_body(body_size, end_of_stream, &Now::default())
        });
        probe::stop(1, t);
        a
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let t = probe::start();
        let busy = Turn::from(Flow::Hold);
        let turn = self.with(Callback::ResponseHeaders, busy, |ex| {
            ex.on_response_headers(end_of_stream, &Now::default())
        });
        let action = self.follow(turn);
        probe::stop(2, t);
        action
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let t = probe::start();
        let busy = Turn::from(Flow::Hold);
        let turn = self.with(Callback::ResponseBody, busy, |ex| {
            ex.on_response_body(body_size, end_of_stream, &Now::default())
        });
        let action = self.follow(turn);
        probe::stop(3, t);
        action
    }

    fn on_log(&mut self) {
        let t = probe::start();
        self.with(Callback::Log, (), |ex| ex.on_log(&Now::default()));
        probe::stop(4, t);
    }
}

/// A host callback found the request's state in use (a re-entrant call: not expected). The
/// request fails closed with the filter's 500 (`reply::when_state_in_use`), never going on
/// unaddressed; the log line says where. The caller pauses the request.
pub(super) fn state_in_use(context_id: u32, callback: Callback) {
    let rejection = reply::when_state_in_use(callback);
    log::error!(
        "[ctx={context_id}] the request's state was in use during {callback:?}: {}",
        match &rejection {
            Some(r) => r.code(),
            None => "nothing left to answer",
        }
    );
    let Some(rejection) = rejection else { return };
    let reply = rejection.reply(request_error_shape());
    host::send_reply(
        reply.status,
        &[("content-type", "application/json")],
        &reply.body,
    );
}

/// The shape of the filter's errors for the request in the current context, from its headers
/// alone (for replies given without its state).
pub(super) fn request_error_shape() -> ErrorShape {
    let text = |name| {
        host::header(MapType::HttpRequestHeaders, name)
            .and_then(|v| String::from_utf8(v).ok())
            .unwrap_or_default()
    };
    match azure::recognise(&text(":method"), &text(":path")) {
        Some(_) => ErrorShape::Azure,
        None => ErrorShape::OpenAi,
    }
}

/// The timing probe build (`--cfg llmf_probe="timing"`, docs/performance.md): time spent in each
/// callback, logged every 20,000 requests. A no-op otherwise.
mod probe {
    #[cfg(llmf_probe = "timing")]
    thread_local! {
        static SPENT: std::cell::RefCell<([u64; 5], [u64; 5])> = const { std::cell::RefCell::new(([0; 5], [0; 5])) };
    }

    #[cfg(llmf_probe = "timing")]
    pub fn start() -> u64 {
        super::super::host::now_ns()
    }

    #[cfg(not(llmf_probe = "timing"))]
    pub fn start() -> u64 {
        0
    }

    #[cfg(llmf_probe = "timing")]
    pub fn stop(phase: usize, started: u64) {
        let spent = super::super::host::now_ns().saturating_sub(started);
        SPENT.with(|s| {
            let Ok(mut s) = s.try_borrow_mut() else { return };
            let (total, calls) = &mut *s;
            if let (Some(t), Some(c)) = (total.get_mut(phase), calls.get_mut(phase)) {
                *t += spent;
                *c += 1;
            }
            if phase == 4 && calls[4] % 20_000 == 0 {
                let per: Vec<String> = (0..5)
                    .map(|i| format!("{:.2}us x{:.2}", total[i] as f64 / 1000.0 / calls[4] as f64, calls[i] as f64 / calls[4] as f64))
                    .collect();
                log::warn!("probe timing per request (headers, body, response headers, response body, log): {}", per.join(", "));
                *total = [0; 5];
                *calls = [0; 5];
            }
        });
    }

    #[cfg(not(llmf_probe = "timing"))]
    pub fn stop(_phase: usize, _started: u64) {}
}
