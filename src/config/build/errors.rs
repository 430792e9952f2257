//! serde's errors, as field paths and problems.

use super::*;

pub(super) fn invalid_json(e: &serde_json::Error) -> ConfigError {
    ConfigError::new("configuration", format!("invalid JSON ({e})"))
}

pub(super) fn from_serde(e: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let inner = e.inner();
    if !inner.is_data() {
        return invalid_json(inner);
    }
    let mut field = String::new();
    for segment in e.path().iter() {
        match segment {
            Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            Segment::Map { key } => push_member(&mut field, key),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    // serde_json appends the position; the field path says where.
    let message = inner.to_string();
    let message = message
        .rfind(" at line ")
        .and_then(|at| message.get(..at))
        .unwrap_or(&message);
    let (field, problem) = reword(field, message);
    let field = if field.is_empty() {
        "configuration".to_string()
    } else {
        field
    };
    ConfigError::new(field, problem)
}

/// `.name` for a plain field name, `["key"]` for any other key (a model name, say).
pub(super) fn push_member(field: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !key.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(key);
    } else {
        field.push('[');
        field.push_str(&quote(key));
        field.push(']');
    }
}

/// serde's message as `expected <what>, got <value>` (or `unknown field`), with the field an
/// unknown or repeated member names added to the path.
pub(super) fn reword(mut field: String, message: &str) -> (String, String) {
    // serde_path_to_error's path already ends with an unknown member...
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let known = rest
            .split_once(", expected ")
            .map(|(_, k)| format!(" (expected {k})"))
            .unwrap_or_else(|| " (this object has no fields)".to_string());
        return (field, format!("unknown field{known}"));
    }
    // ... but not yet a repeated one (always a field of the schema).
    if let Some(name) = message
        .strip_prefix("duplicate field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        push_member(&mut field, name);
        return (field, "given twice".to_string());
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            let got = got.trim_matches('`');
            let expected = expected.replace('`', "\"");
            return (field, format!("expected {expected}, got {}", quote(got)));
        }
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((got, expected)) = rest.rsplit_once(", expected ") {
                let got = unexpected(got);
                let expected = expected_text(expected, &got, prefix == "invalid value: ");
                return (field, format!("expected {expected}, got {got}"));
            }
        }
    }
    (field, message.to_string())
}

/// serde's `Unexpected` as JSON: `string "x"` -> `"x"`, `integer `5`` -> `5`, `map` -> `an object`.
pub(super) fn unexpected(text: &str) -> String {
    for prefix in ["integer ", "floating point ", "boolean "] {
        if let Some(v) = text.strip_prefix(prefix) {
            return v.trim_matches('`').to_string();
        }
    }
    if let Some(s) = text.strip_prefix("string ") {
        return s.to_string();
    }
    match text {
        "map" => "an object".to_string(),
        "sequence" => "an array".to_string(),
        "unit" | "null" => "null".to_string(),
        other => other.to_string(),
    }
}

pub(super) fn expected_text(expected: &str, got: &str, out_of_range: bool) -> String {
    let max = match expected {
        "u8" => Some(u64::from(u8::MAX)),
        "u16" => Some(u64::from(u16::MAX)),
        "u32" => Some(u64::from(u32::MAX)),
        "u64" | "usize" => Some(u64::MAX),
        _ => None,
    };
    match max {
        Some(_) if out_of_range && got.starts_with('-') => "a non-negative integer".to_string(),
        Some(max) if out_of_range => format!("an integer up to {max}"),
        Some(_) => "an integer".to_string(),
        None => match expected {
            "a sequence" => "an array".to_string(),
            "a map" => "an object".to_string(),
            "f32" | "f64" => "a number".to_string(),
            other if other.starts_with("enum ") => "a string".to_string(),
            other => other.to_string(),
        },
    }
}
