//! The sidecar's HTTP listeners, the agent-facing proxy (`:15001`) and the
//! inbound side (`:15006`): accepting connections and serving HTTP/1.1, or
//! HTTP/2 with prior knowledge, under limits a peer cannot stretch.
//!
//! - **Connection cap**, one per listener: when a listener holds its maximum, a
//!   new connection is accepted and reset at once (counted in
//!   `chaperone_sidecar_connections_refused_total`). Accept-and-reset rather
//!   than leaving it in the kernel's backlog: the caller fails fast and can
//!   retry, the backlog never fills with an attacker's connections that would
//!   be served first once a slot frees, and no descriptor is held. One cap per
//!   listener, so that connections piled on the inbound side can never use up
//!   the descriptors the agent's own proxy connections (and their upstream
//!   connections) need.
//! - **Header-read timeout**: a request's head must be complete within the
//!   timeout, counted from the accept for a connection's first request and
//!   from the first byte of each later HTTP/1 request (slow-loris connections
//!   are closed).
//! - **Idle timeout**: a connection with no request in flight for that long is
//!   closed (HTTP/2 with a GOAWAY). A request is in flight from its head until
//!   its response body has ended, so SSE streams (GET streams, streamed POST
//!   responses) are never cut, however quiet.
//! - HTTP/2 keep-alive pings every idle timeout find peers that went away;
//!   one that does not answer within the header-read timeout is closed.
//!
//! Request bodies are bounded in size by their readers, not in time here.
//!
//! **Shutdown** drains: the listener stops accepting (new connections are
//! refused by the kernel), every open connection is told to finish what is in
//! flight and close (HTTP/1 after its current response, HTTP/2 with a
//! GOAWAY), `GET` event streams (a server's notifications, which never end on
//! their own) end at once, and [`serve_connections`] returns when the last
//! connection has closed. How long that may take is the caller's to bound.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::metrics::{ConnectionTimeoutLabels, ListenerLabels, Metrics};
use crate::proxy::{BoxError, ResponseBody, content_type_is};
use crate::settings::Settings;

/// The limits one listener serves its connections under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest a request's head may take.
    pub header_read_timeout: Duration,
    /// Longest a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Most connections held at once.
    pub max_connections: usize,
}

impl ConnectionLimits {
    /// The limits of the agent-facing proxy.
    pub fn proxy(settings: &Settings) -> Self {
        Self {
            header_read_timeout: settings.header_read_timeout,
            idle_timeout: settings.connection_idle_timeout,
            max_connections: settings.max_connections,
        }
    }

    /// The limits of the inbound side.
    pub fn inbound(settings: &Settings) -> Self {
        Self {
            header_read_timeout: settings.header_read_timeout,
            idle_timeout: settings.connection_idle_timeout,
            max_connections: settings.inbound_max_connections,
        }
    }
}

/// Which timeout closed a connection (the `timeout` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    Header,
    Idle,
}

impl Expiry {
    fn label(self) -> &'static str {
        match self {
            Expiry::Header => "header",
            Expiry::Idle => "idle",
        }
    }
}

/// What one connection is doing, for its timeouts.
///
/// The watchdog ([`Activity::expired`]) runs in the connection's own task, so
/// waking it from a request's path (a read, a request starting or ending)
/// wakes that task while it runs: tokio then requeues it as a yield and
/// unparks another worker to steal it, a cross-thread hand-off per wake. So
/// the request path wakes the watchdog only when a deadline comes earlier
/// than the one its timer is set for ([`ActivityState::armed`]); otherwise
/// the watchdog finds the change when its timer fires. While idle it re-reads
/// the state at least every header-read timeout, so a head that starts later
/// never has a deadline before the timer: keep-alive requests wake it not at
/// all.
#[derive(Debug)]
struct Activity {
    state: Mutex<ActivityState>,
    limits: ConnectionLimits,
    /// Set while the next byte read would start a request's head: the fast
    /// path of every read.
    awaiting_head: AtomicBool,
    /// Wakes the connection's watchdog when a deadline came earlier than
    /// its timer.
    changed: Notify,
}

#[derive(Debug)]
struct ActivityState {
    /// Requests whose responses have not ended.
    in_flight: usize,
    /// When the last request in flight ended (or the accept).
    idle_since: Instant,
    /// When the head now being read began; `None` while idle or busy.
    head_started: Option<Instant>,
    /// An HTTP/2 connection: bytes while idle are frames (pings, window
    /// updates), not the start of a request's head.
    http2: bool,
    /// When the watchdog's timer fires; `None` while it waits for a wake
    /// only (it last looked while a request was in flight).
    armed: Option<Instant>,
}

