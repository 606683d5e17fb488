//! Forwarding: upstream selection, the request on its way up, the response on
//! its way back (buffered only when a cost header must precede it, teed when
//! it streams), and the hand-off to settlement.
//!
//! Never awaits the database and never parses more of a body than it needs.

pub mod request;
pub mod settle;
pub mod stream;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Limited};

use crate::app::AppState;
use crate::budget::Refusal;
use crate::config::{AuthMode, UnpricedPolicy};
use crate::error::ApiError;
use crate::format::WireFormat;
use crate::usage::frames::Framing;
use crate::usage::{Endpoint, TokenSource, Usage};
use request::RequestMeta;
use settle::{settle, settle_without_usage, RequestCtx};
use stream::{MeteredStream, StreamSettlement};
use upstream::Upstream;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-tollgate-request-id");
pub const COST_USD: HeaderName = HeaderName::from_static("x-tollgate-cost-usd");
pub const BUDGET_REMAINING: HeaderName = HeaderName::from_static("x-tollgate-budget-remaining-usd");
const TEAM_HEADER: &str = "x-tollgate-team";
const UPSTREAM_HEADER: &str = "x-tollgate-upstream";

/// Headers that belong to one hop, or that tollgate sets itself.
fn is_hop_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "trailers"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// Entry point for every `/v1/*` request.
pub async fn handle(state: Arc<AppState>, req: http::Request<Body>) -> Response {
    let request_id = state.request_ids.next();
    // The header is made now: the id itself moves into the usage row.
    let id_header = HeaderValue::from_str(&request_id).ok();
    let anthropic_configured = state.upstreams.first_for(WireFormat::Anthropic).is_some();
    let (format, endpoint) =
        WireFormat::of_request(req.uri().path(), req.headers(), anthropic_configured);
    let (team, key) = match check_path(req.uri().path())
        .and_then(|()| authenticate(&state, req.uri(), req.headers()))
    {
        Ok(who) => who,
        Err(e) => return with_request_id(format.render(e), id_header),
    };
    let mut ctx = RequestCtx::new(request_id, endpoint, team);
    ctx.key = key;
    ctx.format = format;
    // Durable mode: the response completes only once its row is on disk.
    let mut durable = None;
    if state.usage.durable() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        ctx.durable_ack = Some(tx);
        durable = Some(rx);
    }
    let metered = endpoint.is_metered() && req.method() == Method::POST;
    if !metered {
        if let Err(e) = check_unmetered_allowed(&state, &ctx, &req) {
            let overhead = ctx.started.elapsed();
            settle_without_usage(&state, &mut ctx, e.status().as_u16(), overhead);
            if let Some(rx) = durable {
                let _ = rx.await;
            }
            return with_request_id(format.render(e), id_header);
        }
    }
    // Boxed: hyper keeps a connection's request future allocated for as long
    // as the connection lives, so the large forwarding state machines go in
    // their own allocation, freed when the response starts: `handle`'s own
    // state machine is 1,072 bytes instead of 4,384 per open connection.
    let result = if metered {
        Box::pin(metered_request(&state, &mut ctx, req)).await
    } else {
        Box::pin(unmetered(&state, &mut ctx, req)).await
    };
    let (response, remaining) = match result {
        Ok(Forwarded::Done(response)) => (response, ctx.budget_remaining),
        Ok(Forwarded::Stream(pending)) => {
            let remaining = ctx.budget_remaining;
            (pending.into_response(state, ctx, durable.take()), remaining)
        }
        Err(e) => {
            let overhead = ctx.started.elapsed();
            settle_without_usage(&state, &mut ctx, e.status().as_u16(), overhead);
            (format.render(e), ctx.budget_remaining)
        }
    };
    if let Some(rx) = durable {
        // Answered once the row is on local disk (or dropped if it never
        // gets there: the client is not held hostage to a broken disk).
        let _ = rx.await;
    }
    let mut response = with_request_id(response, id_header);
    if let Some(remaining) = remaining {
        if let Ok(v) = HeaderValue::from_str(remaining.usd_text(&mut [0; 32])) {
            response.headers_mut().insert(BUDGET_REMAINING, v);
        }
    }
    response
}

