//! A mock OpenAI upstream of our own, on a random loopback port. It speaks
//! OpenAI's JSON and SSE and does what each request's `x-mock-*` headers ask
//! (tollgate forwards unknown headers untouched):
//!
//! - `x-mock-status: N`          answer N with an OpenAI error body (3xx: with a `location`)
//! - `x-mock-delay-ms: N`        wait before the response headers
//! - `x-mock-usage: omit`        no usage anywhere (JSON or stream)
//! - `x-mock-prompt-tokens`, `x-mock-completion-tokens`, `x-mock-cached-tokens`:
//!   the usage to report (default 10 / 5 / 0)
//! - `x-mock-content: TEXT`      the reply text, UTF-8 (default "Hello from the mock")
//! - `x-mock-chunk-delay-ms: N`  pause between stream chunks
//! - `x-mock-repeat: N`          stream the content N times over (a long stream)
//! - `x-mock-cut-after: N`       break the connection after N content chunks
//! - `x-mock-gate: 1`            after the first chunk, wait for `open_gate()`
//! - `x-mock-garbage: 1`         200 with a body that is not JSON
//! - `x-mock-usage-raw: JSON`    the usage object, verbatim (any spelling, duplicate keys)
//! - `x-mock-model: NAME`        the model the response says served it
//! - `x-mock-service-tier: T`    `service_tier` in the body (streams: first chunk only)
//! - `x-mock-output-items: a,b`  Responses API output items of these types
//! - `x-mock-linger-ms: N`       keep an OpenAI stream open N ms after `[DONE]`
//! - `x-mock-finish-reason: R`   why the answer stopped (`length`: at its
//!   cap; Anthropic's `stop_reason`, e.g. `max_tokens`); streams put it on
//!   the last chunk
//! - Batches: `POST /v1/files` keeps a file; `POST /v1/batches` reads its
//!   lines and `GET /v1/batches/{id}` answers `in_progress`
//!   `x-mock-polls-pending` times (default 1), then `completed` with an
//!   output file of one line per request (each with the creation's
//!   `x-mock-prompt-tokens` / `-completion-tokens`; the last
//!   `x-mock-failed-lines` fail); `.../cancel` leaves
//!   `x-mock-completed-lines` (default 1) done; Anthropic's
//!   `/v1/messages/batches` (inline requests, `ended`, `/results`) alike
//! - `x-mock-polls-pending: N`   a Responses request with `background: true`
//!   answers `queued`; `GET /v1/responses/{id}` answers `in_progress` N
//!   times (default 1), then the finished response (`?stream=true`: its
//!   events, resumed after `starting_after`); `POST .../cancel` cancels it
//!
//! It also speaks Anthropic's Messages API (`/v1/messages`, JSON and SSE:
//! message_start, content_block_*, ping, message_delta, message_stop),
//! refusing requests without `x-api-key` (401) or `anthropic-version` (400)
//! as Anthropic does. There `x-mock-prompt-tokens` is `input_tokens` (the
//! uncached part), `x-mock-cached-tokens` the cache reads, and:
//! - `x-mock-cache-write-5m`, `x-mock-cache-write-1h`: cache writes
//! - `x-mock-web-searches: N`    `server_tool_use.web_search_requests`
//! - `x-mock-stream-error: 1`    an `error` event (overloaded) after the first delta
//!
//! And Google's Gemini API (`/v1beta/models/{model}:{op}`, also `/v1/`):
//! generateContent (JSON), streamGenerateContent (`?alt=sse`: one chunk per
//! word, each with the running `usageMetadata`; without it a JSON array),
//! countTokens, embedContent, batchEmbedContents; refusing a request
//! without `x-goog-api-key` (403, Google's error shape). There
//! `x-mock-prompt-tokens` is `promptTokenCount` (cached content included),
//! `x-mock-cached-tokens` is `cachedContentTokenCount`, and:
//! - `x-mock-thoughts-tokens`, `x-mock-tool-use-tokens`: `thoughtsTokenCount`,
//!   `toolUsePromptTokenCount`
//! - `x-mock-audio-prompt-tokens`: the AUDIO part of `promptTokensDetails`
//! - `x-mock-grounded: 1`        `groundingMetadata` on the candidate
//!
//! And OpenAI's image and audio endpoints (SPEC 12): images (JSON or
//! multipart; `n` images in `data`, and for `gpt-image-*` the size,
//! quality and token usage, output tokens being image tokens),
//! transcriptions and translations (multipart; `whisper-1` answers with
//! `usage.type = "duration"`, `verbose_json` with `duration`, `text`,
//! `srt` and `vtt` as text; the `gpt-4o-*` models with token usage whose
//! input is audio tokens), speech (audio bytes, or with
//! `stream_format = "sse"` audio deltas and a `speech.audio.done` event
//! with usage). There:
//! - `x-mock-audio-seconds: S`   the audio's duration (default 12.4)
//! - `x-mock-audio-bytes: N`     bytes of speech audio (default 4800)
//! - `x-mock-images: N`          images in `data` (default: `n`)
//!
//! And AWS Bedrock Runtime (`/model/{modelId}/{op}`): converse (JSON),
//! converse-stream (AWS event-stream frames: messageStart, one
//! contentBlockDelta per word, contentBlockStop, messageStop, metadata with
//! the usage), invoke and invoke-with-response-stream with Anthropic's
//! bodies (frames whose `chunk` is a base64 Anthropic event); refusing a
//! request without `authorization` (403, `x-amzn-errortype`). There
//! `x-mock-prompt-tokens` is `inputTokens` (uncached), `x-mock-cached-tokens`
//! `cacheReadInputTokens`, `x-mock-cache-write-5m` `cacheWriteInputTokens`,
//! and `x-mock-stream-error: 1` a `throttlingException` frame after the
//! first delta.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

pub struct MockState {
    pub requests: Mutex<Vec<Recorded>>,
    gate: tokio::sync::Semaphore,
    /// Answer every request with this status (0: behave normally).
    forced_status: std::sync::atomic::AtomicU16,
    /// Background responses by id: the finished object, and the polls
    /// still to answer `in_progress`.
    background: Mutex<std::collections::HashMap<String, (Value, u32)>>,
    /// Files by id (`POST /v1/files`, and batches' output files).
    files: Mutex<std::collections::HashMap<String, Bytes>>,
    /// Batches by id (OpenAI's and Anthropic's).
    batches: Mutex<std::collections::HashMap<String, MockBatch>>,
}

/// A batch of the mock: its requests' custom ids and models, the usage
/// every line reports, the polls still to answer in progress.
#[derive(Clone)]
pub struct MockBatch {
    pub anthropic: bool,
    pub endpoint: String,
    pub lines: Vec<(String, String)>,
    pub prompt: u64,
    pub completion: u64,
    /// The last `failed` lines fail (OpenAI: status 400; Anthropic: errored).
    pub failed: usize,
    pub polls: u32,
    /// Cancelled: only the first `completed` lines ran.
    pub cancelled: Option<usize>,
}

impl Default for MockState {
    fn default() -> Self {
        MockState {
            requests: Mutex::new(Vec::new()),
            gate: tokio::sync::Semaphore::new(0),
            forced_status: std::sync::atomic::AtomicU16::new(0),
            background: Mutex::new(std::collections::HashMap::new()),
            files: Mutex::new(std::collections::HashMap::new()),
            batches: Mutex::new(std::collections::HashMap::new()),
        }
    }
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
}

