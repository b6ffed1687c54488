//! Fuzz target `sse_list`: an upstream `text/event-stream` body, cut into
//! arbitrary chunks, through the sidecar's `RewritingSseBody` with a list
//! rewriter built like the proxy's `ListRewriter` (same pre-check, strict
//! parse, and the crate's own `Enforcer::filter_response` against a compiled
//! policy), and the property that list filtering cannot be slipped past:
//!
//! - nothing panics;
//! - of what reaches the client (every frame before the stream ends or is
//!   cut), no event that a client reads as a JSON-RPC response with a list
//!   result names a tool (resource, prompt) the policy hides.
//!
//! The client is modelled twice: the crate's `EventSplitter` + `parse_event`,
//! and an independent WHATWG event-stream parser over the whole stream (BOM
//! stripped, lossy UTF-8 as `TextDecoder` does), each followed by
//! `serde_json`. With `CHAPERONE_FUZZ_FOLDED_CLIENT=1` the JSON is also read
//! as Go's case-insensitive struct binding would (mcp-go's client): `Result`,
//! `TOOLS`, `Name` match `result`, `tools`, `name`.
//!
//! Input layout: byte 0 `% 16` is the number of chunk boundaries, the next
//! that many bytes each a chunk's length; the rest is the stream.

#![no_main]

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use chaperone_json::fold_key;
use chaperone_sidecar::assertion::AssertionSigner;
use chaperone_sidecar::audit::{AuditLog, AuditOutput};
use chaperone_sidecar::authz::{
    Enforcer, LIST_KEYS, PROMPT_PREFIX, PodIdentity, RESOURCE_PREFIX, may_hold_list,
};
use chaperone_sidecar::inventory::ToolInventory;
use chaperone_sidecar::metrics::Metrics;
use chaperone_sidecar::ratelimit::AgentRateLimits;
use chaperone_sidecar::snapshot::{ActivePolicy, SnapshotSource};
use chaperone_sidecar::sse::{EventRewrite, EventSplitter, RewritingSseBody, parse_event};
use http_body::{Body, Frame};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The limit on one event (the sidecar's default response limit is larger;
/// a small one also exercises `EventTooLarge`).
const EVENT_LIMIT: usize = 64 << 10;

/// The tool server the stream comes from.
const SERVER: &str = "orders";

/// The policy: `orders/get_order` and `orders/refund` visible, everything
/// else (other tools, every resource and prompt) hidden.
const POLICY: &str = r#"apiVersion: chaperone.dev/v1alpha1
kind: AgentIdentity
metadata:
  name: fuzz-agent
  namespace: default
spec:
  selector:
    serviceAccountName: fuzz-agent
  toolServers:
    - name: orders
      url: http://orders.tools.svc:8080/mcp
---
apiVersion: chaperone.dev/v1alpha1
kind: ToolPolicy
metadata:
  name: fuzz
  namespace: default
spec:
  targetRefs:
    - name: fuzz-agent
  rules:
    - name: allow-orders
      action: allow
      tools:
        - server: orders
          name: get_order
        - server: orders
          name: refund
"#;

struct Fixture {
    enforcer: Enforcer,
    active: Arc<ActivePolicy>,
    folded_client: bool,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("chaperone-fuzz-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("policy dir");
        std::fs::write(dir.join("policy.yaml"), POLICY).expect("policy file");
        let source = SnapshotSource::new();
        chaperone_sidecar::standalone::load(&dir, None, 1, &source).expect("policy compiles");
        let _ = std::fs::remove_dir_all(&dir);
        let active = source.current().expect("policy in force");
        assert!(active.engine.visible(SERVER, "get_order"));
        assert!(!active.engine.visible(SERVER, "delete_user"));
        let metrics = Arc::new(Metrics::new());
        let signer = AssertionSigner::generate().expect("signing key");
        let audit = AuditLog::new(
            AuditOutput::Writer(Box::new(std::io::sink())),
            None,
            metrics.audit_dropped.clone(),
            signer.clone(),
        );
        let enforcer = Enforcer {
            signer,
            audit,
            agent_limits: AgentRateLimits::default(),
            metrics,
            pod: PodIdentity::default(),
            inventory: ToolInventory::default(),
        };
        Fixture {
            enforcer,
            active,
            folded_client: std::env::var_os("CHAPERONE_FUZZ_FOLDED_CLIENT")
                .is_some_and(|v| v == "1"),
        }
    })
}

/// The proxy's list filtering (`may_hold_list`, `Enforcer::filter_event`), with the fixture's policy.
struct ListRewriter {
    fixture: &'static Fixture,
}

impl EventRewrite for ListRewriter {
    fn wants(&self, raw: &[u8]) -> bool {
        may_hold_list(raw)
    }

    fn rewrite(&mut self, data: &str) -> Result<Option<String>, String> {
        let Fixture {
            enforcer, active, ..
        } = self.fixture;
        enforcer.filter_event(active, SERVER, data, EVENT_LIMIT)
    }
}

/// An upstream body that yields the given chunks.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

