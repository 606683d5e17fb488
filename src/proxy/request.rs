//! What tollgate reads from a request body, and the one change it may make
//! to it (asking the upstream for stream usage). The body is re-serialised
//! only when it must change and cannot be spliced.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use crate::error::ApiError;
use crate::usage::Endpoint;

pub use crate::usage::MAX_MODEL_BYTES;

/// The fields tollgate needs; everything else is forwarded untouched.
#[derive(Debug, Deserialize)]
pub struct RequestMeta {
    pub model: Option<String>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// The tier the client asks for (`flex`, `priority`, ...).
    #[serde(default)]
    pub service_tier: Option<String>,
    /// Responses API: the most built-in tool calls the model may make.
    #[serde(default)]
    pub max_tool_calls: Option<u64>,
    /// Tool definitions; only their `type` is read (built-in tools cost per call).
    #[serde(default)]
    pub tools: Option<Vec<ToolRef>>,
    /// Bedrock Converse's output bound.
    #[serde(default, rename = "inferenceConfig")]
    pub inference_config: Option<crate::format::bedrock::InferenceConfig>,
    /// Bedrock Converse's tool definitions (only whether there are any).
    #[serde(default, rename = "toolConfig")]
    pub tool_config: Option<serde::de::IgnoredAny>,
    /// Gemini's output bound and choice count.
    #[serde(default, rename = "generationConfig")]
    pub generation_config: Option<crate::format::gemini::GenerationConfig>,
}

#[derive(Debug, Deserialize)]
pub struct ToolRef {
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Gemini's Google Search grounding (`{"googleSearch": {}}`, older
    /// models `googleSearchRetrieval`).
    #[serde(default, rename = "googleSearch", alias = "googleSearchRetrieval")]
    pub google_search: Option<serde::de::IgnoredAny>,
}

/// Most tokens one image part can cost, by its `detail`: OpenAI's rules
/// at their worst (gpt-4o-mini bills 2,833 tokens per low-detail image and
/// up to 48,169 for a high-detail one; the patch-based models less).
const IMAGE_TOKENS_LOW: u64 = 3_000;
const IMAGE_TOKENS_HIGH: u64 = 50_000;
/// A document Anthropic fetches itself (by URL or file id): a whole
/// context window of Claude's.
const DOCUMENT_TOKENS: u64 = 200_000;

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

impl RequestMeta {
    /// Parses and type-checks the body; errors name the offending field.
    pub fn parse(body: &[u8]) -> Result<RequestMeta, ApiError> {
        Self::parse_naming(body, true)
    }

    /// `parse`, for a request whose path may name the model instead (an
    /// Azure deployment path): `model_required` false lets it be absent.
    pub fn parse_naming(body: &[u8], model_required: bool) -> Result<RequestMeta, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid(
                "The request body is empty; expected a JSON object.",
                None,
            ));
        }
        // serde skips unknown fields without checking their strings, so
        // check the whole body once; invalid UTF-8 must not reach the upstream.
        if let Err(e) = std::str::from_utf8(body) {
            return Err(ApiError::invalid(
                format!(
                    "The request body is not valid UTF-8 (at byte {}).",
                    e.valid_up_to()
                ),
                None,
            ));
        }
        // serde reads a struct from a JSON array too (`["gpt-4o"]` would be
        // model "gpt-4o"): only an object is a request. Found by tests/fuzz.rs.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::invalid(
                "The request body must be a JSON object.",
                None,
            ));
        }
        // The plain parse first; the path-tracking one only to explain a failure.
        let mut meta: RequestMeta = match serde_json::from_slice(body) {
            Ok(meta) => meta,
            Err(_) => return Err(Self::explain_error(body)),
        };
        match &meta.model {
            Some(m) if m.len() > MAX_MODEL_BYTES => {
                return Err(ApiError::ModelTooLong {
                    len: m.len(),
                    limit: MAX_MODEL_BYTES,
                })
            }
            Some(m) if !m.is_empty() => {}
            _ if !model_required => {}
            _ => {
                return Err(ApiError::invalid(
                    "you must provide a model parameter",
                    Some("model"),
                ))
            }
        }
        if meta.n.is_none() {
            // Gemini's choice count.
            meta.n = meta
                .generation_config
                .as_ref()
                .and_then(|g| g.candidate_count);
        }
        if meta.n == Some(0) {
            return Err(ApiError::invalid("`n` must be at least 1", Some("n")));
        }
        Ok(meta)
    }

    /// The OpenAI-style error for a body that does not parse, naming the
    /// field (`param`) when a value has the wrong type.
    fn explain_error(body: &[u8]) -> ApiError {
        let mut de = serde_json::Deserializer::from_slice(body);
        let parsed: Result<RequestMeta, _> = serde_path_to_error::deserialize(&mut de);
        let e = match parsed {
            Err(e) => e,
            Ok(_) => {
                return match de.end() {
                    Err(e) => ApiError::invalid(
                        format!("We could not parse the JSON body of your request: {e}"),
                        None,
                    ),
                    Ok(()) => {
                        ApiError::invalid("We could not parse the JSON body of your request.", None)
                    }
                }
            }
        };
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() && path != "." {
            ApiError::invalid(format!("Invalid type for `{path}`: {inner}"), Some(&path))
        } else {
            ApiError::invalid(
                format!("We could not parse the JSON body of your request: {inner}"),
                None,
            )
        }
    }

    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or("")
    }

    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// The tiers the response may come back at: standard, and the one
    /// asked for.
    pub fn possible_tiers(&self) -> [crate::usage::ServiceTier; 2] {
        use crate::usage::ServiceTier;
        let asked = self
            .service_tier
            .as_deref()
            .map_or(ServiceTier::Standard, ServiceTier::parse);
        [ServiceTier::Standard, asked]
    }

    /// Built-in tool kinds the request enables, each with the most calls
    /// it may make (`max_tool_calls`, else `allowance`).
    pub fn tool_call_bound(&self, allowance: u64) -> Vec<(&'static str, u64)> {
        let calls = self.max_tool_calls.unwrap_or(allowance);
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        for tool in self.tools.iter().flatten() {
            let kind = match tool.kind.as_deref() {
                _ if tool.google_search.is_some() => "web_search",
                Some(k) if k.starts_with("web_search") => "web_search",
                Some("file_search") => "file_search",
                _ => continue,
            };
            if !out.iter().any(|(k, _)| *k == kind) {
                out.push((kind, calls));
            }
        }
        out
    }

    pub fn client_wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// Whether a body may hold image parts (a cheap scan before any parse).
