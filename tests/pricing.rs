//! Every billed dimension (issue 13): one test per row of the issue's
//! table, each asserting the exact nano-USD cost, the `cost_breakdown` and
//! the new columns, for a plain response and a stream.

mod support;

use serde_json::{json, Value};
use support::{client, metric, stdout, wait_for_key, MockUpstream, Tollgate, UsageRow};

/// Sends one chat request (or a stream of it) with mock headers; returns
/// the cost header (non-streaming) and the status.
async fn chat(
    tg: &Tollgate,
    model: &str,
    stream: bool,
    headers: &[(&str, &str)],
) -> (u16, Option<String>) {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]});
    if stream {
        body["stream"] = json!(true);
    }
    let mut req = client().post(tg.url("/v1/chat/completions")).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
    let status = resp.status().as_u16();
    let cost = resp
        .headers()
        .get("x-tollgate-cost-usd")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let _ = resp.bytes().await;
    (status, cost)
}

fn breakdown(row: &UsageRow) -> Value {
    serde_json::from_str(&row.cost_breakdown).unwrap_or(Value::Null)
}

/// Both ways (JSON, then stream): the two rows, checked alike.
async fn both(tg: &Tollgate, model: &str, headers: &[(&str, &str)]) -> Vec<UsageRow> {
    let (status, cost) = chat(tg, model, false, headers).await;
    assert_eq!(status, 200);
    let (status, _) = chat(tg, model, true, headers).await;
    assert_eq!(status, 200);
    let rows = tg.wait_rows_where(2, |r| r.model == model).await;
    // The cost header says what the row says.
    let nano = rows[0].cost_nano_usd;
    assert_eq!(
        cost.as_deref(),
        Some(format!("{}.{:09}", nano / 1_000_000_000, nano % 1_000_000_000).as_str())
    );
    assert!(rows[1].stream);
    for r in &rows {
        assert_eq!(r.status, 200);
        assert_eq!(r.token_source, "upstream");
        // The breakdown sums to the total.
        let sum: i64 = breakdown(r)
            .as_object()
            .map(|o| o.values().filter_map(Value::as_i64).sum())
            .unwrap_or(-1);
        assert_eq!(sum, r.cost_nano_usd, "{}", r.cost_breakdown);
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_service_tier_prices_the_request() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let tokens = [
        ("x-mock-prompt-tokens", "10000"),
        ("x-mock-completion-tokens", "2000"),
    ];
    // o3 at flex: $1 / $4 per M (standard is $2 / $8): $0.018.
    let flex = [tokens[0], tokens[1], ("x-mock-service-tier", "flex")];
    for r in both(&tg, "o3", &flex).await {
        assert_eq!(r.cost_nano_usd, 18_000_000);
        assert_eq!(
            breakdown(&r),
            json!({"input": 10_000_000, "output": 8_000_000})
        );
        assert_eq!(r.service_tier.as_deref(), Some("flex"));
    }
    // gpt-5 at priority: $2.50 / $20 per M: $0.065.
    let prio = [tokens[0], tokens[1], ("x-mock-service-tier", "priority")];
    for r in both(&tg, "gpt-5", &prio).await {
        assert_eq!(r.cost_nano_usd, 65_000_000);
        assert_eq!(r.service_tier.as_deref(), Some("priority"));
    }
    // gpt-4o has no flex table: its batch table stands in, and is counted.
    let gpt4o_flex = [tokens[0], tokens[1], ("x-mock-service-tier", "flex")];
    for r in both(&tg, "gpt-4o", &gpt4o_flex).await {
        assert_eq!(r.cost_nano_usd, 10_000 * 1_250 + 2_000 * 5_000);
    }
    let m = tg.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_price_fallbacks_total",
            &[("model", "gpt-4o"), ("reason", "tier")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_cost_by_component_usd_total",
            &[("model", "o3"), ("component", "output")]
        ),
        Some(0.016)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_tokens_are_billed_at_audio_prices() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let usage = r#"{"prompt_tokens":1000,"completion_tokens":500,"total_tokens":1500,
        "prompt_tokens_details":{"audio_tokens":800,"cached_tokens":0},
        "completion_tokens_details":{"audio_tokens":400,"reasoning_tokens":0}}"#
        .replace('\n', "");
    for r in both(&tg, "gpt-4o-audio-preview", &[("x-mock-usage-raw", &usage)]).await {
        assert_eq!(r.cost_nano_usd, 65_500_000);
        assert_eq!(
            breakdown(&r),
            json!({"input": 500_000, "output": 1_000_000, "audio_input": 32_000_000, "audio_output": 32_000_000})
        );
        assert_eq!(
            (r.audio_prompt_tokens, r.audio_completion_tokens),
            (800, 400)
        );
        assert_eq!((r.prompt_tokens, r.completion_tokens), (1000, 500));
    }
    let m = tg.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_tokens_total",
            &[("model", "gpt-4o-audio-preview"), ("kind", "audio_input")]
        ),
        Some(1600.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepseek_cache_hits_are_billed_at_the_cache_price() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let usage = r#"{"prompt_tokens":10000,"completion_tokens":100,"total_tokens":10100,"prompt_cache_hit_tokens":9000,"prompt_cache_miss_tokens":1000}"#;
    for r in both(&tg, "deepseek-chat", &[("x-mock-usage-raw", usage)]).await {
        // 1,000 x $0.28 + 9,000 x $0.028 + 100 x $0.42 per M.
        assert_eq!(r.cost_nano_usd, 280_000 + 252_000 + 42_000);
        assert_eq!(
            breakdown(&r),
            json!({"input": 280_000, "cached_input": 252_000, "output": 42_000})
        );
        assert_eq!(r.cached_tokens, 9000);
        assert_eq!(r.provider, "deepseek");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_models_and_served_snapshots_are_priced() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let tokens = [
        ("x-mock-prompt-tokens", "10000"),
        ("x-mock-completion-tokens", "2000"),
    ];
    // gpt-5.4: $2.50 / $15 per M.
    for r in both(&tg, "gpt-5.4", &tokens).await {
        assert_eq!(r.cost_nano_usd, 55_000_000);
    }
    // Asked for gpt-4o, served by the 2024-05-13 snapshot, which costs twice.
    let snapshot = [tokens[0], tokens[1], ("x-mock-model", "gpt-4o-2024-05-13")];
    let (status, _) = chat(&tg, "gpt-4o", false, &snapshot).await;
    assert_eq!(status, 200);
    let (status, _) = chat(&tg, "gpt-4o", true, &snapshot).await;
    assert_eq!(status, 200);
    let rows = tg.wait_rows_where(2, |r| r.model == "gpt-4o").await;
    for r in rows {
        assert_eq!(r.cost_nano_usd, 10_000 * 5_000 + 2_000 * 15_000);
        assert_eq!(r.base_model, "gpt-4o-2024-05-13");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_object_spelled_twice_is_read_not_refused() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let usage = r#"{"prompt_tokens":100,"input_tokens":120,"completion_tokens":10,"output_tokens":10,"prompt_tokens":100,"mystery_field":{"x":1}}"#;
    for r in both(&tg, "gpt-4o-mini", &[("x-mock-usage-raw", usage)]).await {
        assert_eq!((r.prompt_tokens, r.completion_tokens), (100, 10));
        assert_eq!(r.cost_nano_usd, 100 * 150 + 10 * 600);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_api_tool_calls_are_billed_per_call() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    for stream in [false, true] {
        let mut body = json!({"model": "gpt-5", "input": "what happened today?",
                              "tools": [{"type": "web_search"}]});
        if stream {
            body["stream"] = json!(true);
        }
        let resp = client()
            .post(tg.url("/v1/responses"))
            .header("x-mock-prompt-tokens", "100")
            .header("x-mock-completion-tokens", "20")
            .header(
                "x-mock-output-items",
                "web_search_call,web_search_call,web_search_call",
            )
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes().await;
    }
    let rows = tg.wait_rows(2).await;
    for r in rows {
        // 100 x $1.25 + 20 x $10 per M, and 3 searches at $10 per 1000.
        assert_eq!(
            r.cost_nano_usd,
            125_000 + 200_000 + 30_000_000,
            "stream {}",
            r.stream
        );
        assert_eq!(r.tool_calls, 3);
        assert_eq!(
            breakdown(&r),
            json!({"input": 125_000, "output": 200_000, "tool_calls": 30_000_000})
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budgeted_team_cannot_use_an_unpriced_model() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "[auth]\nmode = \"virtual-keys\"\n").await;
    stdout(&tg.cli(&["teams", "create", "capped", "--budget-usd", "1"]));
    stdout(&tg.cli(&["teams", "create", "free"]));
    let (capped, free) = (tg.new_key("capped"), tg.new_key("free"));
    wait_for_key(&tg, &capped).await;
    wait_for_key(&tg, &free).await;
    let seen = mock.request_count();
    let send = |k: &str| {
        client()
            .post(tg.url("/v1/chat/completions"))
            .bearer_auth(k)
            .json(&json!({"model": "llama-3-70b-local", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let r = send(&capped).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(v["error"]["code"], "model_not_priced");
    assert_eq!(mock.request_count(), seen, "nothing sent upstream");
    // Without a budget the model is allowed and recorded at $0 (unpriced = allow).
    let r = send(&free).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_show_the_breakdown_by_component_tier_and_provider() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = support::base_config(&mock, dir.path())
        .replace("[server]\n", "[server]\nadmin_token = \"adm\"\n");
    let tg = Tollgate::start_with_config(dir, &config).await;
    let tokens = [
        ("x-mock-prompt-tokens", "10000"),
        ("x-mock-completion-tokens", "2000"),
    ];
    chat(
        &tg,
        "o3",
        false,
        &[tokens[0], tokens[1], ("x-mock-service-tier", "flex")],
    )
    .await;
    let ds = r#"{"prompt_tokens":10000,"completion_tokens":100,"prompt_cache_hit_tokens":9000}"#;
    chat(&tg, "deepseek-chat", false, &[("x-mock-usage-raw", ds)]).await;
    tg.wait_rows(2).await;
    let report = |by: &str, format: &str| {
        stdout(&tg.cli(&["report", "--by", by, "--since", "1h", "--format", format]))
    };
    let v: Value = serde_json::from_str(&report("component", "json")).unwrap_or(Value::Null);
    let by: std::collections::BTreeMap<String, i64> = v["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["group"].as_str().unwrap_or("").to_string(),
                r["cost_nano_usd"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let want: std::collections::BTreeMap<String, i64> = [
        ("input", 10_000_000 + 280_000),
        ("output", 8_000_000 + 42_000),
        ("cached_input", 252_000),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(by, want);
    assert_eq!(v["total_cost_nano_usd"], json!(18_574_000));
    let v: Value = serde_json::from_str(&report("tier", "json")).unwrap_or(Value::Null);
    let groups: Vec<&str> = v["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["group"].as_str())
        .collect();
    assert_eq!(groups, ["flex", "standard"]);
    let v: Value = serde_json::from_str(&report("provider", "json")).unwrap_or(Value::Null);
    assert_eq!(v["rows"][0]["group"], "deepseek");
    assert_eq!(
        v["rows"][0]["cost_breakdown_nano_usd"],
        json!({"input": 280_000, "cached_input": 252_000, "output": 42_000})
    );
    let csv = report("model", "csv");
    let header = csv.lines().next().unwrap_or("");
    assert!(header.ends_with(",cost_input_usd,cost_cached_input_usd,cost_cache_write_usd,cost_cache_write_1h_usd,cost_output_usd,cost_audio_input_usd,cost_audio_output_usd,cost_image_input_usd,cost_image_output_usd,cost_video_input_usd,cost_audio_cached_input_usd,cost_images_usd,cost_audio_seconds_usd,cost_characters_usd,cost_tool_calls_usd,cost_gpu_usd"), "{header}");
    assert!(
        csv.contains(
            "o3,1,10000,2000,0,0.018000000,0.010000000,0.000000000,0.000000000,0.000000000,0.008000000"
        ),
        "{csv}"
    );
    // The admin API answers the same.
    let v: Value = client()
        .get(tg.url("/admin/usage?by=component&since=1h"))
        .bearer_auth("adm")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or(Value::Null);
    assert_eq!(v["by"], "component");
    assert_eq!(v["total_cost_nano_usd"], json!(18_574_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_beyond_its_reservation_is_settled_in_full_and_counted() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "[auth]\nmode = \"virtual-keys\"\n").await;
    stdout(&tg.cli(&["teams", "create", "t", "--budget-usd", "1"]));
    let key = tg.new_key("t");
    wait_for_key(&tg, &key).await;
    // The request allows one web search (max_tool_calls); the provider
    // bills three.
    let resp = client()
        .post(tg.url("/v1/responses"))
        .bearer_auth(&key)
        .header("x-mock-prompt-tokens", "100")
        .header("x-mock-completion-tokens", "5")
        .header(
            "x-mock-output-items",
            "web_search_call,web_search_call,web_search_call",
        )
        .json(
            &json!({"model": "gpt-5", "input": "news?", "tools": [{"type": "web_search"}],
                      "max_tool_calls": 1, "max_output_tokens": 5}),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    let remaining = resp
        .headers()
        .get("x-tollgate-budget-remaining-usd")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let cost: i64 = 100 * 1_250 + 5 * 10_000 + 30_000_000;
    let rows = tg.wait_rows_where(1, |r| r.endpoint == "responses").await;
    assert_eq!(rows[0].cost_nano_usd, cost, "settled in full");
    assert_eq!(remaining, Some(format!("0.{:09}", 1_000_000_000 - cost)));
    let m = tg.metrics().await;
    let overrun = metric(&m, "tollgate_budget_overrun_usd_total", &[("team", "t")]).unwrap_or(0.0);
    // Reserved: the prompt bound, 5 output tokens and one search ($0.01).
    assert!(overrun > 0.019 && overrun < 0.02, "overrun {overrun}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_reloads_on_change_and_on_sighup_without_failing_a_request() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let catalog = dir.path().join("catalog.toml");
    let row = |input: &str| {
        format!(
            "[models.\"house-model\"]\ninput = {input}\noutput = 0.0\nencoding = \"o200k_base\"\n"
        )
    };
    std::fs::write(&catalog, row("1.0")).unwrap_or_else(|e| panic!("{e}"));
    let config = format!(
        "{}\n[catalog]\npath = \"{}\"\n",
        support::base_config(&mock, dir.path()),
        catalog.display()
    );
    let tg = Tollgate::start_with_config(dir, &config).await;
    let cost = |tg: &Tollgate| {
        let url = tg.url("/v1/chat/completions");
        async move {
            let r = client()
                .post(url)
                .header("x-mock-prompt-tokens", "1000000")
                .json(&json!({"model": "house-model", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.status(), 200);
            r.headers()
                .get("x-tollgate-cost-usd")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .unwrap_or_default()
        }
    };
    assert_eq!(cost(&tg).await, "1.000000000");
    // Load runs through every swap below; not one request may fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, url) = (stop.clone(), tg.url("/v1/chat/completions"));
        tokio::spawn(async move {
            let (mut ok, c) = (0u32, client());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = c
                    .post(&url)
                    .json(&json!({"model": "house-model", "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(r.status(), 200);
                ok += 1;
            }
            ok
        })
    };
    // The file changes: picked up within the 2 s check.
    std::fs::write(&catalog, row("2.0")).unwrap_or_else(|e| panic!("{e}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    while cost(&tg).await != "2.000000000" {
        assert!(
            std::time::Instant::now() < deadline,
            "file change not picked up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // A broken file is refused; the catalog in use stays.
    std::fs::write(&catalog, "[models.\"house-model\"]\ninput = -1\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &tg.pid().to_string()])
        .status();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(cost(&tg).await, "2.000000000");
    // SIGHUP: at once, whatever the file's timestamp says.
    std::fs::write(&catalog, row("3.0")).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &tg.pid().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while cost(&tg).await != "3.000000000" {
        assert!(std::time::Instant::now() < deadline, "SIGHUP not honoured");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = load.await.unwrap_or(0);
    assert!(served > 10, "only {served} requests during the swaps");
    // The price gauge follows the catalog in use ($3 per M = 3e-6 a token).
    let m = tg.metrics().await;
    let price = support::metric(
        &m,
        "tollgate_model_price_usd_per_token",
        &[("model", "house-model"), ("kind", "input")],
    );
    assert_eq!(price, Some(3e-6), "{m}");
    assert!(
        tg.log().iter().any(|l| l.contains("catalog not reloaded")),
        "{:?}",
        tg.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_unpriced_lists_the_models_the_catalog_cannot_price() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    for model in [
        "gpt-4o-mini",
        "my-local-llama",
        "my-local-llama",
        "other-house-model",
    ] {
        let (status, _) = chat(&tg, model, false, &[]).await;
        assert_eq!(status, 200);
    }
    tg.wait_rows(4).await;
    let v: Value = serde_json::from_str(&stdout(
        &tg.cli(&["catalog", "unpriced", "--since", "1h", "--format", "json"]),
    ))
    .unwrap_or(Value::Null);
    assert_eq!(
        v,
        json!([{"model": "my-local-llama", "requests": 2}, {"model": "other-house-model", "requests": 1}])
    );
}
