//! `json` against serde_json (what the filter used before): the same texts accepted and refused,
//! the same values read, and the canonical text serde_json writes.
//!
//! Known, intended differences:
//! - numbers keep their text: `json` writes `1e2`, `1.50` and `-0` as written where serde_json
//!   writes `100.0`, `1.5` and `-0.0` (the canonical forms below avoid such numbers);
//! - a number between `f64::MAX` and the halfway point to 2^1024 (it rounds to `f64::MAX`):
//!   `json` decides overflow exactly and reads it, serde_json (without `float_roundtrip`) decides
//!   by an inexact product and may refuse it ("number out of range").
//!
//! Each property runs proptest's default number of cases (256); set `PROPTEST_CASES` for more.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use serde_json::{json, Value};

use llm_failover::chain::Outcome;
use llm_failover::config::{self, Config, Env};
use llm_failover::json;
use llm_failover::reply::Rejection;
use llm_failover::usage::{self, Usage};

/// serde_json's reading of `text`, if it accepts it.
fn serde_parse(text: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Value>(text).ok()
}

/// JSON whose canonical text serde_json writes back unchanged: integers, binary fractions
/// (exact in `f64`), any strings, objects without repeated keys.
fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-4000i32..4000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
        any::<String>().prop_map(Value::from),
        "[\\x00-\\x20\"\\\\/a\u{7f}\u{e9}\u{1f600}]{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-d]{0,2}|.{0,3}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Pieces of a JSON text: mostly valid syntax, some of it broken, escapes of every kind
/// (lone surrogates included) and numbers near the edges of `f64`.
fn arb_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            " ",
            "\n",
            "\"",
            "\\",
            "null",
            "true",
            "false",
            "nul",
            "\"a\"",
            "\"k\":",
            "-",
            "0",
            "01",
            "1.",
            ".5",
            "1e",
            "e5",
            "+1",
            "-0",
            "1e308",
            "1e309",
            "-1.8e308",
            "1.7e308",
            "4.9e-324",
            "1e-400",
            "0e999999",
            "123456789012345678901234567890",
            "\\n",
            "\\/",
            "\\x",
            "\\u",
            "\\u00",
            "\\ud83d\\ude00",
            "\\ud800",
            "\\udc00",
            "\\ud800\\u0041",
            "\\ud800\\n",
            "\u{1}",
            "\u{7f}",
            "\u{e9}",
            "\t",
        ])
        .prop_map(str::to_string),
        "\\\\u[0-9a-fA-F]{4}",
        "-?[0-9]{1,3}(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,3})?",
    ]
}

/// Bytes that are often almost JSON: pieces glued together, with now and then an invalid
/// UTF-8 byte.
fn arb_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(arb_piece(), 0..24).prop_map(|p| p.concat().into_bytes()),
        2 => (arb_value(), prop::collection::vec((any::<prop::sample::Index>(), arb_piece()), 0..3))
            .prop_map(|(v, edits)| {
                let mut text = v.to_string().into_bytes();
                for (at, piece) in edits {
                    let at = at.index(text.len() + 1);
                    text.splice(at..at, piece.into_bytes());
                }
                text
            }),
        1 => prop::collection::vec(any::<u8>(), 0..32),
        1 => (arb_value(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(v, at, b)| {
            let mut text = v.to_string().into_bytes();
            let at = at.index(text.len() + 1);
            text.insert(at, b | 0x80);
            text
        }),
    ]
}

/// A string literal built from escapes of every kind.
fn arb_string_literal() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-z\u{e9}\u{1f600} ]{1,3}",
        prop::sample::select(vec![
            "\\\"", "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t"
        ])
        .prop_map(str::to_string),
        (0u32..0x10000).prop_map(|n| format!("\\u{n:04x}")),
        (0xd800u32..0xdc00, 0xdc00u32..0xe000)
            .prop_map(|(hi, lo)| format!("\\u{hi:04X}\\u{lo:04x}")),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|p| format!("\"{}\"", p.concat()))
}

/// `usage::from_body` as it was with serde.
fn serde_usage(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Raw {
        #[serde(default)]
        prompt_tokens: Option<u64>,
        #[serde(default)]
        completion_tokens: Option<u64>,
    }
    const NEEDLE: &[u8] = b"\"usage\"";
    let skip_ws = |s: &[u8]| -> Vec<u8> {
        s.iter()
            .skip_while(|b| b.is_ascii_whitespace())
            .copied()
            .collect()
    };
    let mut end = body.len();
    while let Some(at) = body[..end].windows(NEEDLE.len()).rposition(|w| w == NEEDLE) {
        let rest = skip_ws(&body[at + NEEDLE.len()..]);
        if let Some(rest) = rest.strip_prefix(b":") {
            let rest = skip_ws(rest);
            if rest.first() == Some(&b'{') {
                let mut it = serde_json::Deserializer::from_slice(&rest).into_iter::<Raw>();
                if let Some(Ok(raw)) = it.next() {
                    return Some(Usage {
                        prompt: raw.prompt_tokens.unwrap_or(0),
                        completion: raw.completion_tokens.unwrap_or(0),
                    });
                }
            }
        }
        end = at;
    }
    None
}

