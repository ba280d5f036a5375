//! Upstream endpoints and their connection pools.
//!
//! An [`Endpoint`] outlives snapshots: the [`Pools`] registry hands the same `Arc<Endpoint>` to
//! every snapshot that names the same address, so a config change keeps warm connections and
//! in-flight counts. HTTP/1.1 connections are pooled one request at a time (idle queue,
//! lock-free); HTTP/2 uses one multiplexed connection per endpoint. The DestinationRule's
//! connection-pool limits apply per endpoint here: at most `maxConnections` HTTP/1.1
//! connections, at most `http1MaxPendingRequests` requests waiting for one (more: 503 `UO`),
//! `maxRequestsPerConnection`, and an idle timeout after which a pooled connection is dropped
//! instead of reused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use crossbeam_queue::SegQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::http::{Body, ProxyError};

pub mod body;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// Where an endpoint lives.
#[derive(Clone, Debug)]
enum Target {
    Socket(SocketAddr),
    /// Resolved at connect time.
    Dns(String),
}

/// A connection's byte stream, plain or TLS (type-erased so pools and hyper see one type).
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}
pub type Io = Box<dyn Stream>;

/// How to speak TLS to an endpoint: one client configuration per ALPN protocol.
#[derive(Clone)]
pub struct TlsSetup {
    pub h1: Arc<rustls::ClientConfig>,
    pub h2: Arc<rustls::ClientConfig>,
    /// For opaque TCP: ALPN `trellis-tcp` towards mesh peers, none when originating TLS.
    pub tcp: Arc<rustls::ClientConfig>,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

/// One upstream address with its pools and load counters.
pub struct Endpoint {
    pub address: String,
    target: Target,
    tls: Option<TlsSetup>,
    in_flight: AtomicUsize,
    idle_h1: SegQueue<Idle>,
    idle_count: AtomicUsize,
    h2: ArcSwapOption<H2>,
    h2_connecting: tokio::sync::Mutex<()>,
    limits: ArcSwap<Limits>,
    /// HTTP/1.1 connections open (pooled or in use).
    open_h1: AtomicUsize,
    /// Requests waiting for an HTTP/1.1 connection.
    pending: AtomicUsize,
    /// A connection was pooled again or closed: a waiting request may go on.
    freed: tokio::sync::Notify,
    /// Peak-EWMA of the time to response headers (for the peak-EWMA balancer).
    latency: std::sync::Mutex<Ewma>,
}

/// See [`Endpoint::tcp_slot`].
pub struct TcpSlot(Arc<Endpoint>);

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.0.release_h1();
    }
}

/// An exponentially weighted moving average that jumps to a higher sample at once (the peak)
/// and decays towards lower ones with time constant [`EWMA_DECAY`].
#[derive(Clone, Copy, Debug)]
struct Ewma {
    nanos: f64,
    at: std::time::Instant,
}

/// Linkerd's default decay.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// What an endpoint with no sample yet is assumed to take (a new endpoint gets some traffic).
const EWMA_DEFAULT: Duration = Duration::from_millis(1);

/// A pooled HTTP/1.1 connection, with what its limits need.
struct Idle {
    sender: http1::SendRequest<Body>,
    since: std::time::Instant,
    served: u32,
}

/// The HTTP/2 connection and the streams it carried.
struct H2 {
    sender: http2::SendRequest<Body>,
    streams: AtomicUsize,
}

/// The connection-pool limits in force for an endpoint (from the snapshot that last named it).
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub idle_timeout: Duration,
    pub keepalive: Option<trellis_config::snapshot::Keepalive>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: None,
            max_pending: None,
            max_requests_per_connection: None,
            idle_timeout: trellis_config::snapshot::DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            keepalive: None,
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("address", &self.address).finish()
    }
}

/// Which wire protocol to speak to an endpoint for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    Http1,
    Http2,
}

/// Counts a request as in flight on an endpoint until dropped; holds the HTTP/1.1 connection
/// the response arrives on, to pool it again once the response has been read through.
pub struct InFlight {
    ep: Arc<Endpoint>,
    reuse: Option<(http1::SendRequest<Body>, u32)>,
}

impl InFlight {
    /// The connection was upgraded (101): it leaves the pool for good.
    pub fn upgraded(mut self) {
        self.reuse = None;
    }