impl MockUpstream {
    pub async fn start() -> MockUpstream {
        let state = Arc::new(MockState::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/responses", post(responses))
            .route("/v1/responses/{id}", get(background_poll))
            .route("/v1/responses/{id}/cancel", post(background_cancel))
            .route("/v1/realtime", get(realtime))
            .route("/v1/files", post(file_upload))
            .route("/v1/files/{id}/content", get(file_content))
            .route("/v1/batches", post(batch_create))
            .route("/v1/batches/{id}", get(batch_poll))
            .route("/v1/batches/{id}/cancel", post(batch_cancel))
            .route("/v1/messages/batches", post(message_batch_create))
            .route("/v1/messages/batches/{id}", get(message_batch_poll))
            .route(
                "/v1/messages/batches/{id}/results",
                get(message_batch_results),
            )
            .route("/v1/models", get(models))
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .route("/v1beta/models/{*rest}", post(gemini))
            .route("/v1/models/{*rest}", any(gemini_or_echo))
            .route("/model/{model}/{op}", post(bedrock))
            .route("/v1/images/{op}", post(images))
            .route("/v1/audio/transcriptions", post(transcription))
            .route("/v1/audio/translations", post(transcription))
            .route("/v1/audio/speech", post(speech))
            .route("/v1/{*rest}", any(echo))
            .route(
                "/openai/deployments/{deployment}/chat/completions",
                post(azure_chat),
            )
            .route(
                "/openai/deployments/{deployment}/embeddings",
                post(azure_embeddings),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("mock bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockUpstream { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().map(|r| r.len()).unwrap_or(0)
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .unwrap_or_else(|| panic!("the mock received no request"))
    }

    /// Answers every request with `status` from now on (0: normally), as
    /// an upstream that is down or rate-limited for everyone.
    pub fn force_status(&self, status: u16) {
        self.state
            .forced_status
            .store(status, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets every gated stream go on past its first chunk.
    pub fn open_gate(&self) {
        self.state.gate.add_permits(1_000);
    }
}

struct Behaviour {
    status: Option<u16>,
    delay: Duration,
    omit_usage: bool,
    prompt: u64,
    completion: u64,
    cached: u64,
    content: String,
    chunk_delay: Duration,
    cut_after: Option<usize>,
    gate: bool,
    garbage: bool,
    repeat: usize,
    usage_raw: Option<String>,
    model: Option<String>,
    service_tier: Option<String>,
    output_items: Vec<String>,
    cache_write_5m: u64,
    cache_write_1h: u64,
    web_searches: u64,
    stream_error: bool,
    finish_reason: Option<String>,
    linger: Duration,
}

/// Stands in for the raw usage text until the body is rendered.
const RAW_USAGE: &str = "__RAW_USAGE__";

impl Behaviour {
    fn from(headers: &HeaderMap) -> Behaviour {
        // UTF-8 allowed (`x-mock-content` in any script).
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
                .map(str::to_string)
        };
        let num =
            |name: &str, default: u64| get(name).and_then(|v| v.parse().ok()).unwrap_or(default);
        Behaviour {
            status: get("x-mock-status").and_then(|v| v.parse().ok()),
            delay: Duration::from_millis(num("x-mock-delay-ms", 0)),
            omit_usage: get("x-mock-usage").as_deref() == Some("omit"),
            prompt: num("x-mock-prompt-tokens", 10),
            completion: num("x-mock-completion-tokens", 5),
            cached: num("x-mock-cached-tokens", 0),
            content: get("x-mock-content").unwrap_or_else(|| "Hello from the mock".into()),
            chunk_delay: Duration::from_millis(num("x-mock-chunk-delay-ms", 0)),
            cut_after: get("x-mock-cut-after").and_then(|v| v.parse().ok()),
            gate: get("x-mock-gate").is_some(),
            garbage: get("x-mock-garbage").is_some(),
            repeat: num("x-mock-repeat", 1) as usize,
            usage_raw: get("x-mock-usage-raw"),
            model: get("x-mock-model"),
            service_tier: get("x-mock-service-tier"),
            output_items: get("x-mock-output-items")
                .map(|v| v.split(',').map(str::to_string).collect())
                .unwrap_or_default(),
            cache_write_5m: num("x-mock-cache-write-5m", 0),
            cache_write_1h: num("x-mock-cache-write-1h", 0),
            web_searches: num("x-mock-web-searches", 0),
            stream_error: get("x-mock-stream-error").is_some(),
            finish_reason: get("x-mock-finish-reason"),
            linger: Duration::from_millis(num("x-mock-linger-ms", 0)),
        }
    }

    /// Anthropic's usage object; `output` tokens so far.
    fn anthropic_usage(&self, output: u64) -> Value {
        if self.usage_raw.is_some() {
            return Value::String(RAW_USAGE.into());
        }
        let mut usage = json!({
            "input_tokens": self.prompt,
            "cache_creation_input_tokens": self.cache_write_5m + self.cache_write_1h,
            "cache_read_input_tokens": self.cached,
            "cache_creation": {"ephemeral_5m_input_tokens": self.cache_write_5m,
                               "ephemeral_1h_input_tokens": self.cache_write_1h},
            "output_tokens": output,
            "service_tier": "standard",
        });
        if self.web_searches > 0 {
            usage["server_tool_use"] = json!({"web_search_requests": self.web_searches});
        }
        usage
    }

    /// A body or chunk as text, the raw usage spliced in.
    fn render(&self, value: &Value) -> String {
        let text = value.to_string();
        match &self.usage_raw {
            Some(raw) => text.replace(&format!("\"{RAW_USAGE}\""), raw),
            None => text,
        }
    }

    fn usage(&self) -> Value {
        if self.usage_raw.is_some() {
            return Value::String(RAW_USAGE.into());
        }
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

async fn record(state: &MockState, req: Request) -> (Recorded, Behaviour) {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let rec = Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers.clone(),
        body,
    };
    if let Ok(mut r) = state.requests.lock() {
        r.push(rec.clone());
    }
    let mut behaviour = Behaviour::from(&parts.headers);
    match state
        .forced_status
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        0 => {}
        forced => behaviour.status = Some(forced),
    }
    tokio::time::sleep(behaviour.delay).await;
    (rec, behaviour)
}

fn early_answer(b: &Behaviour) -> Option<Response> {
    if let Some(status) = b.status {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({"error": {"message": format!("mock failure {status}"), "type": "server_error", "code": "mock", "param": null}});
        let mut response = (
            code,
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response();
        if code.is_redirection() {
            response.headers_mut().insert(
                "location",
                http::HeaderValue::from_static("/v1/chat/completions?redirected=1"),
            );
        }
        return Some(response);
    }
    if b.garbage {
        return Some(
            (
                [("content-type", "application/json")],
                "<html>definitely not json",
            )
                .into_response(),
        );
    }
    None
}

/// Azure OpenAI's front door: an `api-key` header and an `api-version`
/// query parameter, or Azure's 401 / 404 (before anything is recorded, as
/// a request Azure refuses never reaches a deployment).
fn azure_refusal(req: &Request) -> Option<Response> {
    if req.headers().get("api-key").is_none() {
        let body = json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}});
        return Some(
            (
                StatusCode::UNAUTHORIZED,
                [("content-type", "application/json")],
                body.to_string(),
            )
                .into_response(),
        );
    }
    let versioned = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p.starts_with("api-version=")));
    if !versioned {
        let body = json!({"error": {"code": "404", "message": "Resource not found"}});
        return Some(
            (
                StatusCode::NOT_FOUND,
                [("content-type", "application/json")],
                body.to_string(),
            )
                .into_response(),
        );
    }
    None
}

