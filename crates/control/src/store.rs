//! The config store: the resources the control plane serves, reloaded when files change or
//! when the cluster's resources do (on Kubernetes, `trellis-kube` hands it the cluster's
//! Services, Pods and Istio resources).
//!
//! Every change goes through the same rules as `trellis analyze`. A file change with errors is
//! rejected: its findings are logged and kept for `trellis status`, and the last good config
//! keeps being served. A cluster resource with errors is left out on its own (as Istio skips an
//! invalid object that got past its webhook), so one bad VirtualService cannot stop endpoints
//! from following Pods. Subscribers see each good config as a new generation.

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
    /// The findings short of errors (warnings, notes) on these resources, as `trellis analyze`
    /// reports them.
    pub warnings: Vec<Finding>,
    /// What every proxy's compilation of these resources shares.
    pub compiled: Generation,
}

impl ConfigState {
    /// Where a part of a snapshot came from, as a proxy's NACK names it (`VirtualService
    /// ns/name http[0]`, or `Kind ns/name`): with the file and line of that resource (or rule)
    /// when it is one of this config's.
    pub fn locate(&self, source: &str) -> String {
        let (id, rule) = match source.rsplit_once(' ') {
            Some((id, rule)) if rule.ends_with(']') && id.contains(' ') => (id, Some(rule)),
            _ => (source, None),
        };
        let Some(res) = self.resources.iter().find(|r| r.id() == id) else { return source.to_string() };
        let mut path = trellis_config::path!["spec"];
        if let Some((field, index)) = rule.and_then(|r| r.strip_suffix(']')?.split_once('[')) {
            if let Ok(i) = index.parse::<usize>() {
                path.extend(trellis_config::path![field, i]);
            }
        }
        format!("{source} at {}:{}", res.source.file.display(), res.pos(&path).line)
    }
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
    /// A directory of files put over `paths` (`trellis apply`), in name order.
    overlay: Option<PathBuf>,
    /// The cluster's resources, when a cluster is a source.
    cluster: Mutex<Option<Arc<Vec<Resource>>>>,
    tx: watch::Sender<Arc<ConfigState>>,
    rejection: Mutex<Option<Rejection>>,
}

/// A burst of writes (an editor's write and rename, a copy of many files) is one reload: it
/// starts once the files have been quiet this long...
const QUIET: Duration = Duration::from_millis(10);
/// ...or this long after the burst's first change, if the files never go quiet.
const MAX_WAIT: Duration = Duration::from_millis(250);

impl ConfigStore {
    pub fn new(paths: Vec<PathBuf>, recursive: bool) -> Arc<ConfigStore> {
        ConfigStore::layered(paths, recursive, None)
    }

    /// A store whose files in `overlay` replace same-named resources of `paths` (see
    /// [`trellis_config::load::load_layered`]).
    pub fn layered(paths: Vec<PathBuf>, recursive: bool, overlay: Option<PathBuf>) -> Arc<ConfigStore> {
        Arc::new(ConfigStore {
            paths,
            recursive,
            overlay,
            cluster: Mutex::new(None),
            tx: watch::channel(Arc::new(ConfigState::default())).0,
            rejection: Mutex::new(None),
        })
    }

    /// Replaces the cluster's resources and reloads.
    pub fn set_cluster_resources(&self, resources: Vec<Resource>) -> Result<u64, Rejection> {
        *self.cluster.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(resources));
        self.reload()
    }

    /// Reads the files (and takes the cluster's resources); on success publishes a new
    /// generation, on errors in files keeps the current one.
    pub fn reload(&self) -> Result<u64, Rejection> {
        let started = std::time::Instant::now();
        let overlays = match &self.overlay {
            Some(d) => trellis_config::load::list_files(std::slice::from_ref(d), false).unwrap_or_default(),
            None => Vec::new(),
        };
        let mut loaded = if self.paths.is_empty() {
            trellis_config::Loaded::default()
        } else {
            trellis_config::load::load_layered(&self.paths, self.recursive, &overlays)
        };
        let cluster = self.cluster.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(c) = &cluster {
            loaded.resources.extend(c.iter().cloned());
        }
        let more = trellis_config::analyze::analyze(&loaded.resources, &[]);
        loaded.findings.extend(more);
        trellis_config::finding::sort(&mut loaded.findings);
        let checked = started.elapsed();
        let is_cluster = |f: &Finding| f.file.as_deref().is_some_and(|p| trellis_config::load::is_cluster_source(p));
        let errors: Vec<Finding> = loaded.findings.iter().filter(|f| f.is_error() && !is_cluster(f)).cloned().collect();
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
        // Cluster resources with errors are left out, each on its own.
        let bad: std::collections::BTreeSet<String> = loaded
            .findings
            .iter()
            .filter(|f| f.is_error() && is_cluster(f))
            .filter_map(|f| f.resource.clone())
            .collect();
        let left_out: Vec<Finding> =
            loaded.findings.iter().filter(|f| f.is_error() && is_cluster(f)).cloned().collect();
        if !bad.is_empty() {
            loaded.resources.retain(|r| !bad.contains(&r.id()));
        }
        for f in loaded.findings.iter().filter(|f| f.severity == trellis_config::Severity::Warning) {
            tracing::warn!("{f}");
        }
        for f in &left_out {
            tracing::warn!("left out: {f}");
        }
        *self.rejection.lock().unwrap_or_else(|p| p.into_inner()) = if left_out.is_empty() {
            None
        } else {
            Some(Rejection {
                reason: format!("{} cluster resource(s) with errors are left out", bad.len()),
                findings: left_out,
            })
        };
        let generation = self.tx.borrow().generation + 1;
        let compiled = Generation::new(&loaded.resources);
        let warnings = loaded.findings.into_iter().filter(|f| !f.is_error()).collect();
        self.tx.send_replace(Arc::new(ConfigState { generation, resources: loaded.resources, warnings, compiled }));
        tracing::info!(
            generation,
            resources = self.tx.borrow().resources.len(),
            checked_ms = format!("{:.1}", checked.as_secs_f64() * 1000.0),
            total_ms = format!("{:.1}", started.elapsed().as_secs_f64() * 1000.0),
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
        if self.paths.is_empty() {
            return Ok(tokio::spawn(std::future::pending()));
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watched: Vec<PathBuf> = self.paths.iter().chain(&self.overlay).cloned().collect();
        let watcher = trellis_config::watch::watch(&watched, self.recursive, move || {
            let _ = tx.send(());
        })?;
        let store = self.clone();
        Ok(tokio::spawn(async move {
            let _watcher = watcher;
            while rx.recv().await.is_some() {
                let deadline = tokio::time::Instant::now() + MAX_WAIT;
                while tokio::time::Instant::now() < deadline {
                    match tokio::time::timeout(QUIET, rx.recv()).await {
                        Ok(Some(())) => continue, // still changing
                        Ok(None) => return,
                        Err(_) => break, // quiet
                    }
                }
                let _ = store.reload();
            }
        }))
    }
}
