//! The streaming tee's meter for AWS event streams (Bedrock's
//! `application/vnd.amazon.eventstream`): binary frames, each with headers
//! (`:message-type`, `:event-type`, `:exception-type`) and a payload,
//! decoded by the AWS SDK's own `aws-smithy-eventstream`. The bytes reach
//! the client unchanged, chunk by chunk, whatever the meter makes of them;
//! the meter only reads a copy.
//!
//! Bounded like the SSE meter: at most one partial frame is buffered, and a
//! frame larger than `MAX_FRAME` (or one that does not decode) ends the
//! metering of that stream, never the stream.

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::{HeaderValue, Message};
use bytes::{Bytes, BytesMut};

use super::sse::{SseMeter, StreamFacts, StreamSummary};

/// Frames larger than this are not metered (Bedrock's are a few KiB).
const MAX_FRAME: usize = 4 * 1024 * 1024;

/// Meters one decoded frame: its `:event-type` (or, for an exception
/// frame, `exception` and its `:exception-type`) and its payload.
pub type FrameReader = fn(&mut StreamFacts, &Frame<'_>);

/// One event-stream message as a reader sees it.
pub struct Frame<'a> {
    /// `event` or `exception` (`:message-type`).
    pub message_type: &'a str,
    /// `:event-type`, or `:exception-type` for an exception.
    pub kind: &'a str,
    pub payload: &'a [u8],
}

pub struct FrameMeter {
    reader: FrameReader,
    decoder: MessageFrameDecoder,
    buffer: BytesMut,
    /// A frame could not be decoded: the rest of the stream is passed on
    /// unread.
    lost: bool,
    events: u64,
    facts: StreamFacts,
}

fn header_text<'m>(message: &'m Message, name: &str) -> &'m str {
    message
        .headers()
        .iter()
        .find(|h| h.name().as_str() == name)
        .and_then(|h| match h.value() {
            HeaderValue::String(s) => Some(s.as_str()),
            _ => None,
        })
        .unwrap_or("")
}

impl FrameMeter {
    pub fn new(reader: FrameReader) -> FrameMeter {
        FrameMeter {
            reader,
            decoder: MessageFrameDecoder::new(),
            buffer: BytesMut::new(),
            lost: false,
            events: 0,
            facts: StreamFacts::default(),
        }
    }

    /// Meters one upstream chunk; returns it, unchanged, to forward.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        if self.lost {
            return chunk;
        }
        self.buffer.extend_from_slice(&chunk);
        loop {
            match self.decoder.decode_frame(&mut self.buffer) {
                Ok(DecodedFrame::Complete(message)) => {
                    self.events += 1;
                    let message_type = header_text(&message, ":message-type");
                    let kind = match message_type {
                        "exception" => header_text(&message, ":exception-type"),
                        _ => header_text(&message, ":event-type"),
                    };
                    let frame = Frame {
                        message_type,
                        kind,
                        payload: message.payload(),
                    };
                    (self.reader)(&mut self.facts, &frame);
                }
                Ok(DecodedFrame::Incomplete) => break,
                Err(_) => {
                    self.facts.unparsable_events += 1;
                    self.lose();
                    break;
                }
            }
        }
        if self.buffer.len() > MAX_FRAME {
            self.facts.unparsable_events += 1;
            self.lose();
        }
        chunk
    }

    fn lose(&mut self) {
        self.lost = true;
        self.buffer = BytesMut::new();
    }

    pub fn done(&self) -> bool {
        self.facts.done
    }

    pub fn summary(&mut self) -> StreamSummary {
        self.facts.summary(self.events)
    }
}

/// How a streamed answer is framed, by its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `text/event-stream`.
    Sse,
    /// `application/vnd.amazon.eventstream` (Bedrock).
    AwsEventStream,
}

impl Framing {
    /// `None` for a body that does not stream.
    pub fn of(content_type: &str) -> Option<Framing> {
        if content_type.starts_with("text/event-stream") {
            Some(Framing::Sse)
        } else if content_type.starts_with("application/vnd.amazon.eventstream") {
            Some(Framing::AwsEventStream)
        } else {
            None
        }
    }
}

/// The meter of a stream, by its framing. The SSE meter stays inline (most
/// streams are SSE: no allocation), the rarer frame meter is boxed.
#[allow(clippy::large_enum_variant)]
pub enum StreamMeter {
    Sse(SseMeter),
    Frames(Box<FrameMeter>),
}

impl StreamMeter {
    /// Meters one upstream chunk and returns the bytes to forward.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        match self {
            StreamMeter::Sse(m) => m.push(chunk),
            StreamMeter::Frames(m) => m.push(chunk),
        }
    }

    /// Bytes still held back when the upstream ends.
    pub fn take_pending(&mut self) -> Bytes {
        match self {
            StreamMeter::Sse(m) => m.take_pending(),
            StreamMeter::Frames(_) => Bytes::new(),
        }
    }

    /// The stream's last event has gone through.
    pub fn done(&self) -> bool {
        match self {
            StreamMeter::Sse(m) => m.done(),
            StreamMeter::Frames(m) => m.done(),
        }
    }

    pub fn summary(&mut self) -> StreamSummary {
        match self {
            StreamMeter::Sse(m) => m.summary(),
            StreamMeter::Frames(m) => m.summary(),
        }
    }
}