/// The content-filter check of `judge` as it was with serde.
fn serde_is_content_filter(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Option<Error>,
    }
    #[derive(serde::Deserialize)]
    struct Error {
        code: Option<Value>,
        innererror: Option<Inner>,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        code: Option<Value>,
    }
    let Ok(Body { error: Some(e) }) = serde_json::from_slice::<Body>(body) else {
        return false;
    };
    let code = e.code.as_ref().and_then(|c| c.as_str());
    let inner = e
        .innererror
        .and_then(|i| i.code)
        .and_then(|c| c.as_str().map(str::to_owned));
    code == Some("content_filter") || inner.as_deref() == Some("ResponsibleAIPolicyViolation")
}

struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

fn judge_config() -> Config {
    let c = br#"{"strategy": {"on_status_codes": [400]},
                 "targets": [{"provider": "openai", "cluster": "o", "api_key": "k"}]}"#;
    config::parse(c, &NoEnv).unwrap()
}

/// Values in the places the content-filter check and the usage reader look.
fn arb_answer_part() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => prop::sample::select(vec![
            json!("content_filter"), json!("ResponsibleAIPolicyViolation"), json!(null), json!(7),
            json!(-0.0), json!(18446744073709551615u64), json!([]), json!({}),
        ]),
        1 => arb_value(),
    ]
}

/// Error and usage objects shaped like the real ones, with arbitrary values in their places,
/// repeated or missing fields and arbitrary neighbours, as text (repeats kept).
fn arb_answer() -> impl Strategy<Value = String> {
    let field = (
        prop::sample::select(vec![
            "error",
            "code",
            "innererror",
            "usage",
            "prompt_tokens",
            "completion_tokens",
            "x",
        ]),
        arb_answer_part(),
    );
    let object = prop::collection::vec(field, 0..5).prop_map(|fields| {
        let members: Vec<String> = fields
            .into_iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", members.join(","))
    });
    object.prop_recursive(3, 16, 4, |inner| {
        (
            prop::sample::select(vec!["error", "innererror", "usage", "choices", "x"]),
            inner.clone(),
            prop::collection::vec(inner, 0..2),
            prop::sample::select(vec!["", " ", "[", "]", "{", "\"", "\"usage\":", "data: "]),
        )
            .prop_map(|(k, v, more, noise)| {
                let mut members = vec![format!("\"{k}\": {v}")];
                members.extend(
                    more.into_iter()
                        .enumerate()
                        .map(|(i, m)| format!("\"m{i}\":{m}")),
                );
                format!("{{{}}}{noise}", members.join(", "))
            })
    })
}