/// What the client receives: every data frame until the end or an error.
fn client_bytes(chunks: VecDeque<Bytes>, fixture: &'static Fixture) -> Vec<u8> {
    let mut body = RewritingSseBody::new(Chunks(chunks), ListRewriter { fixture }, EVENT_LIMIT);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => return out,
            Poll::Pending => panic!("a body of ready chunks is pending"),
        }
    }
}

/// Event data as the crate's splitter and parser read it (lossy UTF-8 as a
/// browser would; the unterminated tail too, though a client drops it).
fn data_by_crate(stream: &[u8]) -> Vec<String> {
    let mut splitter = EventSplitter::new(usize::MAX);
    splitter.push(stream);
    let mut raws = Vec::new();
    while let Ok(Some(raw)) = splitter.next_event() {
        raws.push(raw);
    }
    raws.push(splitter.take_rest());
    raws.iter()
        .filter_map(|raw| parse_event(String::from_utf8_lossy(raw).as_bytes()).ok())
        .map(|event| event.data)
        .collect()
}

/// Event data as the WHATWG event-stream algorithm reads the whole stream
/// (one leading BOM dropped; CRLF, LF or CR end a line; the tail dispatched
/// too, to be conservative).
fn data_by_whatwg(stream: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(stream);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut out = Vec::new();
    let mut data = String::new();
    let mut has_data = false;
    let mut lines = Vec::new();
    let mut rest = text;
    while let Some(end) = rest.find(['\r', '\n']) {
        lines.push(&rest[..end]);
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
    lines.push(rest);
    for line in lines {
        if line.is_empty() {
            if has_data {
                out.push(data.strip_suffix('\n').unwrap_or(&data).to_owned());
            }
            data.clear();
            has_data = false;
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            data.push_str(value);
            data.push('\n');
            has_data = true;
        }
    }
    if has_data {
        out.push(data.strip_suffix('\n').unwrap_or(&data).to_owned());
    }
    out
}

/// A member of `object` by name: exactly, or (Go's binding) the last key
/// equal under case folding.
fn member<'v>(
    object: &'v serde_json::Map<String, Value>,
    name: &str,
    folded: bool,
) -> Option<&'v Value> {
    if !folded {
        return object.get(name);
    }
    let want = fold_key(name);
    object
        .iter()
        .rev()
        .find(|(k, _)| fold_key(k) == want)
        .map(|(_, v)| v)
}

/// The hidden names a client reads in `message` as a list result.
fn hidden_names(message: &Value, active: &ActivePolicy, folded: bool) -> Vec<String> {
    let Value::Object(object) = message else {
        return Vec::new();
    };
    if member(object, "method", folded).is_some() {
        return Vec::new();
    }
    let Some(Value::Object(result)) = member(object, "result", folded) else {
        return Vec::new();
    };
    let mut hidden = Vec::new();
    for key in LIST_KEYS {
        let (field, prefix) = match key {
            "tools" => ("name", ""),
            "resources" => ("uri", RESOURCE_PREFIX),
            "resourceTemplates" => ("uriTemplate", RESOURCE_PREFIX),
            _ => ("name", PROMPT_PREFIX),
        };
        let Some(Value::Array(items)) = member(result, key, folded) else {
            continue;
        };
        for item in items {
            let Value::Object(item) = item else {
                continue;
            };
            if let Some(Value::String(name)) = member(item, field, folded) {
                let policy_name = format!("{prefix}{name}");
                if !active.engine.visible(SERVER, &policy_name) {
                    hidden.push(format!("{key}: {policy_name}"));
                }
            }
        }
    }
    hidden
}

fn check_client_view(stream: &[u8], fixture: &Fixture) {
    let mut clients = vec![false];
    if fixture.folded_client {
        clients.push(true);
    }
    for (model, events) in [
        ("crate", data_by_crate(stream)),
        ("whatwg", data_by_whatwg(stream)),
    ] {
        for data in events {
            let Ok(value) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            let messages = match &value {
                Value::Array(items) => items.iter().collect(),
                single => vec![single],
            };
            for message in messages {
                for &folded in &clients {
                    let hidden = hidden_names(message, &fixture.active, folded);
                    assert!(
                        hidden.is_empty(),
                        "the client ({model} SSE parse, folded keys: {folded}) sees hidden {hidden:?} in event data {data:?}\nstream: {:?}",
                        String::from_utf8_lossy(stream)
                    );
                }
            }
        }
    }
}

fn split(data: &[u8]) -> (VecDeque<Bytes>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (VecDeque::new(), data);
    };
    let n = usize::from(n % 16).min(rest.len());
    let (lengths, stream) = rest.split_at(n);
    let mut chunks = VecDeque::new();
    let mut at = 0;
    for &len in lengths {
        let end = (at + usize::from(len)).min(stream.len());
        chunks.push_back(Bytes::copy_from_slice(&stream[at..end]));
        at = end;
    }
    chunks.push_back(Bytes::copy_from_slice(&stream[at..]));
    (chunks, stream)
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let (chunks, _stream) = split(data);
    let received = client_bytes(chunks, fixture);
    check_client_view(&received, fixture);
});
