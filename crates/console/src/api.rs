//! The console's HTTP server: the page, its JSON API (documented in `docs/console.md`), the
//! OTLP receivers (OTLP/HTTP `POST /v1/traces` and `POST /v1/logs`, protobuf or JSON, plain or
//! gzip; OTLP/gRPC on the same port, [`crate::otlp_grpc`]) and the console's own `/metrics`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::Console;

/// The largest OTLP request accepted (an exporter's batch is far smaller).
pub(crate) const MAX_BODY: usize = 16 << 20;

type Resp = Response<Full<Bytes>>;

/// Serves the console on `listener` until `shutdown` resolves.
///
/// Connections that bring OTLP exports (their first request is a `POST /v1/`, or they open with
/// HTTP/2's preface, as OTLP/gRPC exporters do; seen without consuming it, as a proxy detects a
/// protocol) are handed to a thread of their own at idle
/// priority ([`trellis_telemetry::idle`]), which reads, decodes and stores what they send: the
/// mesh's telemetry arriving never takes a CPU from requests, nor from the control plane. The
/// page and its API stay on the control plane's runtime, so the console answers promptly even
/// on a machine that requests keep busy.
pub async fn serve(
    console: Arc<Console>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let receivers = start_receivers(&console);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("console: accept failed: {e}");
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let _ = stream.set_nodelay(true);
        let (console, receivers) = (console.clone(), receivers.clone());
        tokio::spawn(async move {
            let Some(transport) = exports_transport(&stream).await else {
                return connection(console, stream, Ingest::Queued).await;
            };
            let Some(r) = receivers else { return transport.serve(console, stream, Ingest::Queued).await };
            match stream.into_std().map(|s| r.try_send((s, transport))) {
                Ok(Ok(())) => {}
                // The receiving thread is gone or behind on connections: this one is served
                // here (and its exports stored by the ingest thread).
                Ok(Err(e)) => {
                    let (s, transport) = e.into_inner();
                    if let Ok(s) = tokio::net::TcpStream::from_std(s) {
                        transport.serve(console, s, Ingest::Queued).await
                    }
                }
                Err(_) => {}
            }
        });
    }
}

/// Where a connection's exports are decoded and stored.
#[derive(Clone, Copy)]
pub(crate) enum Ingest {
    /// By the ingest thread, through its bounded queue (connections on the control plane's
    /// runtime).
    Queued,
    /// Where the connection is served (the receiving thread, already at idle priority).
    Here,
}

async fn connection(console: Arc<Console>, stream: tokio::net::TcpStream, ingest: Ingest) {
    let svc = hyper::service::service_fn(move |req| {
        let console = console.clone();
        async move { Ok::<_, Infallible>(handle(&console, req, ingest).await) }
    });
    let _ =
        hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
}

/// Connections waiting for the receiving thread to take them up.
const RECEIVER_BACKLOG: usize = 64;

/// Starts the thread that serves connections bringing exports; `None` if it cannot start (they
/// are then served on the control plane's runtime).
fn start_receivers(console: &Arc<Console>) -> Option<tokio::sync::mpsc::Sender<(std::net::TcpStream, Transport)>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(std::net::TcpStream, Transport)>(RECEIVER_BACKLOG);
    let console = console.clone();
    let started = trellis_telemetry::idle::spawn("console-receive", move || async move {
        while let Some((s, transport)) = rx.recv().await {
            if let Ok(s) = tokio::net::TcpStream::from_std(s) {
                tokio::spawn(transport.serve(console.clone(), s, Ingest::Here));
            }
        }
    });
    match started {
        Ok(()) => Some(tx),
        Err(e) => {
            tracing::warn!(
                "console: cannot start the receiving thread ({e}); exports are received on the main runtime"
            );
            None
        }
    }
}

/// How long a new connection may take to show its first bytes before it is served where it
/// was accepted.
const DETECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How a connection that brings exports speaks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Transport {
    /// OTLP/HTTP: HTTP/1.1 `POST /v1/traces` or `/v1/logs`.
    Http,
    /// OTLP/gRPC: HTTP/2 with prior knowledge (the page is never asked for that way: browsers
    /// speak HTTP/2 only over TLS).
    Grpc,
}

