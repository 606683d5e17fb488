//! Google's Gemini API in its own format (`/v1beta/models/{model}:{op}`,
//! SPEC 11): which operation a path asks for and the model it names, usage
//! from `usageMetadata` in a body or in each SSE chunk (every chunk carries
//! the running totals; the last one counts), the texts of a request and a
//! response for estimates, and Google's error shape.
//!
//! `usageMetadata` to usage: `promptTokenCount` is the whole prompt, cached
//! content included; `toolUsePromptTokenCount` is billed as input on top;
//! `thoughtsTokenCount` is billed as output on top of
//! `candidatesTokenCount` (and is the reasoning part of the completion);
//! `*TokensDetails[]` by `modality` say which part was audio or image.
//! Grounding with Google Search (`groundingMetadata` on a candidate) is one
//! `web_search` call per grounded answer.

use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;

use super::request::{self, OutputLimit, RequestFacts};
use crate::error::ApiError;
use crate::usage::read::{BodyFacts, Served};
use crate::usage::sse::StreamFacts;
use crate::usage::{Encoding, Endpoint, TokenSource, ToolCalls, Usage};

/// The model and operation of a Gemini path
/// (`/v1beta/models/gemini-2.5-flash:generateContent`, also under `/v1/`),
/// or `None` when the path is not one.
pub fn parse_path(path: &str) -> Option<(&str, &str)> {
    let rest = path
        .strip_prefix("/v1beta/models/")
        .or_else(|| path.strip_prefix("/v1/models/"))?;
    let (model, op) = rest.rsplit_once(':')?;
    (!model.is_empty() && !model.contains('/')).then_some((model, op))
}

/// The operation a Gemini path asks for. Token counting is free: it stays
/// unmetered (`Other`), as every operation tollgate does not price.
pub fn endpoint(op: &str) -> Endpoint {
    match op {
        "generateContent" | "streamGenerateContent" => Endpoint::GenerateContent,
        "embedContent" | "batchEmbedContents" => Endpoint::Embeddings,
        _ => Endpoint::Other,
    }
}

/// Whether the path asks for a stream (`:streamGenerateContent`).
pub fn is_stream_path(path: &str) -> bool {
    parse_path(path).is_some_and(|(_, op)| op == "streamGenerateContent")
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    prompt_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    tool_use_prompt_token_count: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Vec<ModalityCount>,
    #[serde(default)]
    candidates_tokens_details: Vec<ModalityCount>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModalityCount {
    #[serde(default)]
    modality: String,
    #[serde(default)]
    token_count: u64,
}

impl Metadata {
    /// The tokens of one modality, `None` when no detail names it.
    fn modality(details: &[ModalityCount], modality: &str) -> Option<u64> {
        details
            .iter()
            .filter(|d| d.modality == modality)
            .map(|d| d.token_count)
            .reduce(u64::saturating_add)
    }

    /// `None` when it reports no count at all.
    fn to_usage(&self) -> Option<Usage> {
        if self.prompt_token_count.is_none() && self.candidates_token_count.is_none() {
            return None;
        }
        let thoughts = self.thoughts_token_count;
        let usage = Usage {
            prompt_tokens: self
                .prompt_token_count
                .unwrap_or(0)
                .saturating_add(self.tool_use_prompt_token_count.unwrap_or(0)),
            completion_tokens: self
                .candidates_token_count
                .unwrap_or(0)
                .saturating_add(thoughts.unwrap_or(0)),
            cached_tokens: self.cached_content_token_count,
            audio_prompt_tokens: Self::modality(&self.prompt_tokens_details, "AUDIO"),
            image_prompt_tokens: Self::modality(&self.prompt_tokens_details, "IMAGE"),
            video_prompt_tokens: Self::modality(&self.prompt_tokens_details, "VIDEO"),
            reasoning_tokens: thoughts,
            audio_completion_tokens: Self::modality(&self.candidates_tokens_details, "AUDIO"),
            image_completion_tokens: Self::modality(&self.candidates_tokens_details, "IMAGE"),
            source: TokenSource::Upstream,
            ..Usage::NONE
        };
        Some(usage.clamped())
    }
}

/// One `GenerateContentResponse` (a body, or one stream chunk).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Chunk {
    #[serde(default)]
    candidates: Vec<Candidate>,
    usage_metadata: Option<Metadata>,
    model_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    index: usize,
    content: Option<Content>,
    finish_reason: Option<String>,
    grounding_metadata: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    text: Option<String>,
    /// A thought summary part (`"thought": true`): billed in
    /// `thoughtsTokenCount`, not as answer text.
    #[serde(default)]
    thought: bool,
    function_call: Option<Value>,
}

impl Chunk {
    fn served(&self, served: &mut Served) {
        if let Some(m) = &self.model_version {
            // Sometimes spelled as the resource name (`models/gemini-...`).
            served.see_model(m.strip_prefix("models/").unwrap_or(m));
        }
        for c in &self.candidates {
            if c.finish_reason.as_deref() == Some("MAX_TOKENS") {
                served.capped = true;
            }
        }
    }

