//! Property-based fuzzing of every parser that reads outside input (issue
//! 12, point 5): the SSE meter, usage extraction, request-meta parsing, the
//! config and catalog loaders and the LiteLLM importer. (cargo-fuzz needs a
//! nightly toolchain, which this project's machines do not have.)
//!
//! Inputs are drawn from grammars of the real formats (JSON with the field
//! names tollgate reads, SSE events, TOML tables) mixed with raw bytes, so
//! the interesting paths are reached. `PROPTEST_CASES` sets the number of
//! cases (`.ci/run` runs a longer pass). Crashes found are kept below as
//! plain regression tests.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Value};

use tollgate::config::Config;
use tollgate::format::WireFormat;
use tollgate::pricing::{litellm, Catalog};
use tollgate::proxy::body;
use tollgate::usage::frames::Framing;
use tollgate::usage::sse::SseMeter;
use tollgate::usage::Endpoint;

/// Field names tollgate reads, so generated objects hit them.
const KEYS: &[&str] = &[
    // Gemini's spellings.
    "usageMetadata",
    "promptTokenCount",
    "candidatesTokenCount",
    "cachedContentTokenCount",
    "thoughtsTokenCount",
    "toolUsePromptTokenCount",
    "promptTokensDetails",
    "candidatesTokensDetails",
    "modality",
    "tokenCount",
    "AUDIO",
    "IMAGE",
    "candidates",
    "finishReason",
    "groundingMetadata",
    "modelVersion",
    "generationConfig",
    "maxOutputTokens",
    "candidateCount",
    "googleSearch",
    "inferenceConfig",
    "maxTokens",
    "toolConfig",
    "tools",
    "max_uses",
    "max_tool_calls",
    "metadata",
    "user_id",
    "service_tier",
    "model",
    "stream",
    "stream_options",
    "include_usage",
    "n",
    "user",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "usage",
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "prompt_tokens_details",
    "input_tokens_details",
    "cached_tokens",
    "choices",
    "index",
    "delta",
    "content",
    "text",
    "refusal",
    "tool_calls",
    "function",
    "name",
    "arguments",
    "type",
    "response",
    "messages",
    "role",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
        prop::sample::select(KEYS).prop_map(|k| Value::String(k.to_string())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(KEYS).prop_map(str::to_string),
                        "[a-z_]{1,8}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A JSON document, sometimes damaged.
fn json_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        json_value(),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(v, mode, noise)| {
            let mut bytes = serde_json::to_vec(&v).unwrap_or_default();
            match mode % 4 {
                0 if !bytes.is_empty() => {
                    let at = usize::from(noise.first().copied().unwrap_or(0)) % bytes.len();
                    bytes.truncate(at);
                }
                1 => bytes.extend_from_slice(&noise),
                _ => {}
            }
            bytes
        })
}

/// One SSE event (or noise between events).
fn sse_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        json_value().prop_map(|v| format!("data: {v}\n\n").into_bytes()),
        json_value().prop_map(|v| format!("data:{v}\r\n\r\n").into_bytes()),
        (0u64..1000, 0u64..1000).prop_map(|(p, c)| format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c}}}}}\n\n"
        )
        .into_bytes()),
        ".{0,20}".prop_map(|t| format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}}}}]}}\n\n",
            json!(t)
        )
        .into_bytes()),
        (0u64..1000, 0u64..1000, 0u64..100).prop_map(|(p, c, t)| format!(
            "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"w \"}}]}},\"index\":0}}],\"usageMetadata\":{{\"promptTokenCount\":{p},\"candidatesTokenCount\":{c},\"thoughtsTokenCount\":{t}}}}}\r\n\r\n"
        )
        .into_bytes()),
        Just(b"data: [DONE]\n\n".to_vec()),
        Just(b": keep-alive\n\n".to_vec()),
        Just(b"event: response.completed\n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

fn meter_run(
    (format, endpoint): (WireFormat, Endpoint),
    strip: bool,
    stream: &[u8],
    cuts: &[usize],
) -> (Vec<u8>, SseMeter) {
    let mut meter = SseMeter::new(format.stream_reader(endpoint), strip);
    let mut out = Vec::new();
    let mut at = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.sort_unstable();
    for p in points.into_iter().chain([stream.len()]) {
        if p > at {
            out.extend_from_slice(&meter.push(Bytes::copy_from_slice(&stream[at..p])));
            at = p;
        }
    }
    out.extend_from_slice(&meter.take_pending());
    (out, meter)
}

const ENDPOINTS: [(WireFormat, Endpoint); 6] = [
    (WireFormat::OpenAi, Endpoint::ChatCompletions),
    (WireFormat::OpenAi, Endpoint::Completions),
    (WireFormat::OpenAi, Endpoint::Responses),
    (WireFormat::OpenAi, Endpoint::Embeddings),
    (WireFormat::Anthropic, Endpoint::Messages),
    (WireFormat::Gemini, Endpoint::GenerateContent),
];

const CHAT: (WireFormat, Endpoint) = (WireFormat::OpenAi, Endpoint::ChatCompletions);

/// An AWS event-stream frame as Bedrock sends them.
fn frame(kind: &str, payload: &str) -> Vec<u8> {
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
    let message = Message::new(bytes::Bytes::from(payload.to_string()))
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String("event".to_string().into()),
        ))
        .add_header(Header::new(
            ":event-type",
            HeaderValue::String(kind.to_string().into()),
        ));
    let mut out = Vec::new();
    let _ = aws_smithy_eventstream::frame::write_message_to(&message, &mut out);
    out
}

