//! The admin port: `/ready`, `/config_dump`, `/quitquitquit` (as Envoy and Istio name them).
//!
//! It serves operators and orchestrators, never application traffic, and stays up while the
//! proxy drains so `/ready` can say so.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::http::{full, Body};
use crate::Proxy;

/// Binds the admin port and serves it until the process exits.
pub async fn serve(proxy: Arc<Proxy>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, Infallible>(route(&proxy, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(local)
}

/// Metrics, in OpenMetrics when the scraper asks for it (`Accept`), else Prometheus text.
fn metrics(proxy: &Arc<Proxy>, req: &Request<Incoming>) -> Response<Body> {
    let shared = proxy.shared();
    let m = &shared.metrics;
    m.connections_open.set(shared.drain.open_connections() as i64);
    let cp = shared.status().control_plane;
    m.control_plane_connected.set(i64::from(cp.as_deref() == Some("connected")));
    let openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (body, ctype) = if openmetrics {
        (m.encode_openmetrics(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
    } else {
        (m.encode_prometheus(), "text/plain; version=0.0.4; charset=utf-8")
    };
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(full(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn route(proxy: &Arc<Proxy>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/ready") => {
            if proxy.shared().is_ready() {
                text(StatusCode::OK, "LIVE\n")
            } else if proxy.shared().drain.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n")
            }
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "OK\n"),
        (&Method::GET, "/metrics" | "/stats/prometheus") => metrics(proxy, &req),
        (&Method::GET, "/config_dump") => {
            let dump = proxy.config_dump().await;
            match serde_json::to_string_pretty(&dump) {
                Ok(s) => {
                    let mut r = text(StatusCode::OK, s);
                    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    r
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode config: {e}\n")),
            }
        }
        (&Method::POST | &Method::GET, "/quitquitquit") => {
            proxy.shared().drain.start();
            text(StatusCode::OK, "OK\n")
        }
        (&Method::GET, "/") => text(
            StatusCode::OK,
            "trellis proxy admin\n  /ready          readiness (200 when serving)\n  /metrics        Prometheus metrics (also /stats/prometheus); OpenMetrics when asked for\n  /config_dump    the snapshot in force, as JSON\n  /quitquitquit   drain: stop accepting, finish in-flight, exit\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found; see /\n"),
    }
}
