//! Client connections: the accept loop and each connection's life, bounded
//! by construction.
//!
//! A connection is closed when
//! - its client started a request header and did not finish it within
//!   `server.header_timeout_ms` (slowloris),
//! - it sat idle between requests for `server.idle_timeout_ms`, or
//! - its client stopped reading a response for `server.idle_timeout_ms`
//!   (a stream nobody reads would otherwise hold its upstream forever).
//!
//! A request waiting on a slow upstream is never cut here: that is the
//! upstream's `timeout_ms`. Accept errors (out of file descriptors) are
//! logged and the loop backs off instead of spinning. Never blocks.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Where the server is in its life; connections watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Stop accepting; finish the requests in flight, then close.
    Draining,
    /// The drain timeout passed: close now (cut streams are still billed).
    Cutting,
}

/// The timeouts every connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header: Duration,
    pub idle: Duration,
}

/// Raises the open-file soft limit to the hard limit, so the proxy runs
/// out of descriptors as late as the system allows. Returns the new limit.
pub fn raise_fd_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            None
        }
    }
}

/// Accepts connections while `phase` is `Serving`, then returns. Every
/// connection task holds a clone of `alive`, so the caller learns when the
/// last one is gone (`recv()` returns `None`).
pub async fn accept_loop(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut phase: watch::Receiver<Phase>,
    alive: mpsc::Sender<()>,
) {
    let epoch = Instant::now();
    let mut failures = 0u64;
    let mut last_report = Instant::now() - Duration::from_secs(60);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = phase.wait_for(|p| *p != Phase::Serving) => break,
        };
        match accepted {
            Ok((stream, _peer)) => {
                // Without TCP_NODELAY a stream's first chunk can wait ~40 ms
                // behind the response headers for a delayed ACK (Nagle).
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set");
                }
                tokio::spawn(serve_connection(
                    stream,
                    router.clone(),
                    limits,
                    epoch,
                    phase.clone(),
                    alive.clone(),
                ));
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS: new clients wait in the kernel's
                // backlog until a descriptor frees up; say so, once a second.
                failures += 1;
                if last_report.elapsed() >= Duration::from_secs(1) {
                    tracing::error!(
                        error = %e,
                        failures,
                        "cannot accept connections (out of file descriptors?); retrying"
                    );
                    last_report = Instant::now();
                    failures = 0;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Errors that concern one connection that was already gone, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    epoch: Instant,
    mut phase: watch::Receiver<Phase>,
    _alive: mpsc::Sender<()>,
) {
    let state = Arc::new(ConnState::new(epoch));
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        state: state.clone(),
    });
    let service = ConnService {
        router,
        state: state.clone(),
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The header timeout is ours (it must not also close idle keep-alives).
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let check = tokio::time::sleep(limits.header.min(limits.idle));
    tokio::pin!(check);
    if *phase.borrow_and_update() != Phase::Serving {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            _ = phase.changed() => match *phase.borrow_and_update() {
                Phase::Serving => {}
                Phase::Draining => conn.as_mut().graceful_shutdown(),
                // Dropping the connection drops its streams, which settle.
                Phase::Cutting => return,
            },
            _ = &mut check => match state.verdict(limits) {
                Verdict::Close(reason) => {
                    tracing::debug!(reason, "closing client connection");
                    return;
                }
                Verdict::RecheckAfter(wait) => {
                    check.as_mut().reset(tokio::time::Instant::now() + wait);
                }
            },
        }
    }
}

/// What a connection is doing, kept in atomics by its I/O and its requests.
/// Times are milliseconds since the accept loop's epoch, plus one (0 = unset).
struct ConnState {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When the connection last became idle (accepted, or a response done).
    idle_since: AtomicU64,
    /// When the first byte of a request header arrived on an idle connection.
    head_started: AtomicU64,
    /// Since when a response write has been waiting for the client to read.
    write_blocked_since: AtomicU64,
}

enum Verdict {
    Close(&'static str),
    RecheckAfter(Duration),
}

impl ConnState {
    fn new(epoch: Instant) -> ConnState {
        let state = ConnState {
            epoch,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(0),
        };
        state.idle_since.store(state.now(), Ordering::Relaxed);
        state
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn verdict(&self, limits: Limits) -> Verdict {
        let now = self.now();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        // Milliseconds left until `since + limit`, or the reason to close.
        let left = |since: u64, limit: Duration| ms(limit).checked_sub(now.saturating_sub(since));
        let wait = |left: u64| Verdict::RecheckAfter(Duration::from_millis(left.max(1)));
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return match self.write_blocked_since.load(Ordering::Relaxed) {
                0 => Verdict::RecheckAfter(limits.idle),
                since => match left(since, limits.idle) {
                    Some(l) if l > 0 => wait(l),
                    _ => Verdict::Close("client stopped reading the response"),
                },
            };
        }
        match self.head_started.load(Ordering::Relaxed) {
            0 => match left(self.idle_since.load(Ordering::Relaxed), limits.idle) {
                // A header may start any moment: look again within its timeout.
                Some(l) if l > 0 => wait(l.min(ms(limits.header))),
                _ => Verdict::Close("idle keep-alive timeout"),
            },
            since => match left(since, limits.header) {
                Some(l) if l > 0 => wait(l),
                _ => Verdict::Close("request header not received in time"),
            },
        }
    }
}

/// The client's socket, reporting reads and stalled writes to `ConnState`.
struct WatchedIo {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let s = &self.state;
        if buf.filled().len() > before
            && s.in_flight.load(Ordering::Relaxed) == 0
            && s.head_started.load(Ordering::Relaxed) == 0
        {
            s.head_started.store(s.now(), Ordering::Relaxed);
        }
        result
    }
}

