//! Token usage of an answer: the `usage` object of a chat completion, or of the final chunk of a
//! stream (`stream_options.include_usage`), or of a Responses API answer (`input_tokens` /
//! `output_tokens`, also in the stream's `response.completed` event). Only the tail of a body is
//! kept, so reading usage never buffers a response.

use serde::Deserialize;

use crate::config::object::Obj;

/// Bytes of a body's end that are kept; `usage` is among the last fields OpenAI and Azure send.
pub const TAIL: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

/// Whether an answer can carry usage at all: a whole answer and a Responses API stream
/// (`response.completed`) do; a chat or completions stream only when `stream_options.include_usage`
/// was asked, by the client or by the target's `override_params`. The chunks of a stream that
/// cannot are not copied into the filter (the per-chunk cost of a passing stream).
pub fn in_answer(stream: bool, responses: bool, include_usage: bool, overridden: bool) -> bool {
    !stream || responses || include_usage || overridden
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

/// The object at the start of `text` (what follows it is not read): the counts, each optional
/// (null or absent is 0), other fields ignored.
fn read_usage(text: &[u8]) -> Option<Usage> {
    #[derive(Deserialize)]
    struct Counts {
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        input_tokens: Option<u64>,
        output_tokens: Option<u64>,
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    let Obj(c) = Obj::<Counts>::deserialize(&mut de).ok()?;
    Some(Usage {
        prompt: c.prompt_tokens.or(c.input_tokens).unwrap_or(0),
        completion: c.completion_tokens.or(c.output_tokens).unwrap_or(0),
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

    #[test]
    fn usage_of_a_responses_api_answer_and_stream() {
        let body = br#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"total_tokens":13}}"#;
        assert_eq!(
            from_body(body),
            Some(Usage {
                prompt: 9,
                completion: 4
            })
        );
        let stream = b"event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"text\":\"hi\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"usage\":{\"input_tokens\":2,\"output_tokens\":7}}}\n\n";
        assert_eq!(
            from_body(stream),
            Some(Usage {
                prompt: 2,
                completion: 7
            })
        );
    }

    proptest::proptest! {
        #[test]
        fn usage_is_read_as_serde_json_reads_the_whole_object(
            text in "\\{( ?\"(prompt_tokens|completion_tokens|total_tokens|x)\" ?: ?(null|-?[0-9]{1,21}|1\\.5|1e3|\"7\"|\\{\\}|\\[1\\]) ?,?){0,4}\\}?[,}\\] x]{0,3}"
        ) {
            // The reference: the object built as a serde_json Value, then read.
            let reference = (|| {
                let mut de = serde_json::Deserializer::from_slice(text.as_bytes());
                let v = serde_json::Value::deserialize(&mut de).ok()?;
                let o = v.as_object()?;
                let count = |name: &str| match o.get(name) {
                    None | Some(serde_json::Value::Null) => Some(0),
                    Some(v) => v.as_u64(),
                };
                // serde refuses a repeated field; a built object keeps the last one.
                let names = ["prompt_tokens", "completion_tokens"];
                if names.iter().any(|n| text.matches(&format!("\"{n}\"")).count() > 1) {
                    return None;
                }
                Some(Usage { prompt: count("prompt_tokens")?, completion: count("completion_tokens")? })
            })();
            proptest::prop_assert_eq!(read_usage(text.as_bytes()), reference);
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

    #[test]
    fn only_a_chat_stream_without_include_usage_has_none() {
        // (stream, responses, include_usage, overridden) -> usage may come
        let cases = [
            ((false, false, false, false), true),
            ((true, false, false, false), false),
            ((true, false, true, false), true),
            ((true, false, false, true), true),
            ((true, true, false, false), true),
        ];
        for ((stream, responses, include, overridden), want) in cases {
            assert_eq!(in_answer(stream, responses, include, overridden), want);
        }
    }
}
