//! Upstream endpoints and their connection pools.
//!
//! An [`Endpoint`] outlives snapshots: the [`Pools`] registry hands the same `Arc<Endpoint>` to
//! every snapshot that names the same address, so a config change keeps warm connections and
//! in-flight counts. HTTP/1.1 connections are pooled one request at a time (idle queue,
//! lock-free); HTTP/2 uses one multiplexed connection per endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
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
    pub server_name: rustls::pki_types::ServerName<'static>,
}

/// One upstream address with its pools and load counters.
pub struct Endpoint {
    pub address: String,
    target: Target,
    tls: Option<TlsSetup>,
    in_flight: AtomicUsize,
    idle_h1: SegQueue<http1::SendRequest<Body>>,
    idle_count: AtomicUsize,
    h2: ArcSwapOption<http2::SendRequest<Body>>,
    h2_connecting: tokio::sync::Mutex<()>,
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
    reuse: Option<http1::SendRequest<Body>>,
}

impl InFlight {
    /// The response was read to its end: its connection may serve the next request.
    pub fn complete(mut self) {
        if let Some(s) = self.reuse.take() {
            self.ep.recycle_h1(s);
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
        }
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
    async fn connect(&self, timeout: Duration, wire: Wire) -> Result<Io, ProxyError> {
        let fut = async {
            let stream = match &self.target {
                Target::Socket(sa) => TcpStream::connect(sa).await,
                Target::Dns(hp) => TcpStream::connect(hp.as_str()).await,
            }
            .map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
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
                let (resp, sender) = self.send_h1(req, connect_timeout).await?;
                in_flight.reuse = Some(sender);
                Ok(resp)
            }
            Wire::Http2 => self.send_h2(req, connect_timeout).await,
        }
    }

    fn pop_idle_h1(&self) -> Option<http1::SendRequest<Body>> {
        while let Some(s) = self.idle_h1.pop() {
            self.idle_count.fetch_sub(1, Ordering::Relaxed);
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    async fn connect_h1(&self, timeout: Duration) -> Result<http1::SendRequest<Body>, ProxyError> {
        let stream = self.connect(timeout, Wire::Http1).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::connect_failure(&self.address, e))?;
        let addr = self.address.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<Body>,
        timeout: Duration,
    ) -> Result<(Response<Incoming>, http1::SendRequest<Body>), SendError> {
        // A pooled connection may have been closed by the upstream in the meantime; a request
        // that was never written to it is retried once on a fresh connection.
        loop {
            let (mut sender, fresh) = match self.pop_idle_h1() {
                Some(s) => (s, false),
                None => match self.connect_h1(timeout).await {
                    Ok(s) => (s, true),
                    Err(error) => return Err(SendError { error, request: Some(req) }),
                },
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, sender)),
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => req = r,
                    request => return Err(SendError { request, error: classify(&self.address, e.into_error()) }),
                },
            }
        }
    }

    /// Returns the connection to the idle queue: at once if it is ready for the next request,
    /// else once it is.
    fn recycle_h1(self: &Arc<Self>, mut sender: http1::SendRequest<Body>) {
        if sender.is_ready() {
            if self.idle_count.load(Ordering::Relaxed) < MAX_IDLE_PER_ENDPOINT {
                self.idle_count.fetch_add(1, Ordering::Relaxed);
                self.idle_h1.push(sender);
            }
            return;
        }
        let ep = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() && ep.idle_count.load(Ordering::Relaxed) < MAX_IDLE_PER_ENDPOINT {
                ep.idle_count.fetch_add(1, Ordering::Relaxed);
                ep.idle_h1.push(sender);
            }
        });
    }

    async fn h2_sender(&self, timeout: Duration) -> Result<http2::SendRequest<Body>, ProxyError> {
        if let Some(s) = self.h2.load_full() {
            if !s.is_closed() {
                return Ok((*s).clone());
            }
        }
        let _guard = self.h2_connecting.lock().await;
        if let Some(s) = self.h2.load_full() {
            if !s.is_closed() {
                return Ok((*s).clone());
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
        self.h2.store(Some(Arc::new(sender.clone())));
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
