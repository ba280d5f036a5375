//! The span store: spans received over OTLP/HTTP (`POST /v1/traces`, what proxies and apps
//! already export), grouped into traces, bounded in bytes. When a new span would pass the bound,
//! whole traces go, oldest first (a trace is kept or dropped as one, so a trace shown is never
//! missing spans the store once had).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use prost::Message;
use serde::Serialize;
use serde_json::{json, Value};
use trellis_telemetry::otlp;

use crate::StoreUsage;

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// One span, as the store keeps it.
pub struct Span {
    pub span_id: SpanId,
    /// All zeros for a root span.
    pub parent: SpanId,
    pub name: String,
    pub service: Arc<str>,
    pub kind: &'static str,
    pub start_ns: u64,
    pub end_ns: u64,
    pub error: bool,
    /// The span's attributes as received, an OTLP `KeyValueList` in one heap block: decoded
    /// only when the span is shown. (Kept decoded, a span's dozen attributes were some thirty
    /// blocks to allocate on arrival and to free on eviction, thousands of times a second.)
    pub attributes: Box<[u8]>,
}

impl Span {
    /// What the span costs the store, as the allocator sees it: itself, and each of its heap
    /// blocks (name, attributes) at its allocated size.
    fn bytes(&self) -> usize {
        std::mem::size_of::<Span>() + heap(self.name.capacity()) + heap(self.attributes.len())
    }