proptest! {
    #[test]
    fn usage_is_read_as_serde_read_it(a in arb_answer(), b in arb_answer()) {
        for body in [a.clone(), format!("data: {a}\n\ndata: {b}\n\n"), format!("{b}{a}")] {
            prop_assert_eq!(usage::from_body(body.as_bytes()), serde_usage(body.as_bytes()), "{}", body);
        }
    }

    #[test]
    fn content_filter_refusals_are_recognised_as_serde_recognised_them(a in arb_answer()) {
        let c = judge_config();
        let delivered = matches!(
            llm_failover::judge::outcome(&c, Some(400), None, a.as_bytes(), None),
            Outcome::Delivered
        );
        // serde's structs also read an array as the struct's fields in order; the schema has
        // objects only, so a body with arrays in those places is no content-filter refusal.
        if !a.contains('[') {
            prop_assert_eq!(delivered, serde_is_content_filter(a.as_bytes()), "{}", a);
        }
    }

    #[test]
    fn accepts_and_refuses_what_serde_json_does(text in arb_text()) {
        let ours = json::parse(&text);
        let theirs = serde_parse(&text);
        let near_max = serde_json::from_slice::<Value>(&text)
            .is_err_and(|e| e.to_string().starts_with("number out of range"));
        if !(ours.is_ok() && near_max) {
            prop_assert_eq!(ours.is_ok(), theirs.is_some(), "{:?}: {:?}", String::from_utf8_lossy(&text), ours);
        }
        if let (Ok(v), Some(theirs)) = (ours, theirs) {
            // Written out and read by serde_json, it is the same value (numbers as serde_json
            // reads their text, a repeated key's last value).
            prop_assert_eq!(serde_parse(&json::to_vec(&v)), Some(theirs));
        }
    }

    #[test]
    fn string_escapes_read_as_serde_json_reads_them(text in arb_string_literal()) {
        let ours = json::parse(text.as_bytes());
        let theirs = serde_parse(text.as_bytes());
        prop_assert_eq!(ours.is_ok(), theirs.is_some(), "{}", text);
        if let (Ok(v), Some(Value::String(s))) = (ours, theirs) {
            prop_assert_eq!(v, json::Value::String(s));
        }
    }

    #[test]
    fn canonical_text_is_serde_json_s(v in arb_value()) {
        let compact = serde_json::to_vec(&v).unwrap();
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        for text in [&compact, &pretty] {
            let ours = json::parse(text).unwrap();
            prop_assert_eq!(json::to_vec(&ours), compact.clone());
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them(s in any::<String>(), c in any::<char>()) {
        let s = format!("{s}{c}\u{1}\u{1f}\u{7f}\"\\/");
        let mut ours = Vec::new();
        json::write_str(&mut ours, &s);
        prop_assert_eq!(ours, serde_json::to_vec(&s).unwrap());
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value(
        first in arb_value(),
        last in arb_value(),
        other in arb_value(),
    ) {
        let text = format!(r#"{{"k": {first}, "o": {other}, "k": {last}}}"#);
        let ours = json::parse(text.as_bytes()).unwrap();
        prop_assert_eq!(ours.get("k"), Some(&json::parse(last.to_string().as_bytes()).unwrap()));
        prop_assert_eq!(json::to_vec(&ours), serde_json::to_vec(&serde_parse(text.as_bytes()).unwrap()).unwrap());
    }

    #[test]
    fn a_prefix_is_read_without_what_follows(v in arb_value(), rest in prop::collection::vec(any::<u8>(), 0..16)) {
        let mut text = serde_json::to_vec(&v).unwrap();
        if matches!(v, Value::Object(_) | Value::Array(_) | Value::String(_)) {
            text.extend_from_slice(&rest);
            let ours = json::parse_prefix(&text).unwrap();
            prop_assert_eq!(json::to_vec(&ours), serde_json::to_vec(&v).unwrap());
        }
    }
}

#[test]
fn nesting_is_limited_as_in_serde_json() {
    for depth in [1, 64, 126, 127, 128, 129, 500] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let inner = if open == "[" { "" } else { "1" };
            let text = format!("{}{inner}{}", open.repeat(depth), close.repeat(depth));
            assert_eq!(
                json::parse(text.as_bytes()).is_ok(),
                serde_parse(text.as_bytes()).is_some(),
                "depth {depth} {open}"
            );
        }
    }
}

/// Between f64::MAX and the halfway point to 2^1024 a number rounds to f64::MAX: `json` reads
/// it, serde_json may not (the one intended difference in what is accepted).
#[test]
fn numbers_that_round_to_f64_max_are_read() {
    for text in [
        "1.7976931348623158e308",
        "1.797693134862315807e308",
        "-17976931348623158e292",
    ] {
        assert!(json::parse(text.as_bytes()).is_ok(), "{text}");
        assert_eq!(text.parse::<f64>().unwrap().abs(), f64::MAX);
    }
    for text in ["1.797693134862315808e308", "-1.7976931348623159e308"] {
        assert!(json::parse(text.as_bytes()).is_err(), "{text}");
        assert!(text.parse::<f64>().unwrap().is_infinite());
    }
}

#[test]
fn numbers_at_the_edges_of_f64_agree_with_serde_json() {
    for text in [
        "1.7976931348623157e308",
        "-1.7976931348623157e308",
        "1.7976931348623159e308",
        "1.8e308",
        "179769313486231570000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "179769313486231590000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0.0000000000001e320",
        "1000e306",
        "10000e306",
        "1e-400",
        "0e400",
        "0.0e99999999999999999999",
        "18446744073709551616",
        "-9223372036854775809",
    ] {
        assert_eq!(
            json::parse(text.as_bytes()).is_ok(),
            serde_parse(text.as_bytes()).is_some(),
            "{text}"
        );
    }
}

#[test]
fn replies_are_the_bytes_serde_json_wrote() {
    for r in [
        Rejection::Unauthorized,
        Rejection::InvalidBody {
            reason: "bad \"quote\" \n and \u{1} é".into(),
        },
        Rejection::NoTarget {
            model: Some("m\\x".into()),
        },
        Rejection::NotConfigured,
    ] {
        let want = json!({"error": {"message": r.message(), "type": if r.status() >= 500 { "server_error" } else { "invalid_request_error" }, "param": null, "code": r.code()}});
        assert_eq!(r.reply().body, serde_json::to_vec(&want).unwrap());
    }
}
