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
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .unwrap_or_else(|e| panic!("{e}"));
    let section = &readme[readme
        .find("## Azure OpenAI")
        .unwrap_or_else(|| panic!("no Azure section"))..];
    let start = section
        .find("```toml\n")
        .unwrap_or_else(|| panic!("no toml block"))
        + 8;
    let snippet = &section[start..start + section[start..].find("```").unwrap_or(0)];
    assert!(snippet.contains("kind = \"azure\""), "{snippet}");
    let snippet = snippet
        .replace(
            "https://my-resource.openai.azure.com",
            &format!("http://{}", mock.addr),
        )
        .replace("${AZURE_OPENAI_API_KEY}", "az-upstream-secret");
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[database]\nurl = \"sqlite://{db}\"\nflush_interval_ms = 20\n\n[auth]\nmode = \"virtual-keys\"\n\n{snippet}",
        db = dir.join("tollgate.db").display(),
    )
}

async fn start_azure(mock: &MockUpstream) -> (Tollgate, String) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = azure_config(mock, dir.path());
    let tg = Tollgate::start_with_config(dir, &config).await;
    let out = tg.cli(&[
        "teams",
        "create",
        "app",
        "--budget-usd",
        "10",
        "--period",
        "monthly",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = tg.new_key("app");
    support::wait_for_key(&tg, &key).await;
    (tg, key)
}

fn row<'a>(rows: &'a [UsageRow], request_id: &str) -> &'a UsageRow {
    rows.iter()
        .find(|r| r.request_id == request_id)
        .unwrap_or_else(|| panic!("no row {request_id} in {rows:?}"))
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-tollgate-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
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
        request_id(&r),
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
    ids.push((request_id(&r), 210_000, "gpt-4o-mini", "gpt-4o-mini", false));
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
        let id = request_id(&r);
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
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env("TOLLGATE_ENDPOINT", endpoint)
            .env("TG_KEY", key)
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
