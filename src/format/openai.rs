//! OpenAI's wire formats as they stream (chat and text completions, and
//! the Responses API; Azure and every OpenAI-compatible API send the same):
//! usage, the served model and tier, tool calls and generated text from
//! each SSE event. Non-streaming bodies are read by `read`. And the facts
//! of its request bodies (`request_facts`).

use std::borrow::Cow;

use serde::Deserialize;

use super::request::{self, OutputLimit, RequestFacts, StreamOptions};
use crate::error::ApiError;
use crate::usage::read::{facts_from_value, Counts};
use crate::usage::sse::StreamFacts;
use crate::usage::{Endpoint, Usage};

#[derive(Deserialize)]
struct ChoiceChunk<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<Counts>,
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    service_tier: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: usize,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
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
    response: Option<serde_json::Value>,
    #[serde(default, borrow)]
    item: Option<ItemRef<'a>>,
}

#[derive(Deserialize)]
struct ItemRef<'a> {
    #[serde(default, rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
}

/// One Responses API event.
pub(crate) fn on_responses_event(facts: &mut StreamFacts, data: &[u8]) -> bool {
    let Ok(event) = serde_json::from_slice::<ResponsesEvent>(data) else {
        facts.unparsable_events += 1;
        return false;
    };
    match event.kind.as_deref() {
        Some("response.output_text.delta") | Some("response.refusal.delta") => {
            if let Some(serde_json::Value::String(text)) = &event.delta {
                facts.push_text(0, text);
            }
        }
        Some("response.function_call_arguments.delta") => {
            if let Some(serde_json::Value::String(text)) = &event.delta {
                facts.push_tool_text(0, text);
            }
        }
        // A tool call finished: counted now, in case the stream
        // is cut before its `response.completed`.
        Some("response.output_item.done") => {
            if let Some(kind) = event.item.as_ref().and_then(|i| i.kind.as_deref()) {
                facts.served.tool_calls.count_item(kind);
            }
        }
        Some("response.completed" | "response.incomplete" | "response.failed") => {
            if let Some(response) = &event.response {
                let read = facts_from_value(response);
                facts.see(read.served);
                if let Some(u) = read.usage {
                    facts.usage = Some(u);
                    facts.done = true;
                }
            }
        }
        // `response.created` and friends say the model, the tier and the
        // response's id early.
        _ => {
            if let Some(response) = &event.response {
                if facts.response_id.is_none() {
                    if let Some(id) = response.get("id").and_then(serde_json::Value::as_str) {
                        facts.response_id = Some(crate::usage::bounded_model(id).to_string());
                    }
                }
                let read = facts_from_value(response);
                facts.see(read.served);
            }
        }
    }
    false
}

/// One chat or text completion chunk; true when it is the usage-only
/// chunk (usage and no choices).
pub(crate) fn on_chunk(facts: &mut StreamFacts, data: &[u8]) -> bool {
    let Ok(chunk) = serde_json::from_slice::<ChoiceChunk>(data) else {
        return odd_chunk(facts, data);
    };
    if let Some(m) = &chunk.model {
        facts.served.see_model(m);
    }
    if let Some(t) = &chunk.service_tier {
        facts.served.see_tier(t);
    }
    let choices = chunk.choices.unwrap_or_default();
    let usage_object = chunk.usage.as_ref();
    let usage = usage_object.and_then(Counts::to_usage);
    for choice in &choices {
        let i = choice.index;
        if let Some(reason) = &choice.finish_reason {
            facts.served.see_stop(reason);
        }
        if let Some(t) = &choice.text {
            facts.push_text(i, t);
        }
        if let Some(delta) = &choice.delta {
            for t in [&delta.content, &delta.refusal].into_iter().flatten() {
                facts.push_text(i, t);
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
                    facts.push_tool_text(i, t);
                }
            }
        }
    }
    if let Some(u) = usage {
        facts.usage = Some(u);
    }
    // The usage-only chunk: usage and no choices (even if its
    // usage could not be read, the client did not ask for it).
    usage_object.is_some() && choices.is_empty()
}

/// A chunk the typed reader refused (a key spelled twice, counts as
/// strings): read as a plain JSON value for its usage and served model.
/// Returns whether it is the usage-only chunk.
fn odd_chunk(facts: &mut StreamFacts, data: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        facts.unparsable_events += 1;
        return false;
    };
    let read = facts_from_value(&v);
    facts.see(read.served);
    if let Some(u) = read.usage {
        facts.usage = Some(u);
    }
    let no_choices = v
        .get("choices")
        .is_none_or(|c| c.as_array().is_some_and(Vec::is_empty));
    v.get("usage").is_some_and(serde_json::Value::is_object) && no_choices
}