impl Transport {
    async fn serve(self, console: Arc<Console>, stream: tokio::net::TcpStream, ingest: Ingest) {
        match self {
            Transport::Http => connection(console, stream, ingest).await,
            Transport::Grpc => crate::otlp_grpc::connection(console, stream, ingest).await,
        }
    }
}

/// Whether the connection brings OTLP exports, and how, from its first bytes, read without
/// consuming them: a first request `POST /v1/...`, or HTTP/2's preface. A client silent past
/// [`DETECT_TIMEOUT`] brings none.
async fn exports_transport(stream: &tokio::net::TcpStream) -> Option<Transport> {
    const OPENINGS: [(&[u8; 9], Transport); 2] = [(b"POST /v1/", Transport::Http), (b"PRI * HTT", Transport::Grpc)];
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let mut buf = [0u8; 9];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        let seen = &buf[..n];
        if !OPENINGS.iter().any(|(o, _)| o.starts_with(seen)) {
            return None;
        }
        if n == buf.len() {
            return OPENINGS.iter().find(|(o, _)| o[..] == *seen).map(|(_, t)| *t);
        }
        // A request line cut short (rare): look again shortly, within the timeout.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

fn json_response(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, msg: &str) -> Resp {
    json_response(status, &json!({ "error": msg }))
}

fn params(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri().query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

async fn handle(console: &Arc<Console>, req: Request<Incoming>, ingest: Ingest) -> Resp {
    let path = req.uri().path().to_string();
    let p = params(&req);
    let num = |k: &str| p.get(k).and_then(|v| v.parse::<f64>().ok());
    let text = |k: &str| p.get(k).cloned().unwrap_or_default();
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/traces") => receive(console, req, ingest, Signal::Traces).await,
        (&Method::POST, "/v1/logs") => receive(console, req, ingest, Signal::Logs).await,
        (&Method::POST, "/v1/metrics") => {
            error(StatusCode::NOT_FOUND, "the console takes traces and logs; it reads proxies' metrics itself")
        }
        (&Method::GET, "/api/graph") => {
            json_response(StatusCode::OK, &console.metrics.graph(num("window").unwrap_or(60.0).clamp(5.0, 86400.0)))
        }
        (&Method::GET, "/api/services") => json_response(StatusCode::OK, &console.spans.services()),
        (&Method::GET, "/api/traces") => {
            let q = crate::traces::Query {
                service: text("service"),
                operation: text("operation"),
                status: text("status"),
                min_duration_ms: num("min_duration_ms"),
                start_us: num("start_us").map(|v| v as u64),
                end_us: num("end_us").map(|v| v as u64),
                limit: num("limit").map(|v| v as usize),
                sort: text("sort"),
            };
            json_response(StatusCode::OK, &console.spans.search(&q))
        }
        (&Method::GET, p) if p.starts_with("/api/traces/") => match console.spans.trace(&p["/api/traces/".len()..]) {
            Some(t) => json_response(StatusCode::OK, &t),
            None => error(StatusCode::NOT_FOUND, "no such trace in the store (never received, or evicted)"),
        },
        (&Method::GET, "/api/logs") => {
            let q = crate::logs::Query {
                trace_id: text("trace_id"),
                span_id: text("span_id"),
                limit: num("limit").map(|v| v as usize),
            };
            json_response(StatusCode::OK, &console.logs.query(&q))
        }
        (&Method::GET, "/api/metrics/targets") => json_response(StatusCode::OK, &console.metrics.targets()),
        (&Method::GET, "/api/metrics") => {
            let kind = text("kind");
            let name = text("name");
            if name.is_empty() {
                return error(StatusCode::BAD_REQUEST, "name is required (a service host or a workload name)");
            }
            let window = num("window").unwrap_or(900.0).clamp(60.0, 86400.0);
            json_response(
                StatusCode::OK,
                &console.metrics.golden(&kind, &name, &text("namespace"), &text("direction"), window),
            )
        }
        (&Method::GET, "/api/config") => json_response(StatusCode::OK, &config(console)),
        (&Method::GET, "/api/status") => {
            let (targets, failing) = console.metrics.scrape_status();
            json_response(
                StatusCode::OK,
                &json!({
                    "stores": console.usage(),
                    "scrape": {
                        "interval_seconds": console.metrics.interval.as_secs_f64(),
                        "targets": targets,
                        "failing": failing,
                    },
                }),
            )
        }
        (&Method::GET, "/metrics") => own_metrics(console),
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"ok": true})),
        (&Method::GET, "/") => asset("index.html"),
        (&Method::GET, p) if p.starts_with("/assets/") => asset(&p["/assets/".len()..]),
        (&Method::GET, _) => error(StatusCode::NOT_FOUND, "not found"),
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    }
}