fn frame_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (0u64..1000, 0u64..1000, 0u64..100).prop_map(|(i, o, c)| frame(
            "metadata",
            &format!("{{\"usage\":{{\"inputTokens\":{i},\"outputTokens\":{o},\"cacheReadInputTokens\":{c}}}}}")
        )),
        ".{0,12}".prop_map(|t| frame(
            "contentBlockDelta",
            &json!({"contentBlockIndex": 0, "delta": {"text": t}}).to_string()
        )),
        json_value().prop_map(|v| frame("messageStop", &v.to_string())),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

proptest! {
    /// Bedrock's frames pass through unchanged wherever the chunks are cut,
    /// and the usage read does not depend on the cuts; garbage never panics.
    #[test]
    fn event_stream_meter_passes_every_byte_and_reads_the_same_usage(
        pieces in prop::collection::vec(frame_piece(), 0..10),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let stream: Vec<u8> = pieces.concat();
        let run = |cuts: &[usize]| {
            let framing = Framing::of("application/vnd.amazon.eventstream")
                .unwrap_or_else(|| panic!("no framing for event streams"));
            let mut meter = WireFormat::Bedrock.stream_meter(Endpoint::Converse, framing, false);
            let mut out = Vec::new();
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
            points.sort_unstable();
            let mut at = 0;
            for p in points.into_iter().chain([stream.len()]) {
                if p > at {
                    out.extend_from_slice(&meter.push(Bytes::copy_from_slice(&stream[at..p])));
                    at = p;
                }
            }
            out.extend_from_slice(&meter.take_pending());
            (out, meter.summary().usage.map(|u| (u.prompt_tokens, u.completion_tokens)))
        };
        let (whole_out, whole_usage) = run(&[]);
        let (split_out, split_usage) = run(&cuts);
        prop_assert_eq!(&whole_out, &stream);
        prop_assert_eq!(&split_out, &stream);
        prop_assert_eq!(whole_usage, split_usage);
    }
}