/// The fields of an OpenAI request body tollgate reads (chat, text
/// completions, embeddings, Responses); everything else is forwarded
/// untouched and unread.
#[derive(Deserialize)]
struct Request {
    model: Option<String>,
    stream: Option<bool>,
    /// Absent (`None`), `null` (`Some(None)`) or an object: a `null`
    /// cannot take a spliced field (JSON's last key would win).
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptionsBody>>,
    n: Option<u32>,
    user: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    service_tier: Option<String>,
    max_tool_calls: Option<u64>,
    tools: Option<Vec<ToolRef>>,
    /// Responses' `background: true`: answered `queued`, billed when done.
    background: Option<bool>,
}

/// A field that is present, whatever its value (`null` included).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct StreamOptionsBody {
    include_usage: Option<bool>,
}

/// A tool definition; only its `type` is read (built-in tools cost per call).
#[derive(Deserialize)]
struct ToolRef {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// What an OpenAI request body asks for. The output limit is spelled per
/// endpoint: chat's `max_completion_tokens` (or the older `max_tokens`),
/// completions' `max_tokens`, Responses' `max_output_tokens`.
pub fn request_facts(
    endpoint: Endpoint,
    body: &bytes::Bytes,
    content_type: &str,
) -> Result<RequestFacts, ApiError> {
    match endpoint {
        Endpoint::Images => return super::media::image_facts(body, content_type),
        Endpoint::AudioTranscriptions | Endpoint::AudioTranslations => {
            return super::media::transcription_facts(body, content_type)
        }
        Endpoint::AudioSpeech => return super::media::speech_facts(body),
        _ => {}
    }
    let r: Request = request::parse(body)?;
    let (requested, field) = match endpoint {
        Endpoint::ChatCompletions => match (r.max_completion_tokens, r.max_tokens) {
            (Some(m), _) => (Some(m), Some("max_completion_tokens")),
            (None, Some(m)) => (Some(m), Some("max_tokens")),
            (None, None) => (None, Some("max_completion_tokens")),
        },
        Endpoint::Completions => (r.max_tokens, Some("max_tokens")),
        Endpoint::Responses => (r.max_output_tokens, Some("max_output_tokens")),
        _ => (None, None),
    };
    let tools = r.tools.unwrap_or_default();
    Ok(RequestFacts {
        background: r.background == Some(true),
        model: r.model,
        stream: r.stream == Some(true),
        n: r.n,
        end_user: r.user,
        output_limit: OutputLimit { requested, field },
        service_tier: r.service_tier,
        max_tool_calls: r.max_tool_calls,
        built_in_tools: tools
            .iter()
            .filter_map(|t| request::built_in_kind(t.kind.as_deref()?))
            .map(|kind| (kind, None))
            .collect(),
        has_tools: !tools.is_empty(),
        stream_options: match r.stream_options {
            None => StreamOptions::Absent,
            Some(o) => StreamOptions::Sent {
                include_usage: o.and_then(|o| o.include_usage) == Some(true),
            },
        },
        units: request::Units::default(),
    })
}

/// A Batch API output line: `{"custom_id", "response": {"status_code",
/// "body"}, "error"}`; a line whose request failed has no body to bill.
pub fn batch_line(line: &serde_json::Value) -> Option<super::BatchLine<'_>> {
    let custom_id = line.get("custom_id")?.as_str()?;
    let response = line.get("response").filter(|r| r.is_object());
    let status = response
        .and_then(|r| r.get("status_code"))
        .and_then(serde_json::Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .unwrap_or(500);
    let body = response
        .and_then(|r| r.get("body"))
        .filter(|b| b.is_object() && status == 200);
    Some(super::BatchLine {
        custom_id,
        status,
        body,
    })
}

/// What tollgate reads of one Realtime API event (text frames of the
/// `/v1/realtime` WebSocket, SPEC 12).
#[derive(Debug, PartialEq, Eq)]
pub enum RealtimeEvent {
    /// `session.created` / `session.updated`: the session's id and model.
    Session {
        id: Option<String>,
        model: Option<String>,
    },
    /// `response.done`: one response finished, with its usage.
    ResponseDone {
        id: String,
        usage: Option<Box<Usage>>,
    },
    /// The client's `response.create`: a response that will cost.
    ResponseCreate {
        max_output_tokens: Option<u64>,
    },
    Other,
}

#[derive(Deserialize)]
struct RealtimeFrame {
    #[serde(rename = "type")]
    kind: Option<String>,
    session: Option<RealtimeSession>,
    response: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RealtimeSession {
    id: Option<String>,
    model: Option<String>,
}

/// Reads one Realtime event's text; anything unreadable is `Other`.
pub fn realtime_event(text: &str) -> RealtimeEvent {
    let Ok(frame) = serde_json::from_str::<RealtimeFrame>(text) else {
        return RealtimeEvent::Other;
    };
    match frame.kind.as_deref() {
        Some("session.created" | "session.updated") => RealtimeEvent::Session {
            id: frame.session.as_ref().and_then(|s| s.id.clone()),
            model: frame.session.and_then(|s| s.model),
        },
        Some("response.done") => {
            let response = frame.response.unwrap_or_default();
            RealtimeEvent::ResponseDone {
                id: response
                    .get("id")
                    .and_then(serde_json::Value::as_str)
                    .map(|id| crate::usage::bounded_model(id).to_string())
                    .unwrap_or_default(),
                usage: response.get("usage").and_then(realtime_usage).map(Box::new),
            }
        }
        Some("response.create") => RealtimeEvent::ResponseCreate {
            max_output_tokens: frame
                .response
                .as_ref()
                .and_then(|r| {
                    r.get("max_output_tokens")
                        .or_else(|| r.get("max_response_output_tokens"))
                })
                .and_then(serde_json::Value::as_u64),
        },
        _ => RealtimeEvent::Other,
    }
}

/// A Realtime `usage`: cached tokens split into text and audio
/// (`cached_tokens_details`), so that no meter overlaps another: cached
/// text at `cached_input`, cached audio at `audio_cached_input`, the rest
/// of the audio at `audio_input`.
pub fn realtime_usage(u: &serde_json::Value) -> Option<Usage> {
    let n = |v: Option<&serde_json::Value>| v.and_then(serde_json::Value::as_u64);
    let input = n(u.get("input_tokens"))?;
    let output = n(u.get("output_tokens")).unwrap_or(0);
    let details = u.get("input_token_details");
    let detail = |k: &str| n(details.and_then(|d| d.get(k)));
    let cached = detail("cached_tokens").unwrap_or(0);
    let cached_audio = n(details
        .and_then(|d| d.get("cached_tokens_details"))
        .and_then(|d| d.get("audio_tokens")))
    .unwrap_or(0)
    .min(cached);
    let audio = detail("audio_tokens").unwrap_or(0);
    let output_audio = n(u
        .get("output_token_details")
        .and_then(|d| d.get("audio_tokens")));
    Some(Usage {
        prompt_tokens: input,
        completion_tokens: output,
        cached_tokens: Some(cached - cached_audio),
        audio_prompt_tokens: Some(audio.saturating_sub(cached_audio)),
        audio_cached_tokens: Some(cached_audio),
        audio_completion_tokens: output_audio,
        source: crate::usage::TokenSource::Upstream,
        ..Usage::NONE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::sse::{SseMeter, MAX_TEXT_BYTES};
    use bytes::Bytes;

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
        let mut meter = SseMeter::new(on_chunk, false);
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
                let mut meter = SseMeter::new(on_chunk, true);
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
        let mut meter = SseMeter::new(on_chunk, true);
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
        let mut meter = SseMeter::new(on_chunk, true);
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
        let mut meter = SseMeter::new(on_responses_event, false);
        run(&mut meter, &[s.as_bytes()]);
        let sum = meter.summary();
        assert_eq!(
            sum.usage
                .map(|u| (u.prompt_tokens, u.completion_tokens, u.cached_tokens)),
            Some((5, 1, Some(2)))
        );
        assert_eq!(sum.texts, vec!["Hi".to_string()]);
    }

    #[test]
    fn kept_text_is_capped_and_the_rest_counted() {
        let word = "y".repeat(1000);
        let event = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}]}}\n\n"
        );
        let mut meter = SseMeter::new(on_chunk, false);
        for _ in 0..100 {
            meter.push(Bytes::from(event.clone()));
        }
        let s = meter.summary();
        let kept: usize = s.texts.iter().map(String::len).sum();
        assert!(kept <= MAX_TEXT_BYTES && kept > MAX_TEXT_BYTES - 1000);
        assert_eq!(kept as u64 + s.text_bytes_dropped, 100_000);
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        let mut meter = SseMeter::new(on_chunk, true);
        let out = run(&mut meter, &[b"data: {not json\n\n", CHUNK1.as_bytes()]);
        assert_eq!(out.len(), "data: {not json\n\n".len() + CHUNK1.len());
        assert_eq!(meter.summary().unparsable_events, 1);
    }
}