fn asset(path: &str) -> Resp {
    match crate::assets::get(path) {
        Some((body, ctype)) => {
            let mut r = Response::new(Full::new(Bytes::from_static(body)));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
            r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
            r
        }
        None => error(StatusCode::NOT_FOUND, "no such file"),
    }
}

/// What an export carries.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Signal {
    Traces,
    Logs,
}

/// How an export's body is written.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Encoding {
    pub json: bool,
    pub gzip: bool,
}

/// Why an export was refused: the status to answer, and what was wrong.
pub(crate) type Refusal = (StatusCode, String);

/// Reads an export's body (inflated, and from JSON when so written) into its store; the number
/// of items stored.
fn decode_and_store(console: &Console, signal: Signal, body: Bytes, encoding: Encoding) -> Result<usize, Refusal> {
    let bad = |e: String| (StatusCode::BAD_REQUEST, e);
    let body = if encoding.gzip { inflate(&body)? } else { body };
    let body = match (encoding.json, signal) {
        (false, _) => body,
        (true, Signal::Traces) => Bytes::from(crate::otlp_json::traces(&body).map_err(bad)?),
        (true, Signal::Logs) => Bytes::from(crate::otlp_json::logs(&body).map_err(bad)?),
    };
    match signal {
        Signal::Traces => console.spans.receive(body),
        Signal::Logs => console.logs.receive(body),
    }
    .map_err(|e| bad(format!("not an OTLP export request: {e}")))
}

/// A gzip body, inflated up to [`MAX_BODY`].
fn inflate(body: &[u8]) -> Result<Bytes, Refusal> {
    use std::io::Read;
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(MAX_BODY));
    flate2::read::MultiGzDecoder::new(body)
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("not gzip: {e}")))?;
    if out.len() > MAX_BODY {
        return Err((StatusCode::PAYLOAD_TOO_LARGE, format!("over {} MiB once inflated", MAX_BODY >> 20)));
    }
    Ok(Bytes::from(out))
}

/// Stores an export where `ingest` says: `None` when the ingest thread is behind.
pub(crate) async fn store(
    console: &Arc<Console>,
    ingest: Ingest,
    signal: Signal,
    body: Bytes,
    encoding: Encoding,
) -> Option<Result<usize, Refusal>> {
    match ingest {
        Ingest::Queued => console.ingest(body.len(), move |c| decode_and_store(c, signal, body, encoding)).await,
        Ingest::Here => Some(decode_and_store(console, signal, body, encoding)),
    }
}

/// An OTLP/HTTP export, stored before the answer: 200 with an empty response in the request's
/// encoding (protobuf or JSON), 400 with what is malformed, 413 past [`MAX_BODY`], 415 for other
/// content types or encodings, 503 (retryable, as OTLP says) when the ingest thread is behind.
async fn receive(console: &Arc<Console>, req: Request<Incoming>, ingest: Ingest, signal: Signal) -> Resp {
    let ctype = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let json = if ctype.starts_with("application/x-protobuf") {
        false
    } else if ctype.starts_with("application/json") {
        true
    } else {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send OTLP as application/x-protobuf or application/json");
    };
    let gzip = match req.headers().get(header::CONTENT_ENCODING).map(|v| v.as_bytes()) {
        None | Some(b"identity") => false,
        Some(b"gzip") => true,
        Some(_) => return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send OTLP uncompressed or with gzip"),
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()),
    };
    match store(console, ingest, signal, body, Encoding { json, gzip }).await {
        None => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "the console is behind; retry later");
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
        Some(Ok(_)) => {
            // An empty Export*ServiceResponse: no bytes in protobuf, `{}` in JSON.
            let (body, ctype) = if json { ("{}", "application/json") } else { ("", "application/x-protobuf") };
            let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
            r
        }
        Some(Err((status, e))) => error(status, &e),
    }
}

