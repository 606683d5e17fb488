//! Background responses (`background: true`, issue 22 point 2, SPEC 12):
//! answered `queued`, billed once when a poll, the resumed stream, a cancel
//! or tollgate's own poll shows them finished; held against the budget
//! meanwhile; reported when they stay pending past the horizon.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{client, metric, MockUpstream, Tollgate};

/// gpt-4o-mini: 1,000 input tokens at $0.15/M and 2,000 output at $0.60/M.
const COST: i64 = 1_000 * 150 + 2_000 * 600;
const TOKENS: [(&str, &str); 2] = [
    ("x-mock-prompt-tokens", "1000"),
    ("x-mock-completion-tokens", "2000"),
];

fn config(poll_interval_ms: u64, horizon_secs: u64) -> String {
    format!(
        "[auth]\nmode = \"virtual-keys\"\n\n[background]\npoll_interval_ms = {poll_interval_ms}\nhorizon_secs = {horizon_secs}\n"
    )
}

async fn create(
    tg: &Tollgate,
    key: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client()
        .post(tg.url("/v1/responses"))
        .bearer_auth(key)
        .json(&body);
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

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// What a stream delivered before it ended or broke.
async fn read_until_cut(mut r: reqwest::Response) -> String {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = r.chunk().await {
        out.extend_from_slice(&chunk);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn usd(text: &str) -> f64 {
    text.parse().unwrap_or(f64::NAN)
}

/// The rows of the Responses endpoint (polls are rows of their own, `other`).
async fn billed(tg: &Tollgate, n: usize) -> Vec<support::UsageRow> {
    tg.wait_rows_where(n, |r| r.endpoint == "responses").await
}

async fn pending_gauge(tg: &Tollgate, team: &str, want: f64) {
    tg.wait_metrics(|m| {
        let seen = metric(m, "tollgate_pending_usage", &[("team", team)]).unwrap_or(0.0);
        match seen == want {
            true => Ok(()),
            false => Err(format!(
                "tollgate_pending_usage{{team={team}}} = {seen}, want {want}"
            )),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_response_is_billed_once_when_a_poll_shows_it_finished() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, &config(600_000, 3_600)).await;
    let key = tg.budgeted_key("research", "100", "monthly").await;

    let r = create(
        &tg,
        &key,
        json!({"model": "gpt-4o-mini", "input": "a long report", "background": true}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    let created = support::request_id(&r);
    assert_eq!(header(&r, "x-tollgate-cost-usd"), None, "not billed yet");
    // The worst case is held while it runs.
    let held = header(&r, "x-tollgate-budget-remaining-usd").map_or(f64::NAN, |v| usd(&v));
    assert!(held < 100.0 - 0.00135, "remaining {held}");
    let body: Value = r.json().await.unwrap_or_default();
    assert_eq!(body["status"], "queued");
    let id = body["id"].as_str().unwrap_or_default().to_string();
    pending_gauge(&tg, "research", 1.0).await;

    // Still running: nothing billed.
    let r = get(&tg, &key, &format!("/v1/responses/{id}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap_or_default()["status"],
        "in_progress"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    billed(&tg, 0).await;

    // Finished: billed now, to the creation's request id, at the list price.
    let r = get(&tg, &key, &format!("/v1/responses/{id}")).await;
    assert_eq!(
        header(&r, "x-tollgate-cost-usd").as_deref(),
        Some("0.001350000")
    );
    assert_eq!(
        r.json::<Value>().await.unwrap_or_default()["status"],
        "completed"
    );
    let rows = billed(&tg, 1).await;
    assert_eq!(rows[0].request_id, created);
    assert_eq!(rows[0].cost_nano_usd, COST);
    assert_eq!(
        (rows[0].prompt_tokens, rows[0].completion_tokens),
        (1_000, 2_000)
    );
    assert_eq!(rows[0].team, "research");
    pending_gauge(&tg, "research", 0.0).await;

    // Polled again, twice: still one row.
    for _ in 0..2 {
        let r = get(&tg, &key, &format!("/v1/responses/{id}")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-tollgate-cost-usd"), None);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    billed(&tg, 1).await;

    // The hold is gone; the budget is down by the cost alone.
    let r = create(
        &tg,
        &key,
        json!({"model": "gpt-4o-mini", "input": "hi"}),
        &[],
    )
    .await;
    let remaining = header(&r, "x-tollgate-budget-remaining-usd").map_or(f64::NAN, |v| usd(&v));
    assert!(
        (remaining - (100.0 - 2.0 * 0.00135)).abs() < 1e-9,
        "remaining {remaining}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_background_response_bills_what_it_generated_once() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, &config(600_000, 3_600)).await;
    let key = tg.budgeted_key("research", "100", "monthly").await;
    let r = create(
        &tg,
        &key,
        json!({"model": "gpt-4o-mini", "input": "a long report", "background": true}),
        &[("x-mock-polls-pending", "50")],
    )
    .await;
    let body: Value = r.json().await.unwrap_or_default();
    let id = body["id"].as_str().unwrap_or_default().to_string();

    // Cancelled after 300 output tokens: 1,000 in and 300 out are billed.
    let r = client()
        .post(tg.url(&format!("/v1/responses/{id}/cancel")))
        .bearer_auth(&key)
        .header("x-mock-completion-tokens", "300")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-tollgate-cost-usd").as_deref(),
        Some("0.000330000")
    );
    assert_eq!(
        r.json::<Value>().await.unwrap_or_default()["status"],
        "cancelled"
    );
    let rows = billed(&tg, 1).await;
    assert_eq!(rows[0].cost_nano_usd, 1_000 * 150 + 300 * 600);

    // A poll of the cancelled response bills nothing more.
    let r = get(&tg, &key, &format!("/v1/responses/{id}")).await;
    assert_eq!(
        r.json::<Value>().await.unwrap_or_default()["status"],
        "cancelled"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    billed(&tg, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_stream_cut_before_it_finished_is_billed_from_the_resumed_stream() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, &config(600_000, 3_600)).await;
    let key = tg.budgeted_key("research", "100", "monthly").await;
    // Cut after `response.created`: the response goes on upstream.
    let r = create(
        &tg,
        &key,
        json!({"model": "gpt-4o-mini", "input": "a long report", "background": true, "stream": true}),
        &[("x-mock-cut-after", "1")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let created = support::request_id(&r);
    let text = read_until_cut(r).await;
    assert!(text.contains("resp_bg_1"), "{text}");
    pending_gauge(&tg, "research", 1.0).await;
    billed(&tg, 0).await;

    // Resumed after event 0: the rest of the events, the last with usage.
    let r = get(
        &tg,
        &key,
        "/v1/responses/resp_bg_1?stream=true&starting_after=0",
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap_or_default();
    assert!(text.contains("response.completed"), "{text}");
    let rows = billed(&tg, 1).await;
    assert_eq!(
        (rows[0].request_id.as_str(), rows[0].cost_nano_usd),
        (created.as_str(), COST)
    );
    pending_gauge(&tg, "research", 0.0).await;

    // Resumed again: nothing more.
    let r = get(&tg, &key, "/v1/responses/resp_bg_1?stream=true").await;
    let _ = r.text().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    billed(&tg, 1).await;

    // A background stream that finishes is billed as any stream.
    let r = create(
        &tg,
        &key,
        json!({"model": "gpt-4o-mini", "input": "a short one", "background": true, "stream": true}),
        &[],
    )
    .await;
    let streamed = support::request_id(&r);
    let _ = r.text().await;
    let row = tg.row(&streamed).await;
    assert_eq!(row.cost_nano_usd, COST);
    pending_gauge(&tg, "research", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tollgate_bills_a_response_nobody_polls_and_reports_one_that_never_finishes() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, &config(200, 1)).await;
    let key = tg.budgeted_key("research", "100", "monthly").await;
    // Finished after one poll: tollgate's own polls find it finished.
    let r = create(
        &tg,
        &key,
        json!({"model": "gpt-4o-mini", "input": "a long report", "background": true}),
        &[],
    )
    .await;
    let created = support::request_id(&r);
    let row = tg.row(&created).await;
    assert_eq!(row.cost_nano_usd, COST);
    // Its polls went up with the upstream's key, never the client's.
    let polls: Vec<_> = mock
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.starts_with("/v1/responses/"))
        .collect();
    assert!(!polls.is_empty());
    assert!(polls
        .iter()
        .all(|p| p.header("authorization").as_deref() == Some("Bearer sk-upstream-secret")));

    // Never finishes: reported once past the 1 s horizon, held all along.
    let r = create(
        &tg,
        &key,
        json!({"model": "gpt-4o-mini", "input": "forever", "background": true}),
        &[("x-mock-polls-pending", "100000")],
    )
    .await;
    let body: Value = r.json().await.unwrap_or_default();
    let id = body["id"].as_str().unwrap_or_default().to_string();
    tg.wait_metrics(|m| {
        match metric(m, "tollgate_pending_usage_overdue", &[("team", "research")]) {
            Some(1.0) => Ok(()),
            _ => Err("never reported overdue".into()),
        }
    })
    .await;
    let log = tg.log();
    let lines: Vec<_> = log
        .iter()
        .filter(|l| l.contains("pending past the horizon") && l.contains(&id))
        .collect();
    assert_eq!(lines.len(), 1, "{log:?}");
    assert!(!log
        .iter()
        .any(|l| l.contains("sk-upstream-secret") || l.contains(&key)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_response_is_its_own_teams_to_poll() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, &config(600_000, 3_600)).await;
    let ours = tg.budgeted_key("research", "100", "monthly").await;
    let theirs = tg.budgeted_key("sales", "100", "monthly").await;
    let r = create(
        &tg,
        &ours,
        json!({"model": "gpt-4o-mini", "input": "secret plans", "background": true}),
        &[("x-mock-polls-pending", "0")],
    )
    .await;
    let id = r.json::<Value>().await.unwrap_or_default()["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let polls_before = mock.request_count();
    let r = get(&tg, &theirs, &format!("/v1/responses/{id}")).await;
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap_or_default();
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    assert_eq!(mock.request_count(), polls_before, "never sent up");
    // Neither billed to them nor lost: ours to poll, and billed to us.
    let r = get(&tg, &ours, &format!("/v1/responses/{id}")).await;
    assert_eq!(
        header(&r, "x-tollgate-cost-usd").as_deref(),
        Some("0.001350000")
    );
    let rows = billed(&tg, 1).await;
    assert_eq!(rows[0].team, "research");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_a_pending_response_held_and_billable() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, &config(600_000, 3_600)).await;
    let key = tg.budgeted_key("research", "100", "monthly").await;
    let r = create(
        &tg,
        &key,
        json!({"model": "gpt-4o-mini", "input": "a long report", "background": true}),
        &[("x-mock-polls-pending", "0")],
    )
    .await;
    let created = support::request_id(&r);
    let held = header(&r, "x-tollgate-budget-remaining-usd").map_or(f64::NAN, |v| usd(&v));
    let id = r.json::<Value>().await.unwrap_or_default()["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let tg = tg.restart().await;
    // The hold survives the restart (from the pending row)...
    let r = create(
        &tg,
        &key,
        json!({"model": "gpt-4o-mini", "input": "hi"}),
        &[],
    )
    .await;
    let remaining = header(&r, "x-tollgate-budget-remaining-usd").map_or(f64::NAN, |v| usd(&v));
    assert!(remaining < held, "remaining {remaining}, held {held}");
    // ...and a poll after it bills the response, once.
    let r = get(&tg, &key, &format!("/v1/responses/{id}")).await;
    assert_eq!(
        header(&r, "x-tollgate-cost-usd").as_deref(),
        Some("0.001350000")
    );
    assert_eq!(tg.row(&created).await.cost_nano_usd, COST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_creates_polls_and_cancels_through_tollgate() {
    let Some(python) = support::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let (tg, keys) = support::start_for_sdks(&mock).await;
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/background_sdk.py");
    let out = support::run_sdk_script(python, script, &tg, keys).await;
    support::assert_lines(
        &out,
        &[
            "create: queued, cost none",
            "retrieve: completed after 3 polls, costs none none 0.001350000",
            "usage: 1000 in, 2000 out",
            "retrieve again: completed, cost none",
            "cancel: cancelled, 300 out",
        ],
    );
    let rows = billed(&tg, 2).await;
    let mut costs: Vec<i64> = rows.iter().map(|r| r.cost_nano_usd).collect();
    costs.sort_unstable();
    assert_eq!(costs, vec![1_000 * 150 + 300 * 600, COST]);
    assert!(rows.iter().all(|r| r.team == "app"));
}
