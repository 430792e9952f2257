//! A small strict JSON reader and writer (RFC 8259), in place of serde_json: the filter only needs
//! to validate bodies, read a few fields and write canonical JSON, and serde's generic machinery
//! was most of the Wasm module's size.
//!
//! It accepts and refuses what serde_json does: UTF-8 checked, escapes checked (a lone surrogate
//! is refused), numbers checked (one that overflows an `f64` is refused), nothing but white space
//! after the value, at most 127 nested arrays/objects. A number keeps its exact text.

use std::fmt;

/// An object's members in document order; a key may repeat (the last one counts).
pub type Object = Vec<(String, Value)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Bool(bool),
    /// The number's text as written (valid JSON, in `f64` range).
    Number(String),
    String(String),
    Array(Vec<Value>),
    Object(Object),
}

impl Value {
    /// The member `key` of an object (the last one if the key repeats).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(o) => get(o, key),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A non-negative integer written without fraction or exponent, if it fits a `u64`
    /// (what serde reads as an unsigned integer).
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) if n.bytes().all(|b| b.is_ascii_digit()) => n.parse().ok(),
            _ => None,
        }
    }
}

/// The last member named `key`.
pub fn get<'a>(object: &'a [(String, Value)], key: &str) -> Option<&'a Value> {
    object.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// The named members of an object, as serde reads them into a struct's optional fields: a null
/// member is absent, a null object has none. `None` if `v` is neither an object nor null, or a
/// named member repeats.
pub fn fields<'a, const N: usize>(
    v: &'a Value,
    names: [&str; N],
) -> Option<[Option<&'a Value>; N]> {
    let mut out = [None; N];
    fields_into(v, &names, &mut out).then_some(out)
}

fn fields_into<'a>(v: &'a Value, names: &[&str], out: &mut [Option<&'a Value>]) -> bool {
    let object = match v {
        Value::Null => return true,
        Value::Object(o) => o,
        _ => return false,
    };
    // `names` has at most 64 entries.
    let mut seen = 0u64;
    for (k, v) in object {
        if let Some(i) = names.iter().position(|n| n == k) {
            let (bit, Some(slot)) = (1u64 << (i % 64), out.get_mut(i)) else {
                return false;
            };
            if seen & bit != 0 {
                return false;
            }
            seen |= bit;
            *slot = Some(v).filter(|v| **v != Value::Null);
        }
    }
    true
}

/// Why a text is not JSON, with the byte offset where that was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub problem: &'static str,
    pub offset: usize,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.problem, self.offset)
    }
}

/// Nesting serde_json allows: 127 arrays/objects deep.
const MAX_DEPTH: u32 = 128;

/// `text` as one JSON value (white space around it allowed).
pub fn parse(text: &[u8]) -> Result<Value, Error> {
    let mut p = Parser { b: text, i: 0 };
    let v = p.value(MAX_DEPTH, true)?;
    p.end()?;
    Ok(v.unwrap_or(Value::Null))
}

/// The first JSON value in `text` (leading white space skipped); what follows it is not read.
pub fn parse_prefix(text: &[u8]) -> Result<Value, Error> {
    let mut p = Parser { b: text, i: 0 };
    Ok(p.value(MAX_DEPTH, true)?.unwrap_or(Value::Null))
}

/// Checks that `text` is one JSON object and returns the values of the named top-level members,
/// without building the rest of the document. A named member that repeats is an error.
pub fn scan_object<const N: usize>(
    text: &[u8],
    names: [&str; N],
) -> Result<[Option<Value>; N], Error> {
    scan(text, names, true)
}

/// `scan_object` of the first JSON value in `text`: what follows it is not read.
pub fn scan_object_prefix<const N: usize>(
    text: &[u8],
    names: [&str; N],
) -> Result<[Option<Value>; N], Error> {
    scan(text, names, false)
}

