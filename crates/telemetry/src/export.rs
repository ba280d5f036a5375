//! Span export, off the request path: a span is written where it ends as an OTLP `Span`
//! message ([`SpanWriter`], into a buffer the thread keeps from one span to the next), then
//! appended, framed as it will be sent, to the spans waiting in that thread's own buffer (its
//! lock is taken by no one but this thread and, five times a second, the exporter). A thread's
//! buffer holds at most [`QUEUE`] spans: past that a span is dropped and counted. A task sends
//! what the buffers hold in batches over OTLP/HTTP (protobuf: the framed spans copied as they
//! are) and/or Zipkin v2 JSON. A receiver that is down costs requests nothing; its spans are
//! counted as dropped.
//!
//! So a span costs the request path no allocation, no shared queue and no atomic operation on a
//! cache line another CPU writes: writing it, and one uncontended lock. (It used to be one
//! allocation, a bounded channel's atomics and a free on the exporter's thread per span; with
//! the mesh at 1000 requests per second that made requests measurably slower, `bench console`.)
//!
//! Requests never wake the task: it wakes every 200 ms and takes what queued up, and only a
//! thread's backlog of a full batch nudges it sooner. The task runs on a thread of its own at
//! idle priority ([`crate::idle`]): encoding and sending never take a CPU from requests.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::{oneshot, Notify};

use crate::otlp;
use crate::trace::{span_hex, trace_hex, Attr, SpanData, SpanId, SpanKind, TraceId};

/// Where spans go.
#[derive(Clone, Debug, Default)]
pub struct ExportConfig {
    /// OTLP/HTTP endpoints, e.g. `http://127.0.0.1:4318/v1/traces` (a team's collector and
    /// the console's receiver at once).
    pub otlp: Vec<http::Uri>,
    /// Zipkin v2 endpoint, e.g. `http://127.0.0.1:9411/api/v2/spans`.
    pub zipkin: Option<http::Uri>,
}

impl ExportConfig {
    pub fn is_enabled(&self) -> bool {
        !self.otlp.is_empty() || self.zipkin.is_some()
    }
}

