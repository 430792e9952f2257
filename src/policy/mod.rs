//! Where a request goes and what happens after each attempt: its plan (`plan`, `balance`), how an
//! answer is judged (`judge`), how long a target asks us to wait (`retry_after`) and the failover
//! state machine (`chain`); the limits per gateway key and per route (`limits`).

pub mod balance;
pub mod chain;
pub mod judge;
pub mod limits;
pub mod plan;
pub mod retry_after;