impl ActivityState {
    /// When the watchdog should look next, at `now`, and what expires then
    /// (`None`: only a re-check); `None` while a request is in flight.
    fn next_look(
        &self,
        limits: &ConnectionLimits,
        now: Instant,
    ) -> Option<(Instant, Option<Expiry>)> {
        if self.in_flight > 0 {
            return None;
        }
        if let Some(started) = self.head_started {
            return Some((started + limits.header_read_timeout, Some(Expiry::Header)));
        }
        let idle = self.idle_since + limits.idle_timeout;
        let recheck = now + limits.header_read_timeout;
        Some(if idle <= recheck {
            (idle, Some(Expiry::Idle))
        } else {
            (recheck, None)
        })
    }

    /// Whether a deadline at `at` needs the watchdog woken.
    fn wakes_watchdog(&self, at: Instant) -> bool {
        self.armed.is_none_or(|armed| at < armed)
    }
}

impl Activity {
    /// A connection accepted at `now` under `limits`: its first head is due
    /// within the header-read timeout from now.
    fn new(now: Instant, limits: ConnectionLimits) -> Self {
        Self {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                idle_since: now,
                head_started: Some(now),
                http2: false,
                armed: None,
            }),
            limits,
            awaiting_head: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes arrived from the peer.
    fn on_read(&self) {
        if self.awaiting_head.swap(false, Ordering::AcqRel) {
            let mut state = self.lock();
            if state.in_flight == 0 && state.head_started.is_none() && !state.http2 {
                let now = Instant::now();
                state.head_started = Some(now);
                let wake = state.wakes_watchdog(now + self.limits.header_read_timeout);
                drop(state);
                if wake {
                    self.changed.notify_one();
                }
            }
        }
    }

    /// A request's head arrived. It removes every deadline: the watchdog
    /// finds that out when its timer fires.
    fn request_started(&self, version: Version) {
        let mut state = self.lock();
        state.in_flight += 1;
        state.head_started = None;
        state.http2 |= version == Version::HTTP_2;
        self.awaiting_head.store(false, Ordering::Release);
    }

    /// A request's response ended (or was abandoned).
    fn request_ended(&self) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            let now = Instant::now();
            state.idle_since = now;
            state.head_started = None;
            self.awaiting_head.store(!state.http2, Ordering::Release);
            let next = now
                + self
                    .limits
                    .idle_timeout
                    .min(self.limits.header_read_timeout);
            let wake = state.wakes_watchdog(next);
            drop(state);
            if wake {
                self.changed.notify_one();
            }
        }
    }

    /// The watchdog's next look, noted as armed.
    fn arm(&self) -> Option<(Instant, Option<Expiry>)> {
        let mut state = self.lock();
        let next = state.next_look(&self.limits, Instant::now());
        state.armed = next.map(|(at, _)| at);
        next
    }

    /// Resolves when the connection has outlived one of its timeouts.
    async fn expired(&self) -> Expiry {
        loop {
            // `notify_one` leaves a permit when nobody waits: a change made
            // between arming and waiting is not lost.
            let changed = self.changed.notified();
            match self.arm() {
                None => changed.await,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {
                            let now = Instant::now();
                            let due = self.lock().next_look(&self.limits, now);
                            if let Some((at, Some(expiry))) = due
                                && at <= now
                            {
                                return expiry;
                            }
                        }
                        () = changed => {}
                    }
                }
            }
        }
    }
}

