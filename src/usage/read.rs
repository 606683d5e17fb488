//! Usage and the served facts (model, service tier, built-in tool calls)
//! read from an upstream response, in every spelling SPEC 9 lists.
//!
//! Lenient by design: a usage object that spells a field twice, adds
//! fields, or uses strings or floats for counts is read as well as it can
//! be, and one that cannot be read yields `None` (tollgate then estimates).
//! Nothing here can turn a provider's successful response into an error.

use serde::Deserialize;
use serde_json::Value;

use super::{ServiceTier, TokenSource, ToolCalls, Usage};

/// What a response says was served.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Served {
    /// The response's `model` (a dated snapshot may cost more than its alias).
    pub model: Option<String>,
    pub tier: Option<ServiceTier>,
    /// Built-in tool calls the response made (Responses API output items).
    pub tool_calls: ToolCalls,
    /// The answer stopped at its output cap (`finish_reason: "length"`,
    /// Anthropic's `stop_reason: "max_tokens"`, a Responses answer
    /// incomplete for `max_output_tokens`).
    pub capped: bool,
}

impl Served {
    /// Notes a `model` seen in a response or a stream chunk.
    pub fn see_model(&mut self, model: &str) {
        if !model.is_empty() && self.model.as_deref() != Some(model) {
            let model = super::bounded_model(model);
            self.model = Some(model.to_string());
        }
    }

    pub fn see_tier(&mut self, tier: &str) {
        self.tier = Some(ServiceTier::parse(tier));
    }

    /// Notes why (a choice of) the answer stopped.
    pub fn see_stop(&mut self, reason: &str) {
        if matches!(reason, "length" | "max_tokens" | "max_output_tokens") {
            self.capped = true;
        }
    }
}

/// What a non-streaming response body says.
#[derive(Debug, Clone, Default)]
pub struct BodyFacts {
    pub usage: Option<Usage>,
    pub served: Served,
    /// The body was JSON tollgate could read at all.
    pub readable: bool,
    /// A Responses API object not finished yet (`queued`, `in_progress`: a
    /// background response, SPEC 12): its id.
    pub unfinished: Option<String>,
}

/// Whether a Responses API `status` is still on its way (`queued`,
/// `in_progress`), not finished (`completed`, `failed`, `incomplete`,
/// `cancelled`).
pub fn is_unfinished(status: &str) -> bool {
    matches!(status, "queued" | "in_progress")
}

/// The fields read from a response body; everything else is skipped. The
/// usage object is read typed (no allocation) in the common case; a body
/// this cannot read (a key spelled twice, counts as strings) is read again
/// as a plain JSON value.
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(default)]
    usage: Option<Counts>,
    #[serde(default, borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    service_tier: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    output: Option<Vec<OutputItem<'a>>>,
    #[serde(default, borrow)]
    choices: Option<Vec<ChoiceEnd<'a>>>,
    /// Anthropic's Messages.
    #[serde(default, borrow)]
    stop_reason: Option<std::borrow::Cow<'a, str>>,
    /// The Responses API's.
    #[serde(default, borrow)]
    incomplete_details: Option<Incomplete<'a>>,
    #[serde(default, borrow)]
    status: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ChoiceEnd<'a> {
    #[serde(default, borrow)]
    finish_reason: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Incomplete<'a> {
    #[serde(default, borrow)]
    reason: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct OutputItem<'a> {
    #[serde(default, rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

/// A usage object in every spelling of SPEC 9, as integers.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Counts {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_cache_hit_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    /// Transcriptions spell it `input_token_details`.
    #[serde(alias = "input_token_details")]
    input_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
    cache_creation: Option<CacheCreation>,
    server_tool_use: Option<ServerToolUse>,
}

#[derive(Debug, Default, Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
    audio_tokens: Option<u64>,
    image_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct ServerToolUse {
    web_search_requests: Option<u64>,
}

