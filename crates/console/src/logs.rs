//! The access-log store: lines received as OTLP log records (`POST /v1/logs`, what proxies
//! export with `--access-log-otlp-endpoint`), the newest kept within a bound in bytes, found
//! by trace and span id (a span's lines, and from a line back to its span).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use prost::Message;
use serde_json::{json, Value};
use trellis_telemetry::otlp;

use crate::traces::{hex, SpanId, TraceId};
use crate::StoreUsage;
use trellis_telemetry::trace::{parse_span_hex, parse_trace_hex};

struct Line {
    seq: u64,
    time_ns: u64,
    trace_id: Option<TraceId>,
    span_id: Option<SpanId>,
    /// The line as the proxy wrote it (a JSON object).
    body: String,
}

impl Line {
    /// Itself in the queue, its body's heap block, and its place in its trace's index.
    fn bytes(&self) -> usize {
        std::mem::size_of::<Line>()
            + crate::traces::heap(self.body.capacity())
            + if self.trace_id.is_some() { 16 } else { 0 }
    }
}

#[derive(Default)]
struct Inner {
    lines: VecDeque<Line>,
    /// Sequence numbers of each trace's lines, oldest first.
    by_trace: HashMap<TraceId, Vec<u64>>,
    next_seq: u64,
    bytes: usize,
    evicted: u64,
}

pub struct LogStore {
    limit: usize,
    inner: Mutex<Inner>,
}

/// `GET /api/logs`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct Query {
    pub trace_id: String,
    pub span_id: String,
    pub limit: Option<usize>,
}

impl LogStore {
    pub fn new(limit_bytes: usize) -> LogStore {
        LogStore { limit: limit_bytes, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decodes an OTLP `ExportLogsServiceRequest` and stores its records; returns how many.
    /// Stores the lines of an OTLP logs export request, decoded as `otlp::receive` reads it (ids
    /// as slices of `body`, attributes skipped: the line is the body).
    pub fn receive(&self, body: bytes::Bytes) -> Result<usize, prost::DecodeError> {
        let req = otlp::receive::ExportLogsServiceRequest::decode(body)?;
        let mut n = 0;
        for rl in req.resource_logs {
            for sl in rl.scope_logs {
                for r in sl.log_records {
                    let body = match otlp::AnyValue::decode(r.body)?.value {
                        None => continue,
                        Some(otlp::any_value::Value::StringValue(s)) => s,
                        value => crate::traces::any_to_json(&otlp::AnyValue { value }).to_string(),
                    };
                    let time_ns = if r.time_unix_nano != 0 { r.time_unix_nano } else { r.observed_time_unix_nano };
                    self.insert(
                        time_ns,
                        TraceId::try_from(&r.trace_id[..]).ok(),
                        SpanId::try_from(&r.span_id[..]).ok(),
                        body,
                    );
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn insert(&self, time_ns: u64, trace_id: Option<TraceId>, span_id: Option<SpanId>, body: String) {
        let mut g = self.lock();
        let inner = &mut *g;
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let line = Line { seq, time_ns, trace_id, span_id, body };
        inner.bytes += line.bytes();
        if let Some(t) = trace_id {
            inner.by_trace.entry(t).or_default().push(seq);
        }
        inner.lines.push_back(line);
        while inner.bytes > self.limit {
            let Some(old) = inner.lines.pop_front() else { break };
            inner.bytes -= old.bytes();
            inner.evicted += 1;
            if let Some(t) = old.trace_id {
                if let Some(v) = inner.by_trace.get_mut(&t) {
                    v.retain(|s| *s != old.seq);
                    if v.is_empty() {
                        inner.by_trace.remove(&t);
                    }
                }
            }
        }
    }

    pub fn usage(&self) -> StoreUsage {
        let g = self.lock();
        StoreUsage {
            name: "logs",
            items: g.lines.len() as u64,
            bytes: g.bytes as u64,
            limit_bytes: self.limit as u64,
            evicted: g.evicted,
        }
    }

    /// A trace's lines (of one span when `span_id` is given), else the newest lines.
    pub fn query(&self, q: &Query) -> Value {
        let g = self.lock();
        let limit = q.limit.unwrap_or(100).min(1000);
        let span = parse_span_hex(&q.span_id);
        let lines: Vec<&Line> = match parse_trace_hex(&q.trace_id) {
            Some(t) => {
                let first = g.lines.front().map(|l| l.seq).unwrap_or(0);
                g.by_trace
                    .get(&t)
                    .into_iter()
                    .flatten()
                    .filter_map(|seq| g.lines.get((seq - first) as usize))
                    .filter(|l| span.is_none() || l.span_id == span)
                    .take(limit)
                    .collect()
            }
            None if !q.trace_id.is_empty() => Vec::new(),
            None => g.lines.iter().rev().take(limit).collect(),
        };
        let lines: Vec<Value> = lines
            .into_iter()
            .map(|l| {
                json!({
                    "time_us": l.time_ns / 1000,
                    "trace_id": l.trace_id.map(|t| hex(&t)).unwrap_or_default(),
                    "span_id": l.span_id.map(|s| hex(&s)).unwrap_or_default(),
                    "fields": serde_json::from_str::<Value>(&l.body).unwrap_or_else(|_| json!({ "line": l.body })),
                })
            })
            .collect();
        json!({ "lines": lines })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_found_by_trace_and_span_and_the_oldest_go_first() {
        let line =
            |span: u8| format!(r#"{{"path":"/slow","span_id":"{}","trace_id":"{}"}}"#, hex(&[span; 8]), hex(&[7; 16]));
        let body =
            trellis_telemetry::access_log::encode_otlp_logs(vec![line(1), line(2), "{\"path\":\"/other\"}".into()]);
        let store = LogStore::new(usize::MAX);
        assert_eq!(store.receive(body.clone().into()).expect("test value"), 3);
        let q = |span: &str| Query { trace_id: hex(&[7; 16]), span_id: span.into(), limit: None };
        assert_eq!(store.query(&q(""))["lines"].as_array().expect("test value").len(), 2);
        let one = store.query(&q(&hex(&[2; 8])));
        assert_eq!(one["lines"].as_array().expect("test value").len(), 1);
        assert_eq!(one["lines"][0]["fields"]["path"], "/slow");
        assert_eq!(one["lines"][0]["span_id"], hex(&[2; 8]));

        let per_line = store.usage().bytes as usize / 3;
        let small = LogStore::new(2 * per_line + 10);
        small.receive(body.clone().into()).expect("test value");
        let u = small.usage();
        assert_eq!((u.items, u.evicted), (2, 1));
        // The trace's first line went; its second is still found.
        assert_eq!(small.query(&q(""))["lines"].as_array().expect("test value").len(), 1);
    }
}
