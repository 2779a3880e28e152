//! What every listener shares (ext_authz over gRPC and HTTP, the approvals API, admin): the
//! accept loop with its graceful drain, a cap on open connections, and deadlines that close
//! connections nobody uses. Without them, thousands of idle or half-open connections used up
//! the process's file descriptors: new connections from Envoy timed out, config and
//! revocation-file reloads failed, and inside Envoy (the module) Envoy's own listeners stopped
//! accepting.
//!
//! - **Cap**: at most `max` connections open at once per listener, TLS handshakes included
//!   (`server.max_connections` for the ext_authz listeners, `SMALL_LISTENER_MAX_CONNECTIONS`
//!   for admin and approvals). Past it a new connection is closed at once, counted in
//!   `portcullis_connections_refused_total{listener}` and logged (at most every 10 s);
//!   `portcullis_connections_open{listener}` shows how many are open.
//! - **First request**: a connection that sends no request within `FIRST_REQUEST_TIMEOUT` of
//!   being accepted is closed (by a watchdog task: nothing is added to polling the
//!   connection, so a Check costs what it did).
//! - **Dead peers**: TCP keep-alive on every accepted socket (`TCP_KEEPALIVE_*`): the kernel
//!   probes a connection idle for 30 s and closes it when the peer (a node gone, a cable
//!   pulled) stays silent, at no cost per request. HTTP/2 pings would also catch a peer whose
//!   kernel answers but whose program does not, for a lock and a clock read per frame on the
//!   Check path (about 1% more instructions per Check, counted); that case is left to the cap.
//! - **HTTP/1**: a request's headers must arrive within `H1_HEADER_READ_TIMEOUT`, and a
//!   keep-alive connection idle that long is closed.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::admin::metrics::{ListenerLabels, Metrics};

/// A connection must send its first request within this long of being accepted.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive: the first probe after this long without traffic...
const TCP_KEEPALIVE_TIME: Duration = Duration::from_secs(30);
/// ...then one every this long...
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...and the kernel closes the connection after this many unanswered.
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// HTTP/1: the longest a request's headers may take to arrive, and the longest a keep-alive
/// connection may wait idle for its next request.
pub const H1_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The cap of the admin and approvals listeners (a scraper, probes, a few approvers).
pub const SMALL_LISTENER_MAX_CONNECTIONS: usize = 256;
/// An approvals-only listener closes a connection idle this long (see `accept_loop`).
pub const APPROVALS_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The refused-connection warning is logged at most this often per listener.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A request body must arrive within this long once the handler starts reading it.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most bytes of request bodies the whole process holds while reading them: 64 MiB.
/// Without it, one client could open hundreds of HTTP/2 streams per connection and hold a
/// partial 4 MiB body on each (about 1 GB per connection, measured), far past a pod's
/// memory limit. A Check body is a kilobyte or two, so legitimate traffic never comes near
/// it.
const BODY_BUDGET: usize = 64 << 20;

/// The bytes of request bodies being read right now, process-wide.
static BODY_BYTES_HELD: AtomicUsize = AtomicUsize::new(0);

/// Why a request body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Over the handler's limit.
    TooLarge,
    /// The connection failed or reset mid-body.
    Unreadable,
    /// It did not arrive within `BODY_READ_TIMEOUT`.
    TimedOut,
    /// Bodies being read already hold the process's budget.
    Busy,
}

impl BodyError {
    pub const fn describe(self) -> &'static str {
        match self {
            BodyError::TooLarge => "request body over its size limit",
            BodyError::Unreadable => "request body unreadable",
            BodyError::TimedOut => "request body did not arrive within 10s",
            BodyError::Busy => {
                "request bodies being read hold the server's memory budget (64 MiB); try again"
            }
        }
    }
}

/// What one read holds of the budget, given back when the read ends, however it ends.
struct Held<'b> {
    held: &'b AtomicUsize,
    bytes: usize,
}

