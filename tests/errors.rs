//! Bad input and bad upstreams: OpenAI-shaped errors with the right status,
//! never a panic or an HTML page, and a usage row for every attributed request.

mod support;

use serde_json::{json, Value};
use support::{chat_body, client, metric, MockUpstream, Tollgate};

async fn post_raw(tg: &Tollgate, path: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = client()
        .post(tg.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = resp.status().as_u16();
    assert!(resp.headers().get("x-tollgate-request-id").is_some());
    let text = resp.text().await.unwrap_or_default();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

fn assert_openai_error(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("code").is_some() && e.get("param").is_some(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_with_openai_shape() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let cases: Vec<(&[u8], Option<&str>)> = vec![
        (b"{not json", None),
        (b"", None),
        (b"[1,2,3]", None),
        (
            b"{\"model\": \"gpt-4o\", \"messages\": [{\"content\": \"\xff\xfe\"}]}",
            None,
        ),
        (br#"{"model": 42, "messages": []}"#, Some("model")),
        (br#"{"model": "gpt-4o", "stream": "yes"}"#, Some("stream")),
        (br#"{"model": "gpt-4o", "n": -1}"#, Some("n")),
        (br#"{"messages": []}"#, Some("model")),
    ];
    for (body, param) in &cases {
        let (status, v) = post_raw(&tg, "/v1/chat/completions", body.to_vec()).await;
        assert_eq!(status, 400, "{:?}: {v}", String::from_utf8_lossy(body));
        assert_openai_error(&v);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], *p, "{v}");
        }
    }
    assert_eq!(
        mock.request_count(),
        0,
        "bad input must not reach the upstream"
    );
    let rows = tg.wait_rows(cases.len()).await;
    assert!(rows.iter().all(|r| r.status == 400 && r.cost_nano_usd == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = support::base_config(&mock, dir.path())
        .replace("[server]\n", "[server]\nmax_body_bytes = 1000\n");
    let tg = Tollgate::start_with_config(dir, &config).await;
    let mut body = chat_body("gpt-4o");
    body["messages"][0]["content"] = json!("x".repeat(2000));
    let (status, v) = post_raw(
        &tg,
        "/v1/chat/completions",
        serde_json::to_vec(&body).unwrap_or_default(),
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(v["error"]["code"], "request_too_large");
    // Without a content-length (chunked), the limit still holds.
    let stream = futures_util::stream::iter(vec![
        Ok::<_, std::io::Error>(vec![b' '; 600]),
        Ok(vec![b' '; 600]),
    ]);
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 413);
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_status_and_body_reach_the_client_unchanged() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    for status in [400u16, 429, 500, 503] {
        let resp = client()
            .post(tg.url("/v1/chat/completions"))
            .header("x-mock-status", status.to_string())
            .json(&chat_body("gpt-4o"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status().as_u16(), status);
        let v: Value = resp.json().await.unwrap_or_default();
        assert_eq!(v["error"]["message"], format!("mock failure {status}"));
    }
    let rows = tg.wait_rows(4).await;
    let statuses: Vec<i64> = rows.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![400, 429, 500, 503]);
    assert!(rows
        .iter()
        .all(|r| r.cost_nano_usd == 0 && r.upstream == "mock"));
    let m = tg.metrics().await;
    let labels = [
        ("model", "gpt-4o"),
        ("status", "429"),
        ("endpoint", "chat.completions"),
    ];
    assert_eq!(metric(&m, "tollgate_requests_total", &labels), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_redirects_are_handed_back_not_followed() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = no_follow
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-status", "307")
        .json(&chat_body("gpt-4o"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 307);
    assert_eq!(
        resp.headers().get("location").and_then(|v| v.to_str().ok()),
        Some("/v1/chat/completions?redirected=1")
    );
    // tollgate sent the request once and did not chase the location.
    assert_eq!(mock.request_count(), 1);
    let rows = tg.wait_rows(1).await;
    assert_eq!((rows[0].status, rows[0].cost_nano_usd), (307, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gets_504_and_unreachable_upstream_502() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // A closed port: bind, note the address, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("{e}"));
    let config = format!(
        "{}\n[[upstreams]]\nname = \"dead\"\nbase_url = \"http://{closed}/v1\"\nmodels = [\"dead-*\"]\n",
        support::base_config(&mock, dir.path())
            .replace("\ntimeout_ms = 5000\n", "\ntimeout_ms = 300\n")
            .replace("api_key = \"sk-upstream-secret\"", "api_key = \"sk-upstream-secret\"\nmodels = [\"gpt-*\", \"text-*\", \"ft:*\"]")
    );
    let tg = Tollgate::start_with_config(dir, &config).await;
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-delay-ms", "3000")
        .json(&chat_body("gpt-4o"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 504);
    let v: Value = resp.json().await.unwrap_or_default();
    assert_eq!(v["error"]["code"], "upstream_timeout");

    let (status, v) = post_raw(
        &tg,
        "/v1/chat/completions",
        serde_json::to_vec(&chat_body("dead-model")).unwrap_or_default(),
    )
    .await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "upstream_unreachable");

    // No upstream's globs match: 400 naming the model.
    let (status, v) = post_raw(
        &tg,
        "/v1/chat/completions",
        serde_json::to_vec(&chat_body("llama-3")).unwrap_or_default(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "model_not_found");

    let rows = tg.wait_rows(3).await;
    let got: Vec<(i64, &str)> = rows
        .iter()
        .map(|r| (r.status, r.upstream.as_str()))
        .collect();
    assert_eq!(got, vec![(504, "mock"), (502, "dead"), (400, "")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_200_reaches_the_client_unchanged_and_is_estimated() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-garbage", "1")
        .json(&chat_body("gpt-4o"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The provider answered 200: so does tollgate, with the body as it came.
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.text().await.unwrap_or_default(),
        "<html>definitely not json"
    );
    let rows = tg.wait_rows(1).await;
    assert_eq!(rows[0].status, 200);
    assert_eq!(rows[0].token_source, "estimated");
    // "Say hello": 9 prompt tokens estimated; nothing readable came back.
    assert_eq!((rows[0].prompt_tokens, rows[0].completion_tokens), (9, 0));
    assert_eq!(rows[0].cost_nano_usd, 9 * 2_500);
    let m = tg.metrics().await;
    assert_eq!(
        support::metric(&m, "tollgate_usage_estimated_total", &[("model", "gpt-4o")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpriced_models_are_counted_or_rejected_by_policy() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .json(&chat_body("my-local-llama"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.000000000")
    );
    let m = tg.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_unpriced_requests_total",
            &[("model", "my-local-llama")]
        ),
        Some(1.0)
    );
    let rows = tg.wait_rows(1).await;
    assert_eq!((rows[0].prompt_tokens, rows[0].cost_nano_usd), (10, 0));
    drop(tg);

    let tg = Tollgate::start(&mock, "[catalog]\nunpriced = \"reject\"\n").await;
    let before = mock.request_count();
    let (status, v) = post_raw(
        &tg,
        "/v1/chat/completions",
        serde_json::to_vec(&chat_body("my-local-llama")).unwrap_or_default(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "model_not_priced");
    assert_eq!(v["error"]["param"], "model");
    assert_eq!(mock.request_count(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_get_openai_shaped_404() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let resp = client()
        .get(tg.url("/nope"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap_or_default();
    assert_openai_error(&v);
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-tollgate-team", "bad team!")
        .json(&chat_body("gpt-4o"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 400);
}
