//! Wire formats: what the client speaks (SPEC 11). A format owns how its
//! requests are recognised, what its bodies and stream events say about
//! usage, how its prompts and answers are counted for an estimate, the
//! extra prompt tokens its provider may add (reservation rules), and the
//! shape of its errors. Where a request goes (URL, credentials, model
//! mapping) belongs to the backend (`provider`), not here.
//!
//! Every decision that depends on the format is a method of `WireFormat`;
//! nothing outside this module tests which format a request speaks.
//! Never awaits and never touches the database: readers run on the bytes
//! they are given.

pub mod anthropic;
pub mod bedrock;
pub mod gemini;
pub mod media;
pub mod openai;
pub mod request;

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use serde_json::Value;

use self::request::RequestFacts;
use crate::config::ProviderKind;
use crate::error::ApiError;
use crate::usage::frames::{FrameMeter, Framing, StreamMeter};
use crate::usage::read::BodyFacts;
use crate::usage::sse::{EventReader, SseMeter};
use crate::usage::{estimate, Encoding, Endpoint, Usage};

/// One result line of a batch: the id the client gave its request, the
/// status the request got, and its response body when it succeeded.
#[derive(Debug)]
pub struct BatchLine<'a> {
    pub custom_id: &'a str,
    pub status: u16,
    pub body: Option<&'a Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// OpenAI's chat and text completions, embeddings and Responses API;
    /// Azure OpenAI and every OpenAI-compatible API speak it too.
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
    /// Google's Gemini API (`generateContent`, `embedContent`, ...).
    Gemini,
    /// AWS Bedrock Runtime (Converse, and InvokeModel with Anthropic bodies).
    Bedrock,
}

impl WireFormat {
    /// The format of a client request and the operation it asks for.
    /// Anthropic's Messages paths speak Anthropic's format, and so does any
    /// request with an `anthropic-version` header (the SDKs send it on every
    /// request, so `GET /v1/models` reaches Anthropic) when an Anthropic
    /// upstream exists.
    pub fn of_request(
        path: &str,
        headers: &HeaderMap,
        anthropic_configured: bool,
    ) -> (WireFormat, Endpoint) {
        if let Some((_, op)) = gemini::parse_path(path) {
            return (WireFormat::Gemini, gemini::endpoint(op));
        }
        if path.starts_with("/v1beta/") {
            return (WireFormat::Gemini, Endpoint::Other);
        }
        if path.starts_with("/model/") {
            return (WireFormat::Bedrock, bedrock::endpoint(path));
        }
        let endpoint = Endpoint::from_path(path);
        let anthropic = endpoint == Endpoint::Messages
            || path.starts_with("/v1/messages")
            || (anthropic_configured && headers.contains_key("anthropic-version"));
        let format = if anthropic {
            WireFormat::Anthropic
        } else {
            WireFormat::OpenAi
        };
        (format, endpoint)
    }

    /// Whether an upstream of `kind` takes requests in this format.
    /// Anthropic's own API serves OpenAI's paths too (its compatibility
    /// layer), so an OpenAI-format request may go to any upstream.
    pub fn served_by(self, kind: ProviderKind) -> bool {
        match self {
            WireFormat::OpenAi => !matches!(kind, ProviderKind::Gemini | ProviderKind::Bedrock),
            WireFormat::Anthropic => kind == ProviderKind::Anthropic,
            WireFormat::Gemini => kind == ProviderKind::Gemini,
            WireFormat::Bedrock => kind == ProviderKind::Bedrock,
        }
    }

    /// Whether a request naming no model goes to the first upstream of all
    /// (OpenAI's `/v1/models`, files, ...) rather than the first serving
    /// this format.
    pub fn any_upstream_for_no_model(self) -> bool {
        self == WireFormat::OpenAi
    }