/// The config in force, each proxy's sync state, and the findings.
fn config(console: &Console) -> Value {
    let state = console.config.current();
    let rejection = console.config.rejection();
    let resources: Vec<Value> = state
        .resources
        .iter()
        .map(|r| {
            json!({
                "kind": r.kind.to_string(),
                "namespace": r.namespace(),
                "name": r.name(),
                "file": r.source.file.display().to_string(),
                "line": r.pos(&[]).line,
            })
        })
        .collect();
    let findings: Vec<Value> = rejection
        .iter()
        .flat_map(|r| &r.findings)
        .chain(&state.warnings)
        .map(|f| {
            json!({
                "code": f.code.to_string(),
                "severity": f.severity.to_string(),
                "message": f.message,
                "file": f.file.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                "line": f.line,
                "column": f.column,
                "resource": f.resource,
                "field": f.path,
                "istio_code": f.istio_code,
            })
        })
        .collect();
    let proxies: Vec<Value> = console
        .proxies
        .list()
        .into_iter()
        .map(|(id, e)| {
            let state = if !e.connected {
                "disconnected"
            } else if !e.nacked.is_empty() && e.nacked == e.sent {
                "nacked"
            } else if !e.sent.is_empty() && e.acked == e.sent {
                "synced"
            } else {
                "pending"
            };
            json!({
                "id": id,
                "name": e.spec.name,
                "namespace": e.spec.namespace,
                "role": format!("{:?}", e.spec.role).to_lowercase(),
                "state": state,
                "connected": e.connected,
                "since_seconds": (e.since.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                "sent": e.sent,
                "acked": e.acked,
                "nacked": e.nacked,
                "nack_reason": e.nack_reason,
                "nack_source": e.nack_source,
                "generation": e.generation,
            })
        })
        .collect();
    json!({
        "generation": state.generation,
        "rejected": rejection.map(|r| r.reason),
        "resources": resources,
        "proxies": proxies,
        "findings": findings,
    })
}

/// The console's own metrics: each store's size, bound and evictions, and the scrape's state.
fn own_metrics(console: &Console) -> Resp {
    use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
    type Labels = Vec<(&'static str, &'static str)>;
    let mut reg = prometheus_client::registry::Registry::default();
    let bytes = Family::<Labels, Gauge>::default();
    let limit = Family::<Labels, Gauge>::default();
    let items = Family::<Labels, Gauge>::default();
    let evicted = Family::<Labels, Counter>::default();
    for u in console.usage() {
        let l = vec![("store", u.name)];
        bytes.get_or_create(&l).set(u.bytes as i64);
        limit.get_or_create(&l).set(u.limit_bytes as i64);
        items.get_or_create(&l).set(u.items as i64);
        evicted.get_or_create(&l).inc_by(u.evicted);
    }
    let (targets, failing) = console.metrics.scrape_status();
    let scrape_targets = Gauge::<i64>::default();
    scrape_targets.set(targets as i64);
    let scrape_failing = Gauge::<i64>::default();
    scrape_failing.set(failing as i64);
    reg.register("trellis_console_store_bytes", "Bytes a console store holds", bytes);
    reg.register("trellis_console_store_limit_bytes", "The bound of a console store, in bytes", limit);
    reg.register("trellis_console_store_items", "Spans, log lines or metric samples a console store holds", items);
    reg.register("trellis_console_store_evicted", "Items dropped to keep a console store within its bound", evicted);
    reg.register("trellis_console_scrape_targets", "Proxies whose metrics the console reads", scrape_targets);
    reg.register("trellis_console_scrape_failing", "Proxies whose last metrics read failed", scrape_failing);
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed");
    }
    let mut r = Response::new(Full::new(Bytes::from(out)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use trellis_telemetry::export::{encode_otlp, SpanWriter};
    use trellis_telemetry::trace::SpanKind;

    /// `n` spans of one trace, as a proxy's exporter sends them.
    fn export(n: u64) -> Vec<u8> {
        let spans: Vec<_> = (1..=n)
            .map(|i| {
                let mut w = SpanWriter::new(
                    Arc::from("frontend.default"),
                    ([7; 16], i.to_be_bytes(), None),
                    &["GET ", "frontend.default.svc.cluster.local"],
                    SpanKind::Server,
                    SystemTime::now(),
                    SystemTime::now() + Duration::from_millis(1),
                );
                w.str("url.path", "/fast").int("http.response.status_code", 200);
                w.finish(false)
            })
            .collect();
        encode_otlp(&spans)
    }

    /// One request on a new connection, written in two parts (cut at `cut`); the response's
    /// status line and body.
    async fn send(addr: std::net::SocketAddr, head: &str, body: &[u8], cut: usize) -> (String, String) {
        tokio::time::timeout(Duration::from_secs(30), exchange(addr, head, body, cut)).await.expect("an answer in 30 s")
    }

    async fn exchange(addr: std::net::SocketAddr, head: &str, body: &[u8], cut: usize) -> (String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let request = [head.as_bytes(), body].concat();
        s.write_all(&request[..cut]).await.expect("write");
        s.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.write_all(&request[cut..]).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text.lines().next().unwrap_or_default().to_string();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (status, body)
    }

    /// CPU time of this process's thread named `name` (ns) and its scheduling policy.
    fn thread(name: &str) -> Option<(u64, u32)> {
        for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            if std::fs::read_to_string(t.path().join("comm")).ok()?.trim_end() != name {
                continue;
            }
            let cpu = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // Field 41 of stat is the policy; fields after the parenthesised name, from 3.
            let policy = stat.rsplit(')').next()?.split_whitespace().nth(38)?.parse().ok()?;
            return Some((cpu.split_whitespace().next()?.parse().ok()?, policy));
        }
        None
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exports_are_received_at_idle_priority_and_the_page_where_it_was_accepted() {
        let (console, addr) = console_on_a_port().await;

        let spans = export(2000);
        let head = format!(
            "POST /v1/traces HTTP/1.1\r\nhost: console\r\ncontent-type: application/x-protobuf\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            spans.len()
        );
        // The request line arrives in two segments, the first too short to tell.
        let (status, _) = send(addr, &head, &spans, 3).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        let (receive_before, policy) = thread("console-receive").expect("the receiving thread runs");
        assert_eq!(policy, 5, "the receiving thread is SCHED_IDLE");
        let (ingest_before, _) = thread("console-ingest").expect("the ingest thread runs");
        assert_eq!(console.spans.usage().items, 2000);

        // Another export: decoded and stored by the receiving thread, the ingest thread untouched.
        let (status, _) = send(addr, &head, &export(2000), head.len()).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(console.spans.usage().items, 4000);
        let (receive_after, _) = thread("console-receive").expect("the receiving thread runs");
        let (ingest_after, _) = thread("console-ingest").expect("the ingest thread runs");
        assert!(receive_after > receive_before, "the receiving thread decoded the export");
        assert_eq!(ingest_after, ingest_before, "the ingest thread took no part");

        // The page's API, on a connection of its own, is answered (on the control plane's runtime).
        let (status, body) =
            send(addr, "GET /api/status HTTP/1.1\r\nhost: console\r\nconnection: close\r\n\r\n", b"", 2).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains("\"spans\""), "{body}");
        // Not an export's first bytes, and a bad export: both answered as before.
        let (status, _) = send(addr, "POST /v1/traces HTTP/1.1\r\nhost: c\r\ncontent-type: text/plain\r\ncontent-length: 2\r\nconnection: close\r\n\r\n", b"{}", 1).await;
        assert_eq!(status, "HTTP/1.1 415 Unsupported Media Type");
        let bad = head.replace(&format!("content-length: {}", spans.len()), "content-length: 3");
        let (status, _) = send(addr, &bad, b"\xff\xff\xff", 10).await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
    }

    async fn console_on_a_port() -> (Arc<Console>, std::net::SocketAddr) {
        let console = Console::new(
            trellis_control::store::ConfigStore::new(Vec::new(), false),
            Arc::default(),
            &crate::Limits::default(),
        )
        .expect("console");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(console.clone(), listener, std::future::pending()));
        (console, addr)
    }

    /// The OpenTelemetry SDK's own exporters (Python), over gRPC (plain and gzip) and OTLP/HTTP
    /// with gzip: each trace arrives whole, with its log line, by the console's port alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_opentelemetry_sdks_exporters_reach_the_console_over_grpc_and_gzip() {
        let (console, addr) = console_on_a_port().await;
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/otlp_client.py");
        for transport in ["grpc", "grpc-gzip", "http-gzip"] {
            let out = tokio::time::timeout(
                Duration::from_secs(60),
                tokio::process::Command::new("python3")
                    .arg(&script)
                    .arg(format!("http://{addr}"))
                    .arg(transport)
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .expect("the client is done in 60 s")
            .expect("python3 runs");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{transport}: {stderr}");
            let trace_id = String::from_utf8_lossy(&out.stdout).trim().to_string();

            let trace =
                console.spans.trace(&trace_id).unwrap_or_else(|| panic!("{transport}: trace {trace_id} stored"));
            let mut names: Vec<_> =
                trace["spans"].as_array().expect("spans").iter().map(|s| s["name"].clone()).collect();
            names.sort_by_key(|n| n.to_string());
            assert_eq!(names, [json!("charge-card"), json!("checkout")], "{transport}");
            let checkout =
                trace["spans"].as_array().expect("spans").iter().find(|s| s["name"] == "checkout").expect("checkout");
            assert_eq!(checkout["service"], format!("python-{transport}"));
            assert_eq!(checkout["kind"], "server");
            assert_eq!(checkout["attributes"]["transport"], transport);
            let lines = console.logs.query(&crate::logs::Query { trace_id, span_id: String::new(), limit: None });
            assert_eq!(lines["lines"][0]["fields"]["line"], format!("charged the card over {transport}"), "{lines}");
        }
        let (_, policy) = thread("console-receive").expect("the receiving thread runs");
        assert_eq!(policy, 5);
    }

    /// OTLP/JSON, plain and gzip, as the JavaScript SDK's `otlp-http` exporters send it; a
    /// malformed one gets 400 naming the field; gzip that is not gzip gets 400, and other
    /// encodings 415.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn otlp_json_and_gzip_bodies_are_read() {
        let (console, addr) = console_on_a_port().await;
        let trace = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"web"}}]},
            "scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174",
            "name":"GET /","kind":2,"startTimeUnixNano":"1544712660000000000","endTimeUnixNano":"1544712661000000000",
            "attributes":[{"key":"http.response.status_code","value":{"intValue":"503"}}],"status":{"code":2}}]}]}]}"#;
        let post = |path: &str, ctype: &str, encoding: &str, body: &[u8]| {
            format!(
                "POST {path} HTTP/1.1\r\nhost: c\r\ncontent-type: {ctype}\r\n{encoding}content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
        };
        let (status, body) =
            send(addr, &post("/v1/traces", "application/json", "", trace.as_bytes()), trace.as_bytes(), 20).await;
        assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "{}"));
        let t = console.spans.trace("5b8efff798038103d269b633813fc60c").expect("stored");
        assert_eq!(t["spans"][0]["service"], "web");
        assert_eq!(t["spans"][0]["error"], true);
        assert_eq!(t["spans"][0]["attributes"]["http.response.status_code"], 503);

        let log = r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"timeUnixNano":"1544712660000000000",
            "body":{"stringValue":"{\"path\":\"/\",\"status\":503}"},"traceId":"5b8efff798038103d269b633813fc60c",
            "spanId":"eee19b7ec3c1b174"}]}]}]}"#;
        let gz = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(log.as_bytes()).expect("gzip");
            e.finish().expect("gzip")
        };
        let (status, _) =
            send(addr, &post("/v1/logs", "application/json", "content-encoding: gzip\r\n", &gz), &gz, 20).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        let lines = console.logs.query(&crate::logs::Query {
            trace_id: "5b8efff798038103d269b633813fc60c".into(),
            span_id: "eee19b7ec3c1b174".into(),
            limit: None,
        });
        assert_eq!(lines["lines"][0]["fields"]["status"], 503, "{lines}");

        let bad = trace.replace("eee19b7ec3c1b174", "eee19b7e");
        let (status, body) =
            send(addr, &post("/v1/traces", "application/json", "", bad.as_bytes()), bad.as_bytes(), 20).await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        assert!(body.contains("resourceSpans[0].scopeSpans[0].spans[0].spanId: not 8 bytes of hex"), "{body}");
        let (status, body) =
            send(addr, &post("/v1/logs", "application/json", "content-encoding: gzip\r\n", b"plain"), b"plain", 20)
                .await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        assert!(body.contains("not gzip"), "{body}");
        let (status, _) =
            send(addr, &post("/v1/logs", "application/json", "content-encoding: br\r\n", b"{}"), b"{}", 20).await;
        assert_eq!(status, "HTTP/1.1 415 Unsupported Media Type");
        assert_eq!(console.spans.usage().items, 1);
    }
}
