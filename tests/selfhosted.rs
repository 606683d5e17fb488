//! Self-hosted models priced from GPU cost (issue 15, point 3): a catalog
//! row with `gpu_usd_per_hour`, `gpus` and a floor prices each request at
//! its tokens' share of a trailing window's GPU cost, exports the effective
//! price and throughput, and `numbers` measures throughput by concurrency.
//! The window arithmetic under a controlled clock is unit-tested in
//! `src/pricing/gpu.rs`; here the window (an hour) holds the whole test.

mod support;

use serde_json::{json, Value};
use support::{client, MockUpstream, Tollgate};

/// $3.60 per GPU-hour x 2 GPUs = $7.20 an hour = 7,200,000,000 nano-USD per
/// window of an hour; the floor, 100 tokens/s, is 360,000 tokens a window.
/// Added to the bundled catalog with `catalog.extra`.
const CATALOG: &str = r#"
[models."llama-local"]
provider = "vllm"
gpu_usd_per_hour = 3.6
gpus = 2
min_tokens_per_second = 100
window_seconds = 3600
"#;

async fn start(mock: &MockUpstream) -> Tollgate {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(&catalog, CATALOG).unwrap_or_else(|e| panic!("{e}"));
    let config = format!(
        "{}\n[catalog]\nextra = \"{}\"\n",
        support::base_config(mock, dir.path()),
        catalog.display()
    );
    Tollgate::start_with_config(dir, &config).await
}

async fn chat(tg: &Tollgate, stream: bool, prompt: &str, completion: &str) -> String {
    let body = json!({"model": "llama-local", "stream": stream,
                      "messages": [{"role": "user", "content": "hi"}]});
    let r = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-tollgate-team", "ml")
        .header("x-mock-prompt-tokens", prompt)
        .header("x-mock-completion-tokens", completion)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let cost = r
        .headers()
        .get("x-tollgate-cost-usd")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let _ = r.bytes().await;
    cost
}

/// A gauge's value for `model="llama-local"`.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    support::metric(metrics, name, &[("model", "llama-local")])
}

