//! The metrics a proxy exposes: Istio's standard request metrics with Istio's label set, and
//! the proxy's own health. Label values come from config and identities only (never from
//! paths or other request data), so cardinality stays bounded.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::identity::{Identity, ServiceLabels};

/// Istio's default buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets for request and response sizes (bytes).
pub const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0, 100000000.0];

/// Who reports a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client side (outbound sidecars and gateways).
    Source,
    /// The server side (inbound sidecars).
    Destination,
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&if *self == Reporter::Source { "source" } else { "destination" }, e)
    }
}

/// gRPC status names, as Istio reports `grpc_response_status` (the numeric code as text).
pub fn grpc_status_label(code: Option<u32>) -> &'static str {
    const CODES: [&str; 17] =
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];
    match code {
        Some(c) if (c as usize) < CODES.len() => CODES[c as usize],
        Some(_) => "2",
        None => "",
    }
}

/// Istio's request label set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: Reporter,
    pub source_workload: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub source_app: Arc<str>,
    pub source_version: Arc<str>,
    pub source_canonical_service: Arc<str>,
    pub source_canonical_revision: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    pub destination_app: Arc<str>,
    pub destination_version: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_service_name: Arc<str>,
    pub destination_service_namespace: Arc<str>,
    pub destination_canonical_service: Arc<str>,
    pub destination_canonical_revision: Arc<str>,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

impl RequestLabels {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reporter: Reporter,
        source: &Identity,
        destination: &Identity,
        principals: (&Arc<str>, &Arc<str>),
        service: &ServiceLabels,
        request_protocol: &'static str,
        response_code: u16,
        grpc_status: Option<u32>,
        response_flags: &'static str,
        connection_security_policy: &'static str,
    ) -> RequestLabels {
        RequestLabels {
            reporter,
            source_workload: source.workload.clone(),
            source_workload_namespace: source.namespace.clone(),
            source_principal: principals.0.clone(),
            source_app: source.app.clone(),
            source_version: source.version.clone(),
            source_canonical_service: source.canonical_service.clone(),
            source_canonical_revision: source.canonical_revision.clone(),
            destination_workload: destination.workload.clone(),
            destination_workload_namespace: destination.namespace.clone(),
            destination_principal: principals.1.clone(),
            destination_app: destination.app.clone(),
            destination_version: destination.version.clone(),
            destination_service: service.host.clone(),
            destination_service_name: service.name.clone(),
            destination_service_namespace: service.namespace.clone(),
            destination_canonical_service: destination.canonical_service.clone(),
            destination_canonical_revision: destination.canonical_revision.clone(),
            request_protocol,
            response_code,
            grpc_response_status: grpc_status_label(grpc_status),
            response_flags,
            connection_security_policy,
        }
    }
}

/// Istio's TCP label set: the request labels without `response_code` and
/// `grpc_response_status` (which only HTTP metrics carry); `request_protocol` is `tcp`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub source_app: Arc<str>,
    pub source_version: Arc<str>,
    pub source_canonical_service: Arc<str>,
    pub source_canonical_revision: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    pub destination_app: Arc<str>,
    pub destination_version: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_service_name: Arc<str>,
    pub destination_service_namespace: Arc<str>,
    pub destination_canonical_service: Arc<str>,
    pub destination_canonical_revision: Arc<str>,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    pub fn new(
        reporter: Reporter,
        source: &Identity,
        destination: &Identity,
        principals: (&Arc<str>, &Arc<str>),
        service: &ServiceLabels,
        response_flags: &'static str,
        connection_security_policy: &'static str,
    ) -> TcpLabels {
        TcpLabels {
            reporter,
            source_workload: source.workload.clone(),
            source_workload_namespace: source.namespace.clone(),
            source_principal: principals.0.clone(),
            source_app: source.app.clone(),
            source_version: source.version.clone(),
            source_canonical_service: source.canonical_service.clone(),
            source_canonical_revision: source.canonical_revision.clone(),
            destination_workload: destination.workload.clone(),
            destination_workload_namespace: destination.namespace.clone(),
            destination_principal: principals.1.clone(),
            destination_app: destination.app.clone(),
            destination_version: destination.version.clone(),
            destination_service: service.host.clone(),
            destination_service_name: service.name.clone(),
            destination_service_namespace: service.namespace.clone(),
            destination_canonical_service: destination.canonical_service.clone(),
            destination_canonical_revision: destination.canonical_revision.clone(),
            request_protocol: "tcp",
            response_flags,
            connection_security_policy,
        }
    }
}