impl WatchedIo {
    fn note_write<T>(&self, result: &Poll<io::Result<T>>) {
        let blocked = &self.state.write_blocked_since;
        match result {
            Poll::Pending => {
                if blocked.load(Ordering::Relaxed) == 0 {
                    blocked.store(self.state.now(), Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => {
                if blocked.load(Ordering::Relaxed) != 0 {
                    blocked.store(0, Ordering::Relaxed);
                }
            }
        }
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A socket's flush is always ready: it says nothing about the client.
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The router, counting each request in flight until its response body is
/// done (or dropped).
struct ConnService {
    router: Router,
    state: Arc<ConnState>,
}

type ResponseFuture = Pin<
    Box<dyn Future<Output = Result<http::Response<TrackedBody>, std::convert::Infallible>> + Send>,
>;

impl hyper::service::Service<http::Request<Incoming>> for ConnService {
    type Response = http::Response<TrackedBody>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let guard = InFlight::begin(self.state.clone());
        // `Router` is always ready; `call` needs `&mut`, hence the clone (an Arc).
        let mut router = self.router.clone();
        let response = tower_service::Service::call(&mut router, req);
        Box::pin(async move {
            let response = match response.await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok(response.map(|body| TrackedBody {
                body,
                _guard: guard,
            }))
        })
    }
}

/// One request in flight on a connection.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn begin(state: Arc<ConnState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.head_started.store(0, Ordering::Relaxed);
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since.store(s.now(), Ordering::Relaxed);
        s.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that ends its request's `InFlight` when it is dropped.
pub struct TrackedBody {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header: Duration::from_millis(100),
            idle: Duration::from_millis(1_000),
        }
    }

    fn at(state: &ConnState, field: &AtomicU64, ago_ms: u64) {
        field.store(state.now().saturating_sub(ago_ms).max(1), Ordering::Relaxed);
    }

    #[test]
    fn idle_connections_close_after_the_idle_timeout_and_are_checked_within_the_header_timeout() {
        let s = ConnState::new(Instant::now() - Duration::from_secs(10));
        at(&s, &s.idle_since, 0);
        match s.verdict(limits()) {
            Verdict::RecheckAfter(d) => assert!(d <= Duration::from_millis(100), "{d:?}"),
            Verdict::Close(r) => panic!("closed: {r}"),
        }
        at(&s, &s.idle_since, 1_000);
        assert!(matches!(
            s.verdict(limits()),
            Verdict::Close("idle keep-alive timeout")
        ));
    }

    #[test]
    fn a_half_sent_header_closes_after_the_header_timeout() {
        let s = ConnState::new(Instant::now() - Duration::from_secs(10));
        at(&s, &s.head_started, 50);
        assert!(matches!(s.verdict(limits()), Verdict::RecheckAfter(_)));
        at(&s, &s.head_started, 100);
        assert!(matches!(
            s.verdict(limits()),
            Verdict::Close("request header not received in time")
        ));
    }

    #[test]
    fn a_request_in_flight_is_cut_only_when_its_client_stops_reading() {
        let s = Arc::new(ConnState::new(Instant::now() - Duration::from_secs(10)));
        let guard = InFlight::begin(s.clone());
        at(&s, &s.idle_since, 60_000);
        // Waiting on the upstream: never cut here.
        assert!(matches!(s.verdict(limits()), Verdict::RecheckAfter(_)));
        at(&s, &s.write_blocked_since, 999);
        assert!(matches!(s.verdict(limits()), Verdict::RecheckAfter(_)));
        at(&s, &s.write_blocked_since, 1_000);
        assert!(matches!(
            s.verdict(limits()),
            Verdict::Close("client stopped reading the response")
        ));
        s.write_blocked_since.store(0, Ordering::Relaxed);
        drop(guard);
        assert_eq!(s.in_flight.load(Ordering::Relaxed), 0);
        assert!(matches!(s.verdict(limits()), Verdict::RecheckAfter(_)));
    }
}
