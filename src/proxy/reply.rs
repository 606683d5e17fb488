//! What a request answers with, once the stages are done: the response
//! (settled, or a stream still to tee), or a stage's refusal; tollgate's
//! own response headers. Every answering module builds these; this one
//! imports none of them.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::BodyExt;

use super::parked::Proxy;
use super::settle::Ticket;
use super::stream::{MeteredStream, StreamEnd, StreamSettlement};
use crate::error::ApiError;
use crate::pricing::NanoUsd;
use crate::usage::frames::Framing;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-tollgate-request-id");
pub const COST_USD: HeaderName = HeaderName::from_static("x-tollgate-cost-usd");
pub const BUDGET_REMAINING: HeaderName = HeaderName::from_static("x-tollgate-budget-remaining-usd");

/// How a forwarded request continues once the upstream has answered.
pub enum Forwarded {
    /// Settled; the response is complete (with the budget left).
    Done(Response, Option<NanoUsd>),
    /// A stream to tee; settled when it ends.
    Stream(Box<PendingStream>),
}

/// A stage's refusal, with the ticket as far as it got: settled without
/// usage, rendered in the client's format.
pub struct Refused(pub Ticket, pub ApiError);

/// A streamed answer, forwarded chunk by chunk once the response starts.
pub struct PendingStream {
    pub(super) response: http::Response<hyper::body::Incoming>,
    pub(super) ticket: Ticket,
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) framing: Framing,
    pub(super) strip_usage_chunk: bool,
    pub(super) request_body: Bytes,
    pub(super) overhead: Duration,
    pub(super) idle_timeout: Duration,
    /// Another module's ending of the stream (`background`).
    pub(super) end: Option<StreamEnd>,
}

impl PendingStream {
    pub fn into_response(
        self,
        state: Arc<Proxy>,
        durable: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> Response {
        let (format, endpoint) = (self.ticket.who.format, self.ticket.who.endpoint);
        let meter = format.stream_meter(endpoint, self.framing, self.strip_usage_chunk);
        let settlement = StreamSettlement {
            state,
            ticket: self.ticket,
            request_body: self.request_body,
            overhead: self.overhead,
            end: self.end,
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

pub fn build_response(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// OpenAI's `x-ratelimit-*` headers: the tightest limit of each unit that
/// applies, what is left of it this minute and when the minute ends.
pub fn rate_headers(headers: &mut http::HeaderMap, view: &crate::limits::RateView) {
    const NAMES: [[HeaderName; 3]; 2] = [
        [
            HeaderName::from_static("x-ratelimit-limit-requests"),
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            HeaderName::from_static("x-ratelimit-reset-requests"),
        ],
        [
            HeaderName::from_static("x-ratelimit-limit-tokens"),
            HeaderName::from_static("x-ratelimit-remaining-tokens"),
            HeaderName::from_static("x-ratelimit-reset-tokens"),
        ],
    ];
    let reset = crate::limits::reset_text(view.reset);
    for (names, seen) in NAMES.iter().zip([view.requests, view.tokens]) {
        let Some((limit, remaining)) = seen else {
            continue;
        };
        headers.insert(names[0].clone(), HeaderValue::from(limit));
        headers.insert(names[1].clone(), HeaderValue::from(remaining));
        if let Ok(v) = HeaderValue::from_str(&reset) {
            headers.insert(names[2].clone(), v);
        }
    }
}