impl Held<'_> {
    /// Takes `n` more bytes of a budget of `budget`, or none when they do not fit.
    fn take(&mut self, n: usize, budget: usize) -> Result<(), BodyError> {
        let before = self.held.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > budget {
            self.held.fetch_sub(n, Ordering::Relaxed);
            return Err(BodyError::Busy);
        }
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.held.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// Reads a whole request body of at most `max` bytes, within `BODY_READ_TIMEOUT`, counting
/// what it holds against the process-wide budget (a body that would go past it is refused,
/// never waited for). One chunk (the usual Check) is handed back without a copy.
pub async fn read_body<B>(body: B, max: usize) -> Result<bytes::Bytes, BodyError>
where
    B: http_body::Body<Data = bytes::Bytes>,
{
    read_body_under(body, max, &BODY_BYTES_HELD, BODY_BUDGET, BODY_READ_TIMEOUT).await
}

async fn read_body_under<B>(
    body: B,
    max: usize,
    held: &AtomicUsize,
    budget: usize,
    timeout: Duration,
) -> Result<bytes::Bytes, BodyError>
where
    B: http_body::Body<Data = bytes::Bytes>,
{
    use http_body_util::BodyExt as _;
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut taken = Held { held, bytes: 0 };
        let mut whole = bytes::Bytes::new();
        // From a second chunk on, the chunks are copied together here.
        let mut joined: Option<Vec<u8>> = None;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|_| BodyError::Unreadable)?.into_data() else {
                continue;
            };
            // Taken as hyper hands it out: `copy_to_bytes` would make it shared (an
            // allocation and a reference count per Check).
            let n = data.len();
            // An empty frame (a client may end the stream with one) joins nothing.
            if n == 0 {
                continue;
            }
            if taken.bytes + n > max {
                return Err(BodyError::TooLarge);
            }
            taken.take(n, budget)?;
            match &mut joined {
                None if whole.is_empty() => whole = data,
                None => {
                    let mut both = Vec::with_capacity(whole.len() + n);
                    both.extend_from_slice(&whole);
                    both.extend_from_slice(&data);
                    joined = Some(both);
                }
                Some(all) => all.extend_from_slice(&data),
            }
        }
        Ok(joined.map_or(whole, bytes::Bytes::from))
    };
    within(read, || tokio::time::Instant::now() + timeout)
        .await
        .unwrap_or(Err(BodyError::TimedOut))
}

/// `fut`'s output, or `None` once `deadline` (asked for only if needed) has passed. A
/// future ready at its first poll (a body that came with its headers, a decision from
/// memory) sets up no timer and reads no clock.
pub async fn within<F: std::future::Future>(
    fut: F,
    deadline: impl FnOnce() -> tokio::time::Instant,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    match std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => tokio::time::timeout_at(deadline(), fut).await.ok(),
    }
}

/// The cap on one listener's open connections.
pub struct ConnLimit {
    listener: &'static str,
    max: usize,
    permits: Arc<Semaphore>,
    open: Gauge,
    refused: Counter,
    last_warning: Mutex<Option<Instant>>,
}

/// One open connection's place under its listener's cap; dropping it frees the place.
pub struct ConnPermit {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl ConnLimit {
    /// At most `max` (at least 1) connections open at once on `listener` (the name in logs
    /// and in the metrics' `listener` label).
    pub fn new(listener: &'static str, max: usize, metrics: &Metrics) -> Arc<Self> {
        let labels = ListenerLabels { listener };
        let max = max.max(1);
        Arc::new(Self {
            listener,
            max,
            permits: Arc::new(Semaphore::new(max)),
            open: metrics.connections_open.get_or_create(&labels).clone(),
            refused: metrics.connections_refused.get_or_create(&labels).clone(),
            last_warning: Mutex::new(None),
        })
    }

    /// The listener's name, as logs and metrics give it.
    pub fn listener(&self) -> &'static str {
        self.listener
    }

    /// A place for one more connection, or `None` (counted, and logged at most every 10 s)
    /// when `max` are open.
    pub fn admit(&self) -> Option<ConnPermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                self.open.inc();
                Some(ConnPermit {
                    _permit: permit,
                    open: self.open.clone(),
                })
            }
            Err(_) => {
                self.refused.inc();
                self.warn_refused(Instant::now());
                None
            }
        }
    }

    fn warn_refused(&self, now: Instant) {
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            return;
        }
        *last = Some(now);
        drop(last);
        tracing::warn!(
            listener = self.listener,
            max_connections = self.max,
            "connection limit reached: new connections are closed until open ones end \
             (counted in portcullis_connections_refused_total; a connection that sends no \
             request within {}s of connecting is closed, and a vanished peer's after \
             unanswered TCP keep-alive probes{})",
            FIRST_REQUEST_TIMEOUT.as_secs(),
            if matches!(self.listener, "grpc" | "http") {
                // Envoy's pooled connections: kept however idle once they have made a request.
                "; one that has made a request stays open however idle, as Envoy's pool \
                 needs: if these are not Envoy's, keep the port where only Envoy reaches it, \
                 or require client certificates (`server.tls`)"
            } else {
                "; an idle one after at most a minute"
            }
        );
    }
}

/// Socket options for every accepted connection: `TCP_NODELAY` (a Check answer must not wait
/// for Nagle) and TCP keep-alive (a vanished peer's connection is closed by the kernel).
pub fn tune_accepted(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_TIME)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

