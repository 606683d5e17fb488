//! AWS Bedrock Runtime's format (SPEC 11): `POST /model/{modelId}/converse`
//! and `/converse-stream` (Converse's JSON, and AWS event-stream frames
//! whose `metadata` event carries the usage), `/invoke` and
//! `/invoke-with-response-stream` with an Anthropic body (Anthropic's JSON,
//! and frames whose `chunk` event carries one Anthropic stream event,
//! base64-encoded), and Bedrock's error shape (`{"message": ...}` with the
//! error's name in `x-amzn-errortype`).
//!
//! Converse usage: `inputTokens` is the uncached input; the cache reads and
//! writes (`cacheReadInputTokens`, `cacheWriteInputTokens`) come on top and
//! are the prompt's other parts, as in Anthropic's own API.

use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;

use super::request::{self, OutputLimit, RequestFacts};
use crate::error::ApiError;
use crate::usage::frames::Frame;
use crate::usage::read::{BodyFacts, Served};
use crate::usage::sse::StreamFacts;
use crate::usage::{Encoding, Endpoint, TokenSource, Usage};

/// The (percent-encoded) model id and operation of a Bedrock path.
pub fn parse_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/model/")?;
    let (model, op) = rest.split_once('/')?;
    (!model.is_empty() && !op.contains('/')).then_some((model, op))
}

/// The model id a path names, percent-decoded (boto3 sends
/// `us.anthropic.claude-sonnet-4-5-20250929-v1%3A0`).
pub fn path_model(path: &str) -> Option<String> {
    let (model, _) = parse_path(path)?;
    let decoded = percent_encoding::percent_decode_str(model)
        .decode_utf8()
        .ok()?;
    Some(decoded.into_owned())
}

/// Whether a model id is one of Anthropic's (`anthropic.` after an
/// optional region prefix such as `us.` or `global.`).
pub fn is_anthropic_model(model: &str) -> bool {
    model.starts_with("anthropic.") || model.contains(".anthropic.")
}

/// The operation a path asks for: Converse, or Anthropic's Messages through
/// `invoke`; `invoke` on another model's native body is not metered.
pub fn endpoint(path: &str) -> Endpoint {
    let Some((_, op)) = parse_path(path) else {
        return Endpoint::Other;
    };
    match op {
        "converse" | "converse-stream" => Endpoint::Converse,
        "invoke" | "invoke-with-response-stream"
            if path_model(path).is_some_and(|m| is_anthropic_model(&m)) =>
        {
            Endpoint::Messages
        }
        _ => Endpoint::Other,
    }
}