/// Refuses paths with `.`/`..` segments (raw or percent-encoded) and
/// encoded `/` or `\`: an upstream or a server behind it may normalise them
/// into a path the client was never meant to reach with tollgate's key.
fn check_path(path: &str) -> Result<(), ApiError> {
    let unsafe_path = || ApiError::UnsafePath {
        path: path.chars().take(256).collect(),
    };
    if path.contains('\\') {
        return Err(unsafe_path());
    }
    if !path.contains(['.', '%']) {
        return Ok(());
    }
    for segment in path.split('/') {
        let lower = segment.to_ascii_lowercase();
        if lower.contains("%2f") || lower.contains("%5c") {
            return Err(unsafe_path());
        }
        let dots = lower.replace("%2e", ".");
        if dots == "." || dots == ".." {
            return Err(unsafe_path());
        }
    }
    Ok(())
}

/// A team with a budget may only use paths tollgate can price, and those
/// `auth.allow_unmetered` lists: anything else would spend outside the budget.
fn check_unmetered_allowed(
    state: &AppState,
    ctx: &RequestCtx,
    req: &http::Request<Body>,
) -> Result<(), ApiError> {
    let path = req.uri().path();
    if state.ledger.has_budget(&ctx.team) && !state.auth.allows_unmetered(req.method(), path) {
        return Err(ApiError::EndpointNotMetered {
            path: path.chars().take(256).collect(),
            team: ctx.team.clone(),
        });
    }
    Ok(())
}