/// Marks a request in flight until dropped (with its response body).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: &Arc<Activity>, version: Version) -> Self {
        activity.request_started(version);
        Self(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that keeps its request in flight until it ends; a `GET`
/// event stream ends (cleanly, between frames) once its listener drains.
struct InFlightBody {
    inner: ResponseBody,
    /// For a `GET` event stream: resolves when the listener starts draining.
    drained: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    _in_flight: InFlight,
}

impl Body for InFlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(drained) = &mut this.drained
            && drained.as_mut().poll(cx).is_ready()
        {
            // Ended for good: later polls see an empty body.
            this.drained = None;
            this.inner = crate::proxy::full(Bytes::new());
            return Poll::Ready(None);
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A TCP stream that tells its [`Activity`] when bytes arrive.
struct WatchedStream {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read();
        }
        polled
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The HTTP/1 and HTTP/2 settings of a listener's connections.
fn connection_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The watchdog enforces the header-read and idle timeouts; hyper's own
    // head timer (which starts when a connection goes idle) is only a
    // backstop that can never fire first.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout + limits.idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.idle_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    builder
}

/// Accepts connections on `listener` until `shutdown` resolves and serves each
/// (HTTP/1.1, or HTTP/2 with prior knowledge) with `handle` under `limits`;
/// `side` names the listener in logs and metrics. After `shutdown` it closes
/// the listener, lets each connection finish what it has in flight, and
/// returns once every connection has closed.
pub(crate) async fn serve_connections<H, F>(
    side: &'static str,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    handle: H,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let builder = connection_builder(&limits);
    let labels = ListenerLabels { listener: side };
    let open = metrics.connections_open.get_or_create(&labels).clone();
    let refused = metrics.connections_refused.get_or_create(&labels).clone();
    let (drain, draining) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors, most likely: back off instead of spinning.
                tracing::warn!(side, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            refused.inc();
            // A reset, not a FIN: nothing lingers, the caller fails at once.
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        open.inc();
        let connection = Connection {
            side,
            limits,
            metrics: Arc::clone(&metrics),
            open: open.clone(),
            _permit: permit,
        };
        let builder = builder.clone();
        let handle = handle.clone();
        let draining = draining.clone();
        tokio::spawn(async move { connection.serve(&builder, stream, handle, draining).await });
    }
    drop(listener);
    let open_now = limits.max_connections.max(1) - slots.available_permits();
    tracing::info!(
        side,
        connections = open_now,
        "listener closed; draining its connections"
    );
    let _ = drain.send(true);
    // Each open connection holds a slot: all slots free, all closed.
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    tracing::info!(side, "connections drained");
}

/// Resolves once the listener starts draining; never when it is dropped
/// without draining (its connections then go on as they are).
async fn drain_requested(draining: &mut watch::Receiver<bool>) {
    if draining.wait_for(|drain| *drain).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One accepted connection, holding its slot of the listener's cap (and its
/// count in the open-connections gauge) until dropped.
struct Connection {
    side: &'static str,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    open: Gauge,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Connection {
    fn timed_out(&self, timeout: &'static str) {
        self.metrics
            .connections_timed_out
            .get_or_create(&ConnectionTimeoutLabels {
                listener: self.side,
                timeout,
            })
            .inc();
    }

    async fn serve<H, F>(
        &self,
        builder: &auto::Builder<TokioExecutor>,
        stream: TcpStream,
        handle: H,
        mut draining: watch::Receiver<bool>,
    ) where
        H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
        F: Future<Output = Response<ResponseBody>> + Send + 'static,
    {
        let side = self.side;
        let activity = Arc::new(Activity::new(Instant::now(), self.limits));
        let io = TokioIo::new(WatchedStream {
            inner: stream,
            activity: Arc::clone(&activity),
        });
        let watched = Arc::clone(&activity);
        let streams_drain = draining.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_flight = InFlight::enter(&watched, req.version());
            // A GET answered with an event stream is the server's notification
            // channel: it never ends on its own, and would hold a drain for the
            // whole grace period. It ends when draining starts; the client
            // reconnects (to another replica).
            let drain = (req.method() == http::Method::GET).then(|| streams_drain.clone());
            let response = handle(req);
            async move {
                let response = response.await;
                let drained = drain
                    .filter(|_| content_type_is(response.headers(), "text/event-stream"))
                    .map(|mut drain| -> Pin<Box<dyn Future<Output = ()> + Send>> {
                        Box::pin(async move { drain_requested(&mut drain).await })
                    });
                Ok::<_, Infallible>(response.map(|inner| InFlightBody {
                    inner,
                    drained,
                    _in_flight: in_flight,
                }))
            }
        });
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = drain_requested(&mut draining) => {
                // What is in flight finishes; nothing new starts.
                connection.as_mut().graceful_shutdown();
                tokio::select! {
                    result = connection.as_mut() => result,
                    expiry = activity.expired() => {
                        self.timed_out(expiry.label());
                        tracing::debug!(side, timeout = expiry.label(), "connection timed out while draining");
                        return;
                    }
                }
            }
            expiry = activity.expired() => {
                self.timed_out(expiry.label());
                tracing::debug!(side, timeout = expiry.label(), "connection timed out");
                if expiry == Expiry::Header {
                    // A head still arriving: nothing to finish, drop it.
                    return;
                }
                // Nothing in flight: HTTP/2 peers get a GOAWAY, HTTP/1
                // connections close; a peer that does not let go is dropped.
                connection.as_mut().graceful_shutdown();
                let grace = self.limits.header_read_timeout;
                match tokio::time::timeout(grace, connection.as_mut()).await {
                    Ok(result) => result,
                    Err(_) => return,
                }
            }
        };
        if let Err(err) = result {
            let timed_out = err
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout);
            if timed_out {
                let http2 = activity.lock().http2;
                self.timed_out(if http2 { "keepalive" } else { "header" });
            }
            tracing::debug!(side, error = %err, "connection ended with an error");
        }
    }
}

#[cfg(test)]
#[path = "listener_tests.rs"]
mod tests;
