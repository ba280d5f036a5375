//! Static config: the proxy reads its config from files (like Envoy's bootstrap or ztunnel's
//! local config), compiles its own snapshot, and re-reads on change. A change is validated with
//! the same rules as `trellis analyze`; one with errors is reported and the last good snapshot
//! keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use trellis_config::compile::{compile, ProxySpec};
use trellis_config::snapshot::Snapshot;
use trellis_config::watch::notify;
use trellis_config::Finding;

use crate::Proxy;

/// Config files plus the proxy's own identity and listeners.
#[derive(Clone, Debug)]
pub struct StaticSource {
    pub paths: Vec<PathBuf>,
    pub recursive: bool,
    pub spec: ProxySpec,
}

/// How long to wait for an editor's burst of writes to settle.
const DEBOUNCE: Duration = Duration::from_millis(50);

impl StaticSource {
    /// Reads and validates the config; compiles it when it has no errors. Warnings come along.
    pub fn load(&self) -> Result<(Snapshot, Vec<Finding>), Vec<Finding>> {
        let loaded = trellis_config::check(&self.paths, self.recursive);
        if loaded.findings.iter().any(Finding::is_error) {
            return Err(loaded.findings);
        }
        Ok((compile(&loaded.resources, &[], &self.spec), loaded.findings))
    }

    /// Loads and applies once; on failure returns the reason.
    pub async fn reload(&self, proxy: &Proxy) -> Result<(), String> {
        match self.load() {
            Ok((snap, warnings)) => {
                for w in warnings.iter().filter(|w| w.severity == trellis_config::Severity::Warning) {
                    tracing::warn!("{w}");
                }
                proxy.apply(snap).await.map_err(|e| e.to_string())
            }
            Err(findings) => {
                let errors = findings.iter().filter(|f| f.is_error()).count();
                let reason = format!("config has {errors} error(s)");
                proxy.reject(reason.clone(), findings.into_iter().filter(Finding::is_error).collect());
                Err(reason)
            }
        }
    }

    /// Watches the config paths and reloads on every change, until the proxy drains.
    pub fn watch(self, proxy: Arc<Proxy>) -> notify::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = trellis_config::watch::watch(&self.paths, self.recursive, move || {
            let _ = tx.send(());
        })?;
        tokio::spawn(async move {
            let _watcher = watcher;
            let shared = proxy.shared().clone();
            loop {
                tokio::select! {
                    ev = rx.recv() => if ev.is_none() { break },
                    _ = shared.drain.started() => break,
                }
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                if let Err(e) = self.reload(&proxy).await {
                    tracing::warn!("reload failed: {e}");
                }
            }
        });
        Ok(())
    }
}