/// The TCP metrics of one connection's label set.
#[derive(Clone)]
pub struct TcpHandles {
    /// Bytes from the client towards the server (`istio_tcp_received_bytes_total`).
    pub received: Counter,
    /// Bytes from the server back to the client (`istio_tcp_sent_bytes_total`).
    pub sent: Counter,
    pub opened: Counter,
    pub closed: Counter,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;
type ExemplarFamily =
    Family<RequestLabels, HistogramWithExemplars<TraceExemplar>, fn() -> HistogramWithExemplars<TraceExemplar>>;

/// The exemplar attached to duration buckets: the trace of a sampled request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    pub trace_id: String,
}

fn duration_histogram() -> HistogramWithExemplars<TraceExemplar> {
    HistogramWithExemplars::new(DURATION_BUCKETS_MS.into_iter())
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

/// The request metrics of one label set.
#[derive(Clone)]
pub struct RequestHandles {
    requests: Counter,
    duration: HistogramWithExemplars<TraceExemplar>,
    request_bytes: Histogram,
    response_bytes: Histogram,
    request_messages: Counter,
    response_messages: Counter,
}

impl RequestHandles {
    /// Records one finished request (gRPC message counts when `messages` is given).
    pub fn record(
        &self,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
        trace: Option<&[u8; 16]>,
        messages: Option<(u64, u64)>,
    ) {
        self.requests.inc();
        let exemplar = trace.map(|t| TraceExemplar { trace_id: crate::trace::trace_hex(t) });
        self.duration.observe(duration_ms, exemplar, None);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
        if let Some((req, resp)) = messages {
            self.request_messages.inc_by(req);
            self.response_messages.inc_by(resp);
        }
    }
}

/// Every metric one proxy exposes.
pub struct ProxyMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: ExemplarFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    request_messages: Family<RequestLabels, Counter>,
    response_messages: Family<RequestLabels, Counter>,
    pub connections_open: Gauge,
    pub config_applied_seconds: Gauge<f64, AtomicU64>,
    pub config_version: Family<VersionLabel, Gauge>,
    pub control_plane_connected: Gauge,
    pub snapshot_rejections: Counter,
    pub spans_dropped: Counter,
    pub access_log_dropped: Counter,
    pub authz_decisions: Family<AuthzLabels, Counter>,
    /// Downstream connections closed because a request head did not arrive in time.
    pub header_timeouts: Counter,
    /// Downstream TLS handshakes (gateway HTTPS servers) that failed or timed out.
    pub tls_handshake_failures: Counter,
    /// Retries sent, and retries the budget refused, by cluster.
    pub retries: Family<RetryLabels, Counter>,
    /// Faults injected (`delay`, `abort`), by route.
    pub faults: Family<FaultLabels, Counter>,
    /// Endpoints ejected by outlier detection, by cluster and reason.
    pub ejections: Family<EjectionLabels, Counter>,
    /// Requests refused by a connection-pool limit, by cluster and limit.
    pub overflows: Family<OverflowLabels, Counter>,
    /// Mirrored copies, by mirror cluster and outcome.
    pub mirrors: Family<MirrorLabels, Counter>,
    /// Requests over a local rate limit, by policy and outcome.
    pub rate_limited: Family<RateLimitLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    /// `Kind namespace/name` of the EnvoyFilter or RateLimit.
    pub policy: Arc<str>,
    /// `refused` (429), or `counted` (over the limit, not enforced).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub cluster_name: Arc<str>,
    /// `sent`, then `answered`, `failed` or `timed_out`; or `no_endpoint`, `invalid`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub cluster_name: Arc<str>,
    /// `pending_requests`, `requests` or `retries`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub cluster_name: Arc<str>,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    pub route: Arc<str>,
    pub kind: &'static str,
}

/// A retry towards `cluster_name`: `outcome` is `sent` or `budget_exhausted` (not sent: the
/// cluster's retry budget was spent), `reason` the condition that asked for it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub cluster_name: Arc<str>,
    pub outcome: &'static str,
    pub reason: &'static str,
}

/// An authorization decision: `allow`, `deny` or `audit`, and the policy (`ns/name`) that made it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub decision: &'static str,
    pub policy: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics::new()
    }
}

