//! Anthropic's Messages wire format (`/v1/messages`): usage and the served
//! model from its SSE events, the texts and prompt of its bodies for
//! estimates, and the shape of its errors. OpenAI's formats live in
//! `openai` (streams), `read` (bodies, whose usage spellings Anthropic's
//! share) and `estimate`; the SSE framing (`sse::SseMeter`) is shared.
//!
//! A stream reports usage twice: `message_start` carries the input side
//! (input, cache reads and writes) and a first output count;
//! `message_delta` carries cumulative counts (output always, the others
//! when they changed, e.g. server tools adding input). Later counts replace
//! earlier ones, never add to them.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use super::request::{self, OutputLimit, RequestFacts};
use crate::usage::read::Counts;
use crate::usage::sse::StreamFacts;
use crate::usage::Encoding;
use axum::response::Response;

use crate::error::ApiError;

/// One event's data, the fields read; everything else skipped.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(default, rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<StartedMessage<'a>>,
    #[serde(default)]
    usage: Option<Counts>,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct StartedMessage<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<Counts>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    stop_reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    partial_json: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    thinking: Option<Cow<'a, str>>,
}

/// What one event means to the meter.
enum Seen<'a> {
    /// `message_start`: the model served and the usage so far.
    Started {
        model: Option<Cow<'a, str>>,
        usage: Option<Counts>,
    },
    /// `message_delta`: cumulative counts (final unless the stream goes
    /// on), and why the message stopped.
    Delta {
        counts: Option<Counts>,
        stop_reason: Option<Cow<'a, str>>,
    },
    /// Generated text (text, thinking), for estimates.
    Text(Cow<'a, str>),
    /// Generated tool input JSON, for estimates.
    ToolText(Cow<'a, str>),
    /// `message_stop`.
    Stop,
    /// `ping`, `content_block_start/stop`, `error` and new event types.
    Other,
}

/// Reads one event's data; `None` when it is not JSON tollgate can read.
fn read_event(data: &[u8]) -> Option<Seen<'_>> {
    let event: Event = serde_json::from_slice(data).ok()?;
    Some(match event.kind.as_deref() {
        Some("message_start") => {
            let message = event.message;
            let (model, usage) = match message {
                Some(m) => (m.model, m.usage),
                None => (None, None),
            };
            Seen::Started { model, usage }
        }
        Some("message_delta") => Seen::Delta {
            counts: event.usage,
            stop_reason: event.delta.and_then(|d| d.stop_reason),
        },
        Some("content_block_delta") => match event.delta {
            Some(d) => match (d.text.or(d.thinking), d.partial_json) {
                (Some(text), _) => Seen::Text(text),
                (None, Some(json)) => Seen::ToolText(json),
                (None, None) => Seen::Other,
            },
            None => Seen::Other,
        },
        Some("message_stop") => Seen::Stop,
        _ => Seen::Other,
    })
}

/// Meters one event of a Messages stream.
pub(crate) fn on_event(facts: &mut StreamFacts, data: &[u8]) -> bool {
    match read_event(data) {
        None => facts.unparsable_events += 1,
        Some(Seen::Started { model, usage }) => {
            if let Some(m) = model {
                facts.served.see_model(&m);
            }
            if let Some(u) = usage {
                facts.counts = Some(Box::new(u));
            }
        }
        Some(Seen::Delta {
            counts: later,
            stop_reason,
        }) => {
            if let Some(reason) = stop_reason {
                facts.served.see_stop(&reason);
            }
            if let Some(later) = later {
                let counts = facts.counts.get_or_insert_with(Box::default);
                counts.update(later);
                facts.usage = counts.to_usage();
            }
        }
        Some(Seen::Text(text)) => facts.push_text(0, &text),
        Some(Seen::ToolText(json)) => facts.push_tool_text(0, &json),
        Some(Seen::Stop) => facts.done = true,
        Some(Seen::Other) => {}
    }
    false
}

/// Prompt tokens of a Messages request, estimated: every text of the
/// system prompt, the messages and the tool definitions. Used only when
/// the response reports no usage at all.
pub fn prompt_tokens(enc: Encoding, request: &Value) -> u64 {
    let mut total = 0u64;
    for key in ["system", "messages", "tools"] {
        if let Some(v) = request.get(key) {
            total = total.saturating_add(text_tokens(enc, v));
        }
    }
    total
}

/// Tokens of every string in `v` but base64 payloads (images, documents
/// are billed by their size in pixels or pages, not their encoding).
fn text_tokens(enc: Encoding, v: &Value) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) => total = total.saturating_add(enc.count(s)),
            Value::Array(items) => stack.extend(items.iter()),
            Value::Object(map) => {
                let base64 = map.get("type").and_then(Value::as_str) == Some("base64");
                stack.extend(
                    map.iter()
                        .filter(|(k, _)| !(base64 && k.as_str() == "data"))
                        .filter(|(k, _)| !matches!(k.as_str(), "type" | "media_type" | "id"))
                        .map(|(_, v)| v),
                );
            }
            _ => {}
        }
    }
    total
}

/// The generated text of a Messages response body (its content blocks).
pub fn response_texts(body: &Value) -> Vec<String> {
    let mut text = String::new();
    for block in body
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for key in ["text", "thinking"] {
            if let Some(t) = block.get(key).and_then(Value::as_str) {
                text.push_str(t);
            }
        }
        if let Some(input) = block.get("input") {
            text.push_str(&input.to_string());
        }
    }
    vec![text]
}

