//! Images and audio through tollgate (issue 22, SPEC 12): each endpoint
//! priced exactly from what the catalog bills it by (per image by size and
//! quality, per second, per character, or by tokens), uploads read from
//! their multipart bodies, budgets bounding each before it costs, and the
//! official OpenAI Python SDK.

mod support;

use serde_json::{json, Value};
use support::{client, MockUpstream, Tollgate};

async fn start(mock: &MockUpstream) -> (Tollgate, String) {
    let tg = Tollgate::start(mock, "[auth]\nmode = \"virtual-keys\"\n").await;
    let key = tg.budgeted_key("studio", "100", "monthly").await;
    (tg, key)
}

fn cost_header(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-tollgate-cost-usd")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A multipart body as the SDKs send it: text fields, then one file.
fn form(fields: &[(&str, &str)], file: (&str, &[u8])) -> (String, Vec<u8>) {
    let boundary = "tollgate-test-boundary";
    let mut out = Vec::new();
    for (name, value) in fields {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    let (name, bytes) = file;
    out.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"upload.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n")
            .as_bytes(),
    );
    out.extend_from_slice(bytes);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), out)
}

async fn post_json(
    tg: &Tollgate,
    key: &str,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client().post(tg.url(path)).bearer_auth(key).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap_or_else(|e| panic!("{e}"))
}

async fn post_form(
    tg: &Tollgate,
    key: &str,
    path: &str,
    form: (String, Vec<u8>),
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client()
        .post(tg.url(path))
        .bearer_auth(key)
        .header("content-type", form.0)
        .body(form.1);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap_or_else(|e| panic!("{e}"))
}