    /// The response was read to its end: its connection may serve the next request.
    pub fn complete(mut self) {
        if let Some((s, served)) = self.reuse.take() {
            self.ep.recycle_h1(s, served);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ep.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl Endpoint ===

impl Endpoint {
    fn new(address: &str, tls: Option<TlsSetup>) -> Endpoint {
        let target = match address.parse::<SocketAddr>() {
            Ok(sa) => Target::Socket(sa),
            Err(_) => Target::Dns(address.to_string()),
        };
        Endpoint {
            address: address.to_string(),
            target,
            tls,
            in_flight: AtomicUsize::new(0),
            idle_h1: SegQueue::new(),
            idle_count: AtomicUsize::new(0),
            h2: ArcSwapOption::empty(),
            h2_connecting: tokio::sync::Mutex::new(()),
            limits: ArcSwap::from_pointee(Limits::default()),
            open_h1: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
            latency: std::sync::Mutex::new(Ewma {
                nanos: EWMA_DEFAULT.as_nanos() as f64,
                at: std::time::Instant::now(),
            }),
        }
    }

    /// Counts one request's time to response headers into the peak EWMA.
    pub fn observe_latency(&self, took: Duration) {
        let now = std::time::Instant::now();
        let sample = took.as_nanos() as f64;
        let mut e = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        if sample > e.nanos {
            e.nanos = sample;
        } else {
            let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
            let w = (-elapsed / EWMA_DECAY.as_secs_f64()).exp();
            e.nanos = e.nanos * w + sample * (1.0 - w);
        }
        e.at = now;
    }

    /// The peak-EWMA cost of sending one more request here: latency × (requests in flight + 1).
    /// Without new samples the estimate decays towards the default, so an endpoint that was slow
    /// is tried again after a while.
    pub fn ewma_cost(&self) -> f64 {
        let e = *self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let w = (-e.at.elapsed().as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp();
        let nanos = e.nanos * w + EWMA_DEFAULT.as_nanos() as f64 * (1.0 - w);
        nanos * (self.in_flight() as f64 + 1.0)
    }

    /// Puts a snapshot's connection-pool limits in force (called while building it).
    pub fn set_limits(&self, limits: Limits) {
        self.limits.store(Arc::new(limits));
        self.freed.notify_waiters();
    }

    /// Requests in flight (for least-request balancing).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { ep: self.clone(), reuse: None }
    }

    /// Connects (and, for TLS endpoints, handshakes with ALPN for `wire`) within `timeout`.
    /// A place for one opaque TCP connection under the DestinationRule's `maxConnections`
    /// (which TCP and HTTP/1.1 connections to this endpoint share, as in Envoy); held while the
    /// connection is open. `Err`: the limit is reached (flag `UO`).
    pub fn tcp_slot(self: &Arc<Self>) -> Result<TcpSlot, ProxyError> {
        match self.limits.load().max_connections {
            Some(max) => {
                let max = max as usize;
                let taken =
                    self.open_h1.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
                if taken.is_err() {
                    return Err(ProxyError::overflow(&self.address, "connections"));
                }
            }
            None => {
                self.open_h1.fetch_add(1, Ordering::AcqRel);
            }
        }
        Ok(TcpSlot(self.clone()))
    }

    /// A connection for opaque TCP: plain, or TLS as the cluster says; `true` when it is mesh
    /// mTLS to a Trellis peer (ALPN `trellis-tcp`: the peer expects this side's metadata first).
    pub async fn connect_opaque(&self, timeout: Duration) -> Result<(Io, bool), ProxyError> {
        let fut = async {
            let stream = match &self.target {
                Target::Socket(sa) => TcpStream::connect(sa).await,
                Target::Dns(hp) => TcpStream::connect(hp.as_str()).await,
            }
            .map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            if let Some(k) = self.limits.load().keepalive {
                let ka =
                    socket2::TcpKeepalive::new().with_time(k.time.0).with_interval(k.interval.0).with_retries(k.probes);
                let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
            }
            match &self.tls {
                None => Ok::<(Io, bool), String>((Box::new(stream), false)),
                Some(tls) => {
                    let s = tokio_rustls::TlsConnector::from(tls.tcp.clone())
                        .connect(tls.server_name.clone(), stream)
                        .await
                        .map_err(|e| format!("TLS handshake: {e}"))?;
                    let mesh = s.get_ref().1.alpn_protocol() == Some(trellis_identity::tls::ALPN_TCP);
                    Ok((Box::new(s) as Io, mesh))
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(ProxyError::connect_failure(&self.address, e)),
            Err(_) => Err(ProxyError::connect_failure(&self.address, "connect timeout")),
        }
    }

    async fn connect(&self, timeout: Duration, wire: Wire) -> Result<Io, ProxyError> {
        let fut = async {
            let stream = match &self.target {
                Target::Socket(sa) => TcpStream::connect(sa).await,
                Target::Dns(hp) => TcpStream::connect(hp.as_str()).await,
            }
            .map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            if let Some(k) = self.limits.load().keepalive {
                let ka =
                    socket2::TcpKeepalive::new().with_time(k.time.0).with_interval(k.interval.0).with_retries(k.probes);
                let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
            }
            match &self.tls {
                None => Ok::<Io, String>(Box::new(stream)),
                Some(tls) => {
                    let cfg = if wire == Wire::Http2 { tls.h2.clone() } else { tls.h1.clone() };
                    let s = tokio_rustls::TlsConnector::from(cfg)
                        .connect(tls.server_name.clone(), stream)
                        .await
                        .map_err(|e| format!("TLS handshake: {e}"))?;
                    Ok(Box::new(s) as Io)
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(ProxyError::connect_failure(&self.address, e)),
            Err(_) => Err(ProxyError::connect_failure(&self.address, "connect timeout")),
        }
    }

    /// Sends `req` and returns the response head (the body streams on); an HTTP/1.1 connection
    /// goes to `in_flight`, which pools it again when the response completes. On an error
    /// before any of the request was written, the request comes back with it.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Body>,
        wire: Wire,
        connect_timeout: Duration,
        in_flight: &mut InFlight,
    ) -> Result<Response<Incoming>, SendError> {
        match wire {
            Wire::Http1 => {
                let (resp, sender, served) = self.send_h1(req, connect_timeout).await?;
                in_flight.reuse = Some((sender, served));
                Ok(resp)
            }
            Wire::Http2 => self.send_h2(req, connect_timeout).await,
        }
    }

    /// A pooled connection that is still usable and has not been idle past the idle timeout.
    fn pop_idle_h1(&self) -> Option<(http1::SendRequest<Body>, u32)> {
        let idle_timeout = self.limits.load().idle_timeout;
        while let Some(i) = self.idle_h1.pop() {
            self.idle_count.fetch_sub(1, Ordering::Relaxed);
            if i.sender.is_ready() && i.since.elapsed() < idle_timeout {
                return Some((i.sender, i.served));
            }
            // Dropped: the connection closes (the upstream may be closing it already).
        }
        None
    }

    /// A connection slot under `maxConnections`, taken.
    fn reserve_h1(&self) -> bool {
        let max = self.limits.load().max_connections.map_or(usize::MAX, |m| m as usize);
        self.open_h1.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| (o < max).then_some(o + 1)).is_ok()
    }

    /// An HTTP/1.1 connection for one request: pooled, new, or — at `maxConnections` — the next
    /// one freed, waiting among at most `http1MaxPendingRequests` requests.
    async fn h1_sender(
        self: &Arc<Self>,
        timeout: Duration,
    ) -> Result<(http1::SendRequest<Body>, u32, bool), ProxyError> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some((s, served)) = self.pop_idle_h1() {
                return Ok((s, served, false));
            }
            if self.reserve_h1() {
                return match self.connect_h1(timeout).await {
                    Ok(s) => Ok((s, 0, true)),
                    Err(e) => {
                        self.release_h1();
                        Err(e)
                    }
                };
            }
            let max_pending = self.limits.load().max_pending.map_or(usize::MAX, |m| m as usize);
            if self
                .pending
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| (p < max_pending).then_some(p + 1))
                .is_err()
            {
                return Err(ProxyError::overflow(&self.address, "pending_requests"));
            }
            let _waiting = Waiting(&self.pending);
            freed.await;
        }
    }

    /// An HTTP/1.1 connection closed.
    fn release_h1(&self) {
        self.open_h1.fetch_sub(1, Ordering::Relaxed);
        self.freed.notify_one();
    }

    /// A new HTTP/1.1 connection; its slot (taken by the caller) is released when it closes.
    async fn connect_h1(self: &Arc<Self>, timeout: Duration) -> Result<http1::SendRequest<Body>, ProxyError> {
        let stream = self.connect(timeout, Wire::Http1).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::connect_failure(&self.address, e))?;
        let addr = self.address.clone();
        let ep = Arc::downgrade(self);
        tokio::spawn(async move {
            // With upgrades: a 101 hands the connection to the tunnel (WebSocket).
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %addr, error = %e, "upstream HTTP/1.1 connection ended");
            }
            if let Some(ep) = ep.upgrade() {
                ep.release_h1();
            }
        });
        Ok(sender)
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<Body>,
        timeout: Duration,
    ) -> Result<(Response<Incoming>, http1::SendRequest<Body>, u32), SendError> {
        // A pooled connection may have been closed by the upstream in the meantime; a request
        // that was never written to it is retried once on a fresh connection.
        loop {
            let (mut sender, served, fresh) = match self.h1_sender(timeout).await {
                Ok(s) => s,
                Err(error) => return Err(SendError { error, request: Some(req) }),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, sender, served + 1)),
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => req = r,
                    request => return Err(SendError { request, error: classify(&self.address, e.into_error()) }),
                },
            }
        }
    }

    /// Returns the connection to the idle queue: at once if it is ready for the next request,
    /// else once it is; not past `maxRequestsPerConnection`.
    fn recycle_h1(self: &Arc<Self>, mut sender: http1::SendRequest<Body>, served: u32) {
        if self.limits.load().max_requests_per_connection.is_some_and(|m| served >= m) {
            return; // Dropped: the connection closes and frees its slot.
        }
        if sender.is_ready() {
            self.pool_h1(sender, served);
            return;
        }
        let ep = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                ep.pool_h1(sender, served);
            }
        });
    }

    fn pool_h1(&self, sender: http1::SendRequest<Body>, served: u32) {
        if self.idle_count.load(Ordering::Relaxed) < MAX_IDLE_PER_ENDPOINT {
            self.idle_count.fetch_add(1, Ordering::Relaxed);
            self.idle_h1.push(Idle { sender, since: std::time::Instant::now(), served });
            self.freed.notify_one();
        }
    }

    async fn h2_sender(&self, timeout: Duration) -> Result<http2::SendRequest<Body>, ProxyError> {
        let max_streams = self.limits.load().max_requests_per_connection.map_or(usize::MAX, |m| m as usize);
        let usable = |h: &H2| !h.sender.is_closed() && h.streams.fetch_add(1, Ordering::Relaxed) < max_streams;
        if let Some(h) = self.h2.load_full() {
            if usable(&h) {
                return Ok(h.sender.clone());
            }
        }
        let _guard = self.h2_connecting.lock().await;
        if let Some(h) = self.h2.load_full() {
            if usable(&h) {
                return Ok(h.sender.clone());
            }
        }
        let stream = self.connect(timeout, Wire::Http2).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::connect_failure(&self.address, e))?;
        let addr = self.address.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        self.h2.store(Some(Arc::new(H2 { sender: sender.clone(), streams: AtomicUsize::new(1) })));
        Ok(sender)
    }

    async fn send_h2(&self, mut req: Request<Body>, timeout: Duration) -> Result<Response<Incoming>, SendError> {
        let mut retried = false;
        loop {
            let mut sender = match self.h2_sender(timeout).await {
                Ok(s) => s,
                Err(error) => return Err(SendError { error, request: Some(req) }),
            };
            if let Err(e) = sender.ready().await {
                if retried {
                    return Err(SendError { error: classify(&self.address, e), request: Some(req) });
                }
                retried = true;
                self.h2.store(None);
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(r) if !retried => {
                        retried = true;
                        self.h2.store(None);
                        req = r;
                    }
                    request => return Err(SendError { request, error: classify(&self.address, e.into_error()) }),
                },
            }
        }
    }
}

