//! Token usage of an answer: the `usage` object of a chat completion, or of the final chunk of a
//! stream (`stream_options.include_usage`). Only the tail of a body is kept, so reading usage
//! never buffers a response.

use crate::json;

/// Bytes of a body's end that are kept; `usage` is among the last fields OpenAI and Azure send.
pub const TAIL: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

/// Keeps the last `TAIL` bytes of a body seen chunk by chunk.
#[derive(Debug, Default)]
pub struct UsageScanner {
    tail: Vec<u8>,
}

impl UsageScanner {
    pub fn push(&mut self, chunk: &[u8]) {
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > 2 * TAIL {
            let cut = self.tail.len() - TAIL;
            self.tail.drain(..cut);
        }
    }

    pub fn finish(&self) -> Option<Usage> {
        from_body(&self.tail)
    }
}

/// The last `"usage": {...}` object in `body`, if any.
pub fn from_body(body: &[u8]) -> Option<Usage> {
    const NEEDLE: &[u8] = b"\"usage\"";
    let mut end = body.len();
    // Backwards from quote to quote: a byte compare per step (a window compare per byte is a
    // `memcmp` call each in Wasm, and this runs on every successful answer).
    while let Some(at) = rfind(body.get(..end)?, NEEDLE) {
        let rest = body.get(at + NEEDLE.len()..)?;
        let rest = skip_ws(rest);
        if let Some(rest) = rest.strip_prefix(b":") {
            let rest = skip_ws(rest);
            if rest.first() == Some(&b'{') {
                if let Some(usage) = read_usage(rest) {
                    return Some(usage);
                }
            }
        }
        end = at;
    }
    None
}

/// The object at the start of `text` (what follows it is not read) as `{"prompt_tokens": u64,
/// "completion_tokens": u64}`, both optional, other fields ignored.
fn read_usage(text: &[u8]) -> Option<Usage> {
    // Checked whole, but only the two counts are built.
    let [prompt, completion] =
        json::scan_object_prefix(text, ["prompt_tokens", "completion_tokens"]).ok()?;
    let count = |v: Option<json::Value>| match v {
        None | Some(json::Value::Null) => Some(0),
        Some(v) => v.as_u64(),
    };
    Some(Usage {
        prompt: count(prompt)?,
        completion: count(completion)?,
    })
}

/// The start of the last `needle` (which begins with a quote) in `hay`.
fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let mut end = hay.len();
    while let Some(at) = hay.get(..end)?.iter().rposition(|&b| b == b'"') {
        if hay.get(at..at + needle.len()) == Some(needle) {
            return Some(at);
        }
        end = at;
    }
    None
}

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    s.get(n..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_a_completion() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"the \"usage\" word"}}],"usage": {"prompt_tokens":12,"completion_tokens":5,"total_tokens":17},"system_fingerprint":"fp"}"#;
        assert_eq!(
            from_body(body),
            Some(Usage {
                prompt: 12,
                completion: 5
            })
        );
    }

    #[test]
    fn usage_of_a_stream_is_in_the_final_chunk() {
        let mut s = UsageScanner::default();
        s.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n");
        for _ in 0..100 {
            s.push(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"more text\"}}],\"usage\":null}\n\n",
            );
        }
        s.push(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":101}}\n\ndata: [DONE]\n\n");
        assert_eq!(
            s.finish(),
            Some(Usage {
                prompt: 3,
                completion: 101
            })
        );
    }

    /// `read_usage` as it was, with the whole value built: the reference for the scan.
    fn read_usage_built(text: &[u8]) -> Option<Usage> {
        let doc = json::parse_prefix(text).ok()?;
        if !matches!(doc, json::Value::Object(_)) {
            return None;
        }
        let [prompt, completion] = json::fields(&doc, ["prompt_tokens", "completion_tokens"])?;
        let count = |v: Option<&json::Value>| v.map_or(Some(0), json::Value::as_u64);
        Some(Usage {
            prompt: count(prompt)?,
            completion: count(completion)?,
        })
    }

    proptest::proptest! {
        #[test]
        fn usage_is_read_as_when_the_whole_object_was_built(
            text in "\\{( ?\"(prompt_tokens|completion_tokens|total_tokens|x)\" ?: ?(null|-?[0-9]{1,21}|1\\.5|1e3|\"7\"|\\{\\}|\\[1\\]) ?,?){0,4}\\}?[,}\\] x]{0,3}"
        ) {
            proptest::prop_assert_eq!(read_usage(text.as_bytes()), read_usage_built(text.as_bytes()));
        }

        #[test]
        fn rfind_is_the_last_window_that_matches(
            hay in "(\"usage\"|\"usag|usage\"|[\"usage: ]){0,12}"
        ) {
            let hay = hay.as_bytes();
            let needle = b"\"usage\"";
            let want = hay.windows(needle.len()).rposition(|w| w == needle);
            proptest::prop_assert_eq!(rfind(hay, needle), want);
        }
    }

    #[test]
    fn no_usage_means_none() {
        assert_eq!(
            from_body(b"data: {\"usage\":null}\n\ndata: [DONE]\n\n"),
            None
        );
        assert_eq!(from_body(b""), None);
        assert_eq!(from_body(b"\"usage\""), None);
        assert_eq!(from_body(b"\"usage\": {\"prompt_tokens\": \"x\"}"), None);
    }
}
