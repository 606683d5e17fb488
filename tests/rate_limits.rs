//! Issue 24, rate limits (SPEC 14): `rpm` and `tpm` of a team and of a key,
//! OpenAI's `x-ratelimit-*` headers on every answer, 429
//! `rate_limit_exceeded` with `retry-after`, and on 3 Postgres replicas at
//! most the limit admitted per minute in total.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{client, metric, stdout, wait_for_key, MockUpstream, Tollgate};

const VIRTUAL: &str = "[auth]\nmode = \"virtual-keys\"\n";

fn body() -> Value {
    json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hello world"}]})
}

/// Waits for the next UTC minute when fewer than `secs` are left of this
/// one, so what follows runs inside one rate window.
async fn inside_one_window(secs: u64) {
    let now = chrono::Utc::now().timestamp_millis();
    let left = 60_000 - now.rem_euclid(60_000);
    if left < i64::try_from(secs * 1000).unwrap_or(0) {
        tokio::time::sleep(Duration::from_millis(u64::try_from(left).unwrap_or(0) + 50)).await;
    }
}

async fn send(url: &str, key: &str) -> reqwest::Response {
    client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-mock-prompt-tokens", "9")
        .header("x-mock-completion-tokens", "5")
        .json(&body())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

/// Waits until the server knows `n` limited teams and keys (the CLI's
/// change applies within its 500 ms refresh; a chat probe would spend them).
async fn wait_limited(tg: &Tollgate, n: f64) {
    tg.wait_metrics(|m| match metric(m, "tollgate_rate_limits", &[]) {
        Some(seen) if seen == n => Ok(()),
        other => Err(format!("rate limits known: {other:?}")),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_and_tpm_of_a_team_and_a_key_with_openai_headers() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, VIRTUAL).await;
    stdout(&tg.cli(&["teams", "create", "rl"]));
    let key = tg.new_key("rl");
    wait_for_key(&tg, &key).await;
    assert!(stdout(&tg.cli(&["teams", "set-limits", "rl", "--rpm", "5"])).contains("rpm 5"));
    wait_limited(&tg, 1.0).await;
    inside_one_window(15).await;
    let mut remaining = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..8 {
        let r = send(&tg.url(""), &key).await;
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "5");
        let reset = header(&r, "x-ratelimit-reset-requests");
        assert!(reset.ends_with('s') && reset.len() >= 2, "reset {reset}");
        match r.status().as_u16() {
            200 => remaining.push(header(&r, "x-ratelimit-remaining-requests")),
            429 => {
                let retry: u64 = header(&r, "retry-after").parse().unwrap_or(0);
                assert!((1..=60).contains(&retry), "retry-after {retry}");
                let b: Value = r.json().await.unwrap_or_default();
                refused.push((
                    b["error"]["code"].as_str().unwrap_or("").to_string(),
                    b["error"]["type"].as_str().unwrap_or("").to_string(),
                    b["error"]["param"].as_str().unwrap_or("").to_string(),
                ));
            }
            other => panic!("status {other}"),
        }
    }
    assert_eq!(remaining, ["4", "3", "2", "1", "0"]);
    let want = (
        "rate_limit_exceeded".to_string(),
        "requests".to_string(),
        "team".to_string(),
    );
    assert_eq!(refused, vec![want; 3]);
    let m = tg.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_rate_limited_total",
            &[("team", "rl"), ("unit", "requests")]
        ),
        Some(3.0)
    );

    // A key's own limit, tighter than a fresh team's: the key refuses.
    stdout(&tg.cli(&["teams", "create", "rl2"]));
    let key2 = tg.new_key("rl2");
    wait_for_key(&tg, &key2).await;
    let listed: Value =
        serde_json::from_str(&stdout(&tg.cli(&["keys", "list", "--format", "json"])))
            .unwrap_or_default();
    let id = listed
        .as_array()
        .and_then(|a| a.iter().find(|k| k["team"] == "rl2"))
        .and_then(|k| k["id"].as_str())
        .unwrap_or_default()
        .to_string();
    stdout(&tg.cli(&[
        "teams",
        "set-limits",
        "rl2",
        "--rpm",
        "100",
        "--tpm",
        "1000",
    ]));
    stdout(&tg.cli(&["keys", "set-limits", &id, "--rpm", "2"]));
    wait_limited(&tg, 3.0).await;
    inside_one_window(10).await;
    let statuses: Vec<(u16, String, String)> = {
        let mut out = Vec::new();
        for _ in 0..3 {
            let r = send(&tg.url(""), &key2).await;
            let s = r.status().as_u16();
            let limit = header(&r, "x-ratelimit-limit-requests");
            let b: Value = r.json().await.unwrap_or_default();
            out.push((
                s,
                limit,
                b["error"]["param"].as_str().unwrap_or("").to_string(),
            ));
        }
        out
    };
    // The headers show the tightest limit: the key's 2.
    assert_eq!(
        statuses,
        [
            (200, "2".to_string(), String::new()),
            (200, "2".to_string(), String::new()),
            (429, "2".to_string(), "key".to_string())
        ]
    );

    // Tokens: each request is admitted at its bound (prompt counted + 5
    // output) and settled at what it used (9 + 5 reported).
    stdout(&tg.cli(&["keys", "set-limits", &id]));
    stdout(&tg.cli(&["teams", "set-limits", "rl2", "--tpm", "100"]));
    wait_limited(&tg, 2.0).await;
    inside_one_window(10).await;
    let (mut admitted, mut left) = (0, Vec::new());
    loop {
        let r = send(&tg.url(""), &key2).await;
        assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "100");
        assert_eq!(
            header(&r, "x-ratelimit-limit-requests"),
            "-",
            "no rpm set now"
        );
        if r.status().as_u16() != 200 {
            assert_eq!(r.status().as_u16(), 429);
            let b: Value = r.json().await.unwrap_or_default();
            assert_eq!(b["error"]["type"], "tokens", "{b}");
            break;
        }
        admitted += 1;
        left.push(header(&r, "x-ratelimit-remaining-tokens"));
        assert!(admitted < 20, "the tpm limit never bound");
    }
    // The window may already hold rl2's requests above (28 tokens).
    let left: Vec<i64> = left.iter().map(|l| l.parse().unwrap_or(-1)).collect();
    assert!(left[0] == 86 || left[0] == 58, "{left:?}");
    assert!(
        left.windows(2).all(|w| w[0] - w[1] == 14),
        "settled at 14 tokens each: {left:?}"
    );
    assert!(left.last().is_some_and(|l| *l < 14 + 14), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_postgres_admit_at_most_the_rpm_in_a_minute() {
    let Some(db) = support::PgDb::create("ratelimits").await else {
        return;
    };
    let mock = MockUpstream::start().await;
    let mut replicas = support::replicas(&mock, &db, 3, "").await;
    stdout(&replicas[0].cli(&["teams", "create", "busy"]));
    let key = replicas[0].new_key("busy");
    stdout(&replicas[0].cli(&["teams", "set-limits", "busy", "--rpm", "600"]));
    for tg in &replicas {
        wait_for_key(tg, &key).await;
        wait_limited(tg, 1.0).await;
    }
    let urls: Vec<String> = replicas.iter().map(|tg| tg.url("")).collect();
    inside_one_window(25).await;
    use futures_util::StreamExt;
    let started = std::time::Instant::now();
    let statuses: Vec<u16> = futures_util::stream::iter(0..900)
        .map(|i| {
            let (url, key) = (urls[i % 3].clone(), key.clone());
            async move { send(&url, &key).await.status().as_u16() }
        })
        .buffer_unordered(48)
        .collect()
        .await;
    let took = started.elapsed();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    println!(
        "3 replicas, rpm 600: fired 900 in {:.1} s, admitted {admitted}, refused {limited}",
        took.as_secs_f64()
    );
    assert_eq!(admitted + limited, 900, "{statuses:?}");
    assert!(took < Duration::from_secs(25), "the burst left its minute");
    assert!(admitted <= 600, "admitted {admitted} > 600 in one minute");
    // Unused slices (1/50 of the limit each) are the only loss.
    assert!(admitted >= 600 - 3 * 12, "admitted only {admitted}");
    for tg in &mut replicas {
        assert_eq!(tg.terminate(), Some(0));
    }
    let pool = db.pool().await;
    let granted: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(requests), 0)::BIGINT FROM rate_windows WHERE account = 'busy'",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(granted <= 600, "granted {granted}");
    pool.close().await;
    db.drop_db().await;
}
