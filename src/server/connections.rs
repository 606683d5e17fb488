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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    mut phase: watch::Receiver<Phase>,
    _alive: mpsc::Sender<()>,
) {
    let state = Arc::new(ConnState::default());
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
    // Upgrades: a Realtime WebSocket (`proxy::realtime`) takes the connection over.
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let every = limits.check_interval();
    let check = tokio::time::sleep(every);
    tokio::pin!(check);
    let mut watch = Watch::default();
    if *phase.borrow_and_update() != Phase::Serving {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            biased;
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
            _ = &mut check => {
                let now = Instant::now();
                if let Some(reason) = watch.verdict(&state, now, limits) {
                    tracing::debug!(reason, "closing client connection");
                    return;
                }
                check.as_mut().reset((now + every).into());
            },
        }
    }
}

/// What a connection is doing, kept by its I/O and its requests without a
/// clock read: counters and flags, which the connection's check (every
/// `Limits::check_interval`) turns into durations. Everything runs on the
/// connection's own task; the atomics are only there to share it.
#[derive(Default)]
struct ConnState {
    in_flight: AtomicUsize,
    /// Requests begun on this connection.
    requests: AtomicU64,
    /// Bytes arrived while no request was in flight: a header has started.
    head_started: AtomicBool,
    /// Successful writes to the client.
    writes: AtomicU64,
    /// The last write found the client's socket full.
    write_blocked: AtomicBool,
}

/// The check's own notes: what it saw last time and since when.
#[derive(Default)]
struct Watch {
    requests: u64,
    writes: u64,
    idle_since: Option<Instant>,
    head_since: Option<Instant>,
    blocked_since: Option<Instant>,
}

impl Limits {
    /// How often a connection is looked at: each timeout is enforced to
    /// within this (half the shorter one, at least 50 ms).
    fn check_interval(self) -> Duration {
        (self.header.min(self.idle) / 2).max(Duration::from_millis(50))
    }
}

impl Watch {
    /// Why the connection must close now, if it must.
    fn verdict(&mut self, s: &ConnState, now: Instant, limits: Limits) -> Option<&'static str> {
        let requests = s.requests.load(Ordering::Relaxed);
        if requests != self.requests {
            self.requests = requests;
            self.idle_since = None;
            self.head_since = None;
        }
        let over = |since: &mut Option<Instant>, limit: Duration| {
            now.duration_since(*since.get_or_insert(now)) >= limit
        };
        if s.in_flight.load(Ordering::Relaxed) > 0 {
            self.idle_since = None;
            self.head_since = None;
            let writes = s.writes.load(Ordering::Relaxed);
            let stalled = s.write_blocked.load(Ordering::Relaxed) && writes == self.writes;
            self.writes = writes;
            if !stalled {
                self.blocked_since = None;
                return None;
            }
            return over(&mut self.blocked_since, limits.idle)
                .then_some("client stopped reading the response");
        }
        self.blocked_since = None;
        if s.head_started.load(Ordering::Relaxed) {
            return over(&mut self.head_since, limits.header)
                .then_some("request header not received in time");
        }
        over(&mut self.idle_since, limits.idle).then_some("idle keep-alive timeout")
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
            && !s.head_started.load(Ordering::Relaxed)
        {
            s.head_started.store(true, Ordering::Relaxed);
        }
        result
    }
}