fn scan<const N: usize>(
    text: &[u8],
    names: [&str; N],
    whole: bool,
) -> Result<[Option<Value>; N], Error> {
    let mut out: [Option<Value>; N] = std::array::from_fn(|_| None);
    let mut p = Parser { b: text, i: 0 };
    p.ws();
    if p.peek() != Some(b'{') {
        return Err(p.err("expected an object"));
    }
    p.i += 1;
    let mut key = String::new();
    p.members(&mut |p, key_start| {
        key.clear();
        p.string_body(Some(&mut key))?;
        p.colon()?;
        match names.iter().position(|n| *n == key) {
            Some(at) => {
                let slot = out.get_mut(at).ok_or_else(|| p.err("internal"))?;
                if slot.is_some() {
                    return Err(Error {
                        problem: "duplicate field",
                        offset: key_start,
                    });
                }
                *slot = p.value(MAX_DEPTH - 1, true)?;
            }
            None => {
                p.value(MAX_DEPTH - 1, false)?;
            }
        }
        Ok(())
    })?;
    if whole {
        p.end()?;
    }
    Ok(out)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn err(&self, problem: &'static str) -> Error {
        Error {
            problem,
            offset: self.i,
        }
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn end(&mut self) -> Result<(), Error> {
        self.ws();
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.err("trailing characters")),
        }
    }

    fn colon(&mut self) -> Result<(), Error> {
        self.ws();
        if self.peek() != Some(b':') {
            return Err(self.err("expected ':'"));
        }
        self.i += 1;
        Ok(())
    }

    /// A value; built only when `keep` (else `None` after checking it).
    fn value(&mut self, depth: u32, keep: bool) -> Result<Option<Value>, Error> {
        self.ws();
        let Some(c) = self.peek() else {
            return Err(self.err("unexpected end of input"));
        };
        let v = match c {
            b'n' => self.literal(b"null", Value::Null)?,
            b't' => self.literal(b"true", Value::Bool(true))?,
            b'f' => self.literal(b"false", Value::Bool(false))?,
            b'"' => {
                self.i += 1;
                if keep {
                    let mut s = String::new();
                    self.string_body(Some(&mut s))?;
                    Value::String(s)
                } else {
                    self.string_body(None)?;
                    Value::Null
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                self.number()?;
                match keep {
                    true => Value::Number(self.text(start)),
                    false => Value::Null,
                }
            }
            b'[' | b'{' => {
                let depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Err(self.err("recursion limit exceeded"));
                }
                self.i += 1;
                if c == b'[' {
                    let mut items = Vec::new();
                    self.elements(&mut |p| {
                        // `None` when not kept.
                        items.extend(p.value(depth, keep)?);
                        Ok(())
                    })?;
                    Value::Array(items)
                } else {
                    let mut members = Vec::new();
                    self.members(&mut |p, _| {
                        let mut key = String::new();
                        p.string_body(keep.then_some(&mut key))?;
                        p.colon()?;
                        if let Some(v) = p.value(depth, keep)? {
                            members.push((key, v));
                        }
                        Ok(())
                    })?;
                    Value::Object(members)
                }
            }
            _ => return Err(self.err("expected a value")),
        };
        Ok(keep.then_some(v))
    }

    fn text(&self, start: usize) -> String {
        let text = self.b.get(start..self.i).unwrap_or_default();
        text.iter().map(|b| char::from(*b)).collect()
    }

    fn literal(&mut self, word: &[u8], v: Value) -> Result<Value, Error> {
        if self.b.get(self.i..self.i + word.len()) != Some(word) {
            return Err(self.err("expected a value"));
        }
        self.i += word.len();
        Ok(v)
    }

    /// After `[`: the elements and the closing `]`.
    fn elements(
        &mut self,
        each: &mut dyn FnMut(&mut Self) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            each(self)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    /// After `{`: the members and the closing `}`. `each` is called after a key's opening quote
    /// (with the quote's offset) and reads the key, the colon and the value.
    fn members(
        &mut self,
        each: &mut dyn FnMut(&mut Self, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a key"));
            }
            let at = self.i;
            self.i += 1;
            each(self, at)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    /// After the opening quote: the string's contents (appended to `out` if given) and the
    /// closing quote.
    fn string_body(&mut self, mut out: Option<&mut String>) -> Result<(), Error> {
        loop {
            let start = self.i;
            while matches!(self.peek(), Some(c) if c != b'"' && c != b'\\' && c >= 0x20) {
                self.i += 1;
            }
            let run = self.b.get(start..self.i).unwrap_or_default();
            let run = std::str::from_utf8(run).map_err(|e| Error {
                problem: "invalid UTF-8 in a string",
                offset: start + e.valid_up_to(),
            })?;
            if let Some(out) = out.as_deref_mut() {
                out.push_str(run);
            }
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self.escape()?;
                    if let Some(out) = out.as_deref_mut() {
                        out.push(c);
                    }
                }
                Some(_) => return Err(self.err("control character in a string")),
                None => return Err(self.err("unterminated string")),
            }
        }
    }

    /// After a backslash.
    fn escape(&mut self) -> Result<char, Error> {
        let c = match self.peek() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.i += 1;
                let n = self.hex4()?;
                let code = match n {
                    0xDC00..=0xDFFF => return Err(self.err("lone surrogate in a \\u escape")),
                    0xD800..=0xDBFF => {
                        if self.b.get(self.i..self.i + 2) != Some(b"\\u") {
                            return Err(self.err("lone surrogate in a \\u escape"));
                        }
                        self.i += 2;
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return Err(self.err("lone surrogate in a \\u escape"));
                        }
                        0x1_0000 + ((n - 0xD800) << 10) + (low - 0xDC00)
                    }
                    _ => n,
                };
                return char::from_u32(code).ok_or_else(|| self.err("invalid \\u escape"));
            }
            _ => return Err(self.err("invalid escape")),
        };
        self.i += 1;
        Ok(c)
    }

    fn hex4(&mut self) -> Result<u32, Error> {
        let mut n = 0;
        for _ in 0..4 {
            let d = self
                .peek()
                .and_then(|c| (c as char).to_digit(16))
                .ok_or_else(|| self.err("invalid \\u escape"))?;
            n = n * 16 + d;
            self.i += 1;
        }
        Ok(n)
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, in `f64` range.
    fn number(&mut self) -> Result<(), Error> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        match self.digits() {
            0 => return Err(self.err("invalid number")),
            1 => {}
            _ if self.b.get(int_start) == Some(&b'0') => {
                return Err(Error {
                    problem: "invalid number",
                    offset: int_start + 1,
                })
            }
            _ => {}
        }
        let int = self.b.get(int_start..self.i).unwrap_or_default();
        let mut frac: &[u8] = &[];
        if self.peek() == Some(b'.') {
            self.i += 1;
            let frac_start = self.i;
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
            frac = self.b.get(frac_start..self.i).unwrap_or_default();
        }
        let mut exp: i64 = 0;
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            let negative = match self.peek() {
                Some(b'-') => {
                    self.i += 1;
                    true
                }
                Some(b'+') => {
                    self.i += 1;
                    false
                }
                _ => false,
            };
            let exp_start = self.i;
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
            for d in self.b.get(exp_start..self.i).unwrap_or_default() {
                exp = (exp * 10 + i64::from(d - b'0')).min(1 << 40);
            }
            if negative {
                exp = -exp;
            }
        }
        if overflows_f64(int, frac, exp) {
            return Err(Error {
                problem: "number out of range",
                offset: start,
            });
        }
        Ok(())
    }
}