/// Azure's chat: the OpenAI body, and the model of the deployment in
/// `x-mock-model` (no `model` at all without it).
async fn azure_chat(state: State<Arc<MockState>>, req: Request) -> Response {
    if let Some(r) = azure_refusal(&req) {
        return r;
    }
    chat(state, req).await
}

async fn azure_embeddings(state: State<Arc<MockState>>, req: Request) -> Response {
    if let Some(r) = azure_refusal(&req) {
        return r;
    }
    embeddings(state, req).await
}

fn json_response(value: Value) -> Response {
    ([("content-type", "application/json")], value.to_string()).into_response()
}

async fn chat(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let body = rec.json();
    let n = body["n"].as_u64().unwrap_or(1) as usize;
    if body["stream"] == json!(true) {
        let wants_usage = body["stream_options"]["include_usage"] == json!(true) && !b.omit_usage;
        let model = b.model.clone().unwrap_or_else(|| "mock".into());
        return stream(state, b, n, wants_usage, move |i, piece| {
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": i, "delta": {"content": piece}, "finish_reason": null}]})
        });
    }
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            json!({"index": i, "message": {"role": "assistant", "content": b.content},
                        "finish_reason": b.finish_reason.as_deref().unwrap_or("stop")})
        })
        .collect();
    let model = b.model.clone().map_or(body["model"].clone(), Value::String);
    let mut out = json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": model, "choices": choices});
    if let Some(t) = &b.service_tier {
        out["service_tier"] = json!(t);
    }
    if !b.omit_usage {
        out["usage"] = b.usage();
    }
    rendered(b.render(&out))
}

fn rendered(text: String) -> Response {
    ([("content-type", "application/json")], text).into_response()
}

async fn completions(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let body = rec.json();
    let n = body["n"].as_u64().unwrap_or(1) as usize;
    if body["stream"] == json!(true) {
        let wants_usage = body["stream_options"]["include_usage"] == json!(true) && !b.omit_usage;
        return stream(
            state,
            b,
            n,
            wants_usage,
            |i, piece| json!({"id": "cmpl-mock", "object": "text_completion", "choices": [{"index": i, "text": piece}]}),
        );
    }
    let choices: Vec<Value> = (0..n)
        .map(|i| json!({"index": i, "text": b.content}))
        .collect();
    let mut out = json!({"id": "cmpl-mock", "object": "text_completion", "choices": choices});
    if !b.omit_usage {
        out["usage"] = b.usage();
    }
    json_response(out)
}

async fn embeddings(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (_rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let mut out = json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}], "model": "mock"});
    if !b.omit_usage {
        out["usage"] = json!({"prompt_tokens": b.prompt, "total_tokens": b.prompt});
    }
    json_response(out)
}

async fn responses(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let usage = if b.usage_raw.is_some() {
        b.usage()
    } else {
        json!({"input_tokens": b.prompt, "output_tokens": b.completion, "total_tokens": b.prompt + b.completion,
               "input_tokens_details": {"cached_tokens": b.cached}, "output_tokens_details": {"reasoning_tokens": 0}})
    };
    let model = b
        .model
        .clone()
        .map_or(rec.json()["model"].clone(), Value::String);
    let mut output: Vec<Value> = b
        .output_items
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"type": t, "id": format!("item_{i}"), "status": "completed"}))
        .collect();
    output.push(json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": b.content}]}));
    let mut response = json!({"id": "resp-mock", "object": "response", "status": "completed", "model": model, "output": output});
    if let Some(t) = &b.service_tier {
        response["service_tier"] = json!(t);
    }
    if !b.omit_usage {
        response["usage"] = usage;
    }
    if rec.json()["background"] == json!(true) {
        return background_created(&state, &rec, response);
    }
    if rec.json()["stream"] == json!(true) {
        let mut events = vec![format!(
            "event: response.created\ndata: {}\n\n",
            json!({"type": "response.created", "response": {"id": "resp-mock", "model": response["model"], "status": "in_progress"}})
        )];
        for (i, t) in b.output_items.iter().enumerate() {
            events.push(format!(
                "event: response.output_item.done\ndata: {}\n\n",
                json!({"type": "response.output_item.done", "output_index": i, "item": {"type": t, "id": format!("item_{i}"), "status": "completed"}})
            ));
        }
        events.push(format!(
            "event: response.output_text.delta\ndata: {}\n\n",
            json!({"type": "response.output_text.delta", "delta": b.content})
        ));
        let completed = json!({"type": "response.completed", "response": response});
        events.push(format!(
            "event: response.completed\ndata: {}\n\n",
            b.render(&completed)
        ));
        let stream = tokio_stream::iter(
            events
                .into_iter()
                .map(|e| Ok::<_, Infallible>(Bytes::from(e))),
        );
        return (
            [("content-type", "text/event-stream")],
            Body::from_stream(stream),
        )
            .into_response();
    }
    rendered(b.render(&response))
}

/// A background response: answered `queued` (or, streamed, its
/// `response.created`), finished after `x-mock-polls-pending` polls
/// (default 1) answered `in_progress`. `x-mock-cut-after` cuts the
/// creation stream after that many events.
fn background_created(state: &MockState, rec: &Recorded, mut finished: Value) -> Response {
    let id = {
        let Ok(mut map) = state.background.lock() else {
            return mock_error(500, "mock state poisoned");
        };
        let id = format!("resp_bg_{}", map.len() + 1);
        finished["id"] = json!(id);
        finished["background"] = json!(true);
        let polls = mock_header(rec, "x-mock-polls-pending")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        map.insert(id.clone(), (finished.clone(), polls));
        id
    };
    let queued = json!({"id": id, "object": "response", "status": "queued", "background": true,
                        "model": finished["model"], "output": [], "usage": null});
    if rec.json()["stream"] != json!(true) {
        return json_response(queued);
    }
    let cut = mock_header(rec, "x-mock-cut-after").and_then(|v| v.parse::<usize>().ok());
    let events = background_events(&id, &finished);
    let n = cut.unwrap_or(events.len()).min(events.len());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::spawn(async move {
        for e in events.into_iter().take(n) {
            if tx.send(Ok(Bytes::from(e))).await.is_err() {
                return;
            }
        }
        if cut.is_some() {
            // After the events are on the wire.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Err(std::io::Error::other("mock cut"))).await;
        }
    });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response()
}

/// A background response's events, each with its `sequence_number`.
fn background_events(id: &str, finished: &Value) -> Vec<String> {
    let text = finished["output"]
        .as_array()
        .and_then(|o| o.last())
        .and_then(|m| m["content"][0]["text"].as_str())
        .unwrap_or("")
        .to_string();
    let created = json!({"type": "response.created", "sequence_number": 0,
        "response": {"id": id, "model": finished["model"], "status": "queued", "background": true}});
    let delta = json!({"type": "response.output_text.delta", "sequence_number": 1, "delta": text});
    let done = json!({"type": "response.completed", "sequence_number": 2, "response": finished});
    [created, delta, done]
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or("")))
        .collect()
}