/// The plain-TCP connection stream of a listener, each connection under `limit` and tuned
/// by `tune_accepted`. A connection past the cap is closed as soon as it is accepted.
pub fn tcp_incoming(
    listener: TcpListener,
    limit: Arc<ConnLimit>,
) -> impl Stream<Item = io::Result<(TcpStream, ConnPermit)>> {
    futures_util::stream::unfold((listener, limit), |(listener, limit)| async move {
        let next = loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let Some(permit) = limit.admit() else {
                        continue;
                    };
                    break tune_accepted(&stream).map(|()| (stream, permit));
                }
                Err(e) => break Err(e),
            }
        };
        Some((next, (listener, limit)))
    })
}

/// Whether a connection has had a request: set by `Marked` when the connection's service is
/// first called.
#[derive(Clone, Default)]
pub struct FirstRequest(Arc<AtomicBool>);

impl FirstRequest {
    fn seen(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A connection's service that notes its first request in a `FirstRequest`.
#[derive(Clone)]
pub struct Marked<S> {
    inner: S,
    first: FirstRequest,
}

impl<S> Marked<S> {
    pub fn new(inner: S, first: FirstRequest) -> Self {
        Self { inner, first }
    }
}

impl<S, R> hyper::service::Service<R> for Marked<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> Self::Future {
        if !self.first.seen() {
            self.first.0.store(true, Ordering::Relaxed);
        }
        self.inner.call(req)
    }
}

/// The accept loop every listener runs: each connection `incoming` yields is served by
/// `connect` (which wraps its service in `Marked` with the given `FirstRequest`) until `stop`
/// turns true, then every connection is drained gracefully. A connection with no request
/// within `FIRST_REQUEST_TIMEOUT` is closed; a failed accept is logged and retried after a
/// pause (e.g. out of descriptors).
///
/// With `idle`, a connection is also closed once a whole `idle` passes without a request
/// (listeners whose clients are people and scripts, not Envoy's pooled connections: an
/// HTTP/2 connection that made one request and then sat idle held its place under the cap
/// forever, and 256 of them shut the approvals listener).
pub async fn accept_loop<S, IO, C>(
    incoming: S,
    mut stop: watch::Receiver<bool>,
    listener: &'static str,
    idle: Option<Duration>,
    mut connect: impl FnMut(TokioIo<IO>, FirstRequest) -> C,
) where
    S: Stream<Item = io::Result<(IO, ConnPermit)>>,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    C: GracefulConnection + Send + 'static,
    C::Error: std::fmt::Display,
{
    let graceful = GracefulShutdown::new();
    let mut incoming = std::pin::pin!(incoming);
    loop {
        let next = tokio::select! {
            next = incoming.next() => next,
            // A dropped sender also means stop.
            _ = stop.wait_for(|s| *s) => None,
        };
        match next {
            Some(Ok((io, permit))) => {
                let first = FirstRequest::default();
                let conn = graceful.watch(connect(TokioIo::new(io), first.clone()));
                let served = tokio::spawn(async move {
                    // Its place under the cap is held until the connection ends.
                    let _permit = permit;
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, listener, "connection ended with an error");
                    }
                });
                tokio::spawn(close_unless_used(
                    served.abort_handle(),
                    first,
                    listener,
                    idle,
                ));
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, listener, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => break,
        }
    }
    graceful.shutdown().await;
}

