//! The Trellis console: a web console served by the control plane, answering "what is wrong,
//! and where" from the signals the mesh already produces, with nothing else to install.
//!
//! - [`traces`]: spans received over OTLP (`POST /v1/traces`, or gRPC) into a bounded store;
//! - [`logs`]: access-log lines received as OTLP log records (`POST /v1/logs`, or gRPC), bounded;
//! - `otlp_json`, `otlp_grpc`: OTLP's other encodings and transports (JSON; gRPC), read into
//!   what the stores take;
//! - [`metrics`]: every connected proxy's `istio_*` metrics, read from its admin port at an
//!   interval into a bounded time-series buffer: the service graph and golden signals;
//! - [`api`]: the HTTP server: the page (`assets/`, embedded in the binary), its JSON API, the
//!   OTLP receivers, and the console's own `/metrics` (its stores' sizes and bounds).
//!
//! Each store has a bound in bytes, stated at start, shown in the console and exported as
//! metrics; a full store drops its oldest data, never new data and never a request: proxies
//! export off their request path, and a console that is slow or gone costs requests nothing.
#![forbid(unsafe_code)]

pub mod api;
mod assets;
pub mod logs;
pub mod metrics;
mod otlp_grpc;
mod otlp_json;
pub mod traces;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use trellis_control::proxies::Proxies;
use trellis_control::ConfigStore;

/// The stores' bounds and the scrape settings.
#[derive(Clone, Debug)]
pub struct Limits {
    pub spans_bytes: usize,
    pub logs_bytes: usize,
    pub metrics_bytes: usize,
    /// How often proxies' metrics are read.
    pub scrape_interval: Duration,
    /// How long metric samples are kept (within `metrics_bytes`).
    pub retention: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            spans_bytes: 64 << 20,
            logs_bytes: 32 << 20,
            metrics_bytes: 16 << 20,
            scrape_interval: Duration::from_secs(2),
            retention: Duration::from_secs(3600),
        }
    }
}

/// What a store holds against its bound.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StoreUsage {
    pub name: &'static str,
    pub items: u64,
    pub bytes: u64,
    pub limit_bytes: u64,
    /// Items dropped to stay within the bound, since start.
    pub evicted: u64,
}

pub struct Console {
    pub config: Arc<ConfigStore>,
    pub proxies: Arc<Proxies>,
    pub spans: traces::SpanStore,
    pub logs: logs::LogStore,
    pub metrics: metrics::MetricsStore,
    /// Where scrapes, and exports arriving on connections served on the control plane's runtime,
    /// are decoded and stored: one thread at idle priority, so the console's work never takes a
    /// CPU from requests (or from the control plane's own) when they share a machine
    /// ([`trellis_telemetry::idle`]). Connections that open with an export are served whole on
    /// a thread of their own, also at idle priority ([`api::serve`]).
    ingest: trellis_telemetry::idle::Worker,
    /// Bytes received and waiting for the ingest thread; past [`INGEST_QUEUE_BYTES`] an export
    /// is refused (503), as a collector that cannot keep up refuses.
    queued: std::sync::atomic::AtomicUsize,
}

/// What may wait for the ingest thread, in bytes of OTLP bodies.
pub const INGEST_QUEUE_BYTES: usize = 32 << 20;

impl Console {
    pub fn new(config: Arc<ConfigStore>, proxies: Arc<Proxies>, limits: &Limits) -> std::io::Result<Arc<Console>> {
        Ok(Arc::new(Console {
            config,
            proxies,
            spans: traces::SpanStore::new(limits.spans_bytes),
            logs: logs::LogStore::new(limits.logs_bytes),
            metrics: metrics::MetricsStore::new(limits.metrics_bytes, limits.scrape_interval, limits.retention),
            ingest: trellis_telemetry::idle::Worker::start("console-ingest", 1024)?,
            queued: Default::default(),
        }))
    }

    /// Runs `f` on the ingest thread, holding `bytes` of the queue's budget meanwhile; `None`
    /// when the budget or the queue is full.
    pub(crate) async fn ingest<R: Send + 'static>(
        self: &Arc<Self>,
        bytes: usize,
        f: impl FnOnce(&Console) -> R + Send + 'static,
    ) -> Option<R> {
        use std::sync::atomic::Ordering;
        if self.queued.fetch_add(bytes, Ordering::AcqRel) + bytes > INGEST_QUEUE_BYTES && bytes > 0 {
            self.queued.fetch_sub(bytes, Ordering::AcqRel);
            return None;
        }
        let console = self.clone();
        let r = self.ingest.run(move || f(&console)).await;
        self.queued.fetch_sub(bytes, Ordering::AcqRel);
        r
    }

    pub fn usage(&self) -> Vec<StoreUsage> {
        vec![self.spans.usage(), self.logs.usage(), self.metrics.usage()]
    }

    /// Reads every connected proxy's metrics once per interval, for as long as the task runs.
    pub fn spawn_scraper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let console = self.clone();
        tokio::spawn(async move {
            let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
            let interval = console.metrics.interval;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let targets: Vec<(Arc<str>, SocketAddr)> = console
                    .proxies
                    .list()
                    .into_iter()
                    .filter(|(_, e)| e.connected)
                    .filter_map(|(id, e)| {
                        let mut admin = e.spec.admin?;
                        if admin.ip().is_unspecified() {
                            admin.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                        }
                        Some((Arc::from(id), admin))
                    })
                    .collect();
                let timeout = interval.min(Duration::from_secs(2));
                let scraped = futures_util::future::join_all(targets.into_iter().map(|(id, admin)| {
                    let client = client.clone();
                    async move { (id, scrape(&client, admin, timeout).await) }
                }))
                .await;
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                console.ingest(0, move |c| c.metrics.record(t, scraped)).await;
            }
        })
    }
}

async fn scrape(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
    admin: SocketAddr,
    timeout: Duration,
) -> Result<String, String> {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("http://{admin}/metrics"))
        .header(http::header::ACCEPT, "text/plain")
        .body(http_body_util::Empty::new())
        .map_err(|e| e.to_string())?;
    let fetch = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("{admin}: {}", resp.status()));
        }
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, fetch).await.map_err(|_| format!("{admin}: timed out"))?
}
