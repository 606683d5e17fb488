//! The Realtime API (`GET /v1/realtime`, a WebSocket; SPEC 12). The
//! client's handshake goes up as it came (tollgate's key in place of the
//! client's), the upstream's 101 comes back, and the two upgraded sockets
//! are framed (`tokio-tungstenite`) and relayed message by message, both
//! ways, unchanged. On the way:
//!
//! - every `response.done` the upstream sends is billed as it passes: one
//!   usage row per response (`endpoint = "realtime"`, `request_id` = the
//!   response's id, the session's id in `batch_id`, the column that groups
//!   rows), so a socket that drops loses nothing already answered;
//! - the budget is checked when the socket opens (a budgeted team needs a
//!   priced model and budget left) and before each `response.create` the
//!   client sends: its worst case (the conversation so far, every byte sent
//!   since, its output limit, at the model's dearest rates) is held until
//!   its `response.done`; a response the budget cannot cover is answered
//!   with an `error` event (`budget_exceeded`) and never sent up;
//! - a message over `server.max_body_bytes` closes the socket, and so does
//!   silence both ways for `server.idle_timeout_ms`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::parked::Proxy;
use super::reply::{build_response, Forwarded, Refused};
use super::settle::{self, settle, settle_without_usage, Admission, Order, Ticket};
use super::{forward, reserve, route};

use crate::error::ApiError;
use crate::format::openai::{realtime_event, RealtimeEvent};
use crate::format::WireFormat;
use crate::usage::{Endpoint, ServiceTier, Usage};

/// Output tokens a response may make when neither it nor the catalog says.
const DEFAULT_MAX_OUTPUT: u64 = 4096;

/// Whether a request is a Realtime WebSocket handshake.
pub fn is_realtime(req: &http::Request<Body>) -> bool {
    req.method() == Method::GET
        && req.uri().path().trim_end_matches('/') == "/v1/realtime"
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The model a handshake asks for (`?model=`).
fn query_model(uri: &http::Uri) -> Option<String> {
    uri.query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("model="))
        .map(|m| {
            percent_encoding::percent_decode_str(m)
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|m| !m.is_empty())
}

/// The handshake: checked against the budget, passed up, and on the
/// upstream's 101 the relay started.
pub(super) async fn open(
    state: &Arc<Proxy>,
    mut ticket: Ticket,
    mut req: http::Request<Body>,
) -> Result<Forwarded, Refused> {
    let model = query_model(req.uri()).unwrap_or_default();
    let resolved = state.catalog.load().resolve(&model);
    let team = ticket.who.team.clone();
    let accounts = ticket.budget_accounts();
    if state.ledger.has_any(&accounts) {
        if resolved.price.is_none() {
            let e = ApiError::UnpricedForBudget { model, team };
            return Err(Refused(ticket, e));
        }
        if let Some(over) = state.ledger.exhausted(&accounts) {
            return Err(Refused(ticket, ApiError::over_budget(&over)));
        }
    }
    ticket.order = Order {
        model_label: state.metrics.model_label(&model),
        resolved: Some(resolved),
        model: model.clone(),
        ..Order::NONE
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, _) = req.into_parts();
    let named = (!model.is_empty()).then_some(model.as_str());
    let upstream = match route::pick_upstream(state, &parts.headers, named, WireFormat::OpenAi) {
        Ok(u) => u,
        Err(e) => return Err(Refused(ticket, e)),
    };
    ticket.sent = settle::Sent::to(upstream);
    let pre_send = ticket.who.started.elapsed();
    let mut response = match forward::forward_upgrade(state, upstream, &mut parts).await {
        Ok(r) => r,
        Err(e) => return Err(Refused(ticket, e)),
    };
    let status = response.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // A refusal (401, 404, ...) reaches the client as it came.
        let headers = forward::client_headers(std::mem::take(response.headers_mut()));
        let settled = settle_without_usage(state, ticket, status.as_u16(), pre_send);
        let response = build_response(status, headers, Body::new(response.into_body()));
        return Ok(Forwarded::Done(response, settled.remaining));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    // The 101's own headers (accept key, protocol), its upgrade headers kept.
    let mut headers = forward::client_headers(std::mem::take(response.headers_mut()));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    ticket.answer_durable();
    let remaining = state.ledger.status(&ticket.who.team).map(|s| s.remaining);
    let relay = Relay::new(state.clone(), ticket, model);
    tokio::spawn(async move {
        match (client_upgrade.await, upstream_upgrade.await) {
            (Ok(client), Ok(upstream)) => relay.run(client, upstream).await,
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "realtime upgrade failed");
            }
        }
    });
    let response = build_response(StatusCode::SWITCHING_PROTOCOLS, headers, Body::empty());
    Ok(Forwarded::Done(response, remaining))
}

