//! The Batch API through tollgate (issue 22 point 1, SPEC 12): OpenAI's
//! `/v1/files` + `/v1/batches` and Anthropic's `/v1/messages/batches`.
//! Each result line is one usage row at the model's batch prices, exactly
//! once, whether the results are downloaded through tollgate or only
//! polled; a budgeted team's batch is held from its input file or refused;
//! a cancelled batch bills the lines that ran.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{client, metric, MockUpstream, Tollgate};

/// gpt-4o-mini at batch prices: 1,000 input tokens at $0.075/M and 2,000
/// output at $0.30/M.
const LINE: i64 = 1_000 * 75 + 2_000 * 300;
const TOKENS: [(&str, &str); 2] = [
    ("x-mock-prompt-tokens", "1000"),
    ("x-mock-completion-tokens", "2000"),
];

fn config(poll_interval_ms: u64) -> String {
    format!(
        "[auth]\nmode = \"virtual-keys\"\n\n[background]\npoll_interval_ms = {poll_interval_ms}\n"
    )
}

/// A batch input file of `n` chat requests for `model`.
fn input_file(n: usize, model: &str) -> String {
    (1..=n)
        .map(|i| {
            json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": model, "max_tokens": 4000, "messages": [{"role": "user", "content": format!("question {i}")}]}})
            .to_string()
                + "\n"
        })
        .collect()
}

/// Uploads `content` as a batch input file, multipart as the SDKs send it.
async fn upload(tg: &Tollgate, key: &str, content: &str) -> String {
    let boundary = "tollgate-batch-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let r = client()
        .post(tg.url("/v1/files"))
        .bearer_auth(key)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap_or_default();
    v["id"].as_str().unwrap_or_default().to_string()
}

async fn create(
    tg: &Tollgate,
    key: &str,
    file: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client()
        .post(tg.url("/v1/batches"))
        .bearer_auth(key)
        .json(&json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}));
    for (k, v) in TOKENS.iter().chain(headers) {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap_or_else(|e| panic!("{e}"))
}

