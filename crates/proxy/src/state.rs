//! State shared by every listener and connection of one proxy: the current runtime (swapped
//! atomically), the endpoint pools, the drain signal, and what the admin port reports.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::{watch, Notify};

use crate::runtime::Runtime;
use crate::telemetry::TelemetryOptions;
use crate::upstream::Pools;

/// Largest request head accepted; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The header read timeout of sidecars (a gateway's is set tighter by `trellis proxy`).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Shared {
    runtime: ArcSwap<Runtime>,
    pub metrics: Arc<trellis_telemetry::metrics::ProxyMetrics>,
    /// Request metric handles, looked up once per label identity.
    pub metric_handles: crate::telemetry::HandleCache,
    /// Decoded peer metadata, by header value.
    pub peers: crate::telemetry::PeerCache,
    pub telemetry: TelemetryOptions,
    pub spans: Option<trellis_telemetry::export::SpanSink>,
    /// This proxy's certificates, when it has an identity (mesh mTLS).
    pub identity: Option<Arc<trellis_identity::tls::CredentialStore>>,
    /// The inbound mTLS server configuration, built once over `identity`.
    pub mesh_server: Option<Arc<rustls::ServerConfig>>,
    pub access_log: Option<trellis_telemetry::access_log::AccessLog>,
    /// Remote JWKS, cached across snapshots.
    pub jwks: crate::security::jwt::JwksCache,
    pub pools: Pools,
    pub drain: Drain,
    pub server: auto::Builder<TokioExecutor>,
    /// Where Gateway servers' `credentialName`s are.
    pub credentials_dir: Option<std::path::PathBuf>,
    ready: AtomicBool,
    pub status: Mutex<ConfigStatus>,
}

/// What the admin port reports about config.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ConfigStatus {
    /// Where config comes from: `file` or `control-plane`.
    pub source: String,
    /// Control-plane connection state (`connected`, `connecting`, `disconnected`).
    pub control_plane: Option<String>,
    pub applied_at: Option<SystemTime>,
    pub applied: u64,
    pub rejected: u64,
    pub last_rejection: Option<Rejection>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Rejection {
    pub at: SystemTime,
    pub reason: String,
    pub findings: Vec<trellis_config::Finding>,
}

impl Shared {
    /// Shared state with the given telemetry settings; starts their exporters (call within a
    /// Tokio runtime).
    pub fn with_telemetry(telemetry: TelemetryOptions) -> std::io::Result<Shared> {
        let mut s = Shared::new();
        let (spans, log) = crate::telemetry::start_sinks(&telemetry, &s.metrics)?;
        s.spans = spans;
        s.access_log = log;
        s.telemetry = telemetry;
        Ok(s)
    }

    /// Gives the proxy an identity: inbound listeners can then terminate mesh mTLS and outbound
    /// clusters originate it, with whatever certificate `store` holds at each handshake.
    pub fn set_identity(&mut self, store: Arc<trellis_identity::tls::CredentialStore>) -> Result<(), String> {
        self.mesh_server = Some(trellis_identity::tls::mesh_server(store.clone()).map_err(|e| e.to_string())?);
        self.identity = Some(store);
        Ok(())
    }

    /// How long a client may take to send a request head (from the connection's first byte, or
    /// the end of the previous request): past it the connection is closed and counted in
    /// `trellis_proxy_downstream_header_timeouts_total`. Slow-loris clients hold a connection
    /// no longer than this.
    pub fn set_header_read_timeout(&mut self, timeout: Duration) {
        self.server.http1().header_read_timeout(timeout);
    }

    /// Shared state with default telemetry and no exporters.
    pub fn new() -> Shared {
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .max_buf_size(MAX_HEADER_BYTES)
            .header_read_timeout(DEFAULT_HEADER_READ_TIMEOUT);
        server
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .adaptive_window(true)
            .max_concurrent_streams(1024);
        Shared {
            runtime: ArcSwap::from_pointee(Runtime::empty()),
            metrics: Arc::new(trellis_telemetry::metrics::ProxyMetrics::new()),
            metric_handles: Default::default(),
            peers: Default::default(),
            telemetry: TelemetryOptions::default(),
            spans: None,
            identity: None,
            mesh_server: None,
            access_log: None,
            jwks: Default::default(),
            pools: Pools::default(),
            drain: Drain::new(),
            server,
            credentials_dir: None,
            ready: AtomicBool::new(false),
            status: Mutex::new(ConfigStatus::default()),
        }
    }

    /// The runtime in force; hold it for the whole request.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    pub(crate) fn swap(&self, rt: Runtime) {
        self.metrics.set_version(rt.version());
        self.runtime.store(Arc::new(rt));
        self.metric_handles.clear();
        self.ready.store(true, Ordering::Release);
    }

    /// Ready: a snapshot is in force, the certificate (if the proxy has an identity) has
    /// arrived, and the proxy is not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.drain.is_draining()
            && self.identity.as_ref().is_none_or(|s| s.is_ready())
    }

    pub fn status(&self) -> ConfigStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update_status(&self, f: impl FnOnce(&mut ConfigStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

/// Graceful drain: a signal every listener and connection watches, and a count of open
/// connections to wait on.
pub struct Drain {
    tx: watch::Sender<bool>,
    open: AtomicUsize,
    closed: Notify,
}

/// Held by each connection task.
pub struct ConnGuard<'a>(&'a Drain);

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

impl Drain {
    fn new() -> Drain {
        Drain { tx: watch::channel(false).0, open: AtomicUsize::new(0), closed: Notify::new() }
    }

    pub fn track(&self) -> ConnGuard<'_> {
        self.open.fetch_add(1, Ordering::AcqRel);
        ConnGuard(self)
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        *self.tx.borrow()
    }

    pub fn start(&self) {
        self.tx.send_replace(true);
    }

    /// Resolves once draining has started.
    pub async fn started(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Waits until every connection has closed, or `deadline` passes; returns how many were
    /// still open.
    pub async fn wait_closed(&self, deadline: Duration) -> usize {
        let wait = async {
            loop {
                let notified = self.closed.notified();
                if self.open.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.open_connections()
    }
}