    /// The API's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            WireFormat::OpenAi => "OpenAI",
            WireFormat::Anthropic => "Anthropic",
            WireFormat::Gemini => "Gemini",
            WireFormat::Bedrock => "Bedrock",
        }
    }

    /// The error for a request no configured upstream takes: OpenAI's
    /// format is taken by any upstream, so there is none at all.
    pub fn no_upstream(self) -> ApiError {
        match self {
            WireFormat::OpenAi => ApiError::Internal("no upstream configured".into()),
            _ => ApiError::invalid(
                format!(
                    "No upstream of kind \"{}\" is configured for {}'s API.",
                    self.name().to_ascii_lowercase(),
                    self.name()
                ),
                None,
            ),
        }
    }

    /// tollgate's own error in the shape of this format's API.
    pub fn render(self, e: ApiError) -> Response {
        match self {
            WireFormat::OpenAi => e.into_response(),
            WireFormat::Anthropic => anthropic::render(e),
            WireFormat::Gemini => gemini::render(e),
            WireFormat::Bedrock => bedrock::render(e),
        }
    }

    /// The meter of a streamed answer in `framing`. `strip_usage_chunk`:
    /// tollgate asked for stream usage on the client's behalf and drops
    /// that chunk again (SSE only).
    pub fn stream_meter(
        self,
        endpoint: Endpoint,
        framing: Framing,
        strip_usage_chunk: bool,
    ) -> StreamMeter {
        match framing {
            Framing::Sse => {
                let reader = self.stream_reader(endpoint);
                StreamMeter::Sse(SseMeter::new(reader, strip_usage_chunk))
            }
            Framing::AwsEventStream => {
                let reader = match endpoint {
                    Endpoint::Messages => bedrock::on_invoke_frame,
                    _ => bedrock::on_converse_frame,
                };
                StreamMeter::Frames(Box::new(FrameMeter::new(reader)))
            }
        }
    }

    /// The reader of one SSE event's data for `endpoint`'s stream.
    pub fn stream_reader(self, endpoint: Endpoint) -> EventReader {
        match (self, endpoint) {
            // Bedrock streams Anthropic's events inside its frames.
            (WireFormat::Anthropic | WireFormat::Bedrock, _) => anthropic::on_event,
            (WireFormat::Gemini, _) => gemini::on_event,
            (WireFormat::OpenAi, Endpoint::Responses) => openai::on_responses_event,
            (WireFormat::OpenAi, _) => openai::on_chunk,
        }
    }

    /// One line of a batch's results in this format (SPEC 12); `None`
    /// for a line that is not one, or a format without batches.
    pub fn batch_line(self, line: &Value) -> Option<BatchLine<'_>> {
        match self {
            WireFormat::OpenAi => openai::batch_line(line),
            WireFormat::Anthropic => anthropic::batch_line(line),
            WireFormat::Gemini | WireFormat::Bedrock => None,
        }
    }

    /// What a whole (non-streaming) response body says. OpenAI's and
    /// Anthropic's bodies share their usage spellings (`usage::read`).
    pub fn read_body(self, endpoint: Endpoint, body: &[u8]) -> BodyFacts {
        match (self, endpoint) {
            (WireFormat::OpenAi, Endpoint::Images) => media::read_images_body(body),
            (WireFormat::OpenAi, Endpoint::AudioTranscriptions | Endpoint::AudioTranslations) => {
                media::read_transcription_body(body)
            }
            // Audio bytes: their usage is what the request says.
            (WireFormat::OpenAi, Endpoint::AudioSpeech) => BodyFacts::default(),
            (WireFormat::OpenAi | WireFormat::Anthropic, _) => crate::usage::read::read_body(body),
            (WireFormat::Gemini, _) => gemini::read_body(body),
            (WireFormat::Bedrock, _) => bedrock::read_body(endpoint, body),
        }
    }

    /// What a request body asks for, read by the format's own reader.
    /// Anthropic's API also serves OpenAI's paths: their bodies are
    /// OpenAI's. `model_required`: the path names no model.
    pub fn request_facts(
        self,
        endpoint: Endpoint,
        body: &bytes::Bytes,
        content_type: &str,
        model_required: bool,
    ) -> Result<RequestFacts, ApiError> {
        let facts = match (self, endpoint) {
            (WireFormat::Gemini, _) => gemini::request_facts(endpoint, body),
            (WireFormat::Bedrock, _) => bedrock::request_facts(endpoint, body),
            (WireFormat::Anthropic, Endpoint::Messages) => anthropic::request_facts(body),
            (WireFormat::OpenAi | WireFormat::Anthropic, _) => {
                openai::request_facts(endpoint, body, content_type)
            }
        };
        facts?.checked(model_required && self.default_model(endpoint).is_none())
    }

    /// The model an API uses for a request that names none (OpenAI's
    /// image endpoints: `dall-e-2`).
    pub fn default_model(self, endpoint: Endpoint) -> Option<&'static str> {
        match (self, endpoint) {
            (WireFormat::OpenAi, Endpoint::Images) => Some(media::DEFAULT_IMAGE_MODEL),
            _ => None,
        }
    }

    /// The model a client path names (an Azure deployment, Gemini's
    /// `models/{model}:op`), for requests whose body may not.
    pub fn path_model(self, path: &str) -> Option<Cow<'_, str>> {
        match self {
            WireFormat::OpenAi => crate::provider::ClientPath::parse(path)
                .deployment
                .map(Cow::Borrowed),
            WireFormat::Anthropic => None,
            WireFormat::Gemini => gemini::parse_path(path).map(|(model, _)| Cow::Borrowed(model)),
            WireFormat::Bedrock => bedrock::path_model(path).map(Cow::Owned),
        }
    }

    /// Whether the path itself asks for a stream (Gemini's
    /// `:streamGenerateContent`; the others say so in the body).
    pub fn path_streams(self, path: &str) -> bool {
        match self {
            WireFormat::Gemini => gemini::is_stream_path(path),
            WireFormat::Bedrock => bedrock::is_stream_path(path),
            WireFormat::OpenAi | WireFormat::Anthropic => false,
        }
    }

    /// Prompt tokens of a parsed request body, estimated with tiktoken.
    pub fn prompt_tokens(self, endpoint: Endpoint, enc: Encoding, request: &Value) -> u64 {
        match self {
            WireFormat::OpenAi => estimate::prompt_tokens(endpoint, enc, request),
            WireFormat::Anthropic => anthropic::prompt_tokens(enc, request),
            WireFormat::Gemini => gemini::prompt_tokens(enc, request),
            WireFormat::Bedrock => bedrock::prompt_tokens(endpoint, enc, request),
        }
    }

    /// The generated text of each choice in a response body.
    pub fn response_texts(self, endpoint: Endpoint, body: &Value) -> Vec<String> {
        match self {
            WireFormat::OpenAi => estimate::response_texts(endpoint, body),
            WireFormat::Anthropic => anthropic::response_texts(body),
            WireFormat::Gemini => gemini::response_texts(body),
            WireFormat::Bedrock => bedrock::response_texts(endpoint, body),
        }
    }

    /// The estimated usage of a request whose upstream reported none.
    pub fn estimate_usage(
        self,
        endpoint: Endpoint,
        enc: Encoding,
        request_body: &[u8],
        texts: &[String],
        response_bytes: usize,
    ) -> Usage {
        let request = serde_json::from_slice::<Value>(request_body).unwrap_or(Value::Null);
        let prompt = self.prompt_tokens(endpoint, enc, &request);
        let mut usage = estimate::estimated(prompt, estimate::completion_tokens(enc, texts));
        if endpoint == Endpoint::AudioSpeech {
            // The answer is audio: its tokens from its length.
            let audio = media::speech_audio_tokens(&request, response_bytes);
            usage.completion_tokens = usage.completion_tokens.saturating_add(audio);
            usage.audio_completion_tokens = Some(audio);
        }
        usage
    }

    /// Prompt tokens the provider may add to what the request itself holds
    /// (a tool-use system prompt, a server tool's results), for the
    /// reservation's bound.
    pub fn added_prompt_bound(self, has_tools: bool, web_searches: u64) -> u64 {
        match self {
            WireFormat::OpenAi | WireFormat::Gemini => 0,
            // Bedrock's models are mostly Claude: its rules are the bound.
            WireFormat::Anthropic | WireFormat::Bedrock => {
                anthropic::added_prompt_bound(has_tools, web_searches)
            }
        }
    }

    /// Whether a tiktoken count bounds the provider's prompt count. Not for
    /// another tokenizer's models: there only the byte bound stands.
    pub fn tiktoken_bounds_prompt(self) -> bool {
        self == WireFormat::OpenAi
    }
}

