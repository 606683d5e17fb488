//! Background responses (`background: true`, SPEC 12): answered `queued`
//! before anything is generated, billed once, when they finish.
//!
//! - `open`: a creation answered unfinished parks its ticket (the budget
//!   hold with it) here, keyed by response id, and records a
//!   `pending_usage` row for every replica and for a restart.
//! - `poll`: `GET /v1/responses/{id}` (JSON, or `?stream=true`: the resumed
//!   stream) and `POST /v1/responses/{id}/cancel` go up as they are; an
//!   answer that shows the response finished claims it
//!   (`Store::claim_pending`: one claimer wins, whichever replica asks)
//!   and settles its ticket with the usage it reports.
//! - `sweep`: every `background.poll_interval_ms` tollgate polls what is
//!   still pending itself, where it holds a credential (the upstream's key;
//!   in passthrough mode the client's, kept in memory only), so a client
//!   that never comes back (webhooks) is billed all the same; a response
//!   pending past `background.horizon_secs` is reported.
//!
//! Never on the path of any other request: only background creations and
//! polls touch the database here.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use chrono::Utc;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

use super::parked::{Proxy, Waiting};
use super::reply::{build_response, Forwarded, Refused, COST_USD};
use super::settle::{self, settle, settle_without_usage, Admission, Ticket};
use super::stream::{MeteredStream, StreamEnd, StreamSettlement};
use super::{forward, route};

use crate::error::ApiError;
use crate::format::WireFormat;
use crate::pricing::NanoUsd;
use crate::store::PendingRow;
use crate::usage::frames::Framing;
use crate::usage::read::Served;
use crate::usage::sse::StreamSummary;
use crate::usage::{Endpoint, Usage};

/// A poll's path: the response id, and whether it is a cancel.
pub fn poll_of<'a>(method: &Method, path: &'a str) -> Option<(&'a str, bool)> {
    let rest = path.strip_prefix("/v1/responses/")?;
    match rest.split_once('/') {
        None if *method == Method::GET && !rest.is_empty() => Some((rest, false)),
        Some((id, "cancel")) if *method == Method::POST && !id.is_empty() => Some((id, true)),
        _ => None,
    }
}

/// Parks a creation answered unfinished until it finishes; the budget left.
pub async fn open(state: &Arc<Proxy>, mut ticket: Ticket, response_id: String) -> Option<NanoUsd> {
    let reserved = ticket.hold.reservation.as_ref().map_or(0, |r| r.amount().0);
    let remaining = match &ticket.hold.reservation {
        Some(r) => Some(r.remaining()),
        None => ticket.hold.remaining,
    };
    let row = PendingRow {
        response_id: response_id.clone(),
        request_id: ticket.who.request_id.clone(),
        created_at: ticket.who.created_at,
        team: ticket.who.team.clone(),
        key_id: ticket.who.key.as_ref().map(|k| k.id.clone()),
        model: ticket.order.model.clone(),
        upstream: ticket.sent.upstream.clone(),
        end_user: ticket.order.end_user.clone(),
        reserved_nano_usd: reserved,
    };
    let stored = match state.store.insert_pending(&row).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, response = %response_id, team = %row.team,
                "background response not recorded as pending: billed only if it finishes while this process runs");
            false
        }
    };
    // The creation's answer is not held for a usage row that comes later.
    ticket.answer_durable();
    let credentials = ticket
        .poll_credentials
        .take()
        .map(|b| *b)
        .unwrap_or_default();
    state.background.lock().insert(
        response_id,
        Waiting {
            upstream: row.upstream,
            ticket,
            credentials,
            stored,
            last_polled: Instant::now(),
        },
    );
    gauges_later(state);
    remaining
}

/// The pending gauges set again, off the request's way.
fn gauges_later(state: &Arc<Proxy>) {
    let state = state.clone();
    tokio::spawn(async move {
        let horizon = Duration::from_secs(state.config.background.horizon_secs);
        report(&state, horizon).await;
    });
}