fn mock_error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}}))).into_response()
}

/// One poll of what `id` names: it as it was, with one pending poll fewer
/// left (`None`: no such id).
fn poll_once<T: Clone>(
    map: &Mutex<std::collections::HashMap<String, T>>,
    id: &str,
    polls: impl Fn(&mut T) -> &mut u32,
) -> Option<T> {
    let mut map = map.lock().ok()?;
    let entry = map.get_mut(id)?;
    let seen = entry.clone();
    let left = polls(entry);
    *left = left.saturating_sub(1);
    Some(seen)
}

/// `GET /v1/responses/{id}`: `in_progress` while polls are pending, then
/// the finished object; `?stream=true` streams its events (resumed).
async fn background_poll(
    State(state): State<Arc<MockState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let Some((finished, pending)) = poll_once(&state.background, &id, |e| &mut e.1) else {
        return mock_error(404, &format!("Response with id '{id}' not found."));
    };
    if rec.path.contains("stream=true") {
        let events = background_events(&id, &finished);
        let skip = rec
            .path
            .split("starting_after=")
            .nth(1)
            .and_then(|v| v.split('&').next()?.parse::<usize>().ok())
            .map_or(0, |n| n + 1);
        let items: Vec<Result<Bytes, std::io::Error>> = events
            .into_iter()
            .skip(skip)
            .map(|e| Ok(Bytes::from(e)))
            .collect();
        return (
            [("content-type", "text/event-stream")],
            Body::from_stream(tokio_stream::iter(items)),
        )
            .into_response();
    }
    if pending > 0 {
        return json_response(
            json!({"id": id, "object": "response", "status": "in_progress",
            "background": true, "model": finished["model"], "output": [], "usage": null}),
        );
    }
    json_response(finished)
}

/// `POST /v1/responses/{id}/cancel`: cancelled, with the usage so far
/// (`x-mock-completion-tokens` on the cancel: the output generated).
async fn background_cancel(
    State(state): State<Arc<MockState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let Ok(mut map) = state.background.lock() else {
        return mock_error(500, "mock state poisoned");
    };
    let Some(entry) = map.get_mut(&id) else {
        return mock_error(404, &format!("Response with id '{id}' not found."));
    };
    if entry.1 > 0 {
        entry.0["status"] = json!("cancelled");
        if let Some(done) =
            mock_header(&rec, "x-mock-completion-tokens").and_then(|v| v.parse::<u64>().ok())
        {
            let input = entry.0["usage"]["input_tokens"].as_u64().unwrap_or(0);
            entry.0["usage"]["output_tokens"] = json!(done);
            entry.0["usage"]["total_tokens"] = json!(input + done);
        }
        entry.1 = 0;
    }
    json_response(entry.0.clone())
}

/// The usage every mock Realtime `response.done` reports: 1,000 input
/// tokens (200 text, 800 audio; 300 of them cached: 100 text, 200 audio)
/// and 500 output (100 text, 400 audio).
pub fn realtime_usage() -> Value {
    json!({"total_tokens": 1500, "input_tokens": 1000, "output_tokens": 500,
           "input_token_details": {"cached_tokens": 300, "text_tokens": 200, "audio_tokens": 800,
                                   "cached_tokens_details": {"text_tokens": 100, "audio_tokens": 200}},
           "output_token_details": {"text_tokens": 100, "audio_tokens": 400}})
}

/// `GET /v1/realtime` (WebSocket): `session.created`, then for each
/// `response.create` a `response.created` and a `response.done` with
/// `realtime_usage()`; every other event is echoed back as
/// `mock.echo` (so a test can see what went up).
async fn realtime(
    State(state): State<Arc<MockState>>,
    ws: axum::extract::ws::WebSocketUpgrade,
    req: Request,
) -> Response {
    let (rec, _b) = record(&state, req).await;
    let model = rec
        .path
        .split("model=")
        .nth(1)
        .map(|m| m.split('&').next().unwrap_or("").to_string())
        .unwrap_or_default();
    ws.on_upgrade(move |mut socket| async move {
        use axum::extract::ws::Message;
        let created = json!({"type": "session.created", "event_id": "ev_0",
                             "session": {"id": "sess_mock_1", "object": "realtime.session", "model": model}});
        if socket.send(Message::Text(created.to_string().into())).await.is_err() {
            return;
        }
        let mut responses = 0;
        while let Some(Ok(message)) = socket.recv().await {
            let Message::Text(text) = message else { continue };
            let event: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
            let replies = if event["type"] == "response.create" {
                responses += 1;
                let id = format!("resp_rt_{responses}");
                vec![
                    json!({"type": "response.created", "response": {"id": id, "object": "realtime.response", "status": "in_progress"}}),
                    json!({"type": "response.done", "response": {"id": id, "object": "realtime.response",
                           "status": "completed", "output": [], "usage": realtime_usage()}}),
                ]
            } else {
                vec![json!({"type": "mock.echo", "of": event["type"]})]
            };
            for reply in replies {
                if socket.send(Message::Text(reply.to_string().into())).await.is_err() {
                    return;
                }
            }
        }
    })
}

/// `POST /v1/files` (multipart: `purpose`, `file`): kept by id.
async fn file_upload(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let text = String::from_utf8_lossy(&rec.body).into_owned();
    let content = text
        .find("filename=")
        .and_then(|at| {
            let rest = &text[at..];
            let start = rest.find("\r\n\r\n")? + 4;
            let end = rest[start..].find("\r\n--")?;
            Some(rest[start..start + end].to_string())
        })
        .unwrap_or_default();
    let purpose = form_field(&rec, "purpose").unwrap_or_default();
    let Ok(mut files) = state.files.lock() else {
        return mock_error(500, "mock state poisoned");
    };
    let id = format!("file-{}", files.len() + 1);
    let bytes = content.len();
    files.insert(id.clone(), Bytes::from(content));
    json_response(
        json!({"id": id, "object": "file", "bytes": bytes, "created_at": 1_700_000_000,
                         "filename": "batch.jsonl", "purpose": purpose, "status": "processed"}),
    )
}

