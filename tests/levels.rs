//! Issue 24, budgets at every level (SPEC 14): a key's, an end user's and a
//! tag's budget, each alone and all together with the team's, enforced with
//! zero overshoot under a 200-way race; the 429 names the level that refused
//! (`error.param`); the CLI and the admin API set, list and clear them;
//! `report --by end_user|tag`; the per-level gauges.

mod support;

use serde_json::{json, Value};
use support::{client, metric, stdout, wait_for_key, MockUpstream, Tollgate};

const VIRTUAL: &str = "[auth]\nmode = \"virtual-keys\"\n";
/// gpt-4o, 9 prompt + 5 completion tokens: the reservation and the cost.
const PER_REQUEST: i64 = 9 * 2_500 + 5 * 10_000;

/// A key of `team` made with the CLI: (id, secret).
fn create_key(tg: &Tollgate, team: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["keys", "create", "--team", team, "--format", "json"];
    args.extend_from_slice(extra);
    let out: Value = serde_json::from_str(&stdout(&tg.cli(&args))).unwrap_or_default();
    let text = |k: &str| out[k].as_str().unwrap_or_default().to_string();
    (text("id"), text("key"))
}

/// What one race got: admitted, and the `error.param` of every 429.
#[derive(Debug, Default)]
struct Race {
    admitted: usize,
    refused_by: Vec<String>,
}

/// `n` chat requests with `key` at most `width` at a time, each with
/// `headers` and, when given, the body's `user`.
async fn race(
    urls: &[String],
    key: &str,
    user: Option<&str>,
    headers: &[(&str, &str)],
    n: usize,
    width: usize,
) -> Race {
    use futures_util::StreamExt;
    let mut body = json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hello world"}]});
    if let Some(u) = user {
        body["user"] = u.into();
    }
    let c = client();
    let results: Vec<(u16, Value)> = futures_util::stream::iter(0..n)
        .map(|i| {
            let mut req = c
                .post(format!("{}/v1/chat/completions", urls[i % urls.len()]))
                .bearer_auth(key)
                .header("x-mock-prompt-tokens", "9")
                .header("x-mock-delay-ms", "20")
                .json(&body);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            async move {
                let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
                let status = resp.status().as_u16();
                (status, resp.json().await.unwrap_or_default())
            }
        })
        .buffer_unordered(width)
        .collect()
        .await;
    let mut out = Race::default();
    for (status, body) in results {
        match status {
            200 => out.admitted += 1,
            429 => {
                assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
                out.refused_by
                    .push(body["error"]["param"].as_str().unwrap_or("?").to_string());
            }
            other => panic!("status {other}: {body}"),
        }
    }
    out
}

/// Waits until the server shows a budget at `level` named `name`.
async fn wait_for_budget(tg: &Tollgate, level: &str, name: &str) {
    tg.wait_metrics(|m| {
        match metric(
            m,
            "tollgate_level_budget_limit_usd",
            &[("level", level), ("name", name)],
        ) {
            Some(_) => Ok(()),
            None => Err(format!("no {level} budget {name} yet")),
        }
    })
    .await;
}