/// The most spans one thread's buffer holds until the exporter takes them.
pub const QUEUE: usize = 4096;
/// A thread's backlog that wakes the exporter before its tick.
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_millis(200);
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Past this many bytes of spans, what was taken so far is sent as one request (receivers
/// commonly take 4 MiB).
const MAX_REQUEST: usize = 3 << 20;

/// Spans by the service reporting them: each group's bytes are `ScopeSpans.spans` fields (key,
/// length, `Span` message) one after another, as they are sent.
type Groups = Vec<(Arc<str>, Vec<u8>)>;

/// Spans waiting in one thread's buffer.
#[derive(Default)]
struct Pending {
    groups: Groups,
    spans: usize,
    /// How large the last buffer taken from here had grown: the next one starts that large, so
    /// a thread allocates once per batch, not as the buffer grows.
    capacity: usize,
}

enum Pushed {
    Queued,
    /// The thread's backlog just reached a batch.
    Batch,
    Full,
}

impl Pending {
    fn push(&mut self, service: &Arc<str>, span: &[u8]) -> Pushed {
        if self.spans >= QUEUE {
            return Pushed::Full;
        }
        let same = matches!(self.groups.last(), Some((s, _)) if Arc::ptr_eq(s, service) || **s == **service);
        if !same {
            self.groups.push((service.clone(), Vec::with_capacity(self.capacity.max(4096))));
        }
        let n = self.groups.len();
        wire::bytes(2, span, &mut self.groups[n - 1].1);
        self.spans += 1;
        if self.spans == BATCH {
            Pushed::Batch
        } else {
            Pushed::Queued
        }
    }

    fn take(&mut self) -> (Groups, usize) {
        let groups = std::mem::take(&mut self.groups);
        self.capacity = groups.iter().map(|(_, g)| g.len()).max().unwrap_or(0);
        (groups, std::mem::take(&mut self.spans))
    }
}

struct Shared {
    /// Tells this sink's buffers from another's in a thread's [`BUFFERS`].
    id: usize,
    /// Every thread's buffer (registered by its first span).
    threads: Mutex<Vec<Arc<Mutex<Pending>>>>,
    /// Wakes the task before its tick: a full batch waiting, or a flush asked for.
    nudge: Notify,
    flushes: Mutex<Vec<oneshot::Sender<()>>>,
    dropped: Counter,
}

static NEXT_SINK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's buffer in each sink it has written to.
    static BUFFERS: RefCell<Vec<(usize, Arc<Mutex<Pending>>)>> = const { RefCell::new(Vec::new()) };
    /// What [`SpanWriter`] writes into, kept between spans.
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// The request path's handle on the exporter.
#[derive(Clone)]
pub struct SpanSink {
    shared: Arc<Shared>,
}

impl SpanSink {
    /// Starts the export task, on its own thread at idle priority; it ends (after sending what
    /// is left) when the last handle is dropped.
    pub fn start(config: ExportConfig, dropped: Counter) -> std::io::Result<SpanSink> {
        let shared = Arc::new(Shared {
            id: NEXT_SINK.fetch_add(1, Ordering::Relaxed),
            threads: Mutex::default(),
            nudge: Notify::new(),
            flushes: Mutex::default(),
            dropped,
        });
        let task = shared.clone();
        crate::idle::spawn("span-export", move || run(config, task))?;
        Ok(SpanSink { shared })
    }

    /// Queues a span; never waits, and wakes nothing unless a full batch is waiting. A full
    /// buffer drops it (counted).
    pub fn submit(&self, span: SpanData) {
        self.submit_encoded(EncodedSpan::from(&span));
    }

    /// [`SpanSink::submit`], for a span written with a [`SpanWriter`].
    pub fn submit_encoded(&self, span: EncodedSpan) {
        let EncodedSpan { service, bytes } = span;
        let pushed = self.with_buffer(|p| p.lock().map(|mut p| p.push(&service, &bytes)).unwrap_or(Pushed::Full));
        match pushed.unwrap_or(Pushed::Full) {
            Pushed::Queued => {}
            Pushed::Batch => self.shared.nudge.notify_one(),
            Pushed::Full => {
                self.shared.dropped.inc();
            }
        }
        // The writer's buffer, for the next span this thread writes.
        let _ = SCRATCH.try_with(|s| s.set(bytes));
    }

    /// Runs `f` on this thread's buffer in this sink, registering one on the thread's first
    /// span; `None` while the thread is being torn down.
    fn with_buffer<R>(&self, f: impl FnOnce(&Mutex<Pending>) -> R) -> Option<R> {
        BUFFERS
            .try_with(|b| {
                let mut b = b.borrow_mut();
                let i = match b.iter().position(|(id, _)| *id == self.shared.id) {
                    Some(i) => i,
                    None => {
                        // Buffers of sinks that are gone (their exporter held the other handle).
                        b.retain(|(_, p)| Arc::strong_count(p) > 1);
                        let p = Arc::new(Mutex::new(Pending::default()));
                        self.shared.threads.lock().ok()?.push(p.clone());
                        b.push((self.shared.id, p));
                        b.len() - 1
                    }
                };
                Some(f(&b[i].1))
            })
            .ok()
            .flatten()
    }

    /// Sends what is queued now (on shutdown), waiting at most `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        let (ack, done) = oneshot::channel();
        if let Ok(mut f) = self.shared.flushes.lock() {
            f.push(ack);
        }
        self.shared.nudge.notify_one();
        let _ = tokio::time::timeout(timeout, done).await;
    }
}

async fn run(config: ExportConfig, shared: Arc<Shared>) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.nudge.notified() => {}
        }
        let acks = shared.flushes.lock().map(|mut f| std::mem::take(&mut *f)).unwrap_or_default();
        // Every handle but this task's dropped: what is left is sent, then the task ends.
        let closed = Arc::strong_count(&shared) == 1;
        let threads = shared.threads.lock().map(|t| t.clone()).unwrap_or_default();
        let (mut batch, mut spans, mut bytes) = (Vec::new(), 0, 0);
        for t in threads {
            let Ok((groups, n)) = t.lock().map(|mut p| p.take()) else { continue };
            spans += n;
            bytes += groups.iter().map(|(_, g)| g.len()).sum::<usize>();
            batch.extend(groups);
            if bytes > MAX_REQUEST {
                send(&client, &config, &batch, spans, &shared.dropped).await;
                (batch, spans, bytes) = (Vec::new(), 0, 0);
            }
        }
        if spans > 0 {
            send(&client, &config, &batch, spans, &shared.dropped).await;
        }
        for a in acks {
            let _ = a.send(());
        }
        if closed {
            return;
        }
    }
}