/// Input tokens Anthropic's tool-use system prompt may add (346 at most in
/// its documentation; doubled).
const TOOL_PROMPT_TOKENS: u64 = 1_000;
/// Input tokens one web search's results may add to a Claude request.
const SEARCH_RESULT_TOKENS: u64 = 50_000;

/// Prompt tokens Anthropic may add to a request's own: a system prompt
/// for tools, and a server tool's results (web pages found) as input.
pub fn added_prompt_bound(has_tools: bool, web_searches: u64) -> u64 {
    let tools = if has_tools { TOOL_PROMPT_TOKENS } else { 0 };
    tools.saturating_add(web_searches.saturating_mul(SEARCH_RESULT_TOKENS))
}

/// tollgate's error as Anthropic's API would spell it, for clients of its
/// Messages format (the `anthropic` SDKs raise by `error.type`);
/// tollgate's own `code` rides along.
pub fn render(e: ApiError) -> Response {
    let status = e.status();
    let body = serde_json::json!({"type": "error", "error": {
        "type": error_type(status.as_u16()),
        "message": e.to_string(),
        "code": e.code(),
    }});
    crate::error::json_response(status, body.to_string())
}

/// Anthropic's `error.type` for an HTTP status, as its API answers.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 408 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

/// The fields of a Messages request tollgate reads (also the body of
/// Bedrock's InvokeModel for Claude).
#[derive(Deserialize)]
struct Request {
    model: Option<String>,
    stream: Option<bool>,
    max_tokens: Option<u64>,
    service_tier: Option<String>,
    tools: Option<Vec<ToolRef>>,
    metadata: Option<RequestMetadata>,
}

/// A tool definition: its `type` (server tools such as
/// `web_search_20250305` cost per use) and its `max_uses`.
#[derive(Deserialize)]
struct ToolRef {
    #[serde(rename = "type")]
    kind: Option<String>,
    max_uses: Option<u64>,
}

#[derive(Deserialize)]
struct RequestMetadata {
    user_id: Option<String>,
}

/// What a Messages request asks for: `max_tokens` bounds the output, a
/// server tool's `max_uses` its calls, `metadata.user_id` names the end user.
pub fn request_facts(body: &[u8]) -> Result<RequestFacts, ApiError> {
    let r: Request = request::parse(body)?;
    let tools = r.tools.unwrap_or_default();
    Ok(RequestFacts {
        background: false,
        model: r.model,
        stream: r.stream == Some(true),
        end_user: r.metadata.and_then(|m| m.user_id),
        output_limit: OutputLimit {
            requested: r.max_tokens,
            field: Some("max_tokens"),
        },
        service_tier: r.service_tier,
        built_in_tools: tools
            .iter()
            .filter_map(|t| Some((request::built_in_kind(t.kind.as_deref()?)?, t.max_uses)))
            .collect(),
        has_tools: !tools.is_empty(),
        ..RequestFacts::default()
    })
}

/// A Message Batches results line: `{"custom_id", "result": {"type":
/// "succeeded", "message"}}`; `errored`, `canceled` and `expired` requests
/// are not billed.
pub fn batch_line(line: &serde_json::Value) -> Option<super::BatchLine<'_>> {
    let custom_id = line.get("custom_id")?.as_str()?;
    let result = line.get("result")?;
    let (status, body) = match result.get("type").and_then(serde_json::Value::as_str) {
        Some("succeeded") => (200, result.get("message").filter(|m| m.is_object())),
        Some("canceled") => (499, None),
        Some("expired") => (408, None),
        _ => (500, None),
    };
    Some(super::BatchLine {
        custom_id,
        status,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_are_read_by_type() {
        let start = br#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}"#;
        match read_event(start) {
            Some(Seen::Started { model, usage }) => {
                assert_eq!(model.as_deref(), Some("claude-sonnet-4-5-20250929"));
                let u = usage.and_then(|u| u.to_usage());
                assert_eq!(u.map(|u| u.prompt_tokens), Some(25));
            }
            _ => panic!("message_start not read"),
        }
        let delta =
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#;
        assert!(matches!(read_event(delta), Some(Seen::Text(t)) if t == "Hi"));
        let json_delta = br#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\""}}"#;
        assert!(matches!(read_event(json_delta), Some(Seen::ToolText(t)) if t == "{\"a\""));
        let md = br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#;
        assert!(matches!(
            read_event(md),
            Some(Seen::Delta { counts: Some(_), stop_reason: Some(r) }) if r == "end_turn"
        ));
        assert!(matches!(
            read_event(br#"{"type":"message_stop"}"#),
            Some(Seen::Stop)
        ));
        assert!(matches!(
            read_event(br#"{"type": "ping"}"#),
            Some(Seen::Other)
        ));
        assert!(read_event(b"{not json").is_none());
    }

    #[test]
    fn prompts_count_texts_but_not_base64() {
        let enc = Encoding::O200kBase;
        let plain = json!({"system": "Be brief.", "messages": [{"role": "user", "content": "Hello there"}]});
        let with_image = json!({"system": "Be brief.", "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo".repeat(1000)}},
            {"type": "text", "text": "Hello there"}]}]});
        let n = prompt_tokens(enc, &plain);
        assert_eq!(
            n,
            enc.count("Be brief.") + enc.count("user") + enc.count("Hello there")
        );
        assert_eq!(prompt_tokens(enc, &with_image), n);
    }

    #[test]
    fn error_types_follow_the_status() {
        assert_eq!(error_type(401), "authentication_error");
        assert_eq!(error_type(429), "rate_limit_error");
        assert_eq!(error_type(502), "api_error");
    }
}