/// One session's relay and meter.
struct Relay {
    state: Arc<Proxy>,
    /// The handshake's ticket: who, where, and the model asked for.
    socket: Ticket,
    model: String,
    session_id: Option<String>,
    /// Prompt tokens of the last response (the conversation so far).
    conversation: u64,
    /// A bound on the prompt tokens the client added since.
    added: u64,
    /// Holds of the responses asked for and not done yet, oldest first.
    holds: VecDeque<crate::budget::Reservation>,
    responses: u64,
}

impl Relay {
    fn new(state: Arc<Proxy>, socket: Ticket, model: String) -> Relay {
        Relay {
            state,
            socket,
            model,
            session_id: None,
            conversation: 0,
            added: 0,
            holds: VecDeque::new(),
            responses: 0,
        }
    }

    async fn run(mut self, client: hyper::upgrade::Upgraded, upstream: hyper::upgrade::Upgraded) {
        let limit = self.state.config.server.max_body_bytes;
        let config = WebSocketConfig::default()
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let client =
            WebSocketStream::from_raw_socket(TokioIo::new(client), Role::Server, Some(config))
                .await;
        let upstream =
            WebSocketStream::from_raw_socket(TokioIo::new(upstream), Role::Client, Some(config))
                .await;
        let (mut to_client, mut from_client) = client.split();
        let (mut to_upstream, mut from_upstream) = upstream.split();
        let idle = Duration::from_millis(self.state.config.server.idle_timeout_ms);
        loop {
            let next = tokio::time::timeout(idle, async {
                tokio::select! {
                    m = from_client.next() => (true, m),
                    m = from_upstream.next() => (false, m),
                }
            })
            .await;
            let (from_the_client, message) = match next {
                Ok((side, Some(Ok(message)))) => (side, message),
                Ok((_, Some(Err(e)))) => {
                    tracing::debug!(error = %e, "realtime socket ended");
                    break;
                }
                Ok((_, None)) => break,
                Err(_) => {
                    tracing::debug!("realtime socket idle: closed");
                    break;
                }
            };
            if from_the_client {
                if let Some(refusal) = self.client_said(&message).await {
                    if to_client.send(Message::text(refusal)).await.is_err() {
                        break;
                    }
                    continue;
                }
                if to_upstream.send(message).await.is_err() {
                    break;
                }
            } else {
                self.upstream_said(&message);
                if to_client.send(message).await.is_err() {
                    break;
                }
            }
        }
        let _ = to_client.close().await;
        let _ = to_upstream.close().await;
        // Holds of responses never done are released with `self`.
    }

