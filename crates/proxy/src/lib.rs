//! The Trellis data plane.
//!
//! A [`Proxy`] serves one routing snapshot at a time through its listeners:
//! `listener` (accept, HTTP/1.1 + HTTP/2) → `pipeline` (admit, select a route, respond or
//! forward with retries) → `upstream` (pools) and back, with direction-specific steps in
//! `pipeline::direction`, balancing in `balance`, and the instantiated snapshot in `runtime`. Config arrives as a plain-data snapshot through
//! [`Proxy::apply`], from a file watcher (`source`) or, later, the control plane.
//! See docs/ARCHITECTURE.md for the picture.
#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod control_client;
pub mod http;
pub mod identity;
pub mod listener;
pub mod pipeline;
pub mod runtime;
pub mod security;
pub mod source;
pub mod state;
pub mod tcp;
pub mod telemetry;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use trellis_config::snapshot::Snapshot;

use crate::listener::Listeners;
use crate::runtime::Runtime;
use crate::state::{Rejection, Shared};

/// What a proxy process is started with.
pub struct ProxyOptions {
    pub telemetry: telemetry::TelemetryOptions,
    /// The credential store for mesh mTLS, when the proxy has an identity.
    pub identity: Option<Arc<trellis_identity::tls::CredentialStore>>,
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// Gateway listeners bind port 0 (tests read the bound address from `/config_dump`).
    pub ephemeral_gateway_ports: bool,
    /// Where Gateway servers' `credentialName`s are: `<dir>/<name>/tls.crt`, `tls.key`, `ca.crt`.
    pub credentials_dir: Option<std::path::PathBuf>,
}

/// One proxy process's data plane.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: Listeners,
    /// Serialises snapshot application (the request path never takes it).
    applying: tokio::sync::Mutex<()>,
}

impl Proxy {
    /// A proxy with default telemetry and no exporters.
    pub fn new() -> Arc<Proxy> {
        Self::from_shared(Shared::new())
    }

    /// A proxy with the given options (starts the telemetry exporters; call within a Tokio
    /// runtime).
    pub fn with_options(opts: ProxyOptions) -> Result<Arc<Proxy>, String> {
        let mut shared =
            Shared::with_telemetry(opts.telemetry).map_err(|e| format!("cannot open the access log: {e}"))?;
        shared.set_header_read_timeout(opts.header_read_timeout);
        shared.credentials_dir = opts.credentials_dir;
        if let Some(store) = opts.identity {
            shared.set_identity(store)?;
        }
        let listeners =
            if opts.ephemeral_gateway_ports { Listeners::with_ephemeral_gateway_ports() } else { Listeners::default() };
        Ok(Arc::new(Proxy { shared: Arc::new(shared), listeners, applying: tokio::sync::Mutex::new(()) }))
    }

    fn from_shared(shared: Shared) -> Arc<Proxy> {
        Arc::new(Proxy {
            shared: Arc::new(shared),
            listeners: Listeners::default(),
            applying: tokio::sync::Mutex::new(()),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Applies a snapshot atomically: builds its runtime and binds its new listeners, then swaps.
    /// On any error nothing changes and the error is recorded as a rejection.
    pub async fn apply(&self, snap: Snapshot) -> Result<(), runtime::BuildError> {
        let _g = self.applying.lock().await;
        if self.shared.runtime().version() == snap.version && self.shared.is_ready() {
            return Ok(());
        }
        let version = snap.version.clone();
        let snap = Arc::new(snap);
        let result = async {
            let rt = Runtime::build(
                snap.clone(),
                &self.shared.pools,
                &self.shared.telemetry,
                self.shared.spans.is_some(),
                self.shared.identity.as_ref(),
                &self.shared.jwks,
                self.shared.credentials_dir.as_deref(),
            )?;
            let staged = self.listeners.stage(&snap).await?;
            Ok::<_, runtime::BuildError>((rt, staged))
        }
        .await;
        match result {
            Ok((rt, staged)) => {
                rt.activate();
                self.shared.swap(rt);
                self.listeners.commit(staged, &self.shared).await;
                self.shared.update_status(|s| {
                    s.applied += 1;
                    s.applied_at = Some(SystemTime::now());
                });
                tracing::info!(%version, "snapshot applied");
                Ok(())
            }
            Err(e) => {
                self.reject(e.to_string(), Vec::new());
                Err(e)
            }
        }
    }

    /// Records a config that was not applied (invalid config, a snapshot that failed to build).
    pub fn reject(&self, reason: String, findings: Vec<trellis_config::Finding>) {
        tracing::warn!("config rejected, the last good snapshot keeps serving: {reason}");
        for f in &findings {
            tracing::warn!("  {f}");
        }
        self.shared.metrics.snapshot_rejections.inc();
        self.shared.update_status(|s| {
            s.rejected += 1;
            s.last_rejection = Some(Rejection { at: SystemTime::now(), reason, findings });
        });
    }

    /// What `/config_dump` shows.
    pub async fn config_dump(&self) -> serde_json::Value {
        let rt = self.shared.runtime();
        let status = self.shared.status();
        let listeners: Vec<serde_json::Value> = self
            .listeners
            .addresses()
            .await
            .into_iter()
            .map(|(n, configured, bound)| {
                serde_json::json!({"name": n, "address": configured.to_string(), "bound": bound.to_string()})
            })
            .collect();
        serde_json::json!({
            "version": rt.version(),
            "status": status,
            "active_listeners": listeners,
            "snapshot": &*rt.snapshot,
        })
    }

    /// Drains: stops accepting, lets in-flight requests finish (HTTP/1.1 connections close after
    /// their current response, HTTP/2 gets GOAWAY), waiting at most `deadline`.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.shared.drain.start();
        let left = self.shared.drain.wait_closed(deadline).await;
        if left > 0 {
            tracing::warn!(connections = left, "drain deadline passed with connections still open");
        }
        if let Some(log) = &self.shared.access_log {
            log.flush(Duration::from_secs(1)).await;
        }
        if let Some(spans) = &self.shared.spans {
            spans.flush(Duration::from_secs(1)).await;
        }
        left
    }
}
