//! The changes tollgate may make to a request body (asking the upstream
//! for stream usage, an output cap), and the bounds the reservation reads
//! off a body no format's facts hold (its images, its audio). What a body
//! asks for is read by its format (`format::request`). A body is
//! re-serialised only when it must change and cannot be spliced.

use bytes::{Bytes, BytesMut};

use crate::error::ApiError;
use crate::format::request::{OutputLimit, StreamOptions};

/// Most tokens one image part can cost, by its `detail`: OpenAI's rules
/// at their worst (gpt-4o-mini bills 2,833 tokens per low-detail image and
/// up to 48,169 for a high-detail one; the patch-based models less).
const IMAGE_TOKENS_LOW: u64 = 3_000;
const IMAGE_TOKENS_HIGH: u64 = 50_000;
/// A document Anthropic fetches itself (by URL or file id): a whole
/// context window of Claude's.
const DOCUMENT_TOKENS: u64 = 200_000;

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

/// Enforces a team's output cap by setting or clamping the endpoint's
/// output-limit field. Returns the body to send and the effective limit.
pub fn apply_output_cap(
    body: Bytes,
    limit: OutputLimit,
    cap: Option<u64>,
) -> Result<(Bytes, Option<u64>), ApiError> {
    let requested = limit.requested;
    let (Some(cap), Some(field)) = (cap, limit.field) else {
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
        // A `null` config (which the facts read as absent) becomes one.
        if !inner.is_object() {
            *inner = serde_json::Value::Object(Default::default());
        }
        obj = inner.as_object_mut();
    }
    let body = serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((body, Some(cap)))
}

/// The body with `stream_options.include_usage = true`. Spliced in without
/// re-serialising when the client sent no `stream_options`.
pub fn with_stream_usage(body: &Bytes, sent: StreamOptions) -> Result<Bytes, ApiError> {
    if sent == StreamOptions::Absent {
        if let Some(open) = body.iter().position(|b| !b.is_ascii_whitespace()) {
            if body[open] == b'{' {
                const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;
                // An empty object takes the field without its comma.
                let empty = body[open + 1..]
                    .iter()
                    .find(|b| !b.is_ascii_whitespace())
                    .is_some_and(|b| *b == b'}');
                let field = if empty {
                    &FIELD[..FIELD.len() - 1]
                } else {
                    FIELD
                };
                let mut out = BytesMut::with_capacity(body.len() + FIELD.len());
                out.extend_from_slice(&body[..=open]);
                out.extend_from_slice(field);
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

    use crate::format::request::RequestFacts;
    use crate::format::WireFormat;
    use crate::usage::Endpoint;

    fn facts(endpoint: Endpoint, body: &[u8]) -> RequestFacts {
        WireFormat::OpenAi
            .request_facts(endpoint, &Bytes::copy_from_slice(body), "", true)
            .unwrap_or_else(|e| panic!("{e}"))
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
    fn stream_usage_is_spliced_when_absent() {
        let body = Bytes::from_static(br#"  {"model":"m","stream":true,"x":{"y":1}}"#);
        let sent = facts(Endpoint::ChatCompletions, &body).stream_options;
        let out = with_stream_usage(&body, sent).unwrap_or_default();
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
            let limit = facts(endpoint, &body).output_limit;
            let (out, effective) =
                apply_output_cap(body, limit, Some(100)).unwrap_or_else(|e| panic!("{e}"));
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
            assert_eq!(v[field], expect, "{raw}");
            assert_eq!(effective, Some(expect), "{raw}");
        }
        // Under the cap: the body is not touched.
        let body = Bytes::from_static(br#"{ "model":"m", "max_tokens": 10 }"#);
        let limit = facts(Endpoint::ChatCompletions, &body).output_limit;
        let (out, _) =
            apply_output_cap(body.clone(), limit, Some(100)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, body);
    }

    #[test]
    fn stream_usage_is_set_inside_existing_options() {
        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"other":1}}"#,
        );
        let sent = facts(Endpoint::ChatCompletions, &body).stream_options;
        let out = with_stream_usage(&body, sent).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["other"], 1);
    }
}