/// Who is asking: the team (and key) a request is attributed to.
fn authenticate(
    state: &AppState,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Result<(String, Option<Arc<crate::auth::KeyEntry>>), ApiError> {
    let query_key = crate::auth::query_key(uri.query());
    match state.auth.mode() {
        AuthMode::Passthrough => {
            // A tollgate key is never forwarded: refuse rather than leak it.
            let carries_tollgate_key = crate::auth::CREDENTIAL_HEADERS.iter().any(|name| {
                headers
                    .get(*name)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(crate::auth::is_tollgate_key)
            }) || query_key.is_some_and(crate::auth::is_tollgate_key);
            if carries_tollgate_key {
                return Err(ApiError::TollgateKeyInPassthrough);
            }
            Ok((team_of(headers)?, None))
        }
        AuthMode::VirtualKeys => {
            // `Authorization: Bearer` (OpenAI SDKs), `api-key` (Azure's),
            // `x-api-key` (Anthropic's), `x-goog-api-key` or `?key=` (Gemini's).
            let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            let secret = text("authorization")
                .and_then(crate::auth::bearer)
                .or_else(|| text("api-key"))
                .or_else(|| text("x-api-key"))
                .or_else(|| text("x-goog-api-key"))
                .or(query_key)
                .ok_or(ApiError::Unauthorized)?;
            let key = state.directory.key(secret).ok_or(ApiError::Unauthorized)?;
            Ok((key.team.clone(), Some(key)))
        }
    }
}

/// How a forwarded request continues once the upstream has answered.
enum Forwarded {
    /// Settled; the response is complete.
    Done(Response),
    /// A stream to tee; settled when it ends.
    Stream(PendingStream),
}

struct PendingStream {
    response: http::Response<hyper::body::Incoming>,
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    strip_usage_chunk: bool,
    request_body: Bytes,
    overhead: Duration,
    idle_timeout: Duration,
}

impl PendingStream {
    fn into_response(
        self,
        state: Arc<AppState>,
        ctx: RequestCtx,
        durable: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> Response {
        let meter = ctx
            .format
            .stream_meter(ctx.endpoint, self.framing, self.strip_usage_chunk);
        let settlement = StreamSettlement {
            state,
            ctx,
            request_body: self.request_body,
            overhead: self.overhead,
        };
        let stream = MeteredStream::new(
            Box::pin(self.response.into_body().into_data_stream()),
            meter,
            self.idle_timeout,
            settlement,
            durable,
        );
        build_response(self.status, self.headers, Body::from_stream(stream))
    }
}

fn with_request_id(mut response: Response, id: Option<HeaderValue>) -> Response {
    if let Some(v) = id {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// Passthrough auth: the team named by `x-tollgate-team`, else `default`.
fn team_of(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get(TEAM_HEADER) else {
        return Ok("default".into());
    };
    let team = value.to_str().unwrap_or("");
    if crate::auth::is_valid_team_name(team) {
        Ok(team.to_string())
    } else {
        Err(ApiError::invalid(
            "x-tollgate-team must be 1-64 characters of letters, digits, '-', '_' or '.'",
            None,
        ))
    }
}

fn pick_upstream<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    model: Option<&str>,
    format: WireFormat,
) -> Result<&'a Upstream, ApiError> {
    if let Some(name) = headers.get(UPSTREAM_HEADER) {
        let name = name.to_str().unwrap_or("");
        return state
            .upstreams
            .by_name(name)
            .ok_or_else(|| ApiError::UnknownUpstream {
                name: name.to_string(),
            });
    }
    match model {
        Some(model) => {
            state
                .upstreams
                .for_model(model, format)
                .ok_or_else(|| ApiError::NoUpstream {
                    model: model.to_string(),
                })
        }
        None => state
            .upstreams
            .first_for(format)
            .ok_or_else(|| match format {
                WireFormat::OpenAi => ApiError::Internal("no upstream configured".into()),
                _ => ApiError::invalid(
                    format!(
                        "No upstream of kind \"{}\" is configured for {}'s API.",
                        format.name().to_ascii_lowercase(),
                        format.name()
                    ),
                    None,
                ),
            }),
    }
}

/// Client headers as they go upstream: hop-by-hop and tollgate's own removed,
/// compression off (tollgate must read the body). In virtual-keys mode the
/// client's credentials (its tollgate key) are replaced by the upstream's
/// own key; in passthrough mode the client's provider key goes up untouched
/// and the server's key never does. Edited in place rather than copied.
fn upstream_headers(mut headers: HeaderMap, upstream: &Upstream, mode: AuthMode) -> HeaderMap {
    let virtual_keys = mode == AuthMode::VirtualKeys;
    remove_where(&mut headers, |name| {
        is_hop_header(name)
            || name == header::ACCEPT_ENCODING
            || name.as_str().starts_with("x-tollgate-")
            // A tollgate key never leaves tollgate.
            || (virtual_keys && crate::auth::CREDENTIAL_HEADERS.contains(&name.as_str()))
    });
    if virtual_keys {
        if let Some((name, value)) = &upstream.auth {
            headers.insert(name.clone(), value.clone());
        }
    }
    headers
}

/// Signs a request with the server's credentials where its backend signs
/// (SigV4), in virtual-keys mode only: in passthrough the server's
/// credentials never go up.
fn sign<B>(
    upstream: &Upstream,
    request: &mut http::Request<B>,
    body: Option<&[u8]>,
    mode: AuthMode,
) -> Result<(), ApiError> {
    if mode != AuthMode::VirtualKeys {
        return Ok(());
    }
    upstream.provider.sign(request, body).map_err(|reason| {
        ApiError::Internal(format!(
            "signing the request for {}: {reason}",
            upstream.name
        ))
    })
}

/// Upstream headers as they go back to the client: hop-by-hop removed.
fn client_headers(mut headers: HeaderMap) -> HeaderMap {
    remove_where(&mut headers, is_hop_header);
    headers
}

/// Removes every header `unwanted` names. A request carries a handful of
/// headers and loses two or three, so rescanning after each removal is
/// cheaper than collecting the names first (an allocation and a clone each).
fn remove_where(headers: &mut HeaderMap, unwanted: impl Fn(&HeaderName) -> bool) {
    while let Some(name) = headers.keys().find(|n| unwanted(n)).cloned() {
        headers.remove(&name);
    }
}

async fn send(
    upstream: &Upstream,
    request: http::Request<Body>,
) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
    send_attempt(upstream, request).await.map_err(|(e, _)| e)
}

/// One try of an upstream. A failure says what kind it was, as
/// `routing.fallback_on` names them: `connect` (no connection was made, so
/// nothing was sent), `timeout` (no response headers in time), or
/// `unreachable` (the connection broke after the request went out).
async fn send_attempt(
    upstream: &Upstream,
    request: http::Request<Body>,
) -> Result<http::Response<hyper::body::Incoming>, (ApiError, &'static str)> {
    let timed_out = || {
        let e = ApiError::UpstreamTimeout {
            upstream: upstream.name.clone(),
            timeout_ms: upstream.timeout.as_millis() as u64,
        };
        (e, "timeout")
    };
    match tokio::time::timeout(upstream.timeout, upstream.client.request(request)).await {
        Err(_) => Err(timed_out()),
        Ok(Err(e)) if is_timeout(&e) => Err(timed_out()),
        Ok(Err(e)) => {
            let kind = if e.is_connect() {
                "connect"
            } else {
                "unreachable"
            };
            let e = ApiError::UpstreamUnreachable {
                upstream: upstream.name.clone(),
                reason: error_chain(&e),
            };
            Err((e, kind))
        }
        Ok(Ok(response)) => Ok(response),
    }
}

/// A connect timeout shows up as an I/O `TimedOut` somewhere in the chain.
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = s.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Reads a whole upstream body, failing past the idle timeout.
async fn read_body(
    upstream: &Upstream,
    response: http::Response<hyper::body::Incoming>,
) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(upstream.idle_timeout, response.into_body().collect()).await {
        Err(_) => Err(ApiError::UpstreamTimeout {
            upstream: upstream.name.clone(),
            timeout_ms: upstream.idle_timeout.as_millis() as u64,
        }),
        Ok(Err(e)) => Err(ApiError::UpstreamBadResponse {
            upstream: upstream.name.clone(),
            reason: error_chain(&e),
        }),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

async fn read_client_body(
    state: &AppState,
    body: Body,
    headers: &HeaderMap,
) -> Result<Bytes, ApiError> {
    let limit = state.config.server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let mut collect = std::pin::pin!(Limited::new(body, limit).collect());
    // Most bodies arrived with their headers: no timer for those.
    let collected = match futures_util::FutureExt::now_or_never(collect.as_mut()) {
        Some(collected) => collected,
        None => {
            let timeout = Duration::from_millis(state.config.server.body_timeout_ms);
            tokio::time::timeout(timeout, collect)
                .await
                .map_err(|_| ApiError::BodyTimeout {
                    timeout_ms: state.config.server.body_timeout_ms,
                })?
        }
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::BodyTooLarge { limit })
        }
        Err(e) => Err(ApiError::invalid(
            format!("Could not read the request body: {e}"),
            None,
        )),
    }
}

