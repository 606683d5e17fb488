//! The process as a user runs it: start, health, SIGTERM drain and flush,
//! config errors, and the `migrate` and `catalog` commands.

mod support;

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use support::{chat_body, client, MockUpstream, Tollgate, BIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_and_flushes_every_row() {
    let mock = MockUpstream::start().await;
    // Rows would sit in memory for a minute: only the shutdown flush writes them.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = support::base_config(&mock, dir.path()).replace(
        "flush_interval_ms = 20",
        "flush_interval_ms = 60000\nbatch_size = 100000",
    );
    let mut tg = Tollgate::start_with_config(dir, &config).await;
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (c, url) = (c.clone(), tg.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            c.post(url)
                .json(&chat_body("gpt-4o-mini"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap_or(0), 200);
    }
    // One stream still in flight when the signal arrives.
    let mut body = chat_body("gpt-4o-mini");
    body["stream"] = json!(true);
    let resp = c
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-gate", "1")
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.and_then(Result::ok).unwrap_or_default();
    assert!(!first.is_empty());

    let pool = tg.db().await;
    let before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage")
        .fetch_one(&pool)
        .await
        .unwrap_or(-1);
    assert_eq!(
        before, 0,
        "rows were written before shutdown; the test proves nothing"
    );
    pool.close().await;

    let term = tokio::task::spawn_blocking(move || {
        let code = tg.terminate();
        (code, tg)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    mock.open_gate();
    let mut rest = Vec::new();
    while let Some(Ok(chunk)) = stream.next().await {
        rest.extend_from_slice(&chunk);
    }
    assert!(
        String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"),
        "the in-flight stream was cut"
    );
    let (code, tg) = term.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, Some(0), "log: {:?}", tg.log());
    let rows = tg.wait_rows(201).await;
    assert_eq!(
        rows.iter().filter(|r| r.stream && r.status == 200).count(),
        1
    );
    let total: i64 = rows.iter().map(|r| r.cost_nano_usd).sum();
    // 200 x (10 x 150 + 5 x 600) + the stream's 10 x 150 + 5 x 600
    assert_eq!(total, 201 * 4_500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let r = client()
        .get(tg.url("/healthz"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let r = client()
        .get(tg.url("/readyz"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    // The container health check command (the Dockerfile's HEALTHCHECK).
    let url = format!("http://{}", tg.addr);
    let out = Command::new(BIN)
        .args(["healthcheck", "--url", &url])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success());
    let out = Command::new(BIN)
        .args(["healthcheck", "--url", "http://127.0.0.1:9"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.status.success());
    let m = tg.metrics().await;
    for name in [
        "tollgate_usage_write_queue_depth",
        "tollgate_usage_records_dropped_total",
        "tollgate_model_price_usd_per_token",
        "tollgate_finetune_cost_multiple",
    ] {
        assert!(m.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
}

#[test]
fn bad_config_fails_at_start_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = \"not-an-address\"\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("server.listen"),
        "{err}"
    );

    std::fs::write(&path, "[catalog]\nunpriced = \"maybe\"\n").unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("catalog.unpriced"),
        "{err}"
    );
}

#[test]
fn migrate_creates_the_usage_table_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..2 {
        let out = Command::new(BIN)
            .arg("migrate")
            .current_dir(dir.path())
            .env("TOLLGATE_DATABASE_URL", "sqlite://m.db")
            .env_remove("TOLLGATE_CONFIG")
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rt = tokio::runtime::Runtime::new().unwrap_or_else(|e| panic!("{e}"));
    let cols: Vec<String> = rt.block_on(async {
        let pool =
            sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.path().join("m.db").display()))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        sqlx::query_scalar("SELECT name FROM pragma_table_info('usage')")
            .fetch_all(&pool)
            .await
            .unwrap_or_default()
    });
    for col in [
        "id",
        "created_at",
        "request_id",
        "team",
        "key_id",
        "model",
        "base_model",
        "upstream",
        "endpoint",
        "stream",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cost_nano_usd",
        "token_source",
        "latency_ms",
        "end_user",
    ] {
        assert!(
            cols.iter().any(|c| c == col),
            "missing column {col}: {cols:?}"
        );
    }
}

#[test]
fn catalog_show_and_check() {
    let out = Command::new(BIN)
        .args(["catalog", "show"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("gpt-4o-mini "))
        .unwrap_or_default();
    assert!(
        line.contains("0.15") && line.contains("0.6") && line.contains("0.075"),
        "{line}"
    );

    let out = Command::new(BIN)
        .args(["catalog", "show", "--format", "json"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(v["models"]["ft:gpt-4o"]["input_usd_per_million"], "3.75");

    let out = Command::new(BIN)
        .args(["catalog", "check"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[models.\"ft:nothing\"]\ninput = 1.0\noutput = 2.0\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(BIN)
        .args(["catalog", "check"])
        .arg(&bad)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ft:nothing"));
}

#[test]
fn import_litellm_converts_the_public_cost_map() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/catalog/litellm_model_prices.json");
    if !file.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have ../shared/catalog beside the clone"
        );
        eprintln!("skipped: {} not found", file.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out_path = dir.path().join("imported.toml");
    let out = Command::new(BIN)
        .args(["catalog", "import-litellm"])
        .arg(&file)
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let catalog = tollgate::pricing::Catalog::parse(&text, 6.0).unwrap_or_else(|e| panic!("{e}"));
    assert!(catalog.len() > 50, "only {} models", catalog.len());
    let usage = tollgate::usage::Usage::tokens(1_000_000, 1_000_000);
    // LiteLLM's per-token prices, converted exactly.
    let cost = |m: &str| catalog.resolve(m).price.map(|p| p.cost(&usage).0);
    assert_eq!(cost("gpt-4o-mini"), Some(750_000_000));
    assert_eq!(cost("ft:gpt-3.5-turbo:acme::x"), Some(9_000_000_000));
    assert_eq!(cost("text-embedding-3-small"), Some(20_000_000));
    // Issue 13's table, priced from the import exactly.
    use tollgate::usage::{ServiceTier, ToolCalls, Usage};
    let price = |m: &str, u: &Usage, tier: ServiceTier| {
        catalog
            .resolve(m)
            .price
            .map(|p| p.price(u, tier, catalog.tool_call_fees()).total.0)
    };
    let small = Usage::tokens(10_000, 2_000);
    assert_eq!(price("o3", &small, ServiceTier::Flex), Some(18_000_000));
    assert_eq!(
        price("gpt-5", &small, ServiceTier::Priority),
        Some(65_000_000)
    );
    assert_eq!(
        price("gpt-5.4", &small, ServiceTier::Standard),
        Some(55_000_000)
    );
    let audio = Usage {
        audio_prompt_tokens: Some(800),
        audio_completion_tokens: Some(400),
        ..Usage::tokens(1_000, 500)
    };
    assert_eq!(
        price(
            "gpt-4o-audio-preview-2025-06-03",
            &audio,
            ServiceTier::Standard
        ),
        Some(65_500_000)
    );
    let searches = Usage {
        tool_calls: ToolCalls {
            web_search: 3,
            file_search: 0,
        },
        ..Usage::tokens(0, 0)
    };
    assert_eq!(
        price("gpt-5", &searches, ServiceTier::Standard),
        Some(30_000_000)
    );
    let out = Command::new(BIN)
        .args(["catalog", "import-litellm", "--provider", "deepseek"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let deepseek = tollgate::pricing::Catalog::parse(&String::from_utf8_lossy(&out.stdout), 6.0)
        .unwrap_or_else(|e| panic!("{e}"));
    let hits = Usage {
        cached_tokens: Some(9_000),
        ..Usage::tokens(10_000, 0)
    };
    assert_eq!(
        deepseek
            .resolve("deepseek-chat")
            .price
            .map(|p| p.cost(&hits).0),
        Some(532_000)
    );
    // The imported file passes `catalog check` too.
    let out = Command::new(BIN)
        .args(["catalog", "check"])
        .arg(&out_path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_usage_v2_migration_keeps_existing_rows() {
    // A database as the previous release left it: migrations 0001-0004
    // and one row.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let old = dir.path().join("old-migrations");
    std::fs::create_dir_all(&old).unwrap_or_else(|e| panic!("{e}"));
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    for entry in std::fs::read_dir(&all)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.as_str() < "0005" {
            std::fs::copy(entry.path(), old.join(&name)).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let db = dir.path().join("t.db");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let rt = tokio::runtime::Runtime::new().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
        sqlx::migrate::Migrator::new(old.as_path())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .run(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        sqlx::query(
            "INSERT INTO usage (created_at, request_id, team, key_id, model, base_model, upstream, endpoint, \
             stream, status, prompt_tokens, completion_tokens, cached_tokens, cost_nano_usd, token_source, latency_ms) \
             VALUES ('2026-11-30T10:00:00.000Z', 'req_old', 't', NULL, 'gpt-4o', 'gpt-4o', 'openai', 'chat.completions', \
             0, 200, 10, 5, 0, 75000, 'upstream', 12)",
        )
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        pool.close().await;
    });
    let out = Command::new(BIN)
        .arg("migrate")
        .env(
            "TOLLGATE_DATABASE_URL",
            format!("sqlite://{}", db.display()),
        )
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap_or_else(|e| panic!("{e}"));
        let row: (i64, String, String, Option<String>, i64) = sqlx::query_as(
            "SELECT cost_nano_usd, provider, cost_breakdown, service_tier, reasoning_tokens FROM usage WHERE request_id = 'req_old'",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(row, (75_000, "openai".into(), "{}".into(), None, 0));
    });
}
