//! What the sidecar learns from the results of calls it forwarded.
//!
//! - A call answered `input_required` (MCP 2026-07-28 multi round-trip
//!   requests) has not happened yet: it is taken out of its session's history
//!   (call counts; the effects seen stay, which only makes later decisions
//!   stricter). The retry, with the client's `inputResponses`, is decided
//!   again on its own name and arguments and counted when it completes.
//! - A call answered with a task handle (`resultType: "task"` and a flat
//!   `taskId` in the tasks extension; `result.task.taskId` in 2025-11-25)
//!   gives its session the right to poll, update and cancel that task.
//!
//! The results are read as the server sent them; nothing here changes a
//! response.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde_json::Value;

use crate::jsonrpc::{Id, parse_strict};
use crate::session::{SharedSession, lock};

/// A forwarded call whose result the sidecar reads.
#[derive(Debug)]
pub struct PendingCall {
    /// The request id its response carries.
    pub id: Id,
    /// The session it was decided (and counted) in.
    pub session: SharedSession,
    /// Its tool server.
    pub server: String,
    /// Its policy name (the tool, or `resource:`/`prompt:` name).
    pub tool: String,
}

/// The calls of one forwarded request whose results are read.
#[derive(Debug, Default)]
pub struct CallWatch {
    calls: Vec<PendingCall>,
}

/// The most bytes of a JSON response read for call outcomes; a longer
/// response is passed unread (its calls stay counted).
pub const MAX_WATCHED_BYTES: usize = 256 * 1024;

impl CallWatch {
    /// Watches `call`.
    pub fn push(&mut self, call: PendingCall) {
        self.calls.push(call);
    }

    /// Whether no call is watched.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Whether the raw bytes of a server-sent event may hold an outcome this
    /// watch reads (a cheap test before parsing).
    pub fn wants(&self, raw: &[u8]) -> bool {
        !self.calls.is_empty()
            && (contains(raw, b"resultType") || contains(raw, b"taskId") || contains(raw, b"\\u"))
    }

    /// Reads one JSON-RPC message (or a batch) of the response.
    pub fn observe(&mut self, message: &Value) {
        match message {
            Value::Array(items) => items.iter().for_each(|item| self.observe_one(item)),
            single => self.observe_one(single),
        }
    }

    /// Reads a response body or event data; an unreadable one teaches nothing.
    pub fn observe_bytes(&mut self, bytes: &[u8]) {
        if self.calls.is_empty() {
            return;
        }
        if let Ok(value) = parse_strict(bytes, MAX_WATCHED_BYTES) {
            self.observe(&value);
        }
    }

