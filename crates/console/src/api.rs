//! The console's HTTP server: the page, its JSON API (documented in `docs/console.md`), the
//! OTLP/HTTP receivers (`POST /v1/traces`, `POST /v1/logs`, protobuf) and the console's own
//! `/metrics`.

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
const MAX_BODY: usize = 16 << 20;

type Resp = Response<Full<Bytes>>;

/// Serves the console on `listener` until `shutdown` resolves.
///
/// Connections that bring OTLP exports (their first request is a `POST /v1/`, seen without
/// consuming it, as a proxy detects a protocol) are handed to a thread of their own at idle
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
            if let Some(r) = receivers {
                if brings_exports(&stream).await {
                    match stream.into_std().map(|s| r.try_send(s)) {
                        Ok(Ok(())) => return,
                        // The receiving thread is gone or behind on connections: this one is
                        // served here (and its exports stored by the ingest thread).
                        Ok(Err(e)) => match tokio::net::TcpStream::from_std(e.into_inner()) {
                            Ok(s) => return connection(console, s, Ingest::Queued).await,
                            Err(_) => return,
                        },
                        Err(_) => return,
                    }
                }
            }
            connection(console, stream, Ingest::Queued).await
        });
    }
}

/// Where a connection's exports are decoded and stored.
#[derive(Clone, Copy)]
enum Ingest {
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
fn start_receivers(console: &Arc<Console>) -> Option<tokio::sync::mpsc::Sender<std::net::TcpStream>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::net::TcpStream>(RECEIVER_BACKLOG);
    let console = console.clone();
    let started = trellis_telemetry::idle::spawn("console-receive", move || async move {
        while let Some(s) = rx.recv().await {
            if let Ok(s) = tokio::net::TcpStream::from_std(s) {
                tokio::spawn(connection(console.clone(), s, Ingest::Here));
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

/// Whether the connection's first request is an OTLP export (`POST /v1/...`), from its first
/// bytes, read without consuming them. A client silent past [`DETECT_TIMEOUT`] is not one.
async fn brings_exports(stream: &tokio::net::TcpStream) -> bool {
    const EXPORT: &[u8] = b"POST /v1/";
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let mut buf = [0u8; EXPORT.len()];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return false,
        };
        if n == EXPORT.len() || !EXPORT.starts_with(&buf[..n]) {
            return buf[..n] == *EXPORT;
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
        (&Method::POST, "/v1/traces") => receive(console, req, ingest, |c, b| c.spans.receive(b)).await,
        (&Method::POST, "/v1/logs") => receive(console, req, ingest, |c, b| c.logs.receive(b)).await,
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

/// An OTLP/HTTP export (protobuf), stored before the answer: 200 with an empty protobuf
/// response, 400 with the decode error, 415 for JSON or compressed bodies, which this receiver
/// does not read, 503 (retryable, as OTLP says) when the ingest thread is behind.
async fn receive(
    console: &Arc<Console>,
    req: Request<Incoming>,
    ingest: Ingest,
    store: impl FnOnce(&Console, Bytes) -> Result<usize, prost::DecodeError> + Send + 'static,
) -> Resp {
    let ctype = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ctype.starts_with("application/x-protobuf") {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send OTLP as application/x-protobuf");
    }
    if req.headers().get(header::CONTENT_ENCODING).is_some_and(|v| v != "identity") {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send OTLP uncompressed");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()),
    };
    let stored = match ingest {
        Ingest::Queued => console.ingest(body.len(), move |c| store(c, body)).await,
        Ingest::Here => Some(store(console, body)),
    };
    match stored {
        None => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "the console is behind; retry later");
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
        Some(Ok(_)) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/x-protobuf"));
            r
        }
        Some(Err(e)) => error(StatusCode::BAD_REQUEST, &format!("not an OTLP export request: {e}")),
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
        let console = Console::new(
            trellis_control::store::ConfigStore::new(Vec::new(), false),
            Arc::default(),
            &crate::Limits::default(),
        )
        .expect("console");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(console.clone(), listener, std::future::pending()));

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
        let (status, _) = send(addr, "POST /v1/traces HTTP/1.1\r\nhost: c\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n", b"{}", 1).await;
        assert_eq!(status, "HTTP/1.1 415 Unsupported Media Type");
        let bad = head.replace(&format!("content-length: {}", spans.len()), "content-length: 3");
        let (status, _) = send(addr, &bad, b"\xff\xff\xff", 10).await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
    }
}
