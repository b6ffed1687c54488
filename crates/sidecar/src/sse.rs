//! Server-sent events, streamed: split an upstream `text/event-stream` body into
//! events as bytes arrive, hand the data of the events that may need it to a
//! rewriter (the `tools/list` filter), and pass every other byte through as it
//! came. Only one event is ever held in memory, and never more than a bound.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use thiserror::Error;

/// Why an event stream was cut.
#[derive(Debug, Error)]
pub enum SseError {
    /// One event grew beyond the limit.
    #[error("server-sent event exceeds {limit} bytes")]
    EventTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The rewriter refused an event it had to read (fail closed).
    #[error("server-sent event refused: {0}")]
    Refused(String),
    /// The upstream body failed.
    #[error("upstream stream failed: {0}")]
    Upstream(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Splits a byte stream into raw events (each ending with its blank line).
#[derive(Debug)]
pub struct EventSplitter {
    buf: BytesMut,
    line_start: usize,
    scan: usize,
    limit: usize,
}

impl EventSplitter {
    /// A splitter that refuses events larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            line_start: 0,
            scan: 0,
            limit,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event, if one is buffered.
    pub fn next_event(&mut self) -> Result<Option<Bytes>, SseError> {
        let bytes = &self.buf[..];
        let mut i = self.scan;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'\n' || b == b'\r' {
                let next = if b == b'\r' {
                    if i + 1 == bytes.len() {
                        // A CR at the end may be the first half of CRLF: wait.
                        break;
                    }
                    if bytes[i + 1] == b'\n' { i + 2 } else { i + 1 }
                } else {
                    i + 1
                };
                if i == self.line_start {
                    let event = self.buf.split_to(next).freeze();
                    self.line_start = 0;
                    self.scan = 0;
                    return Ok(Some(event));
                }
                self.line_start = next;
                i = next;
            } else {
                i += 1;
            }
        }
        self.scan = i;
        if self.buf.len() > self.limit {
            return Err(SseError::EventTooLarge { limit: self.limit });
        }
        Ok(None)
    }

    /// Whatever is left at the end of the stream (an unterminated event).
    pub fn take_rest(&mut self) -> Bytes {
        self.line_start = 0;
        self.scan = 0;
        self.buf.split().freeze()
    }
}

/// The fields of one event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The `data` lines joined with `\n`.
    pub data: String,
    /// Every other line (event, id, retry, comments), as received.
    pub other_lines: Vec<String>,
}

/// Parses one raw event. Invalid UTF-8 is an error: such an event could not be
/// read reliably by a client either.
pub fn parse_event(raw: &[u8]) -> Result<Event, SseError> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| SseError::Refused("event is not valid UTF-8".to_owned()))?;
    let mut event = Event::default();
    let mut first_data = true;
    for line in text.split(['\n', '\r']) {
        if line.is_empty() {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            if !first_data {
                event.data.push('\n');
            }
            first_data = false;
            event.data.push_str(value);
        } else {
            event.other_lines.push(line.to_owned());
        }
    }
    Ok(event)
}

/// Writes an event with `other_lines` and `data` (split into lines).
pub fn encode_event(other_lines: &[String], data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 64);
    for line in other_lines {
        out.push_str(line);
        out.push('\n');
    }
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// Decides what to do with an event's data.
pub trait EventRewrite: Send + 'static {
    /// Whether the raw event may need reading at all (a cheap pre-check).
    fn wants(&self, raw: &[u8]) -> bool;
    /// `Ok(None)`: pass the event unchanged; `Ok(Some(data))`: replace its data;
    /// `Err`: cut the stream.
    fn rewrite(&mut self, data: &str) -> Result<Option<String>, String>;
}

/// A body that passes an event stream through, rewriting the events its
/// [`EventRewrite`] asks for.
pub struct RewritingSseBody<B, R> {
    inner: B,
    splitter: EventSplitter,
    rewriter: R,
    ready: VecDeque<Bytes>,
    done: bool,
}

impl<B, R> RewritingSseBody<B, R> {
    /// Wraps `inner`; events are bounded by `limit` bytes.
    pub fn new(inner: B, rewriter: R, limit: usize) -> Self {
        Self {
            inner,
            splitter: EventSplitter::new(limit),
            rewriter,
            ready: VecDeque::new(),
            done: false,
        }
    }
}

impl<B, R: EventRewrite> RewritingSseBody<B, R> {
    fn drain(&mut self) -> Result<(), SseError> {
        while let Some(raw) = self.splitter.next_event()? {
            self.process(raw)?;
        }
        Ok(())
    }

    fn process(&mut self, raw: Bytes) -> Result<(), SseError> {
        if !self.rewriter.wants(&raw) {
            self.ready.push_back(raw);
            return Ok(());
        }
        let event = parse_event(&raw)?;
        match self.rewriter.rewrite(&event.data) {
            Ok(None) => self.ready.push_back(raw),
            Ok(Some(data)) => self
                .ready
                .push_back(encode_event(&event.other_lines, &data)),
            Err(reason) => return Err(SseError::Refused(reason)),
        }
        Ok(())
    }
}

impl<B, R> Body for RewritingSseBody<B, R>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R: EventRewrite + Unpin,
{
    type Data = Bytes;
    type Error = SseError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, SseError>>> {
        let this = self.get_mut();
        loop {
            if let Some(bytes) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.done = true;
                    let rest = this.splitter.take_rest();
                    if !rest.is_empty()
                        && let Err(err) = this.process(rest)
                    {
                        return Poll::Ready(Some(Err(err)));
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(SseError::Upstream(err.into()))));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.splitter.push(&data);
                        if let Err(err) = this.drain() {
                            this.done = true;
                            this.ready.clear();
                            return Poll::Ready(Some(Err(err)));
                        }
                    }
                    // Trailers pass through; `ready` is empty whenever the inner
                    // body is polled.
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.ready.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<Bytes> {
        let mut splitter = EventSplitter::new(1024);
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.push(chunk);
            while let Some(event) = splitter.next_event().unwrap() {
                out.push(event);
            }
        }
        out
    }

    #[test]
    fn splits_events_across_chunks_and_line_endings() {
        let got = events(&[
            b"event: message\ndata: {\"a\"",
            b":1}\n\nid: 2\r",
            b"\ndata: x\r\n\r\n",
        ]);
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0][..], b"event: message\ndata: {\"a\":1}\n\n");
        assert_eq!(&got[1][..], b"id: 2\r\ndata: x\r\n\r\n");
    }

    #[test]
    fn splits_on_bare_carriage_returns() {
        let got = events(&[b"data: a\r\r", b"data: b\n\n"]);
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn parses_multi_line_data() {
        let event = parse_event(b"event: message\nid: 7\ndata: {\"a\":\ndata:1}\n\n").unwrap();
        assert_eq!(event.data, "{\"a\":\n1}");
        assert_eq!(event.other_lines, vec!["event: message", "id: 7"]);
    }

    #[test]
    fn refuses_oversized_events() {
        let mut splitter = EventSplitter::new(8);
        splitter.push(b"data: 0123456789");
        assert!(matches!(
            splitter.next_event(),
            Err(SseError::EventTooLarge { .. })
        ));
    }
}