impl WatchedIo {
    fn note_write<T>(&self, result: &Poll<io::Result<T>>) {
        let s = &self.state;
        match result {
            Poll::Pending => {
                if !s.write_blocked.load(Ordering::Relaxed) {
                    s.write_blocked.store(true, Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => {
                // One writer (this connection's task): load + store, no RMW.
                s.writes
                    .store(s.writes.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                if s.write_blocked.load(Ordering::Relaxed) {
                    s.write_blocked.store(false, Ordering::Relaxed);
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

impl hyper::service::Service<http::Request<Incoming>> for ConnService {
    type Response = http::Response<TrackedBody>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let guard = InFlight::begin(self.state.clone());
        // `Router` is always ready; `call` needs `&mut`, hence the clone (an Arc).
        let mut router = self.router.clone();
        ResponseFuture {
            inner: tower_service::Service::call(&mut router, req),
            guard: Some(guard),
        }
    }
}

/// The router's response, its body tracked (no allocation: axum's future
/// is `Unpin`).
pub struct ResponseFuture {
    inner: axum::routing::future::RouteFuture<std::convert::Infallible>,
    guard: Option<InFlight>,
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<TrackedBody>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(never)) => match never {},
            Poll::Ready(Ok(response)) => {
                let guard = this.guard.take();
                Poll::Ready(Ok(response.map(|body| TrackedBody {
                    body,
                    _guard: guard,
                })))
            }
        }
    }
}

/// One request in flight on a connection.
pub struct InFlight(Arc<ConnState>);

impl InFlight {
    fn begin(state: Arc<ConnState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.requests.fetch_add(1, Ordering::Relaxed);
        state.head_started.store(false, Ordering::Relaxed);
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that ends its request's `InFlight` when it is dropped.
pub struct TrackedBody {
    body: Body,
    _guard: Option<InFlight>,
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

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn idle_connections_close_after_the_idle_timeout() {
        let (s, mut w, t) = (ConnState::default(), Watch::default(), Instant::now());
        assert_eq!(limits().check_interval(), Duration::from_millis(50));
        assert_eq!(w.verdict(&s, at(t, 0), limits()), None);
        assert_eq!(w.verdict(&s, at(t, 999), limits()), None);
        assert_eq!(
            w.verdict(&s, at(t, 1_000), limits()),
            Some("idle keep-alive timeout")
        );
    }

    #[test]
    fn a_half_sent_header_closes_after_the_header_timeout() {
        let (s, mut w, t) = (ConnState::default(), Watch::default(), Instant::now());
        s.head_started.store(true, Ordering::Relaxed);
        assert_eq!(w.verdict(&s, at(t, 0), limits()), None);
        assert_eq!(
            w.verdict(&s, at(t, 100), limits()),
            Some("request header not received in time")
        );
    }

    #[test]
    fn a_request_in_flight_is_cut_only_when_its_client_stops_reading() {
        let (s, mut w, t) = (
            Arc::new(ConnState::default()),
            Watch::default(),
            Instant::now(),
        );
        assert_eq!(w.verdict(&s, at(t, 0), limits()), None);
        let guard = InFlight::begin(s.clone());
        // Waiting on the upstream for a minute: never cut here.
        assert_eq!(w.verdict(&s, at(t, 60_000), limits()), None);
        // Writes blocked, but progressing between checks: not stalled.
        s.write_blocked.store(true, Ordering::Relaxed);
        s.writes.store(5, Ordering::Relaxed);
        assert_eq!(w.verdict(&s, at(t, 61_000), limits()), None);
        s.writes.store(6, Ordering::Relaxed);
        assert_eq!(w.verdict(&s, at(t, 62_000), limits()), None);
        // No write moved for the idle timeout: cut.
        assert_eq!(w.verdict(&s, at(t, 62_500), limits()), None);
        assert_eq!(
            w.verdict(&s, at(t, 63_500), limits()),
            Some("client stopped reading the response")
        );
        drop(guard);
        assert_eq!(s.in_flight.load(Ordering::Relaxed), 0);
        // A new request resets the idle clock.
        assert_eq!(w.verdict(&s, at(t, 64_000), limits()), None);
        assert_eq!(w.verdict(&s, at(t, 64_900), limits()), None);
        drop(InFlight::begin(s.clone()));
        assert_eq!(w.verdict(&s, at(t, 65_500), limits()), None);
        assert_eq!(w.verdict(&s, at(t, 66_400), limits()), None);
        assert_eq!(
            w.verdict(&s, at(t, 66_500), limits()),
            Some("idle keep-alive timeout")
        );
    }
}