impl Counts {
    /// Takes every count `later` reports in place of this one's (an
    /// Anthropic stream's `message_delta` after its `message_start`).
    pub(crate) fn update(&mut self, later: Counts) {
        macro_rules! replace {
            ($($f:ident),*) => {$(if later.$f.is_some() { self.$f = later.$f; })*};
        }
        replace!(
            prompt_tokens,
            completion_tokens,
            input_tokens,
            output_tokens,
            prompt_cache_hit_tokens,
            cache_read_input_tokens,
            cache_creation_input_tokens,
            prompt_tokens_details,
            input_tokens_details,
            completion_tokens_details,
            output_tokens_details,
            cache_creation,
            server_tool_use
        );
    }

    /// The one reading of a usage object (both paths end here). `None`
    /// unless it reports a prompt (or input) count.
    pub(crate) fn to_usage(&self) -> Option<Usage> {
        let detail = |d: &Option<Details>, f: fn(&Details) -> Option<u64>| d.as_ref().and_then(f);
        let (cw_5m, cw_1h) = match &self.cache_creation {
            Some(c) => (c.ephemeral_5m_input_tokens, c.ephemeral_1h_input_tokens),
            None => (self.cache_creation_input_tokens, None),
        };
        // Anthropic's input_tokens leaves out what was read from or written
        // to the cache; everyone else's prompt total includes cached tokens.
        let anthropic = self.prompt_tokens.is_none()
            && self.input_tokens.is_some()
            && (self.cache_read_input_tokens.is_some()
                || self.cache_creation_input_tokens.is_some()
                || self.cache_creation.is_some());
        let prompt = match (self.prompt_tokens, self.input_tokens) {
            (Some(p), _) => p,
            (None, Some(i)) if anthropic => i
                .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
                .saturating_add(cw_5m.unwrap_or(0))
                .saturating_add(cw_1h.unwrap_or(0)),
            (None, Some(i)) => i,
            (None, None) => return None,
        };
        let prompt_side = |f: fn(&Details) -> Option<u64>| {
            detail(&self.prompt_tokens_details, f).or_else(|| detail(&self.input_tokens_details, f))
        };
        let completion_side = |f: fn(&Details) -> Option<u64>| {
            detail(&self.completion_tokens_details, f)
                .or_else(|| detail(&self.output_tokens_details, f))
        };
        let usage = Usage {
            prompt_tokens: prompt,
            completion_tokens: self.completion_tokens.or(self.output_tokens).unwrap_or(0),
            cached_tokens: prompt_side(|d| d.cached_tokens)
                .or(self.prompt_cache_hit_tokens)
                .or(self.cache_read_input_tokens),
            cache_write_tokens: cw_5m,
            cache_write_1h_tokens: cw_1h,
            audio_prompt_tokens: prompt_side(|d| d.audio_tokens),
            image_prompt_tokens: prompt_side(|d| d.image_tokens),
            reasoning_tokens: completion_side(|d| d.reasoning_tokens),
            audio_completion_tokens: completion_side(|d| d.audio_tokens),
            image_completion_tokens: completion_side(|d| d.image_tokens),
            tool_calls: ToolCalls {
                web_search: self
                    .server_tool_use
                    .as_ref()
                    .and_then(|s| s.web_search_requests)
                    .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
                file_search: 0,
            },
            source: TokenSource::Upstream,
            ..Usage::NONE
        };
        Some(usage.clamped())
    }
}

/// Reads a non-streaming response body.
pub fn read_body(body: &[u8]) -> BodyFacts {
    match serde_json::from_slice::<Body>(body) {
        Ok(b) => {
            let mut served = Served::default();
            if let Some(m) = &b.model {
                served.see_model(m);
            }
            if let Some(t) = &b.service_tier {
                served.see_tier(t);
            }
            for item in b.output.iter().flatten() {
                if let Some(kind) = &item.kind {
                    served.tool_calls.count_item(kind);
                }
            }
            let reasons = b.choices.iter().flatten().map(|c| &c.finish_reason);
            let others = [
                &b.stop_reason,
                &b.incomplete_details.as_ref().and_then(|i| i.reason.clone()),
            ];
            for reason in reasons.chain(others).flatten() {
                served.see_stop(reason);
            }
            BodyFacts {
                usage: b.usage.as_ref().and_then(Counts::to_usage),
                served,
                readable: true,
                unfinished: match (&b.status, &b.id) {
                    (Some(s), Some(id)) if is_unfinished(s) => Some(id.to_string()),
                    _ => None,
                },
            }
        }
        Err(_) => match serde_json::from_slice::<Value>(body) {
            Ok(v) if v.is_object() => facts_from_value(&v),
            _ => BodyFacts::default(),
        },
    }
}

