//! The config store: the resources the control plane serves, reloaded when files change.
//!
//! Every change goes through the same rules as `trellis analyze`. A change with errors is
//! rejected: its findings are logged and kept for `trellis status`, and the last good config
//! keeps being served. Subscribers see each good config as a new generation.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use trellis_config::compile::Generation;
use trellis_config::{Finding, Resource};

/// One accepted config.
#[derive(Default)]
pub struct ConfigState {
    /// 0 until a good config has been loaded; proxies get nothing before that.
    pub generation: u64,
    pub resources: Vec<Resource>,
    /// What every proxy's compilation of these resources shares.
    pub compiled: Generation,
}

/// The last rejected change.
#[derive(Clone, Debug, Default)]
pub struct Rejection {
    pub reason: String,
    pub findings: Vec<Finding>,
}

pub struct ConfigStore {
    paths: Vec<PathBuf>,
    recursive: bool,
    tx: watch::Sender<Arc<ConfigState>>,
    rejection: Mutex<Option<Rejection>>,
}

/// Coalesces an editor's burst of writes into one reload.
const DEBOUNCE: Duration = Duration::from_millis(30);

impl ConfigStore {
    pub fn new(paths: Vec<PathBuf>, recursive: bool) -> Arc<ConfigStore> {
        Arc::new(ConfigStore {
            paths,
            recursive,
            tx: watch::channel(Arc::new(ConfigState::default())).0,
            rejection: Mutex::new(None),
        })
    }

    /// Reads the files; on success publishes a new generation, on errors keeps the current one.
    pub fn reload(&self) -> Result<u64, Rejection> {
        let started = std::time::Instant::now();
        let loaded = trellis_config::check(&self.paths, self.recursive);
        let checked = started.elapsed();
        let errors: Vec<Finding> = loaded.findings.iter().filter(|f| f.is_error()).cloned().collect();
        if !errors.is_empty() {
            let rejection = Rejection {
                reason: format!("config has {} error(s); the last good config keeps serving", errors.len()),
                findings: errors,
            };
            tracing::warn!("{}", rejection.reason);
            for f in &rejection.findings {
                tracing::warn!("  {f}");
            }
            *self.rejection.lock().unwrap_or_else(|p| p.into_inner()) = Some(rejection.clone());
            return Err(rejection);
        }
        for f in loaded.findings.iter().filter(|f| f.severity == trellis_config::Severity::Warning) {
            tracing::warn!("{f}");
        }
        *self.rejection.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let generation = self.tx.borrow().generation + 1;
        let compiled = Generation::new(&loaded.resources);
        self.tx.send_replace(Arc::new(ConfigState { generation, resources: loaded.resources, compiled }));
        tracing::info!(
            generation,
            resources = self.tx.borrow().resources.len(),
            checked_ms = checked.as_secs_f64() * 1000.0,
            total_ms = started.elapsed().as_secs_f64() * 1000.0,
            "config loaded"
        );
        Ok(generation)
    }

    pub fn current(&self) -> Arc<ConfigState> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ConfigState>> {
        self.tx.subscribe()
    }

    pub fn rejection(&self) -> Option<Rejection> {
        self.rejection.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reloads on every change of the files, for as long as the returned task runs.
    pub fn watch(self: &Arc<Self>) -> trellis_config::watch::notify::Result<tokio::task::JoinHandle<()>> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = trellis_config::watch::watch(&self.paths, self.recursive, move || {
            let _ = tx.send(());
        })?;
        let store = self.clone();
        Ok(tokio::spawn(async move {
            let _watcher = watcher;
            while rx.recv().await.is_some() {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                let _ = store.reload();
            }
        }))
    }
}