/// Whether `int.frac × 10^exp` rounds to infinity as an `f64`.
fn overflows_f64(int: &[u8], frac: &[u8], exp: i64) -> bool {
    // 2^1024 - 2^970: halfway between f64::MAX and 2^1024; it and anything above round up.
    const LIMIT: &[u8] = b"179769313486231580793728971405303415079934132710037826936173778980444968292764750946649017977587207096330286416692887910946555547851940402630657488671505820681908902000708383676273854845817711531764475730270069855571366959622842914819860834936475292719074168444365510704342711559699508093042880177904174497792";
    if (int.len() as i64).saturating_add(exp) < LIMIT.len() as i64 {
        return false;
    }
    let digits = || int.iter().chain(frac);
    let Some(first) = digits().position(|d| *d != b'0') else {
        return false;
    };
    // value = 0.D × 10^scale, D the digits from the first non-zero one
    let scale = int.len() as i64 - first as i64 + exp;
    match scale.cmp(&(LIMIT.len() as i64)) {
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Greater => true,
        // Digit by digit; D a proper prefix of LIMIT is below it, anything else is not.
        std::cmp::Ordering::Equal => digits().skip(first).cmp(LIMIT) != std::cmp::Ordering::Less,
    }
}

/// Canonical JSON: no white space, object keys sorted (a repeated key: its last value),
/// strings escaped as serde_json does, numbers as written.
pub fn to_vec(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(&mut out, v);
    out
}

pub fn to_string(v: &Value) -> String {
    String::from_utf8(to_vec(v)).unwrap_or_default()
}