/// The facts of a response object already parsed (a Responses API stream's
/// `response.completed` event, or a body with duplicate keys).
pub fn facts_from_value(v: &Value) -> BodyFacts {
    let mut served = Served::default();
    if let Some(m) = v.get("model").and_then(Value::as_str) {
        served.see_model(m);
    }
    if let Some(t) = v.get("service_tier").and_then(Value::as_str) {
        served.see_tier(t);
    }
    for item in v
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(kind) = item.get("type").and_then(Value::as_str) {
            served.tool_calls.count_item(kind);
        }
    }
    let finish_reasons = v
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("finish_reason"));
    let others = [
        v.get("stop_reason"),
        v.get("incomplete_details").and_then(|i| i.get("reason")),
    ];
    for reason in finish_reasons.chain(others.into_iter().flatten()) {
        if let Some(r) = reason.as_str() {
            served.see_stop(r);
        }
    }
    let unfinished = match (v.get("status").and_then(Value::as_str), v.get("id")) {
        (Some(s), Some(Value::String(id))) if is_unfinished(s) => Some(id.clone()),
        _ => None,
    };
    BodyFacts {
        usage: v.get("usage").and_then(usage_from_value),
        served,
        readable: true,
        unfinished,
    }
}

/// A usage object however it was spelled: counts as integers, integral
/// floats or numeric strings (negative or fractional ones dropped), keys
/// spelled twice already settled by the JSON reader (the last wins).
pub fn usage_from_value(v: &Value) -> Option<Usage> {
    if !v.is_object() {
        return None;
    }
    serde_json::from_value::<Counts>(as_counts(v))
        .ok()?
        .to_usage()
}

/// `v` with every count a provider may spell oddly made a plain integer,
/// and every value that is no count (nor an object of them) removed.
fn as_counts(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter_map(|(k, v)| {
                    let v = match v {
                        Value::Object(_) => as_counts(v),
                        other => Value::from(count(other)?),
                    };
                    Some((k.clone(), v))
                })
                .collect(),
        ),
        other => count(other).map_or(Value::Null, Value::from),
    }
}