async fn file_content(
    State(state): State<Arc<MockState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let (_rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    match state.files.lock().ok().and_then(|f| f.get(&id).cloned()) {
        Some(bytes) => ([("content-type", "application/octet-stream")], bytes).into_response(),
        None => mock_error(404, &format!("No such File object: {id}")),
    }
}

fn batch_of(
    b: &Behaviour,
    rec: &Recorded,
    anthropic: bool,
    endpoint: String,
    lines: Vec<(String, String)>,
) -> MockBatch {
    let num = |name: &str, default: u64| {
        mock_header(rec, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    MockBatch {
        anthropic,
        endpoint,
        lines,
        prompt: b.prompt,
        completion: b.completion,
        failed: num("x-mock-failed-lines", 0) as usize,
        polls: num("x-mock-polls-pending", 1) as u32,
        cancelled: None,
    }
}

/// `POST /v1/batches`: its lines read from the input file.
async fn batch_create(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let body = rec.json();
    let input = body["input_file_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let Some(file) = state.files.lock().ok().and_then(|f| f.get(&input).cloned()) else {
        return mock_error(400, &format!("No such File object: {input}"));
    };
    let lines: Vec<(String, String)> = String::from_utf8_lossy(&file)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            (
                v["custom_id"].as_str().unwrap_or_default().to_string(),
                v["body"]["model"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let endpoint = body["endpoint"]
        .as_str()
        .unwrap_or("/v1/chat/completions")
        .to_string();
    let batch = batch_of(&b, &rec, false, endpoint, lines);
    let Ok(mut batches) = state.batches.lock() else {
        return mock_error(500, "mock state poisoned");
    };
    let id = format!("batch_{}", batches.len() + 1);
    let out = openai_batch(&id, &input, &batch, "validating", None);
    batches.insert(id, batch);
    json_response(out)
}

fn openai_batch(
    id: &str,
    input: &str,
    batch: &MockBatch,
    status: &str,
    output: Option<&str>,
) -> Value {
    let n = batch.lines.len();
    json!({"id": id, "object": "batch", "endpoint": batch.endpoint, "input_file_id": input,
           "completion_window": "24h", "status": status, "output_file_id": output,
           "error_file_id": null, "created_at": 1_700_000_000,
           "request_counts": {"total": n, "completed": n - batch.failed.min(n), "failed": batch.failed.min(n)}})
}

/// The result lines of a batch that ran (the first `completed` when cancelled).
fn batch_results(batch: &MockBatch) -> String {
    let ran = batch
        .cancelled
        .unwrap_or(batch.lines.len())
        .min(batch.lines.len());
    let failing_from = batch.lines.len().saturating_sub(batch.failed);
    let mut out = String::new();
    for (i, (custom_id, model)) in batch.lines.iter().enumerate().take(ran) {
        let failed = i >= failing_from;
        let line = if batch.anthropic {
            if failed {
                json!({"custom_id": custom_id, "result": {"type": "errored", "error": {"type": "invalid_request_error", "message": "bad"}}})
            } else {
                json!({"custom_id": custom_id, "result": {"type": "succeeded", "message": {
                    "id": format!("msg_{i}"), "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": "Hello from the mock"}], "stop_reason": "end_turn",
                    "usage": {"input_tokens": batch.prompt, "output_tokens": batch.completion}}}})
            }
        } else if failed {
            json!({"id": format!("batch_req_{i}"), "custom_id": custom_id, "response": {"status_code": 400,
                   "request_id": format!("req_{i}"), "body": {"error": {"message": "bad", "type": "invalid_request_error"}}}, "error": null})
        } else {
            let usage = if batch.endpoint.contains("embeddings") {
                json!({"prompt_tokens": batch.prompt, "total_tokens": batch.prompt})
            } else {
                json!({"prompt_tokens": batch.prompt, "completion_tokens": batch.completion, "total_tokens": batch.prompt + batch.completion})
            };
            json!({"id": format!("batch_req_{i}"), "custom_id": custom_id, "response": {"status_code": 200,
                   "request_id": format!("req_{i}"), "body": {"id": format!("chatcmpl-{i}"), "object": "chat.completion",
                   "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the mock"}, "finish_reason": "stop"}],
                   "usage": usage}}, "error": null})
        };
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// `GET /v1/batches/{id}`: in progress while polls are pending, then
/// completed (or cancelled) with its output file.
async fn batch_poll(
    State(state): State<Arc<MockState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let (_rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let Some(batch) = poll_once(&state.batches, &id, |b| &mut b.polls) else {
        return mock_error(404, &format!("No batch found with id '{id}'."));
    };
    if batch.polls > 0 && batch.cancelled.is_none() {
        return json_response(openai_batch(&id, "file-in", &batch, "in_progress", None));
    }
    let output = format!("file-out-{id}");
    if let Ok(mut files) = state.files.lock() {
        files.insert(output.clone(), Bytes::from(batch_results(&batch)));
    }
    let status = if batch.cancelled.is_some() {
        "cancelled"
    } else {
        "completed"
    };
    json_response(openai_batch(&id, "file-in", &batch, status, Some(&output)))
}

/// `POST /v1/batches/{id}/cancel`: `x-mock-completed-lines` ran (default 1).
async fn batch_cancel(
    State(state): State<Arc<MockState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let completed = mock_header(&rec, "x-mock-completed-lines")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let Some(batch) = state.batches.lock().ok().and_then(|mut m| {
        let batch = m.get_mut(&id)?;
        batch.cancelled = Some(completed);
        Some(batch.clone())
    }) else {
        return mock_error(404, &format!("No batch found with id '{id}'."));
    };
    json_response(openai_batch(&id, "file-in", &batch, "cancelling", None))
}

fn message_batch(id: &str, batch: &MockBatch, ended: bool, base: &str) -> Value {
    let n = batch.lines.len();
    json!({"id": id, "type": "message_batch", "processing_status": if ended { "ended" } else { "in_progress" },
           "request_counts": {"processing": if ended { 0 } else { n }, "succeeded": if ended { n - batch.failed.min(n) } else { 0 },
                              "errored": if ended { batch.failed.min(n) } else { 0 }, "canceled": 0, "expired": 0},
           "results_url": if ended { json!(format!("{base}/v1/messages/batches/{id}/results")) } else { Value::Null },
           "created_at": "2026-12-07T10:00:00Z", "expires_at": "2026-12-08T10:00:00Z"})
}

/// `POST /v1/messages/batches`: the requests inline.
async fn message_batch_create(State(state): State<Arc<MockState>>, req: Request) -> Response {
    if let Some(r) = anthropic_refusal(&req) {
        return r;
    }
    let (rec, b) = record(&state, req).await;
    if let Some(status) = b.status {
        return anthropic_error(status);
    }
    let lines: Vec<(String, String)> = rec.json()["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["custom_id"].as_str().unwrap_or_default().to_string(),
                r["params"]["model"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    let batch = batch_of(&b, &rec, true, "/v1/messages".into(), lines);
    let Ok(mut batches) = state.batches.lock() else {
        return mock_error(500, "mock state poisoned");
    };
    let id = format!("msgbatch_{}", batches.len() + 1);
    let out = message_batch(&id, &batch, false, "");
    batches.insert(id, batch);
    json_response(out)
}

async fn message_batch_poll(
    State(state): State<Arc<MockState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Response {
    if let Some(r) = anthropic_refusal(&req) {
        return r;
    }
    let (_rec, _b) = record(&state, req).await;
    let Some(batch) = poll_once(&state.batches, &id, |b| &mut b.polls) else {
        return anthropic_error(404);
    };
    json_response(message_batch(
        &id,
        &batch,
        batch.polls == 0,
        "https://api.anthropic.com",
    ))
}

async fn message_batch_results(
    State(state): State<Arc<MockState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Response {
    if let Some(r) = anthropic_refusal(&req) {
        return r;
    }
    let (_rec, _b) = record(&state, req).await;
    match state.batches.lock().ok().and_then(|m| m.get(&id).cloned()) {
        Some(batch) if batch.polls == 0 => (
            [("content-type", "application/binary")],
            batch_results(&batch),
        )
            .into_response(),
        _ => anthropic_error(404),
    }
}

async fn models(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (_rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    json_response(
        json!({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "owned_by": "mock"}]}),
    )
}

async fn echo(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    json_response(json!({"method": rec.method, "path": rec.path, "body_len": rec.body.len()}))
}

/// A text field of a multipart body (the mock's own scan, enough for the
/// SDKs' forms), or a JSON body's string or number field.
fn form_field(rec: &Recorded, name: &str) -> Option<String> {
    if let Some(v) = rec.json().get(name) {
        return Some(v.as_str().map_or_else(|| v.to_string(), str::to_string));
    }
    let text = String::from_utf8_lossy(&rec.body);
    let marker = format!("name=\"{name}\"");
    let at = text.find(&marker)?;
    let rest = &text[at + marker.len()..];
    let start = rest.find("\r\n\r\n")? + 4;
    let end = rest[start..].find("\r\n")?;
    Some(rest[start..start + end].to_string())
}

fn mock_header(rec: &Recorded, name: &str) -> Option<String> {
    rec.header(name)
}

async fn images(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let model = form_field(&rec, "model").unwrap_or_else(|| "dall-e-2".into());
    let n: usize = mock_header(&rec, "x-mock-images")
        .or_else(|| form_field(&rec, "n"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let data: Vec<Value> = (0..n).map(|_| json!({"b64_json": "aGVsbG8="})).collect();
    let mut out = json!({"created": 1, "data": data});
    if model.starts_with("gpt-image") && form_field(&rec, "stream").as_deref() == Some("true") {
        // Partial images, then `image_generation.completed` with the usage.
        let partials: usize = form_field(&rec, "partial_images")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = String::new();
        for i in 0..partials {
            let e = json!({"type": "image_generation.partial_image", "b64_json": "aGk=", "partial_image_index": i});
            body.push_str(&format!(
                "event: image_generation.partial_image\ndata: {e}\n\n"
            ));
        }
        let mut done = json!({"type": "image_generation.completed", "b64_json": "aGVsbG8=",
            "size": "1024x1024", "quality": "high", "output_format": "png"});
        if !b.omit_usage {
            done["usage"] = json!({"total_tokens": b.prompt + b.completion, "input_tokens": b.prompt,
                "output_tokens": b.completion, "input_tokens_details": {"text_tokens": b.prompt, "image_tokens": 0}});
        }
        body.push_str(&format!(
            "event: image_generation.completed\ndata: {done}\n\n"
        ));
        return ([("content-type", "text/event-stream")], body).into_response();
    }
    if model.starts_with("gpt-image") {
        out["size"] = json!(form_field(&rec, "size").unwrap_or_else(|| "1024x1024".into()));
        out["quality"] = json!(form_field(&rec, "quality").unwrap_or_else(|| "medium".into()));
        out["output_format"] = json!("png");
        if !b.omit_usage {
            out["usage"] = json!({
                "total_tokens": b.prompt + b.completion,
                "input_tokens": b.prompt,
                "output_tokens": b.completion,
                "input_tokens_details": {"text_tokens": b.prompt - b.cached.min(b.prompt), "image_tokens": b.cached.min(b.prompt)},
            });
        }
    } else {
        out["data"] = json!((0..n)
            .map(|_| json!({"url": "https://mock/img.png", "revised_prompt": "a cat"}))
            .collect::<Vec<_>>());
    }
    rendered(b.render(&out))
}

async fn transcription(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let model = form_field(&rec, "model").unwrap_or_default();
    let format = form_field(&rec, "response_format").unwrap_or_else(|| "json".into());
    let seconds: f64 = mock_header(&rec, "x-mock-audio-seconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(12.4);
    let text = b.content.clone();
    let plain =
        |body: String| ([("content-type", "text/plain; charset=utf-8")], body).into_response();
    match format.as_str() {
        "text" => return plain(text),
        "srt" => {
            return plain(
                format!("1\n00:00:00,000 --> 00:00:{:06.3}\n{text}\n\n", seconds).replace('.', ","),
            )
        }
        "vtt" => {
            return plain(format!(
                "WEBVTT\n\n00:00:00.000 --> 00:00:{seconds:06.3}\n{text}\n"
            ))
        }
        _ => {}
    }
    let mut out = json!({"text": text});
    if format == "verbose_json" {
        out = json!({"task": "transcribe", "language": "english", "duration": seconds, "text": text, "segments": []});
    }
    if !b.omit_usage {
        if model.starts_with("gpt-4o") {
            out["usage"] = json!({"type": "tokens", "input_tokens": b.prompt,
                "input_token_details": {"text_tokens": 0, "audio_tokens": b.prompt},
                "output_tokens": b.completion, "total_tokens": b.prompt + b.completion});
        } else if format == "json" {
            out["usage"] = json!({"type": "duration", "seconds": seconds.ceil() as u64});
        }
    }
    rendered(b.render(&out))
}

async fn speech(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (rec, b) = record(&state, req).await;
    if let Some(r) = early_answer(&b) {
        return r;
    }
    let bytes: usize = mock_header(&rec, "x-mock-audio-bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(4800);
    if form_field(&rec, "stream_format").as_deref() == Some("sse") {
        let delta = json!({"type": "speech.audio.delta", "audio": "AAAA"});
        let mut done = json!({"type": "speech.audio.done"});
        if !b.omit_usage {
            done["usage"] = json!({"input_tokens": b.prompt, "output_tokens": b.completion, "total_tokens": b.prompt + b.completion});
        }
        let body = format!("data: {delta}\n\ndata: {delta}\n\ndata: {done}\n\n");
        return ([("content-type", "text/event-stream")], body).into_response();
    }
    ([("content-type", "audio/mpeg")], vec![0x49u8; bytes]).into_response()
}

/// Streams the content word by word (one SSE event per word and choice),
/// then the usage-only chunk when asked for, then `[DONE]`.
fn stream(
    state: Arc<MockState>,
    b: Behaviour,
    n: usize,
    wants_usage: bool,
    chunk: impl Fn(usize, &str) -> Value + Send + 'static,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let once: Vec<String> = b.content.split_inclusive(' ').map(str::to_string).collect();
        let words: Vec<String> = std::iter::repeat_n(once, b.repeat.max(1))
            .flatten()
            .collect();
        let mut sent = 0usize;
        for (w, word) in words.iter().enumerate() {
            for i in 0..n {
                if b.cut_after == Some(sent) {
                    let _ = tx.send(Err(std::io::Error::other("mock cut"))).await;
                    return;
                }
                let mut value = chunk(i, word);
                if w + 1 == words.len() {
                    if let Some(reason) = &b.finish_reason {
                        value["choices"][0]["finish_reason"] = json!(reason);
                    }
                }
                if sent == 0 {
                    if let Some(t) = &b.service_tier {
                        value["service_tier"] = json!(t);
                    }
                }
                let event = format!("data: {}\n\n", value);
                if tx.send(Ok(Bytes::from(event))).await.is_err() {
                    return;
                }
                sent += 1;
            }
            if w == 0 && b.gate {
                match state.gate.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return,
                }
            }
            // Even a zero delay yields, so each chunk is flushed on its own
            // (a cut right after a chunk must not swallow it).
            tokio::time::sleep(b.chunk_delay).await;
        }
        if wants_usage {
            let usage = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "choices": [], "usage": b.usage()});
            let _ = tx
                .send(Ok(Bytes::from(format!("data: {}\n\n", b.render(&usage)))))
                .await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        // A server slow to close after its last event: the stream stays
        // open (the client may leave first).
        tokio::time::sleep(b.linger).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([("content-type", "text/event-stream")], body).into_response()
}

/// Anthropic's front door: `x-api-key` and `anthropic-version`, else its
/// 401 / 400 (nothing recorded, as for Azure).
fn anthropic_refusal(req: &Request) -> Option<Response> {
    let refuse = |status: StatusCode, kind: &str, message: &str| {
        let body = json!({"type": "error", "error": {"type": kind, "message": message}});
        (
            status,
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response()
    };
    if req.headers().get("x-api-key").is_none() {
        return Some(refuse(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "x-api-key header is required",
        ));
    }
    if req.headers().get("anthropic-version").is_none() {
        return Some(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        ));
    }
    None
}

fn anthropic_error(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = match status {
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        400 => "invalid_request_error",
        _ => "api_error",
    };
    let body = json!({"type": "error", "error": {"type": kind, "message": format!("mock failure {status}")}});
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn messages(State(state): State<Arc<MockState>>, req: Request) -> Response {
    if let Some(r) = anthropic_refusal(&req) {
        return r;
    }
    let (rec, b) = record(&state, req).await;
    if let Some(status) = b.status {
        return anthropic_error(status);
    }
    let body = rec.json();
    let model = b.model.clone().map_or(body["model"].clone(), Value::String);
    if body["stream"] == json!(true) {
        return anthropic_stream(state, b, model);
    }
    let mut out = json!({"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": b.content}],
        "stop_reason": b.finish_reason.as_deref().unwrap_or("end_turn"), "stop_sequence": null});
    if !b.omit_usage {
        out["usage"] = b.anthropic_usage(b.completion);
    }
    rendered(b.render(&out))
}

async fn count_tokens(State(state): State<Arc<MockState>>, req: Request) -> Response {
    if let Some(r) = anthropic_refusal(&req) {
        return r;
    }
    let (_rec, b) = record(&state, req).await;
    json_response(json!({"input_tokens": b.prompt}))
}

/// Anthropic's event sequence, one `content_block_delta` per word.
fn anthropic_stream(state: Arc<MockState>, b: Behaviour, model: Value) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let event =
            |name: &str, data: String| Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n")));
        let start = json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": if b.omit_usage { Value::Null } else { b.anthropic_usage(1) }}});
        let head = [
            event("message_start", b.render(&start)),
            event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}).to_string()),
            event("ping", r#"{"type": "ping"}"#.to_string()),
        ];
        for e in head {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        let once: Vec<String> = b.content.split_inclusive(' ').map(str::to_string).collect();
        let words: Vec<String> = std::iter::repeat_n(once, b.repeat.max(1))
            .flatten()
            .collect();
        for (sent, word) in words.iter().enumerate() {
            if b.cut_after == Some(sent) {
                let _ = tx.send(Err(std::io::Error::other("mock cut"))).await;
                return;
            }
            let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}});
            if tx
                .send(event("content_block_delta", delta.to_string()))
                .await
                .is_err()
            {
                return;
            }
            if sent == 0 && b.stream_error {
                let error = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
                let _ = tx.send(event("error", error.to_string())).await;
                return;
            }
            if sent == 0 && b.gate {
                match state.gate.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return,
                }
            }
            tokio::time::sleep(b.chunk_delay).await;
        }
        let mut usage = json!({"output_tokens": b.completion});
        if b.web_searches > 0 {
            usage["server_tool_use"] = json!({"web_search_requests": b.web_searches});
        }
        let tail = [
            event("content_block_stop", json!({"type": "content_block_stop", "index": 0}).to_string()),
            event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": b.finish_reason.as_deref().unwrap_or("end_turn"), "stop_sequence": null},
                "usage": if b.omit_usage { Value::Null } else { usage }}).to_string()),
            event("message_stop", json!({"type": "message_stop"}).to_string()),
        ];
        for e in tail {
            if tx.send(e).await.is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([("content-type", "text/event-stream")], body).into_response()
}

