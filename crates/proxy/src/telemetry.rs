//! Per-request telemetry on the proxy side: a record created when a request arrives and
//! finished exactly once — when the response body ends, or when it is dropped because the
//! client went away (flag `DC`) — whatever path the request took (routed, rejected, failed).
//! Finishing records the `istio_*` metrics (with a trace exemplar), sends the span, and writes
//! the access-log line.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use trellis_config::filter::Filter;
use trellis_telemetry::access_log::AccessLog;
use trellis_telemetry::export::{EncodedSpan, ExportConfig, SpanSink, SpanWriter};
use trellis_telemetry::grpc::MessageCounter;
use trellis_telemetry::identity::ServiceLabels;
use trellis_telemetry::metrics::{Reporter, RequestHandles, RequestLabels};
use trellis_telemetry::trace::{self, Formats, SpanId, SpanKind, TraceId};
use trellis_telemetry::Identity;

use crate::http::{Body, BoxError};
use crate::state::Shared;
use crate::upstream::Endpoint;

/// The proxy's telemetry settings (from its command line; `Telemetry` resources override the
/// sampling and access-log parts per snapshot).
#[derive(Clone, Debug)]
pub struct TelemetryOptions {
    /// Sampling percentage for new traces (Istio's default: 1%).
    pub sampling_percent: f64,
    /// Context formats written on outgoing requests.
    pub formats: Formats,
    pub export: ExportConfig,
    /// Access logs on unless `Telemetry` says otherwise.
    pub access_log: bool,
    /// Where access-log lines are written, if anywhere (they may only be exported).
    pub access_log_sink: Option<trellis_telemetry::access_log::Sink>,
    /// Where access-log lines are exported as OTLP log records, if anywhere.
    pub access_log_otlp: Option<http::Uri>,
}

impl Default for TelemetryOptions {
    fn default() -> Self {
        TelemetryOptions {
            sampling_percent: 1.0,
            formats: Formats::default(),
            export: ExportConfig::default(),
            access_log: false,
            access_log_sink: Some(trellis_telemetry::access_log::Sink::Stdout),
            access_log_otlp: None,
        }
    }
}

/// Telemetry settings in force for one snapshot.
pub struct Effective {
    pub sampling_percent: f64,
    pub export_spans: bool,
    pub access_log: bool,
    pub filter: Option<Filter>,
    /// The reporting service of this proxy's spans: `<canonical service>.<namespace>`.
    pub span_service: Arc<str>,
}

/// The trace context of one request: its own span and what it continues.
#[derive(Clone, Copy, Debug)]
pub struct TraceState {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub sampled: bool,
    pub export: bool,
}

impl TraceState {
    /// Continues the caller's trace (or starts one) with a new span, honouring the caller's
    /// sampling decision when it made one.
    pub fn start(headers: &HeaderMap, effective: &Effective) -> TraceState {
        let incoming = trace::extract(headers);
        let sampled = incoming.sampled.unwrap_or_else(|| trace::sample(effective.sampling_percent));
        TraceState {
            trace_id: incoming.parent.map(|p| p.0).unwrap_or_else(trace::new_trace_id),
            span_id: trace::new_span_id(),
            parent_id: incoming.parent.map(|p| p.1),
            sampled,
            export: sampled && effective.export_spans,
        }
    }

    /// Writes this span's context into the outgoing request.
    pub fn inject(&self, headers: &mut HeaderMap, formats: Formats) {
        trace::inject(headers, formats, &self.trace_id, &self.span_id, self.parent_id.as_ref(), self.sampled);
    }
}

/// Request details kept only when a span is exported or an access log is written.
pub struct Details {
    pub start_time: SystemTime,
    pub method: http::Method,
    /// The request's URI and header values, shared with the request's buffers (cloning them
    /// counts a reference; nothing is copied for the record).
    pub uri: http::Uri,
    /// The `Host` header, when the URI has no authority.
    pub host: Option<http::HeaderValue>,
    pub scheme: &'static str,
    pub version: http::Version,
    pub user_agent: Option<http::HeaderValue>,
    pub request_id: Option<http::HeaderValue>,
    pub downstream: std::net::SocketAddr,
}

impl Details {
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    pub fn authority(&self) -> &str {
        match self.uri.authority() {
            Some(a) => a.as_str(),
            None => self.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or_default(),
        }
    }

    pub fn user_agent(&self) -> Option<&str> {
        self.user_agent.as_ref().and_then(|v| v.to_str().ok())
    }

    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_ref().and_then(|v| v.to_str().ok())
    }
}