async fn get(tg: &Tollgate, key: &str, path: &str) -> reqwest::Response {
    client()
        .get(tg.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn remaining(r: &reqwest::Response) -> f64 {
    r.headers()
        .get("x-tollgate-budget-remaining-usd")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

async fn batch_rows(tg: &Tollgate, n: usize) -> Vec<support::UsageRow> {
    let mut rows = tg.wait_rows_where(n, |r| r.endpoint == "batch").await;
    rows.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    rows
}

/// Waits until the team's budget gauges read `spent` and `remaining` USD.
async fn budget_reads(tg: &Tollgate, team: &str, spent: f64, remaining: f64) {
    tg.wait_metrics(|m| {
        let s = metric(m, "tollgate_budget_spent_usd", &[("team", team)]).unwrap_or(f64::NAN);
        let r = metric(m, "tollgate_budget_remaining_usd", &[("team", team)]).unwrap_or(f64::NAN);
        match (s - spent).abs() < 1e-9 && (r - remaining).abs() < 1e-9 {
            true => Ok(()),
            false => Err(format!(
                "spent {s}, remaining {r}; want {spent}, {remaining}"
            )),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_result_line_is_billed_once_at_batch_prices_however_often_it_is_read() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, &config(600_000)).await;
    let key = tg.budgeted_key("research", "100", "monthly").await;
    let file = upload(&tg, &key, &input_file(3, "gpt-4o-mini")).await;
    // The last line fails upstream: not billed, but counted.
    let r = create(&tg, &key, &file, &[("x-mock-failed-lines", "1")]).await;
    assert_eq!(r.status(), 200);
    assert!(
        remaining(&r) < 100.0 - 3.0 * 0.000675,
        "held: {}",
        remaining(&r)
    );
    let batch: Value = r.json().await.unwrap_or_default();
    let id = batch["id"].as_str().unwrap_or_default().to_string();

    // In progress: nothing billed.
    let r = get(&tg, &key, &format!("/v1/batches/{id}")).await;
    assert_eq!(
        r.json::<Value>().await.unwrap_or_default()["status"],
        "in_progress"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    batch_rows(&tg, 0).await;

    // Completed: one row per line, to the line's custom_id and the batch.
    let r = get(&tg, &key, &format!("/v1/batches/{id}")).await;
    let done: Value = r.json().await.unwrap_or_default();
    assert_eq!(done["status"], "completed");
    let rows = batch_rows(&tg, 3).await;
    let seen: Vec<(&str, &str, i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.request_id.as_str(),
                r.batch_id.as_str(),
                r.status,
                r.cost_nano_usd,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("req-1", id.as_str(), 200, LINE),
            ("req-2", id.as_str(), 200, LINE),
            ("req-3", id.as_str(), 400, 0),
        ]
    );
    assert!(rows.iter().all(|r| r.team == "research"));
    // A failed line's body names no model.
    assert!(rows[..2].iter().all(|r| r.model == "gpt-4o-mini"));
    assert!(rows[..2]
        .iter()
        .all(|r| r.service_tier.as_deref() == Some("batch")));
    // The hold is gone: the budget is down by the two lines.
    budget_reads(&tg, "research", 2.0 * 0.000675, 100.0 - 2.0 * 0.000675).await;

    // Downloaded twice, polled again: still three rows.
    let output = done["output_file_id"].as_str().unwrap_or_default();
    for _ in 0..2 {
        let r = get(&tg, &key, &format!("/v1/files/{output}/content")).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap_or_default();
        assert_eq!(
            text.lines().count(),
            3,
            "the file reaches the client unchanged"
        );
    }
    let _ = get(&tg, &key, &format!("/v1/batches/{id}")).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    batch_rows(&tg, 3).await;

    // Another batch reusing the same custom ids: rows of their own.
    let file = upload(&tg, &key, &input_file(2, "gpt-4o-mini")).await;
    let r = create(&tg, &key, &file, &[("x-mock-polls-pending", "0")]).await;
    let second = r.json::<Value>().await.unwrap_or_default()["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let _ = get(&tg, &key, &format!("/v1/batches/{second}")).await;
    let rows = batch_rows(&tg, 5).await;
    assert_eq!(rows.iter().filter(|r| r.batch_id == second).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_nobody_polls_is_billed_and_a_cancelled_one_bills_what_ran() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, &config(200)).await;
    let key = tg.budgeted_key("research", "100", "monthly").await;
    // Never polled by the client: tollgate's own polls bill it.
    let file = upload(&tg, &key, &input_file(2, "gpt-4o-mini")).await;
    let r = create(&tg, &key, &file, &[]).await;
    assert_eq!(r.status(), 200);
    let rows = batch_rows(&tg, 2).await;
    assert!(rows.iter().all(|r| r.cost_nano_usd == LINE));

    // Cancelled after one of its three lines ran: that line is billed.
    let file = upload(&tg, &key, &input_file(3, "gpt-4o-mini")).await;
    let r = create(&tg, &key, &file, &[("x-mock-polls-pending", "1000")]).await;
    let id = r.json::<Value>().await.unwrap_or_default()["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let r = client()
        .post(tg.url(&format!("/v1/batches/{id}/cancel")))
        .bearer_auth(&key)
        .header("x-mock-completed-lines", "1")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let rows = tg
        .wait_rows_where(1, |r| r.endpoint == "batch" && r.batch_id == id)
        .await;
    assert_eq!(
        (rows[0].request_id.as_str(), rows[0].cost_nano_usd),
        ("req-1", LINE)
    );
    budget_reads(&tg, "research", 3.0 * 0.000675, 100.0 - 3.0 * 0.000675).await;
    // Its upstream polls carried the upstream's key, never the client's.
    assert!(mock
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v1/batches/") || r.path.starts_with("/v1/files/"))
        .all(|r| r.header("authorization").as_deref() == Some("Bearer sk-upstream-secret")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budgeted_teams_batch_it_cannot_bound_is_refused_before_it_costs() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, &config(600_000)).await;
    let key = tg.budgeted_key("research", "100", "monthly").await;
    let other = tg.budgeted_key("sales", "100", "monthly").await;
    let sent = || {
        mock.requests()
            .iter()
            .filter(|r| r.path == "/v1/batches")
            .count()
    };
    // A file tollgate never saw.
    let r = create(&tg, &key, "file-elsewhere", &[]).await;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap_or_default();
    assert_eq!(body["error"]["code"], "batch_not_bounded", "{body}");
    // Another team's file.
    let theirs = upload(&tg, &other, &input_file(1, "gpt-4o-mini")).await;
    assert_eq!(create(&tg, &key, &theirs, &[]).await.status(), 403);
    // A line naming a model without a price.
    let unpriced = upload(&tg, &key, &input_file(1, "no-such-model-x")).await;
    assert_eq!(create(&tg, &key, &unpriced, &[]).await.status(), 403);
    assert_eq!(sent(), 0, "nothing refused went up");

    // A batch whose worst case exceeds the budget: 429 before it costs.
    let tight = tg.budgeted_key("tight", "0.0001", "monthly").await;
    let file = upload(&tg, &tight, &input_file(3, "gpt-4o-mini")).await;
    let r = create(&tg, &tight, &file, &[]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(sent(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_message_batches_are_billed_per_result_at_batch_prices() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = support::readme_config(
        "Claude through tollgate",
        &mock,
        dir.path(),
        "https://api.anthropic.com",
        ("${ANTHROPIC_API_KEY}", "sk-ant-upstream-secret"),
    );
    let (tg, key, _broke) = support::start_app_and_broke(dir, &config).await;
    let requests: Vec<Value> = (1..=2)
        .map(|i| {
            json!({"custom_id": format!("claude-{i}"), "params": {"model": "claude-sonnet-4-5",
                         "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello"}]}})
        })
        .collect();
    let r = support::messages(
        tg.url("/v1/messages/batches"),
        &key,
        &json!({"requests": requests}),
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-completion-tokens", "2000"),
            ("x-mock-polls-pending", "0"),
        ],
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let up = mock.last();
    assert_eq!(
        up.header("x-api-key").as_deref(),
        Some("sk-ant-upstream-secret")
    );
    let id = r.json::<Value>().await.unwrap_or_default()["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // The results downloaded through tollgate: billed from them.
    let poll = |path: String| {
        client()
            .get(tg.url(&path))
            .header("x-api-key", &key)
            .header("anthropic-version", "2023-06-01")
            .send()
    };
    let r = poll(format!("/v1/messages/batches/{id}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        r.json::<Value>().await.unwrap_or_default()["processing_status"],
        "ended"
    );
    let r = poll(format!("/v1/messages/batches/{id}/results"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.text().await.unwrap_or_default().lines().count(), 2);
    // claude-sonnet-4-5 at batch prices: $1.50/M in, $7.50/M out.
    let rows = batch_rows(&tg, 2).await;
    let seen: Vec<(&str, i64)> = rows
        .iter()
        .map(|r| (r.request_id.as_str(), r.cost_nano_usd))
        .collect();
    let line = 1_000 * 1_500 + 2_000 * 7_500;
    assert_eq!(seen, vec![("claude-1", line), ("claude-2", line)]);
    assert!(rows
        .iter()
        .all(|r| r.batch_id == id && r.provider == "anthropic"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_runs_a_batch_through_tollgate() {
    let Some(python) = support::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let (tg, keys) = support::start_for_sdks(&mock).await;
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/batch_sdk.py");
    let out = support::run_sdk_script(python, script, &tg, keys).await;
    support::assert_lines(
        &out,
        &[
            "files.create: batch",
            "batches.create: validating",
            "batches.retrieve: completed after 2 polls",
            "files.content: 2 lines",
        ],
    );
    let rows = batch_rows(&tg, 2).await;
    assert!(rows
        .iter()
        .all(|r| r.cost_nano_usd == LINE && r.team == "app"));
}