proptest! {
    /// Watching a stream never changes it, wherever the chunks are cut.
    #[test]
    fn sse_meter_passes_every_byte_through(
        pieces in prop::collection::vec(sse_piece(), 0..12),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        e in 0usize..ENDPOINTS.len(),
    ) {
        let stream = pieces.concat();
        let (out, mut meter) = meter_run(ENDPOINTS[e], false, &stream, &cuts);
        prop_assert_eq!(out, stream);
        let _ = meter.summary();
    }

    /// Stripping the usage chunk removes only usage-only events, and the
    /// result does not depend on where the chunks were cut.
    #[test]
    fn sse_meter_strips_the_same_bytes_at_any_split(
        pieces in prop::collection::vec(sse_piece(), 0..12),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let stream = pieces.concat();
        let (whole, mut m1) = meter_run(CHAT, true, &stream, &[]);
        let (split, mut m2) = meter_run(CHAT, true, &stream, &cuts);
        prop_assert_eq!(&whole, &split);
        prop_assert!(whole.len() <= stream.len());
        let (s1, s2) = (m1.summary(), m2.summary());
        prop_assert_eq!(s1.usage, s2.usage);
        prop_assert_eq!(s1.texts, s2.texts);
    }

    /// Any body: usage or no usage, never a panic, and the details a
    /// usage claims never exceed its totals.
    #[test]
    fn usage_extraction_never_panics(
        body in prop_oneof![json_bytes(), prop::collection::vec(any::<u8>(), 0..64)],
        format in prop::sample::select(vec![WireFormat::OpenAi, WireFormat::Anthropic, WireFormat::Gemini]),
    ) {
        if let Some(u) = format.read_body(Endpoint::ChatCompletions, &body).usage {
            // The meters add up to the totals exactly: no part claims
            // more than its total leaves.
            use tollgate::usage::meter::Meter;
            let side = |prompt: bool| -> u64 {
                Meter::ALL.iter().filter(|m| m.is_token() && m.is_prompt() == prompt).map(|m| m.count(&u)).sum()
            };
            prop_assert_eq!(side(true), u.prompt_tokens);
            prop_assert_eq!(side(false), u.completion_tokens);
            prop_assert!(u.reasoning() + u.audio_completion_tokens.unwrap_or(0)
                + u.image_completion_tokens.unwrap_or(0) <= u.completion_tokens);
        }
    }

    /// Any request body parses in every format or gets a 400 in OpenAI's
    /// shape; a body that parses can always be given stream usage and an
    /// output cap.
    #[test]
    fn request_facts_parse_or_explain(body in prop_oneof![json_bytes(), prop::collection::vec(any::<u8>(), 0..64)]) {
        let formats = ENDPOINTS.iter().copied().chain([
            (WireFormat::Bedrock, Endpoint::Converse),
            (WireFormat::OpenAi, Endpoint::Images),
            (WireFormat::OpenAi, Endpoint::AudioSpeech),
        ]);
        let bytes = Bytes::from(body.clone());
        for (format, endpoint) in formats {
            match format.request_facts(endpoint, &bytes, "application/json", true) {
                Ok(facts) => {
                    // Only where tollgate asks for stream usage (chat, completions).
                    let injects = endpoint.accepts_stream_options();
                    if let (true, Ok(out)) = (injects, body::with_stream_usage(&bytes, facts.stream_options)) {
                        let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
                        prop_assert_eq!(&v["stream_options"]["include_usage"], &json!(true));
                    }
                    let capped = body::apply_output_cap(bytes.clone(), facts.output_limit, Some(7));
                    if let (Ok((out, limit)), Some(field)) = (capped, facts.output_limit.field) {
                        // The limit said is the limit sent.
                        prop_assert!(limit.is_some_and(|l| l <= 7));
                        let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
                        let sent = field.split('.').fold(&v, |v, part| &v[part]);
                        prop_assert_eq!(sent.as_u64(), limit, "{}", field);
                    }
                    let _ = facts.tool_call_bound(3);
                }
                Err(e) => {
                    prop_assert_eq!(e.status().as_u16() / 100, 4);
                    prop_assert!(e.body()["error"]["message"].is_string());
                }
            }
        }
    }

    /// Upload bodies (multipart, any bytes around real parts) and image and
    /// transcription responses: read or refused, never a panic.
    #[test]
    fn uploads_and_media_bodies_never_panic(
        junk in prop::collection::vec(any::<u8>(), 0..200),
        cut in 0usize..400,
        body in json_bytes(),
    ) {
        let mut form = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n".to_vec();
        form.extend_from_slice(&junk);
        form.extend_from_slice(b"\r\n--b--\r\n");
        form.truncate(cut.max(1).min(form.len()));
        let form = Bytes::from(form);
        for endpoint in [Endpoint::AudioTranscriptions, Endpoint::Images] {
            match WireFormat::OpenAi.request_facts(endpoint, &form, "multipart/form-data; boundary=b", false) {
                Ok(facts) => prop_assert!(facts.units.audio_bytes.unwrap_or(0) <= junk.len() as u64 + 8),
                Err(e) => prop_assert_eq!(e.status().as_u16() / 100, 4),
            }
            let _ = WireFormat::OpenAi.read_body(endpoint, &body);
            let _ = WireFormat::OpenAi.read_body(endpoint, &junk);
        }
    }

    /// Config text: loads or names what is wrong; never panics.
    #[test]
    fn config_loader_never_panics(text in config_text()) {
        if let Err(e) = Config::parse(&text, "fuzz.toml") {
            prop_assert!(e.to_string().contains("fuzz.toml"));
        }
    }

    /// Catalog text: loads or names what is wrong; never panics.
    #[test]
    fn catalog_loader_never_panics(text in catalog_text(), multiple in any::<f64>()) {
        if let Ok(c) = Catalog::parse(&text, multiple.abs()) {
            let _ = c.problems();
            let _ = c.resolve("ft:gpt-4o-mini-2024-07-18:org::x");
        }
    }

    /// The LiteLLM importer never panics, and what it writes loads.
    #[test]
    fn litellm_import_writes_a_loadable_catalog(map in litellm_map()) {
        if let Ok(imported) = litellm::import(&map, "openai", &[]) {
            prop_assert!(Catalog::parse(&imported.toml, 6.0).is_ok(), "{}", imported.toml);
        }
    }
}

