//! `json` against serde_json on any bytes: the same texts accepted and refused, the same values
//! read, and a canonical text that reads back as itself. Input: the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_failover::json;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let ours = json::parse(data);
    let theirs = serde_json::from_slice::<Value>(data);
    match (&ours, &theirs) {
        (Ok(v), Ok(doc)) => {
            // Written out, serde_json reads the same value (a repeated key: its last value).
            let text = json::to_vec(v);
            assert_eq!(serde_json::from_slice::<Value>(&text).ok().as_ref(), Some(doc));
            // The canonical text is canonical: read and written again, it is unchanged.
            assert_eq!(json::parse(&text).map(|v| json::to_vec(&v)), Ok(text));
        }
        (Err(_), Err(_)) => {}
        // The one intended difference: serde_json (without `float_roundtrip`) refuses some
        // numbers within an ULP of f64::MAX that round to it.
        (Ok(_), Err(e)) => assert!(e.to_string().starts_with("number out of range"), "{e}"),
        (Err(e), Ok(_)) => panic!("json refused what serde_json reads: {e}"),
    }
    // What follows a value does not change how the value reads.
    let prefix = json::parse_prefix(data);
    if let Ok(v) = &prefix {
        if let Ok(whole) = &ours {
            assert_eq!(v, whole);
        }
    }
    // Scanning an object for two members reads them as building it does; a named member that
    // repeats is refused.
    let names = ["a", "b"];
    let scanned = json::scan_object_prefix(data, names);
    match &prefix {
        Ok(json::Value::Object(members)) => {
            let repeats = names
                .iter()
                .any(|n| members.iter().filter(|(k, _)| k == n).count() > 1);
            match (&scanned, repeats) {
                (Err(_), true) => {}
                (Ok(values), false) => {
                    for (n, v) in names.iter().zip(values) {
                        let built = members.iter().find(|(k, _)| k == n).map(|(_, v)| v);
                        assert_eq!(v.as_ref(), built);
                    }
                }
                (other, _) => panic!("scan {other:?}, a named member repeats: {repeats}"),
            }
        }
        _ => assert!(scanned.is_err()),
    }
});