/// Google's error shape.
fn gemini_error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let name = match status {
        400 => "INVALID_ARGUMENT",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        _ => "INTERNAL",
    };
    let body = json!({"error": {"code": status, "message": message, "status": name}});
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

impl Behaviour {
    /// Gemini's `usageMetadata`, `candidates` tokens so far.
    fn gemini_usage(&self, headers: &HeaderMap, candidates: u64) -> Value {
        let num = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (thoughts, tool_use, audio) = (
            num("x-mock-thoughts-tokens"),
            num("x-mock-tool-use-tokens"),
            num("x-mock-audio-prompt-tokens"),
        );
        let mut details =
            vec![json!({"modality": "TEXT", "tokenCount": self.prompt - audio.min(self.prompt)})];
        if audio > 0 {
            details.push(json!({"modality": "AUDIO", "tokenCount": audio}));
        }
        let mut usage = json!({
            "promptTokenCount": self.prompt,
            "candidatesTokenCount": candidates,
            "totalTokenCount": self.prompt + candidates + thoughts + tool_use,
            "promptTokensDetails": details,
            "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": candidates}],
        });
        if self.cached > 0 {
            usage["cachedContentTokenCount"] = json!(self.cached);
        }
        if thoughts > 0 {
            usage["thoughtsTokenCount"] = json!(thoughts);
        }
        if tool_use > 0 {
            usage["toolUsePromptTokenCount"] = json!(tool_use);
        }
        usage
    }
}