pub fn mentions_images(body: &[u8]) -> bool {
    memchr::memmem::find(body, b"image").is_some()
        || memchr::memmem::find(body, b"\"document\"").is_some()
}

/// Most prompt tokens the images of a request can cost: each image part
/// at the worst its `detail` allows. Images given by URL take a few bytes of
/// the body but thousands of tokens, so the body's length does not bound
/// them. Only bodies that mention "image" are parsed for it.
pub fn image_token_bound(body: &[u8]) -> u64 {
    if !mentions_images(body) {
        return 0;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return 0;
    };
    let mut total = 0u64;
    let mut stack = vec![&v];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Array(items) => stack.extend(items.iter()),
            serde_json::Value::Object(map) => {
                let kind = map.get("type").and_then(serde_json::Value::as_str);
                let source = map
                    .get("source")
                    .and_then(|s| s.get("type"))
                    .and_then(serde_json::Value::as_str);
                // Anthropic: images at most ~1,600 tokens; base64 ones are
                // in the body's length already. A document by URL or file
                // id may fill the context.
                if kind == Some("image") && source.is_some_and(|s| s != "base64") {
                    total = total.saturating_add(IMAGE_TOKENS_LOW);
                } else if kind == Some("document") && matches!(source, Some("url" | "file")) {
                    total = total.saturating_add(DOCUMENT_TOKENS);
                } else if matches!(kind, Some("image_url" | "input_image")) {
                    let detail = map
                        .get("detail")
                        .or_else(|| map.get("image_url").and_then(|u| u.get("detail")))
                        .and_then(serde_json::Value::as_str);
                    total = total.saturating_add(match detail {
                        Some("low") => IMAGE_TOKENS_LOW,
                        _ => IMAGE_TOKENS_HIGH,
                    });
                } else {
                    stack.extend(map.values());
                }
            }
            _ => {}
        }
    }
    total
}

/// Most prompt tokens the audio inputs of a parsed request can cost. OpenAI
/// bills audio at 10 tokens a second; no audio encoding carries a second
/// in fewer than 100 bytes of base64 (800 bits/s), so a tenth of the
/// base64 length bounds it with room to spare.
pub fn audio_token_bound(request: &serde_json::Value) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![request];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Array(items) => stack.extend(items.iter()),
            serde_json::Value::Object(map) => {
                if let Some(audio) = map.get("input_audio") {
                    let data = audio.get("data").and_then(serde_json::Value::as_str);
                    total = total.saturating_add(data.map_or(0, |d| d.len() as u64 / 10 + 1));
                } else {
                    stack.extend(map.values());
                }
            }
            _ => {}
        }
    }
    total
}

