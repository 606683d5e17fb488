//! One request's way through tollgate, in five stages, each returning
//! what the next needs:
//!
//! 1. `admit`: who asks (path check, virtual key or passthrough team) and
//!    in which wire format; the body is read once admitted.
//! 2. `route`: what is asked for (the format's `RequestFacts`), the upstream
//!    it goes to, the catalog model that prices it, the model policies.
//! 3. `reserve`: the worst case held against the team's budget.
//! 4. `forward`: the request on its way up, fallbacks included.
//! 5. `settle`: priced, counted, the usage row queued; for a stream when
//!    it ends (`stream`), else before the response goes back.
//!
//! Each stage's value goes whole onto the request's `settle::Ticket`, so a
//! refusal at any stage settles with what is known by then. No stage
//! awaits the database (a shared budget's lease top-up is the bounded
//! exception, in `reserve`), and none parses more of a body than it needs.

pub mod admit;
pub mod background;
pub mod batch;
pub mod body;
pub mod forward;
pub mod parked;
pub mod realtime;
pub mod reply;
pub mod reserve;
pub mod route;
pub mod settle;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode};

use crate::usage::frames::Framing;
use crate::usage::{TokenSource, Usage};
use forward::Answer;
pub use parked::Proxy;
pub use reply::{
    build_response, Forwarded, PendingStream, Refused, BUDGET_REMAINING, COST_USD, REQUEST_ID,
};
use settle::{settle, settle_without_usage, Ticket};