/// What one request will be recorded as.
pub struct RequestRecord {
    shared: Arc<Shared>,
    start: Instant,
    pub reporter: Reporter,
    pub source: Arc<Identity>,
    pub destination: Arc<Identity>,
    pub service: Arc<ServiceLabels>,
    pub protocol: &'static str,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub flags: &'static str,
    /// `mutual_tls` when the request came over mesh mTLS (server side), `none` when not,
    /// `unknown` on the client side (Istio's convention).
    pub security: &'static str,
    /// Principals as metrics report them (SPIFFE URIs, or `unknown` without mTLS).
    pub source_principal: Arc<str>,
    pub destination_principal: Arc<str>,
    pub request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    /// gRPC messages seen in each direction (gRPC requests only).
    pub request_messages: Option<Arc<AtomicU64>>,
    response_messages: Option<MessageCounter>,
    pub trace: TraceState,
    /// Gateways report as the client side but their span is the trace's root (SERVER).
    pub gateway: bool,
    pub details: Option<Box<Details>>,
    pub cluster: Option<Arc<str>>,
    pub upstream: Option<Arc<Endpoint>>,
    pub route: Option<Arc<str>>,
    /// Tries sent upstream (1 + retries; 0 when none was).
    pub attempts: u32,
    /// The AuthorizationPolicy that allowed or denied the request, and the AUDIT one that matched.
    pub authz_policy: Option<Arc<str>>,
    pub authz_audit: Option<Arc<str>>,
    /// `iss/sub` of a validated JWT.
    pub request_principal: Option<String>,
    log: bool,
    span_service: Arc<str>,
    done: bool,
}