    /// Grounded answers in this chunk (each a billed `web_search` call).
    fn grounded(&self) -> u32 {
        let n = self
            .candidates
            .iter()
            .filter(|c| c.grounding_metadata.is_some())
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// What a `generateContent` body says (also a stream read whole: a JSON
/// array of chunks, the last usage counting).
pub fn read_body(body: &[u8]) -> BodyFacts {
    let chunks: Vec<Chunk> = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => match serde_json::from_slice(body) {
            Ok(chunks) => chunks,
            Err(_) => return BodyFacts::default(),
        },
        _ => match serde_json::from_slice(body) {
            Ok(chunk) => vec![chunk],
            Err(_) => return BodyFacts::default(),
        },
    };
    let mut facts = BodyFacts {
        readable: true,
        ..BodyFacts::default()
    };
    let mut grounded = 0u32;
    for chunk in &chunks {
        chunk.served(&mut facts.served);
        grounded = grounded.max(chunk.grounded());
        if let Some(u) = chunk.usage_metadata.as_ref().and_then(Metadata::to_usage) {
            facts.usage = Some(u);
        }
    }
    facts.served.tool_calls = ToolCalls {
        web_search: grounded,
        ..ToolCalls::NONE
    };
    facts
}

/// Meters one chunk of a `streamGenerateContent?alt=sse` stream.
pub(crate) fn on_event(facts: &mut StreamFacts, data: &[u8]) -> bool {
    let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
        facts.unparsable_events += 1;
        return false;
    };
    chunk.served(&mut facts.served);
    let grounded = chunk.grounded();
    if grounded > facts.served.tool_calls.web_search {
        facts.served.tool_calls.web_search = grounded;
    }
    for c in &chunk.candidates {
        for part in c.content.iter().flat_map(|c| &c.parts) {
            if let Some(t) = part.text.as_deref().filter(|_| !part.thought) {
                facts.push_text(c.index, t);
            }
            if let Some(call) = &part.function_call {
                facts.push_tool_text(c.index, &call.to_string());
            }
        }
    }
    if let Some(u) = chunk.usage_metadata.as_ref().and_then(Metadata::to_usage) {
        facts.usage = Some(u);
        // The chunk that says why the answer ended carries the final counts.
        if chunk.candidates.iter().any(|c| c.finish_reason.is_some()) {
            facts.done = true;
        }
    }
    false
}

/// Tokens of every text of a request: `contents`, `systemInstruction`,
/// tool declarations; for embeddings `content` or each of `requests`.
pub fn prompt_tokens(enc: Encoding, request: &Value) -> u64 {
    // Inline media is billed by its duration or pixels.
    crate::usage::estimate::text_tokens(
        enc,
        request,
        &[
            "contents",
            "systemInstruction",
            "content",
            "requests",
            "tools",
        ],
        &["inlineData", "inline_data", "role", "model", "mimeType"],
    )
}

/// The answer text of each candidate in a body (thought summaries left out).
pub fn response_texts(body: &Value) -> Vec<String> {
    let chunks: Vec<Value> = match body {
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    let mut texts: Vec<String> = Vec::new();
    for chunk in chunks {
        let Ok(chunk) = serde_json::from_value::<Chunk>(chunk) else {
            continue;
        };
        for c in chunk.candidates {
            let index = c.index.min(1023);
            if texts.len() <= index {
                texts.resize_with(index + 1, String::new);
            }
            for part in c.content.into_iter().flat_map(|c| c.parts) {
                if let Some(t) = part.text.filter(|_| !part.thought) {
                    texts[index].push_str(&t);
                }
                if let Some(call) = part.function_call {
                    texts[index].push_str(&call.to_string());
                }
            }
        }
    }
    texts
}

/// Google's `error.status` for an HTTP status.
pub fn error_status(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 | 408 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

/// tollgate's error as Google's API spells one (`google-genai` raises by
/// `error.code` and `error.status`); tollgate's own code rides along in
/// `details`.
pub fn render(e: ApiError) -> Response {
    let status = e.status();
    let body = serde_json::json!({"error": {
        "code": status.as_u16(),
        "message": e.to_string(),
        "status": error_status(status.as_u16()),
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                     "reason": e.code(), "domain": "tollgate"}],
    }});
    crate::error::json_response(status, body.to_string())
}

/// The fields of a Gemini request tollgate reads; the model and whether
/// it streams are in the path.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    generation_config: Option<GenerationConfig>,
    tools: Option<Vec<ToolRef>>,
}

/// The body's output bound and choice count
/// (`generationConfig.maxOutputTokens`, `.candidateCount`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    max_output_tokens: Option<u64>,
    candidate_count: Option<u32>,
}