/// Entry point for every `/v1/*` request.
pub async fn handle(state: Arc<Proxy>, req: http::Request<Body>) -> Response {
    let request_id = state.request_ids.next();
    // The header is made now: the id itself moves into the usage row.
    let id_header = HeaderValue::from_str(&request_id).ok();
    let who = match admit::admit(&state, &req, request_id) {
        Ok(who) => who,
        Err((format, e)) => return with_request_id(format.render(e), id_header),
    };
    let format = who.format;
    let metered = who.endpoint.is_metered() && req.method() == Method::POST;
    let rate_limited = match metered {
        true => state
            .limits
            .applying(&who.team, who.key.as_ref().map(|k| k.id.as_str())),
        false => (Vec::new(), false),
    };
    // Durable mode: the response completes only once its row is on disk.
    let (ack, mut durable) = match state.usage.durable() {
        true => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let ticket = Ticket::new(who, ack);
    // Boxed: hyper keeps a connection's request future allocated for as long
    // as the connection lives, so the large forwarding state machines go in
    // their own allocation, freed when the response starts.
    let polled = format == crate::format::WireFormat::OpenAi
        && background::poll_of(req.method(), req.uri().path()).is_some();
    let batch_op = batch::op_of(format, req.method(), req.uri().path());
    let result = if format == crate::format::WireFormat::OpenAi && realtime::is_realtime(&req) {
        Box::pin(realtime::open(&state, ticket, req)).await
    } else if polled {
        Box::pin(background::poll(&state, ticket, req)).await
    } else if let Some(op) = batch_op {
        Box::pin(batch::handle(&state, ticket, req, op)).await
    } else if metered {
        Box::pin(metered_request(&state, ticket, req, &rate_limited)).await
    } else {
        Box::pin(unmetered(&state, ticket, req)).await
    };
    // What is left of the request's rate limits once it was admitted.
    let rate_view = match rate_limited.0.is_empty() {
        true => None,
        false => state.limits.view(&rate_limited.0),
    };
    let (response, remaining) = match result {
        Ok(Forwarded::Done(response, remaining)) => (response, remaining),
        Ok(Forwarded::Stream(pending)) => {
            let remaining = pending.ticket.hold.remaining;
            (pending.into_response(state, durable.take()), remaining)
        }
        Err(Refused(ticket, e)) => {
            let overhead = ticket.who.started.elapsed();
            let retry_after = e.retry_after_secs();
            let settled = settle_without_usage(&state, ticket, e.status().as_u16(), overhead);
            let mut response = format.render(e);
            if let Some(secs) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            (response, settled.remaining)
        }
    };
    if let Some(rx) = durable {
        // Answered once the row is on local disk (or dropped if it never
        // gets there: the client is not held hostage to a broken disk).
        let _ = rx.await;
    }
    let mut response = with_request_id(response, id_header);
    if let Some(view) = rate_view {
        reply::rate_headers(response.headers_mut(), &view);
    }
    if let Some(remaining) = remaining {
        if let Ok(v) = HeaderValue::from_str(remaining.usd_text(&mut [0; 32])) {
            response.headers_mut().insert(BUDGET_REMAINING, v);
        }
    }
    response
}

/// A stage's value, or the request refused with its ticket so far.
macro_rules! stage {
    ($ticket:ident, $result:expr) => {
        match $result {
            Ok(value) => value,
            Err(e) => return Err(Refused($ticket, e)),
        }
    };
}

/// Chat, completions, embeddings, responses, messages, generateContent,
/// Converse: admitted, routed, reserved, forwarded, metered.
async fn metered_request(
    state: &Arc<Proxy>,
    mut ticket: Ticket,
    req: http::Request<Body>,
    rate_limited: &(Vec<String>, bool),
) -> Result<Forwarded, Refused> {
    let (mut parts, body) = req.into_parts();
    let body = stage!(ticket, admit::read_body(state, body, &parts.headers).await);
    let (routed, order) = stage!(ticket, route::route(state, &ticket.who, &parts, &body));
    ticket.order = order;
    if ticket.order.background {
        ticket.poll_credentials = parked::poll_credentials(state, &parts.headers);
    }
    ticket.sent = settle::Sent::to(routed.upstream);
    stage!(ticket, route::check_order(state, &ticket));
    // The team's output cap, enforced on the way up.
    let cap = state
        .directory
        .team(&ticket.who.team)
        .and_then(|t| t.max_output_tokens);
    let (body, max_output) = stage!(
        ticket,
        body::apply_output_cap(body, routed.facts.output_limit, cap)
    );
    ticket.rate = stage!(
        ticket,
        reserve::admit_rate(state, &ticket, rate_limited, &body, max_output).await
    );
    match reserve::reserve(state, &ticket, &body, &routed.facts, max_output).await {
        Ok(hold) => ticket.hold = hold,
        Err((e, hold)) => {
            ticket.hold = hold;
            return Err(Refused(ticket, e));
        }
    }
    let answer = stage!(
        ticket,
        forward::forward(state, &ticket, &routed, &mut parts, &body).await
    );
    ticket.sent = answer.sent();
    answered(state, ticket, answer, body).await
}

/// The upstream's answer to a metered request: an error passed back
/// unchanged, a stream to tee, or a body read, metered and settled before
/// it goes back with its cost.
async fn answered(
    state: &Arc<Proxy>,
    ticket: Ticket,
    answer: Answer<'_>,
    request_body: Bytes,
) -> Result<Forwarded, Refused> {
    let upstream = answer.upstream;
    let mut response = stage!(ticket, answer.response);
    let pre_send = answer.sent_at - ticket.who.started;
    let status = response.status();
    let headers = forward::client_headers(std::mem::take(response.headers_mut()));
    if !status.is_success() {
        // Upstream errors reach the client unchanged, status and body.
        let bytes = stage!(ticket, forward::read_body(upstream, response).await);
        let settled = settle_without_usage(state, ticket, status.as_u16(), pre_send);
        let response = build_response(status, headers, Body::from(bytes));
        return Ok(Forwarded::Done(response, settled.remaining));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Some(framing) = Framing::of(content_type) {
        let end = ticket.order.background.then(background::creation_end);
        return Ok(Forwarded::Stream(Box::new(PendingStream {
            end,
            response,
            ticket,
            status,
            headers,
            framing,
            strip_usage_chunk: answer.usage_injected,
            request_body,
            overhead: pre_send,
            idle_timeout: upstream.idle_timeout,
        })));
    }
    let bytes = stage!(ticket, forward::read_body(upstream, response).await);
    let upstream_wait = answer.sent_at.elapsed();
    // Whatever the body says (or fails to say) about usage, the client gets
    // it unchanged; tollgate estimates what it cannot read.
    let mut facts = ticket.who.format.read_body(ticket.who.endpoint, &bytes);
    // A background response, answered before it is done: billed when it is.
    if let Some(id) = facts.unfinished.take().filter(|_| status == StatusCode::OK) {
        let remaining = background::open(state, ticket, id).await;
        let response = build_response(status, headers, Body::from(bytes));
        return Ok(Forwarded::Done(response, remaining));
    }
    let usage = match facts.usage {
        Some(usage) => usage,
        None => estimate_non_stream(&ticket, &request_body, &bytes).await,
    };
    if status == StatusCode::OK {
        state.words.offer(|| {
            settle::word_sample(
                state,
                &ticket,
                facts.served.model.as_deref(),
                request_body.clone(),
                crate::words::Answer::Body(bytes.clone()),
                usage,
            )
        });
    }
    let started = ticket.who.started;
    let overhead = started.elapsed().saturating_sub(upstream_wait);
    let settled = settle(
        state,
        ticket,
        status.as_u16(),
        usage,
        &facts.served,
        overhead,
    );
    let first_byte = started.elapsed().as_secs_f64();
    settled
        .series
        .observe_first_byte(&state.metrics, first_byte);
    let mut response = build_response(status, headers, Body::from(bytes));
    if let Ok(v) = HeaderValue::from_str(settled.cost.usd_text(&mut [0; 32])) {
        response.headers_mut().insert(COST_USD, v);
    }
    Ok(Forwarded::Done(response, settled.remaining))
}

fn with_request_id(mut response: Response, id: Option<HeaderValue>) -> Response {
    if let Some(v) = id {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// Tokens for a response that reported none, counted off the reactor threads.
async fn estimate_non_stream(ticket: &Ticket, request: &Bytes, response: &Bytes) -> Usage {
    let encoding = ticket.order.encoding();
    let (format, endpoint) = (ticket.who.format, ticket.who.endpoint);
    let (request, response) = (request.clone(), response.clone());
    let task = tokio::task::spawn_blocking(move || {
        let texts = serde_json::from_slice::<serde_json::Value>(&response)
            .map(|v| format.response_texts(endpoint, &v))
            .unwrap_or_default();
        format.estimate_usage(endpoint, encoding, &request, &texts, response.len())
    });
    match task.await {
        Ok(usage) => usage,
        Err(e) => {
            tracing::error!(error = %e, model = %ticket.order.model, "token estimate failed");
            Usage {
                source: TokenSource::Estimated,
                ..Usage::NONE
            }
        }
    }
}

/// `/v1/models` and every other path: admitted (a team with a budget only
/// where `auth.allow_unmetered` says), forwarded as it is, streamed both
/// ways, counted as a request without tokens.
async fn unmetered(
    state: &Arc<Proxy>,
    mut ticket: Ticket,
    req: http::Request<Body>,
) -> Result<Forwarded, Refused> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path();
    stage!(
        ticket,
        admit::check_unmetered_allowed(state, &ticket.who, &parts.method, path)
    );
    let format = ticket.who.format;
    let upstream = stage!(
        ticket,
        route::pick_upstream(state, &parts.headers, None, format)
    );
    ticket.sent = settle::Sent::to(upstream);
    ticket.hold.remaining = state.ledger.status(&ticket.who.team).map(|s| s.remaining);
    let pre_send = ticket.who.started.elapsed();
    let mut response = stage!(
        ticket,
        forward::forward_as_is(state, upstream, &mut parts, body).await
    );
    let status = response.status();
    let headers = forward::client_headers(std::mem::take(response.headers_mut()));
    let settled = settle_without_usage(state, ticket, status.as_u16(), pre_send);
    let response = build_response(status, headers, Body::new(response.into_body()));
    Ok(Forwarded::Done(response, settled.remaining))
}

/// Runs `sweep` (and the batches' `batch::sweep`) every
/// `background.poll_interval_ms` while the state lives.
pub fn spawn_sweeper(
    state: std::sync::Weak<Proxy>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { break };
            background::sweep(&state).await;
            batch::sweep(&state).await;
        }
    })
}
