//! The Batch API (SPEC 12): OpenAI's `/v1/batches` with its `/v1/files`,
//! Anthropic's `/v1/messages/batches`. A batch is billed once, line by
//! line, when its results are read, whoever asks for them.
//!
//! - An input file a budgeted team uploads (`purpose=batch`) is read for
//!   what its requests may cost at batch prices (`reserve::batch_line_bound`),
//!   recorded in `batch_files`.
//! - A batch created through tollgate is recorded in `batches` with the
//!   team and key that created it; a budgeted team's batch holds its bound
//!   until it is billed (from its input file, or from Anthropic's inline
//!   requests), or is refused with 403 `batch_not_bounded`.
//! - A poll that shows the batch ended, a download of its results, or
//!   tollgate's own poll (`sweep`) starts `bill`: the one process that
//!   claims the batch (`Store::claim_batch`) reads its results from the
//!   upstream itself, off every request's way, and writes one usage row per
//!   line (`endpoint = "batch"`, `request_id` = the line's `custom_id`,
//!   `batch_id`) at the model's batch prices. The usage index keeps a line
//!   to one row even if the results are read twice. A cancelled or expired
//!   batch bills the lines that completed.
//!
//! Everything else under those paths (lists, cancels, file metadata) goes
//! up as it is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use chrono::Utc;
use http::{header, HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;

use super::parked::{Held, Proxy};
use super::reply::{build_response, Forwarded, Refused};
use super::settle::{self, settle, settle_without_usage, Admission, Ticket};
use super::{admit, forward, reserve, route};

use crate::error::ApiError;
use crate::format::WireFormat;
use crate::pricing::NanoUsd;
use crate::store::BatchRow;
use crate::usage::{Endpoint, ServiceTier, Usage};

/// A batch's result lines longer than this are skipped (and logged).
const MAX_LINE_BYTES: usize = 16 << 20;

/// What a request under the batch paths is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `POST /v1/files`.
    Upload,
    /// `POST /v1/batches`, `POST /v1/messages/batches`.
    Create,
    /// `GET /v1/batches/{id}`, `GET /v1/messages/batches/{id}`.
    Poll(String),
    /// `GET /v1/files/{id}/content`, `GET /v1/messages/batches/{id}/results`.
    Results(String),
    /// Lists, cancels, deletes: up as they are.
    Other,
}

/// The batch operation of a request, if it is one.
pub fn op_of(format: WireFormat, method: &Method, path: &str) -> Option<Op> {
    // Every request asks: the common answer costs no allocation.
    let batch_path = ["/v1/files", "/v1/batches", "/v1/messages/batches"]
        .iter()
        .any(|p| path.starts_with(p));
    if !batch_path {
        return None;
    }
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let get = *method == Method::GET;
    let post = *method == Method::POST;
    match (format, segments.as_slice()) {
        (WireFormat::OpenAi, ["", "v1", "files"]) if post => Some(Op::Upload),
        (WireFormat::OpenAi, ["", "v1", "files", id, "content"]) if get => {
            Some(Op::Results(id.to_string()))
        }
        (WireFormat::OpenAi, ["", "v1", "batches"]) if post => Some(Op::Create),
        (WireFormat::OpenAi, ["", "v1", "batches", id]) if get => Some(Op::Poll(id.to_string())),
        (WireFormat::OpenAi, ["", "v1", "batches", ..]) => Some(Op::Other),
        (WireFormat::Anthropic, ["", "v1", "messages", "batches"]) if post => Some(Op::Create),
        (WireFormat::Anthropic, ["", "v1", "messages", "batches", id]) if get => {
            Some(Op::Poll(id.to_string()))
        }
        (WireFormat::Anthropic, ["", "v1", "messages", "batches", id, "results"]) if get => {
            Some(Op::Results(id.to_string()))
        }
        (WireFormat::Anthropic, ["", "v1", "messages", "batches", ..]) => Some(Op::Other),
        _ => None,
    }
}