/// `/v1/models/...`: Gemini's `models/{model}:{op}` when it is one, else
/// OpenAI's (echoed, as every other `/v1` path).
async fn gemini_or_echo(state: State<Arc<MockState>>, req: Request) -> Response {
    if req.method() == http::Method::POST && req.uri().path().contains(':') {
        gemini(state, req).await
    } else {
        echo(state, req).await
    }
}

async fn gemini(State(state): State<Arc<MockState>>, req: Request) -> Response {
    if req.headers().get("x-goog-api-key").is_none() {
        return gemini_error(403, "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.");
    }
    let path = req.uri().path().to_string();
    let sse = req.uri().query().is_some_and(|q| q.contains("alt=sse"));
    let headers = req.headers().clone();
    let (rec, b) = record(&state, req).await;
    if let Some(status) = b.status {
        return gemini_error(status, &format!("mock failure {status}"));
    }
    let Some((model, op)) = path.rsplit('/').next().and_then(|m| m.split_once(':')) else {
        return gemini_error(404, "not found");
    };
    let model = b.model.clone().unwrap_or_else(|| model.to_string());
    let grounded = headers.contains_key("x-mock-grounded");
    let finish = b.finish_reason.clone().unwrap_or_else(|| "STOP".into());
    let chunk = |text: &str, usage: Option<Value>, last: bool| {
        let mut candidate =
            json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
        if last {
            candidate["finishReason"] = json!(finish);
            if grounded {
                candidate["groundingMetadata"] = json!({"webSearchQueries": ["mock query"],
                    "groundingChunks": [{"web": {"uri": "https://example.com", "title": "example"}}]});
            }
        }
        let mut out = json!({"candidates": [candidate], "modelVersion": model, "responseId": "mock-response"});
        if let Some(u) = usage {
            out["usageMetadata"] = u;
        }
        out
    };
    match op {
        "countTokens" => json_response(json!({"totalTokens": b.prompt,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": b.prompt}]})),
        "embedContent" => json_response(json!({"embedding": {"values": [0.1, 0.2, 0.3]}})),
        "batchEmbedContents" => {
            let n = rec.json()["requests"].as_array().map_or(1, Vec::len);
            json_response(json!({"embeddings": vec![json!({"values": [0.1, 0.2, 0.3]}); n]}))
        }
        "generateContent" => {
            let usage = (!b.omit_usage).then(|| b.gemini_usage(&headers, b.completion));
            json_response(chunk(&b.content, usage, true))
        }
        "streamGenerateContent" => {
            let words: Vec<String> = std::iter::repeat_n(
                b.content
                    .split_inclusive(' ')
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
                b.repeat.max(1),
            )
            .flatten()
            .collect();
            let chunks: Vec<Value> = words
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let last = i + 1 == words.len();
                    // Running totals: the candidates so far.
                    let so_far = if last {
                        b.completion
                    } else {
                        (b.completion * (i as u64 + 1)) / words.len() as u64
                    };
                    let usage = (!b.omit_usage).then(|| b.gemini_usage(&headers, so_far));
                    chunk(w, usage, last)
                })
                .collect();
            if !sse {
                return json_response(Value::Array(chunks));
            }
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
            tokio::spawn(async move {
                for (sent, c) in chunks.into_iter().enumerate() {
                    if b.cut_after == Some(sent) {
                        let _ = tx.send(Err(std::io::Error::other("mock cut"))).await;
                        return;
                    }
                    // Google frames its events with CRLF.
                    if tx
                        .send(Ok(Bytes::from(format!("data: {c}\r\n\r\n"))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(b.chunk_delay).await;
                }
            });
            let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
            ([("content-type", "text/event-stream")], body).into_response()
        }
        _ => gemini_error(404, &format!("unknown operation {op}")),
    }
}

/// Bedrock's error: `{"message"}` and the name in `x-amzn-errortype`.
fn bedrock_error(status: u16, kind: &str, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [
            ("content-type", "application/json"),
            ("x-amzn-errortype", kind),
        ],
        json!({"message": message}).to_string(),
    )
        .into_response()
}

/// One AWS event-stream frame.
pub fn event_frame(message_type: &str, kind: &str, payload: &Value) -> Bytes {
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
    let kind_header = if message_type == "exception" {
        ":exception-type"
    } else {
        ":event-type"
    };
    let message = Message::new(Bytes::from(payload.to_string()))
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String(message_type.to_string().into()),
        ))
        .add_header(Header::new(
            kind_header,
            HeaderValue::String(kind.to_string().into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/json".to_string().into()),
        ));
    let mut out = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&message, &mut out)
        .unwrap_or_else(|e| panic!("{e}"));
    Bytes::from(out)
}

