//! Span export, off the request path: spans go into a bounded queue (a full queue drops the
//! span and counts it); a task sends them in batches over OTLP/HTTP (protobuf) and/or Zipkin v2
//! JSON. A receiver that is down costs requests nothing; its spans are counted as dropped.
//!
//! Requests never wake the task: it wakes every 200 ms and takes what queued up, and only a
//! backlog of a full batch nudges it sooner. (A wake-up per span, at thousands of requests a
//! second, cost the mesh more CPU than the spans themselves: `bench console`.) The task runs on
//! a thread of its own at idle priority ([`crate::idle`]): encoding and sending never take a
//! CPU from requests.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::otlp;
use crate::trace::{span_hex, trace_hex, Attr, SpanData, SpanKind};

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

const QUEUE: usize = 4096;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_millis(200);
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The request path's handle on the exporter.
#[derive(Clone)]
pub struct SpanSink {
    tx: mpsc::Sender<SpanData>,
    /// Wakes the task before its tick: a full batch waiting, or a flush asked for.
    nudge: Arc<Notify>,
    flushes: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
    dropped: Counter,
}

impl SpanSink {
    /// Starts the export task, on its own thread at idle priority; it ends when the last
    /// handle is dropped.
    pub fn start(config: ExportConfig, dropped: Counter) -> std::io::Result<SpanSink> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let sink = SpanSink { tx, nudge: Arc::default(), flushes: Arc::default(), dropped: dropped.clone() };
        let (nudge, flushes) = (sink.nudge.clone(), sink.flushes.clone());
        crate::idle::spawn("span-export", move || run(config, rx, nudge, flushes, dropped))?;
        Ok(sink)
    }

    /// Queues a span; never waits, and wakes nothing unless a full batch is waiting. A full
    /// queue drops it (counted).
    pub fn submit(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        } else if self.tx.capacity() <= QUEUE - BATCH {
            self.nudge.notify_one();
        }
    }

    /// Sends what is queued now (on shutdown), waiting at most `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        let (ack, done) = oneshot::channel();
        if let Ok(mut f) = self.flushes.lock() {
            f.push(ack);
        }
        self.nudge.notify_one();
        let _ = tokio::time::timeout(timeout, done).await;
    }
}

async fn run(
    config: ExportConfig,
    mut rx: mpsc::Receiver<SpanData>,
    nudge: Arc<Notify>,
    flushes: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
    dropped: Counter,
) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = nudge.notified() => {}
        }
        let acks = flushes.lock().map(|mut f| std::mem::take(&mut *f)).unwrap_or_default();
        let mut closed = false;
        loop {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
            if batch.len() == BATCH {
                send(&client, &config, &batch, &dropped).await;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            send(&client, &config, &batch, &dropped).await;
            batch.clear();
        }
        for a in acks {
            let _ = a.send(());
        }
        if closed {
            return;
        }
    }
}

/// One batch to every endpoint; a batch an endpoint does not take is counted as dropped.
async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    config: &ExportConfig,
    batch: &[SpanData],
    dropped: &Counter,
) {
    let mut ok = true;
    if !config.otlp.is_empty() {
        let body = Bytes::from(encode_otlp(batch));
        for uri in &config.otlp {
            ok &= post(client, uri, "application/x-protobuf", body.clone()).await;
        }
    }
    if let Some(uri) = &config.zipkin {
        ok &= post(client, uri, "application/json", encode_zipkin(batch)).await;
    }
    if !ok {
        dropped.inc_by(batch.len() as u64);
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

fn any(v: &Attr) -> otlp::AnyValue {
    use otlp::any_value::Value;
    otlp::AnyValue {
        value: Some(match v {
            Attr::Str(s) => Value::StringValue(s.to_string()),
            Attr::Int(i) => Value::IntValue(*i),
        }),
    }
}

fn kv(k: &str, v: &Attr) -> otlp::KeyValue {
    otlp::KeyValue { key: k.to_string(), value: Some(any(v)) }
}

/// Encodes spans as an OTLP `ExportTraceServiceRequest`, one resource per reporting service.
pub fn encode_otlp(spans: &[SpanData]) -> Vec<u8> {
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
                code: if s.error {
                    otlp::status::StatusCode::Error as i32
                } else {
                    otlp::status::StatusCode::Unset as i32
                },
            }),
            flags: 0x100, // SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, is_remote = 0
        };
        match by_service.iter_mut().find(|(svc, _)| *svc == &*s.service) {
            Some((_, v)) => v.push(span),
            None => by_service.push((&s.service, vec![span])),
        }
    }
    let req = otlp::ExportTraceServiceRequest {
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
    };
    req.encode_to_vec()
}

/// Encodes spans as a Zipkin v2 JSON array.
pub fn encode_zipkin(spans: &[SpanData]) -> Vec<u8> {
    let list: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let start = nanos(s.start) / 1000;
            let tags: serde_json::Map<String, serde_json::Value> = s
                .attributes
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Attr::Str(s) => s.to_string(),
                        Attr::Int(i) => i.to_string(),
                    };
                    (k.to_string(), serde_json::Value::String(v))
                })
                .chain(s.error.then(|| ("error".to_string(), serde_json::Value::String("true".into()))))
                .collect();
            let mut span = serde_json::json!({
                "traceId": trace_hex(&s.trace_id),
                "id": span_hex(&s.span_id),
                "name": s.name,
                "timestamp": start,
                "duration": (nanos(s.end) / 1000).saturating_sub(start).max(1),
                "localEndpoint": {"serviceName": &*s.service},
                "tags": tags,
            });
            // Zipkin has no kind for an internal span: it is left out.
            match s.kind {
                SpanKind::Server => span["kind"] = "SERVER".into(),
                SpanKind::Client => span["kind"] = "CLIENT".into(),
                SpanKind::Internal => {}
            }
            if let Some(p) = &s.parent_id {
                span["parentId"] = serde_json::Value::String(span_hex(p));
            }
            span
        })
        .collect();
    serde_json::to_vec(&list).unwrap_or_default()
}