/// A request under the batch paths, whichever it is.
pub(super) async fn handle(
    state: &Arc<Proxy>,
    mut ticket: Ticket,
    req: http::Request<Body>,
    op: Op,
) -> Result<Forwarded, Refused> {
    let format = ticket.who.format;
    let (mut parts, body) = req.into_parts();
    let upstream = match route::pick_upstream(state, &parts.headers, None, format) {
        Ok(u) => u,
        Err(e) => return Err(Refused(ticket, e)),
    };
    ticket.sent = settle::Sent::to(upstream);
    let credentials = super::parked::poll_credentials(state, &parts.headers)
        .map(|b| *b)
        .unwrap_or_default();
    let accounts = ticket.budget_accounts();
    let budgeted = state.ledger.has_any(&accounts);
    ticket.hold.remaining = state.ledger.remaining_of(&accounts);
    let pre_send = ticket.who.started.elapsed();
    // What goes up: the body read where tollgate must see it first.
    let (body, read) = match (&op, budgeted) {
        (Op::Create, _) | (Op::Upload, true) => {
            match admit::read_body(state, body, &parts.headers).await {
                Ok(bytes) => (Body::from(bytes.clone()), Some(bytes)),
                Err(e) => return Err(Refused(ticket, e)),
            }
        }
        _ => (body, None),
    };
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (bound, lines_endpoint) = match (&op, &read) {
        (Op::Create, Some(bytes)) => match hold(state, &ticket, bytes).await {
            Ok((hold, endpoint)) => {
                if let Some(h) = &hold {
                    ticket.hold.remaining = Some(h.remaining());
                }
                (hold, endpoint)
            }
            Err(e) => return Err(Refused(ticket, e)),
        },
        _ => (None, String::new()),
    };
    let response = forward::forward_as_is(state, upstream, &mut parts, body).await;
    let mut response = match response {
        Ok(r) => r,
        Err(e) => return Err(Refused(ticket, e)),
    };
    let status = response.status();
    let headers = forward::client_headers(std::mem::take(response.headers_mut()));
    // Small JSON answers tollgate reads on their way back (an upload only
    // when it read the upload); everything else streams through.
    let inspect = status.is_success()
        && match op {
            Op::Upload => read.is_some(),
            Op::Create | Op::Poll(_) => true,
            Op::Results(_) | Op::Other => false,
        };
    if !inspect {
        let settled = settle_without_usage(state, ticket, status.as_u16(), pre_send);
        if let (Op::Results(id), true) = (&op, status.is_success()) {
            results_read(state, format, id.clone(), credentials);
        }
        let response = build_response(status, headers, Body::new(response.into_body()));
        return Ok(Forwarded::Done(response, settled.remaining));
    }
    let bytes = match forward::read_body(upstream, response).await {
        Ok(bytes) => bytes,
        Err(e) => return Err(Refused(ticket, e)),
    };
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    match &op {
        Op::Upload => {
            if let Some(file) = read.as_ref() {
                uploaded(state, &ticket.who.team, &content_type, file, &json).await;
            }
        }
        Op::Create => {
            created(
                state,
                &ticket,
                format,
                &json,
                &lines_endpoint,
                bound,
                credentials,
            )
            .await;
        }
        Op::Poll(id) => polled(state, format, id, &json, credentials).await,
        _ => {}
    }
    let settled = settle_without_usage(state, ticket, status.as_u16(), pre_send);
    let response = build_response(status, headers, Body::from(bytes));
    Ok(Forwarded::Done(response, settled.remaining))
}