fn event_stream(frames: Vec<Bytes>, b: Behaviour, cut_at: Option<usize>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        for (i, frame) in frames.into_iter().enumerate() {
            if cut_at == Some(i) {
                let _ = tx.send(Err(std::io::Error::other("mock cut"))).await;
                return;
            }
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
            tokio::time::sleep(b.chunk_delay).await;
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (
        [("content-type", "application/vnd.amazon.eventstream")],
        body,
    )
        .into_response()
}

async fn bedrock(State(state): State<Arc<MockState>>, req: Request) -> Response {
    if req.headers().get("authorization").is_none() {
        return bedrock_error(403, "AccessDeniedException", "Missing Authentication Token");
    }
    let path = req.uri().path().to_string();
    let (rec, b) = record(&state, req).await;
    if let Some(status) = b.status {
        let kind = match status {
            429 => "ThrottlingException",
            400 => "ValidationException",
            503 => "ServiceUnavailableException",
            _ => "InternalServerException",
        };
        return bedrock_error(status, kind, &format!("mock failure {status}"));
    }
    let op = path.rsplit('/').next().unwrap_or("");
    let words: Vec<String> = b.content.split_inclusive(' ').map(str::to_string).collect();
    let stop = b.finish_reason.clone().unwrap_or_else(|| "end_turn".into());
    let usage = json!({"inputTokens": b.prompt, "outputTokens": b.completion,
        "totalTokens": b.prompt + b.cached + b.cache_write_5m + b.completion,
        "cacheReadInputTokens": b.cached, "cacheWriteInputTokens": b.cache_write_5m});
    match op {
        "converse" => {
            let mut out = json!({"output": {"message": {"role": "assistant", "content": [{"text": b.content}]}},
                "stopReason": stop, "metrics": {"latencyMs": 12}});
            if !b.omit_usage {
                out["usage"] = usage;
            }
            json_response(out)
        }
        "converse-stream" => {
            let mut frames = vec![event_frame(
                "event",
                "messageStart",
                &json!({"role": "assistant"}),
            )];
            for (i, w) in words.iter().enumerate() {
                frames.push(event_frame(
                    "event",
                    "contentBlockDelta",
                    &json!({"contentBlockIndex": 0, "delta": {"text": w}}),
                ));
                if i == 0 && b.stream_error {
                    frames.push(event_frame(
                        "exception",
                        "throttlingException",
                        &json!({"message": "Too many requests, please wait before trying again."}),
                    ));
                    return event_stream(frames, b, None);
                }
            }
            frames.push(event_frame(
                "event",
                "contentBlockStop",
                &json!({"contentBlockIndex": 0}),
            ));
            frames.push(event_frame(
                "event",
                "messageStop",
                &json!({"stopReason": stop}),
            ));
            if !b.omit_usage {
                frames.push(event_frame(
                    "event",
                    "metadata",
                    &json!({"usage": usage, "metrics": {"latencyMs": 12}}),
                ));
            }
            // `x-mock-cut-after: N`: cut after N deltas (messageStart first).
            let cut = b.cut_after.map(|n| n + 1);
            event_stream(frames, b, cut)
        }
        "invoke" => {
            let model = b
                .model
                .clone()
                .map_or_else(|| rec.json()["model"].clone(), Value::String);
            let mut out = json!({"id": "msg_bdrk_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": b.content}], "stop_reason": stop, "stop_sequence": null});
            if !b.omit_usage {
                out["usage"] = b.anthropic_usage(b.completion);
            }
            json_response(out)
        }
        "invoke-with-response-stream" => {
            let chunk = |event: Value| {
                let bytes = aws_smithy_types::base64::encode(event.to_string());
                event_frame("event", "chunk", &json!({"bytes": bytes}))
            };
            let mut frames = vec![chunk(
                json!({"type": "message_start", "message": {"id": "msg_bdrk_mock",
                "type": "message", "role": "assistant", "model": "claude", "content": [],
                "usage": b.anthropic_usage(1)}}),
            )];
            for w in &words {
                frames.push(chunk(json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": w}})));
            }
            frames.push(chunk(
                json!({"type": "message_delta", "delta": {"stop_reason": stop},
                "usage": {"output_tokens": b.completion}}),
            ));
            frames.push(chunk(
                json!({"type": "message_stop", "amazon-bedrock-invocationMetrics": {
                "inputTokenCount": b.prompt, "outputTokenCount": b.completion}}),
            ));
            event_stream(frames, b, None)
        }
        _ => bedrock_error(404, "ResourceNotFoundException", "unknown operation"),
    }
}