/// The end of a background creation's stream: cut before its response
/// finished, the response goes on upstream, so it is parked (billed when it
/// finishes), not estimated; else it settles as any stream.
pub fn creation_end() -> StreamEnd {
    Box::new(|s: StreamSettlement, _status, summary: StreamSummary| {
        match (&summary.usage, &summary.response_id) {
            (None, Some(id)) => {
                open_later(s.state, s.ticket, id.clone());
                None
            }
            _ => Some((s, summary)),
        }
    })
}

/// `open`, for a creation stream cut before its response finished (from
/// the stream's end, which cannot wait).
fn open_later(state: Arc<Proxy>, ticket: Ticket, response_id: String) {
    tokio::spawn(async move {
        open(&state, ticket, response_id).await;
    });
}

/// Claims a finished response for billing: its ticket (this replica's
/// own, or one made from the stored row), to this caller only.
async fn claim(state: &Proxy, id: &str) -> Option<Ticket> {
    match state.store.claim_pending(id).await {
        Ok(Some(row)) => Some(match state.background.take(id) {
            Some(w) => w.ticket,
            None => ticket_of(state, row),
        }),
        // Claimed elsewhere (the hold here is released), or never stored.
        Ok(None) => match state.background.take(id) {
            Some(w) if !w.stored => Some(w.ticket),
            _ => None,
        },
        Err(e) => {
            tracing::warn!(error = %e, response = %id, "claiming a finished background response failed; it stays pending");
            None
        }
    }
}

/// The ticket of a response another process created, from its row.
fn ticket_of(state: &Proxy, row: PendingRow) -> Ticket {
    let age = (Utc::now() - row.created_at).to_std().unwrap_or_default();
    let who = Admission {
        request_id: row.request_id,
        started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
        created_at: row.created_at,
        format: WireFormat::OpenAi,
        endpoint: Endpoint::Responses,
        key: row
            .key_id
            .map(|id| crate::auth::KeyEntry::of_row(id, row.team.clone())),
        team: row.team,
        trace_parent: None,
    };
    let sent = settle::Sent::to_named(&state.upstreams, row.upstream);
    let mut ticket = Ticket::for_row(state, who, row.model, sent);
    ticket.order.end_user = row.end_user;
    ticket.order.background = true;
    ticket
}

/// Bills a claimed response with what its final object says; the cost.
fn bill(state: &Proxy, ticket: Ticket, usage: Option<Usage>, served: &Served) -> NanoUsd {
    let overhead = Duration::ZERO;
    settle(
        state,
        ticket,
        200,
        usage.unwrap_or(Usage::NONE),
        served,
        overhead,
    )
    .cost
}

/// `GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`: passed up
/// as they are; a finished response is billed here, once.
pub(super) async fn poll(
    state: &Arc<Proxy>,
    mut ticket: Ticket,
    req: http::Request<Body>,
) -> Result<Forwarded, Refused> {
    let (mut parts, body) = req.into_parts();
    let Some((id, _cancel)) = poll_of(&parts.method, parts.uri.path()) else {
        let e = ApiError::NotFound {
            path: parts.uri.path().to_string(),
        };
        return Err(Refused(ticket, e));
    };
    let id = id.to_string();
    // A pending response is its team's to see, not another's.
    let owner = match state.background.owner(&id) {
        Some(owner) => Some(owner),
        None => state
            .store
            .pending(&id)
            .await
            .ok()
            .flatten()
            .map(|r| (r.team, r.upstream)),
    };
    if owner
        .as_ref()
        .is_some_and(|(team, _)| *team != ticket.who.team)
    {
        let e = ApiError::NotFound {
            path: parts.uri.path().to_string(),
        };
        return Err(Refused(ticket, e));
    }
    let upstream = match owner.and_then(|(_, u)| state.upstreams.by_name(&u)) {
        Some(u) => u,
        None => match route::pick_upstream(state, &parts.headers, None, WireFormat::OpenAi) {
            Ok(u) => u,
            Err(e) => return Err(Refused(ticket, e)),
        },
    };
    ticket.sent = settle::Sent::to(upstream);
    let pre_send = ticket.who.started.elapsed();
    let mut response = match forward::forward_as_is(state, upstream, &mut parts, body).await {
        Ok(r) => r,
        Err(e) => return Err(Refused(ticket, e)),
    };
    let status = response.status();
    let headers = forward::client_headers(std::mem::take(response.headers_mut()));
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if status.is_success() {
        if let Some(framing) = Framing::of(content_type) {
            return Ok(resumed_stream(
                state, ticket, id, response, headers, framing,
            ));
        }
    }
    let bytes = match forward::read_body(upstream, response).await {
        Ok(b) => b,
        Err(e) => return Err(Refused(ticket, e)),
    };
    let mut cost = None;
    if status == StatusCode::OK {
        let facts = WireFormat::OpenAi.read_body(Endpoint::Responses, &bytes);
        if facts.readable && facts.unfinished.is_none() {
            if let Some(claimed) = claim(state, &id).await {
                cost = Some(bill(state, claimed, facts.usage, &facts.served));
                gauges_later(state);
            }
        }
    }
    let settled = settle_without_usage(state, ticket, status.as_u16(), pre_send);
    let mut response = build_response(status, headers, Body::from(bytes));
    if let Some(cost) = cost {
        if let Ok(v) = HeaderValue::from_str(cost.usd_text(&mut [0; 32])) {
            response.headers_mut().insert(COST_USD, v);
        }
    }
    Ok(Forwarded::Done(response, settled.remaining))
}