/// A count: an integer, an integral float, or a numeric string.
fn count(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0 && *f < 1e18)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(v: Value) -> Usage {
        usage_from_value(&v).unwrap_or_else(|| panic!("no usage in {v}"))
    }

    #[test]
    fn a_part_not_reported_is_not_a_reported_zero() {
        use crate::usage::meter::Meter;
        let bare = read(json!({"prompt_tokens": 100, "completion_tokens": 20}));
        let zero = read(json!({"prompt_tokens": 100, "completion_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 0}}));
        assert_eq!(bare.cached_tokens, None);
        assert_eq!(zero.cached_tokens, Some(0));
        assert_eq!(Meter::CachedInput.reported(&bare), None);
        assert_eq!(Meter::CachedInput.reported(&zero), Some(0));
        assert_eq!(Meter::AudioInput.reported(&zero), None);
        // The plain text meters are always known: what the parts leave.
        assert_eq!(Meter::Input.reported(&bare), Some(100));
        assert_eq!(Meter::Output.reported(&bare), Some(20));
        // Priced alike: an unreported part bills nothing of its own.
        assert_eq!(Meter::CachedInput.count(&bare), 0);
    }

    #[test]
    fn chat_usage_with_every_detail() {
        let u = read(
            json!({"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 800},
            "completion_tokens_details": {"reasoning_tokens": 50, "audio_tokens": 400}}),
        );
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.audio_prompt_tokens),
            (1000, Some(100), Some(800))
        );
        assert_eq!(
            (
                u.completion_tokens,
                u.reasoning_tokens,
                u.audio_completion_tokens
            ),
            (500, Some(50), Some(400))
        );
    }

    #[test]
    fn responses_usage_and_output_items() {
        let body = br#"{"object":"response","model":"gpt-5-2025-08-07","service_tier":"priority",
            "output":[{"type":"web_search_call","id":"ws_1"},{"type":"web_search_call"},{"type":"message","content":[]},{"type":"file_search_call"}],
            "usage":{"input_tokens":36,"output_tokens":87,"input_tokens_details":{"cached_tokens":4,"image_tokens":10},
            "output_tokens_details":{"reasoning_tokens":20},"total_tokens":123}}"#;
        let f = read_body(body);
        let u = f.usage.unwrap_or(Usage::NONE);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
            (36, 87, Some(4))
        );
        assert_eq!(
            (u.image_prompt_tokens, u.reasoning_tokens),
            (Some(10), Some(20))
        );
        assert_eq!(f.served.model.as_deref(), Some("gpt-5-2025-08-07"));
        assert_eq!(f.served.tier, Some(ServiceTier::Priority));
        assert_eq!(
            f.served.tool_calls,
            ToolCalls {
                web_search: 2,
                file_search: 1
            }
        );
    }

    #[test]
    fn deepseek_cache_hits() {
        let u = read(json!({"prompt_tokens": 10000, "completion_tokens": 10,
            "prompt_cache_hit_tokens": 9000, "prompt_cache_miss_tokens": 1000}));
        assert_eq!((u.prompt_tokens, u.cached_tokens), (10000, Some(9000)));
    }

    #[test]
    fn anthropic_counts_cache_outside_input() {
        let u = read(json!({"input_tokens": 100, "output_tokens": 50,
            "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 300,
            "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 100},
            "server_tool_use": {"web_search_requests": 2}}));
        assert_eq!(u.prompt_tokens, 1400);
        assert_eq!(
            (
                u.cached_tokens,
                u.cache_write_tokens,
                u.cache_write_1h_tokens
            ),
            (Some(1000), Some(200), Some(100))
        );
        assert_eq!(u.tool_calls.web_search, 2);
        let u = read(
            json!({"input_tokens": 100, "output_tokens": 5, "cache_creation_input_tokens": 40}),
        );
        assert_eq!((u.prompt_tokens, u.cache_write_tokens), (140, Some(40)));
    }

    #[test]
    fn answers_stopped_at_their_cap_are_seen_in_every_format() {
        for body in [
            &br#"{"choices":[{"finish_reason":"stop"},{"finish_reason":"length"}]}"#[..],
            br#"{"type":"message","stop_reason":"max_tokens"}"#,
            br#"{"object":"response","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"}}"#,
            br#"{"choices":[{"finish_reason":"length"}],"model":"m","model":"m"}"#,
        ] {
            assert!(read_body(body).served.capped, "{}", String::from_utf8_lossy(body));
        }
        for body in [
            &br#"{"choices":[{"finish_reason":"stop"}]}"#[..],
            br#"{"type":"message","stop_reason":"end_turn"}"#,
            br#"{"object":"response","status":"completed"}"#,
        ] {
            assert!(
                !read_body(body).served.capped,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn odd_spellings_are_read_not_refused() {
        // A field spelled twice: the last one wins, as in any JSON reader.
        let f = read_body(br#"{"model":"m","usage":{"prompt_tokens":10,"input_tokens":12,"prompt_tokens":11,"completion_tokens":"5"},"model":"m2"}"#);
        let u = f.usage.unwrap_or(Usage::NONE);
        assert!(f.readable);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (11, 5));
        assert_eq!(f.served.model.as_deref(), Some("m2"));
        // Floats, negative and nonsense counts.
        let u = read(json!({"prompt_tokens": 10.0, "completion_tokens": -3,
            "prompt_tokens_details": {"cached_tokens": 99}}));
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
            (10, 0, Some(10))
        );
        assert_eq!(usage_from_value(&json!({"completion_tokens": 5})), None);
        assert_eq!(usage_from_value(&json!("usage")), None);
        assert!(!read_body(b"<html>").readable);
        assert!(read_body(br#"{"choices":[]}"#).usage.is_none());
        assert!(read_body(br#"{"usage":null}"#).usage.is_none());
    }
}
