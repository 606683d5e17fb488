//! Providers other than OpenAI's own API (SPEC 10): Azure OpenAI here,
//! Anthropic in `anthropic.rs`.
//! The mock speaks Azure's front door (deployment paths, `api-key`,
//! `api-version`); tollgate runs as a real server with virtual keys.

mod support;

use serde_json::json;
use support::{client, MockUpstream, Tollgate, UsageRow};

/// The README's "Azure OpenAI" snippet as written, with the mock standing
/// in for the resource and the key's environment variable filled in.
fn azure_config(mock: &MockUpstream, dir: &std::path::Path) -> String {
    support::readme_config(
        "Azure OpenAI",
        mock,
        dir,
        "https://my-resource.openai.azure.com",
        ("${AZURE_OPENAI_API_KEY}", "az-upstream-secret"),
    )
}

async fn start_azure(mock: &MockUpstream) -> (Tollgate, String) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = azure_config(mock, dir.path());
    support::start_with_budgeted_key(dir, &config).await
}

fn row<'a>(rows: &'a [UsageRow], request_id: &str) -> &'a UsageRow {
    rows.iter()
        .find(|r| r.request_id == request_id)
        .unwrap_or_else(|| panic!("no row {request_id} in {rows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_deployments_are_reached_in_both_client_styles_and_priced_by_the_served_model() {
    let mock = MockUpstream::start().await;
    let (tg, key) = start_azure(&mock).await;
    let tokens = [
        ("x-mock-prompt-tokens", "1000"),
        ("x-mock-completion-tokens", "100"),
    ];
    let mut ids = Vec::new();

    // OpenAI style, the model naming a deployment; the deployment answers
    // that it runs gpt-4o-2024-05-13 ($5 / $15 per M, not gpt-4o's $2.50 / $10).
    let mut req = client()
        .post(tg.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-mock-model", "gpt-4o-2024-05-13")
        .json(&json!({"model": "prod-4o", "messages": [{"role": "user", "content": "hi"}]}));
    for (k, v) in tokens {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.006500000")
    );
    ids.push((
        support::request_id(&r),
        6_500_000,
        "gpt-4o",
        "gpt-4o-2024-05-13",
        false,
    ));
    let up = mock.last();
    assert_eq!(
        up.path,
        "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(up.header("api-key").as_deref(), Some("az-upstream-secret"));
    assert_eq!(
        up.header("authorization"),
        None,
        "the tollgate key never goes up"
    );

    // OpenAI style, a model a deployment serves: routed to that deployment.
    let mut req = client()
        .post(tg.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}));
    for (k, v) in tokens {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    // No model in the answer: priced as the deployment's model ($0.15 / $0.60).
    ids.push((
        support::request_id(&r),
        210_000,
        "gpt-4o-mini",
        "gpt-4o-mini",
        false,
    ));
    assert_eq!(
        mock.last().path,
        "/openai/deployments/prod-mini/chat/completions?api-version=2024-10-21"
    );

    // Azure style (what `AzureOpenAI(azure_endpoint=...)` sends): the key in
    // `api-key`, the deployment in the path, no model in the body, and the
    // client's api-version replaced by the configured one.
    for stream in [false, true] {
        let mut req = client()
            .post(tg.url("/openai/deployments/prod-mini/chat/completions?api-version=2024-06-01"))
            .header("api-key", &key)
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": stream}));
        for (k, v) in tokens {
            req = req.header(k, v);
        }
        let r = req.send().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), 200);
        let id = support::request_id(&r);
        let text = r.text().await.unwrap_or_default();
        if stream {
            assert!(text.contains("data: [DONE]"), "{text}");
        }
        ids.push((id, 210_000, "gpt-4o-mini", "gpt-4o-mini", stream));
        let up = mock.last();
        assert_eq!(
            up.path,
            "/openai/deployments/prod-mini/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(up.header("api-key").as_deref(), Some("az-upstream-secret"));
    }

    let rows = tg.wait_rows(ids.len() + 1).await; // and the key probe's
                                                  // `model`: what the deployment stands for; `base_model`: the price row
                                                  // of what the response says served it.
    for (id, cost, model, priced_as, stream) in &ids {
        let r = row(&rows, id);
        assert_eq!(r.cost_nano_usd, *cost, "{r:?}");
        assert_eq!(
            (r.model.as_str(), r.base_model.as_str()),
            (*model, *priced_as),
            "{r:?}"
        );
        assert_eq!(r.stream, *stream);
        assert_eq!(r.upstream, "azure-eu");
        assert_eq!(r.provider, "azure");
        assert_eq!(r.endpoint, "chat.completions");
        assert_eq!(r.team, "app");
        assert_eq!((r.prompt_tokens, r.completion_tokens), (1000, 100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_requests_without_a_tollgate_key_never_reach_the_resource() {
    let mock = MockUpstream::start().await;
    let (tg, _key) = start_azure(&mock).await;
    let before = mock.request_count();
    for (header, value) in [("api-key", "az-upstream-secret"), ("api-key", "tg-wrong")] {
        let r = client()
            .post(tg.url("/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"))
            .header(header, value)
            .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), 401);
    }
    assert_eq!(mock.request_count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_is_no_deployment_name_gets_400_before_reaching_azure() {
    let mock = MockUpstream::start().await;
    let (tg, _budgeted) = start_azure(&mock).await;
    // A team without a budget: unpriced models are not refused up front.
    let out = tg.cli(&["teams", "create", "free"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = tg.new_key("free");
    support::wait_for_key(&tg, &key).await;
    let before = mock.request_count();
    // "gpt-4o*" routes it to Azure, where it would become the deployment path.
    for model in ["gpt-4o/../../../openai/models", "gpt-4o?x=1"] {
        let r = client()
            .post(tg.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), 400, "{model}");
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("not an Azure deployment name"), "{body}");
    }
    assert_eq!(mock.request_count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_azure_openai_client_works_with_tollgate_as_its_endpoint() {
    let Some(python) = support::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let (tg, key) = start_azure(&mock).await;
    let before = tg.wait_rows(1).await.len(); // the key probe
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/azure_sdk.py");
    let endpoint = tg.url("");
    let stdout = support::run_script(
        python,
        script,
        &[("TOLLGATE_ENDPOINT", endpoint), ("TG_KEY", key)],
    )
    .await;
    assert!(
        stdout.contains("chat 0.006500000 gpt-4o-2024-05-13 1000"),
        "{stdout}"
    );
    assert!(stdout.contains("stream Hello from the mock"), "{stdout}");
    assert!(stdout.contains("embeddings 3"), "{stdout}");
    // The SDK's own paths and header reached the deployment, with the
    // upstream's key and the configured api-version.
    let paths: Vec<String> = mock.requests().iter().map(|r| r.path.clone()).collect();
    for expected in [
        "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
        "/openai/deployments/prod-mini/chat/completions?api-version=2024-10-21",
        "/openai/deployments/prod-mini/embeddings?api-version=2024-10-21",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} not in {paths:?}"
        );
    }
    let rows = tg.wait_rows(before + 3).await;
    let costs: Vec<(String, i64, String)> = rows[before..]
        .iter()
        .map(|r| (r.endpoint.clone(), r.cost_nano_usd, r.provider.clone()))
        .collect();
    assert_eq!(
        costs[0],
        ("chat.completions".into(), 6_500_000, "azure".into())
    );
    assert_eq!(
        costs[1],
        ("chat.completions".into(), 210_000, "azure".into())
    );
    assert_eq!(costs[2].0, "embeddings");
}

/// The README's "Fallbacks" snippet: `openai` on `primary`, the backup on
/// `backup` (a mock, or a closed port standing for a refused connection).
async fn start_fallbacks(primary: &str, backup: &MockUpstream) -> (Tollgate, String) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let snippet = support::readme_toml("Fallbacks");
    assert!(snippet.contains("[routing]"), "{snippet}");
    let snippet = snippet
        .replace("https://api.openai.com/v1", primary)
        .replace("https://backup.example.com/v1", &backup.base_url())
        .replace("${OPENAI_API_KEY}", "sk-primary")
        .replace("${BACKUP_API_KEY}", "sk-backup");
    let config = support::config_around(dir.path(), &snippet);
    support::start_with_budgeted_key(dir, &config).await
}

/// gpt-4o-mini, 1,000 in / 100 out: $0.15 / $0.60 per M.
const MINI: [(&str, &str); 2] = [
    ("x-mock-prompt-tokens", "1000"),
    ("x-mock-completion-tokens", "100"),
];
const MINI_COST: i64 = 210_000;

async fn ask(tg: &Tollgate, key: &str, stream: bool, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut body = support::chat_body("gpt-4o-mini");
    body["stream"] = json!(stream);
    let headers: Vec<(&str, &str)> = MINI.iter().chain(extra).copied().collect();
    support::post_chat(tg, key, &body, &headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upstream_falls_back_to_the_next_before_the_first_byte() {
    let primary = MockUpstream::start().await;
    let backup = MockUpstream::start().await;
    let (tg, key) = start_fallbacks(&primary.base_url(), &backup).await;
    let mut expected = Vec::new();

    // 429 and 503 from the primary: the client sees the backup's answer,
    // streamed or not, and is billed once.
    for (status, stream) in [(429, false), (503, false), (503, true)] {
        primary.force_status(status);
        let (p0, b0) = (primary.request_count(), backup.request_count());
        let r = ask(&tg, &key, stream, &[]).await;
        assert_eq!(r.status(), 200, "after a {status}");
        let id = support::request_id(&r);
        let text = r.text().await.unwrap_or_default();
        assert!(text.contains("Hello"), "{text}");
        assert_eq!(primary.request_count(), p0 + 1);
        assert_eq!(backup.request_count(), b0 + 1);
        assert_eq!(
            backup.last().header("authorization").as_deref(),
            Some("Bearer sk-backup")
        );
        expected.push((id, "openai-backup", 2, 200, MINI_COST));
    }

    // Not a listed status (400): passed through from the primary, no retry.
    primary.force_status(400);
    let b0 = backup.request_count();
    let r = ask(&tg, &key, false, &[]).await;
    assert_eq!(r.status(), 400);
    assert_eq!(backup.request_count(), b0);
    expected.push((support::request_id(&r), "openai", 1, 400, 0));

    // Both down: the last answer reaches the client.
    primary.force_status(503);
    backup.force_status(503);
    let r = ask(&tg, &key, false, &[]).await;
    assert_eq!(r.status(), 503);
    expected.push((support::request_id(&r), "openai-backup", 2, 503, 0));
    backup.force_status(0);

    // A stream that breaks mid-way is never retried: the client already
    // has part of it.
    primary.force_status(0);
    let b0 = backup.request_count();
    let r = ask(
        &tg,
        &key,
        true,
        &[
            ("x-mock-content", "one two three"),
            ("x-mock-cut-after", "2"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = support::request_id(&r);
    assert!(r.bytes().await.is_err(), "the break reaches the client");
    assert_eq!(backup.request_count(), b0);
    expected.push((id, "openai", 1, 502, -1));

    for (id, upstream, attempts, status, cost) in &expected {
        let row = tg
            .wait_rows_where(1, |r| &r.request_id == id)
            .await
            .remove(0);
        assert_eq!(
            (row.upstream.as_str(), row.attempts, row.status),
            (*upstream, *attempts, *status),
            "{row:?}"
        );
        if *cost >= 0 {
            assert_eq!(row.cost_nano_usd, *cost, "{row:?}");
        }
    }
    // Reserved once, settled once: the ledger holds exactly what the rows
    // cost and no reservation is left behind.
    let rows = tg
        .wait_rows_where(expected.len(), |r| r.endpoint == "chat.completions")
        .await;
    let total: i64 = rows.iter().map(|r| r.cost_nano_usd).sum();
    let m = tg.metrics().await;
    let gauge = |name: &str| support::metric(&m, name, &[("team", "app")]).unwrap_or(-1.0);
    assert!((gauge("tollgate_budget_spent_usd") * 1e9 - total as f64).abs() < 1.0);
    assert!((gauge("tollgate_budget_remaining_usd") * 1e9 - (10e9 - total as f64)).abs() < 1.0);

    let metrics = tg.metrics().await;
    let tries = |upstream: &str, outcome: &str| {
        support::metric(
            &metrics,
            "tollgate_upstream_attempts_total",
            &[("upstream", upstream), ("outcome", outcome)],
        )
    };
    assert_eq!(tries("openai", "429"), Some(1.0));
    assert_eq!(tries("openai", "503"), Some(3.0));
    assert_eq!(tries("openai", "400"), Some(1.0));
    assert_eq!(tries("openai-backup", "503"), Some(1.0));
    assert_eq!(tries("openai-backup", "ok"), Some(3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_falls_back_and_a_pinned_request_does_not() {
    // A port nothing listens on: the connection is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("{e}"));
    let backup = MockUpstream::start().await;
    let (tg, key) = start_fallbacks(&format!("http://{closed}/v1"), &backup).await;
    let r = ask(&tg, &key, false, &[]).await;
    assert_eq!(r.status(), 200);
    let id = support::request_id(&r);
    let row = tg
        .wait_rows_where(1, |r| r.request_id == id)
        .await
        .remove(0);
    assert_eq!(
        (row.upstream.as_str(), row.attempts, row.cost_nano_usd),
        ("openai-backup", 2, MINI_COST)
    );
    let metrics = tg.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "tollgate_upstream_attempts_total",
            &[("upstream", "openai"), ("outcome", "connect")]
        ),
        Some(1.0)
    );
    // `x-tollgate-upstream` pins the request: the refusal is the answer.
    let r = ask(&tg, &key, false, &[("x-tollgate-upstream", "openai")]).await;
    assert_eq!(r.status(), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_compatible_providers_are_priced_from_their_own_rows() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let snippet = support::readme_toml("Other providers")
        .replace("https://api.deepseek.com/v1", &mock.base_url())
        .replace(
            "https://generativelanguage.googleapis.com/v1beta/openai",
            &mock.base_url(),
        )
        .replace("${DEEPSEEK_API_KEY}", "sk-deepseek")
        .replace("${GEMINI_API_KEY}", "gemini-key");
    // Mistral, Groq, xAI, Together and Fireworks through one more
    // OpenAI-compatible upstream (the mock).
    let snippet = format!(
        "{snippet}\n[[upstreams]]\nname = \"compatible\"\nbase_url = \"{}\"\napi_key = \"sk-other\"\nmodels = [\"*\"]\n",
        mock.base_url()
    );
    let config = support::config_around(dir.path(), &snippet);
    let (tg, key) = support::start_with_budgeted_key(dir, &config).await;
    const TOKENS: &[(&str, &str)] = &[
        ("x-mock-prompt-tokens", "1000"),
        ("x-mock-completion-tokens", "100"),
    ];
    // model, extra mock headers, cost, provider
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], i64, &'a str);
    let cases: [Case; 7] = [
        // deepseek-chat: $0.28 in, $0.028 cache hits, $0.42 out per M:
        // 1,000 x 0.28 + 9,000 x 0.028 + 100 x 0.42 = 280,000 + 252,000 + 42,000.
        (
            "deepseek-chat",
            &[(
                "x-mock-usage-raw",
                r#"{"prompt_tokens":10000,"completion_tokens":100,"total_tokens":10100,"prompt_cache_hit_tokens":9000,"prompt_cache_miss_tokens":1000}"#,
            )],
            574_000,
            "deepseek",
        ),
        // gemini-2.5-flash: $0.30 in, $2.50 out per M: 300,000 + 250,000.
        (
            "gemini-2.5-flash",
            &[
                ("x-mock-prompt-tokens", "1000"),
                ("x-mock-completion-tokens", "100"),
            ],
            550_000,
            "google",
        ),
        // 1,000 in / 100 out at each catalog row's list price (USD per M):
        // mistral-large-latest $0.50 / $1.50.
        ("mistral-large-latest", TOKENS, 650_000, "mistral"),
        // Groq's gpt-oss-120b $0.15 / $0.60.
        ("openai/gpt-oss-120b", TOKENS, 210_000, "groq"),
        // xAI's grok-code-fast-1 $1.00 / $2.00 (LiteLLM's map).
        ("grok-code-fast-1", TOKENS, 1_200_000, "xai"),
        // Together's Llama 3.3 70B Turbo $1.04 / $1.04.
        (
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            TOKENS,
            1_144_000,
            "together",
        ),
        // Fireworks' Llama 3.3 70B $0.90 / $0.90.
        (
            "accounts/fireworks/models/llama-v3p3-70b-instruct",
            TOKENS,
            990_000,
            "fireworks",
        ),
    ];
    for (model, headers, cost, provider) in cases {
        for stream in [false, true] {
            let mut body = support::chat_body(model);
            body["stream"] = json!(stream);
            let r = support::post_chat(&tg, &key, &body, headers).await;
            assert_eq!(r.status(), 200, "{model}");
            let id = support::request_id(&r);
            let _ = r.bytes().await;
            let row = tg
                .wait_rows_where(1, |r| r.request_id == id)
                .await
                .remove(0);
            assert_eq!(
                (row.cost_nano_usd, row.provider.as_str(), row.model.as_str()),
                (cost, provider, model),
                "{row:?}"
            );
        }
    }
    let deepseek_calls = mock
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .filter(|r| r.header("authorization").as_deref() == Some("Bearer sk-deepseek"))
        .count();
    assert_eq!(deepseek_calls, 2, "each provider's own key goes up");
    let report = support::stdout(&tg.cli(&["report", "--by", "provider", "--format", "json"]));
    assert!(
        report.contains("\"deepseek\"") && report.contains("\"google\""),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_and_abandoned_azure_streams_bill_what_was_sent_and_seen() {
    let mock = MockUpstream::start().await;
    let (tg, key) = start_azure(&mock).await;
    let url = tg.url("/openai/deployments/prod-mini/chat/completions?api-version=2024-10-21");
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let content = ("x-mock-content", "one two three four");

    let r = client()
        .post(&url)
        .header("api-key", &key)
        .header(content.0, content.1)
        .header("x-mock-cut-after", "2")
        // Time for each word to reach tollgate before the cut's reset.
        .header("x-mock-chunk-delay-ms", "20")
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cut = support::request_id(&r);
    assert!(r.bytes().await.is_err());

    let mut r = client()
        .post(&url)
        .header("api-key", &key)
        .header(content.0, content.1)
        .header("x-mock-gate", "1")
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let gone = support::request_id(&r);
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), r.chunk()).await;
    assert!(matches!(first, Ok(Ok(Some(_)))), "{first:?}");
    drop(r);
    mock.open_gate();

    // Estimated (no usage came): the prompt from the request, the output
    // from the words that reached the client, at gpt-4o-mini's $0.15 /
    // $0.60 per M (150 and 600 nano-USD a token).
    for (id, status, min_output) in [(cut, 502, 2), (gone, 499, 1)] {
        let row = tg
            .wait_rows_where(1, |r| r.request_id == id)
            .await
            .remove(0);
        assert_eq!(
            (row.status, row.token_source.as_str()),
            (status, "estimated"),
            "{row:?}"
        );
        assert_eq!(
            (row.provider.as_str(), row.model.as_str()),
            ("azure", "gpt-4o-mini")
        );
        assert!(
            row.prompt_tokens > 0 && row.completion_tokens >= min_output,
            "{row:?}"
        );
        assert_eq!(
            row.cost_nano_usd,
            row.prompt_tokens * 150 + row.completion_tokens * 600,
            "{row:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_passthrough_a_clients_key_never_falls_back_to_another_upstream() {
    let primary = MockUpstream::start().await;
    let backup = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let snippet = support::readme_toml("Fallbacks")
        .replace("https://api.openai.com/v1", &primary.base_url())
        .replace("https://backup.example.com/v1", &backup.base_url())
        .replace("${OPENAI_API_KEY}", "sk-primary")
        .replace("${BACKUP_API_KEY}", "sk-backup");
    let config = support::config_around(dir.path(), &snippet)
        .replace("mode = \"virtual-keys\"", "mode = \"passthrough\"");
    let tg = Tollgate::start_with_config(dir, &config).await;
    primary.force_status(503);
    let r = support::post_chat(
        &tg,
        "sk-the-clients-own-openai-key",
        &support::chat_body("gpt-4o-mini"),
        &MINI,
    )
    .await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        primary.last().header("authorization").as_deref(),
        Some("Bearer sk-the-clients-own-openai-key")
    );
    assert_eq!(
        backup.request_count(),
        0,
        "the client's key went to a second provider"
    );
}
