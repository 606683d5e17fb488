//! The fourth stage: the request on its way up, to the routed upstream
//! and, where `routing` allows, to the next one serving the model when an
//! attempt fails before anything reached the client. Headers are edited in
//! place (hop-by-hop and tollgate's own removed, credentials swapped in
//! virtual-keys mode, SigV4 signed where the backend signs); the body is
//! copied only to ask for stream usage.
//!
//! Never awaits the database, and never sends the server's credentials
//! for a request that authenticated in passthrough mode.

use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, Method};
use http_body_util::BodyExt;

use super::body;
use super::route::{Routed, UPSTREAM_HEADER};
use super::settle::{Sent, Ticket};
use crate::app::AppState;
use crate::config::AuthMode;
use crate::error::ApiError;
use crate::format::request::RequestFacts;
use crate::upstream::Upstream;

/// What came back from the upstream that answered last.
pub struct Answer<'a> {
    pub response: Result<http::Response<hyper::body::Incoming>, ApiError>,
    pub upstream: &'a Upstream,
    pub attempts: u16,
    pub sent_at: Instant,
    /// Stream usage was asked for on the client's behalf: the meter hides
    /// the usage-only chunk again.
    pub usage_injected: bool,
}

impl Answer<'_> {
    pub fn sent(&self) -> Sent {
        Sent {
            upstream: self.upstream.name.clone(),
            provider: self.upstream.provider.name(),
            attempts: self.attempts,
        }
    }
}

/// Sends a metered request: to the routed upstream, then to the fallbacks
/// (the other upstreams serving the model, in order) while an attempt
/// fails in a way `routing` retries, unless the client named its upstream
/// or sent its own key. The client's headers are kept for a retry only when
/// there is somewhere to retry.
pub async fn forward<'a>(
    state: &'a AppState,
    ticket: &Ticket,
    routed: &Routed<'a>,
    parts: &mut http::request::Parts,
    body: &Bytes,
) -> Result<Answer<'a>, ApiError> {
    let routing = &state.config.routing;
    let format = ticket.who.format;
    // In passthrough the client's own provider key goes up: never to a
    // second upstream it was not meant for.
    let pinned =
        parts.headers.contains_key(UPSTREAM_HEADER) || state.auth.mode() == AuthMode::Passthrough;
    let fallback = |from: &Upstream, attempts: u16| {
        if pinned || attempts >= routing.max_attempts {
            return None;
        }
        state.upstreams.next_matching(&routed.route, format, from)
    };
    let may_retry = fallback(routed.upstream, 1).is_some();
    let (mut upstream, mut attempts) = (routed.upstream, 1u16);
    loop {
        let headers = if may_retry {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let inject = injects_stream_usage(ticket, upstream, &routed.facts);
        let request = upstream_request(state, upstream, routed, &parts.uri, headers, body, inject)?;
        let sent_at = Instant::now();
        let result = send_attempt(upstream, request).await;
        let status = result.as_ref().ok().map(|r| r.status());
        let (outcome, retriable) = match (&result, &status) {
            (_, Some(s)) if s.is_success() => {
                upstream.attempts_ok.inc();
                ("ok", false)
            }
            (_, Some(s)) => (s.as_str(), routing.retries_status(s.as_u16())),
            (Err((_, kind)), None) => (*kind, routing.retries_error(kind)),
            // Not reached: a response always has a status.
            (Ok(_), None) => ("ok", false),
        };
        if outcome != "ok" {
            state
                .metrics
                .upstream_attempts
                .with_label_values(&[&upstream.name, outcome])
                .inc();
        }
        match fallback(upstream, attempts).filter(|_| retriable) {
            // Nothing of this answer reached the client: the next one may.
            Some(next) => {
                tracing::warn!(upstream = %upstream.name, outcome, next = %next.name, "upstream failed; falling back");
                upstream = next;
                attempts = attempts.saturating_add(1);
            }
            None => {
                return Ok(Answer {
                    response: result.map_err(|(e, _)| e),
                    upstream,
                    attempts,
                    sent_at,
                    usage_injected: inject,
                })
            }
        }
    }
}

/// Ask for stream usage on the client's behalf (and hide it again later).
fn injects_stream_usage(ticket: &Ticket, upstream: &Upstream, facts: &RequestFacts) -> bool {
    ticket.order.stream
        && ticket.who.endpoint.accepts_stream_options()
        && upstream.inject_stream_usage
        && !facts.client_wants_stream_usage()
}

/// One attempt's request: the upstream's URL, the client's headers as
/// they go up, the body (with stream usage asked for), signed.
fn upstream_request(
    state: &AppState,
    upstream: &Upstream,
    routed: &Routed<'_>,
    uri: &http::Uri,
    headers: HeaderMap,
    body: &Bytes,
    inject: bool,
) -> Result<http::Request<Body>, ApiError> {
    let mode = state.auth.mode();
    let body = if inject {
        body::with_stream_usage(body, routed.facts.stream_options)?
    } else {
        body.clone()
    };
    let mut request = http::Request::new(());
    *request.method_mut() = Method::POST;
    *request.uri_mut() = upstream_uri(upstream, uri, &routed.route, mode)?;
    *request.headers_mut() = upstream_headers(headers, upstream, mode);
    sign(upstream, &mut request, Some(&body), mode)?;
    Ok(request.map(|()| Body::from(body)))
}

/// Sends any other request as it is, its body streamed through (a client
/// pausing longer than `server.body_timeout_ms` fails it).
pub async fn forward_as_is(
    state: &AppState,
    upstream: &Upstream,
    parts: &mut http::request::Parts,
    body: Body,
) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
    let body = if parts.method == Method::GET || parts.method == Method::HEAD {
        Body::empty()
    } else {
        let gap = Duration::from_millis(state.config.server.body_timeout_ms);
        Body::new(PausingBody::new(body, gap))
    };
    let mode = state.auth.mode();
    let mut request = http::Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = upstream_uri(upstream, &parts.uri, "", mode)?;
    *request.headers_mut() = upstream_headers(std::mem::take(&mut parts.headers), upstream, mode);
    sign(upstream, &mut request, None, mode)?;
    send_attempt(upstream, request).await.map_err(|(e, _)| e)
}

/// A WebSocket handshake (`GET` with `Upgrade: websocket`) passed up as
/// `forward_as_is` passes a request, its upgrade headers put back (they
/// belong to one hop, and this hop asks for the same); the upstream's
/// answer: 101 with its upgraded connection, or a refusal.
pub async fn forward_upgrade(
    state: &AppState,
    upstream: &Upstream,
    parts: &mut http::request::Parts,
) -> Result<http::Response<hyper::body::Incoming>, ApiError> {
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    let mode = state.auth.mode();
    let mut request = http::Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = upstream_uri(upstream, &parts.uri, "", mode)?;
    let mut headers = upstream_headers(std::mem::take(&mut parts.headers), upstream, mode);
    headers.insert(
        header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
    }
    *request.headers_mut() = headers;
    sign(upstream, &mut request, None, mode)?;
    send_attempt(upstream, request).await.map_err(|(e, _)| e)
}

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
pub fn client_headers(mut headers: HeaderMap) -> HeaderMap {
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
pub async fn read_body(
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
