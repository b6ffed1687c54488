//! A loopback OTLP trace receiver for tests: the collector's gRPC
//! `TraceService` (tonic, from `opentelemetry-proto`) and OTLP/HTTP's
//! `POST /v1/traces` with protobuf bodies, both storing the spans they get.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use tokio::net::TcpListener;

/// How a span reached the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with a protobuf body.
    HttpProtobuf,
}

/// One span as received, ids in lower-case hex, attributes as text.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; empty for a root span.
    pub parent_span_id: String,
    /// The span's name.
    pub name: String,
    /// OTLP's span kind (2 server, 3 client).
    pub kind: i32,
    /// Attributes, each value as text (arrays joined with `,`).
    pub attributes: BTreeMap<String, String>,
    /// Attribute keys the span carried more than once.
    pub repeated_attributes: Vec<String>,
    /// OTLP's status code (2: error).
    pub status_code: i32,
    /// The status message.
    pub status_message: String,
    /// The resource's `service.name`.
    pub service_name: String,
    /// How it came.
    pub transport: Transport,
}

impl ReceivedSpan {
    /// The attribute `key`, if present.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::ArrayValue(a)) => a
            .values
            .iter()
            .map(|v| text(Some(v)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type Store = Arc<Mutex<Vec<ReceivedSpan>>>;

fn store(spans: &Store, request: ExportTraceServiceRequest, transport: Transport) {
    let mut out = spans.lock().unwrap_or_else(|p| p.into_inner());
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service_name = resource.get("service.name").cloned().unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                let status = span.status.unwrap_or_default();
                let mut keys: Vec<&str> = span.attributes.iter().map(|a| a.key.as_str()).collect();
                keys.sort_unstable();
                let mut repeated_attributes: Vec<String> = keys
                    .windows(2)
                    .filter(|pair| pair[0] == pair[1])
                    .map(|pair| pair[0].to_owned())
                    .collect();
                repeated_attributes.dedup();
                out.push(ReceivedSpan {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes: attributes(&span.attributes),
                    repeated_attributes,
                    status_code: status.code,
                    status_message: status.message,
                    service_name: service_name.clone(),
                    transport,
                });
            }
        }
    }
}

struct GrpcService(Store);

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        store(&self.0, request.into_inner(), Transport::Grpc);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running receiver (it stops with the test's runtime).
#[derive(Clone)]
pub struct OtlpReceiver {
    spans: Store,
    /// Where OTLP/gRPC is served (`http://` this).
    pub grpc: SocketAddr,
    /// Where OTLP/HTTP is served (`http://` this `/v1/traces`).
    pub http: SocketAddr,
    /// Headers of the last OTLP/HTTP request.
    last_http_headers: Arc<Mutex<http::HeaderMap>>,
}

impl OtlpReceiver {
    /// Starts both endpoints on loopback ports.
    pub async fn start() -> Result<Self> {
        let spans: Store = Arc::default();
        let grpc_listener = TcpListener::bind("127.0.0.1:0").await?;
        let grpc = grpc_listener.local_addr()?;
        let service = TraceServiceServer::new(GrpcService(Arc::clone(&spans)));
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
            if let Err(err) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::warn!(error = %err, "OTLP gRPC receiver stopped");
            }
        });
        let http_listener = TcpListener::bind("127.0.0.1:0").await?;
        let http = http_listener.local_addr()?;
        let last_http_headers: Arc<Mutex<http::HeaderMap>> = Arc::default();
        let (http_spans, headers) = (Arc::clone(&spans), Arc::clone(&last_http_headers));
        tokio::spawn(async move {
            while let Ok((stream, _)) = http_listener.accept().await {
                let (spans, headers) = (Arc::clone(&http_spans), Arc::clone(&headers));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (spans, headers) = (Arc::clone(&spans), Arc::clone(&headers));
                        async move { serve_http(req, &spans, &headers).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            spans,
            grpc,
            http,
            last_http_headers,
        })
    }

    /// The OTLP/gRPC endpoint URL.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The OTLP/HTTP traces URL.
    pub fn http_traces_url(&self) -> String {
        format!("http://{}/v1/traces", self.http)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The headers of the last OTLP/HTTP export.
    pub fn last_http_headers(&self) -> http::HeaderMap {
        self.last_http_headers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for a span `matches`, and returns it.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        matches: impl Fn(&ReceivedSpan) -> bool,
    ) -> Result<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(span) = self.spans().into_iter().find(|s| matches(s)) {
                return Ok(span);
            }
            if Instant::now() > deadline {
                let names: Vec<String> = self
                    .spans()
                    .iter()
                    .map(|s| format!("{} {:?}", s.name, s.attributes))
                    .collect();
                bail!("no span {what} within {timeout:?}; received: {names:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn serve_http(
    req: http::Request<hyper::body::Incoming>,
    spans: &Store,
    headers: &Mutex<http::HeaderMap>,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    let respond = |status: http::StatusCode, body: Vec<u8>| {
        let mut response = http::Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        Ok(response)
    };
    if req.method() != http::Method::POST || req.uri().path() != "/v1/traces" {
        return respond(http::StatusCode::NOT_FOUND, Vec::new());
    }
    let protobuf = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/x-protobuf");
    *headers.lock().unwrap_or_else(|p| p.into_inner()) = req.headers().clone();
    let Ok(body) = req.into_body().collect().await else {
        return respond(http::StatusCode::BAD_REQUEST, Vec::new());
    };
    match ExportTraceServiceRequest::decode(body.to_bytes()) {
        Ok(request) if protobuf => {
            store(spans, request, Transport::HttpProtobuf);
            respond(
                http::StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        _ => respond(http::StatusCode::BAD_REQUEST, Vec::new()),
    }
}