/// A tool: Google Search grounding (`{"googleSearch": {}}`, older models
/// `googleSearchRetrieval`) is billed per grounded prompt.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolRef {
    google_search: Option<serde::de::IgnoredAny>,
    google_search_retrieval: Option<serde::de::IgnoredAny>,
}

/// What a Gemini request body asks for. `generateContent`'s output is
/// bounded by `generationConfig.maxOutputTokens`; embeddings have none.
pub fn request_facts(endpoint: Endpoint, body: &[u8]) -> Result<RequestFacts, ApiError> {
    let r: Request = request::parse(body)?;
    let config = r.generation_config;
    let tools = r.tools.unwrap_or_default();
    let field =
        (endpoint == Endpoint::GenerateContent).then_some("generationConfig.maxOutputTokens");
    let grounded = tools
        .iter()
        .any(|t| t.google_search.is_some() || t.google_search_retrieval.is_some());
    Ok(RequestFacts {
        background: false,
        n: config.as_ref().and_then(|c| c.candidate_count),
        output_limit: OutputLimit {
            requested: config.as_ref().and_then(|c| c.max_output_tokens),
            field,
        },
        built_in_tools: if grounded {
            vec![("web_search", None)]
        } else {
            Vec::new()
        },
        has_tools: !tools.is_empty(),
        ..RequestFacts::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_model_and_operation() {
        assert_eq!(
            parse_path("/v1beta/models/gemini-2.5-flash:generateContent"),
            Some(("gemini-2.5-flash", "generateContent"))
        );
        assert_eq!(
            parse_path("/v1/models/gemini-embedding-001:embedContent"),
            Some(("gemini-embedding-001", "embedContent"))
        );
        assert_eq!(parse_path("/v1beta/models"), None);
        assert_eq!(parse_path("/v1beta/models/a/b:generateContent"), None);
        assert_eq!(endpoint("countTokens"), Endpoint::Other);
        assert!(is_stream_path(
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent"
        ));
    }

    #[test]
    fn usage_metadata_counts_thoughts_tool_prompts_and_modalities() {
        let body = br#"{"candidates":[{"content":{"parts":[{"text":"Hi"}],"role":"model"},"finishReason":"MAX_TOKENS","index":0,"groundingMetadata":{"webSearchQueries":["q"]}}],
            "usageMetadata":{"promptTokenCount":1200,"cachedContentTokenCount":1000,"candidatesTokenCount":50,"thoughtsTokenCount":30,"toolUsePromptTokenCount":7,"totalTokenCount":1287,
            "promptTokensDetails":[{"modality":"TEXT","tokenCount":900},{"modality":"AUDIO","tokenCount":300}],
            "candidatesTokensDetails":[{"modality":"TEXT","tokenCount":50}]},
            "modelVersion":"models/gemini-2.5-flash","responseId":"r1"}"#;
        let facts = read_body(body);
        let u = facts.usage.unwrap_or(Usage::NONE);
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.audio_prompt_tokens),
            (1207, Some(1000), Some(207))
        );
        assert_eq!((u.completion_tokens, u.reasoning_tokens), (80, Some(30)));
        assert_eq!(facts.served.model.as_deref(), Some("gemini-2.5-flash"));
        assert!(facts.served.capped);
        assert_eq!(facts.served.tool_calls.web_search, 1);
        assert!(read_body(b"<html>").usage.is_none());
    }

    #[test]
    fn video_prompt_tokens_are_their_own_meter_priced_at_input_when_unset() {
        use crate::pricing::{Line, Meter, ModelPrice, Rate};
        let body = br#"{"candidates":[],"usageMetadata":{"promptTokenCount":1000,"candidatesTokenCount":10,
            "promptTokensDetails":[{"modality":"TEXT","tokenCount":400},{"modality":"VIDEO","tokenCount":600}]}}"#;
        let u = read_body(body).usage.unwrap_or(Usage::NONE);
        assert_eq!(u.video_prompt_tokens, Some(600));
        assert_eq!(Meter::VideoInput.count(&u), 600);
        assert_eq!(Meter::Input.count(&u), 400);
        let meters = crate::usage::meter::Meters::of(&u);
        assert_eq!(
            meters.to_json(),
            r#"{"input":400,"output":10,"video_input":600}"#
        );
        let rate = |usd: &str| Rate::from_usd_per_million(usd).unwrap_or_else(|e| panic!("{e}"));
        let p = ModelPrice::text(rate("1"), rate("2"));
        let priced = p.price(&u, crate::usage::ServiceTier::Standard, &[]);
        // 400 + 600 tokens at $1/M (video falls back to input), 10 at $2/M.
        assert_eq!(priced.total.0, 1_020_000);
        assert_eq!(priced.breakdown.get(Line::of(Meter::VideoInput)), 600_000);
        assert_eq!(priced.breakdown.get(Line::of(Meter::Input)), 400_000);
    }
}
