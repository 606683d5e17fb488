//! The streaming tee: each upstream chunk goes to the client as soon as it
//! arrives (minus the usage-only chunk tollgate asked for itself), while the
//! SSE meter watches the same bytes. Whichever way the stream ends — done,
//! upstream cut, idle timeout, or the client going away (Drop) — usage is
//! settled exactly once.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream};
use tokio::time::Sleep;

use super::parked::Proxy;
use super::settle::{settle, Ticket};
use crate::usage::frames::StreamMeter;
use crate::usage::sse::StreamSummary;
use crate::usage::{estimate, Usage};

/// nginx's "client closed request": the status recorded for a disconnect.
pub const STATUS_CLIENT_CLOSED: u16 = 499;

/// Everything needed to settle the stream once it ends.
pub struct StreamSettlement {
    pub state: Arc<Proxy>,
    pub ticket: Ticket,
    /// The client's request body, for a prompt estimate if usage never comes.
    pub request_body: Bytes,
    /// Time spent in tollgate before the stream started.
    pub overhead: Duration,
    /// `None`: settled here.
    pub end: Option<StreamEnd>,
}

/// A stream's end handled by another module (a background response's,
/// `background`): it gets the settlement and what the stream said, and
/// hands them back when the stream is to settle as any other.
pub type StreamEnd = Box<
    dyn FnOnce(StreamSettlement, u16, StreamSummary) -> Option<(StreamSettlement, StreamSummary)>
        + Send,
>;

impl StreamSettlement {
    fn finish(mut self, status: u16, summary: StreamSummary, meter_time: Duration) {
        self.overhead += meter_time;
        let (this, summary) = match self.end.take() {
            Some(end) => match end(self, status, summary) {
                Some(back) => back,
                None => return,
            },
            None => (self, summary),
        };
        this.settle(status, summary);
    }

    fn settle(self, status: u16, summary: StreamSummary) {
        let overhead = self.overhead;
        if let Some(usage) = summary.usage {
            if status == 200 && summary.text_bytes_dropped == 0 && !summary.tool_text {
                self.state.words.offer(|| {
                    super::settle::word_sample(
                        &self.state,
                        &self.ticket,
                        summary.served.model.as_deref(),
                        self.request_body.clone(),
                        crate::words::Answer::Texts(summary.texts),
                        usage,
                    )
                });
            }
            settle(
                &self.state,
                self.ticket,
                status,
                usage,
                &summary.served,
                overhead,
            );
            return;
        }
        // No usage from the upstream (it omits it, or the stream ended before
        // the usage chunk): count what was sent and what was generated.
        let estimate = move || {
            let kept = summary.texts.iter().map(String::len).sum();
            let dropped = summary.text_bytes_dropped;
            let usage = match summary.partial {
                // The prompt side as reported; only the output is estimated
                // (and is at least what the provider had counted).
                Some(reported) => {
                    let seen =
                        estimate::completion_tokens(self.ticket.order.encoding(), &summary.texts);
                    Usage {
                        completion_tokens: extrapolated(seen, kept, dropped)
                            .max(reported.completion_tokens),
                        source: crate::usage::TokenSource::Estimated,
                        ..reported
                    }
                }
                None => {
                    let mut usage =
                        estimated_usage(&self.ticket, &self.request_body, &summary.texts);
                    usage.completion_tokens = extrapolated(usage.completion_tokens, kept, dropped);
                    usage
                }
            };
            settle(
                &self.state,
                self.ticket,
                status,
                usage,
                &summary.served,
                overhead,
            );
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(estimate);
            }
            Err(_) => estimate(),
        }
    }
}

/// Tokens of `kept` bytes of text scaled up to `kept + dropped` bytes (the
/// meter keeps at most `MAX_TEXT_BYTES` of a stream's text), rounded up.
fn extrapolated(tokens: u64, kept: usize, dropped: u64) -> u64 {
    if dropped == 0 || kept == 0 {
        return tokens;
    }
    let kept = kept as u128;
    let total = kept + u128::from(dropped);
    u64::try_from((u128::from(tokens) * total).div_ceil(kept)).unwrap_or(u64::MAX)
}

pub fn estimated_usage(ticket: &Ticket, request_body: &[u8], texts: &[String]) -> Usage {
    let (format, endpoint) = (ticket.who.format, ticket.who.endpoint);
    format.estimate_usage(endpoint, ticket.order.encoding(), request_body, texts, 0)
}