/// Chat, completions, embeddings, responses: read the model, forward, meter.
async fn metered_request(
    state: &Arc<AppState>,
    ctx: &mut RequestCtx,
    req: http::Request<Body>,
) -> Result<Forwarded, ApiError> {
    let (mut parts, body) = req.into_parts();
    let body = read_client_body(state, body, &parts.headers).await?;
    // What the client asked for: the body's model, else (Azure style) the
    // deployment in the path. It routes; the catalog model it stands for
    // (an Azure deployment's model) prices.
    let path_model = ctx.format.path_model(parts.uri.path());
    let mut meta = RequestMeta::parse_naming(&body, path_model.is_none())?;
    if ctx.format.path_streams(parts.uri.path()) {
        meta.stream = Some(true);
    }
    let requested = match meta.model() {
        "" => path_model.map(|m| m.into_owned()).unwrap_or_default(),
        m => m.to_string(),
    };
    let upstream = pick_upstream(state, &parts.headers, Some(&requested), ctx.format)?;
    ctx.upstream = upstream.name.clone();
    ctx.provider = upstream.provider.name();
    // `routed_as`: the deployment name, kept for the upstream path when the
    // model it stands for differs.
    let catalog_model = upstream.provider.catalog_model(&requested);
    let (model, routed_as) = if catalog_model == requested {
        (requested, None)
    } else {
        (catalog_model.to_string(), Some(requested))
    };
    ctx.model = model;
    ctx.model_label = state.metrics.model_label(&ctx.model);
    ctx.stream = meta.is_stream();
    ctx.choices = meta.n.map_or(1, |n| u16::try_from(n).unwrap_or(u16::MAX));
    ctx.end_user = meta.user.as_ref().map(|u| u.chars().take(256).collect());
    let resolved = state.catalog.load().resolve(&ctx.model);
    let unpriced = resolved.price.is_none();
    ctx.resolved = Some(resolved);
    if unpriced && state.config.catalog.unpriced == UnpricedPolicy::Reject {
        return Err(ApiError::UnpricedModel {
            model: ctx.model.clone(),
        });
    }
    // A budget is a guarantee: nothing it cannot price gets past it.
    if unpriced && state.ledger.has_budget(&ctx.team) {
        return Err(ApiError::UnpricedForBudget {
            model: ctx.model.clone(),
            team: ctx.team.clone(),
        });
    }
    if let Some(key) = &ctx.key {
        if !key.allows(&ctx.model) {
            return Err(ApiError::ModelNotAllowed {
                model: ctx.model.clone(),
            });
        }
    }

    // The team's output cap, enforced on the way up.
    let cap = state
        .directory
        .team(&ctx.team)
        .and_then(|t| t.max_output_tokens);
    let (body, max_output) = request::apply_output_cap(body, &meta, ctx.endpoint, cap)?;
    reserve(state, ctx, &body, &meta, max_output).await?;

    // Fallbacks: the other upstreams serving the model, in order, unless
    // the client named one or sent its own key. The client's headers are kept for a retry
    // only when there is somewhere to retry.
    let routing = &state.config.routing;
    let route = routed_as.as_deref().unwrap_or(&ctx.model);
    // In passthrough the client's own provider key goes up: never to a
    // second upstream it was not meant for.
    let pinned =
        parts.headers.contains_key(UPSTREAM_HEADER) || state.auth.mode() == AuthMode::Passthrough;
    let fallback = |from: &Upstream, attempts: u16| {
        if pinned || attempts >= routing.max_attempts {
            return None;
        }
        state.upstreams.next_matching(route, ctx.format, from)
    };
    let may_retry = fallback(upstream, 1).is_some();
    let mut upstream = upstream;
    let mut attempts = 1u16;
    let (result, inject, sent_at) = loop {
        // Ask for stream usage on the client's behalf, and hide it again later.
        let inject = ctx.stream
            && ctx.endpoint.accepts_stream_options()
            && upstream.inject_stream_usage
            && !meta.client_wants_stream_usage();
        let upstream_body = if inject {
            request::with_stream_usage(&body, &meta)?
        } else {
            body.clone()
        };
        let mut request = http::Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = upstream_uri(upstream, &parts.uri, route, state.auth.mode())?;
        let client_headers = if may_retry {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        *request.headers_mut() = upstream_headers(client_headers, upstream, state.auth.mode());
        sign(
            upstream,
            &mut request,
            Some(&upstream_body),
            state.auth.mode(),
        )?;
        let request = request.map(|()| Body::from(upstream_body));

        let sent_at = Instant::now();
        let result = send_attempt(upstream, request).await;
        let status = result.as_ref().ok().map(|r| r.status());
        let (outcome, retriable) = match (&result, &status) {
            (_, Some(s)) if s.is_success() => {
                upstream.attempts_ok.inc();
                break (result, inject, sent_at);
            }
            (_, Some(s)) => (s.as_str(), routing.retries_status(s.as_u16())),
            (Err((_, kind)), None) => (*kind, routing.retries_error(kind)),
            // Not reached: a response always has a status.
            (Ok(_), None) => ("ok", false),
        };
        state
            .metrics
            .upstream_attempts
            .with_label_values(&[&upstream.name, outcome])
            .inc();
        match fallback(upstream, attempts).filter(|_| retriable) {
            // Nothing of this answer reached the client: the next one may.
            Some(next) => {
                tracing::warn!(upstream = %upstream.name, outcome, next = %next.name, "upstream failed; falling back");
                upstream = next;
                attempts = attempts.saturating_add(1);
            }
            _ => break (result, inject, sent_at),
        }
    };
    ctx.upstream.clone_from(&upstream.name);
    ctx.provider = upstream.provider.name();
    ctx.attempts = attempts;
    let mut response = result.map_err(|(e, _)| e)?;
    let pre_send = sent_at - ctx.started;
    let status = response.status();
    let headers = client_headers(std::mem::take(response.headers_mut()));

    if !status.is_success() {
        // Upstream errors reach the client unchanged, status and body.
        let bytes = read_body(upstream, response).await?;
        let overhead = pre_send;
        settle_without_usage(state, ctx, status.as_u16(), overhead);
        return Ok(Forwarded::Done(build_response(
            status,
            headers,
            Body::from(bytes),
        )));
    }

    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Some(framing) = Framing::of(content_type) {
        return Ok(Forwarded::Stream(PendingStream {
            response,
            status,
            headers,
            framing,
            strip_usage_chunk: inject,
            request_body: body,
            overhead: pre_send,
            idle_timeout: upstream.idle_timeout,
        }));
    }

    let bytes = read_body(upstream, response).await?;
    let upstream_wait = sent_at.elapsed();
    // Whatever the body says (or fails to say) about usage, the client gets
    // it unchanged; tollgate estimates what it cannot read.
    let facts = ctx.format.read_body(ctx.endpoint, &bytes);
    let usage = match facts.usage {
        Some(usage) => usage,
        None => estimate_non_stream(ctx, &body, &bytes).await,
    };
    if status == StatusCode::OK {
        state.words.offer(|| {
            settle::word_sample(
                state,
                ctx,
                facts.served.model.as_deref(),
                body.clone(),
                crate::words::Answer::Body(bytes.clone()),
                usage,
            )
        });
    }
    let overhead = ctx.started.elapsed().saturating_sub(upstream_wait);
    let cost = settle(state, ctx, status.as_u16(), usage, &facts.served, overhead);
    let first_byte = ctx.started.elapsed().as_secs_f64();
    ctx.series(&state.metrics)
        .observe_first_byte(&state.metrics, first_byte);
    let mut response = build_response(status, headers, Body::from(bytes));
    if let Ok(v) = HeaderValue::from_str(cost.usd_text(&mut [0; 32])) {
        response.headers_mut().insert(COST_USD, v);
    }
    Ok(Forwarded::Done(response))
}

/// Holds the request's worst-case cost against the team budget: every
/// prompt token at the highest prompt-side rate and every output token at
/// the highest output-side rate of the tiers it may be served at, images at
/// their worst detail, built-in tool calls up to `max_tool_calls` (else
/// `budget.tool_call_allowance`). A cheap bound on the prompt (its byte
/// length) first; the exact tiktoken count only when the bound does not fit.
async fn reserve(
    state: &AppState,
    ctx: &mut RequestCtx,
    body: &Bytes,
    meta: &RequestMeta,
    max_output: Option<u64>,
) -> Result<(), ApiError> {
    // Lent out of `ctx` for the while, not cloned: the price's reference
    // count is shared by every request of the model.
    let resolved = ctx.resolved.take();
    let result = reserve_priced(state, ctx, resolved.as_ref(), body, meta, max_output).await;
    ctx.resolved = resolved;
    result
}

async fn reserve_priced(
    state: &AppState,
    ctx: &mut RequestCtx,
    resolved: Option<&crate::pricing::Resolved>,
    body: &Bytes,
    meta: &RequestMeta,
    max_output: Option<u64>,
) -> Result<(), ApiError> {
    let Some(price) = resolved.and_then(|r| r.price.as_deref()) else {
        // Unpriced: nothing to reserve, but the header still tells what is left.
        ctx.budget_remaining = state.ledger.status(&ctx.team).map(|s| s.remaining);
        return Ok(());
    };
    let encoding = resolved.map_or(crate::usage::Encoding::O200kBase, |r| r.encoding());
    let completion = match ctx.endpoint {
        Endpoint::Embeddings => 0,
        _ => max_output
            .or(price.max_output_tokens)
            .unwrap_or(DEFAULT_MAX_OUTPUT)
            .saturating_mul(u64::from(meta.n.unwrap_or(1))),
    };
    let tiers = meta.possible_tiers();
    let mut calls = meta.tool_call_bound(state.config.budget.tool_call_allowance);
    let search_model = resolved.is_some_and(|r| settle::is_search_model(&r.base_model));
    if ctx.endpoint == Endpoint::ChatCompletions
        && search_model
        && !calls.iter().any(|(k, _)| *k == "web_search")
    {
        // A chat search model searches once per answer.
        calls.push(("web_search", u64::from(meta.n.unwrap_or(1))));
    }
    // Counting image parts parses the body: only for teams with a budget.
    let images = if request::mentions_images(body) && state.ledger.has_budget(&ctx.team) {
        request::image_token_bound(body)
    } else {
        0
    };
    let catalog = state.catalog.load();
    let fees = catalog.tool_call_fees();
    let worst = |prompt: u64| {
        price.worst_case(
            prompt.saturating_add(images),
            completion,
            &tiers,
            &calls,
            fees,
        )
    };
    // Every token covers at least one byte of its text, and the JSON around
    // the text outweighs the per-message overheads.
    let mut bound = body.len() as u64 + 16;
    let searches = calls
        .iter()
        .find(|(k, _)| *k == "web_search")
        .map_or(0, |(_, n)| *n);
    let has_tools =
        meta.tools.as_ref().is_some_and(|t| !t.is_empty()) || meta.tool_config.is_some();
    bound = bound.saturating_add(ctx.format.added_prompt_bound(has_tools, searches));
    let unavailable = || ApiError::BudgetUnavailable {
        team: ctx.team.clone(),
    };
    match reserve_amount(state, &ctx.team, worst(bound)).await {
        Ok(r) => {
            ctx.budget_remaining = r.as_ref().map(|r| r.remaining());
            ctx.reservation = r;
            return Ok(());
        }
        Err(Refusal::Unavailable) => return Err(unavailable()),
        Err(Refusal::Over(_)) => {}
    }
    let (endpoint, body2) = (ctx.endpoint, body.clone());
    // The text counted exactly; audio (which tiktoken does not count) at
    // the most tokens its size allows. Not for another tokenizer's
    // models: tiktoken is no bound on its count, so the byte bound stands.
    let format = ctx.format;
    let exact = if !format.tiktoken_bounds_prompt() {
        bound
    } else {
        tokio::task::spawn_blocking(move || {
            serde_json::from_slice::<serde_json::Value>(&body2)
                .map(|v| {
                    format
                        .prompt_tokens(endpoint, encoding, &v)
                        .saturating_add(request::audio_token_bound(&v))
                })
                .unwrap_or(bound)
        })
        .await
        .unwrap_or(bound)
    };
    match reserve_amount(state, &ctx.team, worst(exact)).await {
        Ok(r) => {
            ctx.budget_remaining = r.as_ref().map(|r| r.remaining());
            ctx.reservation = r;
            Ok(())
        }
        Err(Refusal::Unavailable) => Err(unavailable()),
        Err(Refusal::Over(over)) => {
            ctx.budget_remaining = Some(over.remaining);
            state
                .metrics
                .budget_rejections
                .with_label_values(&[&ctx.team])
                .inc();
            Err(ApiError::BudgetExceeded {
                team: ctx.team.clone(),
                needed: over.needed,
                remaining: over.remaining,
            })
        }
    }
}

/// Reserves from the local ledger; on Postgres, from this replica's lease,
/// topped up from the shared budget when it runs short.
async fn reserve_amount(
    state: &AppState,
    team: &str,
    amount: crate::pricing::NanoUsd,
) -> Result<Option<crate::budget::Reservation>, Refusal> {
    match state.store.shared() {
        Some(pg) => {
            let timeout = Duration::from_millis(state.config.database.lease_timeout_ms);
            state.ledger.reserve_shared(pg, team, amount, timeout).await
        }
        None => state.ledger.reserve(team, amount).map_err(Refusal::Over),
    }
}

/// Max output assumed for a model the catalog gives no limit for.
const DEFAULT_MAX_OUTPUT: u64 = 4096;

/// Tokens for a response that reported none, counted off the reactor threads.
async fn estimate_non_stream(ctx: &RequestCtx, request: &Bytes, response: &Bytes) -> Usage {
    let encoding = ctx
        .resolved
        .as_ref()
        .map_or(crate::usage::Encoding::O200kBase, |r| r.encoding());
    let (format, endpoint) = (ctx.format, ctx.endpoint);
    let (request, response) = (request.clone(), response.clone());
    let ctx_model = ctx.model.clone();
    let task = tokio::task::spawn_blocking(move || {
        let texts = serde_json::from_slice::<serde_json::Value>(&response)
            .map(|v| format.response_texts(endpoint, &v))
            .unwrap_or_default();
        format.estimate_usage(endpoint, encoding, &request, &texts)
    });
    match task.await {
        Ok(usage) => usage,
        Err(e) => {
            tracing::error!(error = %e, model = %ctx_model, "token estimate failed");
            Usage {
                source: TokenSource::Estimated,
                ..Usage::NONE
            }
        }
    }
}

/// `/v1/models` and every other `/v1/*`: forwarded as they are, streamed both
/// ways, counted as a request without tokens.
async fn unmetered(
    state: &Arc<AppState>,
    ctx: &mut RequestCtx,
    req: http::Request<Body>,
) -> Result<Forwarded, ApiError> {
    let (mut parts, body) = req.into_parts();
    let upstream = pick_upstream(state, &parts.headers, None, ctx.format)?;
    ctx.upstream = upstream.name.clone();
    ctx.budget_remaining = state.ledger.status(&ctx.team).map(|s| s.remaining);
    let body = if parts.method == Method::GET || parts.method == Method::HEAD {
        Body::empty()
    } else {
        let gap = Duration::from_millis(state.config.server.body_timeout_ms);
        Body::new(PausingBody::new(body, gap))
    };
    let mut request = http::Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = upstream_uri(upstream, &parts.uri, "", state.auth.mode())?;
    *request.headers_mut() = upstream_headers(
        std::mem::take(&mut parts.headers),
        upstream,
        state.auth.mode(),
    );
    sign(upstream, &mut request, None, state.auth.mode())?;
    let pre_send = ctx.started.elapsed();
    let mut response = send(upstream, request).await?;
    let status = response.status();
    let headers = client_headers(std::mem::take(response.headers_mut()));
    settle_without_usage(state, ctx, status.as_u16(), pre_send);
    Ok(Forwarded::Done(build_response(
        status,
        headers,
        Body::new(response.into_body()),
    )))
}

/// Where a client's request goes on `upstream`. In virtual-keys mode a
/// `?key=` (Gemini's way to send a key: the client's tollgate key) is left
/// behind, as the credential headers are.
fn upstream_uri(
    upstream: &Upstream,
    client: &http::Uri,
    model: &str,
    mode: AuthMode,
) -> Result<http::Uri, ApiError> {
    let path = client.path_and_query().map_or("/", |p| p.as_str());
    let without_key;
    let path = match client.query() {
        Some(query)
            if mode == AuthMode::VirtualKeys && crate::auth::query_key(Some(query)).is_some() =>
        {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|pair| pair.split('=').next() != Some(crate::auth::CREDENTIAL_PARAM))
                .collect();
            without_key = match kept.is_empty() {
                true => client.path().to_string(),
                false => format!("{}?{}", client.path(), kept.join("&")),
            };
            without_key.as_str()
        }
        _ => path,
    };
    upstream
        .url_for(path, model)
        .map_err(|e| ApiError::invalid(format!("The request path cannot be forwarded: {e}"), None))
}

/// A request body streamed through to the upstream, failing when the
/// client pauses longer than `gap` between chunks (a slow-body attack would
/// otherwise hold the upstream connection open for good).
struct PausingBody {
    inner: Body,
    gap: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl PausingBody {
    fn new(inner: Body, gap: Duration) -> PausingBody {
        PausingBody {
            inner,
            gap,
            timer: Box::pin(tokio::time::sleep(gap)),
        }
    }
}

impl http_body::Body for PausingBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + self.gap;
                self.timer.as_mut().reset(deadline);
                Poll::Ready(frame)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(
                    "request body paused longer than server.body_timeout_ms",
                )))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn build_response(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}