impl RequestRecord {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: Arc<Shared>,
        effective: &Effective,
        start: Instant,
        reporter: Reporter,
        source: Arc<Identity>,
        destination: Arc<Identity>,
        service: Arc<ServiceLabels>,
        protocol: &'static str,
        trace: TraceState,
        details: Option<Box<Details>>,
    ) -> Self {
        let security = if reporter == Reporter::Destination { "none" } else { "unknown" };
        RequestRecord {
            shared,
            start,
            reporter,
            source,
            destination,
            service,
            protocol,
            status: 0,
            grpc_status: None,
            flags: "-",
            attempts: 0,
            security,
            source_principal: trellis_telemetry::identity::unknown_principal(),
            destination_principal: trellis_telemetry::identity::unknown_principal(),
            request_bytes: Arc::new(AtomicU64::new(0)),
            response_bytes: 0,
            request_messages: (protocol == "grpc").then(|| Arc::new(AtomicU64::new(0))),
            response_messages: (protocol == "grpc").then(MessageCounter::default),
            trace,
            gateway: false,
            details,
            cluster: None,
            upstream: None,
            route: None,
            authz_policy: None,
            authz_audit: None,
            request_principal: None,
            log: effective.access_log,
            span_service: effective.span_service.clone(),
            done: false,
        }
    }

    /// Whether request details are needed (a span to export or a line to log).
    pub fn wants_details(trace: &TraceState, effective: &Effective) -> bool {
        trace.export || effective.access_log
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let elapsed = self.start.elapsed();
        let ms = elapsed.as_secs_f64() * 1000.0;
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let exemplar = self.trace.sampled.then_some(&self.trace.trace_id);
        let messages = match (&self.request_messages, &self.response_messages) {
            (Some(req), Some(resp)) => Some((req.load(Ordering::Relaxed), resp.messages)),
            _ => None,
        };
        self.shared.metric_handles.get(self, &self.shared.metrics).record(
            ms,
            request_bytes,
            self.response_bytes,
            exemplar,
            messages,
        );
        let Some(d) = self.details.take() else { return };
        if self.trace.export {
            if let Some(spans) = &self.shared.spans {
                spans.submit_encoded(self.span(&d, elapsed));
            }
        }
        if self.log {
            let rt = self.shared.runtime();
            if rt.telemetry.filter.as_ref().is_none_or(|f| f.matches(self.status)) {
                if let Some(log) = &self.shared.access_log {
                    log.write(self.log_line(&d, ms, request_bytes));
                }
            }
        }
    }

    /// The span, written straight into the buffer the exporter sends (one allocation; the
    /// attributes are copied from the request's details, not built as strings of their own).
    fn span(&self, d: &Details, elapsed: std::time::Duration) -> EncodedSpan {
        let peer = match self.reporter {
            Reporter::Source => &self.destination.workload,
            Reporter::Destination => &self.source.workload,
        };
        let kind =
            if self.gateway || self.reporter == Reporter::Destination { SpanKind::Server } else { SpanKind::Client };
        let mut w = SpanWriter::new(
            self.span_service.clone(),
            (self.trace.trace_id, self.trace.span_id, self.trace.parent_id),
            &[d.method.as_str(), " ", &self.service.name],
            kind,
            d.start_time,
            d.start_time + elapsed,
        );
        w.str("http.request.method", d.method.as_str())
            .str("url.path", d.path())
            .str("url.scheme", d.scheme)
            .str("server.address", d.authority())
            .str("network.protocol.version", version_str(d.version))
            .int("http.response.status_code", i64::from(self.status))
            .str("response_flags", self.flags)
            .str("peer.workload", peer)
            .str("istio.canonical_service", &self.service.name)
            .str("istio.namespace", &self.service.namespace);
        if let Some(c) = &self.cluster {
            w.str("upstream_cluster", c);
        }
        if let Some(u) = &self.upstream {
            w.str("upstream.address", u.address.as_str());
        }
        if let Some(ua) = d.user_agent() {
            w.str("user_agent.original", ua);
        }
        if let Some(id) = d.request_id() {
            w.str("guid:x-request-id", id);
        }
        if let Some(g) = self.grpc_status {
            w.int("rpc.grpc.status_code", i64::from(g));
        }
        w.finish(self.status >= 500 || self.grpc_status.is_some_and(|g| g != 0))
    }

    /// The access-log line: one JSON object, keys in alphabetical order (as it always was), the
    /// keys and punctuation written as they stand and only the values escaped, straight into
    /// the line (no intermediate map, no per-field allocation).
    fn log_line(&self, d: &Details, ms: f64, request_bytes: u64) -> String {
        let mut l = JsonLine(String::with_capacity(768));
        l.str("{\"authority\":", Some(d.authority()));
        l.str(",\"authz_audit_policy\":", self.authz_audit.as_deref());
        l.str(",\"authz_policy\":", self.authz_policy.as_deref());
        l.num(",\"bytes_received\":", request_bytes);
        l.num(",\"bytes_sent\":", self.response_bytes);
        l.str(",\"destination_namespace\":", Some(&self.destination.namespace));
        l.str(",\"destination_service\":", Some(&self.service.host));
        l.str(",\"destination_workload\":", Some(&self.destination.workload));
        l.shown(",\"downstream_remote_address\":", d.downstream);
        l.num(",\"duration\":", format_args!("{:?}", (ms * 1000.0).round() / 1000.0));
        match self.grpc_status {
            Some(g) => l.num(",\"grpc_status\":", g),
            None => l.str(",\"grpc_status\":", None),
        }
        l.str(",\"method\":", Some(d.method.as_str()));
        l.str(",\"path\":", Some(d.path()));
        l.str(",\"protocol\":", Some(version_name(d.version)));
        l.str(",\"reporter\":", Some(if self.reporter == Reporter::Source { "source" } else { "destination" }));
        l.str(",\"request_principal\":", self.request_principal.as_deref());
        l.num(",\"response_code\":", self.status);
        l.str(",\"response_flags\":", Some(self.flags));
        l.str(",\"route_name\":", self.route.as_deref());
        l.str(",\"source_namespace\":", Some(&self.source.namespace));
        l.str(",\"source_principal\":", Some(&self.source_principal));
        l.str(",\"source_workload\":", Some(&self.source.workload));
        l.shown(",\"span_id\":", trace::Hex(&self.trace.span_id));
        l.shown(",\"start_time\":", Rfc3339(d.start_time));
        l.shown(",\"trace_id\":", trace::Hex(&self.trace.trace_id));
        l.str(",\"upstream_cluster\":", self.cluster.as_deref());
        l.str(",\"upstream_host\":", self.upstream.as_ref().map(|u| u.address.as_str()));
        l.num(",\"upstream_request_attempt_count\":", self.attempts);
        l.str(",\"user_agent\":", d.user_agent());
        l.str(",\"x_request_id\":", d.request_id());
        l.0.push('}');
        l.0
    }
}

/// A JSON object written field by field: `key` is the literal text before the value (the
/// separator, the quoted key and the colon).
struct JsonLine(String);

