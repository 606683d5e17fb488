//! The streaming tee's meter: an incremental SSE parser over the exact bytes
//! the client receives. It reads usage (and the generated text, for
//! estimates) without holding the stream back, and can drop the usage-only
//! final chunk that tollgate asked for on the client's behalf.
//!
//! Buffers are bounded: one partial line, and (only while dropping the usage
//! chunk) one partial event.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use super::{Endpoint, Usage, UsageJson};

/// A line or event larger than this is passed through unparsed.
const MAX_BUFFERED: usize = 4 * 1024 * 1024;

pub struct SseMeter {
    endpoint: Endpoint,
    /// Drop the usage-only chunk (the client did not ask for usage).
    strip_usage_chunk: bool,
    line: Vec<u8>,
    line_overflow: bool,
    data: Vec<u8>,
    /// Bytes of the current, incomplete event not yet forwarded (strip mode only).
    pending: BytesMut,
    usage: Option<Usage>,
    /// Generated text per choice index, for estimates.
    texts: Vec<String>,
    done: bool,
    events: u64,
    unparsable_events: u64,
}

#[derive(Deserialize)]
struct ChoiceChunk<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<UsageJson>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: usize,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(default, borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ResponsesEvent<'a> {
    #[serde(default, rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    delta: Option<serde_json::Value>,
    #[serde(default)]
    response: Option<ResponseObject>,
}

#[derive(Deserialize)]
struct ResponseObject {
    #[serde(default)]
    usage: Option<UsageJson>,
}

/// What the meter learned from a whole stream.
#[derive(Debug, Default)]
pub struct StreamSummary {
    pub usage: Option<Usage>,
    pub texts: Vec<String>,
    pub done: bool,
    pub events: u64,
    pub unparsable_events: u64,
}

impl SseMeter {
    pub fn new(endpoint: Endpoint, strip_usage_chunk: bool) -> SseMeter {
        SseMeter {
            endpoint,
            strip_usage_chunk,
            line: Vec::new(),
            line_overflow: false,
            data: Vec::new(),
            pending: BytesMut::new(),
            usage: None,
            texts: Vec::new(),
            done: false,
            events: 0,
            unparsable_events: 0,
        }
    }