/// The resumed stream of a background response, teed: the response is
/// billed when its last event passes (and stays pending if the stream is
/// cut before).
fn resumed_stream(
    state: &Arc<Proxy>,
    ticket: Ticket,
    id: String,
    response: http::Response<hyper::body::Incoming>,
    headers: HeaderMap,
    framing: Framing,
) -> Forwarded {
    let meter = WireFormat::OpenAi.stream_meter(Endpoint::Responses, framing, false);
    let idle = Duration::from_millis(state.config.server.idle_timeout_ms);
    let settlement = StreamSettlement {
        state: state.clone(),
        ticket,
        request_body: Bytes::new(),
        overhead: Duration::ZERO,
        end: Some(Box::new(
            move |s: StreamSettlement, status, summary: StreamSummary| {
                let usage = summary.done.then_some(summary.usage).flatten();
                stream_ended(
                    s.state,
                    s.ticket,
                    id,
                    status,
                    usage,
                    summary.served,
                    s.overhead,
                );
                None
            },
        )),
    };
    let stream = MeteredStream::new(
        Box::pin(http_body_util::BodyExt::into_data_stream(
            response.into_body(),
        )),
        meter,
        idle,
        settlement,
        None,
    );
    let response = build_response(StatusCode::OK, headers, Body::from_stream(stream));
    Forwarded::Done(response, None)
}

/// The end of a resumed stream: the poll's own row, and the response
/// billed if the stream showed it finished.
fn stream_ended(
    state: Arc<Proxy>,
    poll: Ticket,
    id: String,
    status: u16,
    usage: Option<Usage>,
    served: Served,
    overhead: Duration,
) {
    settle_without_usage(&state, poll, status, overhead);
    if usage.is_none() {
        return;
    }
    tokio::spawn(async move {
        if let Some(claimed) = claim(&state, &id).await {
            bill(&state, claimed, usage, &served);
            gauges_later(&state);
        }
    });
}

