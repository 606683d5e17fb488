//! A lean OpenAI-compatible upstream for benchmarks: no recording, canned
//! answers. `cargo run --release --example bench_mock -- 127.0.0.1:PORT`.
//!
//! Request headers steer it:
//! - `x-mock-chunks: N`           stream N content chunks (default 50)
//! - `x-mock-chunk-delay-ms: N`   pause between chunks (default 0)
//! - `x-mock-usage: omit`         no usage (JSON or stream)

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

const CHAT: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
const CHAT_NO_USAGE: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark upstream."},"finish_reason":"stop"}]}"#;
const CHUNK: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok \"},\"finish_reason\":null}]}\n\n";

fn num(headers: &HeaderMap, name: &str, default: u64) -> u64 {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn chat(headers: HeaderMap, body: Bytes) -> Response {
    let omit = headers.get("x-mock-usage").is_some_and(|v| v == "omit");
    let text = std::str::from_utf8(&body).unwrap_or("");
    let stream = text.contains("\"stream\":true") || text.contains("\"stream\": true");
    if !stream {
        let out = if omit { CHAT_NO_USAGE } else { CHAT };
        return ([(header::CONTENT_TYPE, "application/json")], out).into_response();
    }
    let wants_usage = !omit && text.contains("\"include_usage\":true");
    let chunks = num(&headers, "x-mock-chunks", 50);
    let delay = Duration::from_millis(num(&headers, "x-mock-chunk-delay-ms", 0));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        for i in 0..chunks {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx
                .send(Ok(Bytes::from_static(CHUNK.as_bytes())))
                .await
                .is_err()
            {
                return;
            }
        }
        if wants_usage {
            let usage = format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{chunks},\"total_tokens\":{}}}}}\n\n",
                12 + chunks
            );
            let _ = tx.send(Ok(Bytes::from(usage))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let app = Router::new().route("/v1/chat/completions", post(chat));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("bench mock listening on {}", listener.local_addr()?);
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}