/// A batch creation's hold, for a budgeted team (its bound reserved, or
/// why not), and its lines' endpoint label.
async fn hold(
    state: &Proxy,
    ticket: &Ticket,
    body: &Bytes,
) -> Result<(Option<crate::budget::Reservation>, String), ApiError> {
    let team = &ticket.who.team;
    let (bound, endpoint) = created_bound(state, ticket.who.format, team, body).await?;
    let accounts = ticket.budget_accounts();
    if !state.ledger.has_any(&accounts) {
        return Ok((None, endpoint));
    }
    let Some(amount) = bound else {
        return Err(ApiError::BatchNotBounded {
            team: team.clone(),
            reason: "its input file was not uploaded through tollgate by this team, or a line names no priced model".into(),
        });
    };
    match reserve::reserve_amount(state, &accounts, amount).await {
        Ok(hold) => Ok((hold, endpoint)),
        Err(refusal) => Err(reserve::refusal_error(state, team, refusal)),
    }
}

/// What a batch creation may cost (`None`: not bounded) and its lines'
/// endpoint label.
async fn created_bound(
    state: &Proxy,
    format: WireFormat,
    team: &str,
    body: &Bytes,
) -> Result<(Option<NanoUsd>, String), ApiError> {
    let json: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
    })?;
    match format {
        WireFormat::Anthropic => {
            let requests = json
                .get("requests")
                .and_then(serde_json::Value::as_array)
                .ok_or_else(|| {
                    ApiError::invalid("`requests` must be an array.", Some("requests"))
                })?;
            let mut total = Some(NanoUsd(0));
            for r in requests {
                let params = r.get("params").map(|p| Bytes::from(p.to_string()));
                let line = params.and_then(|p| {
                    reserve::batch_line_bound(state, WireFormat::Anthropic, Endpoint::Messages, &p)
                });
                total = match (total, line) {
                    (Some(t), Some(l)) => Some(NanoUsd(t.0.saturating_add(l.0))),
                    _ => None,
                };
            }
            Ok((total, Endpoint::Messages.label().to_string()))
        }
        _ => {
            let endpoint = json
                .get("endpoint")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("");
            let label = Endpoint::from_path(endpoint).label().to_string();
            let file = json
                .get("input_file_id")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("");
            let bound = match state.store.batch_file(file).await {
                Ok(Some((owner, bound))) if owner == team => bound.map(NanoUsd),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "reading a batch input file's bound failed");
                    None
                }
            };
            Ok((bound, label))
        }
    }
}

/// A batch input file uploaded by a budgeted team: what its requests may
/// cost, recorded under the id the upstream gave it.
async fn uploaded(
    state: &Proxy,
    team: &str,
    content_type: &str,
    body: &Bytes,
    answer: &serde_json::Value,
) {
    let Some(file_id) = answer.get("id").and_then(serde_json::Value::as_str) else {
        return;
    };
    let Ok(form) = crate::format::media::read_form_with_file(content_type, body) else {
        return;
    };
    if form.get("purpose") != Some("batch") {
        return;
    }
    let file = form.file.unwrap_or_default();
    let mut lines = 0u64;
    let mut total = Some(0u64);
    for line in file
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
    {
        lines += 1;
        let bound = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| {
                let endpoint = Endpoint::from_path(v.get("url")?.as_str()?);
                let body = Bytes::from(v.get("body")?.to_string());
                reserve::batch_line_bound(state, WireFormat::OpenAi, endpoint, &body)
            });
        total = match (total, bound) {
            (Some(t), Some(b)) => Some(t.saturating_add(b.0)),
            _ => None,
        };
    }
    if let Err(e) = state
        .store
        .insert_batch_file(file_id, team, lines, total)
        .await
    {
        tracing::warn!(error = %e, file = %file_id, "recording a batch input file failed: a batch of it will be refused");
    }
}