/// Whether the path asks for a stream.
pub fn is_stream_path(path: &str) -> bool {
    parse_path(path).is_some_and(|(_, op)| op.ends_with("-stream"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConverseUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_write_input_tokens: Option<u64>,
}

impl ConverseUsage {
    fn to_usage(&self) -> Option<Usage> {
        if self.input_tokens.is_none() && self.output_tokens.is_none() {
            return None;
        }
        let (read, written) = (self.cache_read_input_tokens, self.cache_write_input_tokens);
        Some(Usage {
            prompt_tokens: self
                .input_tokens
                .unwrap_or(0)
                .saturating_add(read.unwrap_or(0))
                .saturating_add(written.unwrap_or(0)),
            completion_tokens: self.output_tokens.unwrap_or(0),
            cached_tokens: read,
            cache_write_tokens: written,
            source: TokenSource::Upstream,
            ..Usage::NONE
        })
    }
}

/// A Converse body, or the payload of a `messageStop` / `metadata` event.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Converse {
    usage: Option<ConverseUsage>,
    stop_reason: Option<String>,
    /// `contentBlockDelta`.
    content_block_index: Option<usize>,
    delta: Option<Delta>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Delta {
    text: Option<String>,
    tool_use: Option<ToolUseDelta>,
    reasoning_content: Option<ReasoningDelta>,
}

#[derive(Debug, Default, Deserialize)]
struct ToolUseDelta {
    input: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ReasoningDelta {
    text: Option<String>,
}

fn see_stop(served: &mut Served, reason: &str) {
    if reason == "max_tokens" {
        served.capped = true;
    }
}

/// What a whole response body says: Converse's, or Anthropic's from `invoke`.
pub fn read_body(endpoint: Endpoint, body: &[u8]) -> BodyFacts {
    if endpoint == Endpoint::Messages {
        return crate::usage::read::read_body(body);
    }
    let Ok(converse) = serde_json::from_slice::<Converse>(body) else {
        return BodyFacts::default();
    };
    let mut facts = BodyFacts {
        readable: true,
        usage: converse.usage.as_ref().and_then(ConverseUsage::to_usage),
        ..BodyFacts::default()
    };
    if let Some(reason) = &converse.stop_reason {
        see_stop(&mut facts.served, reason);
    }
    facts
}

/// Meters one frame of a ConverseStream.
pub(crate) fn on_converse_frame(facts: &mut StreamFacts, frame: &Frame<'_>) {
    if frame.message_type == "exception" {
        // The stream ends in an error: what was answered so far stands.
        return;
    }
    let Ok(event) = serde_json::from_slice::<Converse>(frame.payload) else {
        facts.unparsable_events += 1;
        return;
    };
    match frame.kind {
        "contentBlockDelta" => {
            let index = event.content_block_index.unwrap_or(0);
            if let Some(delta) = &event.delta {
                if let Some(t) = &delta.text {
                    facts.push_text(index, t);
                }
                if let Some(t) = delta
                    .reasoning_content
                    .as_ref()
                    .and_then(|r| r.text.as_ref())
                {
                    facts.push_text(index, t);
                }
                if let Some(t) = delta.tool_use.as_ref().and_then(|u| u.input.as_ref()) {
                    facts.push_tool_text(index, t);
                }
            }
        }
        "messageStop" => {
            if let Some(reason) = &event.stop_reason {
                see_stop(&mut facts.served, reason);
            }
        }
        "metadata" => {
            if let Some(u) = event.usage.as_ref().and_then(ConverseUsage::to_usage) {
                facts.usage = Some(u);
                facts.done = true;
            }
        }
        _ => {}
    }
}

#[derive(Deserialize)]
struct Chunk {
    bytes: Option<String>,
}

/// Meters one frame of an InvokeModelWithResponseStream on an Anthropic
/// model: its `chunk` holds one Messages stream event, base64-encoded.
pub(crate) fn on_invoke_frame(facts: &mut StreamFacts, frame: &Frame<'_>) {
    if frame.message_type == "exception" || frame.kind != "chunk" {
        return;
    }
    let decoded = serde_json::from_slice::<Chunk>(frame.payload)
        .ok()
        .and_then(|c| c.bytes)
        .and_then(|b| aws_smithy_types::base64::decode(b).ok());
    match decoded {
        Some(event) => {
            super::anthropic::on_event(facts, &event);
        }
        None => facts.unparsable_events += 1,
    }
}

/// Prompt tokens of a Converse request: the texts of `system` and `messages`
/// (and tool specs); Anthropic's own body through `invoke`.
pub fn prompt_tokens(endpoint: Endpoint, enc: Encoding, request: &Value) -> u64 {
    if endpoint == Endpoint::Messages {
        return super::anthropic::prompt_tokens(enc, request);
    }
    // Images and documents are billed by size, not by their bytes.
    crate::usage::estimate::text_tokens(
        enc,
        request,
        &["system", "messages", "toolConfig"],
        &["bytes", "role", "format"],
    )
}

/// The answer text of a Converse body (Anthropic's through `invoke`).
pub fn response_texts(endpoint: Endpoint, body: &Value) -> Vec<String> {
    if endpoint == Endpoint::Messages {
        return super::anthropic::response_texts(body);
    }
    let mut text = String::new();
    for block in body["output"]["message"]["content"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(t) = block.get("text").and_then(Value::as_str) {
            text.push_str(t);
        }
        if let Some(input) = block.get("toolUse").and_then(|t| t.get("input")) {
            text.push_str(&input.to_string());
        }
    }
    vec![text]
}

/// Bedrock's name for an error status (`x-amzn-errortype`), as botocore
/// raises it (`ClientError`'s `Error.Code`).
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "ValidationException",
        401 | 403 => "AccessDeniedException",
        404 => "ResourceNotFoundException",
        408 | 504 => "ModelTimeoutException",
        424 => "ModelErrorException",
        429 => "ThrottlingException",
        503 => "ServiceUnavailableException",
        _ => "InternalServerException",
    }
}

/// tollgate's error as Bedrock spells one; tollgate's own code rides along.
pub fn render(e: ApiError) -> Response {
    let status = e.status();
    let kind = error_type(status.as_u16());
    let body = serde_json::json!({"message": e.to_string(), "code": e.code()});
    let mut response = crate::error::json_response(status, body.to_string());
    response.headers_mut().insert(
        http::HeaderName::from_static("x-amzn-errortype"),
        http::HeaderValue::from_static(kind),
    );
    response
}

/// The fields of a Converse request tollgate reads; the model and whether
/// it streams are in the path.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    inference_config: Option<InferenceConfig>,
    /// Only whether there are tools (Claude adds a tool-use prompt).
    tool_config: Option<serde::de::IgnoredAny>,
}

