//! The admin port: `/ready`, `/config_dump`, `/quitquitquit` (as Envoy and Istio name them),
//! and, for an injected Pod, `/app-health/<container>/<readyz|livez|startupz>`: the app's own
//! HTTP probes, which the injector moved here so the kubelet's plaintext probe never meets an
//! mTLS-only inbound port (as Istio's agent does).
//!
//! It serves operators and orchestrators, never application traffic, and stays up while the
//! proxy drains so `/ready` can say so.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::http::{full, Body};
use crate::Proxy;

/// The app's HTTP probes, by admin path (`/app-health/app/readyz`).
#[derive(Clone, Debug, Default)]
pub struct AppProbers(pub BTreeMap<String, AppProbe>);

/// Where the app answers one probe.
#[derive(Clone, Debug)]
pub struct AppProbe {
    pub addr: SocketAddr,
    pub path: String,
}

/// The kubelet's default probe timeout.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl AppProbers {
    /// Reads the injector's `TRELLIS_APP_PROBERS` JSON (`{"/app-health/app/readyz": {"port": 8080,
    /// "path": "/healthz"}}`), probing the app at `ip`.
    pub fn parse(json: &str, ip: std::net::IpAddr) -> Result<AppProbers, String> {
        let v: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(json).map_err(|e| format!("TRELLIS_APP_PROBERS: {e}"))?;
        let mut out = BTreeMap::new();
        for (path, p) in v {
            let port = p.get("port").and_then(|p| p.as_u64()).and_then(|p| u16::try_from(p).ok());
            let Some(port) = port else { return Err(format!("TRELLIS_APP_PROBERS: {path} has no port")) };
            let target = p.get("path").and_then(|p| p.as_str()).unwrap_or("/").to_string();
            out.insert(path, AppProbe { addr: SocketAddr::new(ip, port), path: target });
        }
        Ok(AppProbers(out))
    }

    async fn probe(&self, path: &str) -> Option<Response<Body>> {
        let p = self.0.get(path)?;
        let result = tokio::time::timeout(PROBE_TIMEOUT, async {
            let stream = tokio::net::TcpStream::connect(p.addr).await.map_err(|e| e.to_string())?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = Request::get(&p.path)
                .header(header::HOST, p.addr.to_string())
                .header(header::USER_AGENT, "kube-probe (trellis)")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .map_err(|e| e.to_string())?;
            send.send_request(req).await.map(|r| r.status()).map_err(|e| e.to_string())
        })
        .await;
        Some(match result {
            Ok(Ok(s)) if s.is_success() || s.is_redirection() => text(StatusCode::OK, format!("app answered {s}\n")),
            Ok(Ok(s)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("app answered {s}\n")),
            Ok(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("app probe failed: {e}\n")),
            Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "app probe timed out\n"),
        })
    }
}

/// Binds the admin port and serves it until the process exits.
pub async fn serve(proxy: Arc<Proxy>, addr: SocketAddr, probers: AppProbers) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let probers = Arc::new(probers);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (proxy, probers) = (proxy.clone(), probers.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (proxy, probers) = (proxy.clone(), probers.clone());
                    async move {
                        if req.uri().path().starts_with("/app-health/") {
                            if let Some(r) = probers.probe(req.uri().path()).await {
                                return Ok::<_, Infallible>(r);
                            }
                        }
                        Ok::<_, Infallible>(route(&proxy, req).await)
                    }
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
        (&Method::GET, "/certs") => {
            let mut r = text(StatusCode::OK, certs(proxy).to_string());
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        (&Method::POST | &Method::GET, "/quitquitquit") => {
            proxy.shared().drain.start();
            text(StatusCode::OK, "OK\n")
        }
        (&Method::GET, "/") => text(
            StatusCode::OK,
            "trellis proxy admin\n  /ready          readiness (200 when serving)\n  /metrics        Prometheus metrics (also /stats/prometheus); OpenMetrics when asked for\n  /config_dump    the snapshot in force, as JSON\n  /certs          the workload certificate in use: identity, serial, validity\n  /quitquitquit   drain: stop accepting, finish in-flight, exit\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found; see /\n"),
    }
}

/// The certificate the proxy presents now (as Envoy's `/certs`): identity, serial number and
/// validity, and how many roots it trusts. Rotation shows as a new serial.
fn certs(proxy: &Proxy) -> serde_json::Value {
    let unix = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let Some(creds) = proxy.shared().identity.as_ref().and_then(|s| s.load()) else {
        return serde_json::json!({"certificates": []});
    };
    let c = &creds.cert;
    let left = c.not_after.duration_since(std::time::SystemTime::now()).map(|d| d.as_secs()).unwrap_or(0);
    serde_json::json!({
        "certificates": [{
            "identity": c.id.to_string(),
            "serial_number": c.serial,
            "valid_from": unix(c.not_before),
            "expiration_time": unix(c.not_after),
            "seconds_until_expiration": left,
        }],
        "trusted_roots": creds.bundle.roots.len(),
    })
}
