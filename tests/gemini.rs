//! Google's Gemini API through tollgate (SPEC 11): the README's "Gemini"
//! snippet as written, the mock speaking Gemini's JSON, SSE and errors,
//! exact costs with cached content, thoughts, tool-use prompts, audio and
//! grounding, the client's key in `x-goog-api-key` or `?key=` and never
//! forwarded, errors in Google's shape, and the official `google-genai`
//! Python SDK.

mod support;

use serde_json::{json, Value};
use support::{client, MockUpstream, Tollgate};

const SERVER_KEY: &str = "AIza-upstream-secret";

struct Gemini {
    tg: Tollgate,
    key: String,
    broke: String,
}

/// The README's snippet, the mock standing in for Google's API.
async fn start(mock: &MockUpstream) -> Gemini {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = support::readme_config(
        "Gemini",
        mock,
        dir.path(),
        "https://generativelanguage.googleapis.com",
        ("${GEMINI_API_KEY}", SERVER_KEY),
    );
    let (tg, key, broke) = support::start_app_and_broke(dir, &config).await;
    Gemini { tg, key, broke }
}

fn body() -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": "Hello, Gemini"}]}],
           "generationConfig": {"maxOutputTokens": 2048}})
}

/// A request as `google-genai` sends it: the key in `x-goog-api-key`.
fn generate(
    url: String,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    let mut req = client().post(url).header("x-goog-api-key", key).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req
}