fn toml_scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        ".{0,10}".prop_map(|s| format!("{:?}", s)),
        Just("true".to_string()),
        Just("[\"*\"]".to_string()),
        Just("\"${HOME}\"".to_string()),
    ]
}

fn config_text() -> impl Strategy<Value = String> {
    let table = prop::sample::select(
        &[
            "[server]",
            "[database]",
            "[auth]",
            "[catalog]",
            "[[upstreams]]",
            "[nope]",
        ][..],
    );
    let key = prop::sample::select(
        &[
            "listen",
            "max_body_bytes",
            "admin_token",
            "url",
            "batch_size",
            "queue_capacity",
            "mode",
            "allow_unmetered",
            "durability",
            "spool_path",
            "finetune_multiple",
            "unpriced",
            "name",
            "base_url",
            "api_key",
            "models",
            "timeout_ms",
            "header_timeout_ms",
            "lease_timeout_ms",
        ][..],
    );
    prop::collection::vec(
        (table, prop::collection::vec((key, toml_scalar()), 0..4)),
        0..4,
    )
    .prop_map(|tables| {
        tables
            .into_iter()
            .map(|(t, kv)| {
                let body: String = kv
                    .into_iter()
                    .map(|(k, v)| format!("{k} = {v}\n"))
                    .collect();
                format!("{t}\n{body}")
            })
            .collect()
    })
}

fn catalog_text() -> impl Strategy<Value = String> {
    let key = prop::sample::select(
        &[
            "input",
            "output",
            "cached_input",
            "max_output_tokens",
            "encoding",
            "mode",
            "other",
        ][..],
    );
    let model = prop_oneof![
        Just("gpt-4o".to_string()),
        Just("ft:gpt-4o".to_string()),
        "[a-z0-9:.-]{0,12}"
    ];
    prop::collection::vec(
        (model, prop::collection::vec((key, toml_scalar()), 0..4)),
        0..4,
    )
    .prop_map(|rows| {
        rows.into_iter()
            .map(|(m, kv)| {
                let body: String = kv
                    .into_iter()
                    .map(|(k, v)| format!("{k} = {v}\n"))
                    .collect();
                format!("[models.{:?}]\n{body}", m)
            })
            .collect()
    })
}

fn litellm_map() -> impl Strategy<Value = String> {
    let price = prop_oneof![
        any::<f64>().prop_map(|f| json!(f)),
        (0u32..100).prop_map(|n| json!(f64::from(n) * 1e-7)),
        Just(json!("x")),
        Just(Value::Null)
    ];
    let entry = (price.clone(), price.clone(), price, prop_oneof![Just(json!(4096)), Just(json!("big"))], prop::sample::select(&["chat", "embedding", "image_generation", "responses"][..]))
        .prop_map(|(i, o, c, m, mode)| {
            json!({"input_cost_per_token": i, "output_cost_per_token": o, "cache_read_input_token_cost": c,
                   "max_output_tokens": m, "litellm_provider": "openai", "mode": mode})
        });
    prop::collection::vec(
        ("[a-z0-9:./\"\\\\-]{1,12}", prop_oneof![entry, json_value()]),
        0..5,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().collect()).to_string())
}