fn report(tg: &Tollgate, by: &str) -> Vec<(String, i64, i64)> {
    let out: Value = serde_json::from_str(&stdout(
        &tg.cli(&["report", "--by", by, "--since", "1d", "--format", "json"]),
    ))
    .unwrap_or_default();
    out["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    (
                        r["group"].as_str().unwrap_or_default().to_string(),
                        r["requests"].as_i64().unwrap_or(-1),
                        r["cost_nano_usd"].as_i64().unwrap_or(-1),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_level_alone_stops_a_200_way_race_at_its_limit() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, VIRTUAL).await;
    let urls = [tg.url("")];
    // The team has no budget: each race meets one level's only.
    stdout(&tg.cli(&["teams", "create", "free"]));
    let (key_id, key) = create_key(&tg, "free", &["--budget-usd", "0.002", "--period", "daily"]);
    let (_, plain) = create_key(&tg, "free", &[]);
    stdout(&tg.cli(&[
        "end-users",
        "set-budget",
        "--team",
        "free",
        "alice",
        "--budget-usd",
        "0.002",
    ]));
    stdout(&tg.cli(&["tags", "set-budget", "prod", "--budget-usd", "0.002"]));
    wait_for_key(&tg, &key).await;
    wait_for_key(&tg, &plain).await;
    wait_for_budget(&tg, "key", &key_id).await;
    wait_for_budget(&tg, "end_user", "free:alice").await;
    wait_for_budget(&tg, "tag", "prod").await;
    let probes = mock.request_count();
    // $0.002 at 72,500 nano-USD a request: 27 fit. Fewer may be admitted
    // in a race (a request first holds its body's byte bound), never more.
    let fit = (2_000_000 / PER_REQUEST) as usize;
    let by_key = race(&urls, &key, None, &[], 200, 200).await;
    // The end user named by the body's `user` and by the header alike.
    let by_user = race(&urls, &plain, Some("alice"), &[], 100, 100).await;
    let by_header = race(
        &urls,
        &plain,
        None,
        &[("x-tollgate-end-user", "alice")],
        100,
        100,
    )
    .await;
    let by_tag = race(
        &urls,
        &plain,
        None,
        &[("x-tollgate-tags", "eu, prod")],
        200,
        200,
    )
    .await;
    for (level, got) in [("key", &by_key), ("end_user", &by_user), ("tag", &by_tag)] {
        println!(
            "{level}: admitted {}, refused {}",
            got.admitted,
            got.refused_by.len()
        );
        assert!(
            got.refused_by.iter().all(|p| p == level),
            "{level}: {got:?}"
        );
    }
    let user_admitted = by_user.admitted + by_header.admitted;
    for n in [by_key.admitted, user_admitted, by_tag.admitted] {
        assert!(n >= 1 && n <= fit, "admitted {n} of {fit}");
    }
    assert!(by_header.refused_by.iter().all(|p| p == "end_user"));
    let admitted = by_key.admitted + user_admitted + by_tag.admitted;
    assert_eq!(
        mock.request_count() - probes,
        admitted,
        "refused requests went up"
    );
    let rows = tg
        .wait_rows_where(600, |r| r.endpoint == "chat.completions")
        .await;
    let spent: i64 = rows.iter().map(|r| r.cost_nano_usd).sum();
    assert_eq!(spent, admitted as i64 * PER_REQUEST);

    // The reports by end user and by tag equal the rows.
    let users = report(&tg, "end_user");
    assert!(
        users.contains(&("free:alice".into(), 200, user_admitted as i64 * PER_REQUEST)),
        "{users:?}"
    );
    let tags = report(&tg, "tag");
    for tag in ["eu", "prod"] {
        assert!(
            tags.contains(&(tag.into(), 200, by_tag.admitted as i64 * PER_REQUEST)),
            "{tags:?}"
        );
    }
    // The gauges: each budget spent to the nano-USD, refusals by level.
    let m = tg.metrics().await;
    for (level, name, n) in [
        ("key", key_id.as_str(), by_key.admitted),
        ("end_user", "free:alice", user_admitted),
        ("tag", "prod", by_tag.admitted),
    ] {
        let labels = [("level", level), ("name", name)];
        let spent = metric(&m, "tollgate_level_budget_spent_usd", &labels);
        assert_eq!(
            spent.map(|s| (s * 1e9).round() as i64),
            Some(n as i64 * PER_REQUEST),
            "{level}"
        );
        let refused = metric(
            &m,
            "tollgate_budget_level_rejections_total",
            &[("level", level)],
        );
        assert!(refused.unwrap_or(0.0) > 0.0, "{level}");
    }
    assert_eq!(
        metric(&m, "tollgate_level_budgets", &[("level", "tag")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_must_fit_every_budget_that_applies() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, VIRTUAL).await;
    let urls = [tg.url("")];
    // Team $0.01 (137 requests), key $0.005 (68), end user $0.003 (41),
    // tag $0.0015 (20).
    stdout(&tg.cli(&[
        "teams",
        "create",
        "all",
        "--budget-usd",
        "0.01",
        "--period",
        "total",
    ]));
    let (key_id, key) = create_key(&tg, "all", &["--budget-usd", "0.005", "--period", "total"]);
    let (_, other_key) = create_key(&tg, "all", &[]);
    stdout(&tg.cli(&[
        "end-users",
        "set-budget",
        "--team",
        "all",
        "bob",
        "--budget-usd",
        "0.003",
        "--period",
        "total",
    ]));
    stdout(&tg.cli(&[
        "tags",
        "set-budget",
        "batch",
        "--budget-usd",
        "0.0015",
        "--period",
        "total",
    ]));
    wait_for_key(&tg, &key).await;
    wait_for_key(&tg, &other_key).await;
    wait_for_budget(&tg, "tag", "batch").await;
    wait_for_budget(&tg, "end_user", "all:bob").await;
    wait_for_budget(&tg, "key", &key_id).await;
    let fits = |usd_nano: i64| (usd_nano / PER_REQUEST) as usize;
    // Each race spends what the tightest budget left allows, and its
    // refusals name that budget; the next race drops that budget.
    // One at a time, so each admits exactly what fits (no byte bound of
    // another request held meanwhile).
    let tag = race(
        &urls,
        &key,
        Some("bob"),
        &[("x-tollgate-tags", "batch")],
        25,
        1,
    )
    .await;
    let user = race(&urls, &key, Some("bob"), &[], 25, 1).await;
    let by_key = race(&urls, &key, Some("carol"), &[], 30, 1).await;
    let team = race(&urls, &other_key, None, &[], 75, 1).await;
    let steps = [
        ("tag", &tag, fits(1_500_000)),
        ("end_user", &user, fits(3_000_000) - fits(1_500_000)),
        ("key", &by_key, fits(5_000_000) - fits(3_000_000)),
        ("team", &team, fits(10_000_000) - fits(5_000_000)),
    ];
    for (level, got, want) in steps {
        println!(
            "{level}: admitted {} (want {want}), refused {}",
            got.admitted,
            got.refused_by.len()
        );
        assert_eq!(got.admitted, want, "{level}");
        assert!(
            got.refused_by.iter().all(|p| p == level),
            "{level}: {got:?}"
        );
    }
    // The refusal's message names the budget.
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-tollgate-end-user", "bob")
        .json(&json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hello world"}]}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 429);
    let body: Value = resp.json().await.unwrap_or_default();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("Team `all`")
            || message.starts_with("Key `")
            || message.starts_with("End user `bob` of team `all`"),
        "{message}"
    );
    let rows = tg
        .wait_rows_where(fits(10_000_000), |r| {
            r.endpoint == "chat.completions" && r.status == 200
        })
        .await;
    let spent: i64 = rows.iter().map(|r| r.cost_nano_usd).sum();
    assert_eq!(spent, fits(10_000_000) as i64 * PER_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_are_set_listed_and_cleared_by_cli_and_admin_api() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = format!(
        "{}\n{VIRTUAL}",
        support::base_config(&mock, dir.path())
            .replace("[server]\n", "[server]\nadmin_token = \"admin-secret\"\n")
            .replace(support::PASSTHROUGH_AUTH, "")
    );
    let tg = Tollgate::start_with_config(dir, &config).await;
    stdout(&tg.cli(&["teams", "create", "ops"]));
    let (key_id, key) = create_key(&tg, "ops", &[]);
    wait_for_key(&tg, &key).await;
    let admin = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut req = client()
            .request(method, tg.url(&path))
            .bearer_auth("admin-secret");
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or_default())
        }
    };
    let put = reqwest::Method::PUT;
    let (status, body) = admin(
        put.clone(),
        format!("/admin/keys/{key_id}/budget"),
        Some(json!({"budget_usd": "0.00005", "period": "daily"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["level"].as_str(), body["budget_usd"].as_str()),
        (Some("key"), Some("0.000050000"))
    );
    // Applied before the answer: $0.00005 does not cover one request.
    let over = race(&[tg.url("")], &key, None, &[], 1, 1).await;
    assert_eq!(over.refused_by, ["key"]);
    let (status, _) = admin(
        put.clone(),
        "/admin/teams/ops/end-users/dana/budget".into(),
        Some(json!({"budget_usd": 5, "period": "monthly"})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = admin(
        put.clone(),
        "/admin/tags/nightly/budget".into(),
        Some(json!({"budget_usd": "2.5"})),
    )
    .await;
    assert_eq!(status, 200);
    // Unknown key, unknown team, bad tag: clear errors.
    let (status, body) = admin(
        put.clone(),
        "/admin/keys/nope/budget".into(),
        Some(json!({"budget_usd": "1"})),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = admin(
        put.clone(),
        "/admin/teams/nope/end-users/x/budget".into(),
        Some(json!({"budget_usd": "1"})),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = admin(
        put.clone(),
        "/admin/tags/bad%20tag/budget".into(),
        Some(json!({"budget_usd": "1"})),
    )
    .await;
    assert_eq!(status, 400);
    let (_, list) = admin(reqwest::Method::GET, "/admin/budgets".into(), None).await;
    let listed: Vec<(String, String, String)> = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let t = |k: &str| b[k].as_str().unwrap_or("-").to_string();
                    (t("level"), t("name"), t("budget_usd"))
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(listed.len(), 3, "{list}");
    assert!(
        listed.contains(&("end_user".into(), "dana".into(), "5.000000000".into())),
        "{listed:?}"
    );
    assert!(listed.contains(&("tag".into(), "nightly".into(), "2.500000000".into())));
    // The CLI lists the same, and clears.
    let cli: Value =
        serde_json::from_str(&stdout(&tg.cli(&["budgets", "list", "--format", "json"])))
            .unwrap_or_default();
    assert_eq!(cli.as_array().map(Vec::len), Some(3), "{cli}");
    assert!(stdout(&tg.cli(&["keys", "set-budget", &key_id])).contains("budget cleared"));
    assert!(stdout(&tg.cli(&["tags", "set-budget", "nightly"])).contains("budget cleared"));
    let (status, _) = admin(
        put,
        "/admin/teams/ops/end-users/dana/budget".into(),
        Some(json!({"budget_usd": null})),
    )
    .await;
    assert_eq!(status, 200);
    let (_, list) = admin(reqwest::Method::GET, "/admin/budgets".into(), None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    // Cleared on the running server too: the key spends again.
    tg.wait_metrics(
        |m| match metric(m, "tollgate_level_budgets", &[("level", "key")]) {
            Some(0.0) => Ok(()),
            other => Err(format!("key budgets {other:?}")),
        },
    )
    .await;
    assert_eq!(race(&[tg.url("")], &key, None, &[], 1, 1).await.admitted, 1);
    // A bad tag header is the client's error, in OpenAI's shape.
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-tollgate-tags", "ok,not ok")
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap_or_default();
    assert_eq!(body["error"]["code"], "invalid_tags");
}

/// The budget_state spend of `account` and what the rows of `filter` cost.
async fn shared_spend(pool: &sqlx::PgPool, account: &str, filter: &str) -> (i64, i64) {
    let state: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(spent), 0)::BIGINT FROM budget_state WHERE team = $1",
    )
    .bind(account)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let rows: i64 = sqlx::query_scalar(&format!(
        "SELECT COALESCE(SUM(cost_nano_usd), 0)::BIGINT FROM usage WHERE endpoint = 'chat.completions' AND {filter}"
    ))
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    (state, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_postgres_never_overspend_any_level() {
    let Some(db) = support::PgDb::create("levels").await else {
        return;
    };
    let mock = MockUpstream::start().await;
    let mut replicas = support::replicas(&mock, &db, 3, "").await;
    let first = &replicas[0];
    stdout(&first.cli(&["teams", "create", "pg"]));
    let (key_id, key) = create_key(
        first,
        "pg",
        &["--budget-usd", "0.002", "--period", "monthly"],
    );
    let (_, plain) = create_key(first, "pg", &[]);
    stdout(&first.cli(&[
        "end-users",
        "set-budget",
        "--team",
        "pg",
        "erin",
        "--budget-usd",
        "0.002",
    ]));
    stdout(&first.cli(&[
        "tags",
        "set-budget",
        "shared",
        "--budget-usd",
        "0.002",
        "--period",
        "total",
    ]));
    for tg in &replicas {
        wait_for_key(tg, &key).await;
        wait_for_key(tg, &plain).await;
        wait_for_budget(tg, "tag", "shared").await;
        wait_for_budget(tg, "end_user", "pg:erin").await;
        wait_for_budget(tg, "key", &key_id).await;
    }
    let urls: Vec<String> = replicas.iter().map(|tg| tg.url("")).collect();
    let probes = mock.request_count();
    let fit = (2_000_000 / PER_REQUEST) as usize;
    let by_key = race(&urls, &key, None, &[], 200, 200).await;
    let by_user = race(&urls, &plain, Some("erin"), &[], 200, 200).await;
    let by_tag = race(
        &urls,
        &plain,
        None,
        &[("x-tollgate-tags", "shared")],
        200,
        200,
    )
    .await;
    for (level, got) in [("key", &by_key), ("end_user", &by_user), ("tag", &by_tag)] {
        println!(
            "3 replicas, {level}: admitted {} of {fit} that fit, refused {}",
            got.admitted,
            got.refused_by.len()
        );
        assert!(got.admitted >= 1 && got.admitted <= fit, "{level}: {got:?}");
        assert!(
            got.refused_by.iter().all(|p| p == level),
            "{level}: {got:?}"
        );
    }
    let admitted = by_key.admitted + by_user.admitted + by_tag.admitted;
    assert_eq!(
        mock.request_count() - probes,
        admitted,
        "refused requests went up"
    );
    for tg in &mut replicas {
        assert_eq!(tg.terminate(), Some(0));
    }
    let pool = db.pool().await;
    for (account, filter, got) in [
        (
            format!("key:{key_id}"),
            format!("key_id = '{key_id}'"),
            &by_key,
        ),
        (
            "user:pg:erin".to_string(),
            "end_user = 'erin'".to_string(),
            &by_user,
        ),
        (
            "tag:shared".to_string(),
            "tags = '[\"shared\"]'".to_string(),
            &by_tag,
        ),
    ] {
        let (state, rows) = shared_spend(&pool, &account, &filter).await;
        assert_eq!(rows, got.admitted as i64 * PER_REQUEST, "{account}");
        assert_eq!(
            state, rows,
            "{account}: the shared counter matches the rows"
        );
        assert!(rows <= 2_000_000, "{account} overspent: {rows}");
    }
    let leases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM budget_leases")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(leases, 0, "stopped replicas hold no budget");
    // The reports by tag and end user on Postgres equal the rows.
    let tags = report(&replicas[0], "tag");
    let tagged = (
        "shared".to_string(),
        200,
        by_tag.admitted as i64 * PER_REQUEST,
    );
    assert!(tags.contains(&tagged), "{tags:?}");
    let users = report(&replicas[0], "end_user");
    let erin = (
        "pg:erin".to_string(),
        200,
        by_user.admitted as i64 * PER_REQUEST,
    );
    assert!(users.contains(&erin), "{users:?}");
    pool.close().await;
    db.drop_db().await;
}