    fn observe_one(&mut self, message: &Value) {
        let Some(id) = message.get("id") else {
            return;
        };
        if message.get("method").is_some() {
            return;
        }
        let Some(at) = self.calls.iter().position(|c| &c.id == id) else {
            return;
        };
        let call = self.calls.swap_remove(at);
        let Some(result) = message.get("result") else {
            return;
        };
        let result_type = result.get("resultType").and_then(Value::as_str);
        if result_type == Some("input_required") {
            lock(&call.session)
                .history
                .unrecord(&call.server, &call.tool);
            return;
        }
        let task_id = if result_type == Some("task") {
            result.get("taskId")
        } else {
            result.get("task").and_then(|t| t.get("taskId"))
        };
        if let Some(task_id) = task_id.and_then(Value::as_str) {
            lock(&call.session).add_task(task_id);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A response body passed through unchanged while a copy (up to
/// [`MAX_WATCHED_BYTES`]) is read for call outcomes once it is complete —
/// before its last bytes are handed on, so a retry cannot overtake it.
pub struct WatchedBody<B> {
    inner: B,
    watch: Option<CallWatch>,
    seen: Vec<u8>,
    overflow: bool,
}

impl<B> WatchedBody<B> {
    /// Passes `inner`, feeding it to `watch`.
    pub fn new(inner: B, watch: CallWatch) -> Self {
        Self {
            inner,
            watch: Some(watch),
            seen: Vec::new(),
            overflow: false,
        }
    }

    fn finish(&mut self) {
        if let Some(mut watch) = self.watch.take()
            && !self.overflow
        {
            watch.observe_bytes(&self.seen);
        }
        self.seen = Vec::new();
    }
}

impl<B> Body for WatchedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && this.watch.is_some()
                    && !this.overflow
                {
                    if this.seen.len() + data.len() > MAX_WATCHED_BYTES {
                        this.overflow = true;
                        this.seen = Vec::new();
                    } else {
                        this.seen.extend_from_slice(data);
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use chaperone_policy::EffectSet;
    use http_body_util::{BodyExt, Full};
    use serde_json::json;

    use super::*;
    use crate::session::SessionState;

    fn counted_session(server: &str, tool: &str) -> SharedSession {
        let mut state = SessionState::new();
        state.history.record(server, tool, EffectSet::EMPTY);
        Arc::new(Mutex::new(state))
    }

    fn watch_of(session: &SharedSession, id: Value) -> CallWatch {
        let mut watch = CallWatch::default();
        watch.push(PendingCall {
            id,
            session: Arc::clone(session),
            server: "billing".into(),
            tool: "refund".into(),
        });
        watch
    }

    #[test]
    fn an_input_required_round_is_not_counted() {
        let session = counted_session("billing", "refund");
        let mut watch = watch_of(&session, json!(2));
        // Another id's outcome changes nothing.
        watch.observe(
            &json!({"jsonrpc": "2.0", "id": 3, "result": {"resultType": "input_required"}}),
        );
        assert_eq!(lock(&session).history.calls(), 1);
        watch.observe(&json!({"jsonrpc": "2.0", "id": 2, "result": {"resultType": "input_required", "inputRequests": {}}}));
        let state = lock(&session);
        assert_eq!(state.history.calls(), 0);
        assert_eq!(state.history.tool_calls("billing", "refund"), 0);
    }

    #[test]
    fn a_complete_result_stays_counted_once() {
        let session = counted_session("billing", "refund");
        let mut watch = watch_of(&session, json!("a"));
        watch.observe(&json!({"jsonrpc": "2.0", "id": "a", "result": {"resultType": "complete", "content": []}}));
        // A second response of the same id is not a second outcome.
        watch.observe(
            &json!({"jsonrpc": "2.0", "id": "a", "result": {"resultType": "input_required"}}),
        );
        assert_eq!(lock(&session).history.calls(), 1);
    }

    #[test]
    fn task_handles_of_both_eras_are_remembered() {
        let session = counted_session("billing", "refund");
        let mut watch = watch_of(&session, json!(1));
        watch.push(PendingCall {
            id: json!(2),
            session: Arc::clone(&session),
            server: "billing".into(),
            tool: "refund".into(),
        });
        watch.observe(&json!([
            {"jsonrpc": "2.0", "id": 1, "result": {"resultType": "task", "taskId": "new-1", "status": "working"}},
            {"jsonrpc": "2.0", "id": 2, "result": {"task": {"taskId": "old-2", "status": "working"}}},
        ]));
        let state = lock(&session);
        assert!(state.owns_task("new-1") && state.owns_task("old-2"));
        assert_eq!(state.history.calls(), 1, "a created task stays counted");
    }

    #[test]
    fn requests_and_unreadable_bodies_teach_nothing() {
        let session = counted_session("billing", "refund");
        let mut watch = watch_of(&session, json!(1));
        watch.observe(&json!({"jsonrpc": "2.0", "id": 1, "method": "x", "result": {"resultType": "input_required"}}));
        watch.observe_bytes(br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","resultType":"complete"}}"#);
        assert_eq!(lock(&session).history.calls(), 1);
    }

    #[tokio::test]
    async fn a_watched_body_passes_unchanged_and_is_read_at_its_end() {
        let session = counted_session("billing", "refund");
        let text = r#"{"jsonrpc":"2.0","id":9,"result":{"resultType":"input_required"}}"#;
        let body = WatchedBody::new(Full::new(Bytes::from(text)), watch_of(&session, json!(9)));
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(out, text.as_bytes());
        assert_eq!(lock(&session).history.calls(), 0);
    }
}
