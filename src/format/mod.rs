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
pub mod gemini;
pub mod openai;

use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use serde_json::Value;

use crate::config::ProviderKind;
use crate::error::ApiError;
use crate::usage::read::BodyFacts;
use crate::usage::sse::EventReader;
use crate::usage::{estimate, Encoding, Endpoint, Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// OpenAI's chat and text completions, embeddings and Responses API;
    /// Azure OpenAI and every OpenAI-compatible API speak it too.
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
    /// Google's Gemini API (`generateContent`, `embedContent`, ...).
    Gemini,
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
            WireFormat::OpenAi => kind != ProviderKind::Gemini,
            WireFormat::Anthropic => kind == ProviderKind::Anthropic,
            WireFormat::Gemini => kind == ProviderKind::Gemini,
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
        }
    }

    /// tollgate's own error in the shape of this format's API.
    pub fn render(self, e: ApiError) -> Response {
        match self {
            WireFormat::OpenAi => e.into_response(),
            WireFormat::Anthropic => anthropic::render(e),
            WireFormat::Gemini => gemini::render(e),
        }
    }

    /// The reader of one SSE event's data for `endpoint`'s stream.
    pub fn stream_reader(self, endpoint: Endpoint) -> EventReader {
        match (self, endpoint) {
            (WireFormat::Anthropic, _) => anthropic::on_event,
            (WireFormat::Gemini, _) => gemini::on_event,
            (WireFormat::OpenAi, Endpoint::Responses) => openai::on_responses_event,
            (WireFormat::OpenAi, _) => openai::on_chunk,
        }
    }

    /// What a whole (non-streaming) response body says. OpenAI's and
    /// Anthropic's bodies share their usage spellings (`usage::read`).
    pub fn read_body(self, body: &[u8]) -> BodyFacts {
        match self {
            WireFormat::OpenAi | WireFormat::Anthropic => crate::usage::read::read_body(body),
            WireFormat::Gemini => gemini::read_body(body),
        }
    }

    /// The model a client path names (an Azure deployment, Gemini's
    /// `models/{model}:op`), for requests whose body may not.
    pub fn path_model(self, path: &str) -> Option<&str> {
        match self {
            WireFormat::OpenAi => crate::provider::ClientPath::parse(path).deployment,
            WireFormat::Anthropic => None,
            WireFormat::Gemini => gemini::parse_path(path).map(|(model, _)| model),
        }
    }

    /// Whether the path itself asks for a stream (Gemini's
    /// `:streamGenerateContent`; the others say so in the body).
    pub fn path_streams(self, path: &str) -> bool {
        self == WireFormat::Gemini && gemini::is_stream_path(path)
    }

    /// Prompt tokens of a parsed request body, estimated with tiktoken.
    pub fn prompt_tokens(self, endpoint: Endpoint, enc: Encoding, request: &Value) -> u64 {
        match self {
            WireFormat::OpenAi => estimate::prompt_tokens(endpoint, enc, request),
            WireFormat::Anthropic => anthropic::prompt_tokens(enc, request),
            WireFormat::Gemini => gemini::prompt_tokens(enc, request),
        }
    }

    /// The generated text of each choice in a response body.
    pub fn response_texts(self, endpoint: Endpoint, body: &Value) -> Vec<String> {
        match self {
            WireFormat::OpenAi => estimate::response_texts(endpoint, body),
            WireFormat::Anthropic => anthropic::response_texts(body),
            WireFormat::Gemini => gemini::response_texts(body),
        }
    }

    /// The estimated usage of a request whose upstream reported none.
    pub fn estimate_usage(
        self,
        endpoint: Endpoint,
        enc: Encoding,
        request_body: &[u8],
        texts: &[String],
    ) -> Usage {
        let prompt = serde_json::from_slice::<Value>(request_body)
            .map(|v| self.prompt_tokens(endpoint, enc, &v))
            .unwrap_or(0);
        estimate::estimated(prompt, estimate::completion_tokens(enc, texts))
    }

    /// Prompt tokens the provider may add to what the request itself holds
    /// (a tool-use system prompt, a server tool's results), for the
    /// reservation's bound.
    pub fn added_prompt_bound(self, has_tools: bool, web_searches: u64) -> u64 {
        match self {
            WireFormat::OpenAi | WireFormat::Gemini => 0,
            WireFormat::Anthropic => anthropic::added_prompt_bound(has_tools, web_searches),
        }
    }

    /// Whether a tiktoken count bounds the provider's prompt count. Not for
    /// another tokenizer's models: there only the byte bound stands.
    pub fn tiktoken_bounds_prompt(self) -> bool {
        self == WireFormat::OpenAi
    }
}
