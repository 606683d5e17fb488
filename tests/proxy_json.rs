//! Non-streaming requests through a real tollgate to the mock upstream:
//! exact usage, exact cost, untouched forwarding, one row per request.

mod support;

use serde_json::json;
use support::{chat_body, client, metric, MockUpstream, Tollgate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_is_priced_exactly_and_recorded() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let mut body = chat_body("gpt-4o-mini");
    body["user"] = json!("end-user-7");
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-tollgate-team", "search")
        .header("x-mock-prompt-tokens", "1000")
        .header("x-mock-completion-tokens", "500")
        .header("x-mock-cached-tokens", "200")
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    // 800 x $0.15/M + 200 x $0.075/M + 500 x $0.60/M = $0.000435
    assert_eq!(
        resp.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.000435000")
    );
    let request_id = resp
        .headers()
        .get("x-tollgate-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_default();
    assert!(request_id.starts_with("req_"), "{request_id}");
    let out: serde_json::Value = resp.json().await.unwrap_or_default();
    assert_eq!(
        out["choices"][0]["message"]["content"],
        "Hello from the mock"
    );

    let rows = tg.wait_rows(1).await;
    let row = &rows[0];
    assert_eq!(row.request_id, request_id);
    assert_eq!(row.team, "search");
    assert_eq!(row.model, "gpt-4o-mini");
    assert_eq!(row.base_model, "gpt-4o-mini");
    assert_eq!(row.upstream, "mock");
    assert_eq!(row.endpoint, "chat.completions");
    assert!(!row.stream);
    assert_eq!(row.status, 200);
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens, row.cached_tokens),
        (1000, 500, 200)
    );
    assert_eq!(row.cost_nano_usd, 435_000);
    assert_eq!(row.token_source, "upstream");
    assert_eq!(row.end_user.as_deref(), Some("end-user-7"));
    assert!(
        row.created_at.ends_with('Z') && row.created_at.len() == 24,
        "{}",
        row.created_at
    );

    let m = tg.metrics().await;
    let cost = metric(
        &m,
        "tollgate_cost_usd_total",
        &[("team", "search"), ("model", "gpt-4o-mini")],
    );
    assert_eq!(cost, Some(0.000435));
    let labels = [
        ("team", "search"),
        ("model", "gpt-4o-mini"),
        ("endpoint", "chat.completions"),
        ("status", "200"),
    ];
    assert_eq!(metric(&m, "tollgate_requests_total", &labels), Some(1.0));
    for (kind, n) in [
        ("prompt", 1000.0),
        ("completion", 500.0),
        ("input", 800.0),
        ("cached_input", 200.0),
        ("output", 500.0),
    ] {
        let labels = [("team", "search"), ("model", "gpt-4o-mini"), ("kind", kind)];
        assert_eq!(
            metric(&m, "tollgate_tokens_total", &labels),
            Some(n),
            "{kind}"
        );
    }
    assert_eq!(
        metric(
            &m,
            "tollgate_overhead_seconds_count",
            &[("endpoint", "chat.completions")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_and_unknown_headers_are_forwarded_untouched() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    // Odd spacing, unknown fields and key order must reach the upstream byte for byte.
    let raw = r#"{ "model" : "gpt-4o",  "messages":[{"role":"user","content":"hi"}], "x_vendor_field": {"a": [1, 2.50]}, "temperature": 0.2 }"#;
    let resp = client()
        .post(tg.url("/v1/chat/completions?api-version=7"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-client-own-key")
        .header("openai-organization", "org-123")
        .header("x-custom-trace", "abc")
        .body(raw)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    let rec = mock.last();
    assert_eq!(rec.body, raw.as_bytes());
    assert_eq!(rec.path, "/v1/chat/completions?api-version=7");
    // passthrough: the client's own provider key goes upstream untouched
    assert_eq!(
        rec.header("authorization").as_deref(),
        Some("Bearer sk-client-own-key")
    );
    assert_eq!(
        rec.header("openai-organization").as_deref(),
        Some("org-123")
    );
    assert_eq!(rec.header("x-custom-trace").as_deref(), Some("abc"));
    assert_eq!(rec.header("x-tollgate-team"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_never_sends_the_servers_key() {
    let mock = MockUpstream::start().await;
    // Explicit passthrough although the upstream has an api_key.
    let tg = Tollgate::start(&mock, "").await;
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .json(&chat_body("gpt-4o"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.last().header("authorization"), None);
    let rows = tg.wait_rows(1).await;
    assert_eq!(rows[0].team, "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_embeddings_and_responses_are_metered() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let c = client();
    let send = |path: &'static str, body: serde_json::Value| {
        let c = c.clone();
        let url = tg.url(path);
        async move {
            c.post(url)
                .header("x-mock-prompt-tokens", "2000")
                .header("x-mock-completion-tokens", "100")
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    let r = send(
        "/v1/completions",
        json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"}),
    )
    .await;
    // 2000 x $1.50/M + 100 x $2/M = 0.0032
    assert_eq!(
        r.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.003200000")
    );
    let r = send(
        "/v1/embeddings",
        json!({"model": "text-embedding-3-small", "input": "hello"}),
    )
    .await;
    // 2000 x $0.02/M = 0.00004; embeddings have no completion tokens
    assert_eq!(
        r.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.000040000")
    );
    let r = send(
        "/v1/responses",
        json!({"model": "gpt-4.1", "input": "hello"}),
    )
    .await;
    // 2000 x $2/M + 100 x $8/M = 0.0048
    assert_eq!(
        r.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.004800000")
    );

    let rows = tg.wait_rows(3).await;
    let got: Vec<(&str, i64, i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.endpoint.as_str(),
                r.prompt_tokens,
                r.completion_tokens,
                r.cost_nano_usd,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("completions", 2000, 100, 3_200_000),
            ("embeddings", 2000, 0, 40_000),
            ("responses", 2000, 100, 4_800_000),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_usage_is_estimated_with_openai_accounting() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    // The cookbook conversation: OpenAI reports 124 prompt tokens on gpt-4o.
    let body = json!({"model": "gpt-4o", "n": 2, "messages": [
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."}
    ]});
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-usage", "omit")
        .header("x-mock-content", "hello world")
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    // 124 x $2.5/M + 2 choices x 2 tokens x $10/M = 310 + 40 nano-USD... in USD:
    assert_eq!(
        resp.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.000350000")
    );
    let rows = tg.wait_rows(1).await;
    assert_eq!((rows[0].prompt_tokens, rows[0].completion_tokens), (124, 4));
    assert_eq!(rows[0].token_source, "estimated");
    assert_eq!(rows[0].cost_nano_usd, 350_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finetuned_models_are_priced_from_their_rows_and_export_the_premium() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "[catalog]\nfinetune_multiple = 6.0\n").await;
    let c = client();
    for model in [
        "ft:gpt-4o-mini-2024-07-18:acme::abc123",
        "ft:gpt-4-turbo:acme:x:1",
    ] {
        let resp = c
            .post(tg.url("/v1/chat/completions"))
            .header("x-tollgate-team", "ml")
            .header("x-mock-prompt-tokens", "1000000")
            .header("x-mock-completion-tokens", "1000000")
            .json(&chat_body(model))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), 200);
    }
    let rows = tg.wait_rows(2).await;
    // ft:gpt-4o-mini row: $0.30 + $1.20 per M
    assert_eq!(rows[0].base_model, "gpt-4o-mini");
    assert_eq!(rows[0].cost_nano_usd, 1_500_000_000);
    // gpt-4-turbo has no ft: row: 6 x ($10 + $30)
    assert_eq!(rows[1].base_model, "gpt-4-turbo");
    assert_eq!(rows[1].cost_nano_usd, 240_000_000_000);

    let m = tg.metrics().await;
    let ft = "ft:gpt-4o-mini-2024-07-18:acme::abc123";
    let multiple = metric(
        &m,
        "tollgate_finetune_cost_multiple",
        &[
            ("model", ft),
            ("base_model", "gpt-4o-mini"),
            ("kind", "input"),
        ],
    );
    assert_eq!(multiple, Some(2.0));
    let multiple = metric(
        &m,
        "tollgate_finetune_cost_multiple",
        &[("model", "ft:gpt-4-turbo:acme:x:1"), ("kind", "output")],
    );
    assert_eq!(multiple, Some(6.0));
    // Catalog rows are exported before any traffic: ft:gpt-3.5-turbo is 6x input.
    let multiple = metric(
        &m,
        "tollgate_finetune_cost_multiple",
        &[("model", "ft:gpt-3.5-turbo"), ("kind", "input")],
    );
    assert_eq!(multiple, Some(6.0));
    // Premium: $1.50 - $0.75 base, and $240 - $40 base.
    let premium = metric(
        &m,
        "tollgate_finetune_premium_usd_total",
        &[("team", "ml"), ("model", ft)],
    );
    assert_eq!(premium, Some(0.75));
    let premium = metric(
        &m,
        "tollgate_finetune_premium_usd_total",
        &[("model", "ft:gpt-4-turbo:acme:x:1")],
    );
    assert_eq!(premium, Some(200.0));
    let price = metric(
        &m,
        "tollgate_model_price_usd_per_token",
        &[("model", "gpt-4o-mini"), ("kind", "input")],
    );
    assert_eq!(price, Some(1.5e-7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_other_paths_are_forwarded_and_counted_without_tokens() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let c = client();
    let resp = c
        .get(tg.url("/v1/models"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    let out: serde_json::Value = resp.json().await.unwrap_or_default();
    assert_eq!(out["data"][0]["id"], "gpt-4o-mini");
    let resp = c
        .post(tg.url("/v1/uploads?purpose=batch"))
        .body(vec![b'x'; 100_000])
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let out: serde_json::Value = resp.json().await.unwrap_or_default();
    assert_eq!(out["path"], "/v1/uploads?purpose=batch");
    assert_eq!(out["body_len"], 100_000);
    let rows = tg.wait_rows(2).await;
    assert_eq!(rows[0].endpoint, "models");
    assert_eq!(rows[1].endpoint, "other");
    assert!(rows
        .iter()
        .all(|r| r.prompt_tokens == 0 && r.cost_nano_usd == 0 && r.status == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_exactly_one_usage_row() {
    let mock = MockUpstream::start().await;
    // A custom catalog with a sub-nano price, to see rounding happen once per request.
    let catalog_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let catalog = catalog_dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        "[models.\"tiny-embed\"]\ninput = 0.0005\noutput = 0.0\nencoding = \"cl100k_base\"\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let tg = Tollgate::start(
        &mock,
        &format!("[catalog]\npath = \"{}\"\n", catalog.display()),
    )
    .await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let c = c.clone();
        let url = tg.url("/v1/embeddings");
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "tiny-embed", "input": "x", "user": format!("u{i}")});
            c.post(url)
                .header("x-mock-prompt-tokens", "1")
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap_or(0), 200);
    }
    let rows = tg.wait_rows(100).await;
    let mut ids: Vec<_> = rows.iter().map(|r| r.request_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100);
    // 1 token x $0.0005/M = 0.5 nano-USD each: rounded once, half up, to 1.
    assert!(rows.iter().all(|r| r.cost_nano_usd == 1), "{:?}", &rows[0]);
    let m = tg.metrics().await;
    let total = metric(&m, "tollgate_cost_usd_total", &[("model", "tiny-embed")]);
    assert_eq!(total, Some(100e-9));
    // Give the writer a moment, then make sure nothing more appears.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    tg.wait_rows(100).await;
}