/// One batch (`spans` spans in framed groups) to every endpoint; a batch an endpoint does not
/// take is counted as dropped.
async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    config: &ExportConfig,
    groups: &[(Arc<str>, Vec<u8>)],
    spans: usize,
    dropped: &Counter,
) {
    let mut ok = true;
    if !config.otlp.is_empty() {
        let body = Bytes::from(encode_groups(groups));
        for uri in &config.otlp {
            ok &= post(client, uri, "application/x-protobuf", body.clone()).await;
        }
    }
    if let Some(uri) = &config.zipkin {
        let each = groups.iter().flat_map(|(svc, g)| framed(g).map(move |s| (&**svc, s)));
        ok &= post(client, uri, "application/json", zipkin(each)).await;
    }
    if !ok {
        dropped.inc_by(spans as u64);
    }
}

pub(crate) async fn post(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    uri: &http::Uri,
    ctype: &'static str,
    body: impl Into<Bytes>,
) -> bool {
    let body: Bytes = body.into();
    let Ok(req) = http::Request::post(uri.clone()).header(http::header::CONTENT_TYPE, ctype).body(Full::new(body))
    else {
        return false;
    };
    match tokio::time::timeout(SEND_TIMEOUT, client.request(req)).await {
        Ok(Ok(resp)) => resp.status().is_success(),
        _ => false,
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Protobuf wire format, written field by field.
mod wire {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};

    pub fn bytes(tag: u32, v: &[u8], out: &mut Vec<u8>) {
        len_prefix(tag, v.len(), out);
        out.extend_from_slice(v);
    }

    /// The key and length of a length-delimited field whose `len` bytes follow.
    pub fn len_prefix(tag: u32, len: usize, out: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
    }

    /// The size of a length-delimited field of `len` bytes (tags below 16: a one-byte key).
    pub fn len_field(len: usize) -> usize {
        1 + encoded_len_varint(len as u64) + len
    }

    pub fn varint(tag: u32, v: u64, out: &mut Vec<u8>) {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }

    pub fn fixed64(tag: u32, v: u64, out: &mut Vec<u8>) {
        encode_key(tag, WireType::SixtyFourBit, out);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn fixed32(tag: u32, v: u32, out: &mut Vec<u8>) {
        encode_key(tag, WireType::ThirtyTwoBit, out);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// A `KeyValue { key = 1, value = 2: AnyValue { string_value = 1 | int_value = 3 } }` as field
/// `tag` of the message being written to `out`.
fn write_kv(tag: u32, key: &str, value: &Attr, out: &mut Vec<u8>) {
    let any = match value {
        Attr::Str(s) => wire::len_field(s.len()),
        Attr::Int(i) => 1 + prost::encoding::encoded_len_varint(*i as u64),
    };
    wire::len_prefix(tag, wire::len_field(key.len()) + wire::len_field(any), out);
    wire::bytes(1, key.as_bytes(), out);
    wire::len_prefix(2, any, out);
    match value {
        Attr::Str(s) => wire::bytes(1, s.as_bytes(), out),
        Attr::Int(i) => wire::varint(3, *i as u64, out),
    }
}

/// One span as an OTLP `Span` message, with the service reporting it.
#[derive(Clone, Debug)]
pub struct EncodedSpan {
    service: Arc<str>,
    bytes: Vec<u8>,
}

impl From<&SpanData> for EncodedSpan {
    fn from(s: &SpanData) -> EncodedSpan {
        let mut w = SpanWriter::new(
            s.service.clone(),
            (s.trace_id, s.span_id, s.parent_id),
            &[&s.name],
            s.kind,
            s.start,
            s.end,
        );
        for (k, v) in &s.attributes {
            w.attr(k, v);
        }
        w.finish(s.error)
    }
}

/// Writes a span as an OTLP `Span` message, field by field, into one buffer: what the request
/// path does when a span ends (one allocation, handed whole to the exporter), instead of
/// building a dozen strings for the exporter to encode and to free.
pub struct SpanWriter {
    service: Arc<str>,
    buf: Vec<u8>,
}

impl SpanWriter {
    /// The span's ids, name (the concatenation of `name`'s parts), kind and times; its
    /// attributes follow, then [`SpanWriter::finish`].
    pub fn new(
        service: Arc<str>,
        (trace_id, span_id, parent): (TraceId, SpanId, Option<SpanId>),
        name: &[&str],
        kind: SpanKind,
        start: SystemTime,
        end: SystemTime,
    ) -> SpanWriter {
        // The thread's buffer from its last span ([`SpanSink::submit_encoded`] puts it back).
        let mut buf = SCRATCH.try_with(Cell::take).unwrap_or_default();
        buf.clear();
        buf.reserve(768);
        wire::bytes(1, &trace_id, &mut buf);
        wire::bytes(2, &span_id, &mut buf);
        if let Some(p) = parent {
            wire::bytes(4, &p, &mut buf);
        }
        wire::len_prefix(5, name.iter().map(|p| p.len()).sum(), &mut buf);
        for p in name {
            buf.extend_from_slice(p.as_bytes());
        }
        let kind = match kind {
            SpanKind::Server => otlp::span::SpanKind::Server,
            SpanKind::Client => otlp::span::SpanKind::Client,
            SpanKind::Internal => otlp::span::SpanKind::Internal,
        };
        wire::varint(6, kind as u64, &mut buf);
        wire::fixed64(7, nanos(start), &mut buf);
        wire::fixed64(8, nanos(end), &mut buf);
        SpanWriter { service, buf }
    }

    pub fn attr(&mut self, key: &str, value: &Attr) -> &mut Self {
        write_kv(9, key, value, &mut self.buf);
        self
    }

    /// A string attribute (no [`Attr`] built for it).
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        wire::len_prefix(9, wire::len_field(key.len()) + wire::len_field(wire::len_field(value.len())), &mut self.buf);
        wire::bytes(1, key.as_bytes(), &mut self.buf);
        wire::len_prefix(2, wire::len_field(value.len()), &mut self.buf);
        wire::bytes(1, value.as_bytes(), &mut self.buf);
        self
    }

    pub fn int(&mut self, key: &str, value: i64) -> &mut Self {
        self.attr(key, &Attr::Int(value))
    }

    /// The span's status (error or unset) and flags: the span is complete.
    pub fn finish(mut self, error: bool) -> EncodedSpan {
        // Status { code = 3 }; unset is the empty message.
        if error {
            wire::len_prefix(15, 2, &mut self.buf);
            wire::varint(3, otlp::status::StatusCode::Error as u64, &mut self.buf);
        } else {
            wire::len_prefix(15, 0, &mut self.buf);
        }
        wire::fixed32(16, 0x100, &mut self.buf); // SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, is_remote = 0
        EncodedSpan { service: self.service, bytes: self.buf }
    }
}

/// Spans grouped by the service reporting them, in the order services first appear, each
/// group framed as [`Pending`] holds it.
fn framed_groups(spans: &[EncodedSpan]) -> Groups {
    let mut groups: Groups = Vec::new();
    for s in spans {
        let i = match groups.iter().position(|(svc, _)| **svc == *s.service) {
            Some(i) => i,
            None => {
                groups.push((s.service.clone(), Vec::new()));
                groups.len() - 1
            }
        };
        wire::bytes(2, &s.bytes, &mut groups[i].1);
    }
    groups
}

/// Encodes spans as an OTLP `ExportTraceServiceRequest`, one resource per reporting service.
pub fn encode_otlp(spans: &[EncodedSpan]) -> Vec<u8> {
    encode_groups(&framed_groups(spans))
}

/// The `ExportTraceServiceRequest` of framed groups: each group's bytes copied as they are.
fn encode_groups(groups: &[(Arc<str>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(groups.iter().map(|(_, g)| g.len() + 256).sum::<usize>());
    let mut resource = Vec::with_capacity(128);
    let mut scope = Vec::with_capacity(64);
    wire::bytes(1, b"trellis-proxy", &mut scope);
    wire::bytes(2, env!("CARGO_PKG_VERSION").as_bytes(), &mut scope);
    for (svc, spans) in groups {
        // Resource { attributes = 1 }
        resource.clear();
        write_kv(1, "service.name", &Attr::Str(svc.clone()), &mut resource);
        write_kv(1, "telemetry.sdk.name", &Attr::Str("trellis".into()), &mut resource);
        // ScopeSpans { scope = 1, spans = 2 (already framed) }
        let scope_spans = wire::len_field(scope.len()) + spans.len();
        // ExportTraceServiceRequest { resource_spans = 1: ResourceSpans { resource = 1, scope_spans = 2 } }
        wire::len_prefix(1, wire::len_field(resource.len()) + wire::len_field(scope_spans), &mut out);
        wire::bytes(1, &resource, &mut out);
        wire::len_prefix(2, scope_spans, &mut out);
        wire::bytes(1, &scope, &mut out);
        out.extend_from_slice(spans);
    }
    out
}

/// The `Span` messages of a framed group.
fn framed(mut group: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (_key, rest) = group.split_first()?;
        let mut rest: &[u8] = rest;
        let len = prost::encoding::decode_varint(&mut rest).ok()? as usize;
        let span = rest.get(..len)?;
        group = &rest[len..];
        Some(span)
    })
}

/// Encodes spans as a Zipkin v2 JSON array (each span's message decoded again: Zipkin is the
/// rarer export, and this runs on the exporter's idle thread).
pub fn encode_zipkin(spans: &[EncodedSpan]) -> Vec<u8> {
    zipkin(spans.iter().map(|s| (&*s.service, &s.bytes[..])))
}

/// Zipkin v2 JSON of `(reporting service, Span message)` pairs.
fn zipkin<'a>(spans: impl Iterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    use otlp::any_value::Value as V;
    let list: Vec<serde_json::Value> = spans
        .filter_map(|(service, bytes)| {
            let s = otlp::Span::decode(bytes).ok()?;
            let start = s.start_time_unix_nano / 1000;
            let error = s.status.as_ref().is_some_and(|st| st.code == otlp::status::StatusCode::Error as i32);
            let tags: serde_json::Map<String, serde_json::Value> = s
                .attributes
                .into_iter()
                .map(|kv| {
                    let v = match kv.value.and_then(|v| v.value) {
                        Some(V::StringValue(s)) => s,
                        Some(V::IntValue(i)) => i.to_string(),
                        _ => String::new(),
                    };
                    (kv.key, serde_json::Value::String(v))
                })
                .chain(error.then(|| ("error".to_string(), serde_json::Value::String("true".into()))))
                .collect();
            let mut span = serde_json::json!({
                "traceId": trace_hex(&TraceId::try_from(&s.trace_id[..]).ok()?),
                "id": span_hex(&SpanId::try_from(&s.span_id[..]).ok()?),
                "name": s.name,
                "timestamp": start,
                "duration": (s.end_time_unix_nano / 1000).saturating_sub(start).max(1),
                "localEndpoint": {"serviceName": service},
                "tags": tags,
            });
            // Zipkin has no kind for an internal span: it is left out.
            match otlp::span::SpanKind::try_from(s.kind) {
                Ok(otlp::span::SpanKind::Server) => span["kind"] = "SERVER".into(),
                Ok(otlp::span::SpanKind::Client) => span["kind"] = "CLIENT".into(),
                _ => {}
            }
            if let Ok(p) = SpanId::try_from(&s.parent_span_id[..]) {
                span["parentId"] = serde_json::Value::String(span_hex(&p));
            }
            Some(span)
        })
        .collect();
    serde_json::to_vec(&list).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same request built as prost's message structs (as this module once did).
    fn reference(spans: &[SpanData]) -> otlp::ExportTraceServiceRequest {
        let kv = |k: &str, v: &Attr| otlp::KeyValue {
            key: k.to_string(),
            value: Some(otlp::AnyValue {
                value: Some(match v {
                    Attr::Str(s) => otlp::any_value::Value::StringValue(s.to_string()),
                    Attr::Int(i) => otlp::any_value::Value::IntValue(*i),
                }),
            }),
        };
        let mut by_service: Vec<(&str, Vec<otlp::Span>)> = Vec::new();
        for s in spans {
            let span = otlp::Span {
                trace_id: s.trace_id.to_vec(),
                span_id: s.span_id.to_vec(),
                trace_state: String::new(),
                parent_span_id: s.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
                name: s.name.clone(),
                kind: match s.kind {
                    SpanKind::Server => otlp::span::SpanKind::Server as i32,
                    SpanKind::Client => otlp::span::SpanKind::Client as i32,
                    SpanKind::Internal => otlp::span::SpanKind::Internal as i32,
                },
                start_time_unix_nano: nanos(s.start),
                end_time_unix_nano: nanos(s.end),
                attributes: s.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
                dropped_attributes_count: 0,
                status: Some(otlp::Status {
                    message: String::new(),
                    code: if s.error { otlp::status::StatusCode::Error as i32 } else { 0 },
                }),
                flags: 0x100,
            };
            match by_service.iter_mut().find(|(svc, _)| *svc == &*s.service) {
                Some((_, v)) => v.push(span),
                None => by_service.push((&s.service, vec![span])),
            }
        }
        otlp::ExportTraceServiceRequest {
            resource_spans: by_service
                .into_iter()
                .map(|(svc, spans)| otlp::ResourceSpans {
                    resource: Some(otlp::Resource {
                        attributes: vec![
                            kv("service.name", &Attr::from(svc)),
                            kv("telemetry.sdk.name", &Attr::from("trellis")),
                        ],
                        dropped_attributes_count: 0,
                    }),
                    scope_spans: vec![otlp::ScopeSpans {
                        scope: Some(otlp::InstrumentationScope {
                            name: "trellis-proxy".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..Default::default()
                        }),
                        spans,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                })
                .collect(),
        }
    }

    fn span(id: u8, service: &str, parent: Option<u8>, error: bool, attributes: Vec<(&'static str, Attr)>) -> SpanData {
        let start = UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_000 + u64::from(id));
        SpanData {
            trace_id: [7; 16],
            span_id: [id; 8],
            parent_id: parent.map(|p| [p; 8]),
            name: format!("GET {service}"),
            kind: if parent.is_some() { SpanKind::Client } else { SpanKind::Server },
            start,
            end: start + Duration::from_millis(3),
            attributes,
            error,
            service: service.into(),
        }
    }

    #[test]
    fn written_straight_it_decodes_as_the_message_built_from_structs() {
        let long = "x".repeat(300); // a length that takes two varint bytes
        let spans = vec![
            span(
                1,
                "frontend.default",
                None,
                false,
                vec![("http.request.method", "GET".into()), ("http.response.status_code", Attr::Int(200))],
            ),
            span(
                2,
                "business-logic.default",
                Some(1),
                true,
                vec![("url.path", Attr::from(long.as_str())), ("neg", Attr::Int(-5))],
            ),
            span(3, "frontend.default", Some(1), false, vec![]),
        ];
        let encoded: Vec<EncodedSpan> = spans.iter().map(EncodedSpan::from).collect();
        let written = encode_otlp(&encoded);
        let decoded = otlp::ExportTraceServiceRequest::decode(&written[..]).expect("test value");
        assert_eq!(decoded, reference(&spans));
        // Byte for byte what prost writes, too.
        assert_eq!(written, reference(&spans).encode_to_vec());
        assert!(encode_otlp(&[]).is_empty());

        // The writer's own string attributes and a name in parts: the same span.
        let mut w = SpanWriter::new(
            "frontend.default".into(),
            ([7; 16], [1; 8], None),
            &["GET", " ", "frontend.default"],
            SpanKind::Server,
            spans[0].start,
            spans[0].end,
        );
        w.str("http.request.method", "GET").int("http.response.status_code", 200);
        assert_eq!(w.finish(false).bytes, encoded[0].bytes);
    }

    #[test]
    fn zipkin_json_from_the_encoded_spans() {
        let spans = [
            span(1, "frontend.default", None, false, vec![("http.response.status_code", Attr::Int(200))]),
            span(2, "business-logic.default", Some(1), true, vec![("url.path", "/slow".into())]),
        ];
        let encoded: Vec<EncodedSpan> = spans.iter().map(EncodedSpan::from).collect();
        let json: serde_json::Value = serde_json::from_slice(&encode_zipkin(&encoded)).expect("test value");
        assert_eq!(json[0]["traceId"], trace_hex(&[7; 16]));
        assert_eq!(json[0]["id"], span_hex(&[1; 8]));
        assert_eq!(json[0]["kind"], "SERVER");
        assert_eq!(json[0]["name"], "GET frontend.default");
        assert_eq!(json[0]["duration"], 3000);
        assert_eq!(json[0]["tags"], serde_json::json!({"http.response.status_code": "200"}));
        assert!(json[0].get("parentId").is_none());
        assert_eq!(json[1]["parentId"], span_hex(&[1; 8]));
        assert_eq!(json[1]["kind"], "CLIENT");
        assert_eq!(json[1]["localEndpoint"]["serviceName"], "business-logic.default");
        assert_eq!(json[1]["tags"], serde_json::json!({"url.path": "/slow", "error": "true"}));
    }

    #[test]
    fn a_threads_buffer_nudges_at_a_batch_and_drops_past_its_bound() {
        let (a, b): (Arc<str>, Arc<str>) = ("a.default".into(), "b.default".into());
        let mut p = Pending::default();
        for i in 1..=QUEUE {
            let svc = if i % 1000 == 0 { &b } else { &a };
            match p.push(svc, b"span") {
                Pushed::Batch => assert_eq!(i, BATCH),
                Pushed::Queued => assert_ne!(i, BATCH),
                Pushed::Full => panic!("full at {i}"),
            }
        }
        assert!(matches!(p.push(&a, b"span"), Pushed::Full));
        let (groups, n) = p.take();
        assert_eq!(n, QUEUE);
        // A new group each time the service changes; every span framed in its group.
        assert_eq!(groups.len(), 9);
        assert_eq!(groups.iter().map(|(_, g)| framed(g).count()).sum::<usize>(), QUEUE);
        assert!(groups.iter().flat_map(|(_, g)| framed(g)).all(|s| s == b"span"));
        // Emptied, and the next buffer starts as large as the largest taken.
        assert_eq!(p.spans, 0);
        assert_eq!(p.capacity, 999 * 6);
        assert!(matches!(p.push(&a, b"span"), Pushed::Queued));
        assert!(p.groups[0].1.capacity() >= 999 * 6);
    }

    /// Spans from several threads (plain ones and a runtime's workers), two services, to an
    /// OTLP/HTTP receiver on a real socket: each arrives once, under its own service.
    #[test]
    fn spans_from_every_thread_arrive_once_each() {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let received: Arc<Mutex<Vec<otlp::ExportTraceServiceRequest>>> = Arc::default();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let store = received.clone();
        rt.spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    hyper_util::rt::TokioIo::new(io),
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            if let (Ok(m), Ok(mut s)) = (otlp::ExportTraceServiceRequest::decode(body), store.lock()) {
                                s.push(m);
                            }
                            Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::new())))
                        }
                    }),
                ));
            }
        });
        let config =
            ExportConfig { otlp: vec![format!("http://{addr}/v1/traces").parse().expect("uri")], zipkin: None };
        let dropped = Counter::default();
        let sink = SpanSink::start(config, dropped.clone()).expect("sink");
        let per_thread = 700u16; // past a batch, so a thread's backlog nudges the exporter
        let mut threads = Vec::new();
        for t in 0..3u8 {
            let sink = sink.clone();
            threads.push(std::thread::spawn(move || {
                for i in 0..per_thread {
                    let mut s = span(1, if i % 2 == 0 { "a.default" } else { "b.default" }, None, false, vec![]);
                    s.span_id[..2].copy_from_slice(&i.to_le_bytes());
                    s.span_id[7] = t;
                    sink.submit(s);
                }
            }));
        }
        for t in threads {
            t.join().expect("thread");
        }
        rt.block_on(async {
            let tasks: Vec<_> = (3..5u8)
                .map(|t| {
                    let sink = sink.clone();
                    tokio::spawn(async move {
                        for i in 0..per_thread {
                            let mut s = span(1, "a.default", None, false, vec![]);
                            s.span_id[..2].copy_from_slice(&i.to_le_bytes());
                            s.span_id[7] = t;
                            sink.submit(s);
                            tokio::task::yield_now().await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
            sink.flush(Duration::from_secs(10)).await;
        });
        assert_eq!(dropped.get(), 0);
        let received = received.lock().expect("lock");
        let mut ids: Vec<(String, Vec<u8>)> = received
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| {
                let svc = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                    .and_then(|kv| kv.value.as_ref()?.value.clone());
                let svc = match svc {
                    Some(otlp::any_value::Value::StringValue(s)) => s,
                    _ => String::new(),
                };
                rs.scope_spans.iter().flat_map(|ss| &ss.spans).map(move |s| (svc.clone(), s.span_id.clone()))
            })
            .collect();
        let total = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(total, 5 * usize::from(per_thread), "every span once");
        assert_eq!(ids.len(), total, "no span twice");
        for (svc, id) in &ids {
            let (i, t) = (u16::from_le_bytes([id[0], id[1]]), id[7]);
            let want = if t < 3 && i % 2 == 1 { "b.default" } else { "a.default" };
            assert_eq!(svc, want, "span {i} of thread {t}");
        }
    }
}