    /// A client message: counted, and a `response.create` held against the
    /// budget; the `error` event to answer instead when it cannot be.
    async fn client_said(&mut self, message: &Message) -> Option<String> {
        let Message::Text(text) = message else {
            self.added = self.added.saturating_add(message.len() as u64);
            return None;
        };
        let event = realtime_event(text);
        let RealtimeEvent::ResponseCreate { max_output_tokens } = event else {
            // Audio arrives base64-encoded: 100 bytes of it are far more
            // than a token of speech; every other byte may be a token.
            let bound = if text.contains("\"input_audio_buffer.append\"") {
                text.len() as u64 / 100 + 1
            } else {
                text.len() as u64
            };
            self.added = self.added.saturating_add(bound);
            return None;
        };
        let team = self.socket.who.team.clone();
        let accounts = crate::budget::accounts_of(
            &team,
            self.socket.who.key.as_ref().map(|k| k.id.as_str()),
            self.socket.order.end_user.as_deref(),
            &self.socket.order.tags,
        );
        if !self.state.ledger.has_any(&accounts) {
            return None;
        }
        let catalog = self.state.catalog.load();
        let resolved = catalog.resolve(self.billed_model());
        let Some(price) = resolved.price.as_deref() else {
            return Some(error_event(&ApiError::UnpricedForBudget {
                model: self.billed_model().to_string(),
                team,
            }));
        };
        let completion = max_output_tokens
            .or(price.max_output_tokens)
            .unwrap_or(DEFAULT_MAX_OUTPUT);
        let prompt = self.conversation.saturating_add(self.added);
        let worst = price.worst_case(
            prompt,
            completion,
            &[ServiceTier::Standard; 2],
            &[],
            catalog.tool_call_fees(),
        );
        match reserve::reserve_amount(&self.state, &accounts, worst).await {
            Ok(Some(hold)) => {
                self.holds.push_back(hold);
                None
            }
            Ok(None) => None,
            Err(refusal) => Some(error_event(&reserve::refusal_error(
                &self.state,
                &team,
                refusal,
            ))),
        }
    }

    /// The model responses are billed at: the session's, else the one asked for.
    fn billed_model(&self) -> &str {
        &self.model
    }

    /// An upstream message: the session's id and model noted, each
    /// `response.done` billed.
    fn upstream_said(&mut self, message: &Message) {
        let Message::Text(text) = message else {
            return;
        };
        match realtime_event(text) {
            RealtimeEvent::Session { id, model } => {
                if let Some(id) = id {
                    self.session_id = Some(crate::usage::bounded_model(&id).to_string());
                }
                if let Some(model) = model.filter(|m| !m.is_empty()) {
                    self.model = crate::usage::bounded_model(&model).to_string();
                }
            }
            RealtimeEvent::ResponseDone { id, usage } => self.bill(id, usage.map(|u| *u)),
            _ => {}
        }
    }

    /// One response's usage row, with the oldest hold settled by it.
    fn bill(&mut self, id: String, usage: Option<Usage>) {
        self.responses += 1;
        if let Some(u) = &usage {
            self.conversation = u.prompt_tokens.saturating_add(u.completion_tokens);
        }
        self.added = 0;
        let who = &self.socket.who;
        let request_id = match id.is_empty() {
            true => format!("{}-{}", who.request_id, self.responses),
            false => id,
        };
        let admission = Admission {
            request_id,
            started: Instant::now(),
            created_at: Utc::now(),
            format: WireFormat::OpenAi,
            endpoint: Endpoint::Realtime,
            team: who.team.clone(),
            key: who.key.clone(),
            trace_parent: who.trace_parent.clone(),
        };
        let sent = self.socket.sent.clone();
        let mut ticket = Ticket::for_row(&self.state, admission, self.model.clone(), sent);
        ticket.order.end_user = self.socket.order.end_user.clone();
        ticket.order.batch_id = self.session_id.clone();
        ticket.hold.reservation = self.holds.pop_front();
        let served = crate::usage::read::Served::default();
        let usage = usage.unwrap_or(Usage::NONE);
        settle(&self.state, ticket, 200, usage, &served, Duration::ZERO);
    }
}

/// A Realtime `error` event for a refused client event.
fn error_event(e: &ApiError) -> String {
    serde_json::json!({
        "type": "error",
        "event_id": null,
        "error": {
            "type": "invalid_request_error",
            "code": e.code(),
            "message": e.to_string(),
            "param": null,
            "event_id": null,
        }
    })
    .to_string()
}
