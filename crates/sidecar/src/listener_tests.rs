use super::*;
use crate::proxy::full;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMITS: ConnectionLimits = ConnectionLimits {
    header_read_timeout: Duration::from_millis(300),
    idle_timeout: Duration::from_millis(600),
    max_connections: 4,
};

/// A listener answering `/` with "ok" and `/stream` with two chunks
/// 1.5 s apart (longer than every timeout of [`LIMITS`]).
async fn start(limits: ConnectionLimits) -> (SocketAddr, Arc<Metrics>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    let served = Arc::clone(&metrics);
    tokio::spawn(async move {
        serve_connections(
            "proxy",
            limits,
            served,
            listener,
            std::future::pending(),
            |req: Request<Incoming>| async move {
                if req.uri().path() != "/stream" {
                    return Response::new(full("ok"));
                }
                let chunks = futures_util::stream::unfold(0, |n| async move {
                    match n {
                        0 => Some((Ok(Frame::data(Bytes::from("first\n"))), 1)),
                        1 => {
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                            Some((Ok(Frame::data(Bytes::from("second\n"))), 2))
                        }
                        _ => None,
                    }
                });
                Response::new(StreamBody::new(chunks).boxed_unsync())
            },
        )
        .await;
    });
    (addr, metrics)
}

fn timed_out(metrics: &Metrics, timeout: &'static str) -> u64 {
    metrics
        .connections_timed_out
        .get_or_create(&ConnectionTimeoutLabels {
            listener: "proxy",
            timeout,
        })
        .get()
}

/// Reads until the peer closes; the time that took.
async fn until_closed(stream: &mut (impl AsyncRead + Unpin)) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the connection was not closed"),
        }
    }
}

