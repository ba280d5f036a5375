//! Access logs: one JSON line per request, written off the request path through a bounded
//! queue (a full queue drops the line and counts it), to stdout or a file, by a thread that
//! writes in batches every 50 ms and on shutdown; and, when an endpoint is given, exported as
//! OTLP log records (`POST /v1/logs`: the line as the body, its trace and span ids as the
//! record's), as Istio's OpenTelemetry access-log provider does, by a task of its own on a
//! thread at idle priority ([`crate::idle`]).

use std::path::PathBuf;

use std::io::{BufWriter, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

/// Where access logs go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    pub fn parse(s: &str) -> Sink {
        match s {
            "stdout" | "-" | "/dev/stdout" => Sink::Stdout,
            path => Sink::File(PathBuf::from(path)),
        }
    }
}

const QUEUE: usize = 16 * 1024;

/// How often the writer wakes to write what queued up. Requests never wake it: at thousands of
/// requests per second a wake-up per line would cost more than the line.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

enum Msg {
    Line(String),
    /// Write everything queued before this, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer thread (writing to `sink`, if any) and, with an `otlp` endpoint, the
    /// export task (on a thread of its own at idle priority).
    pub fn start(sink: Option<Sink>, otlp: Option<http::Uri>, dropped: Counter) -> std::io::Result<AccessLog> {
        let (tx, rx) = sync_channel::<Msg>(QUEUE);
        let out: Box<dyn Write + Send> = match &sink {
            Some(Sink::Stdout) => Box::new(std::io::stdout()),
            Some(Sink::File(p)) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
            None => Box::new(std::io::sink()),
        };
        let export = match otlp {
            Some(uri) => {
                let (etx, erx) = tokio::sync::mpsc::channel(EXPORT_BATCHES);
                let d = dropped.clone();
                crate::idle::spawn("access-log-export", move || export(uri, erx, d))?;
                Some(etx)
            }
            None => None,
        };
        let d = dropped.clone();
        std::thread::Builder::new().name("access-log".into()).spawn(move || writer(rx, out, export, d))?;
        Ok(AccessLog { tx, dropped })
    }

    /// Queues one line; never waits.
    pub fn write(&self, line: String) {
        if self.tx.try_send(Msg::Line(line)).is_err() {
            self.dropped.inc();
        }
    }

    /// Waits (at most `timeout`) until every line queued so far is written: for shutdown.
    pub async fn flush(&self, timeout: Duration) {
        let tx = self.tx.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let (ack, done) = std::sync::mpsc::channel();
            if tx.send(Msg::Flush(ack)).is_ok() {
                let _ = done.recv_timeout(timeout);
            }
        })
        .await;
    }
}

/// Batches of lines waiting for the export task; when it is this far behind, batches are
/// dropped (and counted).
const EXPORT_BATCHES: usize = 16;

fn writer(
    rx: Receiver<Msg>,
    out: Box<dyn Write + Send>,
    export: Option<tokio::sync::mpsc::Sender<Vec<String>>>,
    dropped: Counter,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    loop {
        std::thread::sleep(FLUSH_EVERY);
        let (mut lines, mut acks, mut closed) = (0u64, Vec::new(), false);
        let mut failed = false;
        let mut batch = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(Msg::Line(l)) => {
                    lines += 1;
                    failed |= out.write_all(l.as_bytes()).and_then(|_| out.write_all(b"\n")).is_err();
                    if export.is_some() {
                        batch.push(l);
                    }
                }
                Ok(Msg::Flush(a)) => acks.push(a),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if out.flush().is_err() || failed {
            dropped.inc_by(lines);
        }
        if let (Some(tx), false) = (&export, batch.is_empty()) {
            let n = batch.len() as u64;
            if tx.try_send(batch).is_err() {
                dropped.inc_by(n);
            }
        }
        for a in acks {
            let _ = a.send(());
        }
        if closed {
            return;
        }
    }
}

/// Sends each batch of lines as one OTLP `ExportLogsServiceRequest`; a batch the receiver does
/// not take is counted as dropped.
async fn export(uri: http::Uri, mut rx: tokio::sync::mpsc::Receiver<Vec<String>>, dropped: Counter) {
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    while let Some(lines) = rx.recv().await {
        let n = lines.len() as u64;
        if !crate::export::post(&client, &uri, "application/x-protobuf", encode_otlp_logs(lines)).await {
            dropped.inc_by(n);
        }
    }
}

/// The OTLP message for a batch of access-log lines: each line is a record's body, and the
/// `trace_id` and `span_id` it carries are the record's own, so a backend links it to its span.
pub fn encode_otlp_logs(lines: Vec<String>) -> Vec<u8> {
    use crate::otlp;
    use prost::Message;
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let records = lines
        .into_iter()
        .map(|line| otlp::LogRecord {
            observed_time_unix_nano: now,
            severity_number: 9, // INFO
            severity_text: "INFO".into(),
            trace_id: hex_field(&line, "\"trace_id\":\"", 16),
            span_id: hex_field(&line, "\"span_id\":\"", 8),
            body: Some(otlp::AnyValue { value: Some(otlp::any_value::Value::StringValue(line)) }),
            ..Default::default()
        })
        .collect();
    otlp::ExportLogsServiceRequest {
        resource_logs: vec![otlp::ResourceLogs {
            resource: Some(otlp::Resource {
                attributes: vec![otlp::KeyValue {
                    key: "telemetry.sdk.name".into(),
                    value: Some(otlp::AnyValue { value: Some(otlp::any_value::Value::StringValue("trellis".into())) }),
                }],
                dropped_attributes_count: 0,
            }),
            scope_logs: vec![otlp::ScopeLogs {
                scope: Some(otlp::InstrumentationScope {
                    name: "trellis-proxy/access-log".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                log_records: records,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
    .encode_to_vec()
}

/// The `len` bytes written in hex after `key` in `line`, or nothing (a line without a trace).
fn hex_field(line: &str, key: &str, len: usize) -> Vec<u8> {
    let Some(at) = line.find(key) else { return Vec::new() };
    let Some(hex) = line.get(at + key.len()..at + key.len() + 2 * len) else { return Vec::new() };
    match len {
        16 => crate::trace::parse_trace_hex(hex).map(|t| t.to_vec()),
        8 => crate::trace::parse_span_hex(hex).map(|s| s.to_vec()),
        _ => None,
    }
    .unwrap_or_default()
}

#[cfg(test)]
mod otlp_tests {
    use prost::Message;

    #[test]
    fn a_line_becomes_a_record_with_its_trace_and_span_ids() {
        let line = r#"{"method":"GET","span_id":"00f067aa0ba902b7","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}"#;
        let body = super::encode_otlp_logs(vec![line.to_string(), "{\"trace_id\":null}".into()]);
        let req = crate::otlp::ExportLogsServiceRequest::decode(body.as_slice()).expect("test value");
        let recs = &req.resource_logs[0].scope_logs[0].log_records;
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[0].trace_id,
            [0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36]
        );
        assert_eq!(recs[0].span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        match &recs[0].body.as_ref().expect("test value").value {
            Some(crate::otlp::any_value::Value::StringValue(s)) => assert_eq!(s, line),
            other => panic!("body {other:?}"),
        }
        assert!(recs[1].trace_id.is_empty() && recs[1].span_id.is_empty());
    }
}
