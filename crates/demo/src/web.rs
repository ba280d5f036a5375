//! What every demo app shares: a small HTTP server with graceful shutdown, JSON log lines that
//! carry the trace ids of the request, the trace headers apps must forward, and an HTTP client
//! that, like any ordinary client, honours `HTTP_PROXY`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub type Body = Full<Bytes>;

/// Headers an app forwards from its request to the calls it makes (trace context and ids).
pub const FORWARDED: &[&str] = &[
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "x-ot-span-context",
    "x-amzn-trace-id",
];

pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

pub fn text(status: StatusCode, s: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(s.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// `(trace_id, span_id)` of a request, from W3C `traceparent` or B3 headers.
pub fn trace_ids(h: &HeaderMap) -> (Option<String>, Option<String>) {
    if let Some(tp) = h.get("traceparent").and_then(|v| v.to_str().ok()) {
        let parts: Vec<&str> = tp.split('-').collect();
        if parts.len() == 4 {
            return (Some(parts[1].to_string()), Some(parts[2].to_string()));
        }
    }
    if let Some(b3) = h.get("b3").and_then(|v| v.to_str().ok()) {
        let mut it = b3.split('-');
        return (it.next().map(str::to_string), it.next().map(str::to_string));
    }
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    (get("x-b3-traceid"), get("x-b3-spanid"))
}

/// One JSON log line on stdout.
pub fn log(service: &str, level: &str, msg: &str, fields: serde_json::Value) {
    let mut line = serde_json::json!({
        "timestamp": now_rfc3339(),
        "level": level,
        "service": service,
        "message": msg,
    });
    if let (Some(obj), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
        obj.extend(extra);
    }
    println!("{line}");
}

/// The current time as RFC 3339 (UTC, milliseconds).
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, now.subsec_millis())
}

/// An HTTP client as an ordinary app would build one: it uses `HTTP_PROXY` when set.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().pool_idle_timeout(std::time::Duration::from_secs(30)).build().unwrap_or_default()
}

/// Copies the forwarded headers of `from` onto a request builder.
pub fn forward(mut rb: reqwest::RequestBuilder, from: &HeaderMap) -> reqwest::RequestBuilder {
    for name in FORWARDED {
        if let Some(v) = from.get(*name) {
            rb = rb.header(*name, v.as_bytes());
        }
    }
    rb
}

/// The port to listen on: `$PORT`, else `default`.
pub fn port(default: u16) -> u16 {
    std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(default)
}

/// The address to listen on: `$BIND` (in a Pod, `0.0.0.0` or the Pod's IP from the downward
/// API), else 127.0.0.1.
pub fn bind_ip() -> std::net::IpAddr {
    std::env::var("BIND").ok().and_then(|b| b.parse().ok()).unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
}

/// Serves `handler` on [`bind_ip`]:`port` (HTTP/1.1 and HTTP/2) until SIGTERM or Ctrl-C, then
/// finishes in-flight requests. Every request is logged as one JSON line.
pub async fn serve<H, F>(service: &str, port: u16, handler: H) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let addr = SocketAddr::new(bind_ip(), port);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    log(service, "info", "listening", serde_json::json!({"address": addr.to_string()}));
    let handler = Arc::new(handler);
    let service: Arc<str> = Arc::from(service);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let (h, svc_name) = (handler.clone(), service.clone());
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (h, svc_name) = (h.clone(), svc_name.clone());
            async move {
                let started = Instant::now();
                let (method, path) = (req.method().to_string(), req.uri().path().to_string());
                let (trace_id, span_id) = trace_ids(req.headers());
                let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
                let resp = h(req).await;
                log(
                    &svc_name,
                    "info",
                    "request",
                    serde_json::json!({
                        "method": method, "path": path, "status": resp.status().as_u16(),
                        "duration_ms": (started.elapsed().as_secs_f64() * 1e6).round() / 1000.0,
                        "trace_id": trace_id, "span_id": span_id, "x_request_id": request_id,
                    }),
                );
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(conn);
    }
    log(&service, "info", "shutting down; finishing in-flight requests", serde_json::json!({}));
    let _ = tokio::time::timeout(std::time::Duration::from_secs(4), graceful.shutdown()).await;
    Ok(())
}

/// Reads a request body whole (demo apps only see small bodies).
pub async fn read_body(req: Request<Incoming>) -> (http::request::Parts, Bytes) {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (parts, bytes)
}