/// Counts a request waiting for a connection while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A failed send; `request` is the request when none of it was written (safe to send again,
/// whatever its method).
pub struct SendError {
    pub error: ProxyError,
    pub request: Option<Request<Body>>,
}

/// Maps a hyper client error to the flag Envoy would log.
fn classify(address: &str, e: hyper::Error) -> ProxyError {
    if e.is_user() {
        // The request body (the downstream) failed, not the upstream.
        return ProxyError::downstream_gone(e);
    }
    let refused = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h| h.reason() == Some(h2::Reason::REFUSED_STREAM));
    let reason = match std::error::Error::source(&e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    };
    ProxyError { refused, ..ProxyError::reset(address, reason) }
}

/// The registry that lets endpoints (and their pools) outlive snapshots.
#[derive(Default)]
pub struct Pools {
    endpoints: Mutex<HashMap<String, Weak<Endpoint>>>,
}

impl Pools {
    /// The endpoint for `address` (plain), shared with any earlier snapshot that still uses it.
    /// Called only while building a snapshot, never per request.
    pub fn endpoint(&self, address: &str) -> Arc<Endpoint> {
        self.endpoint_with(address, None)
    }

    /// The endpoint for `address` spoken to with TLS as `tls` describes; `(key, setup)`: the key
    /// names the TLS variant, so each variant has its own connections.
    pub fn endpoint_with(&self, address: &str, tls: Option<(&str, TlsSetup)>) -> Arc<Endpoint> {
        let key = match &tls {
            Some((k, _)) => format!("{address}|{k}"),
            None => address.to_string(),
        };
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ep) = map.get(&key).and_then(Weak::upgrade) {
            return ep;
        }
        let ep = Arc::new(Endpoint::new(address, tls.map(|(_, t)| t)));
        map.insert(key, Arc::downgrade(&ep));
        ep
    }

    /// Forgets endpoints no snapshot uses any more.
    pub fn collect(&self) {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
    }
}