impl ProxyMetrics {
    pub fn new() -> ProxyMetrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: ExemplarFamily = Family::new_with_constructor(duration_histogram);
        let request_bytes: HistogramFamily = Family::new_with_constructor(size_histogram);
        let response_bytes: HistogramFamily = Family::new_with_constructor(size_histogram);
        registry.register(
            "istio_requests",
            "Requests handled by the proxy, by Istio's standard labels",
            requests.clone(),
        );
        registry.register("istio_request_duration_milliseconds", "Request duration in milliseconds", duration.clone());
        registry.register("istio_request_bytes", "Request body size in bytes", request_bytes.clone());
        registry.register("istio_response_bytes", "Response body size in bytes", response_bytes.clone());
        let tcp_received = Family::<TcpLabels, Counter>::default();
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from clients on TCP connections",
            tcp_received.clone(),
        );
        registry.register("istio_tcp_sent_bytes", "Bytes sent back to clients on TCP connections", tcp_sent.clone());
        registry.register("istio_tcp_connections_opened", "TCP connections opened", tcp_opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", tcp_closed.clone());
        let request_messages = Family::<RequestLabels, Counter>::default();
        let response_messages = Family::<RequestLabels, Counter>::default();
        registry.register("istio_request_messages", "gRPC messages sent by clients", request_messages.clone());
        registry.register("istio_response_messages", "gRPC messages sent by servers", response_messages.clone());
        let connections_open = Gauge::default();
        let config_applied_seconds = Gauge::<f64, AtomicU64>::default();
        let config_version = Family::<VersionLabel, Gauge>::default();
        let control_plane_connected = Gauge::default();
        let snapshot_rejections = Counter::default();
        let authz_decisions = Family::<AuthzLabels, Counter>::default();
        registry.register(
            "trellis_proxy_authz_decisions",
            "AuthorizationPolicy decisions, by decision and policy",
            authz_decisions.clone(),
        );
        let spans_dropped = Counter::default();
        let access_log_dropped = Counter::default();
        registry.register(
            "trellis_proxy_spans_dropped",
            "Spans not exported (queue full or receiver failing)",
            spans_dropped.clone(),
        );
        registry.register(
            "trellis_proxy_access_log_dropped",
            "Access log lines not written (queue full or write failing)",
            access_log_dropped.clone(),
        );
        registry.register("trellis_proxy_connections_open", "Downstream connections open", connections_open.clone());
        let header_timeouts = Counter::default();
        registry.register(
            "trellis_proxy_downstream_header_timeouts",
            "Downstream connections closed because a request head did not arrive within the header read timeout",
            header_timeouts.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "trellis_proxy_downstream_tls_handshake_failures",
            "Client TLS handshakes a gateway HTTPS server refused or that did not finish",
            tls_handshake_failures.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "trellis_proxy_upstream_retries",
            "Upstream retries by cluster, outcome (sent, budget_exhausted) and the condition that asked for them",
            retries.clone(),
        );
        let faults = Family::<FaultLabels, Counter>::default();
        registry.register(
            "trellis_proxy_faults_injected",
            "Faults injected by VirtualService fault rules, by route and kind (delay, abort)",
            faults.clone(),
        );
        let ejections = Family::<EjectionLabels, Counter>::default();
        registry.register(
            "trellis_proxy_outlier_ejections",
            "Endpoints ejected by outlier detection, by cluster and reason (consecutive_5xx, consecutive_gateway_errors, consecutive_local_origin_failures)",
            ejections.clone(),
        );
        let overflows = Family::<OverflowLabels, Counter>::default();
        registry.register(
            "trellis_proxy_upstream_overflows",
            "Requests refused with 503 UO by a connection-pool limit (pending_requests, requests, retries)",
            overflows.clone(),
        );
        let mirrors = Family::<MirrorLabels, Counter>::default();
        registry.register(
            "trellis_proxy_mirrored_requests",
            "Requests copied to mirror clusters, by cluster and outcome (sent, answered, failed, timed_out, no_endpoint, invalid)",
            mirrors.clone(),
        );
        let rate_limited = Family::<RateLimitLabels, Counter>::default();
        registry.register(
            "trellis_proxy_rate_limited_requests",
            "Requests over a local rate limit, by policy and outcome (refused with 429, or counted)",
            rate_limited.clone(),
        );
        registry.register(
            "trellis_proxy_config_applied_timestamp_seconds",
            "When the snapshot in force was applied (Unix time)",
            config_applied_seconds.clone(),
        );
        registry.register(
            "trellis_proxy_config_version",
            "The snapshot version in force (value 1)",
            config_version.clone(),
        );
        registry.register(
            "trellis_proxy_control_plane_connected",
            "1 while connected to the control plane",
            control_plane_connected.clone(),
        );
        registry.register(
            "trellis_proxy_snapshot_rejections",
            "Snapshots or config changes rejected",
            snapshot_rejections.clone(),
        );
        ProxyMetrics {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            request_messages,
            response_messages,
            connections_open,
            config_applied_seconds,
            config_version,
            control_plane_connected,
            snapshot_rejections,
            spans_dropped,
            access_log_dropped,
            authz_decisions,
            header_timeouts,
            tls_handshake_failures,
            retries,
            faults,
            ejections,
            overflows,
            mirrors,
            rate_limited,
            tcp_received,
            tcp_sent,
            tcp_opened,
            tcp_closed,
        }
    }

    /// The TCP metrics of one label set.
    pub fn tcp_handles(&self, labels: &TcpLabels) -> TcpHandles {
        TcpHandles {
            received: self.tcp_received.get_or_create(labels).clone(),
            sent: self.tcp_sent.get_or_create(labels).clone(),
            opened: self.tcp_opened.get_or_create(labels).clone(),
            closed: self.tcp_closed.get_or_create(labels).clone(),
        }
    }

    /// The handles of every request metric for one label set (the slow path: six lookups);
    /// callers cache them.
    pub fn handles(&self, labels: &RequestLabels) -> RequestHandles {
        RequestHandles {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
            request_messages: self.request_messages.get_or_create(labels).clone(),
            response_messages: self.response_messages.get_or_create(labels).clone(),
        }
    }

    /// Records one finished request; a sampled request's trace id becomes the exemplar of its
    /// duration bucket.
    pub fn record(
        &self,
        labels: &RequestLabels,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
        trace: Option<&[u8; 16]>,
    ) {
        self.requests.get_or_create(labels).inc();
        let exemplar = trace.map(|t| TraceExemplar { trace_id: crate::trace::trace_hex(t) });
        self.duration.get_or_create(labels).observe(duration_ms, exemplar, None);
        self.request_bytes.get_or_create(labels).observe(request_bytes as f64);
        self.response_bytes.get_or_create(labels).observe(response_bytes as f64);
    }

    /// Records the gRPC messages of one finished stream.
    pub fn record_messages(&self, labels: &RequestLabels, request: u64, response: u64) {
        self.request_messages.get_or_create(labels).inc_by(request);
        self.response_messages.get_or_create(labels).inc_by(response);
    }

    /// Marks `version` as the one in force.
    pub fn set_version(&self, version: &str) {
        self.config_version.clear();
        self.config_version.get_or_create(&VersionLabel { version: version.to_string() }).set(1);
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.config_applied_seconds.set(now);
    }

    /// The OpenMetrics text exposition.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format (0.0.4): counters named with `_total` in their
    /// metadata, no `# EOF`, no `_created` samples, no exemplars.
    pub fn encode_prometheus(&self) -> String {
        to_classic(&self.encode_openmetrics())
    }
}