pub struct MeteredStream {
    upstream: BoxStream<'static, Result<Bytes, hyper::Error>>,
    meter: StreamMeter,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    settlement: Option<StreamSettlement>,
    meter_time: Duration,
    first_byte_sent: bool,
    ended: bool,
    /// The upstream broke; the error goes to the client on the next poll.
    broken: bool,
    break_delayed: bool,
    /// Durable mode: the stream's end waits for its row to be on disk.
    durable: Option<tokio::sync::oneshot::Receiver<()>>,
    /// What is left to send once the row is on disk.
    tail: Option<Bytes>,
}

impl MeteredStream {
    pub fn new(
        upstream: BoxStream<'static, Result<Bytes, hyper::Error>>,
        meter: StreamMeter,
        idle_timeout: Duration,
        settlement: StreamSettlement,
        durable: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> MeteredStream {
        MeteredStream {
            upstream,
            meter,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            settlement: Some(settlement),
            meter_time: Duration::ZERO,
            first_byte_sent: false,
            ended: false,
            broken: false,
            break_delayed: false,
            durable,
            tail: None,
        }
    }

    fn end(&mut self, status: u16) {
        self.ended = true;
        if let Some(settlement) = self.settlement.take() {
            let summary = self.meter.summary();
            settlement.finish(status, summary, self.meter_time);
        }
    }

    fn first_byte(&mut self) {
        if !self.first_byte_sent {
            self.first_byte_sent = true;
            if let Some(s) = &mut self.settlement {
                let elapsed = s.ticket.who.started.elapsed().as_secs_f64();
                s.ticket
                    .series(&s.state.metrics)
                    .observe_first_byte(&s.state.metrics, elapsed);
            }
        }
    }
}

impl Stream for MeteredStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(rx) = this.durable.as_mut().filter(|_| this.ended) {
            // The upstream is done; the client's end of stream waits for
            // the row to reach the spool.
            if Pin::new(rx).poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.durable = None;
            if let Some(tail) = this.tail.take().filter(|t| !t.is_empty()) {
                return Poll::Ready(Some(Ok(tail)));
            }
            return Poll::Ready(None);
        }
        if this.broken {
            this.broken = false;
            this.ended = true;
            return Poll::Ready(Some(Err(std::io::Error::other("upstream stream broke"))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let t = Instant::now();
                    let deadline = tokio::time::Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                    let out = this.meter.push(chunk);
                    this.meter_time += t.elapsed();
                    if out.is_empty() {
                        continue;
                    }
                    this.first_byte();
                    return Poll::Ready(Some(Ok(out)));
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream stream broke");
                    this.end(502);
                    if this.first_byte_sent && !this.break_delayed {
                        // Pending once, so the server flushes what it has
                        // buffered of the stream (headers included) before
                        // the break tears the connection down.
                        this.break_delayed = true;
                        this.ended = false;
                        this.broken = true;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    return Poll::Ready(Some(Err(std::io::Error::other("upstream stream broke"))));
                }
                Poll::Ready(None) => {
                    let tail = this.meter.take_pending();
                    this.end(200);
                    if this.durable.is_some() {
                        this.tail = Some(tail);
                        // Polled again at once: waits on the row's ack.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    if tail.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(tail)));
                }
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        tracing::warn!("upstream stream idle past idle_timeout_ms");
                        this.end(504);
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "upstream stream idle timeout",
                        ))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    /// The client went away mid-stream: bill what was generated so far.
    /// After the stream's last event it got the whole answer: a client
    /// that closes on `[DONE]` before the upstream closes is not a
    /// disconnect (status 200).
    fn drop(&mut self) {
        if self.settlement.is_some() {
            let status = if self.meter.done() {
                200
            } else {
                STATUS_CLIENT_CLOSED
            };
            self.end(status);
        }
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    #[test]
    fn estimates_past_the_kept_text_are_extrapolated() {
        assert_eq!(super::extrapolated(100, 400, 0), 100);
        assert_eq!(super::extrapolated(100, 400, 400), 200);
        assert_eq!(super::extrapolated(3, 10, 1), 4); // 3.3 rounds up
        assert_eq!(super::extrapolated(0, 0, 50), 0);
    }
}
