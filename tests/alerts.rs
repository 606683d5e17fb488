//! Issue 24, alerts (SPEC 14): `[[alerts]]` webhooks told once per budget,
//! threshold and period, HMAC-signed, retried until the receiver answers
//! 2xx, not repeated by a restart, and sent by one replica of several.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{client, metric, stdout, wait_for_key, MockUpstream, Tollgate};

const SECRET: &str = "whsec-test-1234";

/// A webhook receiver on loopback that answers 500 to its first `fail`
/// POSTs, then 200; it keeps every POST (status given, signature, body).
#[derive(Clone)]
struct Receiver {
    url: String,
    seen: Arc<Mutex<Vec<(u16, String, String)>>>,
}

impl Receiver {
    async fn start(fail: usize) -> Receiver {
        let seen: Arc<Mutex<Vec<(u16, String, String)>>> = Arc::default();
        let kept = seen.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: http::HeaderMap, body: String| {
                let kept = kept.clone();
                async move {
                    let mut seen = kept.lock().unwrap_or_else(|e| e.into_inner());
                    let status = if seen.len() < fail { 500 } else { 200 };
                    let signature = headers
                        .get("x-tollgate-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    seen.push((status, signature, body));
                    http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            seen,
        }
    }

    fn seen(&self) -> Vec<(u16, String, String)> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The bodies it accepted, once `n` are in (15 s at most).
    async fn wait_accepted(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok: Vec<Value> = self
                .seen()
                .into_iter()
                .filter(|(s, _, _)| *s == 200)
                .map(|(_, _, b)| serde_json::from_str(&b).unwrap_or_default())
                .collect();
            if ok.len() >= n || Instant::now() > deadline {
                assert_eq!(ok.len(), n, "accepted: {ok:?}");
                return ok;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn alerts_config(receiver: &Receiver, thresholds: &str) -> String {
    format!(
        "[[alerts]]\nurl = \"{}\"\nthresholds = {thresholds}\nsecret = \"{SECRET}\"\n",
        receiver.url
    )
}

async fn chat(url: &str, key: &str) -> u16 {
    client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-mock-prompt-tokens", "9")
        .json(&json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hello world"}]}))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_go_once_per_threshold_signed_retried_and_not_again_after_a_restart() {
    let mock = MockUpstream::start().await;
    let receiver = Receiver::start(2).await;
    let tg = Tollgate::start(
        &mock,
        &format!(
            "[auth]\nmode = \"virtual-keys\"\n{}",
            alerts_config(&receiver, "[0.5, 1.0]")
        ),
    )
    .await;
    // $0.002 at 72,500 nano-USD a request: 50% after the 14th, refused at the 28th.
    let key = tg.budgeted_key("al", "0.002", "total").await;
    for _ in 0..13 {
        assert_eq!(chat(&tg.url(""), &key).await, 200);
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(receiver.seen().is_empty(), "no alert below 50%");
    let mut statuses = Vec::new();
    for _ in 0..16 {
        statuses.push(chat(&tg.url(""), &key).await);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 14);
    assert_eq!(statuses.last(), Some(&429));
    // The first two POSTs fail: retried after 1 s and 2 s.
    let accepted = receiver.wait_accepted(2).await;
    let mut thresholds: Vec<f64> = accepted
        .iter()
        .map(|b| b["threshold"].as_f64().unwrap_or(-1.0))
        .collect();
    thresholds.sort_by(f64::total_cmp);
    assert_eq!(thresholds, [0.5, 1.0]);
    for b in &accepted {
        assert_eq!(b["budget"]["kind"], "team", "{b}");
        assert_eq!(b["budget"]["name"], "al");
        assert_eq!(b["period"], "total");
        assert_eq!(b["limit_nano_usd"], 2_000_000);
        let spent = b["spent_nano_usd"].as_u64().unwrap_or(0);
        let threshold = b["threshold"].as_f64().unwrap_or(0.0);
        assert!(spent as f64 >= threshold * 2_000_000.0 * 0.96, "{b}");
        assert!(b["text"].as_str().is_some_and(|t| t.contains("team `al`")));
    }
    let seen = receiver.seen();
    assert_eq!(seen.len(), 4, "2 failed + 2 delivered: {seen:?}");
    for (_, signature, body) in &seen {
        assert_eq!(
            signature,
            &tollgate::alerts::signature(SECRET, body.as_bytes())
        );
        assert!(!body.contains(SECRET));
    }
    tg.wait_metrics(|m| {
        let d = metric(m, "tollgate_alerts_sent_total", &[("outcome", "delivered")]);
        let f = metric(m, "tollgate_alerts_sent_total", &[("outcome", "failed")]);
        match (d, f) {
            (Some(2.0), Some(2.0)) => Ok(()),
            other => Err(format!("delivered, failed: {other:?}")),
        }
    })
    .await;
    // A restart sees the same crossings and sends nothing again.
    let tg = tg.restart().await;
    assert_eq!(chat(&tg.url(""), &key).await, 429);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(receiver.seen().len(), 4, "a restart repeated an alert");
    assert!(
        !tg.log().iter().any(|l| l.contains(&receiver.url)),
        "the webhook URL was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_send_each_alert_once() {
    let Some(db) = support::PgDb::create("alerts").await else {
        return;
    };
    let mock = MockUpstream::start().await;
    let receiver = Receiver::start(0).await;
    let extra = alerts_config(&receiver, "[0.25, 0.5]");
    let mut replicas = support::replicas(&mock, &db, 2, &extra).await;
    stdout(&replicas[0].cli(&[
        "teams",
        "create",
        "pg",
        "--budget-usd",
        "0.002",
        "--period",
        "monthly",
    ]));
    let key = replicas[0].new_key("pg");
    for tg in &replicas {
        wait_for_key(tg, &key).await;
    }
    // 15 requests (1,087,500 nano-USD) cross 25% and 50%, on both replicas.
    for i in 0..15 {
        assert_eq!(chat(&replicas[i % 2].url(""), &key).await, 200);
    }
    let accepted = receiver.wait_accepted(2).await;
    // Both replicas have seen the spend by now (their refresh reads it
    // every 500 ms); neither sends again.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(
        receiver.seen().len(),
        2,
        "an alert went twice: {:?}",
        receiver.seen()
    );
    let mut thresholds: Vec<f64> = accepted
        .iter()
        .map(|b| b["threshold"].as_f64().unwrap_or(-1.0))
        .collect();
    thresholds.sort_by(f64::total_cmp);
    assert_eq!(thresholds, [0.25, 0.5]);
    assert!(accepted.iter().all(|b| b["period"] == "monthly"));
    for tg in &mut replicas {
        assert_eq!(tg.terminate(), Some(0));
    }
    db.drop_db().await;
}