/// The request's own output limit, by endpoint.
fn requested_max_output(meta: &RequestMeta, endpoint: Endpoint) -> (Option<u64>, &'static str) {
    match endpoint {
        Endpoint::ChatCompletions => match (meta.max_completion_tokens, meta.max_tokens) {
            (Some(m), _) => (Some(m), "max_completion_tokens"),
            (None, Some(m)) => (Some(m), "max_tokens"),
            (None, None) => (None, "max_completion_tokens"),
        },
        Endpoint::Completions => (meta.max_tokens, "max_tokens"),
        Endpoint::Responses => (meta.max_output_tokens, "max_output_tokens"),
        Endpoint::Messages => (meta.max_tokens, "max_tokens"),
        Endpoint::Converse => (
            meta.inference_config.as_ref().and_then(|c| c.max_tokens),
            "inferenceConfig.maxTokens",
        ),
        Endpoint::GenerateContent => (
            meta.generation_config
                .as_ref()
                .and_then(|g| g.max_output_tokens),
            "generationConfig.maxOutputTokens",
        ),
        _ => (None, ""),
    }
}

/// Enforces a team's output cap by setting or clamping the endpoint's
/// output-limit field. Returns the body to send and the effective limit.
pub fn apply_output_cap(
    body: Bytes,
    meta: &RequestMeta,
    endpoint: Endpoint,
    cap: Option<u64>,
) -> Result<(Bytes, Option<u64>), ApiError> {
    let (requested, field) = requested_max_output(meta, endpoint);
    let Some(cap) = cap.filter(|_| !field.is_empty()) else {
        return Ok((body, requested));
    };
    if requested.is_some_and(|r| r <= cap) {
        return Ok((body, requested));
    }
    let mut value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("We could not parse the JSON body: {e}"), None))?;
    // A dotted field is nested (`generationConfig.maxOutputTokens`).
    let mut obj = value.as_object_mut();
    let mut parts = field.split('.').peekable();
    while let (Some(part), Some(o)) = (parts.next(), obj.take()) {
        if parts.peek().is_none() {
            o.insert(part.to_string(), serde_json::Value::from(cap));
            break;
        }
        let inner = o
            .entry(part.to_string())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        obj = inner.as_object_mut();
    }
    let body = serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((body, Some(cap)))
}

