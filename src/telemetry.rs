//! OpenTelemetry (SPEC 15): one span per request over OTLP/HTTP, with the
//! GenAI semantic conventions and the request's exact cost.
//!
//! A span is made from the request's usage row once the database has taken
//! it (`store::writer::WrittenRows`), on the writer's task: a request pays
//! nothing for its span, whether a collector listens or not. The SDK's
//! batch processor sends spans from a thread of its own, 512 at a time; at
//! most `otel.queue_capacity` wait, and a span that finds the queue full is
//! dropped and counted, so a collector that is down costs no latency and no
//! unbounded memory. Without `[otel] endpoint` none of this exists.
//!
//! The exporter sends with tollgate's own `reqwest` client on the server's
//! runtime (`RuntimeClient`), not a second HTTP stack.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
};
use prometheus::IntCounter;

use crate::config::OtelConfig;
use crate::metrics::Metrics;
use crate::store::writer::WrittenRows;
use crate::store::UsageRecord;

/// Spans per export request.
const EXPORT_BATCH: usize = 512;
/// Longest a span waits for a fuller batch.
const EXPORT_DELAY: Duration = Duration::from_secs(1);
/// At most one log line per this while exports fail.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);

/// The running export: spans are made by `written`, sent by the SDK.
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// Spans ended and not yet exported (or failed): the queue's depth.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    dropped: IntCounter,
}

impl Telemetry {
    /// Starts the export `config` asks for (`None`: no endpoint, off). Must
    /// run on the server's runtime: exports are sent from it.
    pub fn start(config: &OtelConfig, metrics: &Metrics) -> Result<Option<Telemetry>, String> {
        let Some(endpoint) = &config.endpoint else {
            return Ok(None);
        };
        let timeout = Duration::from_millis(config.timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("otel: HTTP client: {e}"))?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "otel: start it on the server's runtime".to_string())?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url(endpoint))
            .with_timeout(timeout)
            .with_headers(
                config
                    .headers
                    .clone()
                    .into_iter()
                    .collect::<HashMap<_, _>>(),
            )
            .with_http_client(RuntimeClient { client, runtime })
            .build()
            .map_err(|e| format!("otel.endpoint `{endpoint}`: {e}"))?;
        let queued = Arc::new(AtomicUsize::new(0));
        let outcome = |o: &str| metrics.otel_spans.with_label_values(&[o]);
        let exporter = Counted {
            inner: exporter,
            queued: queued.clone(),
            exported: outcome("exported"),
            failed: outcome("failed"),
            last_failure_log: Mutex::new(None),
        };
        let batches = BatchConfigBuilder::default()
            .with_max_queue_size(config.queue_capacity)
            .with_max_export_batch_size(EXPORT_BATCH.min(config.queue_capacity))
            .with_scheduled_delay(EXPORT_DELAY)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batches)
                    .build(),
            )
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("tollgate");
        tracing::info!(endpoint = %endpoint, "OpenTelemetry: a span per request");
        Ok(Some(Telemetry {
            provider,
            tracer,
            queued,
            capacity: config.queue_capacity,
            dropped: outcome("dropped"),
        }))
    }

    /// Sends what is queued (waiting at most `timeout`) and stops. Blocks:
    /// call it off the runtime's workers (`spawn_blocking`).
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(timeout) {
            tracing::warn!(error = %e, "OpenTelemetry: spans still queued at shutdown were not sent");
        }
    }

    /// The span of one request, from its row.
    fn span(&self, row: &UsageRecord) {
        if self.queued.load(Ordering::Relaxed) >= self.capacity {
            self.dropped.inc();
            return;
        }
        let operation = operation(row.endpoint);
        let start = SystemTime::from(row.created_at);
        let end = start + Duration::from_millis(row.latency_ms);
        let parent = row
            .trace_parent
            .as_deref()
            .map(remote_parent)
            .unwrap_or_default();
        let mut span = self
            .tracer
            .span_builder(match row.model.is_empty() {
                true => operation.to_string(),
                false => format!("{operation} {}", row.model),
            })
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes(attributes(row, operation))
            .start_with_context(&self.tracer, &parent);
        if !span.span_context().is_sampled() {
            // The client's trace is not recorded (its `traceparent` says so).
            return;
        }
        if row.status >= 400 {
            span.set_status(Status::error(format!("HTTP {}", row.status)));
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        span.end_with_timestamp(end);
    }
}

impl WrittenRows for Telemetry {
    fn written(&self, rows: &[Box<UsageRecord>]) {
        for row in rows {
            self.span(row);
        }
    }
}

/// `{endpoint}/v1/traces`, as OTLP/HTTP names the traces path under a
/// collector's address (kept when the endpoint already ends with it).
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    match base.ends_with("/v1/traces") {
        true => base.to_string(),
        false => format!("{base}/v1/traces"),
    }
}

