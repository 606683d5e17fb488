//! Postgres: the same store behind `postgres://`, and budgets shared by
//! several replicas on one database. Each test makes its own database from
//! TOLLGATE_TEST_POSTGRES_URL (set by .ci/run); without it they skip.

mod support;

use serde_json::{json, Value};
use sqlx::Row;
use support::{
    chat_body, client, config_with_database, post_chat, stdout, wait_for_key, MockUpstream, PgDb,
    Tollgate,
};

const VIRTUAL: &str = "[auth]\nmode = \"virtual-keys\"\n";

async fn start(mock: &MockUpstream, db: &PgDb) -> Tollgate {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Every request's words counted (`numbers`' tokens per word).
    let config = format!(
        "{}\n{VIRTUAL}\n[numbers]\nword_sample_rate = 1.0\n",
        config_with_database(mock, dir.path(), &db.url).replace(support::PASSTHROUGH_AUTH, "")
    );
    Tollgate::start_with_config(dir, &config).await
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_records_usage_reports_and_keeps_spend_across_restarts() {
    let Some(db) = PgDb::create("store").await else {
        return;
    };
    let mock = MockUpstream::start().await;
    let tg = start(&mock, &db).await;
    // Migrations are applied at start; running them again changes nothing.
    stdout(&tg.cli(&["migrate"]));
    stdout(&tg.cli(&[
        "teams",
        "create",
        "pg",
        "--budget-usd",
        "1",
        "--period",
        "monthly",
    ]));
    let key = first_line(&stdout(&tg.cli(&["keys", "create", "--team", "pg"])));
    wait_for_key(&tg, &key).await;

    let resp = post_chat(
        &tg,
        &key,
        &chat_body("gpt-4o"),
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-completion-tokens", "500"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    // gpt-4o: 1000 x $2.50/M + 500 x $10/M = $0.0075
    assert_eq!(
        resp.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.007500000")
    );
    let mut body = chat_body("gpt-4o-mini");
    body["stream"] = json!(true);
    let streamed = post_chat(&tg, &key, &body, &[])
        .await
        .text()
        .await
        .unwrap_or_default();
    assert!(streamed.contains("[DONE]"));
    let failed = post_chat(&tg, &key, &chat_body("gpt-4o"), &[("x-mock-status", "500")]).await;
    assert_eq!(failed.status(), 500);

    let tg = tg.restart().await; // SIGTERM flushes every row
    let pool = db.pool().await;
    let rows = sqlx::query(
        "SELECT model, endpoint, stream, status, prompt_tokens, completion_tokens, cost_nano_usd, \
         token_source, key_id, created_at FROM usage WHERE endpoint = 'chat.completions' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.len(), 3);
    let get_i = |r: &sqlx::postgres::PgRow, c: &str| r.try_get::<i64, _>(c).unwrap_or(-1);
    assert_eq!(
        (
            get_i(&rows[0], "prompt_tokens"),
            get_i(&rows[0], "completion_tokens")
        ),
        (1000, 500)
    );
    assert_eq!(get_i(&rows[0], "cost_nano_usd"), 7_500_000);
    assert_eq!(rows[1].try_get::<bool, _>("stream").ok(), Some(true));
    // The mock's stream usage: 10 prompt + 5 completion on gpt-4o-mini.
    assert_eq!(get_i(&rows[1], "cost_nano_usd"), 10 * 150 + 5 * 600);
    assert_eq!(rows[2].try_get::<i32, _>("status").ok(), Some(500));
    assert_eq!(get_i(&rows[2], "cost_nano_usd"), 0);
    assert!(rows.iter().all(|r| r
        .try_get::<Option<String>, _>("key_id")
        .ok()
        .flatten()
        .is_some()));
    let total: i64 = 7_500_000 + 10 * 150 + 5 * 600;

    // Reports read Postgres like SQLite.
    let report: Value = serde_json::from_str(&stdout(&tg.cli(&[
        "report", "--by", "team", "--since", "24h", "--format", "json",
    ])))
    .unwrap_or_else(|e| panic!("{e}"));
    let pg_row = report["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["group"] == "pg"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(pg_row["cost_nano_usd"], json!(total));
    let by_day = stdout(&tg.cli(&["report", "--by", "day", "--since", "24h"]));
    assert!(by_day.contains(&chrono::Utc::now().format("%Y-%m-%d").to_string()));

    // The restarted replica reads the team's recorded spend from the shared
    // budget state: $1 - $0.0075 - $0.0000045 remains.
    let resp = post_chat(
        &tg,
        &key,
        &chat_body("gpt-4o"),
        &[
            ("x-mock-prompt-tokens", "0"),
            ("x-mock-completion-tokens", "0"),
        ],
    )
    .await;
    assert_eq!(
        resp.headers()
            .get("x-tollgate-budget-remaining-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.992495500")
    );
    let spent: i64 = sqlx::query_scalar("SELECT spent FROM budget_state WHERE team = 'pg'")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(spent, total);
    pool.close().await;
    drop(tg);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_postgres_never_overspend_one_budget() {
    let Some(db) = PgDb::create("replicas").await else {
        return;
    };
    let mock = MockUpstream::start().await;
    let mut a = start(&mock, &db).await;
    let mut b = start(&mock, &db).await;
    // gpt-4o, 9 prompt + 5 completion tokens: 72,500 nano-USD per request.
    let per_request: i64 = 9 * 2_500 + 5 * 10_000;
    let budget_nano: i64 = 2_000_000;
    stdout(&a.cli(&[
        "teams",
        "create",
        "shared",
        "--budget-usd",
        "0.002",
        "--period",
        "total",
    ]));
    let key = first_line(&stdout(&a.cli(&["keys", "create", "--team", "shared"])));
    wait_for_key(&a, &key).await;
    wait_for_key(&b, &key).await;
    let probes = mock.request_count();

    let body = json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hello world"}]});
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..240 {
        // Alternate replicas; every tenth request fails upstream.
        let url = if i % 2 == 0 { a.url("") } else { b.url("") };
        let (c, key, body) = (c.clone(), key.clone(), body.clone());
        let fail = if i % 10 == 0 { "500" } else { "none" };
        tasks.push(tokio::spawn(async move {
            let status = c
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key)
                .header("x-mock-status", fail)
                .header("x-mock-prompt-tokens", "9")
                .header("x-mock-delay-ms", "20")
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            (i % 2, status)
        }));
    }
    let (mut admitted, mut failed, mut rejected) = (0, 0, 0);
    let mut ok_by_replica = [0; 2];
    for t in tasks {
        let (replica, status) = t.await.unwrap_or((0, 0));
        match status {
            200 => {
                admitted += 1;
                ok_by_replica[replica] += 1;
            }
            500 => failed += 1,
            429 => rejected += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted + failed + rejected, 240);
    assert!(
        ok_by_replica[0] > 0 && ok_by_replica[1] > 0 && rejected > 0,
        "ok per replica {ok_by_replica:?}, rejected {rejected}"
    );
    assert_eq!(
        mock.request_count() - probes,
        admitted + failed,
        "rejected requests reached the upstream"
    );

    // Both replicas stop gracefully: every row written, every lease returned.
    assert_eq!(a.terminate(), Some(0));
    assert_eq!(b.terminate(), Some(0));
    let pool = db.pool().await;
    let row = sqlx::query(
        "SELECT COUNT(*) AS n, COALESCE(SUM(cost_nano_usd), 0)::BIGINT AS spent FROM usage \
         WHERE team = 'shared' AND endpoint = 'chat.completions'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (n, spent): (i64, i64) = (
        row.try_get("n").unwrap_or(-1),
        row.try_get("spent").unwrap_or(-1),
    );
    assert_eq!(n, 240, "one row per request, rejections included");
    assert_eq!(spent, admitted as i64 * per_request);
    assert!(spent <= budget_nano, "spent {spent} > budget {budget_nano}");
    let state: i64 = sqlx::query_scalar("SELECT spent FROM budget_state WHERE team = 'shared'")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(state, spent, "the shared spend counter matches the rows");
    let leases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM budget_leases")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(leases, 0, "stopped replicas hold no budget");
    println!(
        "two replicas: fired 240, admitted {} ({admitted} ok: {} on A, {} on B; {failed} upstream 500), rejected {rejected}, spent {spent} of {budget_nano} nano-USD",
        admitted + failed,
        ok_by_replica[0],
        ok_by_replica[1],
    );
    pool.close().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_dead_replica_are_reclaimed_and_live_ones_respected() {
    let Some(db) = PgDb::create("leases").await else {
        return;
    };
    let mock = MockUpstream::start().await;
    let tg = start(&mock, &db).await;
    let mut keys = Vec::new();
    for team in ["orphaned", "held"] {
        stdout(&tg.cli(&[
            "teams",
            "create",
            team,
            "--budget-usd",
            "0.001",
            "--period",
            "total",
        ]));
        keys.push(first_line(&stdout(
            &tg.cli(&["keys", "create", "--team", team]),
        )));
    }
    // Another replica holds each whole budget: one died an hour ago, the
    // other heartbeats right now.
    let pool = db.pool().await;
    for (team, node, age) in [("orphaned", "dead-1", "1 hour"), ("held", "live-1", "0 s")] {
        sqlx::query("INSERT INTO budget_state (team, period, spent) VALUES ($1, 'total', 0)")
            .bind(team)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        sqlx::query(&format!(
            "INSERT INTO budget_leases (team, period, node, leased, heartbeat_at) \
             VALUES ($1, 'total', $2, 1000000, now() - interval '{age}')"
        ))
        .bind(team)
        .bind(node)
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    wait_for_key(&tg, &keys[0]).await;
    wait_for_key(&tg, &keys[1]).await;
    // One refresh (500 ms) reclaims the dead replica's lease.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let dead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM budget_leases WHERE node = 'dead-1'")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dead, 0, "the dead replica's lease was not reclaimed");
    let mut statuses = Vec::new();
    for key in &keys {
        let resp = post_chat(&tg, key, &json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}), &[]).await;
        statuses.push(resp.status().as_u16());
    }
    // The orphaned budget is usable again; the one a live replica holds is not.
    assert_eq!(statuses, vec![200, 429]);
    let live: i64 = sqlx::query_scalar("SELECT leased FROM budget_leases WHERE node = 'live-1'")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(live, 1_000_000);
    pool.close().await;
    drop(tg);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_shared_budget_fails_closed_with_503() {
    let Some(db) = PgDb::create("unavailable").await else {
        return;
    };
    let mock = MockUpstream::start().await;
    let tg = start(&mock, &db).await;
    stdout(&tg.cli(&[
        "teams",
        "create",
        "budgeted",
        "--budget-usd",
        "1",
        "--period",
        "daily",
    ]));
    stdout(&tg.cli(&["teams", "create", "free"]));
    let budgeted = first_line(&stdout(&tg.cli(&["keys", "create", "--team", "budgeted"])));
    let free = first_line(&stdout(&tg.cli(&["keys", "create", "--team", "free"])));
    wait_for_key(&tg, &budgeted).await;
    wait_for_key(&tg, &free).await;
    let probes = mock.request_count();
    // The shared budget tables become unusable (as in a broken database).
    let pool = db.pool().await;
    sqlx::query("DROP TABLE budget_leases")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    let resp = post_chat(&tg, &budgeted, &body, &[]).await;
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap_or_default();
    assert_eq!(v["error"]["code"], "budget_unavailable");
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(mock.request_count(), probes, "no spend without the budget");
    // A team without a budget does not need the shared state.
    let resp = post_chat(&tg, &free, &body, &[]).await;
    assert_eq!(resp.status(), 200);
    drop(tg);
    pool.close().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stores_every_billed_dimension_and_reports_it() {
    let Some(db) = PgDb::create("dimensions").await else {
        return;
    };
    let mock = MockUpstream::start().await;
    let tg = start(&mock, &db).await;
    stdout(&tg.cli(&["teams", "create", "t"]));
    let key = first_line(&stdout(&tg.cli(&["keys", "create", "--team", "t"])));
    wait_for_key(&tg, &key).await;
    let body = json!({"model": "o3", "messages": [{"role": "user", "content": "hi"}]});
    let resp = post_chat(
        &tg,
        &key,
        &body,
        &[
            ("x-mock-prompt-tokens", "10000"),
            ("x-mock-completion-tokens", "2000"),
            ("x-mock-service-tier", "flex"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let usage = r#"{"prompt_tokens":1000,"completion_tokens":500,"prompt_tokens_details":{"audio_tokens":800},"completion_tokens_details":{"audio_tokens":400,"reasoning_tokens":7}}"#;
    let body =
        json!({"model": "gpt-4o-audio-preview", "messages": [{"role": "user", "content": "hi"}]});
    let resp = post_chat(&tg, &key, &body, &[("x-mock-usage-raw", usage)]).await;
    assert_eq!(resp.status(), 200);
    let pool = db.pool().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let rows = loop {
        let rows = sqlx::query(
            "SELECT model, service_tier, audio_prompt_tokens, audio_completion_tokens, reasoning_tokens, \
             provider, cost_nano_usd, cost_breakdown::text AS breakdown FROM usage \
             WHERE endpoint = 'chat.completions' ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        if rows.len() >= 2 || std::time::Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(rows.len(), 2);
    let get_s = |i: usize, c: &str| rows[i].try_get::<Option<String>, _>(c).ok().flatten();
    let get_i = |i: usize, c: &str| rows[i].try_get::<i64, _>(c).unwrap_or(-1);
    assert_eq!(get_s(0, "service_tier").as_deref(), Some("flex"));
    assert_eq!(get_i(0, "cost_nano_usd"), 18_000_000);
    let breakdown: Value =
        serde_json::from_str(&get_s(0, "breakdown").unwrap_or_default()).unwrap_or(Value::Null);
    assert_eq!(breakdown, json!({"input": 10_000_000, "output": 8_000_000}));
    assert_eq!(get_s(1, "service_tier"), None);
    assert_eq!(
        (
            get_i(1, "audio_prompt_tokens"),
            get_i(1, "audio_completion_tokens"),
            get_i(1, "reasoning_tokens")
        ),
        (800, 400, 7)
    );
    assert_eq!(get_i(1, "cost_nano_usd"), 65_500_000);
    assert_eq!(get_s(1, "provider").as_deref(), Some("openai"));
    let report: Value = serde_json::from_str(&stdout(&tg.cli(&[
        "report",
        "--by",
        "component",
        "--since",
        "1h",
        "--format",
        "json",
    ])))
    .unwrap_or(Value::Null);
    let audio_out = report["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["group"] == "audio_output")
        .map(|r| r["cost_nano_usd"].clone());
    assert_eq!(audio_out, Some(json!(32_000_000)));
    assert_eq!(
        report["total_cost_nano_usd"],
        json!(18_000_000 + 65_500_000)
    );
    // `report --shadow` reads the counts and the served tier back from
    // Postgres: the o3 row priced again as o3 at flex is what it cost.
    let shadow: Value = serde_json::from_str(&stdout(&tg.cli(&[
        "report", "--shadow", "o3", "--since", "1h", "--format", "json",
    ])))
    .unwrap_or(Value::Null);
    let o3 = shadow["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["model"] == "o3")
        .map(|r| {
            (
                r["requests"].clone(),
                r["cost_nano_usd"].clone(),
                r["shadow_cost_nano_usd"].clone(),
            )
        });
    assert_eq!(
        o3,
        Some((json!(1), json!(18_000_000), json!(18_000_000))),
        "{shadow}"
    );
    // Word counts go to Postgres too: the o3 request's "hi" (10,000
    // tokens as the mock reports them) and "Hello from the mock"; the
    // audio request's sides are not all text and are left out.
    let words = support::wait_word_counts(&tg, 1).await;
    assert_eq!(
        words,
        json!([{"family": "openai-o200k", "script": "latin", "per": "word",
                "prompt": {"samples": 1, "words": 1, "chars": 2, "tokens": 10000, "tokens_per_unit": 10000.0},
                "completion": {"samples": 1, "words": 4, "chars": 16, "tokens": 2000, "tokens_per_unit": 500.0}}])
    );
    drop(tg);
    pool.close().await;
    db.drop_db().await;
}

/// One usage row as the writer would store it.
fn stored_row(
    request_id: &str,
    team: &str,
    model: &str,
    days_ago: i64,
    tier: Option<&'static str>,
) -> tollgate::store::UsageRecord {
    use tollgate::pricing::{Breakdown, Line, Meter};
    use tollgate::usage::{ToolCalls, Usage};
    let usage = Usage {
        prompt_tokens: 1_200,
        completion_tokens: 300,
        cached_tokens: Some(200),
        cache_write_tokens: Some(50),
        cache_write_1h_tokens: Some(25),
        tool_calls: ToolCalls {
            web_search: 1,
            file_search: 2,
        },
        ..Usage::NONE
    };
    let mut breakdown = Breakdown::default();
    breakdown.0[Line::Meter(Meter::Input).index()] = 1_000 + days_ago as u64;
    breakdown.0[Line::Meter(Meter::Output).index()] = 3_000;
    breakdown.0[Line::Meter(Meter::CacheWrite).index()] = 77;
    tollgate::store::UsageRecord {
        key_id: Some(format!("key_{team}")),
        upstream: "openai".into(),
        endpoint: "chat_completions",
        stream: days_ago == 0,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cached_tokens: usage.cached(),
        cost_nano_usd: breakdown.0.iter().sum(),
        latency_ms: 42,
        service_tier: tier,
        cache_write_tokens: 75,
        tool_calls: 3,
        cost_breakdown: breakdown,
        meters: tollgate::usage::meter::Meters::of(&usage),
        ..tollgate::store::UsageRecord::plain(
            request_id,
            team,
            model,
            chrono::Utc::now() - chrono::Duration::days(days_ago),
        )
    }
}

fn ok<T>(result: Result<T, tollgate::store::StoreError>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// Everything the store answers, from one database, with the times the
/// database chose itself (team creation, key revocation) left out.
async fn every_answer(store: &tollgate::store::Store) -> String {
    use tollgate::store::{KeyRow, ReportBy, WordCount};
    let epoch = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    let rows = vec![
        stored_row("r1", "alpha", "gpt-4o", 0, None),
        stored_row("r2", "alpha", "gpt-4o-mini", 1, Some("flex")),
        stored_row("r3", "beta", "gpt-4o", 2, Some("priority")),
    ];
    ok(store.insert_usage(&rows).await);
    // A replay lands nothing twice.
    ok(store.insert_usage(&rows[..1]).await);
    let budget = tollgate::budget::Budget {
        limit: tollgate::pricing::NanoUsd(5_000_000),
        period: tollgate::budget::Period::Monthly,
    };
    ok(store.create_team("alpha", Some(budget), Some(512)).await);
    ok(store.create_team("beta", None, None).await);
    let conflict = store.create_team("beta", None, None).await;
    ok(store.set_budget("beta", Some(budget), Some(None)).await);
    let key = KeyRow {
        id: "key_1".into(),
        team: "alpha".into(),
        name: Some("ci".into()),
        hash: "h".repeat(64),
        prefix: "tg-abcd".into(),
        models: vec!["gpt-4o".into(), "gpt-4o-mini".into()],
        created_at: "2026-01-02T03:04:05.678Z".into(),
        revoked_at: None,
    };
    ok(store.insert_key(&key).await);
    ok(store
        .insert_key(&KeyRow {
            id: "key_2".into(),
            hash: "g".repeat(64),
            ..key
        })
        .await);
    ok(store.revoke_key("key_2").await);
    let missing = store.revoke_key("key_none").await;
    let words = WordCount {
        team: "alpha".into(),
        family: "gpt".into(),
        script: "latin".into(),
        side: "prompt".into(),
        samples: 2,
        words: 100,
        chars: 550,
        tokens: 130,
    };
    ok(store.insert_word_counts(&[words.clone(), words]).await);

    let mut out = String::new();
    let teams = ok(store.teams().await);
    for t in &teams {
        out += &format!("team {} {:?} {:?}\n", t.name, t.budget, t.max_output_tokens);
    }
    out += &format!(
        "conflict {:?} missing {:?}\n",
        conflict.is_err(),
        missing.is_err()
    );
    for k in ok(store.keys().await) {
        out += &format!(
            "key {} {} {:?} {:?} {} revoked {}\n",
            k.id,
            k.team,
            k.name,
            k.models,
            k.created_at,
            k.revoked_at.is_some()
        );
    }
    let recent = chrono::Utc::now() - chrono::Duration::hours(36);
    for team in ["alpha", "beta"] {
        let all = ok(store.spend_since(team, epoch).await);
        let lately = ok(store.spend_since(team, recent).await);
        out += &format!("spend {team} {all} {lately}\n");
    }
    for by in [
        ReportBy::Team,
        ReportBy::Model,
        ReportBy::Key,
        ReportBy::Day,
        ReportBy::Component,
        ReportBy::Provider,
        ReportBy::Tier,
    ] {
        for row in ok(store.report(by, epoch).await) {
            out += &format!("report {by:?} {row:?}\n");
        }
    }
    for row in ok(store.counts_since(recent).await) {
        out += &format!("counts {row:?}\n").replace(&row.started_ms.to_string(), "T");
    }
    for team in [None, Some("alpha"), Some("beta")] {
        for w in ok(store.word_counts_since(epoch, team).await) {
            out += &format!("words {team:?} {w:?}\n");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_answers_alike_on_sqlite_and_postgres() {
    let Some(db) = PgDb::create("alike").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sqlite_url = format!("sqlite://{}", dir.path().join("alike.db").display());
    let open = |url: String| async move {
        tollgate::store::Store::open(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"))
    };
    let sqlite = open(sqlite_url).await;
    let postgres = open(db.url.clone()).await;
    let (on_sqlite, on_postgres) = (every_answer(&sqlite).await, every_answer(&postgres).await);
    sqlite.close().await;
    postgres.close().await;
    db.drop_db().await;
    // Not vacuous: every kind of answer is there.
    for kind in [
        "team ",
        "key ",
        "spend ",
        "report Component",
        "report Day",
        "counts ",
        "words ",
    ] {
        assert!(
            on_sqlite.contains(kind),
            "{kind} missing from:\n{on_sqlite}"
        );
    }
    assert!(
        on_sqlite.contains("conflict true missing true"),
        "{on_sqlite}"
    );
    assert_eq!(on_sqlite, on_postgres);
}

/// A background response created on one replica and polled on both at
/// once is billed exactly once (issue 22: the claim is one `DELETE ...
/// RETURNING`), whichever replica wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_response_polled_on_two_replicas_is_billed_once() {
    let Some(db) = PgDb::create("background").await else {
        return;
    };
    let mock = MockUpstream::start().await;
    let a = start(&mock, &db).await;
    let b = start(&mock, &db).await;
    stdout(&a.cli(&["teams", "create", "research"]));
    let key = first_line(&stdout(&a.cli(&["keys", "create", "--team", "research"])));
    wait_for_key(&a, &key).await;
    wait_for_key(&b, &key).await;
    let r = client()
        .post(a.url("/v1/responses"))
        .bearer_auth(&key)
        .header("x-mock-polls-pending", "0")
        .header("x-mock-prompt-tokens", "1000")
        .header("x-mock-completion-tokens", "2000")
        .json(&json!({"model": "gpt-4o-mini", "input": "report", "background": true}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let created = support::request_id(&r);
    let id = r.json::<serde_json::Value>().await.unwrap_or_default()["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut polls = Vec::new();
    for i in 0..16 {
        let url = if i % 2 == 0 { a.url("") } else { b.url("") };
        let (key, id) = (key.clone(), id.clone());
        polls.push(tokio::spawn(async move {
            client()
                .get(format!("{url}/v1/responses/{id}"))
                .bearer_auth(key)
                .send()
                .await
                .ok()
                .and_then(|r| r.headers().get("x-tollgate-cost-usd").map(|_| ()))
                .is_some()
        }));
    }
    let mut billed_by = 0;
    for p in polls {
        if p.await.unwrap_or(false) {
            billed_by += 1;
        }
    }
    assert_eq!(billed_by, 1, "one poll bills it");
    let pool = db.pool().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT request_id, cost_nano_usd FROM usage WHERE endpoint = 'responses'",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        if !rows.is_empty() {
            assert_eq!(rows, vec![(created.clone(), 1_000 * 150 + 2_000 * 600)]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never billed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pending_usage")
        .fetch_one(&pool)
        .await
        .unwrap_or(-1);
    assert_eq!(pending, 0);
    pool.close().await;
    drop((a, b));
    db.drop_db().await;
}

/// Issue 23: three replicas writing the same rollup rows at once (same
/// teams, models, hour) leave `usage_daily` equal to the rows, to the
/// nano-USD, and every report read from it equal to the rows' own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_the_rollups_equal_to_the_rows() {
    let Some(db) = PgDb::create("rollup_replicas").await else {
        return;
    };
    let mock = MockUpstream::start().await;
    let mut replicas = vec![
        start(&mock, &db).await,
        start(&mock, &db).await,
        start(&mock, &db).await,
    ];
    let keys: Vec<String> = ["north", "south"]
        .iter()
        .map(|team| {
            stdout(&replicas[0].cli(&["teams", "create", team]));
            first_line(&stdout(
                &replicas[0].cli(&["keys", "create", "--team", team]),
            ))
        })
        .collect();
    for tg in &replicas {
        for key in &keys {
            wait_for_key(tg, key).await;
        }
    }
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..300usize {
        let url = replicas[i % 3].url("/v1/chat/completions");
        let key = keys[i % 2].clone();
        let model = ["gpt-4o", "gpt-4o-mini", "o3-mini"][i % 3 / 2 + i % 2];
        let mut body = chat_body(model);
        body["stream"] = json!(i % 4 == 0);
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.post(url)
                .bearer_auth(key)
                .header("x-mock-prompt-tokens", (100 + i).to_string())
                .header("x-mock-status", if i % 10 == 0 { "500" } else { "none" })
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }));
    }
    for t in tasks {
        assert!(matches!(t.await.unwrap_or(0), 200 | 500));
    }
    for tg in &mut replicas {
        assert_eq!(tg.terminate(), Some(0));
    }
    let store = tollgate::store::Store::open(&db.url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let epoch = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    let total = support::assert_rollups_match_rows(&store, &[epoch]).await;
    let pool = db.pool().await;
    let (n, raw): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(cost_nano_usd), 0)::BIGINT FROM usage \
         WHERE endpoint = 'chat.completions'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let rolled: (i64, i64) = sqlx::query_as(
        "SELECT SUM(requests)::BIGINT, SUM(cost_nano_usd)::BIGINT FROM usage_daily \
         WHERE endpoint = 'chat.completions'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, 300, "one row per request");
    assert!(raw > 0);
    assert_eq!(rolled, (n, raw), "usage_daily sums the rows");
    assert!(total >= raw);
    println!("three replicas: {n} rows, {raw} nano-USD, rollups equal");
    pool.close().await;
    store.close().await;
    db.drop_db().await;
}
