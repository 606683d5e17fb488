//! Anthropic's Messages API through tollgate (SPEC 10): the README's
//! "Claude through tollgate" snippet as written, the mock speaking
//! Anthropic's JSON and SSE, exact costs with cache reads, 5-minute and
//! 1-hour cache writes and web searches, cut and abandoned streams, errors
//! in Anthropic's shape, and the official `anthropic` Python SDK.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{client, messages, MockUpstream, Tollgate};

struct Claude {
    tg: Tollgate,
    key: String,
    broke: String,
}

/// The README's snippet, the mock standing in for api.anthropic.com.
fn anthropic_config(mock: &MockUpstream, dir: &std::path::Path) -> String {
    support::readme_config(
        "Claude through tollgate",
        mock,
        dir,
        "https://api.anthropic.com",
        ("${ANTHROPIC_API_KEY}", "sk-ant-upstream-secret"),
    )
}

async fn start(mock: &MockUpstream) -> Claude {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = anthropic_config(mock, dir.path());
    let (tg, key, broke) = support::start_app_and_broke(dir, &config).await;
    Claude { tg, key, broke }
}

fn body(stream: bool) -> Value {
    json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": stream,
           "messages": [{"role": "user", "content": "Hello, Claude"}]})
}

/// A Messages request as the SDK sends it: `x-api-key`, `anthropic-version`.
/// 1,000 uncached input, 2,000 read from the cache, 400 written for 5
/// minutes and 100 for an hour, 200 output, 2 web searches on
/// claude-sonnet-4-5 ($3 / $15 per M, reads $0.30, writes $3.75 and $6,
/// searches $10 per 1000): 3,000,000 + 600,000 + 1,500,000 + 600,000 +
/// 3,000,000 + 20,000,000 nano-USD.
const EVERY_KIND: [(&str, &str); 6] = [
    ("x-mock-prompt-tokens", "1000"),
    ("x-mock-cached-tokens", "2000"),
    ("x-mock-cache-write-5m", "400"),
    ("x-mock-cache-write-1h", "100"),
    ("x-mock-completion-tokens", "200"),
    ("x-mock-web-searches", "2"),
];
const EVERY_KIND_COST: i64 = 28_700_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_messages_are_priced_exactly_streamed_or_not() {
    let mock = MockUpstream::start().await;
    let c = start(&mock).await;

    // JSON, key in `x-api-key`.
    let r = messages(c.tg.url("/v1/messages"), &c.key, &body(false), &EVERY_KIND)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.028700000")
    );
    let json_id = support::request_id(&r);
    let answer: Value = r.json().await.unwrap_or_default();
    assert_eq!(answer["content"][0]["text"], "Hello from the mock");
    let up = mock.last();
    assert_eq!(up.path, "/v1/messages");
    assert_eq!(
        up.header("x-api-key").as_deref(),
        Some("sk-ant-upstream-secret")
    );
    assert_eq!(
        up.header("anthropic-version").as_deref(),
        Some("2023-06-01")
    );
    assert_eq!(up.header("authorization"), None);

    // Streamed, key as a Bearer token (Claude Code's ANTHROPIC_AUTH_TOKEN):
    // the client gets exactly the bytes the provider sent.
    let r = client()
        .post(c.tg.url("/v1/messages"))
        .bearer_auth(&c.key)
        .header("anthropic-version", "2023-06-01")
        .headers(headers(&EVERY_KIND))
        .json(&body(true))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let stream_id = support::request_id(&r);
    let through = r.bytes().await.unwrap_or_default();
    let direct = messages(
        format!("http://{}/v1/messages", mock.addr),
        "sk-ant-upstream-secret",
        &body(true),
        &EVERY_KIND,
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .bytes()
    .await
    .unwrap_or_default();
    assert_eq!(through, direct, "stream events pass byte for byte");
    let text = String::from_utf8_lossy(&through);
    for event in [
        "message_start",
        "content_block_delta",
        "ping",
        "message_delta",
        "message_stop",
    ] {
        assert!(text.contains(&format!("event: {event}\n")), "{text}");
    }

    for (id, stream) in [(json_id.clone(), false), (stream_id, true)] {
        let r = c.tg.row(&id).await;
        assert_eq!(r.cost_nano_usd, EVERY_KIND_COST, "{r:?}");
        assert_eq!(r.stream, stream);
        assert_eq!(
            (
                r.endpoint.as_str(),
                r.provider.as_str(),
                r.upstream.as_str()
            ),
            ("messages", "anthropic", "anthropic")
        );
        assert_eq!(
            (r.model.as_str(), r.team.as_str()),
            ("claude-sonnet-4-5", "app")
        );
        assert_eq!(
            (r.prompt_tokens, r.cached_tokens, r.cache_write_tokens),
            (3500, 2000, 500),
            "the prompt counts cache reads and writes"
        );
        assert_eq!((r.completion_tokens, r.tool_calls), (200, 2));
        assert_eq!(r.token_source, "upstream");
        let breakdown: Value = serde_json::from_str(&r.cost_breakdown).unwrap_or_default();
        assert_eq!(
            breakdown,
            // A line per meter: 1,500,000 for 5-minute writes, 600,000 for 1-hour ones.
            json!({"input": 3_000_000, "cached_input": 600_000, "cache_write": 1_500_000,
                   "cache_write_1h": 600_000, "output": 3_000_000, "tool_calls": 20_000_000}),
            "{r:?}"
        );
        // The meters keep what the breakdown and the count columns fold.
        let meters: Value = serde_json::from_str(&r.meters).unwrap_or_default();
        assert_eq!(
            meters,
            json!({"input": 1000, "cached_input": 2000, "cache_write": 400,
                   "cache_write_1h": 100, "output": 200, "web_search": 2}),
            "{r:?}"
        );
    }
    // Priced again as itself from its stored meters, a row costs exactly
    // what it cost: the 1-hour writes are not folded into 5-minute ones.
    let out = support::stdout(&c.tg.cli(&[
        "report",
        "--shadow",
        "claude-sonnet-4-5",
        "--format",
        "json",
    ]));
    let report: Value = serde_json::from_str(&out).unwrap_or_default();
    let line = report["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["model"] == "claude-sonnet-4-5"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(line["requests"], 2, "{report}");
    assert_eq!(line["cost_nano_usd"], 2 * EVERY_KIND_COST, "{report}");
    assert_eq!(
        line["shadow_cost_nano_usd"],
        2 * EVERY_KIND_COST,
        "{report}"
    );

    // The served snapshot prices the request when the catalog has it; an
    // answer that stopped at max_tokens is marked capped, streamed or not.
    for stream in [false, true] {
        let r = messages(
            c.tg.url("/v1/messages"),
            &c.key,
            &json!({"model": "claude-haiku-4-5", "max_tokens": 100, "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}]}),
            &[
                ("x-mock-prompt-tokens", "1000"),
                ("x-mock-completion-tokens", "100"),
                ("x-mock-model", "claude-haiku-4-5-20251001"),
                ("x-mock-finish-reason", "max_tokens"),
            ],
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let id = support::request_id(&r);
        let _ = r.bytes().await;
        let r = c.tg.row(&id).await;
        // $1 / $5 per M: 1,000,000 + 500,000.
        assert_eq!(
            (r.cost_nano_usd, r.base_model.as_str(), r.capped),
            (1_500_000, "claude-haiku-4-5-20251001", true)
        );
    }
    // Answers that ended by themselves are not.
    let r = c.tg.row(&json_id).await;
    assert!(!r.capped);
}

fn headers(pairs: &[(&str, &str)]) -> reqwest::header::HeaderMap {
    let mut map = reqwest::header::HeaderMap::new();
    for (k, v) in pairs {
        if let (Ok(k), Ok(v)) = (
            reqwest::header::HeaderName::from_bytes(k.as_bytes()),
            reqwest::header::HeaderValue::from_str(v),
        ) {
            map.insert(k, v);
        }
    }
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_and_abandoned_claude_streams_bill_their_input_and_the_output_seen() {
    let mock = MockUpstream::start().await;
    let c = start(&mock).await;
    let tokens = [
        ("x-mock-prompt-tokens", "1000"),
        ("x-mock-completion-tokens", "500"),
        ("x-mock-content", "one two three four five six"),
        // Time for each word to reach tollgate before a cut resets the
        // connection (a reset can drop bytes still in flight).
        ("x-mock-chunk-delay-ms", "20"),
    ];

    // Cut by the provider after two words.
    let mut cut = tokens.to_vec();
    cut.push(("x-mock-cut-after", "2"));
    let r = messages(c.tg.url("/v1/messages"), &c.key, &body(true), &cut)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cut_id = support::request_id(&r);
    let got = r.bytes().await;
    assert!(got.is_err(), "the client sees the stream break");

    // An `error` event (overloaded) after the first word.
    let mut errored = tokens.to_vec();
    errored.push(("x-mock-stream-error", "1"));
    let r = messages(c.tg.url("/v1/messages"), &c.key, &body(true), &errored)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let error_id = support::request_id(&r);
    let text = r.text().await.unwrap_or_default();
    assert!(text.contains("event: error\n"), "{text}");

    // Abandoned by the client after the first word.
    let mut gated = tokens.to_vec();
    gated.push(("x-mock-gate", "1"));
    let mut r = messages(c.tg.url("/v1/messages"), &c.key, &body(true), &gated)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let gone_id = support::request_id(&r);
    let mut seen = String::new();
    while !seen.contains("one ") {
        match tokio::time::timeout(Duration::from_secs(5), r.chunk()).await {
            Ok(Ok(Some(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("stream ended early: {other:?}"),
        }
    }
    drop(r);
    mock.open_gate();

    // Input as `message_start` reported it ($3 per M), the output counted
    // from the words delivered ($15 per M), never the 500 the full answer
    // would have cost.
    for (id, status, words) in [
        (cut_id, 502, "one two "),
        (error_id, 200, "one "),
        (gone_id, 499, "one "),
    ] {
        let r = c.tg.row(&id).await;
        let expected_output = tiktoken_count(words);
        assert_eq!(r.status, status, "{r:?}");
        assert_eq!(r.prompt_tokens, 1000, "{r:?}");
        assert_eq!(r.completion_tokens, expected_output, "{r:?}");
        assert_eq!(r.token_source, "estimated");
        assert_eq!(
            r.cost_nano_usd,
            3_000_000 + expected_output * 15_000,
            "{r:?}"
        );
    }
}

/// o200k_base tokens of a text, as tollgate counts an estimate; at least
/// the one output token `message_start` reports.
fn tiktoken_count(text: &str) -> i64 {
    let n = tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as i64;
    n.max(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_paths_are_forwarded_and_errors_come_in_anthropic_shape() {
    let mock = MockUpstream::start().await;
    let c = start(&mock).await;

    // count_tokens: forwarded (free, allowed for a team with a budget).
    let r = messages(
        c.tg.url("/v1/messages/count_tokens"),
        &c.key,
        &json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}),
        &[("x-mock-prompt-tokens", "14")],
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let count: Value = r.json().await.unwrap_or_default();
    assert_eq!(count["input_tokens"], 14);
    let up = mock.last();
    assert_eq!(up.path, "/v1/messages/count_tokens");
    assert_eq!(
        up.header("x-api-key").as_deref(),
        Some("sk-ant-upstream-secret")
    );

    // A provider error passes through as the provider spelled it.
    let r = messages(
        c.tg.url("/v1/messages"),
        &c.key,
        &body(false),
        &[("x-mock-status", "529")],
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 529);
    let e: Value = r.json().await.unwrap_or_default();
    assert_eq!(e["error"]["type"], "overloaded_error");

    // tollgate's own errors in Anthropic's shape; nothing reaches the provider.
    let before = mock.request_count();
    let r = messages(c.tg.url("/v1/messages"), "tg-wrong", &body(false), &[])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap_or_default();
    assert_eq!(
        (e["type"].as_str(), e["error"]["type"].as_str()),
        (Some("error"), Some("authentication_error"))
    );
    let r = messages(c.tg.url("/v1/messages"), &c.broke, &body(false), &[])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap_or_default();
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert_eq!(e["error"]["code"], "budget_exceeded");
    // An unpriced Claude model for a budgeted team.
    let r = messages(
        c.tg.url("/v1/messages"),
        &c.key,
        &json!({"model": "claude-unknown-9", "max_tokens": 10, "messages": []}),
        &[],
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap_or_default();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["code"], "model_not_priced");
    assert_eq!(mock.request_count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_reserves_max_tokens_of_claude_output() {
    let mock = MockUpstream::start().await;
    let c = start(&mock).await;
    // $0.01 a day: 500 output tokens of claude-sonnet-4-5 are $0.0075, but
    // max_tokens 1000 could cost $0.015 and is refused before it is sent.
    let key = c.tg.budgeted_key("small", "0.01", "daily").await;
    let before = mock.request_count();
    let ask = |max_tokens: u64| {
        messages(
            c.tg.url("/v1/messages"),
            &key,
            &json!({"model": "claude-sonnet-4-5", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}),
            &[("x-mock-prompt-tokens", "10"), ("x-mock-completion-tokens", "5")],
        )
        .send()
    };
    let r = ask(1000).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 429);
    assert_eq!(mock.request_count(), before);
    let r = ask(500).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let up = mock.last();
    assert_eq!(up.json()["max_tokens"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_works_with_tollgate_as_its_base_url() {
    let Some(python) = support::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let c = start(&mock).await;
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/anthropic_sdk.py");
    let endpoint = c.tg.url("");
    let (key, broke) = (c.key.clone(), c.broke.clone());
    let stdout = support::run_script(
        python,
        script,
        &[
            ("TOLLGATE_ENDPOINT", endpoint),
            ("TG_KEY", key),
            ("TG_KEY_BROKE", broke),
        ],
    )
    .await;
    support::assert_lines(
        &stdout,
        &[
            "create 0.008700000 claude-sonnet-4-5 1000 2000 Hello from the mock",
            "stream Hello from the mock 200",
            "count_tokens 14",
            "broke 429 rate_limit_error budget_exceeded",
            "wrong key 401 authentication_error",
        ],
    );
    let paths: Vec<String> = mock.requests().iter().map(|r| r.path.clone()).collect();
    assert!(
        paths.iter().any(|p| p == "/v1/messages/count_tokens"),
        "{paths:?}"
    );
    let rows =
        c.tg.wait_rows_where(2, |r| r.endpoint == "messages" && r.status == 200)
            .await;
    let costs: Vec<(bool, i64)> = rows.iter().map(|r| (r.stream, r.cost_nano_usd)).collect();
    assert_eq!(costs, vec![(false, 8_700_000), (true, 8_700_000)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_passthrough_the_clients_own_anthropic_key_goes_up_and_never_the_servers() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = anthropic_config(&mock, dir.path())
        .replace("mode = \"virtual-keys\"", "mode = \"passthrough\"");
    let tg = Tollgate::start_with_config(dir, &config).await;
    let r = messages(
        tg.url("/v1/messages"),
        "sk-ant-the-clients-own",
        &body(false),
        &[("x-tollgate-team", "research")],
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let id = support::request_id(&r);
    let up = mock.last();
    assert_eq!(
        up.header("x-api-key").as_deref(),
        Some("sk-ant-the-clients-own")
    );
    let row = tg.row(&id).await;
    // 10 in / 5 out (the mock's default) on claude-sonnet-4-5: 30,000 + 75,000.
    assert_eq!(
        (row.team.as_str(), row.cost_nano_usd),
        ("research", 105_000)
    );
    // A tollgate key is refused, not forwarded.
    let r = messages(tg.url("/v1/messages"), "tg-not-here", &body(false), &[])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap_or_default();
    assert_eq!(e["error"]["type"], "authentication_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_version_header_routes_to_the_anthropic_upstream() {
    // OpenAI first, matching every model; Anthropic second.
    let openai = MockUpstream::start().await;
    let claude = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let upstreams = format!(
        "[[upstreams]]\nname = \"openai\"\nbase_url = \"{}\"\napi_key = \"sk-openai\"\nmodels = [\"*\"]\n\n{}",
        openai.base_url(),
        support::readme_toml("Claude through tollgate")
            .replace("https://api.anthropic.com", &format!("http://{}", claude.addr))
            .replace("${ANTHROPIC_API_KEY}", "sk-ant-upstream-secret"),
    );
    let config = support::config_around(dir.path(), &upstreams);
    let tg = Tollgate::start_with_config(dir, &config).await;
    support::stdout(&tg.cli(&["teams", "create", "app"]));
    let key = tg.new_key("app");
    support::wait_for_key(&tg, &key).await;
    let (o0, c0) = (openai.request_count(), claude.request_count());

    // The SDKs' `GET /v1/models` carries anthropic-version: Anthropic's list.
    let r = client()
        .get(tg.url("/v1/models"))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert_eq!(
        (openai.request_count(), claude.request_count()),
        (o0, c0 + 1)
    );
    assert_eq!(
        claude.last().header("x-api-key").as_deref(),
        Some("sk-ant-upstream-secret")
    );
    // Without it: the first upstream, OpenAI's.
    let r = client()
        .get(tg.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert_eq!(
        (openai.request_count(), claude.request_count()),
        (o0 + 1, c0 + 1)
    );
    assert_eq!(
        openai.last().header("authorization").as_deref(),
        Some("Bearer sk-openai")
    );
    // Messages go to Anthropic although "*" on OpenAI matches the model.
    let r = messages(tg.url("/v1/messages"), &key, &body(false), &[])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert_eq!(claude.last().path, "/v1/messages");
    assert_eq!(openai.request_count(), o0 + 1);
}