    /// The attributes, decoded.
    pub fn attributes(&self) -> serde_json::Map<String, Value> {
        otlp::KeyValueList::decode(&self.attributes[..])
            .map(|l| {
                l.values
                    .into_iter()
                    .map(|kv| (kv.key, kv.value.as_ref().map(any_to_json).unwrap_or(Value::Null)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The memory a heap block of `n` bytes takes: the allocator's chunk (header and rounding,
/// as glibc's malloc: 16-byte steps, 32 at least). Counting this, a store's bound is close to
/// the memory it really holds.
pub(crate) fn heap(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        ((n + 8 + 15) & !15).max(32)
    }
}

/// Per trace: its map entry, its place in the eviction order, its span list's own block.
const TRACE_OVERHEAD: usize = 128;

struct Trace {
    spans: Vec<Span>,
    bytes: usize,
    start_ns: u64,
    end_ns: u64,
    errors: u32,
}

#[derive(Default)]
struct Inner {
    traces: HashMap<TraceId, Trace>,
    /// Trace ids in the order their first span arrived: eviction order.
    order: VecDeque<TraceId>,
    /// Operations (span names) seen per service, for the search form.
    operations: BTreeMap<Arc<str>, BTreeSet<String>>,
    bytes: usize,
    spans: usize,
    evicted: u64,
}

/// Operations remembered per service (the search form's list), at most.
const MAX_OPERATIONS: usize = 200;

pub struct SpanStore {
    limit: usize,
    inner: Mutex<Inner>,
}

/// A search over the stored traces (`GET /api/traces`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct Query {
    pub service: String,
    pub operation: String,
    /// `error`, `ok`, or anything else for both.
    pub status: String,
    pub min_duration_ms: Option<f64>,
    pub start_us: Option<u64>,
    pub end_us: Option<u64>,
    pub limit: Option<usize>,
    /// `duration` (longest first) or `recent` (the default).
    pub sort: String,
}

#[derive(Serialize)]
pub struct Summary {
    pub trace_id: String,
    pub root_service: String,
    pub root_name: String,
    pub start_us: u64,
    pub duration_ms: f64,
    pub span_count: usize,
    pub error_count: u32,
    pub services: Vec<String>,
}

impl SpanStore {
    pub fn new(limit_bytes: usize) -> SpanStore {
        SpanStore { limit: limit_bytes, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decodes an OTLP `ExportTraceServiceRequest` and stores its spans; returns how many.
    /// Stores the spans of an OTLP export request. Decoded as `otlp::receive` reads it: ids are
    /// slices of `body`, and each span's attributes are copied as received into its one block,
    /// not built attribute by attribute.
    pub fn receive(&self, body: bytes::Bytes) -> Result<usize, prost::DecodeError> {
        let req = otlp::receive::ExportTraceServiceRequest::decode(body)?;
        let mut spans = Vec::new();
        for rs in req.resource_spans {
            let resource = otlp::Resource::decode(rs.resource)?;
            let service: Arc<str> = resource
                .attributes
                .iter()
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(any_to_string)
                .unwrap_or_else(|| "unknown".into())
                .into();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let (Ok(trace_id), Ok(span_id)) =
                        (TraceId::try_from(&s.trace_id[..]), SpanId::try_from(&s.span_id[..]))
                    else {
                        continue;
                    };
                    let span = Span {
                        span_id,
                        parent: SpanId::try_from(&s.parent_span_id[..]).unwrap_or_default(),
                        kind: kind_name(s.kind),
                        error: s.status.as_ref().is_some_and(|st| st.code == otlp::status::StatusCode::Error as i32),
                        attributes: key_value_list(&s.attributes),
                        name: s.name,
                        service: service.clone(),
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano.max(s.start_time_unix_nano),
                    };
                    spans.push((trace_id, span));
                }
            }
        }
        let n = spans.len();
        let mut g = self.lock();
        for (trace_id, span) in spans {
            self.insert(&mut g, trace_id, span);
        }
        Ok(n)
    }

    fn insert(&self, inner: &mut Inner, trace_id: TraceId, span: Span) {
        let bytes = span.bytes();
        let ops = inner.operations.entry(span.service.clone()).or_default();
        if ops.len() < MAX_OPERATIONS && !ops.contains(&span.name) {
            ops.insert(span.name.clone());
        }
        let t = inner.traces.entry(trace_id).or_insert_with(|| {
            inner.order.push_back(trace_id);
            Trace { spans: Vec::new(), bytes: TRACE_OVERHEAD, start_ns: u64::MAX, end_ns: 0, errors: 0 }
        });
        if t.spans.is_empty() {
            inner.bytes += TRACE_OVERHEAD;
        }
        t.start_ns = t.start_ns.min(span.start_ns);
        t.end_ns = t.end_ns.max(span.end_ns);
        t.errors += u32::from(span.error);
        t.bytes += bytes;
        t.spans.push(span);
        inner.bytes += bytes;
        inner.spans += 1;
        while inner.bytes > self.limit {
            let Some(old) = inner.order.pop_front() else { break };
            if let Some(t) = inner.traces.remove(&old) {
                inner.bytes -= t.bytes;
                inner.spans -= t.spans.len();
                inner.evicted += t.spans.len() as u64;
            }
        }
    }

    pub fn usage(&self) -> StoreUsage {
        let g = self.lock();
        StoreUsage {
            name: "spans",
            items: g.spans as u64,
            bytes: g.bytes as u64,
            limit_bytes: self.limit as u64,
            evicted: g.evicted,
        }
    }

    /// Services and their operations (span names).
    pub fn services(&self) -> Value {
        let g = self.lock();
        let services: Vec<Value> =
            g.operations.iter().map(|(s, ops)| json!({"name": &**s, "operations": ops})).collect();
        json!({ "services": services })
    }

    pub fn search(&self, q: &Query) -> Value {
        let g = self.lock();
        let min_ns = q.min_duration_ms.map(|ms| (ms * 1e6) as u64).unwrap_or(0);
        let mut found: Vec<(&TraceId, &Trace)> = g
            .traces
            .iter()
            .filter(|(_, t)| t.end_ns - t.start_ns.min(t.end_ns) >= min_ns)
            .filter(|(_, t)| q.start_us.is_none_or(|s| t.start_ns / 1000 >= s))
            .filter(|(_, t)| q.end_us.is_none_or(|e| t.start_ns / 1000 <= e))
            .filter(|(_, t)| match q.status.as_str() {
                "error" => t.errors > 0,
                "ok" => t.errors == 0,
                _ => true,
            })
            .filter(|(_, t)| {
                q.service.is_empty() && q.operation.is_empty()
                    || t.spans.iter().any(|s| {
                        (q.service.is_empty() || *s.service == *q.service)
                            && (q.operation.is_empty() || s.name == q.operation)
                    })
            })
            .collect();
        let total = found.len();
        if q.sort == "duration" {
            found.sort_by_key(|(_, t)| std::cmp::Reverse(t.end_ns - t.start_ns.min(t.end_ns)));
        } else {
            found.sort_by_key(|(_, t)| std::cmp::Reverse(t.start_ns));
        }
        let traces: Vec<Summary> =
            found.into_iter().take(q.limit.unwrap_or(20).min(500)).map(|(id, t)| summary(id, t)).collect();
        json!({ "traces": traces, "total_matched": total })
    }

    /// One trace with all its spans, or `None`.
    pub fn trace(&self, id: &str) -> Option<Value> {
        let id = trellis_telemetry::trace::parse_trace_hex(id)?;
        let g = self.lock();
        let t = g.traces.get(&id)?;
        let spans: Vec<Value> = t
            .spans
            .iter()
            .map(|s| {
                let attributes = s.attributes();
                json!({
                    "span_id": hex(&s.span_id),
                    "parent_span_id": if s.parent == [0; 8] { String::new() } else { hex(&s.parent) },
                    "name": s.name,
                    "service": &*s.service,
                    "kind": s.kind,
                    "start_us": s.start_ns / 1000,
                    "duration_us": (s.end_ns - s.start_ns) / 1000,
                    "error": s.error,
                    "attributes": attributes,
                })
            })
            .collect();
        Some(json!({ "trace_id": hex(&id), "spans": spans }))
    }
}

fn summary(id: &TraceId, t: &Trace) -> Summary {
    // The root: a span whose parent is not in the trace, earliest first.
    let present: BTreeSet<SpanId> = t.spans.iter().map(|s| s.span_id).collect();
    let root = t
        .spans
        .iter()
        .filter(|s| s.parent == [0; 8] || !present.contains(&s.parent))
        .min_by_key(|s| s.start_ns)
        .or_else(|| t.spans.first());
    let services: BTreeSet<&str> = t.spans.iter().map(|s| &*s.service).collect();
    Summary {
        trace_id: hex(id),
        root_service: root.map(|s| s.service.to_string()).unwrap_or_default(),
        root_name: root.map(|s| s.name.clone()).unwrap_or_default(),
        start_us: t.start_ns / 1000,
        duration_ms: (t.end_ns - t.start_ns.min(t.end_ns)) as f64 / 1e6,
        span_count: t.spans.len(),
        error_count: t.errors,
        services: services.into_iter().map(str::to_string).collect(),
    }
}

fn kind_name(kind: i32) -> &'static str {
    use otlp::span::SpanKind as K;
    match K::try_from(kind) {
        Ok(K::Internal) => "internal",
        Ok(K::Server) => "server",
        Ok(K::Client) => "client",
        Ok(K::Producer) => "producer",
        Ok(K::Consumer) => "consumer",
        _ => "unspecified",
    }
}

pub(crate) fn any_to_json(v: &otlp::AnyValue) -> Value {
    use otlp::any_value::Value as V;
    match &v.value {
        Some(V::StringValue(s)) => Value::String(s.clone()),
        Some(V::BoolValue(b)) => Value::Bool(*b),
        Some(V::IntValue(i)) => json!(i),
        Some(V::DoubleValue(d)) => json!(d),
        Some(V::ArrayValue(a)) => Value::Array(a.values.iter().map(any_to_json).collect()),
        Some(V::KvlistValue(l)) => Value::Object(
            l.values
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.as_ref().map(any_to_json).unwrap_or(Value::Null)))
                .collect(),
        ),
        Some(V::BytesValue(b)) => Value::String(hex(b)),
        None => Value::Null,
    }
}

/// Encoded `KeyValue`s as one encoded `KeyValueList` (each as its field 1), in one block.
fn key_value_list(encoded: &[bytes::Bytes]) -> Box<[u8]> {
    let len: usize = encoded.iter().map(|kv| 1 + prost::length_delimiter_len(kv.len()) + kv.len()).sum();
    let mut out = Vec::with_capacity(len);
    for kv in encoded {
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(kv.len() as u64, &mut out);
        out.extend_from_slice(kv);
    }
    out.into_boxed_slice()
}

fn any_to_string(v: &otlp::AnyValue) -> String {
    match any_to_json(v) {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// Bytes as lower-case hex (trace and span ids).
pub(crate) fn hex(b: &[u8]) -> String {
    trellis_telemetry::trace::Hex(b).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(trace: u8, spans: &[(u8, u8, &str, u64, u64)]) -> Vec<u8> {
        let spans = spans
            .iter()
            .map(|&(id, parent, name, start, end)| otlp::Span {
                trace_id: vec![trace; 16],
                span_id: vec![id; 8],
                parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
                name: name.into(),
                start_time_unix_nano: start,
                end_time_unix_nano: end,
                kind: otlp::span::SpanKind::Server as i32,
                ..Default::default()
            })
            .collect();
        otlp::ExportTraceServiceRequest {
            resource_spans: vec![otlp::ResourceSpans {
                resource: Some(otlp::Resource {
                    attributes: vec![otlp::KeyValue {
                        key: "service.name".into(),
                        value: Some(otlp::AnyValue {
                            value: Some(otlp::any_value::Value::StringValue("frontend.default".into())),
                        }),
                    }],
                    dropped_attributes_count: 0,
                }),
                scope_spans: vec![otlp::ScopeSpans { scope: None, spans, schema_url: String::new() }],
                schema_url: String::new(),
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn traces_are_searched_by_duration_and_evicted_whole_oldest_first() {
        let store = SpanStore::new(usize::MAX);
        store
            .receive(export(1, &[(1, 0, "GET /fast", 0, 2_000_000), (2, 1, "GET backend", 100, 1_000_000)]).into())
            .expect("test value");
        store.receive(export(2, &[(3, 0, "GET /slow", 10, 3_000_000_010)]).into()).expect("test value");
        let r = store.search(&Query { sort: "duration".into(), ..Default::default() });
        assert_eq!(r["total_matched"], 2);
        assert_eq!(r["traces"][0]["root_name"], "GET /slow");
        assert_eq!(r["traces"][0]["duration_ms"], 3000.0);
        assert_eq!(r["traces"][1]["span_count"], 2);
        let r = store.search(&Query { min_duration_ms: Some(100.0), ..Default::default() });
        assert_eq!(r["total_matched"], 1);
        let one = store.trace(&hex(&[1; 16])).expect("test value");
        assert_eq!(one["spans"][1]["parent_span_id"], hex(&[1; 8]));

        // A bound that holds one trace: the older goes, whole.
        let bytes = store.usage().bytes as usize;
        let small = SpanStore::new(bytes - 1);
        small
            .receive(export(1, &[(1, 0, "GET /fast", 0, 2_000_000), (2, 1, "GET backend", 100, 1_000_000)]).into())
            .expect("test value");
        small.receive(export(2, &[(3, 0, "GET /slow", 10, 3_000_000_010)]).into()).expect("test value");
        let u = small.usage();
        assert_eq!((u.items, u.evicted), (1, 2));
        assert!(u.bytes <= u.limit_bytes);
        assert!(small.trace(&hex(&[1; 16])).is_none());
    }

    #[test]
    fn attributes_status_and_kind_arrive_as_sent_and_a_bad_name_is_refused() {
        let kv = |key: &str, value: otlp::any_value::Value| otlp::KeyValue {
            key: key.into(),
            value: Some(otlp::AnyValue { value: Some(value) }),
        };
        use otlp::any_value::Value as V;
        let span = otlp::Span {
            trace_id: vec![9; 16],
            span_id: vec![1; 8],
            name: "GET /checkout".into(),
            kind: otlp::span::SpanKind::Client as i32,
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 5_000,
            attributes: vec![
                kv("http.request.method", V::StringValue("GET".into())),
                kv("http.response.status_code", V::IntValue(503)),
                kv("retried", V::BoolValue(true)),
                kv("weight", V::DoubleValue(0.25)),
                kv(
                    "tags",
                    V::ArrayValue(otlp::ArrayValue {
                        values: vec![otlp::AnyValue { value: Some(V::StringValue("a".into())) }],
                    }),
                ),
            ],
            status: Some(otlp::Status {
                message: "upstream failed".into(),
                code: otlp::status::StatusCode::Error as i32,
            }),
            ..Default::default()
        };
        let request = |span: otlp::Span| {
            otlp::ExportTraceServiceRequest {
                resource_spans: vec![otlp::ResourceSpans {
                    resource: Some(otlp::Resource {
                        attributes: vec![kv("service.name", V::StringValue("checkout.shop".into()))],
                        dropped_attributes_count: 0,
                    }),
                    scope_spans: vec![otlp::ScopeSpans {
                        scope: Some(otlp::InstrumentationScope { name: "trellis".into(), ..Default::default() }),
                        spans: vec![span],
                        schema_url: "https://opentelemetry.io/schemas/1.21.0".into(),
                    }],
                    schema_url: String::new(),
                }],
            }
            .encode_to_vec()
        };
        let store = SpanStore::new(usize::MAX);
        assert_eq!(store.receive(request(span.clone()).into()).expect("test value"), 1);
        let t = store.trace(&hex(&[9; 16])).expect("test value");
        let s = &t["spans"][0];
        assert_eq!(
            (s["name"].as_str(), s["service"].as_str(), s["kind"].as_str()),
            (Some("GET /checkout"), Some("checkout.shop"), Some("client"))
        );
        assert_eq!((s["error"].as_bool(), s["duration_us"].as_u64()), (Some(true), Some(4)));
        assert_eq!(
            s["attributes"],
            json!({"http.request.method": "GET", "http.response.status_code": 503, "retried": true, "weight": 0.25, "tags": ["a"]})
        );

        // A name that is not UTF-8 fails the request (a 400), as the full message's decoder does.
        let mut bad = request(otlp::Span { name: "GET /ch\u{e9}ckout".into(), ..span });
        let at = bad.windows(3).position(|w| w == "ch\u{e9}".as_bytes()[..3].as_ref()).expect("test value");
        bad[at + 2] = 0xff;
        assert!(otlp::ExportTraceServiceRequest::decode(&bad[..]).is_err());
        assert!(store.receive(bad.into()).is_err());
    }
}
