//! What a request body asks for, in the one shape every stage reads
//! (`RequestFacts`). Each format module reads its own body into it (its
//! own fields, its own spelling of the output limit and the tools); this
//! module holds the value and the checks every body passes alike: not
//! empty, UTF-8, a JSON object, the model's length, at least one choice.
//! Errors name the offending field (`param`).

use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::usage::ServiceTier;

pub use crate::usage::MAX_MODEL_BYTES;

/// The facts of one request body, whatever its format.
#[derive(Debug, Default)]
pub struct RequestFacts {
    /// The model the body names (Gemini and Bedrock name it in the path).
    pub model: Option<String>,
    pub stream: bool,
    /// How many answers it asks for (`n`, Gemini's `candidateCount`).
    pub n: Option<u32>,
    /// The end user the client names (`user`, Anthropic's
    /// `metadata.user_id`).
    pub end_user: Option<String>,
    pub output_limit: OutputLimit,
    /// The tier the client asks for (`flex`, `priority`, ...).
    pub service_tier: Option<String>,
    /// The most built-in tool calls the model may make, all tools together
    /// (Responses' `max_tool_calls`).
    pub max_tool_calls: Option<u64>,
    /// Built-in tools the request enables (`web_search`, `file_search`),
    /// each with its own call limit if it has one (Anthropic's `max_uses`).
    pub built_in_tools: Vec<(&'static str, Option<u64>)>,
    /// Whether it defines any tool at all (the provider may add a tool-use
    /// system prompt).
    pub has_tools: bool,
    /// OpenAI's `stream_options`, as sent.
    pub stream_options: StreamOptions,
    /// What it asks for that is billed by the unit (SPEC 12).
    pub units: Units,
    /// A background response (SPEC 12): answered before it is done, billed
    /// when a poll, the resumed stream or a cancel shows it finished.
    pub background: bool,
}

/// What a request body says of the units it may be billed (images, audio
/// seconds, characters): exact where the request decides them, a bound
/// where the response does.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Units {
    /// The size and quality of the images asked for (`n` of them).
    pub image_spec: Option<crate::usage::ImageSpec>,
    /// Bytes of an uploaded audio file, which bound its duration.
    pub audio_bytes: Option<u64>,
    /// Characters of text to speak.
    pub characters: Option<u64>,
}

/// The request's own output limit and the field that spells it, which an
/// output cap sets or clamps (dotted when nested:
/// `generationConfig.maxOutputTokens`). No field: the operation produces
/// no output tokens to cap (embeddings).
#[derive(Debug, Default, Clone, Copy)]
pub struct OutputLimit {
    pub requested: Option<u64>,
    pub field: Option<&'static str>,
}

/// Whether the client sent `stream_options`, and what it asked for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum StreamOptions {
    #[default]
    Absent,
    Sent {
        include_usage: bool,
    },
}

impl RequestFacts {
    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or("")
    }

    /// The tiers the response may come back at: standard, and the one
    /// asked for.
    pub fn possible_tiers(&self) -> [ServiceTier; 2] {
        let asked = self
            .service_tier
            .as_deref()
            .map_or(ServiceTier::Standard, ServiceTier::parse);
        [ServiceTier::Standard, asked]
    }

    /// Built-in tool kinds the request enables, each with the most calls
    /// it may make: its own limit, else `max_tool_calls`, else `allowance`.
    pub fn tool_call_bound(&self, allowance: u64) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        for &(kind, limit) in &self.built_in_tools {
            let calls = limit.or(self.max_tool_calls).unwrap_or(allowance);
            match out.iter_mut().find(|(k, _)| *k == kind) {
                // Two tools of one kind: each may make its calls.
                Some((_, n)) => *n = n.saturating_add(calls),
                None => out.push((kind, calls)),
            }
        }
        out
    }

    pub fn client_wants_stream_usage(&self) -> bool {
        self.stream_options
            == StreamOptions::Sent {
                include_usage: true,
            }
    }

    /// The checks every format's facts pass: a model of at most
    /// `MAX_MODEL_BYTES` (required unless the path names one), `n` >= 1.
    pub fn checked(self, model_required: bool) -> Result<RequestFacts, ApiError> {
        match &self.model {
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
        if self.n == Some(0) {
            return Err(ApiError::invalid("`n` must be at least 1", Some("n")));
        }
        Ok(self)
    }
}

/// The kind of a built-in tool a `type` names (`web_search_preview`,
/// Anthropic's `web_search_20250305`, `file_search`), or `None` for a
/// function or any other tool tollgate does not bill per call.
pub fn built_in_kind(kind: &str) -> Option<&'static str> {
    match kind {
        k if k.starts_with("web_search") => Some("web_search"),
        "file_search" => Some("file_search"),
        _ => None,
    }
}

/// Reads a body as a format's request struct `T`, after the checks every
/// body passes; errors name the field whose value has the wrong type.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "The request body is empty; expected a JSON object.",
            None,
        ));
    }
    // serde skips unknown fields without checking their strings, so check
    // the whole body once; invalid UTF-8 must not reach the upstream.
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
    serde_json::from_slice(body).map_err(|_| explain_error::<T>(body))
}

/// The OpenAI-style error for a body that does not parse, naming the
/// field (`param`) when a value has the wrong type.
fn explain_error<T: DeserializeOwned>(body: &[u8]) -> ApiError {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut de);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_calls_are_bounded_by_their_own_limit_first() {
        let facts = RequestFacts {
            built_in_tools: vec![
                ("web_search", Some(3)),
                ("file_search", None),
                ("web_search", None),
            ],
            max_tool_calls: Some(2),
            ..RequestFacts::default()
        };
        assert_eq!(
            facts.tool_call_bound(5),
            vec![("web_search", 5), ("file_search", 2)]
        );
        let facts = RequestFacts {
            built_in_tools: vec![("web_search", None)],
            ..RequestFacts::default()
        };
        assert_eq!(facts.tool_call_bound(5), vec![("web_search", 5)]);
    }

    #[test]
    fn checks_refuse_long_models_and_zero_choices() {
        let long = RequestFacts {
            model: Some("m".repeat(MAX_MODEL_BYTES + 1)),
            ..RequestFacts::default()
        };
        assert!(matches!(
            long.checked(true),
            Err(ApiError::ModelTooLong { .. })
        ));
        assert!(RequestFacts::default().checked(false).is_ok());
        assert!(RequestFacts::default().checked(true).is_err());
        let none = RequestFacts {
            model: Some("m".into()),
            n: Some(0),
            ..RequestFacts::default()
        };
        assert!(none.checked(true).is_err());
    }
}