    /// Meters one upstream chunk and returns the bytes to forward: the chunk
    /// itself, or (when stripping) the complete events in it minus the
    /// usage-only one. Forwarding is never delayed past an event boundary.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        if !self.strip_usage_chunk {
            self.scan(&chunk, |_, _, _| {});
            return chunk;
        }
        let mut out: Vec<Bytes> = Vec::new();
        let mut emit_from = 0usize;
        let mut event_start = 0usize;
        let mut pending = std::mem::take(&mut self.pending);
        self.scan(&chunk, |end, usage_only, _| {
            if usage_only {
                if event_start > emit_from {
                    out.push(chunk.slice(emit_from..event_start));
                }
                pending.clear();
                emit_from = end;
            } else if !pending.is_empty() {
                out.push(pending.split().freeze());
            }
            event_start = end;
        });
        if event_start > emit_from {
            out.push(chunk.slice(emit_from..event_start));
        }
        pending.extend_from_slice(&chunk[event_start..]);
        if pending.len() > MAX_BUFFERED {
            // No event boundary in sight: stop holding bytes back.
            self.strip_usage_chunk = false;
            out.push(pending.split().freeze());
        }
        self.pending = pending;
        match out.len() {
            0 => Bytes::new(),
            1 => out.pop().unwrap_or_default(),
            _ => {
                let mut joined = BytesMut::with_capacity(out.iter().map(Bytes::len).sum());
                out.iter().for_each(|b| joined.extend_from_slice(b));
                joined.freeze()
            }
        }
    }

    /// Bytes still held back when the upstream ends (an unterminated last event).
    pub fn take_pending(&mut self) -> Bytes {
        self.pending.split().freeze()
    }

    /// Calls `on_event(end_offset, usage_only, _)` at each event boundary in `chunk`.
    fn scan(&mut self, chunk: &[u8], mut on_event: impl FnMut(usize, bool, ())) {
        let mut pos = 0;
        while let Some(nl) = memchr::memchr(b'\n', &chunk[pos..]) {
            let end = pos + nl + 1;
            let dispatched = if self.line.is_empty() && !self.line_overflow {
                self.on_line(&chunk[pos..pos + nl])
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&chunk[pos..pos + nl]);
                let overflow = std::mem::replace(&mut self.line_overflow, false);
                let r = if overflow { None } else { self.on_line(&line) };
                line.clear();
                self.line = line;
                r
            };
            if let Some(usage_only) = dispatched {
                on_event(end, usage_only, ());
            }
            pos = end;
        }
        let rest = &chunk[pos..];
        if self.line.len() + rest.len() > MAX_BUFFERED {
            self.line_overflow = true;
            self.line.clear();
        } else if !self.line_overflow {
            self.line.extend_from_slice(rest);
        }
    }

    /// Returns `Some(usage_only)` when the line ends an event.
    fn on_line(&mut self, line: &[u8]) -> Option<bool> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.data.is_empty() {
                return Some(false);
            }
            let data = std::mem::take(&mut self.data);
            let usage_only = self.on_event(&data);
            self.data = data;
            self.data.clear();
            return Some(usage_only);
        }
        if let Some(payload) = line.strip_prefix(b"data:") {
            let payload = payload.strip_prefix(b" ").unwrap_or(payload);
            if self.data.len() + payload.len() <= MAX_BUFFERED {
                if !self.data.is_empty() {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(payload);
            }
        }
        None
    }

    /// Meters one event's data; true when it is the usage-only chunk.
    fn on_event(&mut self, data: &[u8]) -> bool {
        self.events += 1;
        if data == b"[DONE]" {
            self.done = true;
            return false;
        }
        match self.endpoint {
            Endpoint::Responses => {
                let Ok(event) = serde_json::from_slice::<ResponsesEvent>(data) else {
                    self.unparsable_events += 1;
                    return false;
                };
                match event.kind.as_deref() {
                    Some("response.output_text.delta")
                    | Some("response.function_call_arguments.delta")
                    | Some("response.refusal.delta") => {
                        if let Some(serde_json::Value::String(text)) = &event.delta {
                            self.text_mut(0).push_str(text);
                        }
                    }
                    Some("response.completed" | "response.incomplete" | "response.failed") => {
                        let usage = event.response.and_then(|r| r.usage);
                        if let Some(u) = usage.as_ref().and_then(UsageJson::to_usage) {
                            self.usage = Some(u);
                            self.done = true;
                        }
                    }
                    _ => {}
                }
                false
            }
            _ => {
                let Ok(chunk) = serde_json::from_slice::<ChoiceChunk>(data) else {
                    self.unparsable_events += 1;
                    return false;
                };
                let choices = chunk.choices.unwrap_or_default();
                let usage = chunk.usage.as_ref().and_then(UsageJson::to_usage);
                for choice in &choices {
                    let text = self.text_mut(choice.index);
                    if let Some(t) = &choice.text {
                        text.push_str(t);
                    }
                    if let Some(delta) = &choice.delta {
                        for t in [&delta.content, &delta.refusal].into_iter().flatten() {
                            text.push_str(t);
                        }
                        for call in delta.tool_calls.iter().flatten() {
                            let f = call.function.as_ref();
                            for t in [
                                f.and_then(|f| f.name.as_ref()),
                                f.and_then(|f| f.arguments.as_ref()),
                            ]
                            .into_iter()
                            .flatten()
                            {
                                text.push_str(t);
                            }
                        }
                    }
                }
                match usage {
                    Some(u) => {
                        self.usage = Some(u);
                        choices.is_empty()
                    }
                    None => false,
                }
            }
        }
    }

    fn text_mut(&mut self, index: usize) -> &mut String {
        // Bound the index so a hostile upstream cannot make us allocate.
        let index = index.min(1023);
        if self.texts.len() <= index {
            self.texts.resize_with(index + 1, String::new);
        }
        &mut self.texts[index]
    }

    pub fn summary(&mut self) -> StreamSummary {
        StreamSummary {
            usage: self.usage,
            texts: std::mem::take(&mut self.texts),
            done: self.done,
            events: self.events,
            unparsable_events: self.unparsable_events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK1: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n";
    const CHUNK2: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n";
    const USAGE: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn run(meter: &mut SseMeter, pieces: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces {
            out.extend_from_slice(&meter.push(Bytes::copy_from_slice(p)));
        }
        out.extend_from_slice(&meter.take_pending());
        out
    }

    #[test]
    fn usage_is_read_and_stream_passes_unchanged_when_not_stripping() {
        let whole = [CHUNK1, CHUNK2, USAGE, DONE].concat();
        let mut meter = SseMeter::new(Endpoint::ChatCompletions, false);
        let out = run(&mut meter, &[whole.as_bytes()]);
        assert_eq!(out, whole.as_bytes());
        let s = meter.summary();
        assert_eq!(
            s.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((9, 2))
        );
        assert_eq!(s.texts, vec!["Hello".to_string()]);
        assert!(s.done);
    }

    #[test]
    fn usage_chunk_is_stripped_at_any_split_point() {
        let whole = [CHUNK1, CHUNK2, USAGE, DONE].concat();
        let expected = [CHUNK1, CHUNK2, DONE].concat();
        let bytes = whole.as_bytes();
        for split in 0..bytes.len() {
            for split2 in [split, (split + 7).min(bytes.len()), bytes.len()] {
                let mut meter = SseMeter::new(Endpoint::ChatCompletions, true);
                let out = run(
                    &mut meter,
                    &[&bytes[..split], &bytes[split..split2], &bytes[split2..]],
                );
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    expected,
                    "split at {split}/{split2}"
                );
                assert_eq!(meter.summary().usage.map(|u| u.prompt_tokens), Some(9));
            }
        }
    }

    #[test]
    fn whole_events_in_a_chunk_are_forwarded_at_once() {
        let mut meter = SseMeter::new(Endpoint::ChatCompletions, true);
        let out = meter.push(Bytes::from_static(CHUNK1.as_bytes()));
        assert_eq!(out, CHUNK1.as_bytes());
        // Half an event is held back until it is complete.
        let out = meter.push(Bytes::from_static(&CHUNK2.as_bytes()[..10]));
        assert!(out.is_empty());
        let out = meter.push(Bytes::from_static(&CHUNK2.as_bytes()[10..]));
        assert_eq!(out, CHUNK2.as_bytes());
    }

    #[test]
    fn crlf_events_and_multiple_choices() {
        let s = "data: {\"choices\":[{\"index\":1,\"text\":\"b\"},{\"index\":0,\"text\":\"a\"}]}\r\n\r\n";
        let mut meter = SseMeter::new(Endpoint::Completions, true);
        let out = run(&mut meter, &[s.as_bytes()]);
        assert_eq!(out, s.as_bytes());
        assert_eq!(
            meter.summary().texts,
            vec!["a".to_string(), "b".to_string()]
        );
    }

    #[test]
    fn responses_api_completed_event_carries_usage() {
        let s = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n\
                 event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":1,\"input_tokens_details\":{\"cached_tokens\":2}}}}\n\n";
        let mut meter = SseMeter::new(Endpoint::Responses, false);
        run(&mut meter, &[s.as_bytes()]);
        let sum = meter.summary();
        assert_eq!(
            sum.usage
                .map(|u| (u.prompt_tokens, u.completion_tokens, u.cached_tokens)),
            Some((5, 1, 2))
        );
        assert_eq!(sum.texts, vec!["Hi".to_string()]);
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        let mut meter = SseMeter::new(Endpoint::ChatCompletions, true);
        let out = run(&mut meter, &[b"data: {not json\n\n", CHUNK1.as_bytes()]);
        assert_eq!(out.len(), "data: {not json\n\n".len() + CHUNK1.len());
        assert_eq!(meter.summary().unparsable_events, 1);
    }
}