/// The body with `stream_options.include_usage = true`. Spliced in without
/// re-serialising when the client sent no `stream_options`.
pub fn with_stream_usage(body: &Bytes, meta: &RequestMeta) -> Result<Bytes, ApiError> {
    if meta.stream_options.is_none() {
        if let Some(open) = body.iter().position(|b| !b.is_ascii_whitespace()) {
            if body[open] == b'{' {
                const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;
                let mut out = BytesMut::with_capacity(body.len() + FIELD.len());
                out.extend_from_slice(&body[..=open]);
                out.extend_from_slice(FIELD);
                out.extend_from_slice(&body[open + 1..]);
                return Ok(out.freeze());
            }
        }
    }
    let mut value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("We could not parse the JSON body: {e}"), None))?;
    if let Some(obj) = value.as_object_mut() {
        let options = obj
            .entry("stream_options")
            .or_insert_with(|| serde_json::json!({}));
        if !options.is_object() {
            *options = serde_json::json!({});
        }
        if let Some(o) = options.as_object_mut() {
            o.insert("include_usage".into(), serde_json::Value::Bool(true));
        }
    }
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(body: &[u8]) -> serde_json::Value {
        match RequestMeta::parse(body) {
            Ok(_) => serde_json::Value::Null,
            Err(e) => e.body(),
        }
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = err_of(br#"{"model":"gpt-4o","stream":"yes"}"#);
        assert_eq!(e["error"]["param"], "stream");
        let e = err_of(br#"{"model":42}"#);
        assert_eq!(e["error"]["param"], "model");
        let e = err_of(br#"{"messages":[]}"#);
        assert_eq!(e["error"]["param"], "model");
    }

    #[test]
    fn images_count_at_their_worst_detail() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":[
            {"type":"text","text":"what is this"},
            {"type":"image_url","image_url":{"url":"https://x/a.png","detail":"low"}},
            {"type":"image_url","image_url":{"url":"https://x/b.png"}}]}],
            "input":[{"type":"input_image","image_url":"https://x/c.png","detail":"high"}]}"#;
        assert_eq!(
            image_token_bound(body),
            IMAGE_TOKENS_LOW + 2 * IMAGE_TOKENS_HIGH
        );
        assert_eq!(image_token_bound(br#"{"model":"m","messages":[]}"#), 0);
    }

    #[test]
    fn audio_inputs_count_by_their_size() {
        let v: serde_json::Value = serde_json::from_str(&format!(
            r#"{{"model":"gpt-4o-audio-preview","messages":[{{"role":"user","content":[
                {{"type":"text","text":"transcribe"}},
                {{"type":"input_audio","input_audio":{{"data":"{}","format":"wav"}}}}]}}]}}"#,
            "A".repeat(48_000)
        ))
        .unwrap_or_default();
        // 48,000 bytes of base64 (a second of 16 kHz wav is ~43,000):
        // 4,801 tokens, where OpenAI bills about 10.
        assert_eq!(audio_token_bound(&v), 4_801);
        assert_eq!(audio_token_bound(&serde_json::json!({"messages": []})), 0);
    }

    #[test]
    fn built_in_tools_bound_the_calls() {
        let meta = RequestMeta::parse(
            br#"{"model":"m","tools":[{"type":"web_search_preview"},{"type":"function","function":{"name":"f"}},{"type":"file_search"}],"max_tool_calls":2}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            meta.tool_call_bound(5),
            vec![("web_search", 2), ("file_search", 2)]
        );
        let meta = RequestMeta::parse(br#"{"model":"m","tools":[{"type":"web_search"}]}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(meta.tool_call_bound(5), vec![("web_search", 5)]);
    }

    #[test]
    fn model_ids_past_256_bytes_are_refused() {
        let ok = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_BYTES));
        assert!(RequestMeta::parse(ok.as_bytes()).is_ok());
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_BYTES + 1));
        let e = err_of(long.as_bytes());
        assert_eq!(e["error"]["code"], "model_too_long");
        assert_eq!(e["error"]["param"], "model");
    }

    #[test]
    fn malformed_json_and_bad_utf8_are_invalid_requests() {
        for body in [
            &b"{\"model\":"[..],
            b"[1,2]",
            b"",
            b"{\"model\":\"\xff\xfe\"}",
            b"{} trailing",
            b"{\"model\":\"m\"} trailing",
            b"{\"model\":\"m\",\"x\":\"\xff\"}",
            // Regression (tests/fuzz.rs): serde reads structs from arrays.
            b"[\" \"]",
            b"[\"gpt-4o\", true]",
        ] {
            let e = err_of(body);
            assert_eq!(e["error"]["type"], "invalid_request_error", "{body:?}");
        }
    }

    #[test]
    fn stream_usage_is_spliced_when_absent() {
        let body = Bytes::from_static(br#"  {"model":"m","stream":true,"x":{"y":1}}"#);
        let meta = RequestMeta::parse(&body).unwrap_or_else(|e| panic!("{e}"));
        let out = with_stream_usage(&body, &meta).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["x"]["y"], 1);
    }

    #[test]
    fn output_cap_clamps_or_sets_the_limit() {
        let cases = [
            (
                r#"{"model":"m","max_tokens":5000}"#,
                Endpoint::ChatCompletions,
                "max_tokens",
                100,
            ),
            (
                r#"{"model":"m","max_completion_tokens":50}"#,
                Endpoint::ChatCompletions,
                "max_completion_tokens",
                50,
            ),
            (
                r#"{"model":"m"}"#,
                Endpoint::ChatCompletions,
                "max_completion_tokens",
                100,
            ),
            (r#"{"model":"m"}"#, Endpoint::Completions, "max_tokens", 100),
            (
                r#"{"model":"m","max_output_tokens":9999}"#,
                Endpoint::Responses,
                "max_output_tokens",
                100,
            ),
        ];
        for (raw, endpoint, field, expect) in cases {
            let body = Bytes::from(raw);
            let meta = RequestMeta::parse(&body).unwrap_or_else(|e| panic!("{e}"));
            let (out, effective) = apply_output_cap(body, &meta, endpoint, Some(100))
                .unwrap_or_else(|e| panic!("{e}"));
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
            assert_eq!(v[field], expect, "{raw}");
            assert_eq!(effective, Some(expect), "{raw}");
        }
        // Under the cap: the body is not touched.
        let body = Bytes::from_static(br#"{ "model":"m", "max_tokens": 10 }"#);
        let meta = RequestMeta::parse(&body).unwrap_or_else(|e| panic!("{e}"));
        let (out, _) = apply_output_cap(body.clone(), &meta, Endpoint::ChatCompletions, Some(100))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, body);
    }

    #[test]
    fn stream_usage_is_set_inside_existing_options() {
        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"other":1}}"#,
        );
        let meta = RequestMeta::parse(&body).unwrap_or_else(|e| panic!("{e}"));
        let out = with_stream_usage(&body, &meta).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["other"], 1);
    }
}