/// Converse's output bound (`inferenceConfig.maxTokens`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InferenceConfig {
    max_tokens: Option<u64>,
}

/// What a Bedrock request body asks for: Converse's own fields, or (for
/// InvokeModel) an Anthropic Messages body.
pub fn request_facts(endpoint: Endpoint, body: &[u8]) -> Result<RequestFacts, ApiError> {
    if endpoint == Endpoint::Messages {
        return super::anthropic::request_facts(body);
    }
    let r: Request = request::parse(body)?;
    Ok(RequestFacts {
        background: false,
        output_limit: OutputLimit {
            requested: r.inference_config.and_then(|c| c.max_tokens),
            field: Some("inferenceConfig.maxTokens"),
        },
        has_tools: r.tool_config.is_some(),
        ..RequestFacts::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_model_operation_and_endpoint() {
        let p = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse-stream";
        assert_eq!(
            path_model(p).as_deref(),
            Some("us.anthropic.claude-sonnet-4-5-20250929-v1:0")
        );
        assert!(is_stream_path(p));
        assert_eq!(endpoint(p), Endpoint::Converse);
        assert_eq!(
            endpoint("/model/anthropic.claude-3-haiku-20240307-v1:0/invoke"),
            Endpoint::Messages
        );
        assert_eq!(endpoint("/model/meta.llama3-8b/invoke"), Endpoint::Other);
        assert_eq!(parse_path("/model/x"), None);
    }

    #[test]
    fn converse_usage_adds_cache_reads_and_writes_to_the_prompt() {
        let body = br#"{"output":{"message":{"role":"assistant","content":[{"text":"Hi"}]}},"stopReason":"max_tokens",
            "usage":{"inputTokens":100,"outputTokens":20,"totalTokens":1420,"cacheReadInputTokens":1000,"cacheWriteInputTokens":300},"metrics":{"latencyMs":5}}"#;
        let facts = read_body(Endpoint::Converse, body);
        let u = facts.usage.unwrap_or(Usage::NONE);
        assert_eq!(
            (
                u.prompt_tokens,
                u.cached_tokens,
                u.cache_write_tokens,
                u.completion_tokens
            ),
            (1400, Some(1000), Some(300), 20)
        );
        assert!(facts.served.capped);
    }
}