/// gemini-2.5-flash ($0.30 in, $0.03 cached, $1.00 audio in, $2.50 out per
/// M): a 10,000-token prompt with 4,000 cached and 1,000 of audio, 500
/// tool-use prompt tokens, 800 answer and 200 thought tokens. Input:
/// 10,500 - 4,000 - 1,000 = 5,500 x 0.30 = 1,650,000; cached 4,000 x 0.03
/// = 120,000; audio 1,000 x 1.00 = 1,000,000; output (800 + 200) x 2.50 =
/// 2,500,000 nano-USD.
const EVERY_KIND: [(&str, &str); 6] = [
    ("x-mock-prompt-tokens", "10000"),
    ("x-mock-cached-tokens", "4000"),
    ("x-mock-audio-prompt-tokens", "1000"),
    ("x-mock-tool-use-tokens", "500"),
    ("x-mock-completion-tokens", "800"),
    ("x-mock-thoughts-tokens", "200"),
];
const EVERY_KIND_COST: i64 = 5_270_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_content_is_priced_exactly_streamed_or_not() {
    let mock = MockUpstream::start().await;
    let g = start(&mock).await;

    // JSON, key in `x-goog-api-key`.
    let r = generate(
        g.tg.url("/v1beta/models/gemini-2.5-flash:generateContent"),
        &g.key,
        &body(),
        &EVERY_KIND,
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.005270000")
    );
    let id = support::request_id(&r);
    let answer: Value = r.json().await.unwrap_or_default();
    assert_eq!(
        answer["candidates"][0]["content"]["parts"][0]["text"],
        "Hello from the mock"
    );
    let json_row = g.tg.row(&id).await;
    assert_eq!(
        (
            json_row.endpoint.as_str(),
            json_row.provider.as_str(),
            json_row.stream,
            json_row.model.as_str()
        ),
        ("generate_content", "gemini", false, "gemini-2.5-flash")
    );
    assert_eq!(
        (
            json_row.prompt_tokens,
            json_row.cached_tokens,
            json_row.audio_prompt_tokens,
            json_row.completion_tokens,
            json_row.reasoning_tokens
        ),
        (10_500, 4_000, 1_000, 1_000, 200)
    );
    assert_eq!(json_row.cost_nano_usd, EVERY_KIND_COST);
    assert_eq!(json_row.token_source, "upstream");
    let up = mock.last();
    assert_eq!(
        up.header("x-goog-api-key").as_deref(),
        Some(SERVER_KEY),
        "the server's key goes up"
    );
    assert_eq!(up.path, "/v1beta/models/gemini-2.5-flash:generateContent");

    // SSE, key in `?key=`: every chunk passes, the last running total counts.
    let url = format!(
        "{}?alt=sse&key={}",
        g.tg.url("/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
        g.key
    );
    let mut req = client().post(url).json(&body());
    for (k, v) in EVERY_KIND {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let id = support::request_id(&r);
    let text = r.text().await.unwrap_or_default();
    let chunks: Vec<Value> = text
        .split("\r\n\r\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    assert_eq!(chunks.len(), 4, "{text}");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["candidates"][0]["content"]["parts"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, "Hello from the mock");
    let stream_row = g.tg.row(&id).await;
    assert!(stream_row.stream);
    assert_eq!(stream_row.status, 200);
    assert_eq!(stream_row.cost_nano_usd, EVERY_KIND_COST);
    // The client's tollgate key went no further: not in the path, not in a header.
    let up = mock.last();
    assert_eq!(
        up.path,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    );
    assert_eq!(up.header("x-goog-api-key").as_deref(), Some(SERVER_KEY));
    for r in mock.requests() {
        assert!(!r.path.contains("tg-"), "{}", r.path);
        for (name, value) in &r.headers {
            assert!(
                !value.to_str().unwrap_or("").contains("tg-"),
                "{name} carried the client's key"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grounding_with_google_search_is_a_web_search_call() {
    let mock = MockUpstream::start().await;
    let g = start(&mock).await;
    let mut grounded = body();
    grounded["tools"] = json!([{"googleSearch": {}}]);
    let headers = [
        ("x-mock-prompt-tokens", "1000"),
        ("x-mock-completion-tokens", "100"),
        ("x-mock-grounded", "1"),
    ];
    let r = generate(
        g.tg.url("/v1beta/models/gemini-2.5-flash:generateContent"),
        &g.key,
        &grounded,
        &headers,
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let row = g.tg.row(&support::request_id(&r)).await;
    // 1,000 x 0.30 + 100 x 2.50 = 300,000 + 250,000; one grounded answer at
    // $35 per 1000: 35,000,000 nano-USD.
    assert_eq!(row.tool_calls, 1);
    assert_eq!(row.cost_nano_usd, 35_550_000);
    let breakdown: Value = serde_json::from_str(&row.cost_breakdown).unwrap_or_default();
    assert_eq!(breakdown["tool_calls"], 35_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_back_in_googles_shape_and_nothing_goes_up() {
    let mock = MockUpstream::start().await;
    let g = start(&mock).await;
    let url = g.tg.url("/v1beta/models/gemini-2.5-flash:generateContent");
    let before = mock.request_count();

    let r = generate(url.clone(), "tg-wrong", &body(), &[])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap_or_default();
    assert_eq!(e["error"]["code"], 401);
    assert_eq!(e["error"]["status"], "UNAUTHENTICATED");

    // No key at all: refused, not sent up with the server's.
    let r = client()
        .post(url.clone())
        .json(&body())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 401);

    let r = generate(url, &g.broke, &body(), &[])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap_or_default();
    assert_eq!(e["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(e["error"]["details"][0]["reason"], "budget_exceeded");
    assert_eq!(mock.request_count(), before);

    // The upstream's own errors reach the client unchanged.
    let r = generate(
        g.tg.url("/v1beta/models/gemini-2.5-flash:generateContent"),
        &g.key,
        &body(),
        &[("x-mock-status", "503")],
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.unwrap_or_default();
    assert_eq!(e["error"]["status"], "UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_reserves_max_output_times_candidates_and_a_cap_is_sent_nested() {
    let mock = MockUpstream::start().await;
    let g = start(&mock).await;
    // A team whose budget covers a short answer but not 64k output tokens
    // at $2.50 per M ($0.16): reserved from the body, refused before upstream.
    let key = g.tg.budgeted_key("small", "0.01", "daily").await;
    let url = g.tg.url("/v1beta/models/gemini-2.5-flash:generateContent");
    let ask = |max: u64, candidates: u64| {
        let mut b = body();
        b["generationConfig"] = json!({"maxOutputTokens": max, "candidateCount": candidates});
        generate(url.clone(), &key, &b, &[]).send()
    };
    let before = mock.request_count();
    // 2 x 2,000 tokens at $2.50 per M = $0.01 of output alone, plus the prompt.
    let r = ask(2_000, 2).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 429);
    assert_eq!(mock.request_count(), before);
    let r = ask(1_000, 2).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let row = g.tg.row(&support::request_id(&r)).await;
    assert_eq!(row.choices, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_estimated_and_token_counting_is_free() {
    let mock = MockUpstream::start().await;
    let g = start(&mock).await;
    let r = client()
        .post(g.tg.url("/v1beta/models/gemini-embedding-001:embedContent"))
        .header("x-goog-api-key", &g.key)
        .json(&json!({"content": {"parts": [{"text": "one two three four"}]}}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let embedded = g.tg.row(&support::request_id(&r)).await;
    assert_eq!(embedded.endpoint, "embeddings");
    assert_eq!(embedded.token_source, "estimated");
    // "one two three four" is 4 tokens in o200k_base; $0.15 per M.
    assert_eq!((embedded.prompt_tokens, embedded.cost_nano_usd), (4, 600));

    // countTokens: allowed for a team with a budget, forwarded, free.
    let r = client()
        .post(g.tg.url("/v1beta/models/gemini-2.5-flash:countTokens"))
        .header("x-goog-api-key", &g.key)
        .header("x-mock-prompt-tokens", "14")
        .json(&body())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let id = support::request_id(&r);
    let count: Value = r.json().await.unwrap_or_default();
    assert_eq!(count["totalTokens"], 14);
    let counted = g.tg.row(&id).await;
    assert_eq!(
        (counted.endpoint.as_str(), counted.cost_nano_usd),
        ("other", 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_google_genai_sdk_works_with_tollgate_as_its_base_url() {
    let Some(python) = support::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let g = start(&mock).await;
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/gemini_sdk.py");
    let stdout = support::run_script(
        python,
        script,
        &[
            ("TOLLGATE_ENDPOINT", g.tg.url("")),
            ("TG_KEY", g.key.clone()),
            ("TG_KEY_BROKE", g.broke.clone()),
        ],
    )
    .await;
    support::assert_lines(
        &stdout,
        &[
            "generate Hello from the mock 10000 4000 200",
            "stream Hello from the mock 800",
            "count_tokens 14",
            "embed 3",
            "broke 429 RESOURCE_EXHAUSTED",
            "wrong key 401 UNAUTHENTICATED",
        ],
    );
    let rows =
        g.tg.wait_rows_where(2, |r| r.endpoint == "generate_content" && r.status == 200)
            .await;
    let costs: Vec<(bool, i64)> = rows.iter().map(|r| (r.stream, r.cost_nano_usd)).collect();
    assert_eq!(
        costs,
        vec![(false, EVERY_KIND_COST), (true, EVERY_KIND_COST)]
    );
}