/// `tollgate catalog check FILE` on `text`: whether it passed, and stderr.
fn check_catalog(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(&catalog, text).unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(support::BIN)
        .args(["catalog", "check"])
        .arg(&catalog)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_hosted_requests_pay_their_share_of_the_gpu_window() {
    let mock = MockUpstream::start().await;
    let tg = start(&mock).await;

    // 1,200 tokens in an idle window: the floor (360,000 tokens) stands in
    // for the window's tokens: 1,200 / 360,000 x $7.20 = $0.024.
    assert_eq!(chat(&tg, false, "1000", "200").await, "0.024000000");
    // Streamed, 400,000 tokens: the window now served 401,200, more than
    // the floor: 400,000 / 401,200 x $7.20 = 7,178,464,606.18 nano-USD.
    chat(&tg, true, "398800", "1200").await;
    let rows = tg.wait_rows(2).await;
    let costs: Vec<(i64, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r.cost_nano_usd,
                r.cost_breakdown.as_str(),
                r.provider.as_str(),
            )
        })
        .collect();
    assert_eq!(
        costs,
        vec![
            (24_000_000, r#"{"gpu":24000000}"#, "vllm"),
            (7_178_464_606, r#"{"gpu":7178464606}"#, "vllm"),
        ]
    );

    // The window now: 401,200 tokens over an hour, and $7.20 over them.
    let metrics = tg.metrics().await;
    let tps = gauge(&metrics, "tollgate_selfhosted_tokens_per_second");
    let usd = gauge(&metrics, "tollgate_selfhosted_usd_per_mtok");
    assert!(
        tps.is_some_and(|v| (v - 401_200.0 / 3600.0).abs() < 1e-6),
        "{tps:?}"
    );
    assert!(
        usd.is_some_and(|v| (v - 7.2 / 401_200.0 * 1e6).abs() < 1e-6),
        "{usd:?}"
    );
    // Both requests' cost is on the `gpu` component.
    let gpu_cost = support::metric(
        &metrics,
        "tollgate_cost_by_component_usd_total",
        &[("component", "gpu"), ("model", "llama-local")],
    );
    assert!(
        gpu_cost.is_some_and(|v| (v - 7.202_464_606).abs() < 1e-9),
        "{gpu_cost:?}"
    );

    // `report --by component` has the gpu line, to the nano-USD.
    let report: Value = serde_json::from_str(&support::stdout(&tg.cli(&[
        "report",
        "--by",
        "component",
        "--since",
        "1h",
        "--format",
        "json",
    ])))
    .unwrap_or_default();
    assert_eq!(report["rows"][0]["group"], "gpu", "{report}");
    assert_eq!(report["rows"][0]["cost_nano_usd"], 7_202_464_606u64);
    assert_eq!(report["total_cost_nano_usd"], 7_202_464_606u64);

    // The row's token prices are the ceiling (the price at the floor,
    // $7.20 / 360,000 tokens = $20 per M): what budgets reserve.
    let catalog: Value = serde_json::from_str(&support::stdout(
        &tg.cli(&["catalog", "show", "--format", "json"]),
    ))
    .unwrap_or_default();
    let row = &catalog["models"]["llama-local"];
    assert_eq!(row["input_usd_per_million"], "20", "{row}");
    assert_eq!(
        row["gpu"],
        json!({"usd_per_gpu_hour": "3.6", "gpus": 2, "min_tokens_per_second": 100, "window_seconds": 3600}),
        "{row}"
    );

    // `catalog.extra` reloads like `catalog.path`: the GPUs now cost twice
    // as much, and the gauge follows within the 2 s check.
    let extra = tg.dir.path().join("catalog.toml");
    std::fs::write(&extra, CATALOG.replace("3.6", "7.2")).unwrap_or_else(|e| panic!("{e}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    loop {
        let usd = gauge(&tg.metrics().await, "tollgate_selfhosted_usd_per_mtok");
        if usd.is_some_and(|v| (v - 14.4 / 401_200.0 * 1e6).abs() < 1e-6) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "extra catalog not reloaded: {usd:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_row_without_a_floor_is_refused() {
    let (ok, err) = check_catalog("[models.\"llama-local\"]\ngpu_usd_per_hour = 2.5\n");
    assert!(!ok);
    assert!(
        err.contains("models.\"llama-local\".min_tokens_per_second: missing"),
        "{err}"
    );
    // Token prices next to a GPU price would be ignored: refused instead.
    let (ok, err) = check_catalog(
        "[models.\"llama-local\"]\ngpu_usd_per_hour = 2.5\nmin_tokens_per_second = 100\ncached_input = 0.1\n\n[models.\"llama-local\".batch]\ninput = 0.1\n",
    );
    assert!(
        !ok && err.contains("not both (remove cached_input, batch)"),
        "{err}"
    );
}

/// Inserts a usage row of llama-local that started at `start_ms` (Unix
/// ms) and took `latency_ms`, with `tokens` (prompt) and `cost`.
async fn seed(
    store: &tollgate::store::Store,
    id: &str,
    start_ms: i64,
    latency_ms: i64,
    tokens: i64,
    cost: i64,
) {
    let at = chrono::DateTime::from_timestamp_millis(start_ms).unwrap_or_default();
    let mut row = support::usage_record(id, "ml", "llama-local", at);
    row.prompt_tokens = tokens as u64;
    row.cost_nano_usd = cost as u64;
    row.latency_ms = latency_ms as u64;
    row.provider = "vllm";
    row.meters = tollgate::usage::meter::Meters::of(&tollgate::usage::Usage {
        prompt_tokens: tokens as u64,
        ..tollgate::usage::Usage::NONE
    });
    store
        .insert_usage(&[row])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_show_what_batching_does_to_throughput_and_cost() {
    let mock = MockUpstream::start().await;
    let tg = start(&mock).await;
    let url = format!("sqlite://{}", tg.dir.path().join("tollgate.db").display());
    let pool = tollgate::store::Store::open(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // One request alone for a second (1,000 tokens), then four at once for
    // two seconds (4,000 tokens each), ten seconds later.
    let t0 = chrono::Utc::now().timestamp_millis() - 60_000;
    seed(&pool, "r1", t0, 1_000, 1_000, 20_000_000).await;
    for i in 0..4 {
        seed(
            &pool,
            &format!("r{}", i + 2),
            t0 + 10_000,
            2_000,
            4_000,
            10_000_000,
        )
        .await;
    }
    pool.close().await;

    let out = support::stdout(&tg.cli(&["numbers", "--format", "json"]));
    let n: Value = serde_json::from_str(&out).unwrap_or_default();
    // Alone: 1,000 tokens/s, so $0.002 a second buys $2 per M tokens; four
    // in flight: 8,000 tokens/s, $0.25 per M. Busy 3 s of 12 s. Charged:
    // $0.06 for 17,000 tokens; the GPUs cost $0.024 over those 12 s.
    assert_eq!(
        n["selfhosted"],
        json!([{
            "model": "llama-local", "gpus": 2, "requests": 5, "tokens": 17_000,
            "cost_nano_usd": 60_000_000, "nano_usd_per_mtok": 3_529_411_765u64,
            "span_seconds": 12.0, "busy_seconds": 3.0, "gpu_utilization": 0.25,
            "gpu_cost_nano_usd": 24_000_000, "nano_usd_per_mtok_at_gpu_cost": 1_411_764_706u64,
            "by_concurrency": [
                {"concurrency": 1, "seconds": 1.0, "tokens_per_second": 1000.0, "nano_usd_per_mtok": 2_000_000_000u64},
                {"concurrency": 4, "seconds": 2.0, "tokens_per_second": 8000.0, "nano_usd_per_mtok": 250_000_000},
            ],
            "throughput_gain_at_highest_concurrency": 8.0,
        }]),
        "{n:#}"
    );
    // One team's numbers still show the GPUs' whole traffic: every team
    // shares them.
    let out = support::stdout(&tg.cli(&["numbers", "--team", "nobody", "--format", "json"]));
    let other: Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(other["requests"], 0);
    assert_eq!(other["selfhosted"], n["selfhosted"]);
    let text = support::stdout(&tg.cli(&["numbers"]));
    assert!(
        text.contains("Self-hosted llama-local (2 GPUs): $3.529411765 per M tokens charged, $1.411764706 at GPU cost, 25.00% utilized"),
        "{text}"
    );
    assert!(text.contains("batching raised throughput 8.0x"), "{text}");
    // The README shows this part of the output.
    let shown = text
        .split("\nSelf-hosted ")
        .nth(1)
        .map(|s| format!("Self-hosted {s}"))
        .unwrap_or_default();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .unwrap_or_default();
    assert!(
        readme.contains(&format!("```\n{shown}```\n")),
        "README's self-hosted numbers are stale:\n{shown}"
    );
}