/// `object`'s members sorted by key, the last of each repeated key only.
pub fn canonical_members(object: &[(String, Value)]) -> Vec<&(String, Value)> {
    let members: Vec<&(String, Value)> = object.iter().collect();
    let mut out: Vec<&(String, Value)> = Vec::with_capacity(members.len());
    // Stable: equal keys keep document order, so the last of a run is the one that counts.
    for m in merge_sort(members) {
        match out.last_mut() {
            Some(last) if last.0 == m.0 => *last = m,
            _ => out.push(m),
        }
    }
    out
}

/// A stable sort by key (bottom-up merge sort): smaller in Wasm than the standard library's.
fn merge_sort(mut items: Vec<&(String, Value)>) -> Vec<&(String, Value)> {
    let n = items.len();
    let mut buf: Vec<&(String, Value)> = Vec::with_capacity(n);
    let mut width = 1;
    while width < n {
        buf.clear();
        let mut start = 0;
        while start < n {
            let mid = (start + width).min(n);
            let end = (start + 2 * width).min(n);
            let (mut i, mut j) = (start, mid);
            while i < mid || j < end {
                let take_left = match (items.get(i), items.get(j)) {
                    (Some(a), Some(b)) if j < end && i < mid => a.0 <= b.0,
                    _ => i < mid,
                };
                let next = if take_left { i } else { j };
                if let Some(m) = items.get(next) {
                    buf.push(m);
                }
                if take_left {
                    i += 1;
                } else {
                    j += 1;
                }
            }
            start = end;
        }
        std::mem::swap(&mut items, &mut buf);
        width *= 2;
    }
    items
}

/// `v` with every object's members sorted by key and a repeated key's last value only.
pub fn into_canonical(v: Value) -> Value {
    // The canonical text read back (it is always valid JSON).
    parse(&to_vec(&v)).unwrap_or(v)
}

fn write(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.as_bytes()),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(out, item);
            }
            out.push(b']');
        }
        Value::Object(o) => {
            out.push(b'{');
            for (i, (k, v)) in canonical_members(o).into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                write(out, v);
            }
            out.push(b'}');
        }
    }
}

/// `s` as a JSON string literal: how messages and logs quote names and values (control
/// characters escaped, so a value cannot break a log line).
pub fn quote(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    write_str(&mut out, s);
    String::from_utf8(out).unwrap_or_default()
}

/// A JSON string literal for `s`, escaped as serde_json escapes it.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses_like_serde_json() {
        for ok in [
            &b" {\"a\": [1, -0, 0.5e-3, 1E+2, true, false, null, \"\\u00e9\\ud83d\\ude00\"]} "[..],
            b"1.7976931348623157e308",
            b"-1e-400",
            b"0e999999999999999999",
            b"\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"",
        ] {
            assert!(parse(ok).is_ok(), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b""[..],
            b"01",
            b"1.",
            b".5",
            b"-",
            b"1e",
            b"+1",
            b"1e400",
            b"-2e308",
            b"1.7976931348623159e308",
            b"\"\\ud800\"",
            b"\"\\udc00\"",
            b"\"\\ud800\\u0041\"",
            b"\"\\x\"",
            b"\"a\nb\"",
            b"\"\xff\"",
            b"[1,]",
            b"{\"a\":1,}",
            b"{\"a\" 1}",
            b"{1:2}",
            b"nul",
            b"[1] x",
            b"\"abc",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(parse(deep(127).as_bytes()).is_ok());
        assert!(parse(deep(128).as_bytes()).is_err());
    }

    #[test]
    fn writes_canonical_json() {
        let v = parse(br#"{"b": [1.50, "x\u0001\n"], "a": {"z": 1, "y": 2, "z": 3}}"#).unwrap();
        assert_eq!(
            to_string(&v),
            r#"{"a":{"y":2,"z":3},"b":[1.50,"x\u0001\n"]}"#
        );
    }

    #[test]
    fn scans_named_members_and_refuses_repeats() {
        let [m, s] = scan_object(
            br#"{"x": [1, {"model": 2}], "model": "m"}"#,
            ["model", "stream"],
        )
        .unwrap();
        assert_eq!(m, Some(Value::String("m".into())));
        assert_eq!(s, None);
        assert!(scan_object(br#"{"model": 1, "model": 1}"#, ["model"]).is_err());
        assert!(scan_object(br#"[1]"#, ["model"]).is_err());
    }
}