#[tokio::test]
async fn closes_a_head_sent_byte_by_byte_after_the_header_timeout() {
    let (addr, metrics) = start(LIMITS).await;
    let (mut read, mut write) = TcpStream::connect(addr).await.unwrap().into_split();
    tokio::spawn(async move {
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n" {
            if write.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let elapsed = until_closed(&mut read).await;
    assert!(
        elapsed > Duration::from_millis(250) && elapsed < Duration::from_millis(800),
        "{elapsed:?}"
    );
    assert_eq!(timed_out(&metrics, "header"), 1);
}

#[tokio::test]
async fn closes_a_connection_that_never_sends_a_head() {
    let (addr, metrics) = start(LIMITS).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let elapsed = until_closed(&mut stream).await;
    assert!(elapsed < Duration::from_millis(550), "{elapsed:?}");
    assert_eq!(timed_out(&metrics, "header"), 1);
}

#[tokio::test]
async fn closes_an_idle_keep_alive_connection_after_the_idle_timeout() {
    let (addr, metrics) = start(LIMITS).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\nok") {
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the answer");
        answer.extend_from_slice(&buf[..n]);
    }
    // Idle now: longer than the header timeout is fine, the idle timeout is not.
    let elapsed = until_closed(&mut stream).await;
    assert!(
        elapsed > Duration::from_millis(450) && elapsed < Duration::from_millis(1200),
        "{elapsed:?}"
    );
    assert_eq!(timed_out(&metrics, "idle"), 1);
    assert_eq!(timed_out(&metrics, "header"), 0);
}

async fn stream_outlives_the_timeouts(http2: bool) {
    let (addr, metrics) = start(LIMITS).await;
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(HttpConnector::new());
    let response = client
        .request(
            Request::get(format!("http://{addr}/stream"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"first\nsecond\n");
    assert_eq!(timed_out(&metrics, "idle"), 0);
    assert_eq!(timed_out(&metrics, "header"), 0);
    // Once the stream has ended the connection is idle, and closed.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(timed_out(&metrics, "idle"), 1);
}

#[tokio::test]
async fn a_quiet_http1_stream_is_not_cut_by_the_idle_timeout() {
    stream_outlives_the_timeouts(false).await;
}

#[tokio::test]
async fn a_quiet_http2_stream_is_not_cut_by_the_idle_timeout() {
    stream_outlives_the_timeouts(true).await;
}

#[tokio::test]
async fn resets_connections_beyond_the_cap_and_serves_the_rest() {
    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        max_connections: 4,
    };
    let (addr, metrics) = start(limits).await;
    let labels = ListenerLabels { listener: "proxy" };
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let open = metrics.connections_open.get_or_create(&labels).clone();
    while open.get() < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..3 {
        let mut extra = TcpStream::connect(addr).await.unwrap();
        until_closed(&mut extra).await;
    }
    let refused = metrics.connections_refused.get_or_create(&labels).get();
    assert_eq!(refused, 3);
    assert_eq!(open.get(), 4);
    // A freed slot serves the next connection.
    drop(held.pop());
    while open.get() > 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// An event stream answer: `first` at once, then `rest` after `after` (never,
/// without `rest`).
fn event_stream(after: Duration, rest: Option<&'static str>) -> Response<ResponseBody> {
    let chunks = futures_util::stream::unfold(0, move |n| async move {
        match n {
            0 => Some((Ok(Frame::data(Bytes::from("data: first\n\n"))), 1)),
            1 => {
                tokio::time::sleep(after).await;
                match rest {
                    Some(rest) => Some((Ok(Frame::data(Bytes::from(rest))), 2)),
                    None => std::future::pending().await,
                }
            }
            _ => None,
        }
    });
    let mut response = Response::new(StreamBody::new(chunks).boxed_unsync());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// Sends `head` and reads until `wanted` has arrived.
async fn send_and_read_until(addr: SocketAddr, head: &str, wanted: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains(wanted) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("nothing arrived")
            .unwrap();
        assert!(n > 0, "closed before {wanted:?}");
        seen.extend_from_slice(&buf[..n]);
    }
    stream
}

/// A listener answering `GET` with a notification stream that never ends and
/// `POST` with an event stream whose last event comes 400 ms after its first;
/// its address, what stops it, and its task.
async fn start_streams() -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = ConnectionLimits {
        idle_timeout: Duration::from_secs(30),
        ..LIMITS
    };
    let serving = tokio::spawn(serve_connections(
        "proxy",
        limits,
        Arc::new(Metrics::new()),
        listener,
        async {
            let _ = stopped.await;
        },
        |req: Request<Incoming>| async move {
            if req.method() == http::Method::GET {
                // The server's notification stream: never ends on its own.
                event_stream(Duration::ZERO, None)
            } else {
                // A call's streamed answer, still running when draining starts.
                event_stream(Duration::from_millis(400), Some("data: last\n\n"))
            }
        },
    ));
    (addr, stop, serving)
}

#[tokio::test]
async fn draining_ends_notification_streams_and_finishes_calls_in_flight() {
    let (addr, stop, serving) = start_streams().await;
    let mut notifications = send_and_read_until(
        addr,
        "GET /mcp HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n",
        "data: first",
    )
    .await;
    let mut call = send_and_read_until(
        addr,
        "POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        "data: first",
    )
    .await;
    stop.send(()).unwrap();

    // The notification stream ends at once, cleanly (the chunked terminator).
    let mut rest = Vec::new();
    tokio::time::timeout(
        Duration::from_millis(300),
        notifications.read_to_end(&mut rest),
    )
    .await
    .expect("the notification stream held the drain")
    .unwrap();
    assert!(
        String::from_utf8_lossy(&rest).ends_with("0\r\n\r\n"),
        "{rest:?}"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a new connection was accepted while draining"
    );
    assert!(!serving.is_finished(), "returned with a call in flight");
    // The call in flight finishes.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), call.read_to_end(&mut rest))
        .await
        .expect("the call was not finished")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rest).contains("data: last"),
        "{rest:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("did not return once every connection closed")
        .unwrap();
}

#[tokio::test]
async fn draining_an_http2_connection_ends_its_notification_stream_and_finishes_its_call() {
    let (addr, stop, serving) = start_streams().await;
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let request = |method: http::Method| {
        Request::builder()
            .method(method)
            .uri(format!("http://{addr}/mcp"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // Both streams on one connection.
    let notifications = client.request(request(http::Method::GET)).await.unwrap();
    let call = client.request(request(http::Method::POST)).await.unwrap();
    stop.send(()).unwrap();
    let notified = tokio::time::timeout(
        Duration::from_millis(300),
        notifications.into_body().collect(),
    )
    .await
    .expect("the notification stream held the drain")
    .unwrap()
    .to_bytes();
    assert_eq!(&notified[..], b"data: first\n\n");
    let answered = tokio::time::timeout(Duration::from_secs(5), call.into_body().collect())
        .await
        .expect("the call was not finished")
        .unwrap()
        .to_bytes();
    assert_eq!(&answered[..], b"data: first\n\ndata: last\n\n");
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("did not return once the connection closed (GOAWAY)")
        .unwrap();
}