#[cfg(test)]
mod tests {
    use super::request::MAX_MODEL_BYTES;
    use super::*;

    fn read(format: WireFormat, endpoint: Endpoint, body: &[u8]) -> RequestFacts {
        format
            .request_facts(
                endpoint,
                &bytes::Bytes::copy_from_slice(body),
                "application/json",
                false,
            )
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn openai(body: &[u8]) -> RequestFacts {
        read(WireFormat::OpenAi, Endpoint::ChatCompletions, body)
    }

    fn err_of(body: &[u8]) -> Value {
        let body = bytes::Bytes::copy_from_slice(body);
        match WireFormat::OpenAi.request_facts(Endpoint::ChatCompletions, &body, "", true) {
            Ok(_) => Value::Null,
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
    fn built_in_tools_bound_the_calls() {
        let meta = openai(
            br#"{"model":"m","tools":[{"type":"web_search_preview"},{"type":"function","function":{"name":"f"}},{"type":"file_search"}],"max_tool_calls":2}"#,
        );
        assert_eq!(
            meta.tool_call_bound(5),
            vec![("web_search", 2), ("file_search", 2)]
        );
        let meta = openai(br#"{"model":"m","tools":[{"type":"web_search"}]}"#);
        assert_eq!(meta.tool_call_bound(5), vec![("web_search", 5)]);
    }

    #[test]
    fn model_ids_past_256_bytes_are_refused() {
        let ok = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_BYTES));
        assert_eq!(openai(ok.as_bytes()).model().len(), MAX_MODEL_BYTES);
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
    fn openai_facts_spell_the_limit_per_endpoint() {
        let body = br#"{"model":"m","n":2,"user":"u-1","stream":true,"service_tier":"flex",
            "stream_options":{"include_usage":true},"max_tokens":7,"max_output_tokens":9}"#;
        let chat = openai(body);
        assert_eq!((chat.n, chat.end_user.as_deref()), (Some(2), Some("u-1")));
        assert!(chat.stream && chat.client_wants_stream_usage());
        assert_eq!(chat.output_limit.requested, Some(7));
        assert_eq!(chat.output_limit.field, Some("max_tokens"));
        assert_eq!(chat.possible_tiers()[1], crate::usage::ServiceTier::Flex);
        let responses = read(WireFormat::OpenAi, Endpoint::Responses, body);
        assert_eq!(responses.output_limit.requested, Some(9));
        let embeddings = read(WireFormat::OpenAi, Endpoint::Embeddings, body);
        assert_eq!(embeddings.output_limit.field, None);
    }

    #[test]
    fn anthropic_facts_read_max_uses_and_metadata_user() {
        let body = br#"{"model":"claude-sonnet-4-5","max_tokens":100,"metadata":{"user_id":"u-9"},
            "tools":[{"type":"web_search_20250305","name":"web_search","max_uses":3},{"name":"f","input_schema":{}}]}"#;
        let f = read(WireFormat::Anthropic, Endpoint::Messages, body);
        assert_eq!(f.end_user.as_deref(), Some("u-9"));
        assert_eq!(f.output_limit.requested, Some(100));
        assert!(f.has_tools);
        assert_eq!(f.tool_call_bound(5), vec![("web_search", 3)]);
        // Anthropic's OpenAI-compatible paths take OpenAI's bodies.
        let chat = read(
            WireFormat::Anthropic,
            Endpoint::ChatCompletions,
            br#"{"model":"claude-sonnet-4-5","max_completion_tokens":5}"#,
        );
        assert_eq!(chat.output_limit.field, Some("max_completion_tokens"));
    }

    #[test]
    fn gemini_and_bedrock_facts_read_their_configs() {
        let g = read(
            WireFormat::Gemini,
            Endpoint::GenerateContent,
            br#"{"contents":[],"generationConfig":{"maxOutputTokens":50,"candidateCount":2},
                "tools":[{"googleSearch":{}},{"functionDeclarations":[]}]}"#,
        );
        assert_eq!((g.n, g.output_limit.requested), (Some(2), Some(50)));
        assert_eq!(
            g.output_limit.field,
            Some("generationConfig.maxOutputTokens")
        );
        assert_eq!(g.tool_call_bound(4), vec![("web_search", 4)]);
        let e = WireFormat::Gemini
            .request_facts(
                Endpoint::GenerateContent,
                &bytes::Bytes::from_static(br#"{"generationConfig":{"maxOutputTokens":"many"}}"#),
                "application/json",
                false,
            )
            .map(|_| ())
            .map_err(|e| e.body());
        assert_eq!(
            e.err().unwrap_or_default()["error"]["param"],
            "generationConfig.maxOutputTokens"
        );
        let b = read(
            WireFormat::Bedrock,
            Endpoint::Converse,
            br#"{"messages":[],"inferenceConfig":{"maxTokens":30},"toolConfig":{"tools":[]}}"#,
        );
        assert_eq!(b.output_limit.requested, Some(30));
        assert!(b.has_tools);
        let invoke = read(
            WireFormat::Bedrock,
            Endpoint::Messages,
            br#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":12,"messages":[]}"#,
        );
        assert_eq!(invoke.output_limit.field, Some("max_tokens"));
        assert_eq!(invoke.output_limit.requested, Some(12));
    }
}