/// A batch the upstream accepted: recorded with its team and key, its
/// hold kept until it is billed.
async fn created(
    state: &Proxy,
    ticket: &Ticket,
    format: WireFormat,
    answer: &serde_json::Value,
    endpoint: &str,
    hold: Option<crate::budget::Reservation>,
    credentials: HeaderMap,
) {
    let Some(id) = answer.get("id").and_then(serde_json::Value::as_str) else {
        return;
    };
    let row = BatchRow {
        batch_id: id.to_string(),
        format: format_name(format).to_string(),
        team: ticket.who.team.clone(),
        key_id: ticket.who.key.as_ref().map(|k| k.id.clone()),
        upstream: ticket.sent.upstream.clone(),
        endpoint: endpoint.to_string(),
        created_at: ticket.who.created_at,
        reserved_nano_usd: hold.as_ref().map_or(0, |r| r.amount().0),
        output_file_id: None,
        billed: false,
    };
    if let Err(e) = state.store.insert_batch(&row).await {
        tracing::error!(error = %e, batch = %id, team = %row.team, "batch not recorded: its results will not be billed");
    }
    if let Some(reservation) = hold {
        state.batches.lock().insert(
            id.to_string(),
            Held {
                reservation,
                credentials,
            },
        );
    }
}

fn format_name(format: WireFormat) -> &'static str {
    match format {
        WireFormat::Anthropic => "anthropic",
        _ => "openai",
    }
}

fn format_of(name: &str) -> WireFormat {
    match name {
        "anthropic" => WireFormat::Anthropic,
        _ => WireFormat::OpenAi,
    }
}

/// Where a batch stands, from a poll's answer: ended (its results ready,
/// complete or not), and OpenAI's output file.
fn standing(format: WireFormat, answer: &serde_json::Value) -> (bool, Option<String>) {
    let text = |k: &str| answer.get(k).and_then(serde_json::Value::as_str);
    match format {
        WireFormat::Anthropic => (text("processing_status") == Some("ended"), None),
        _ => (
            matches!(
                text("status"),
                Some("completed" | "failed" | "expired" | "cancelled")
            ),
            text("output_file_id").map(str::to_string),
        ),
    }
}

async fn polled(
    state: &Arc<Proxy>,
    format: WireFormat,
    id: &str,
    answer: &serde_json::Value,
    credentials: HeaderMap,
) {
    let (ended, output) = standing(format, answer);
    if let Some(file) = &output {
        let _ = state.store.set_batch_output(id, file).await;
    }
    if ended {
        let state = state.clone();
        let id = id.to_string();
        tokio::spawn(async move { bill(&state, &id, credentials).await });
    }
}

/// A client read a batch's results: billed from them (tollgate reads them
/// itself, whole, whatever the client reads).
fn results_read(state: &Arc<Proxy>, format: WireFormat, id: String, credentials: HeaderMap) {
    let state = state.clone();
    tokio::spawn(async move {
        let batch_id = match format {
            WireFormat::Anthropic => Some(id),
            _ => match state.store.batch_of_output(&id).await {
                Ok(Some(b)) => Some(b.batch_id),
                _ => None,
            },
        };
        if let Some(batch_id) = batch_id {
            bill(&state, &batch_id, credentials).await;
        }
    });
}

