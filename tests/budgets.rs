//! Teams, virtual keys and budgets through a real tollgate: keys from the CLI
//! and the admin API, revocation on a running server, the no-overspend
//! guarantee under concurrency, restarts, output caps and reports.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{chat_body, client, metric, stdout, wait_for_key, MockUpstream, Tollgate};

const VIRTUAL: &str = "[auth]\nmode = \"virtual-keys\"\n";

async fn chat(tg: &Tollgate, key: &str, model: &str) -> reqwest::Response {
    client()
        .post(tg.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat_body(model))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_keys_authenticate_restrict_models_and_revoke_on_a_running_server() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, VIRTUAL).await;
    stdout(&tg.cli(&[
        "teams",
        "create",
        "search",
        "--budget-usd",
        "10",
        "--period",
        "monthly",
    ]));
    let out = stdout(&tg.cli(&[
        "keys",
        "create",
        "--team",
        "search",
        "--name",
        "ci",
        "--models",
        "gpt-4o-mini*,text-*",
    ]));
    let key = out.lines().next().unwrap_or_default().to_string();
    assert!(key.starts_with("tg-") && key.len() >= 3 + 32, "{out}");
    let listed: Value =
        serde_json::from_str(&stdout(&tg.cli(&["keys", "list", "--format", "json"])))
            .unwrap_or_default();
    let id = listed[0]["id"].as_str().unwrap_or_default().to_string();
    assert!(
        !listed.to_string().contains(&key[3..]),
        "a listing must never show the key"
    );
    // The running server picks the new key up within its refresh interval.
    wait_for_key(&tg, &key).await;
    let probes = mock.request_count();

    let resp = chat(&tg, &key, "gpt-4o-mini").await;
    assert_eq!(resp.status(), 200);
    let remaining = resp
        .headers()
        .get("x-tollgate-budget-remaining-usd")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // $10 - (10 x $0.15/M + 5 x $0.60/M) = $9.9999955
    assert_eq!(remaining.as_deref(), Some("9.999995500"));
    // The tollgate key never reaches the upstream; the upstream's own key does.
    assert_eq!(
        mock.last().header("authorization").as_deref(),
        Some("Bearer sk-upstream-secret")
    );

    let resp = chat(&tg, &key, "gpt-4o").await;
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap_or_default();
    assert_eq!(v["error"]["code"], "model_not_allowed");
    for bad in ["tg-not-a-key", ""] {
        let resp = chat(&tg, bad, "gpt-4o-mini").await;
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap_or_default();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }

    stdout(&tg.cli(&["keys", "revoke", &id]));
    let revoked_at = Instant::now();
    let mut accepted_after_revoke = 0;
    while chat(&tg, &key, "gpt-4o-mini").await.status() != 401 {
        accepted_after_revoke += 1;
        assert!(
            revoked_at.elapsed() < Duration::from_millis(1500),
            "revoked key still accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("revocation by CLI refused after {:?}", revoked_at.elapsed());

    let rows = tg.wait_rows(probes + 2 + accepted_after_revoke).await;
    assert!(rows
        .iter()
        .all(|r| r.team == "search" && r.key_id.as_deref() == Some(id.as_str())));
    let chats: Vec<i64> = rows
        .iter()
        .filter(|r| r.endpoint == "chat.completions")
        .map(|r| r.status)
        .collect();
    assert_eq!(&chats[..2], &[200, 403]);
    assert!(chats[2..].iter().all(|&s| s == 200));
}

async fn admin(
    tg: &Tollgate,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client()
        .request(method, tg.url(path))
        .bearer_auth("admin-secret");
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_manages_teams_keys_and_budgets_at_once() {
    let mock = MockUpstream::start().await;
    // Without an admin token the admin API does not exist.
    let tg = Tollgate::start(&mock, VIRTUAL).await;
    let (status, _) = admin(&tg, reqwest::Method::GET, "/admin/teams", None).await;
    assert_eq!(status, 404);
    drop(tg);

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = format!(
        "{}\n{VIRTUAL}",
        support::base_config(&mock, dir.path())
            .replace("[server]\n", "[server]\nadmin_token = \"admin-secret\"\n")
            .replace(support::PASSTHROUGH_AUTH, "")
    );
    let tg = Tollgate::start_with_config(dir, &config).await;
    let resp = client()
        .get(tg.url("/admin/teams"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 401);

    let (status, team) = admin(
        &tg,
        reqwest::Method::POST,
        "/admin/teams",
        Some(json!({"name": "ml", "budget_usd": 1, "period": "daily"})),
    )
    .await;
    assert_eq!(status, 201, "{team}");
    assert_eq!(team["budget_usd"], "1.000000000");
    let (status, _) = admin(
        &tg,
        reqwest::Method::POST,
        "/admin/teams",
        Some(json!({"name": "ml"})),
    )
    .await;
    assert_eq!(status, 409);
    let (status, created) = admin(
        &tg,
        reqwest::Method::POST,
        "/admin/keys",
        Some(json!({"team": "ml"})),
    )
    .await;
    assert_eq!(status, 201);
    let key = created["key"].as_str().unwrap_or_default().to_string();
    let id = created["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(created["team"], "ml");
    assert_eq!(chat(&tg, &key, "gpt-4o").await.status(), 200);

    // A budget of zero applies to the very next request.
    let (status, _) = admin(
        &tg,
        reqwest::Method::PUT,
        "/admin/teams/ml/budget",
        Some(json!({"budget_usd": "0", "period": "daily"})),
    )
    .await;
    assert_eq!(status, 200);
    let before = mock.request_count();
    let resp = chat(&tg, &key, "gpt-4o").await;
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json().await.unwrap_or_default();
    assert_eq!(v["error"]["code"], "budget_exceeded");
    assert_eq!(
        mock.request_count(),
        before,
        "a rejected request reached the upstream"
    );

    // Clearing the budget lifts the limit.
    let (status, _) = admin(
        &tg,
        reqwest::Method::PUT,
        "/admin/teams/ml/budget",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(chat(&tg, &key, "gpt-4o").await.status(), 200);

    let (status, _) = admin(
        &tg,
        reqwest::Method::DELETE,
        &format!("/admin/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        chat(&tg, &key, "gpt-4o").await.status(),
        401,
        "revoked via API: refused at once"
    );
    let (status, _) = admin(&tg, reqwest::Method::DELETE, "/admin/keys/key_nope", None).await;
    assert_eq!(status, 404);

    let rows = tg.wait_rows(3).await;
    assert_eq!(
        rows.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![200, 429, 200]
    );
    assert_eq!(rows[1].cost_nano_usd, 0);
    let (_, usage) = admin(
        &tg,
        reqwest::Method::GET,
        "/admin/usage?by=team&since=1h",
        None,
    )
    .await;
    assert_eq!(usage["rows"][0]["group"], "ml");
    assert_eq!(usage["rows"][0]["requests"], 3);
    // 2 x (10 x $2.5/M + 5 x $10/M)
    assert_eq!(usage["total_cost_nano_usd"], 2 * 75_000);
    let m = tg.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_cost_usd_total", &[("team", "ml")]),
        Some(150_000e-9)
    );
    assert_eq!(
        metric(&m, "tollgate_budget_rejections_total", &[("team", "ml")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_overspend_the_budget() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, VIRTUAL).await;
    // Each request costs exactly 9 x $2.5/M + 5 x $10/M = 72,500 nano-USD on gpt-4o:
    // prompt 9 (what tiktoken counts for these messages), completion 5 (max_tokens).
    let per_request: i64 = 9 * 2_500 + 5 * 10_000;
    let budget_nano: i64 = 2_000_000; // room for 27 requests at actual cost
    stdout(&tg.cli(&[
        "teams",
        "create",
        "tight",
        "--budget-usd",
        "0.002",
        "--period",
        "total",
    ]));
    let key = tg.new_key("tight");
    wait_for_key(&tg, &key).await;
    let probes = mock.request_count();

    let body = json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hello world"}]});
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..240 {
        let (c, url, key, body) = (
            c.clone(),
            tg.url("/v1/chat/completions"),
            key.clone(),
            body.clone(),
        );
        // Every tenth request fails upstream: its reservation must be released too.
        let fail = if i % 10 == 0 { "500" } else { "none" };
        tasks.push(tokio::spawn(async move {
            c.post(url)
                .bearer_auth(key)
                .header("x-mock-status", fail)
                .header("x-mock-prompt-tokens", "9")
                .header("x-mock-delay-ms", "20")
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }));
    }
    let (mut admitted, mut failed, mut rejected) = (0, 0, 0);
    for t in tasks {
        match t.await.unwrap_or(0) {
            200 => admitted += 1,
            500 => failed += 1,
            429 => rejected += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted + failed + rejected, 240);
    assert!(
        admitted > 0 && rejected > 0,
        "admitted {admitted}, rejected {rejected}"
    );
    assert_eq!(
        mock.request_count() - probes,
        admitted + failed,
        "rejected requests reached the upstream"
    );

    let rows = tg.wait_rows(240 + probes).await;
    let spent: i64 = rows
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.cost_nano_usd)
        .sum();
    assert_eq!(spent, admitted as i64 * per_request);
    assert!(spent <= budget_nano, "spent {spent} > budget {budget_nano}");
    let m = tg.metrics().await;
    let remaining =
        metric(&m, "tollgate_budget_remaining_usd", &[("team", "tight")]).unwrap_or(-1.0);
    let spent_gauge = metric(&m, "tollgate_budget_spent_usd", &[("team", "tight")]).unwrap_or(-1.0);
    // Every reservation was released: remaining == limit - spent, exactly.
    assert_eq!(
        ((remaining + spent_gauge) * 1e9).round() as i64,
        budget_nano
    );
    assert_eq!((spent_gauge * 1e9).round() as i64, spent);
    assert_eq!(
        metric(&m, "tollgate_budget_rejections_total", &[("team", "tight")]),
        Some(rejected as f64)
    );
    println!(
        "fired 240, admitted {} ({admitted} ok, {failed} upstream 500), rejected {rejected}, spent {spent} of {budget_nano} nano-USD",
        admitted + failed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_survives_a_restart_and_output_caps_are_enforced() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, VIRTUAL).await;
    stdout(&tg.cli(&[
        "teams",
        "create",
        "brief",
        "--budget-usd",
        "1",
        "--period",
        "monthly",
        "--max-output-tokens",
        "50",
    ]));
    let key = tg.new_key("brief");
    let tg = tg.restart().await;
    wait_for_key(&tg, &key).await;
    let mut body = chat_body("gpt-4o-mini");
    body["max_tokens"] = json!(4000);
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-mock-prompt-tokens", "1000000")
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    // The cap was enforced on the way up.
    assert_eq!(mock.last().json()["max_tokens"], 50);
    let resp = chat(&tg, &key, "gpt-4o-mini").await;
    assert_eq!(resp.status(), 200);
    assert!(mock.last().json()["max_completion_tokens"] == 50);
    tg.wait_rows(3).await;
    // 1M x $0.15/M + 5 x $0.6/M, then 10 x $0.15/M + 5 x $0.6/M
    let spent = 150_003_000u64 + 4_500;
    let tg = tg.restart().await;
    let resp = chat(&tg, &key, "gpt-4o-mini").await;
    let remaining = resp
        .headers()
        .get("x-tollgate-budget-remaining-usd")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let expected = 1_000_000_000 - spent - 4_500;
    assert_eq!(remaining, Some(format!("0.{expected:09}")));

    // The report answers from the database and matches what was recorded.
    tg.wait_rows(4).await;
    let report: Value = serde_json::from_str(&stdout(&tg.cli(&[
        "report", "--by", "team", "--since", "1h", "--format", "json",
    ])))
    .unwrap_or_default();
    assert_eq!(report["rows"][0]["group"], "brief");
    assert_eq!(report["rows"][0]["requests"], 4);
    assert_eq!(report["total_cost_nano_usd"], spent + 4_500);
    let csv = stdout(&tg.cli(&["report", "--by", "model", "--format", "csv"]));
    let line = csv.lines().find(|l| l.starts_with("gpt-4o-mini,"));
    // Totals, then the cost by component (input, cached_input, cache_write,
    // cache_write_1h, output, audio in/out, image in/out, video in, cached
    // audio in, images, audio seconds, characters, tool calls, gpu).
    assert_eq!(
        line,
        Some(
            format!(
                "gpt-4o-mini,3,1000020,15,0,0.{:09},0.150003000,0.000000000,0.000000000,0.000000000,0.000009000,0.000000000,0.000000000,0.000000000,0.000000000,0.000000000,0.000000000,0.000000000,0.000000000,0.000000000,0.000000000,0.000000000",
                spent + 4_500
            )
            .as_str()
        )
    );
    let table = stdout(&tg.cli(&["report", "--by", "day"]));
    assert!(table.contains("total"), "{table}");

    // `teams set-budget` from the CLI reaches the running server within a second.
    let total_spent = spent + 4_500;
    let set: Value = serde_json::from_str(&stdout(&tg.cli(&[
        "teams",
        "set-budget",
        "brief",
        "--budget-usd",
        "2",
        "--period",
        "monthly",
        "--format",
        "json",
    ])))
    .unwrap_or_default();
    assert_eq!(set["budget_usd"], "2.000000000");
    assert_eq!(
        set["max_output_tokens"], 50,
        "the cap is kept when not given"
    );
    let listed: Value =
        serde_json::from_str(&stdout(&tg.cli(&["teams", "list", "--format", "json"])))
            .unwrap_or_default();
    assert_eq!(listed[0]["spent_usd"], format!("0.{total_spent:09}"));
    let changed_at = Instant::now();
    loop {
        let resp = chat(&tg, &key, "gpt-4o-mini").await;
        let remaining = resp
            .headers()
            .get("x-tollgate-budget-remaining-usd")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if remaining.as_deref().is_some_and(|r| r.starts_with("1.")) {
            break;
        }
        assert!(
            changed_at.elapsed() < Duration::from_millis(1500),
            "budget change not applied: {remaining:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The 200-way race again, with requests whose cost depends on what the
/// response says: a priority tier, high-detail images, built-in web
/// searches, a flex tier. Reservations must be a true upper bound of each,
/// so the budget holds and nothing is settled beyond its reservation. The
/// mock reports the prompt tokens tiktoken counts for the text (8 for a
/// chat "hi"), as the provider would; the image costs 1,500 more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_race_of_tiers_images_and_tool_calls_never_overspends() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, VIRTUAL).await;
    let budget_nano: i64 = 500_000_000;
    stdout(&tg.cli(&[
        "teams",
        "create",
        "mixed",
        "--budget-usd",
        "0.5",
        "--period",
        "total",
    ]));
    let key = tg.new_key("mixed");
    wait_for_key(&tg, &key).await;
    let probes = mock.request_count();
    let image = json!([{"type": "text", "text": "what is this"},
                       {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}}]);
    // (path, body, mock headers, cost of one when it is admitted)
    type Kind<'a> = (&'a str, Value, Vec<(&'a str, &'a str)>, i64);
    let kinds: Vec<Kind> = vec![
        (
            "/v1/chat/completions",
            json!({"model": "gpt-5", "service_tier": "priority", "max_completion_tokens": 5,
                   "messages": [{"role": "user", "content": "hi"}]}),
            vec![
                ("x-mock-service-tier", "priority"),
                ("x-mock-prompt-tokens", "8"),
            ],
            8 * 2_500 + 5 * 20_000,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": image}]}),
            vec![("x-mock-prompt-tokens", "1500")],
            1_500 * 2_500 + 5 * 10_000,
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-5", "input": "news?", "max_output_tokens": 5,
                   "tools": [{"type": "web_search"}], "max_tool_calls": 2}),
            vec![
                ("x-mock-prompt-tokens", "4"),
                ("x-mock-output-items", "web_search_call,web_search_call"),
            ],
            4 * 1_250 + 5 * 10_000 + 2 * 10_000_000,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "o3", "service_tier": "flex", "max_completion_tokens": 5,
                   "messages": [{"role": "user", "content": "hi"}]}),
            vec![
                ("x-mock-service-tier", "flex"),
                ("x-mock-prompt-tokens", "8"),
            ],
            8 * 1_000 + 5 * 4_000,
        ),
    ];
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (path, body, headers, _) = &kinds[i % kinds.len()];
        let mut req = c
            .post(tg.url(path))
            .bearer_auth(&key)
            .header("x-mock-completion-tokens", "5")
            .header("x-mock-delay-ms", "20")
            .json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        tasks.push(tokio::spawn(async move {
            (
                i % 4,
                req.send().await.map(|r| r.status().as_u16()).unwrap_or(0),
            )
        }));
    }
    let (mut admitted, mut rejected) = ([0i64; 4], 0);
    for t in tasks {
        match t.await.unwrap_or((0, 0)) {
            (k, 200) => admitted[k] += 1,
            (_, 429) => rejected += 1,
            (_, other) => panic!("unexpected status {other}"),
        }
    }
    assert!(
        rejected > 0 && admitted.iter().all(|&n| n > 0),
        "admitted {admitted:?}, rejected {rejected}"
    );
    let fired: i64 = admitted.iter().sum();
    assert_eq!(
        (mock.request_count() - probes) as i64,
        fired,
        "refused requests reached the upstream"
    );
    let rows = tg.wait_rows(200 + probes).await;
    let spent: i64 = rows
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.cost_nano_usd)
        .sum();
    let expected: i64 = kinds.iter().zip(admitted).map(|(k, n)| k.3 * n).sum();
    assert_eq!(spent, expected, "every admitted request priced exactly");
    assert!(spent <= budget_nano, "spent {spent} > budget {budget_nano}");
    let m = tg.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_budget_overrun_usd_total",
            &[("team", "mixed")]
        )
        .unwrap_or(0.0),
        0.0,
        "a reservation fell short"
    );
    println!("mixed race: admitted {admitted:?}, rejected {rejected}, spent {spent} of {budget_nano} nano-USD");
}
