//! `envoy-side`: the Envoy side of streamed failover for a plugin configuration, as JSON (the
//! member and aggregate clusters a request's plan may name; `crate::streamed::envoy_side`), for
//! tools/envoy_side.py, which writes them into an Envoy config.
//!
//!     cargo run --quiet --bin envoy-side -- plugin.json      (or - for standard input)
//!
//! Environment variables named by the configuration need not be set: each reads as its own name
//! (the clusters do not depend on secrets).

use std::io::Read;
use std::process::ExitCode;

use llm_failover::config::{self, Env};
use llm_failover::streamed;

struct Placeholders;

impl Env for Placeholders {
    fn var(&self, name: &str) -> Option<String> {
        Some(format!("placeholder-for-{name}"))
    }
}

fn main() -> ExitCode {
    let path = std::env::args().nth(1).unwrap_or_else(|| "-".to_string());
    let mut json = Vec::new();
    let read = if path == "-" {
        std::io::stdin().read_to_end(&mut json).map(|_| ())
    } else {
        std::fs::read(&path).map(|b| json = b)
    };
    if let Err(e) = read {
        eprintln!("envoy-side: cannot read {path}: {e}");
        return ExitCode::from(2);
    }
    let config = match config::parse(&json, &Placeholders) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("envoy-side: invalid plugin configuration: {e}");
            return ExitCode::from(1);
        }
    };
    let side = streamed::envoy_side(&config);
    match serde_json::to_string_pretty(&side) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("envoy-side: {e}");
            ExitCode::from(1)
        }
    }
}
