//! Issue 23, point 5: OpenTelemetry. With `[otel] endpoint` every request
//! is a span over OTLP/HTTP with the GenAI conventions and its exact cost
//! (SPEC 15), received here by a collector that decodes the real protobuf
//! (`opentelemetry-proto`); a collector that never answers costs requests
//! nothing and spans are dropped and counted, not queued without bound.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;
use serde_json::json;
use support::mock::MockUpstream;
use support::{client, metric, Tollgate, UsageRow};

/// What the collector received: each export's headers and body.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(HeaderMap, Bytes)>>>);

impl Received {
    /// Every span received, with its resource's attributes.
    fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        let exports = self.0.lock().map(|e| e.clone()).unwrap_or_default();
        let mut spans = Vec::new();
        for (_, body) in exports {
            let request = ExportTraceServiceRequest::decode(&body[..])
                .unwrap_or_else(|e| panic!("not an OTLP trace export: {e}"));
            for resource in request.resource_spans {
                let attrs = resource.resource.map(|r| r.attributes).unwrap_or_default();
                for scope in resource.scope_spans {
                    for span in scope.spans {
                        spans.push((attrs.clone(), span));
                    }
                }
            }
        }
        spans
    }

    fn exports(&self) -> Vec<(HeaderMap, Bytes)> {
        self.0.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Waits until `n` spans have arrived.
    async fn wait_spans(&self, n: usize) -> Vec<(Vec<KeyValue>, Span)> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans();
            if spans.len() >= n || Instant::now() > deadline {
                assert_eq!(spans.len(), n, "spans received");
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An OTLP/HTTP collector on loopback: `POST /v1/traces`, protobuf.
async fn collector() -> (String, Received) {
    let received = Received::default();
    let kept = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let kept = kept.clone();
            async move {
                if let Ok(mut e) = kept.0.lock() {
                    e.push((headers, body));
                }
                (
                    [(http::header::CONTENT_TYPE, "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

/// A collector that is down in the worst way: it takes the connection and
/// never answers.
async fn silent_collector() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    format!("http://{addr}")
}

/// An OpenAI upstream for `gpt-*` and an Anthropic one for `claude-*`, both
/// the mock; virtual keys; `otel` as given.
fn config(mock: &MockUpstream, dir: &std::path::Path, otel: &str) -> String {
    support::config_around(
        dir,
        &format!(
            r#"{otel}

[[upstreams]]
name = "openai"
base_url = "{base}"
api_key = "sk-upstream-secret"
models = ["gpt-*"]

[[upstreams]]
name = "anthropic"
kind = "anthropic"
base_url = "{base}"
api_key = "sk-ant-upstream-secret"
models = ["claude-*"]
"#,
            base = mock.base_url()
        ),
    )
}

fn attr<'a>(span: &'a Span, key: &str) -> &'a Any {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
        .unwrap_or_else(|| panic!("span {} has no {key}", span.name))
}

fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Any::IntValue(n) => *n,
        other => panic!("{key} = {other:?}, not an int"),
    }
}

fn text<'a>(span: &'a Span, key: &str) -> &'a str {
    match attr(span, key) {
        Any::StringValue(s) => s,
        other => panic!("{key} = {other:?}, not a string"),
    }
}

