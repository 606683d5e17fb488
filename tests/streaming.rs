//! Streaming through a real tollgate: chunks pass as they come, the usage
//! chunk tollgate asked for is hidden, and every way a stream can end is billed.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use support::{chat_body, client, MockUpstream, Tollgate};

fn stream_body(model: &str) -> serde_json::Value {
    let mut body = chat_body(model);
    body["stream"] = json!(true);
    body
}

fn o200k(text: &str) -> i64 {
    tollgate::usage::Encoding::O200kBase.count(text) as i64
}

/// Data payloads of the SSE events in a response body.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_chunk_is_hidden_when_client_did_not_ask() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-prompt-tokens", "1000")
        .header("x-mock-completion-tokens", "300")
        .json(&stream_body("gpt-4o"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-tollgate-request-id").is_some());
    assert!(resp.headers().get("x-tollgate-cost-usd").is_none());
    let text = resp.text().await.unwrap_or_default();
    let ev = events(&text);
    // "Hello from the mock" is 4 word chunks, then [DONE]; no usage chunk.
    assert_eq!(ev.len(), 5, "{text}");
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    assert!(!text.contains("\"usage\":{"), "{text}");
    // ...but tollgate asked the upstream for it.
    assert_eq!(mock.last().json()["stream_options"]["include_usage"], true);

    let rows = tg.wait_rows(1).await;
    let row = &rows[0];
    assert!(row.stream);
    assert_eq!((row.prompt_tokens, row.completion_tokens), (1000, 300));
    assert_eq!(row.token_source, "upstream");
    // 1000 x $2.5/M + 300 x $10/M = 0.0055
    assert_eq!(row.cost_nano_usd, 5_500_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_chunk_is_kept_when_client_asked() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let mut body = stream_body("gpt-4o-mini");
    body["stream_options"] = json!({"include_usage": true});
    let raw = serde_json::to_vec(&body).unwrap_or_default();
    let text = client()
        .post(tg.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(raw.clone())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    let ev = events(&text);
    assert_eq!(ev.len(), 6, "{text}");
    let usage: serde_json::Value = serde_json::from_str(&ev[4]).unwrap_or_default();
    assert_eq!(usage["usage"]["prompt_tokens"], 10);
    // Nothing needed changing: the body went up byte for byte.
    assert_eq!(mock.last().body, raw);
    tg.wait_rows(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_reach_the_client_before_the_upstream_has_finished() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-gate", "1")
        .json(&stream_body("gpt-4o"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut body = resp.bytes_stream();
    // The upstream has sent one chunk and now waits for the gate, which only
    // opens after that chunk reached us: buffering would deadlock here.
    let first = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .unwrap_or_else(|_| panic!("first chunk was held back"))
        .and_then(Result::ok)
        .unwrap_or_default();
    let first = String::from_utf8_lossy(&first).to_string();
    assert!(first.contains("\"content\":\"Hello \""), "{first}");
    assert!(!first.contains("from"), "{first}");
    mock.open_gate();
    let mut rest = String::new();
    while let Some(Ok(chunk)) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    let order: Vec<String> = events(&rest)
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(order, vec!["from ", "the ", "mock"]);
    tg.wait_rows(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_without_upstream_usage_is_estimated() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let mut body = stream_body("gpt-4o");
    body["n"] = json!(2);
    body["messages"] = json!([{"role": "user", "content": "hello world"}]);
    let text = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-usage", "omit")
        .header("x-mock-content", "hello world")
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let rows = tg.wait_rows(1).await;
    // prompt: 3 + "user"(1) + "hello world"(2) + 3 priming = 9; completion: 2 choices x 2
    assert_eq!((rows[0].prompt_tokens, rows[0].completion_tokens), (9, 4));
    assert_eq!(rows[0].token_source, "estimated");
    assert_eq!(rows[0].cost_nano_usd, 9 * 2_500 + 4 * 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_is_billed_for_what_was_generated() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let mut body = stream_body("gpt-4o");
    body["messages"] = json!([{"role": "user", "content": "hello world"}]);
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-gate", "1")
        .header("x-mock-content", "hello world")
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.and_then(Result::ok).unwrap_or_default();
    assert!(String::from_utf8_lossy(&first).contains("hello"));
    drop(stream); // the client goes away; the upstream is still mid-answer
    let rows = tg.wait_rows(1).await;
    let row = &rows[0];
    assert_eq!(row.status, 499);
    assert_eq!(row.token_source, "estimated");
    // prompt estimated (9), completion = the one chunk generated: "hello "
    let generated = o200k("hello ");
    assert_eq!(generated, 2);
    assert_eq!((row.prompt_tokens, row.completion_tokens), (9, generated));
    assert_eq!(row.cost_nano_usd, 9 * 2_500 + generated * 10_000);
    mock.open_gate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_on_done_before_the_upstream_closes_is_not_a_disconnect() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    // The upstream keeps the stream open for 5 s after `[DONE]`; the client
    // (as SDKs do) stops reading at `[DONE]` and closes.
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-linger-ms", "5000")
        .header("x-mock-prompt-tokens", "12")
        .header("x-mock-completion-tokens", "3")
        .json(&stream_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stream = resp.bytes_stream();
    let mut received = String::new();
    while !received.contains("data: [DONE]") {
        match stream.next().await {
            Some(Ok(chunk)) => received.push_str(&String::from_utf8_lossy(&chunk)),
            _ => panic!("stream ended before [DONE]: {received}"),
        }
    }
    drop(stream);
    let rows = tg.wait_rows(1).await;
    assert_eq!(
        (rows[0].status, rows[0].token_source.as_str()),
        (200, "upstream")
    );
    assert_eq!((rows[0].prompt_tokens, rows[0].completion_tokens), (12, 3));
    assert_eq!(rows[0].cost_nano_usd, 12 * 150 + 3 * 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_cut_mid_stream_is_recorded_with_what_arrived() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-cut-after", "2")
        .json(&stream_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    // The client sees the stream break rather than a clean end.
    let mut stream = resp.bytes_stream();
    let mut received = String::new();
    let mut broke = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(b) => received.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => broke = true,
        }
    }
    assert!(broke, "stream ended cleanly: {received}");
    assert!(!received.contains("[DONE]"));
    let rows = tg.wait_rows(1).await;
    assert_eq!(rows[0].status, 502);
    assert_eq!(rows[0].token_source, "estimated");
    // "Hello " + "from " arrived
    assert_eq!(rows[0].completion_tokens, o200k("Hello from "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_stream_times_out_and_is_billed() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = support::base_config(&mock, dir.path())
        .replace("idle_timeout_ms = 5000", "idle_timeout_ms = 300");
    let tg = Tollgate::start_with_config(dir, &config).await;
    let resp = client()
        .post(tg.url("/v1/chat/completions"))
        .header("x-mock-gate", "1")
        .json(&stream_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stream = resp.bytes_stream();
    let mut broke = false;
    while let Some(item) = stream.next().await {
        if item.is_err() {
            broke = true;
        }
    }
    assert!(broke);
    let rows = tg.wait_rows(1).await;
    assert_eq!(rows[0].status, 504);
    assert_eq!(rows[0].completion_tokens, o200k("Hello "));
    mock.open_gate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_responses_streams_are_metered() {
    let mock = MockUpstream::start().await;
    let tg = Tollgate::start(&mock, "").await;
    let c = client();
    let text = c
        .post(tg.url("/v1/completions"))
        .header("x-mock-prompt-tokens", "50")
        .header("x-mock-completion-tokens", "7")
        .json(&json!({"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": true}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    assert!(!text.contains("\"usage\""), "{text}");
    let text = c
        .post(tg.url("/v1/responses"))
        .header("x-mock-prompt-tokens", "40")
        .header("x-mock-completion-tokens", "3")
        .header("x-mock-cached-tokens", "20")
        .json(&json!({"model": "gpt-4.1-mini", "input": "hi", "stream": true}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    assert!(text.contains("response.completed"), "{text}");
    // The responses API takes no stream_options: the body went up unchanged.
    assert!(mock.last().json().get("stream_options").is_none());
    let rows = tg.wait_rows(2).await;
    assert_eq!((rows[0].prompt_tokens, rows[0].completion_tokens), (50, 7));
    assert_eq!(rows[0].cost_nano_usd, 50 * 1_500 + 7 * 2_000);
    assert_eq!(
        (
            rows[1].prompt_tokens,
            rows[1].completion_tokens,
            rows[1].cached_tokens
        ),
        (40, 3, 20)
    );
    // 20 x $0.40/M + 20 cached x $0.10/M + 3 x $1.60/M
    assert_eq!(rows[1].cost_nano_usd, 20 * 400 + 20 * 100 + 3 * 1_600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_that_do_not_support_stream_options_are_left_alone() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = support::base_config(&mock, dir.path()).replace(
        "\ntimeout_ms = 5000\n",
        "\ntimeout_ms = 5000\ninject_stream_usage = false\n",
    );
    let tg = Tollgate::start_with_config(dir, &config).await;
    let text = client()
        .post(tg.url("/v1/chat/completions"))
        .json(&stream_body("gpt-4o"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    assert!(text.contains("[DONE]"));
    assert!(mock.last().json().get("stream_options").is_none());
    let rows = tg.wait_rows(1).await;
    assert_eq!(rows[0].token_source, "estimated");
}