/// `gen_ai.operation.name` of an endpoint (the `endpoint` column).
fn operation(endpoint: &'static str) -> &'static str {
    match endpoint {
        "chat.completions" | "responses" | "messages" | "converse" | "realtime" => "chat",
        "completions" => "text_completion",
        "embeddings" => "embeddings",
        "generate_content" => "generate_content",
        other => other,
    }
}

/// `gen_ai.provider.name` as the conventions spell tollgate's providers.
fn provider_name(provider: &'static str) -> &'static str {
    match provider {
        "azure" => "azure.ai.openai",
        "gemini" => "gcp.gemini",
        "bedrock" => "aws.bedrock",
        other => other,
    }
}

/// The context of the client's span a `traceparent` names (W3C Trace
/// Context, parsed by the SDK's propagator); empty when it names none.
fn remote_parent(header: &str) -> Context {
    let carrier = HashMap::from([("traceparent".to_string(), header.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    match cx.span().span_context().is_valid() {
        true => cx,
        false => Context::new(),
    }
}

/// The span's attributes: the GenAI conventions, the cost, and tollgate's
/// own names for what they have no name for. No secret: a key's id, never
/// the key.
fn attributes(row: &UsageRecord, operation: &'static str) -> Vec<KeyValue> {
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let mut a = vec![
        KeyValue::new("gen_ai.operation.name", operation),
        KeyValue::new("gen_ai.provider.name", provider_name(row.provider)),
        KeyValue::new("gen_ai.request.model", row.model.clone()),
        KeyValue::new(
            "gen_ai.response.model",
            row.served_model
                .clone()
                .unwrap_or_else(|| row.model.clone()),
        ),
        KeyValue::new("gen_ai.usage.input_tokens", int(row.prompt_tokens)),
        KeyValue::new("gen_ai.usage.output_tokens", int(row.completion_tokens)),
        KeyValue::new(
            "gen_ai.usage.cache_read.input_tokens",
            int(row.cached_tokens),
        ),
        KeyValue::new(
            "gen_ai.usage.cache_creation.input_tokens",
            int(row.cache_write_tokens),
        ),
        KeyValue::new(
            "gen_ai.usage.reasoning.output_tokens",
            int(row.reasoning_tokens),
        ),
        // USD as a double for dashboards; the exact integer beside it.
        KeyValue::new("gen_ai.usage.cost.amount", row.cost_nano_usd as f64 / 1e9),
        KeyValue::new("gen_ai.usage.cost.currency", "USD"),
        KeyValue::new("tollgate.cost.nano_usd", int(row.cost_nano_usd)),
        KeyValue::new("tollgate.team", row.team.clone()),
        KeyValue::new("tollgate.request_id", row.request_id.clone()),
        KeyValue::new("tollgate.upstream", row.upstream.clone()),
        KeyValue::new("tollgate.endpoint", row.endpoint),
        KeyValue::new("tollgate.stream", row.stream),
        KeyValue::new("tollgate.token_source", row.token_source),
        KeyValue::new("http.response.status_code", i64::from(row.status)),
    ];
    if let Some(key) = &row.key_id {
        a.push(KeyValue::new("tollgate.key_id", key.clone()));
    }
    if let Some(tier) = row.service_tier {
        a.push(KeyValue::new("tollgate.service_tier", tier));
    }
    if let Some(batch) = &row.batch_id {
        a.push(KeyValue::new("tollgate.batch_id", batch.clone()));
    }
    if row.status >= 400 {
        a.push(KeyValue::new("error.type", row.status.to_string()));
    }
    a
}

/// The OTLP exporter, counting what became of each span and keeping the
/// queue's depth (`Telemetry::queued`) true.
struct Counted {
    inner: opentelemetry_otlp::SpanExporter,
    queued: Arc<AtomicUsize>,
    exported: IntCounter,
    failed: IntCounter,
    last_failure_log: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted").finish_non_exhaustive()
    }
}

impl SpanExporter for Counted {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(n))
            });
        match &result {
            Ok(()) => self.exported.inc_by(n as u64),
            Err(e) => {
                self.failed.inc_by(n as u64);
                if let Ok(mut last) = self.last_failure_log.lock() {
                    if last.is_none_or(|t| t.elapsed() >= FAILURE_LOG_EVERY) {
                        *last = Some(Instant::now());
                        tracing::warn!(error = %e, spans = n, "OpenTelemetry export failed; spans lost (requests are unaffected)");
                    }
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Sends the exporter's requests with tollgate's `reqwest` on the server's
/// runtime: the batch processor's thread has no runtime of its own and
/// waits for the answer (`block_on`), which a task's handle allows.
#[derive(Debug)]
struct RuntimeClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

/// A collector's answer is a few bytes; more than this is not read.
const MAX_ANSWER: usize = 64 * 1024;

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for RuntimeClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let mut response = client.execute(request).await?;
            let mut answer = http::Response::builder().status(response.status());
            if let Some(headers) = answer.headers_mut() {
                *headers = std::mem::take(response.headers_mut());
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_ANSWER {
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, opentelemetry_http::HttpError>(answer.body(bytes::Bytes::from(body))?)
        });
        sent.await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(
            traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example/v1/traces"),
            "https://otel.example/v1/traces"
        );
    }

    #[test]
    fn a_traceparent_names_the_clients_span_and_garbage_names_none() {
        let cx = remote_parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let parent = cx.span().span_context().clone();
        assert_eq!(
            parent.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parent.span_id().to_string(), "00f067aa0ba902b7");
        assert!(parent.is_sampled() && parent.is_remote());
        assert!(!remote_parent("not a traceparent")
            .span()
            .span_context()
            .is_valid());
    }

    #[test]
    fn operations_and_providers_are_spelled_as_the_conventions_spell_them() {
        assert_eq!(operation("chat.completions"), "chat");
        assert_eq!(operation("messages"), "chat");
        assert_eq!(operation("completions"), "text_completion");
        assert_eq!(operation("embeddings"), "embeddings");
        assert_eq!(operation("images"), "images");
        assert_eq!(provider_name("azure"), "azure.ai.openai");
        assert_eq!(provider_name("bedrock"), "aws.bedrock");
        assert_eq!(provider_name("anthropic"), "anthropic");
    }
}