impl JsonLine {
    /// A string value, escaped as JSON requires (`"`, `\\`, control characters), or `null`.
    fn str(&mut self, key: &str, v: Option<&str>) {
        self.0.push_str(key);
        let Some(v) = v else {
            self.0.push_str("null");
            return;
        };
        self.0.push('"');
        let mut start = 0;
        for (i, b) in v.bytes().enumerate() {
            let esc = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.push_str(&v[start..i]);
            if esc.is_empty() {
                let _ = std::fmt::Write::write_fmt(&mut self.0, format_args!("\\u{b:04x}"));
            } else {
                self.0.push_str(esc);
            }
            start = i + 1;
        }
        self.0.push_str(&v[start..]);
        self.0.push('"');
    }

    /// A number.
    fn num(&mut self, key: &str, v: impl std::fmt::Display) {
        self.0.push_str(key);
        let _ = std::fmt::Write::write_fmt(&mut self.0, format_args!("{v}"));
    }

    /// A value whose text needs no escaping (hex ids, times, addresses), quoted.
    fn shown(&mut self, key: &str, v: impl std::fmt::Display) {
        self.0.push_str(key);
        let _ = std::fmt::Write::write_fmt(&mut self.0, format_args!("\"{v}\""));
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.finish();
    }
}

fn version_str(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_10 => "1.0",
        _ => "1.1",
    }
}

fn version_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    Rfc3339(t).to_string()
}

/// A time shown as RFC 3339 UTC with milliseconds.
struct Rfc3339(SystemTime);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs() as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            d.subsec_millis()
        )
    }
}

/// Request metric handles by label identity: the addresses of the `Arc`s the labels come from
/// (which each entry keeps alive, so an address cannot be reused while cached) and the small
/// values. A request then costs one cheap hash instead of six label-set lookups.
#[derive(Default)]
pub struct HandleCache {
    map: std::sync::RwLock<HashMap<HandleKey, CachedHandles, BuildHasherDefault<Fx>>>,
}

#[derive(Hash, PartialEq, Eq, Clone, Copy)]
struct HandleKey {
    ptrs: [usize; 5],
    reporter: bool,
    protocol: usize,
    status: u16,
    grpc: Option<u32>,
    flags: usize,
    security: usize,
}

/// The `Arc`s whose addresses a cache key holds.
type Alive = (Arc<Identity>, Arc<Identity>, Arc<ServiceLabels>, Arc<str>, Arc<str>);

/// Who sent a request: its identity and the service it called.
type Peer = (Arc<Identity>, Arc<ServiceLabels>);

struct CachedHandles {
    handles: RequestHandles,
    _alive: Alive,
}

/// Entries beyond which the cache starts over (label sets are bounded, identities per snapshot).
const MAX_CACHED: usize = 16_384;

impl HandleCache {
    fn get(&self, r: &RequestRecord, metrics: &trellis_telemetry::metrics::ProxyMetrics) -> RequestHandles {
        let key = HandleKey {
            ptrs: [
                Arc::as_ptr(&r.source) as usize,
                Arc::as_ptr(&r.destination) as usize,
                Arc::as_ptr(&r.service) as usize,
                r.source_principal.as_ptr() as usize,
                r.destination_principal.as_ptr() as usize,
            ],
            reporter: r.reporter == Reporter::Source,
            protocol: r.protocol.as_ptr() as usize,
            status: r.status,
            grpc: r.grpc_status,
            flags: r.flags.as_ptr() as usize,
            security: r.security.as_ptr() as usize,
        };
        if let Some(c) = self.map.read().ok().and_then(|m| m.get(&key).map(|c| c.handles.clone())) {
            return c;
        }
        let labels = RequestLabels::new(
            r.reporter,
            &r.source,
            &r.destination,
            (&r.source_principal, &r.destination_principal),
            &r.service,
            r.protocol,
            r.status,
            r.grpc_status,
            r.flags,
            r.security,
        );
        let handles = metrics.handles(&labels);
        if let Ok(mut m) = self.map.write() {
            if m.len() >= MAX_CACHED {
                m.clear();
            }
            let alive = (
                r.source.clone(),
                r.destination.clone(),
                r.service.clone(),
                r.source_principal.clone(),
                r.destination_principal.clone(),
            );
            m.insert(key, CachedHandles { handles: handles.clone(), _alive: alive });
        }
        handles
    }

    /// Forgets everything (on snapshot swaps, when identities change).
    pub fn clear(&self) {
        if let Ok(mut m) = self.map.write() {
            m.clear();
        }
    }
}

/// Decoded peer-metadata headers: every request from one client proxy carries the same value,
/// so it is decoded once and its identity shared (which also keeps the metric handle cache hot).
#[derive(Default)]
pub struct PeerCache {
    map: std::sync::RwLock<HashMap<http::HeaderValue, Peer>>,
}

