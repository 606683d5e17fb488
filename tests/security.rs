//! Fail closed (issue 12, point 1): the auth mode never opens by itself, a
//! tollgate key never leaves tollgate, an unauthenticated request never
//! spends the server's provider key, paths are never normalised upstream,
//! and budgeted teams cannot reach endpoints tollgate cannot price.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    base_config, chat_body, client, metric, raw_request, stdout, wait_for_key, MockUpstream,
    Tollgate, PASSTHROUGH_AUTH,
};

/// The base config without an auth mode.
fn config_unset_mode(mock: &MockUpstream, dir: &std::path::Path) -> String {
    base_config(mock, dir).replace(PASSTHROUGH_AUTH, "")
}

/// The base config without the upstream's api_key and without an auth mode.
fn config_without_key(mock: &MockUpstream, dir: &std::path::Path) -> String {
    config_unset_mode(mock, dir).replace("api_key = \"sk-upstream-secret\"\n", "")
}

async fn start_with(config: impl FnOnce(&std::path::Path) -> String) -> Tollgate {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let text = config(dir.path());
    Tollgate::start_with_config(dir, &text).await
}

async fn post(tg: &Tollgate, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = client()
        .post(tg.url("/v1/chat/completions"))
        .json(&chat_body("gpt-4o-mini"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{e}"));
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Runs `tollgate ARGS` against the config in `dir` (before a server starts).
fn cli(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(support::BIN)
        .args(args)
        .arg("--config")
        .arg(dir.join("tollgate.toml"))
        .env("TOLLGATE_LOG", "warn")
        .env_remove("TOLLGATE_DATABASE_URL")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    stdout(&out).lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_key_without_auth_mode_means_virtual_keys() {
    let mock = MockUpstream::start().await;
    // Mode unset, the upstream has a key, the database is empty: the
    // server's key must not be reachable without a tollgate key.
    let tg = start_with(|dir| config_unset_mode(&mock, dir)).await;
    let (status, body) = post(&tg, &[]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let (status, _) = post(&tg, &[("authorization", "Bearer sk-someone-elses")]).await;
    assert_eq!(status, 401);
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_passthrough_forwards_the_clients_key_and_tightens_when_a_key_appears() {
    let mock = MockUpstream::start().await;
    let tg = start_with(|dir| config_without_key(&mock, dir)).await;
    // No server key and no accounts: passthrough, the client's key goes up.
    let (status, _) = post(&tg, &[("authorization", "Bearer sk-client-own")]).await;
    assert_eq!(status, 200);
    assert_eq!(
        mock.last().header("authorization").as_deref(),
        Some("Bearer sk-client-own")
    );
    // A team and key made while it runs: within the refresh it is virtual-keys.
    let out = tg.cli(&["teams", "create", "late"]);
    stdout(&out);
    let key = String::from_utf8_lossy(&tg.cli(&["keys", "create", "--team", "late"]).stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    wait_for_key(&tg, &key).await;
    let seen = mock.request_count();
    let (status, _) = post(&tg, &[("authorization", "Bearer sk-client-own")]).await;
    assert_eq!(status, 401);
    let (status, _) = post(&tg, &[]).await;
    assert_eq!(status, 401);
    assert_eq!(mock.request_count(), seen, "nothing reached the upstream");
    let (status, _) = post(&tg, &[("authorization", &format!("Bearer {key}"))]).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_only_key_does_not_reopen_the_server_after_restart() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.path().join("tollgate.toml"),
        config_without_key(&mock, dir.path()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    cli(dir.path(), &["teams", "create", "t"]);
    let out = std::process::Command::new(support::BIN)
        .args([
            "keys", "create", "--team", "t", "--format", "json", "--config",
        ])
        .arg(dir.path().join("tollgate.toml"))
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let created: Value = serde_json::from_str(&stdout(&out)).unwrap_or(Value::Null);
    let (id, key) = (
        created["id"].as_str().unwrap_or_default().to_string(),
        created["key"].as_str().unwrap_or_default().to_string(),
    );
    cli(dir.path(), &["keys", "revoke", &id]);
    let config = std::fs::read_to_string(dir.path().join("tollgate.toml")).unwrap_or_default();
    let tg = Tollgate::start_with_config(dir, &config).await;
    let (status, _) = post(&tg, &[("authorization", &format!("Bearer {key}"))]).await;
    assert_eq!(status, 401, "a revoked key stays revoked");
    let (status, _) = post(&tg, &[]).await;
    assert_eq!(status, 401, "no key at all is refused");
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tollgate_key_is_never_forwarded_in_passthrough() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await; // explicit passthrough
    for (name, value) in [
        ("authorization", "Bearer tg-0123456789abcdef"),
        ("x-api-key", "tg-0123456789abcdef"),
        ("api-key", "tg-0123456789abcdef"),
    ] {
        let (status, body) = post(&tg, &[(name, value)]).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert!(!body.to_string().contains("0123456789abcdef"));
    }
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_never_reach_the_upstream_in_virtual_keys_mode() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "[auth]\nmode = \"virtual-keys\"\n").await;
    stdout(&tg.cli(&["teams", "create", "t"]));
    let key = tg.new_key("t");
    wait_for_key(&tg, &key).await;
    let auth = format!("Bearer {key}");
    let (status, _) = post(
        &tg,
        &[
            ("authorization", &auth),
            ("x-api-key", &key),
            ("api-key", &key),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let rec = mock.last();
    assert_eq!(
        rec.header("authorization").as_deref(),
        Some("Bearer sk-upstream-secret")
    );
    assert_eq!(rec.header("x-api-key"), None);
    assert_eq!(rec.header("api-key"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_and_encoded_slashes_get_400_before_forwarding() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    for path in [
        "/v1/../admin/x",
        "/v1/%2e%2e/admin/x",
        "/v1/%2E%2E/admin/x",
        "/v1/.%2e/admin/x",
        "/v1/..%2fadmin/x",
        "/v1/files%2F..%2Fadmin",
        "/v1/./models",
        "/v1/models/..",
        "/v1/models%5c..%5cadmin",
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer sk-client\r\nconnection: close\r\n\r\n",
            tg.addr
        );
        let (status, body) = raw_request(tg.addr, &req).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("invalid_path"), "{path}: {body}");
    }
    assert_eq!(mock.request_count(), 0, "{:?}", mock.requests());
    // Dots inside a segment are fine.
    let req = format!(
        "GET /v1/models/gpt-4.1..x HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        tg.addr
    );
    let (status, _) = raw_request(tg.addr, &req).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgeted_teams_cannot_reach_endpoints_tollgate_cannot_price() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(
        &mock,
        "[auth]\nmode = \"virtual-keys\"\nallow_unmetered = [\"GET /v1/models*\", \"/v1/files*\", \"POST /v1/moderations\"]\n",
    )
    .await;
    stdout(&tg.cli(&["teams", "create", "capped", "--budget-usd", "5"]));
    stdout(&tg.cli(&["teams", "create", "free"]));
    let (capped, free) = (tg.new_key("capped"), tg.new_key("free"));
    wait_for_key(&tg, &capped).await;
    wait_for_key(&tg, &free).await;
    let send = |method: reqwest::Method, path: &str, key: &str| {
        client()
            .request(method, tg.url(path))
            .bearer_auth(key)
            .body("{}")
            .send()
    };
    let seen = mock.request_count();
    // A batch is metered now, and one it cannot bound is refused too.
    let r = send(reqwest::Method::POST, "/v1/batches", &capped)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(body["error"]["code"], "batch_not_bounded");
    for (method, path) in [
        (reqwest::Method::POST, "/v1/fine_tuning/jobs"),
        // Images and audio are metered now (tests/media.rs); these are not.
        (reqwest::Method::POST, "/v1/vector_stores"),
        (reqwest::Method::POST, "/v1/uploads"),
        (reqwest::Method::GET, "/v1/realtime/sessions"),
        (reqwest::Method::POST, "/v1/models"),
    ] {
        let r = send(method.clone(), path, &capped)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), 403, "{method} {path}");
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(body["error"]["code"], "endpoint_not_metered", "{path}");
    }
    assert_eq!(mock.request_count(), seen, "refused before the upstream");
    for (method, path) in [
        (reqwest::Method::GET, "/v1/models"),
        (reqwest::Method::POST, "/v1/files"),
        (reqwest::Method::POST, "/v1/moderations"),
    ] {
        let r = send(method.clone(), path, &capped)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), 200, "{method} {path}");
    }
    // A team without a budget may use every path.
    let r = send(reqwest::Method::POST, "/v1/fine_tuning/jobs", &free)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    // Each refusal is a usage row with its status.
    let refused = tg.wait_rows_where(6, |r| r.status == 403).await;
    assert!(refused
        .iter()
        .all(|r| r.team == "capped" && r.cost_nano_usd == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_model_ids_and_many_teams_cannot_grow_metrics() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let huge = "m".repeat(1 << 20);
    for _ in 0..20 {
        let r = client()
            .post(tg.url("/v1/chat/completions"))
            .json(&chat_body(&huge))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), 400);
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(body["error"]["code"], "model_too_long");
    }
    assert_eq!(mock.request_count(), 0);
    // 1,100 teams named by clients in passthrough: the last 100 share `other`.
    let started = Instant::now();
    let c = client();
    for i in 0..1_100 {
        let r = c
            .post(tg.url("/v1/chat/completions"))
            .header("x-tollgate-team", format!("team-{i}"))
            .json(&chat_body("gpt-4o-mini"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), 200);
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    let m = tg.metrics().await;
    assert!(m.len() < 4 << 20, "/metrics is {} bytes", m.len());
    let teams: std::collections::HashSet<&str> = m
        .lines()
        .filter(|l| l.starts_with("tollgate_requests_total{"))
        .filter_map(|l| l.split("team=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(teams.len(), 1_000 + 1, "1000 named teams and `other`");
    // `default` (the refused requests) and team-0..team-998 took the 1000
    // labels; team-999..team-1099 share `other`.
    assert_eq!(
        metric(&m, "tollgate_requests_total", &[("team", "other")]),
        Some(101.0)
    );
    // Usage rows keep the real team.
    let rows = tg.wait_rows(20 + 1_100).await;
    assert_eq!(rows[20 + 1_099].team, "team-1099");
}