fn meters(row: &support::UsageRow) -> Value {
    serde_json::from_str(&row.meters).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_priced_per_image_by_size_and_quality_or_by_their_tokens() {
    let mock = MockUpstream::start().await;
    let (tg, key) = start(&mock).await;

    // dall-e-3, hd at 1024x1792: $0.12 an image.
    let r = post_json(
        &tg,
        &key,
        "/v1/images/generations",
        json!({"model": "dall-e-3", "prompt": "a lighthouse", "size": "1024x1792", "quality": "hd"}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(cost_header(&r), "0.120000000");
    let row = tg.row(&support::request_id(&r)).await;
    let body: Value = serde_json::from_slice(&mock.last().body).unwrap_or_default();
    assert_eq!(body["quality"], "hd", "the body goes up unchanged");
    assert_eq!(
        (row.endpoint.as_str(), row.model.as_str()),
        ("images", "dall-e-3")
    );
    assert_eq!(row.cost_nano_usd, 120_000_000);
    assert_eq!(meters(&row)["images"], 1);
    assert_eq!(meters(&row)["image_spec"], "1024x1792/hd");
    assert_eq!(row.cost_breakdown, r#"{"images":120000000}"#);

    // No model: OpenAI's default, dall-e-2, at 1024x1024: 3 x $0.02.
    let r = post_json(
        &tg,
        &key,
        "/v1/images/generations",
        json!({"prompt": "a lighthouse", "n": 3}),
        &[],
    )
    .await;
    assert_eq!(cost_header(&r), "0.060000000");

    // Fewer images made than asked: the ones in `data` are billed.
    let r = post_json(
        &tg,
        &key,
        "/v1/images/generations",
        json!({"model": "dall-e-2", "prompt": "x", "n": 4, "size": "256x256"}),
        &[("x-mock-images", "2")],
    )
    .await;
    assert_eq!(cost_header(&r), "0.032000000");

    // gpt-image-1 by its tokens ($5 text in, $10 image in, $40 image out
    // per M): 40 text + 10 image tokens in, 4,160 out (high, 1024x1024) =
    // 200,000 + 100,000 + 166,400,000 nano-USD.
    let tokens = [
        ("x-mock-prompt-tokens", "50"),
        ("x-mock-cached-tokens", "10"),
        ("x-mock-completion-tokens", "4160"),
    ];
    let r = post_json(
        &tg,
        &key,
        "/v1/images/generations",
        json!({"model": "gpt-image-1", "prompt": "a lighthouse", "quality": "high"}),
        &tokens,
    )
    .await;
    assert_eq!(cost_header(&r), "0.166700000");
    let row = tg.row(&support::request_id(&r)).await;
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens, row.image_tokens),
        (50, 4_160, 4_170)
    );
    let m = meters(&row);
    assert_eq!(
        (
            m["input"].clone(),
            m["image_input"].clone(),
            m["image_output"].clone()
        ),
        (json!(40), json!(10), json!(4160))
    );
    assert_eq!(row.token_source, "upstream");

    // Streamed with partial images: the `image_generation.completed`
    // event's usage prices it (each partial image's 100 tokens included).
    let r = post_json(
        &tg,
        &key,
        "/v1/images/generations",
        json!({"model": "gpt-image-1", "prompt": "a lighthouse", "stream": true, "partial_images": 2}),
        &[("x-mock-prompt-tokens", "50"), ("x-mock-completion-tokens", "4360")],
    )
    .await;
    let id = support::request_id(&r);
    let text = r.text().await.unwrap_or_default();
    assert_eq!(
        text.matches("image_generation.partial_image").count(),
        4,
        "{text}"
    );
    let row = tg.row(&id).await;
    assert!(row.stream);
    assert_eq!(meters(&row)["image_output"], 4_360);
    assert_eq!(meters(&row)["images"], 1);
    assert_eq!(row.cost_nano_usd, 50 * 5_000 + 4_360 * 40_000);

    // The edit endpoint takes an upload: the same tokens, the same price.
    let edit = form(
        &[
            ("model", "gpt-image-1"),
            ("prompt", "add a boat"),
            ("quality", "high"),
        ],
        ("image", &[0x89u8; 5_000]),
    );
    let r = post_form(&tg, &key, "/v1/images/edits", edit, &tokens).await;
    assert_eq!(r.status(), 200);
    assert_eq!(cost_header(&r), "0.166700000");
    assert_eq!(mock.last().body.len(), {
        let (_, b) = form(
            &[
                ("model", "gpt-image-1"),
                ("prompt", "add a boat"),
                ("quality", "high"),
            ],
            ("image", &[0x89u8; 5_000]),
        );
        b.len()
    });

    // Variations (dall-e-2 only), two at 512x512: 2 x $0.018.
    let variation = form(&[("n", "2"), ("size", "512x512")], ("image", &[1u8; 2_000]));
    let r = post_form(&tg, &key, "/v1/images/variations", variation, &[]).await;
    assert_eq!(cost_header(&r), "0.036000000");

    // A token model whose response omits usage is not free: its image at
    // the dearest size of its quality (medium, 1,584 tokens x $40 per M).
    let r = post_json(
        &tg,
        &key,
        "/v1/images/generations",
        json!({"model": "gpt-image-1", "prompt": "a", "quality": "medium", "size": "1536x1024"}),
        &[("x-mock-usage", "omit")],
    )
    .await;
    let row = tg.row(&support::request_id(&r)).await;
    assert_eq!(row.token_source, "estimated");
    assert_eq!(meters(&row)["image_output"], 1_584);
    assert_eq!(row.cost_nano_usd, 1_584 * 40_000);

    let metrics = tg.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "tollgate_units_total",
            &[
                ("team", "studio"),
                ("model", "dall-e-2"),
                ("unit", "images")
            ]
        ),
        Some(3.0 + 2.0 + 2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_is_priced_per_second_per_character_or_by_tokens() {
    let mock = MockUpstream::start().await;
    let (tg, key) = start(&mock).await;
    let audio = vec![0x11u8; 48_000];
    let transcribe = |fields: &[(&str, &str)]| form(fields, ("file", &audio));

    // whisper-1 ($0.006 a minute, billed per second): 12.4 s is 13 s.
    let r = post_form(
        &tg,
        &key,
        "/v1/audio/transcriptions",
        transcribe(&[("model", "whisper-1")]),
        &[("x-mock-audio-seconds", "12.4")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(cost_header(&r), "0.001300000");
    let row = tg.row(&support::request_id(&r)).await;
    assert_eq!(row.endpoint, "audio.transcriptions");
    assert_eq!(meters(&row)["audio_seconds"], 13);
    assert_eq!(row.token_source, "upstream");
    // The upload went up whole.
    assert_eq!(
        mock.last().body.len(),
        transcribe(&[("model", "whisper-1")]).1.len()
    );

    // verbose_json says `duration`; subtitles end at their last cue.
    for (format, seconds, cost, source) in [
        ("verbose_json", "8.47", 900_000, "upstream"),
        ("srt", "12.4", 1_300_000, "estimated"),
        ("vtt", "30.0", 3_000_000, "estimated"),
    ] {
        let r = post_form(
            &tg,
            &key,
            "/v1/audio/transcriptions",
            transcribe(&[("model", "whisper-1"), ("response_format", format)]),
            &[("x-mock-audio-seconds", seconds)],
        )
        .await;
        let row = tg.row(&support::request_id(&r)).await;
        assert_eq!(
            (row.cost_nano_usd, row.token_source.as_str()),
            (cost, source),
            "{format}"
        );
    }
    // Plain text says nothing: the upload's size at 128 kbps, estimated
    // (48,000 bytes: 3 s).
    let r = post_form(
        &tg,
        &key,
        "/v1/audio/transcriptions",
        transcribe(&[("model", "whisper-1"), ("response_format", "text")]),
        &[],
    )
    .await;
    assert_eq!(r.text().await.unwrap_or_default(), "Hello from the mock");
    let rows = tg
        .wait_rows_where(1, |r| {
            r.token_source == "estimated" && r.cost_nano_usd == 300_000
        })
        .await;
    assert_eq!(rows[0].endpoint, "audio.transcriptions");

    // Translations bill the same way.
    let r = post_form(
        &tg,
        &key,
        "/v1/audio/translations",
        transcribe(&[("model", "whisper-1")]),
        &[("x-mock-audio-seconds", "60")],
    )
    .await;
    assert_eq!(cost_header(&r), "0.006000000");

    // gpt-4o-transcribe by tokens: 1,000 audio in at $2.50, 50 out at $10.
    let r = post_form(
        &tg,
        &key,
        "/v1/audio/transcriptions",
        transcribe(&[("model", "gpt-4o-transcribe")]),
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-completion-tokens", "50"),
        ],
    )
    .await;
    assert_eq!(cost_header(&r), "0.003000000");
    let row = tg.row(&support::request_id(&r)).await;
    assert_eq!(row.audio_prompt_tokens, 1_000);

    // tts-1 by the characters of `input` ($0.015 per 1,000), the audio
    // bytes passed back unchanged.
    let input = "Tollgate counts every character, é included.";
    let chars = input.chars().count() as i64;
    let r = post_json(
        &tg,
        &key,
        "/v1/audio/speech",
        json!({"model": "tts-1", "input": input, "voice": "alloy"}),
        &[("x-mock-audio-bytes", "9000")],
    )
    .await;
    let id = support::request_id(&r);
    let bytes = r.bytes().await.unwrap_or_default();
    assert_eq!(bytes.len(), 9_000);
    assert!(bytes.iter().all(|b| *b == 0x49));
    let row = tg.row(&id).await;
    assert_eq!(row.endpoint, "audio.speech");
    assert_eq!(meters(&row)["characters"], chars);
    assert_eq!(row.cost_nano_usd, chars * 15_000);

    // gpt-4o-mini-tts streamed as SSE reports its tokens: 20 text in at
    // $0.60, 600 audio out at $12 per M.
    let r = post_json(
        &tg,
        &key,
        "/v1/audio/speech",
        json!({"model": "gpt-4o-mini-tts", "input": "hi", "voice": "alloy", "stream_format": "sse"}),
        &[("x-mock-prompt-tokens", "20"), ("x-mock-completion-tokens", "600")],
    )
    .await;
    let id = support::request_id(&r);
    let text = r.text().await.unwrap_or_default();
    assert!(text.contains("speech.audio.done"), "{text}");
    let row = tg.row(&id).await;
    assert!(row.stream);
    assert_eq!(row.audio_completion_tokens, 600);
    assert_eq!(row.cost_nano_usd, 20 * 600 + 600 * 12_000);

    // As bytes it reports none: estimated from the audio's length, never $0.
    let r = post_json(
        &tg,
        &key,
        "/v1/audio/speech",
        json!({"model": "gpt-4o-mini-tts", "input": "hi", "voice": "alloy", "response_format": "pcm"}),
        &[("x-mock-audio-bytes", "96000")],
    )
    .await;
    let row = tg.row(&support::request_id(&r)).await;
    assert_eq!(row.token_source, "estimated");
    // Two seconds of 24 kHz 16-bit pcm at 20 tokens a second.
    assert_eq!(row.audio_completion_tokens, 40);
    assert!(row.cost_nano_usd >= 40 * 12_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_bounds_images_and_audio_before_they_cost() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "[auth]\nmode = \"virtual-keys\"\n").await;
    let key = tg.budgeted_key("small", "0.10", "daily").await;
    let before = mock.request_count();
    // $0.12 of dall-e-3 does not fit $0.10; nothing goes up.
    let r = post_json(
        &tg,
        &key,
        "/v1/images/generations",
        json!({"model": "dall-e-3", "prompt": "x", "size": "1792x1024", "quality": "hd"}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap_or_default();
    assert_eq!(e["error"]["code"], "budget_exceeded");
    // Neither do 10 dall-e-2 images ($0.20), nor an image of unknown size
    // from a token model (its dearest: 8,000 tokens at $40 per M = $0.32).
    for body in [
        json!({"model": "dall-e-2", "prompt": "x", "n": 10}),
        json!({"model": "gpt-image-1", "prompt": "x"}),
    ] {
        let r = post_json(&tg, &key, "/v1/images/generations", body, &[]).await;
        assert_eq!(r.status(), 429);
    }
    // A 1 MB upload may hold 2,098 s of audio ($0.21 at $0.006 a minute).
    let big = form(&[("model", "whisper-1")], ("file", &vec![0u8; 1_048_576]));
    let r = post_form(&tg, &key, "/v1/audio/transcriptions", big, &[]).await;
    assert_eq!(r.status(), 429);
    // 10,000 characters of tts-1-hd: $0.30.
    let long = "a".repeat(10_000);
    let r = post_json(
        &tg,
        &key,
        "/v1/audio/speech",
        json!({"model": "tts-1-hd", "input": long, "voice": "alloy"}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        mock.request_count(),
        before,
        "nothing refused reached the upstream"
    );
    // What fits goes: 2 dall-e-2 images ($0.04), a 48 kB upload (97 s at most).
    let r = post_json(
        &tg,
        &key,
        "/v1/images/generations",
        json!({"model": "dall-e-2", "prompt": "x", "n": 2}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    let small = form(&[("model", "whisper-1")], ("file", &[0u8; 48_000]));
    let r = post_form(&tg, &key, "/v1/audio/transcriptions", small, &[]).await;
    assert_eq!(r.status(), 200);
    // A body that is no form is refused in OpenAI's shape, nothing sent.
    let before = mock.request_count();
    let r = post_json(
        &tg,
        &key,
        "/v1/audio/transcriptions",
        json!({"model": "whisper-1"}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap_or_default();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(mock.request_count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_makes_images_and_audio_through_tollgate() {
    let Some(python) = support::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let (tg, keys) = support::start_for_sdks(&mock).await;
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/media_sdk.py");
    let out = support::run_sdk_script(python, script, &tg, keys).await;
    support::assert_lines(
        &out,
        &[
            "images.generate: 1 image(s), cost 0.040000000",
            "audio.transcriptions: Hello from the mock, cost 0.001300000",
            "audio.translations: Hello from the mock",
            "audio.speech: 4800 bytes",
            "images.generate broke: 429 budget_exceeded",
        ],
    );
    let rows = tg
        .wait_rows_where(5, |r| {
            r.endpoint.starts_with("audio") || r.endpoint == "images"
        })
        .await;
    let speech = rows.iter().find(|r| r.endpoint == "audio.speech");
    assert_eq!(
        speech.map(|r| r.cost_nano_usd),
        Some(12 * 15_000),
        "12 characters of tts-1"
    );
}

#[test]
fn the_readme_catalog_snippet_prices_as_it_says() {
    let snippet = support::readme_toml("Batches, images, audio, realtime");
    let catalog =
        tollgate::pricing::Catalog::parse(&snippet, 1.0).unwrap_or_else(|e| panic!("{e}"));
    let price = |model: &str, usage: tollgate::usage::Usage| {
        let p = catalog
            .resolve(model)
            .price
            .unwrap_or_else(|| panic!("{model}"));
        p.price(&usage, tollgate::usage::ServiceTier::Standard, &[])
            .total
            .0
    };
    let hd = tollgate::usage::ImageSpec::parse("1024x1792", "hd");
    let images = tollgate::usage::Usage {
        images: Some(2),
        image_spec: hd,
        ..tollgate::usage::Usage::NONE
    };
    assert_eq!(price("dall-e-3", images), 240_000_000);
    let minute = tollgate::usage::Usage {
        audio_seconds: Some(61),
        ..tollgate::usage::Usage::NONE
    };
    assert_eq!(price("whisper-1", minute), 6_100_000);
    let chars = tollgate::usage::Usage {
        characters: Some(1_000),
        ..tollgate::usage::Usage::NONE
    };
    assert_eq!(price("tts-1", chars), 15_000_000);
}