/// The span agrees with the usage row it was made from, to the nano-USD.
fn assert_span_is_row(span: &Span, row: &UsageRow, operation: &str, provider: &str) {
    match row.model.is_empty() {
        true => assert_eq!(span.name, operation),
        false => assert_eq!(span.name, format!("{operation} {}", row.model)),
    }
    assert_eq!(span.kind, SpanKind::Client as i32);
    assert_eq!(text(span, "gen_ai.operation.name"), operation);
    assert_eq!(text(span, "gen_ai.provider.name"), provider);
    assert_eq!(text(span, "gen_ai.request.model"), row.model);
    assert_eq!(int(span, "gen_ai.usage.input_tokens"), row.prompt_tokens);
    assert_eq!(
        int(span, "gen_ai.usage.output_tokens"),
        row.completion_tokens
    );
    assert_eq!(
        int(span, "gen_ai.usage.cache_read.input_tokens"),
        row.cached_tokens
    );
    assert_eq!(
        int(span, "gen_ai.usage.cache_creation.input_tokens"),
        row.cache_write_tokens
    );
    assert_eq!(
        int(span, "gen_ai.usage.reasoning.output_tokens"),
        row.reasoning_tokens
    );
    assert_eq!(int(span, "tollgate.cost.nano_usd"), row.cost_nano_usd);
    match attr(span, "gen_ai.usage.cost.amount") {
        Any::DoubleValue(usd) => assert_eq!(*usd, row.cost_nano_usd as f64 / 1e9),
        other => panic!("cost.amount = {other:?}"),
    }
    assert_eq!(text(span, "gen_ai.usage.cost.currency"), "USD");
    assert_eq!(text(span, "tollgate.team"), row.team);
    assert_eq!(text(span, "tollgate.upstream"), row.upstream);
    assert_eq!(int(span, "http.response.status_code"), row.status);
    assert_eq!(
        Some(text(span, "tollgate.key_id")),
        row.key_id.as_deref(),
        "the key's id, never the key"
    );
    let lasted = span.end_time_unix_nano - span.start_time_unix_nano;
    assert_eq!(lasted, row.latency_ms as u64 * 1_000_000);
    let error = span.status.as_ref().map(|s| s.code) == Some(StatusCode::Error as i32);
    assert_eq!(error, row.status >= 400, "status of {}", span.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_a_span_with_the_genai_conventions_and_its_exact_cost() {
    let mock = MockUpstream::start().await;
    let (endpoint, received) = collector().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // The README's snippet, the collector here, its key from the environment.
    let otel = support::readme_toml("OpenTelemetry").replace("http://collector:4318", &endpoint)
        + "service_name = \"tollgate-test\"\n";
    let config = config(&mock, dir.path(), &otel);
    let mut tg =
        Tollgate::start_in_shell(dir, &config, "export HONEYCOMB_KEY=otel-collector-token").await;
    let key = tg.budgeted_key("alpha", "100", "monthly").await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let chat = |body: serde_json::Value, headers: Vec<(&'static str, String)>| {
        let mut req = client()
            .post(tg.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send()
    };
    // A chat answered by a dated snapshot, cached tokens, inside the
    // client's trace.
    let r = chat(
        support::chat_body("gpt-4o"),
        vec![
            ("x-mock-cached-tokens", "4".into()),
            ("x-mock-model", "gpt-4o-2024-08-06".into()),
            ("traceparent", format!("00-{trace}-{parent}-01")),
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let traced = support::request_id(&r);
    // A stream.
    let r = chat(
        json!({"model": "gpt-4o-mini", "stream": true,
               "messages": [{"role": "user", "content": "Hi"}]}),
        vec![],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    // An upstream error.
    let r = chat(
        support::chat_body("gpt-4o"),
        vec![("x-mock-status", "500".into())],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 500);
    // Anthropic's Messages with cache writes of both kinds.
    let r = support::messages(
        tg.url("/v1/messages"),
        &key,
        &json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
                "messages": [{"role": "user", "content": "Hello, Claude"}]}),
        &[
            ("x-mock-cache-write-5m", "400"),
            ("x-mock-cache-write-1h", "100"),
            ("x-mock-cached-tokens", "2000"),
        ],
    )
    .send()
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);

    // Four requests, and the key's first `GET /v1/models`.
    let rows = tg.wait_rows(5).await;
    let spans = received.wait_spans(5).await;
    let by_id: HashMap<String, &Span> = spans
        .iter()
        .map(|(_, s)| (text(s, "tollgate.request_id").to_string(), s))
        .collect();
    for row in &rows {
        let span = by_id
            .get(&row.request_id)
            .unwrap_or_else(|| panic!("no span for {}", row.request_id));
        let (operation, provider) = match row.endpoint.as_str() {
            "messages" => ("chat", "anthropic"),
            "models" => ("models", "openai"),
            _ => ("chat", "openai"),
        };
        assert_span_is_row(span, row, operation, provider);
        let stream = matches!(attr(span, "tollgate.stream"), Any::BoolValue(true));
        assert_eq!(stream, row.stream);
    }
    let anthropic = rows
        .iter()
        .find(|r| r.endpoint == "messages")
        .unwrap_or_else(|| panic!("no messages row"));
    assert_eq!(anthropic.cache_write_tokens, 500);
    assert!(anthropic.cost_nano_usd > 0);
    // The client's trace is joined; the others start traces of their own.
    let joined = by_id[&traced];
    assert_eq!(hex(&joined.trace_id), trace);
    assert_eq!(hex(&joined.parent_span_id), parent);
    assert_eq!(text(joined, "gen_ai.response.model"), "gpt-4o-2024-08-06");
    for (id, span) in &by_id {
        if *id != traced {
            assert!(span.parent_span_id.is_empty(), "{id} has a parent");
            assert_ne!(hex(&span.trace_id), trace);
        }
    }
    // The resource, the export's headers, and no secret anywhere in it.
    let (resource, _) = &spans[0];
    let service = resource
        .iter()
        .find(|a| a.key == "service.name")
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref());
    assert_eq!(service, Some(&Any::StringValue("tollgate-test".into())));
    for (headers, body) in received.exports() {
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/x-protobuf")
        );
        assert_eq!(
            headers
                .get("x-honeycomb-team")
                .and_then(|v| v.to_str().ok()),
            Some("otel-collector-token")
        );
        for secret in [key.as_str(), "sk-upstream-secret", "sk-ant-upstream-secret"] {
            assert!(
                !body.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret in the spans"
            );
        }
    }
    tg.wait_metrics(
        |m| match metric(m, "tollgate_otel_spans_total", &[("outcome", "exported")]) {
            Some(5.0) => Ok(()),
            other => Err(format!("exported {other:?}")),
        },
    )
    .await;

    // At shutdown, the spans still waiting for their batch are sent.
    let r = chat(support::chat_body("gpt-4o-mini"), vec![])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let last = support::request_id(&r);
    tg.wait_rows(6).await;
    assert_eq!(tg.terminate(), Some(0));
    let spans = received.wait_spans(6).await;
    assert!(spans
        .iter()
        .any(|(_, s)| text(s, "tollgate.request_id") == last));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_costs_requests_nothing_and_spans_are_dropped_and_counted() {
    let mock = MockUpstream::start().await;
    let endpoint = silent_collector().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let otel = format!("[otel]\nendpoint = \"{endpoint}\"\nqueue_capacity = 8\ntimeout_ms = 400");
    let config = config(&mock, dir.path(), &otel);
    let tg = Tollgate::start_with_config(dir, &config).await;
    let key = tg.budgeted_key("alpha", "100", "monthly").await;
    const N: usize = 60;
    for _ in 0..N {
        let r = support::post_chat(&tg, &key, &support::chat_body("gpt-4o"), &[]).await;
        assert_eq!(r.status(), 200);
    }
    tg.wait_rows(N + 1).await;
    // Every span is either dropped at the full queue or failed at export:
    // at most the queue's 8 ever waited.
    assert!(
        !tg.log().iter().any(|l| l.contains("otel-collector-token")),
        "the collector's key in the log"
    );
    tg.wait_metrics(|m| {
        let get =
            |o: &str| metric(m, "tollgate_otel_spans_total", &[("outcome", o)]).unwrap_or(0.0);
        let (dropped, failed, exported) = (get("dropped"), get("failed"), get("exported"));
        if exported != 0.0 {
            return Err(format!(
                "exported {exported} to a collector that never answers"
            ));
        }
        if dropped + failed == (N + 1) as f64 && dropped >= (N - 16) as f64 {
            Ok(())
        } else {
            Err(format!("dropped {dropped}, failed {failed}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_even_with_the_sdks_variable_set() {
    let mock = MockUpstream::start().await;
    let (endpoint, received) = collector().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = config(&mock, dir.path(), "");
    // The SDK's environment variable, set for other programs, does not
    // turn tollgate's export on: only `[otel] endpoint` does.
    let tg = Tollgate::start_in_shell(
        dir,
        &config,
        &format!("export OTEL_EXPORTER_OTLP_ENDPOINT={endpoint}"),
    )
    .await;
    let key = tg.budgeted_key("alpha", "100", "monthly").await;
    let r = support::post_chat(&tg, &key, &support::chat_body("gpt-4o"), &[]).await;
    assert_eq!(r.status(), 200);
    tg.wait_rows(2).await;
    // Longer than the batch delay (1 s) of an export that would be on.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(received.exports().is_empty());
    assert_eq!(
        metric(
            &tg.metrics().await,
            "tollgate_otel_spans_total",
            &[("outcome", "exported")]
        ),
        None
    );
}
