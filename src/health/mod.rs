//! What every worker knows about a target's health, through shared data: its circuit breaker
//! (`cooldown`) and its announced quota (`spillover`).

pub mod cooldown;
pub mod spillover;