/// GETs `path` from the batch's upstream with `credentials` (passthrough)
/// or the upstream's own key.
async fn fetch(
    state: &Proxy,
    upstream: &crate::upstream::Upstream,
    path: &str,
    credentials: HeaderMap,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let request = http::Request::get(path)
        .body(())
        .map_err(|e| e.to_string())?;
    let (mut parts, ()) = request.into_parts();
    parts.headers = credentials;
    if path.starts_with("/v1/messages/") && !parts.headers.contains_key("anthropic-version") {
        // Anthropic's API wants its version on every request.
        parts.headers.insert(
            http::HeaderName::from_static("anthropic-version"),
            http::HeaderValue::from_static("2023-06-01"),
        );
    }
    match forward::forward_as_is(state, upstream, &mut parts, Body::empty()).await {
        Ok(r) if r.status() == StatusCode::OK => Ok(r),
        Ok(r) => Err(format!("{path}: status {}", r.status())),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

/// Bills a batch whose results are ready, once: polls it (it must have
/// ended), claims it, reads its results line by line, writes a row per
/// line, then settles the batch's hold with what the lines cost.
pub async fn bill(state: &Arc<Proxy>, batch_id: &str, credentials: HeaderMap) {
    let Ok(Some(batch)) = state.store.batch(batch_id).await else {
        return;
    };
    if batch.billed {
        state.batches.lock().remove(batch_id);
        return;
    }
    let Some(upstream) = state.upstreams.by_name(&batch.upstream) else {
        return;
    };
    let credentials = state
        .batches
        .credentials(batch_id)
        .filter(|c| !c.is_empty())
        .unwrap_or(credentials);
    let format = format_of(&batch.format);
    let poll_path = match format {
        WireFormat::Anthropic => format!("/v1/messages/batches/{batch_id}"),
        _ => format!("/v1/batches/{batch_id}"),
    };
    let answer = match fetch(state, upstream, &poll_path, credentials.clone()).await {
        Ok(r) => forward::read_body(upstream, r).await.unwrap_or_default(),
        Err(e) => {
            tracing::debug!(error = %e, batch = %batch_id, "polling a batch");
            return;
        }
    };
    let json: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
    let (ended, output) = standing(format, &json);
    if !ended {
        return;
    }
    let results_path = match (format, &output) {
        (WireFormat::Anthropic, _) => format!("/v1/messages/batches/{batch_id}/results"),
        (_, Some(file)) => format!("/v1/files/{file}/content"),
        // Ended with no output at all (every line failed, or none ran).
        (_, None) => String::new(),
    };
    let Ok(Some(batch)) = state.store.claim_batch(batch_id).await else {
        state.batches.lock().remove(batch_id);
        return;
    };
    let total = if results_path.is_empty() {
        Ok(NanoUsd(0))
    } else {
        bill_results(state, &batch, upstream, &results_path, credentials).await
    };
    match total {
        Ok(total) => {
            let held = state.batches.lock().remove(batch_id);
            if let Some(h) = held {
                h.reservation.settle(total);
            }
            tracing::info!(batch = %batch_id, team = %batch.team, cost_nano_usd = total.0, "batch billed");
        }
        Err(e) => {
            tracing::warn!(error = %e, batch = %batch_id, "reading a batch's results failed; it will be tried again");
            let _ = state.store.unclaim_batch(batch_id).await;
        }
    }
}

/// Reads a batch's results as they stream in, one usage row per line;
/// what they cost in all.
async fn bill_results(
    state: &Proxy,
    batch: &BatchRow,
    upstream: &crate::upstream::Upstream,
    path: &str,
    credentials: HeaderMap,
) -> Result<NanoUsd, String> {
    let response = fetch(state, upstream, path, credentials).await?;
    let mut body = response.into_body();
    let mut pending = BytesMut::new();
    let mut total = NanoUsd(0);
    let mut skipping = false;
    loop {
        let frame = match tokio::time::timeout(upstream.idle_timeout, body.frame()).await {
            Err(_) => return Err(format!("{path}: no data for {:?}", upstream.idle_timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(format!("{path}: {e}")),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line = pending.split_to(end + 1);
            if !std::mem::take(&mut skipping) {
                total = NanoUsd(total.0.saturating_add(bill_line(state, batch, &line).0));
            }
        }
        if pending.len() > MAX_LINE_BYTES {
            tracing::warn!(batch = %batch.batch_id, "a batch result line over {MAX_LINE_BYTES} bytes was skipped");
            pending.clear();
            skipping = true;
        }
    }
    if !pending.is_empty() && !skipping {
        total = NanoUsd(total.0.saturating_add(bill_line(state, batch, &pending).0));
    }
    Ok(total)
}

/// One result line's usage row; its cost.
fn bill_line(state: &Proxy, batch: &BatchRow, line: &[u8]) -> NanoUsd {
    if line.iter().all(u8::is_ascii_whitespace) {
        return NanoUsd(0);
    }
    let format = format_of(&batch.format);
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else {
        tracing::warn!(batch = %batch.batch_id, "a batch result line is not JSON: skipped");
        return NanoUsd(0);
    };
    let Some(result) = format.batch_line(&value) else {
        return NanoUsd(0);
    };
    let facts = result
        .body
        .map(crate::usage::read::facts_from_value)
        .unwrap_or_default();
    let mut served = facts.served;
    served.tier = Some(ServiceTier::Batch);
    let model = served.model.clone().unwrap_or_default();
    let who = Admission {
        request_id: crate::usage::bounded_model(result.custom_id).to_string(),
        started: Instant::now(),
        // The batch's creation, not the billing: a line read twice is one
        // row with one time (on Postgres, in one month's partition), and
        // its cost lands where its hold was.
        created_at: batch.created_at,
        format,
        endpoint: Endpoint::Batch,
        team: batch.team.clone(),
        key: batch
            .key_id
            .clone()
            .map(|id| crate::auth::KeyEntry::of_row(id, batch.team.clone())),
        trace_parent: None,
    };
    let sent = settle::Sent::to_named(&state.upstreams, batch.upstream.clone());
    let mut ticket = Ticket::for_row(state, who, model, sent);
    ticket.order.batch_id = Some(batch.batch_id.clone());
    let usage = facts.usage.unwrap_or(Usage::NONE);
    settle(state, ticket, result.status, usage, &served, Duration::ZERO).cost
}

/// tollgate's own polls of the batches not billed yet (every
/// `background.poll_interval_ms`), so a batch nobody polls is billed too.
pub async fn sweep(state: &Arc<Proxy>) {
    let interval = Duration::from_millis(state.config.background.poll_interval_ms);
    let before = Utc::now() - chrono::Duration::from_std(interval).unwrap_or_default();
    let Ok(open) = state.store.open_batches(before, 1000).await else {
        return;
    };
    let virtual_keys = state.auth.mode() == crate::config::AuthMode::VirtualKeys;
    for batch in open {
        let credentials = state.batches.credentials(&batch.batch_id);
        if credentials.is_some() || virtual_keys {
            bill(state, &batch.batch_id, credentials.unwrap_or_default()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_paths_are_told_apart() {
        let (get, post) = (Method::GET, Method::POST);
        let open_ai = |m: &Method, p: &str| op_of(WireFormat::OpenAi, m, p);
        let claude = |m: &Method, p: &str| op_of(WireFormat::Anthropic, m, p);
        assert_eq!(open_ai(&post, "/v1/files"), Some(Op::Upload));
        assert_eq!(open_ai(&get, "/v1/files"), None);
        assert_eq!(
            open_ai(&get, "/v1/files/f1/content"),
            Some(Op::Results("f1".into()))
        );
        assert_eq!(open_ai(&post, "/v1/batches"), Some(Op::Create));
        assert_eq!(open_ai(&get, "/v1/batches"), Some(Op::Other));
        assert_eq!(open_ai(&get, "/v1/batches/b1"), Some(Op::Poll("b1".into())));
        assert_eq!(open_ai(&post, "/v1/batches/b1/cancel"), Some(Op::Other));
        assert_eq!(open_ai(&post, "/v1/chat/completions"), None);
        assert_eq!(claude(&post, "/v1/messages/batches"), Some(Op::Create));
        assert_eq!(
            claude(&get, "/v1/messages/batches/m1"),
            Some(Op::Poll("m1".into()))
        );
        assert_eq!(
            claude(&get, "/v1/messages/batches/m1/results"),
            Some(Op::Results("m1".into()))
        );
        assert_eq!(claude(&post, "/v1/messages"), None);
    }
}