/// Converts OpenMetrics text to the classic Prometheus text format.
pub fn to_classic(om: &str) -> String {
    let mut counters: Vec<String> = Vec::new();
    for l in om.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.push(name.to_string());
            }
        }
    }
    let mut out = String::with_capacity(om.len());
    for l in om.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = l.strip_prefix("# TYPE ").or_else(|| l.strip_prefix("# HELP ")) {
            let kind = if l.starts_with("# TYPE ") { "TYPE" } else { "HELP" };
            let name = rest.split(' ').next().unwrap_or_default();
            if counters.iter().any(|c| c == name) {
                out.push_str(&format!("# {kind} {name}_total{}\n", &rest[name.len()..]));
                continue;
            }
            out.push_str(l);
            out.push('\n');
            continue;
        }
        let sample_name = l.split(['{', ' ']).next().unwrap_or_default();
        if sample_name.ends_with("_created") {
            continue;
        }
        match l.find(" # {") {
            Some(i) => out.push_str(&l[..i]),
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_with_istio_names_and_both_formats() {
        let m = ProxyMetrics::new();
        let src = Identity::new("productpage-v1", "default", &Default::default(), None);
        let dst = Identity::new(
            "reviews-v1",
            "default",
            &[("app".to_string(), "reviews".to_string())].into_iter().collect(),
            None,
        );
        let svc = ServiceLabels::new("reviews.default.svc.cluster.local", "reviews", "default");
        let l = RequestLabels::new(
            Reporter::Source,
            &src,
            &dst,
            (&src.principal, &dst.principal),
            &svc,
            "http",
            200,
            None,
            "-",
            "unknown",
        );
        m.record(&l, 3.0, 0, 120, None);
        m.record(&l, 7.0, 0, 120, Some(&[7u8; 16]));
        let om = m.encode_openmetrics();
        assert!(om.contains("# TYPE istio_requests counter"), "{om}");
        assert!(om.contains("istio_requests_total{reporter=\"source\""), "{om}");
        assert!(om.contains("destination_app=\"reviews\""), "{om}");
        assert!(om.contains("istio_request_duration_milliseconds_bucket{"), "{om}");
        assert!(om.trim_end().ends_with("# EOF"));
        assert!(om.contains("# {trace_id=\"07070707070707070707070707070707\"} 7"), "exemplar: {om}");
        let classic = m.encode_prometheus();
        assert!(classic.contains("# TYPE istio_requests_total counter"), "{classic}");
        assert!(!classic.contains("# EOF"));
        assert!(!classic.contains("trace_id"), "no exemplars in the classic format");
        assert!(classic.lines().any(|l| l.starts_with("istio_requests_total{") && l.ends_with(" 2")), "{classic}");
    }
}