/// Closes the connection served by `served` (its task is dropped, and with it the socket
/// and its place under the cap) when it has had no request `FIRST_REQUEST_TIMEOUT` after
/// being accepted.
async fn close_unless_used(
    served: tokio::task::AbortHandle,
    first: FirstRequest,
    listener: &'static str,
    idle: Option<Duration>,
) {
    tokio::time::sleep(FIRST_REQUEST_TIMEOUT).await;
    if !first.seen() && !served.is_finished() {
        served.abort();
        tracing::debug!(
            listener,
            "no request within {}s of connecting; connection closed",
            FIRST_REQUEST_TIMEOUT.as_secs()
        );
        return;
    }
    let Some(idle) = idle else {
        return;
    };
    loop {
        // `Marked` sets the flag again at the next request.
        first.0.store(false, Ordering::Relaxed);
        tokio::time::sleep(idle).await;
        if served.is_finished() {
            return;
        }
        if !first.seen() {
            served.abort();
            tracing::debug!(
                listener,
                "no request for {}s; connection closed",
                idle.as_secs()
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use futures_util::StreamExt as _;
    use http_body::Frame;
    use http_body_util::{Full, StreamBody};

    use super::*;

    /// A body that sends `chunks` and then never ends (a client holding its stream open).
    fn held_open(chunks: Vec<Bytes>) -> impl http_body::Body<Data = Bytes, Error = io::Error> {
        let frames = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, io::Error>(Frame::data(c))),
        )
        .chain(futures_util::stream::pending());
        StreamBody::new(frames)
    }

    #[tokio::test]
    async fn a_body_is_read_whole_and_gives_its_budget_back() {
        let held = AtomicUsize::new(0);
        let body = Full::new(Bytes::from(vec![7u8; 3000]));
        let read = read_body_under(body, 4096, &held, 8192, Duration::from_secs(1)).await;
        assert_eq!(read.map(|b| b.len()), Ok(3000));
        assert_eq!(held.load(Ordering::Relaxed), 0);
        let body = Full::new(Bytes::from(vec![7u8; 5000]));
        let read = read_body_under(body, 4096, &held, 8192, Duration::from_secs(1)).await;
        assert_eq!(read, Err(BodyError::TooLarge));
        // Chunks are joined in order; an empty one is skipped.
        let chunks = StreamBody::new(futures_util::stream::iter(
            [&b"ab"[..], b"", b"cd", b"e"].map(|c| Ok::<_, io::Error>(Frame::data(Bytes::from(c)))),
        ));
        let read = read_body_under(chunks, 4096, &held, 8192, Duration::from_secs(1)).await;
        assert_eq!(read, Ok(Bytes::from_static(b"abcde")));
        assert_eq!(held.load(Ordering::Relaxed), 0);
        // A body and the empty frame that ends its stream: the body itself, not a copy.
        let body = Bytes::from(vec![9u8; 100]);
        let at = body.as_ptr();
        let ended = StreamBody::new(futures_util::stream::iter(
            [body, Bytes::new()].map(|c| Ok::<_, io::Error>(Frame::data(c))),
        ));
        let read = read_body_under(ended, 4096, &held, 8192, Duration::from_secs(1)).await;
        assert_eq!(read.map(|b| b.as_ptr()), Ok(at));
    }

    /// Partial bodies held open are cut at the deadline, and while they are held, they
    /// count against the budget: a body that would pass it is refused at once, never
    /// buffered (hundreds of such streams took ~1 GB per connection).
    #[tokio::test]
    async fn bodies_held_open_are_bounded_in_memory_and_time() {
        let held = AtomicUsize::new(0);
        let budget = 8 * 1024;
        let slow = read_body_under(
            held_open(vec![Bytes::from(vec![1u8; 6 * 1024])]),
            1 << 20,
            &held,
            budget,
            Duration::from_millis(300),
        );
        let over = async {
            // Let the slow body take its 6 KiB first.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let started = Instant::now();
            let body = Full::new(Bytes::from(vec![2u8; 4 * 1024]));
            let r = read_body_under(body, 1 << 20, &held, budget, Duration::from_secs(5)).await;
            (r, started.elapsed(), held.load(Ordering::Relaxed))
        };
        let (slow, (over, took, holding)) = tokio::join!(slow, over);
        assert_eq!(over, Err(BodyError::Busy));
        assert!(took < Duration::from_millis(100), "{took:?}");
        assert_eq!(holding, 6 * 1024, "the slow body holds 6 of 8 KiB");
        assert_eq!(slow, Err(BodyError::TimedOut));
        assert_eq!(
            held.load(Ordering::Relaxed),
            0,
            "given back when the read ended"
        );
    }
}

#[cfg(test)]
mod idle_tests {
    use super::*;

    /// On a listener with an idle limit, a connection that made a request and then sat idle
    /// for a whole window is closed; one that keeps making requests is not. Without a limit
    /// (Envoy's pooled connections) only the first-request deadline applies.
    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_only_where_the_listener_says() {
        let idle = Duration::from_secs(60);
        let spawn_conn = || tokio::spawn(std::future::pending::<()>());

        let busy = spawn_conn();
        let busy_flag = FirstRequest::default();
        busy_flag.0.store(true, Ordering::Relaxed);
        let watch = tokio::spawn(close_unless_used(
            busy.abort_handle(),
            busy_flag.clone(),
            "approvals",
            Some(idle),
        ));
        let quiet = spawn_conn();
        let quiet_flag = FirstRequest::default();
        quiet_flag.0.store(true, Ordering::Relaxed);
        tokio::spawn(close_unless_used(
            quiet.abort_handle(),
            quiet_flag,
            "approvals",
            Some(idle),
        ));
        let pooled = spawn_conn();
        let pooled_flag = FirstRequest::default();
        pooled_flag.0.store(true, Ordering::Relaxed);
        tokio::spawn(close_unless_used(
            pooled.abort_handle(),
            pooled_flag,
            "check",
            None,
        ));
        // A request every 30 s keeps `busy` open.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            busy_flag.0.store(true, Ordering::Relaxed);
        }
        assert!(quiet.is_finished(), "idle for a whole window: closed");
        assert!(!busy.is_finished());
        assert!(!pooled.is_finished());
        busy.abort();
        watch.await.unwrap();
    }
}
