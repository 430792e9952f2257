//! Inputs that property tests and fuzzing (issue 9) found to break a pure module, each kept as a
//! plain test of the behaviour it now has.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{json, Value};

use llm_failover::answer::cache::{self, Entry};
use llm_failover::config::{self, Cooldown, NoEnv};
use llm_failover::health::cooldown::{self, Attempt, Change, Ending, Rate, State};
use llm_failover::policy::chain::{Chain, Failure, FailureKind, GiveUpReason, Hop, Next, Outcome};
use llm_failover::policy::retry_after;
use llm_failover::request::auth;
use llm_failover::request::body::{Body, Keep};
use llm_failover::target::rewrite::{self, Operation};

fn error_field(config: &Value) -> String {
    match config::parse(config.to_string().as_bytes(), &NoEnv) {
        Ok(_) => "<accepted>".to_string(),
        Err(e) => e.field,
    }
}

fn openai() -> Value {
    json!({"provider": "openai", "cluster": "o", "api_key": "k"})
}

fn azure() -> Value {
    json!({"provider": "azure", "cluster": "a", "api_key": "k", "resource_name": "r",
           "api_version": "2024-10-21", "deployment": "dep"})
}

/// `inspect` skipped unknown fields without checking them, so bodies that are not JSON passed,
/// and a target's `model` / `override_params` were then silently not applied (`body_for` could
/// not parse them) and the cache key was skipped.
#[test]
fn bodies_the_rewrite_cannot_read_are_refused() {
    for body in [
        &br#"{"model":"m","x":1e400}"#[..],
        br#"{"model":"m","x":-1e400}"#,
        br#"{"model":"m","x":"\ud800"}"#,
        br#"{"model":"m","x":["\udc00\ud800"]}"#,
        b"{\"model\":\"m\",\"x\":\"\xff\"}",
        b"{\"model\":\"m\",\"\xfe\":1}",
    ] {
        for keep in [Keep::Typed, Keep::Document] {
            assert!(
                Body::parse(body.to_vec(), keep).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
    let text = br#"{"model":"m","x":{"deep":[1e300,"\u00e9",-0,18446744073709551616]}}"#;
    assert!(Body::parse(text.to_vec(), Keep::Typed).is_ok());
    let body = Body::parse(text.to_vec(), Keep::Document).unwrap();
    assert!(cache::key("", "k", Operation::ChatCompletions, &body).is_some());
    let mut t = openai();
    t["model"] = json!("gpt-4o-mini");
    let c = config::parse(json!({"targets": [t]}).to_string().as_bytes(), &NoEnv).unwrap();
    let out: Value = serde_json::from_slice(
        &rewrite::body_for(&c.targets[0], Operation::ChatCompletions, &body).unwrap(),
    )
    .unwrap();
    assert_eq!(out["model"], "gpt-4o-mini");
}

/// serde reads a struct from a JSON array too (fields in order), so `[null, [...]]` was a
/// configuration and errors named fields the operator never wrote.
#[test]
fn arrays_in_place_of_objects_are_refused_where_they_are() {
    let cases = [
        (json!([null, [openai()]]), "configuration"),
        (json!({"targets": [["x", "openai", "o"]]}), "targets[0]"),
        (
            json!({"strategy": ["fallback"], "targets": [openai()]}),
            "strategy",
        ),
        (json!({"targets": [openai()], "cache": [true]}), "cache"),
        (
            json!({"targets": [openai()], "keys": [["app", "a".repeat(64)]]}),
            "keys[0]",
        ),
    ];
    for (config, field) in cases {
        assert_eq!(error_field(&config), field, "{config}");
    }
    let mut t = openai();
    t["cooldown"] = json!([3, "10s"]);
    assert_eq!(error_field(&json!({"targets": [t]})), "targets[0].cooldown");
}

/// Credential errors always named `api_key_env`, even for a target that sets `api_key`.
#[test]
fn credential_errors_name_the_field_the_target_sets() {
    let mut t = openai();
    t["api_key"] = json!("sk with space");
    assert_eq!(error_field(&json!({"targets": [t]})), "targets[0].api_key");
    let mut t = azure();
    t["azure_ad_token_env"] = json!("TOKEN");
    assert_eq!(
        error_field(&json!({"targets": [t]})),
        "targets[0].azure_ad_token_env"
    );
}

/// A bad `deployment` was reported as `deployments["*"]`, a field the operator did not write.
#[test]
fn a_bad_deployment_shorthand_is_named_as_written() {
    let mut t = azure();
    t["deployment"] = json!("bad name");
    assert_eq!(
        error_field(&json!({"targets": [t]})),
        "targets[0].deployment"
    );
}

/// A deployment named "." or ".." was accepted, and its path (`/openai/deployments/./chat/...`)
/// is resolved by every URL parser to another path: such names are refused at load.
#[test]
fn a_dot_segment_is_no_deployment_name() {
    for name in [".", ".."] {
        let mut t = azure();
        t["deployment"] = json!(name);
        assert_eq!(
            error_field(&json!({"targets": [t]})),
            "targets[0].deployment"
        );
        let mut t = azure();
        t["deployments"] = json!({"gpt-4o": name});
        assert_eq!(
            error_field(&json!({"targets": [t]})),
            "targets[0].deployments[\"gpt-4o\"]"
        );
    }
    let mut t = azure();
    t["deployment"] = json!("...");
    assert_eq!(error_field(&json!({"targets": [t]})), "<accepted>");
}

/// An `Authorization` header shorter than "Bearer " ended the look-up before `api-key`.
#[test]
fn a_short_authorization_header_leaves_the_key_to_api_key() {
    for authorization in [&b""[..], b"  ", b"Basic", b"Bear", b"x"] {
        assert_eq!(
            auth::presented_key(Some(authorization), Some(b"gw-key")),
            Some(&b"gw-key"[..])
        );
    }
}

/// A deadline beyond `u64` milliseconds wrapped around to a few milliseconds.
#[test]
fn a_huge_deadline_is_not_cut_short() {
    let hop = Hop {
        target: 0,
        max_tries: 2,
        timeout: Duration::from_secs(10),
    };
    let deadline = Duration::from_secs(u64::MAX / 1000 + 1);
    let (_, first) = Chain::start(vec![hop], 0, deadline, Duration::ZERO, |_| false).unwrap();
    assert_eq!(first.timeout, Duration::from_secs(10));
}

/// A Retry-After next to `Duration::MAX` overflowed `delay + MIN_ATTEMPT` when the retry-wait
/// cap let it through.
#[test]
fn a_retry_after_near_the_end_of_time_gives_up_without_panicking() {
    let hop = Hop {
        target: 0,
        max_tries: 2,
        timeout: Duration::from_secs(10),
    };
    let (mut chain, _) = Chain::start(vec![hop], 0, Duration::from_secs(60), Duration::MAX, |_| {
        false
    })
    .unwrap();
    let throttled = Outcome::Failed(Failure {
        kind: FailureKind::Status(429),
        retry_after: Some(Duration::MAX),
    });
    assert_eq!(
        chain.next(&throttled, 0, |_| false).0,
        Next::GiveUp(GiveUpReason::BudgetSpent)
    );
}

/// A cooldown beyond `u64` milliseconds wrapped around instead of lasting (nearly) forever.
#[test]
fn a_huge_cooldown_saturates() {
    let policy = Cooldown {
        failure_rate: Rate::from_per_10000(0),
        min_attempts: 1,
        window: Duration::from_secs(10),
        after_transport_failures: 0,
        after_failures: 1,
        duration: Duration::from_secs(u64::MAX / 1000 + 1),
        max_duration: Duration::MAX,
    };
    let attempt = Attempt {
        started_ms: 5,
        pinned: false,
    };
    let failed = Ending::Status { wait: None };
    let (s, change) = cooldown::after_attempt(State::default(), &policy, attempt, failed, 5);
    assert!(matches!(change, Change::Cooled(..)));
    assert_eq!(s.until_ms, u64::MAX);
}

/// Lengths are stored in 16 bits: a longer content type was truncated in the length field and
/// the entry read back with part of the content type at the front of the body.
#[test]
fn an_entry_too_long_to_encode_is_not_cached_corrupted() {
    let entry = Entry {
        digest: [1; 32],
        expires_ms: 10,
        target: "t".into(),
        content_type: "x".repeat(65_536 + 3),
        body: b"{}".to_vec(),
    };
    assert_eq!(Entry::decode(&entry.encode()), None);
    let fits = Entry {
        content_type: "x".repeat(65_535),
        ..entry
    };
    assert_eq!(Entry::decode(&fits.encode()), Some(fits));
}

/// A number with too many digits for an f64 read as "no Retry-After" instead of a long wait.
#[test]
fn a_retry_after_with_hundreds_of_digits_is_the_longest_wait() {
    let digits = "9".repeat(400);
    for name in ["retry-after", "retry-after-ms"] {
        let headers = [(name, digits.as_bytes())];
        assert_eq!(
            retry_after::parse(headers.iter().copied(), 0),
            Some(Duration::from_secs(24 * 3600))
        );
    }
}