/// One round of the sweeper: polls what is pending (where tollgate holds a
/// credential), releases what another replica billed, reports the overdue,
/// and sets the gauges.
pub async fn sweep(state: &Arc<Proxy>) {
    let interval = Duration::from_millis(state.config.background.poll_interval_ms);
    let horizon = Duration::from_secs(state.config.background.horizon_secs);
    let now = Instant::now();
    // This replica's own: polled with the credentials it was created with.
    let due: Vec<(String, String, HeaderMap)> = {
        let mut waiting = state.background.lock();
        waiting
            .iter_mut()
            .filter(|(_, w)| now.duration_since(w.last_polled) >= interval)
            .map(|(id, w)| {
                w.last_polled = now;
                (id.clone(), w.upstream.clone(), w.credentials.clone())
            })
            .collect()
    };
    let mut polled: HashSet<String> = HashSet::new();
    for (id, upstream, credentials) in due {
        poll_upstream(state, &id, &upstream, credentials).await;
        polled.insert(id);
    }
    // Another process's (a restart): the upstream's own key can poll them.
    let before = Utc::now() - chrono::Duration::from_std(interval).unwrap_or_default();
    let rows = match state.store.pending_before(before, 1000).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "reading pending background responses failed");
            return;
        }
    };
    let virtual_keys = state.auth.mode() == crate::config::AuthMode::VirtualKeys;
    for row in &rows {
        let ours = state.background.owner(&row.response_id).is_some();
        if !ours && virtual_keys && !polled.contains(&row.response_id) {
            poll_upstream(state, &row.response_id, &row.upstream, HeaderMap::new()).await;
        }
    }
    release_claimed_elsewhere(state).await;
    report(state, horizon).await;
}

/// Polls one pending response upstream; bills it if it finished. A
/// response the upstream no longer knows (expired, deleted) is reported by
/// `report` once past the horizon.
async fn poll_upstream(state: &Proxy, id: &str, upstream: &str, credentials: HeaderMap) {
    let Some(upstream) = state.upstreams.by_name(upstream) else {
        return;
    };
    let Ok(request) = http::Request::get(format!("/v1/responses/{id}")).body(()) else {
        return;
    };
    let (mut parts, ()) = request.into_parts();
    parts.headers = credentials;
    let response = match forward::forward_as_is(state, upstream, &mut parts, Body::empty()).await {
        Ok(r) if r.status() == StatusCode::OK => r,
        Ok(r) => {
            tracing::debug!(status = %r.status(), response = %id, "polling a background response");
            return;
        }
        Err(e) => {
            tracing::debug!(error = %e, response = %id, "polling a background response");
            return;
        }
    };
    let Ok(bytes) = forward::read_body(upstream, response).await else {
        return;
    };
    let facts = WireFormat::OpenAi.read_body(Endpoint::Responses, &bytes);
    if facts.readable && facts.unfinished.is_none() {
        if let Some(claimed) = claim(state, id).await {
            bill(state, claimed, facts.usage, &facts.served);
        }
    }
}

/// Drops this replica's tickets whose row another replica claimed (their
/// budget holds are released with them).
async fn release_claimed_elsewhere(state: &Proxy) {
    let ids: Vec<String> = {
        let waiting = state.background.lock();
        waiting
            .iter()
            .filter(|(_, w)| w.stored)
            .map(|(id, _)| id.clone())
            .collect()
    };
    for id in ids {
        if let Ok(None) = state.store.pending(&id).await {
            state.background.take(&id);
        }
    }
}

/// The pending gauges, and a warning for each response pending past the
/// horizon (once per response and process).
async fn report(state: &Proxy, horizon: Duration) {
    let counts = match state.store.pending_counts().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "counting pending background responses failed");
            return;
        }
    };
    let cutoff = Utc::now() - chrono::Duration::from_std(horizon).unwrap_or_default();
    let overdue_rows = match counts.iter().any(|c| c.oldest < cutoff) {
        true => state
            .store
            .pending_before(cutoff, 10_000)
            .await
            .unwrap_or_default(),
        false => Vec::new(),
    };
    let mut overdue: HashMap<String, u64> = HashMap::new();
    {
        let mut reported = state
            .background
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for row in &overdue_rows {
            *overdue.entry(row.team.clone()).or_default() += 1;
            if reported.insert(row.response_id.clone()) {
                tracing::warn!(
                    response = %row.response_id,
                    team = %row.team,
                    model = %row.model,
                    since = %row.created_at,
                    "background response pending past the horizon: tollgate never saw it finish (poll it through tollgate, or bill it by hand)"
                );
            }
        }
    }
    let overdue: Vec<(String, u64)> = overdue.into_iter().collect();
    let counts: Vec<(String, u64)> = counts.into_iter().map(|c| (c.team, c.pending)).collect();
    state.metrics.publish_pending(&counts, &overdue);
}