impl PeerCache {
    /// Removes the peer header from `headers` and returns who sent it.
    pub fn take(&self, headers: &mut HeaderMap) -> Option<Peer> {
        let value = headers.remove(trellis_telemetry::peer::PEER_HEADER)?;
        if let Some(hit) = self.map.read().ok().and_then(|m| m.get(&value).cloned()) {
            return Some(hit);
        }
        let mut one = HeaderMap::new();
        one.insert(trellis_telemetry::peer::PEER_HEADER, value.clone());
        let (id, svc) = trellis_telemetry::peer::take(&mut one)?;
        let decoded = (Arc::new(id), Arc::new(svc));
        if let Ok(mut m) = self.map.write() {
            if m.len() >= 4096 {
                m.clear();
            }
            m.insert(value, decoded.clone());
        }
        Some(decoded)
    }
}

/// FxHash: a fast non-cryptographic hash for the small integer keys above.
#[derive(Default)]
struct Fx(u64);

impl std::hash::Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Starts the exporters the options ask for.
pub fn start_sinks(
    opts: &TelemetryOptions,
    shared_metrics: &trellis_telemetry::metrics::ProxyMetrics,
) -> std::io::Result<(Option<SpanSink>, Option<AccessLog>)> {
    let spans = match opts.export.is_enabled() {
        true => Some(SpanSink::start(opts.export.clone(), shared_metrics.spans_dropped.clone())?),
        false => None,
    };
    let log = AccessLog::start(
        opts.access_log_sink.clone(),
        opts.access_log_otlp.clone(),
        shared_metrics.access_log_dropped.clone(),
    )?;
    Ok((spans, Some(log)))
}

fn grpc_status(h: &HeaderMap) -> Option<u32> {
    h.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok())
}

pin_project_lite::pin_project! {
    /// A response body that finishes its request's record when it ends, or, if it is dropped
    /// before its end (the client went away), records the request with Envoy's `DC` flag.
    pub struct Recorded {
        #[pin]
        inner: Body,
        record: RequestRecord,
    }

    impl PinnedDrop for Recorded {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !this.record.done {
                if !this.inner.is_end_stream() && this.record.flags == "-" {
                    this.record.flags = "DC";
                }
                this.record.finish();
            }
        }
    }
}

impl Recorded {
    pub fn new(inner: Body, mut record: RequestRecord, headers: &HeaderMap) -> Self {
        // Trailers-only gRPC responses carry the status in the headers.
        record.grpc_status = grpc_status(headers);
        Recorded { inner, record }
    }
}

impl HttpBody for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.record.response_bytes += d.len() as u64;
                    if let Some(m) = this.record.response_messages.as_mut() {
                        m.feed(d);
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    if let Some(s) = grpc_status(t) {
                        this.record.grpc_status = Some(s);
                    }
                }
                // Servers stop polling once the body says it has ended.
                if this.inner.is_end_stream() {
                    this.record.finish();
                }
            }
            Poll::Ready(None) => this.record.finish(),
            Poll::Ready(Some(Err(_))) => {
                // The upstream reset the stream mid-response.
                this.record.flags = "UR";
                this.record.finish();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request body that counts the bytes (and, for gRPC, the messages) it carries.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        bytes: Arc<AtomicU64>,
        messages: Option<(MessageCounter, Arc<AtomicU64>)>,
    }
}

impl<B> Counted<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>, messages: Option<Arc<AtomicU64>>) -> Self {
        Counted { inner, bytes, messages: messages.map(|m| (MessageCounter::default(), m)) }
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                this.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                if let Some((counter, total)) = this.messages.as_mut() {
                    counter.feed(d);
                    total.store(counter.messages, Ordering::Relaxed);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_values_are_escaped_as_json_and_parse_back() {
        let nasty = "a\"b\\c\nd\re\tf\u{1}g\u{1f}h é ✓";
        let mut l = JsonLine(String::new());
        l.str("{\"s\":", Some(nasty));
        l.str(",\"n\":", None);
        l.num(",\"i\":", 42u16);
        l.num(",\"f\":", format_args!("{:?}", 5.0f64));
        l.shown(",\"t\":", Rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123)));
        l.shown(",\"h\":", trace::Hex(&[0x01, 0xab, 0xff]));
        l.0.push('}');
        let v: serde_json::Value = serde_json::from_str(&l.0).expect("valid JSON");
        assert_eq!(v["s"], nasty);
        assert_eq!(v["n"], serde_json::Value::Null);
        assert_eq!(v["i"], 42);
        assert_eq!(v["f"], 5.0);
        assert_eq!(v["t"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["h"], "01abff");
    }
}
