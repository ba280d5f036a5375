//! The end-to-end harness: real `trellis` processes, real backends and clients, all on
//! 127.0.0.1. Tests wait on readiness signals (`/ready`, a bound port), never on fixed sleeps.
#![allow(dead_code)]

pub mod load;
pub mod mesh;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn trellis_bin() -> &'static str {
    env!("CARGO_BIN_EXE_trellis")
}

/// A port that was free a moment ago, chosen below the ephemeral range so that no outgoing
/// connection takes it before the process under test binds it.
///
/// Only for ports a test cannot let the kernel choose: a `trellis up` mesh binds the ports its
/// config and flags name, as users run it (its proxies are its children, not the test's);
/// etcd, kube-apiserver and Python apps take theirs on the command line; and addresses that
/// must stay dead. A `trellis proxy` the test starts binds port 0 instead ([`ProxyProc`]).
///
/// nextest runs tests as parallel processes, and a port handed out here is only bound later by
/// the proxy under test; so that two tests do not get the same port in that window, each test
/// process takes ports from its own slice of the range (by pid), in turn from a random start,
/// so it hands out no port twice before going round its 250.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const SLICE: u16 = 250;
    static NEXT: AtomicU16 = AtomicU16::new(u16::MAX);
    // 16000-19999, below the kernel's ephemeral range (outgoing connections never take these)
    // and clear of the fixed ports the README's walkthrough uses (8080, 15010, 15100-15108).
    let base = 16_000 + (std::process::id() % 16) as u16 * SLICE;
    let _ = NEXT.compare_exchange(u16::MAX, fastrand::u16(0..SLICE), Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SLICE {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % SLICE;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A temporary config directory.
pub struct ConfigDir {
    pub dir: tempfile::TempDir,
}

impl ConfigDir {
    pub fn new() -> ConfigDir {
        ConfigDir { dir: tempfile::tempdir().expect("tempdir") }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file atomically (write + rename, as editors and `kubectl` tools do).
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &path).expect("rename config");
        path
    }
}

/// YAML for a ServiceEntry `host` (port 80, HTTP unless `protocol` says otherwise) served by
/// the given endpoints `(address:port, labels)`.
pub fn service(host: &str, protocol: &str, endpoints: &[(SocketAddr, &[(&str, &str)])]) -> String {
    let mut eps = String::new();
    for (addr, labels) in endpoints {
        eps.push_str(&format!("  - address: {}\n    ports: {{http: {}}}\n", addr.ip(), addr.port()));
        if !labels.is_empty() {
            eps.push_str("    labels:\n");
            for (k, v) in labels.iter() {
                eps.push_str(&format!("      {k}: {v}\n"));
            }
        }
    }
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\nspec:\n  hosts: [{host}]\n  ports:\n  - {{number: 80, name: http, protocol: {protocol}}}\n  resolution: STATIC\n  endpoints:\n{eps}---\n",
        name = host.replace('.', "-"),
    )
}

/// The port test Gateways are configured with; the proxy binds it as port 0 (see
/// [`ProxyProc::start`]), so tests never race for it.
pub const GW: u16 = 8080;

/// YAML for a Gateway selecting the default ingress labels, serving HTTP on `port`.
pub fn gateway(name: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: {port}, name: http, protocol: HTTP}}\n    hosts: [\"*\"]\n---\n"
    )
}

// --- proxy processes ---

/// The admin address a proxy logged (`admin=127.0.0.1:PORT`, the address it bound).
fn admin_from_log(log: &str) -> Option<SocketAddr> {
    log.lines().find_map(|l| {
        let rest = &l[l.find("admin=")? + "admin=".len()..];
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// A running `trellis proxy` (killed on drop).
pub struct ProxyProc {
    pub child: Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl ProxyProc {
    /// Starts `trellis proxy ARGS --admin 127.0.0.1:0 --ephemeral-gateway-ports`, reads the admin
    /// address it bound from its log, and waits until `/ready` answers 200. Gateway listeners
    /// bind port 0: [`ProxyProc::port`] gives the port a configured one was bound on.
    /// (`--inbound`/`--outbound`/`--upstream` addresses are bound as given.)
    pub async fn start(args: &[&str]) -> ProxyProc {
        Self::launch(args, true).await
    }

    /// As [`ProxyProc::start`], with gateway listeners bound on their configured ports.
    pub async fn start_binding_configured_ports(args: &[&str]) -> ProxyProc {
        Self::launch(args, false).await
    }

    async fn launch(args: &[&str], ephemeral_gateway_ports: bool) -> ProxyProc {
        let logdir = tempfile::tempdir().expect("tempdir");
        let log = logdir.path().join("proxy.log");
        let logfile = std::fs::File::create(&log).expect("log file");
        let child = Command::new(trellis_bin())
            .arg("proxy")
            .args(args)
            .args(["--admin", "127.0.0.1:0"])
            .args(ephemeral_gateway_ports.then_some("--ephemeral-gateway-ports"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .expect("spawn trellis proxy");
        let mut p = ProxyProc { child, admin: SocketAddr::from(([127, 0, 0, 1], 0)), log, _logdir: logdir };
        p.wait_ready().await;
        p
    }

    /// Waits until the proxy logged its admin address and `/ready` answers 200.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("proxy exited with {status} before ready; log:\n{}", self.log_text());
            }
            if self.admin.port() == 0 {
                if let Some(a) = admin_from_log(&self.log_text()) {
                    self.admin = a;
                }
            }
            if self.admin.port() != 0 {
                if let Ok((200, _)) = admin_get(self.admin, "/ready").await {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "proxy not ready in 20 s; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on /ready
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub async fn config_dump(&self) -> serde_json::Value {
        let (code, body) = admin_get(self.admin, "/config_dump").await.expect("config_dump");
        assert_eq!(code, 200);
        serde_json::from_str(&body).expect("config_dump json")
    }

    /// The port the gateway listener configured on `configured` is bound on.
    pub async fn port(&self, configured: u16) -> u16 {
        let dump = self.config_dump().await;
        let listeners = dump["active_listeners"].as_array().cloned().unwrap_or_default();
        listeners
            .iter()
            .find(|l| {
                let addr = l["address"].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
                addr.is_some_and(|a| a.port() == configured)
            })
            .and_then(|l| l["bound"].as_str()?.parse::<SocketAddr>().ok())
            .map(|a| a.port())
            .unwrap_or_else(|| panic!("no listener configured on port {configured}: {listeners:?}"))
    }

    /// The address the listener `name` (`outbound`, `inbound-PORT`, `upstream-PORT`) is bound on: give
    /// `--outbound 127.0.0.1:0` and the like, then read the address here.
    pub async fn listener(&self, name: &str) -> SocketAddr {
        let dump = self.config_dump().await;
        let listeners = dump["active_listeners"].as_array().cloned().unwrap_or_default();
        listeners
            .iter()
            .find(|l| l["name"] == name)
            .and_then(|l| l["bound"].as_str()?.parse().ok())
            .unwrap_or_else(|| panic!("no listener {name}: {listeners:?}"))
    }

    pub async fn version(&self) -> String {
        self.config_dump().await["version"].as_str().unwrap_or_default().to_string()
    }

    /// Waits until the proxy runs a config version other than `old`.
    pub async fn wait_version_change(&self, old: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let v = self.version().await;
            if v != old {
                return v;
            }
            assert!(Instant::now() < deadline, "config version stayed {old}; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on /config_dump
        }
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(Instant::now() < deadline, "proxy did not exit; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on the exit
        }
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET on an admin port: (status, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let client = h1_client();
    let resp = client
        .request(Request::get(format!("http://{addr}{path}")).body(empty()).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

// --- clients ---

pub fn empty() -> TestBody {
    full(Bytes::new())
}

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn h1_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

/// A response read whole: status, headers, body text.
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The backend that answered (from the echo JSON).
    pub fn server(&self) -> String {
        self.json()["server"].as_str().unwrap_or_default().to_string()
    }

    pub fn flag(&self) -> Option<&str> {
        self.header("x-trellis-response-flags")
    }
}

pub async fn send(client: &Client<HttpConnector, TestBody>, req: Request<TestBody>) -> Reply {
    let resp = client.request(req).await.expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// GET `url`; the status, or why no response came.
pub async fn try_get(url: &str) -> Result<u16, String> {
    let req = Request::get(url).body(empty()).map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(5), h1_client().request(req)).await {
        Ok(Ok(r)) => Ok(r.status().as_u16()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// GET `url` with extra headers over HTTP/1.1.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&h1_client(), b.body(empty()).expect("request")).await
}

// --- backends ---

/// An HTTP/1.1 + HTTP/2 test server on 127.0.0.1, named so tests can tell backends apart.
///
/// - `/slow?ms=N`: answers after N ms (any path with `sleep_ms=N` sleeps first, too);
/// - `/status/N`: answers status N;
/// - `/flaky?every=N&status=S`: every N-th request to this backend answers S (503), the
///   others 200 with the request body's length (`received`);
/// - `/bytes?n=N`: streams N bytes;
/// - `/upload`: reads the body as it streams and reports its length;
/// - `/trailers`: a body followed by trailers;
/// - anything else: the request echoed as JSON (server, method, path, query, version, headers).
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub requests: Arc<AtomicUsize>,
    pub in_flight: Arc<AtomicUsize>,
    /// The most requests ever in flight at once.
    pub peak: Arc<AtomicUsize>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// Non-zero: every request is answered with this status (a backend failing on command).
    pub fail_with: Arc<std::sync::atomic::AtomicU16>,
    /// Milliseconds every request waits before it is handled (a backend slow on command).
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let fail_with = Arc::new(std::sync::atomic::AtomicU16::new(0));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (n, r, f, pk, conns, fw, dl) = (
            Arc::new(name.to_string()),
            requests.clone(),
            in_flight.clone(),
            peak.clone(),
            connections.clone(),
            fail_with.clone(),
            delay_ms.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let (n, r, f, pk, fw, dl) = (n.clone(), r.clone(), f.clone(), pk.clone(), fw.clone(), dl.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (n, r, f, pk, fw, dl) =
                            (n.clone(), r.clone(), f.clone(), pk.clone(), fw.clone(), dl.clone());
                        async move {
                            let delay = dl.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                                // the backend's simulated slowness (on command)
                            }
                            let nth = r.fetch_add(1, Ordering::SeqCst) + 1;
                            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                            pk.fetch_max(now, Ordering::SeqCst);
                            let resp = match fw.load(Ordering::SeqCst) {
                                0 => backend_handle(&n, req, nth).await,
                                // 1000 + N: a trailers-only gRPC status N (UNAVAILABLE is 1014).
                                code @ 1000..=1016 => {
                                    let mut r = Response::new(empty());
                                    r.headers_mut()
                                        .insert("content-type", http::HeaderValue::from_static("application/grpc"));
                                    r.headers_mut().insert("grpc-status", http::HeaderValue::from(code - 1000));
                                    r.headers_mut()
                                        .insert("grpc-message", http::HeaderValue::from_static("failing on command"));
                                    r
                                }
                                code => {
                                    let mut r = Response::new(full(format!("{n} failing with {code}")));
                                    *r.status_mut() =
                                        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                                    r
                                }
                            };
                            f.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, name: name.to_string(), requests, in_flight, peak, connections, fail_with, delay_ms, task }
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// From now on, every request waits `ms` before it is handled (0: at once).
    pub fn slow_down(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// From now on, answers every request with `status` (0: behaves again; 1000 + N: the gRPC
    /// status N, trailers-only).
    pub fn fail(&self, status: u16) {
        self.fail_with.store(status, Ordering::SeqCst);
    }
}

fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
}

async fn backend_handle(name: &str, req: Request<Incoming>, nth: usize) -> Response<TestBody> {
    let path = req.uri().path().to_string();
    if path == "/flaky" {
        // Every `every`-th request this backend receives fails with `status` (default 503);
        // the others read the body and report its length.
        let every: usize = query_param(&req, "every").and_then(|v| v.parse().ok()).unwrap_or(3);
        let status: u16 = query_param(&req, "status").and_then(|v| v.parse().ok()).unwrap_or(503);
        let received = req.into_body().collect().await.map(|c| c.to_bytes().len()).unwrap_or(0);
        let mut r = Response::new(full(format!("{{\"server\":\"{name}\",\"nth\":{nth},\"received\":{received}}}")));
        if nth.is_multiple_of(every) {
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        }
        return r;
    }
    if let Some(ms) = query_param(&req, "sleep_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await; // the backend's simulated work (?sleep_ms)
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(full(format!("status {code}")));
        *r.status_mut() =
            code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::BAD_REQUEST);
        return r;
    }
    if path == "/slow" {
        let ms: u64 = query_param(&req, "ms").and_then(|v| v.parse().ok()).unwrap_or(500);
        tokio::time::sleep(Duration::from_millis(ms)).await; // the backend's simulated work (/slow)
        return Response::new(full(format!("{{\"server\":\"{name}\",\"slept_ms\":{ms}}}")));
    }
    if path == "/bytes" {
        let n: u64 = query_param(&req, "n").and_then(|v| v.parse().ok()).unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::unfold(n, move |left| {
            let chunk = chunk.clone();
            async move {
                if left == 0 {
                    return None;
                }
                let take = left.min(chunk.len() as u64) as usize;
                Some((
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk.slice(..take))),
                    left - take as u64,
                ))
            }
        });
        return Response::new(BodyExt::boxed(StreamBody::new(stream)));
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut total: u64 = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        total += d.len() as u64;
                    }
                }
                Err(e) => return Response::new(full(format!("{{\"error\":\"{e}\"}}"))),
            }
        }
        return Response::new(full(format!("{{\"server\":\"{name}\",\"received\":{total}}}")));
    }
    if path == "/trailers" {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("abc123"));
        let frames = vec![
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from_static(b"payload"))),
            Ok(Frame::trailers(trailers)),
        ];
        return Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames))));
    }
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let version = format!("{:?}", req.version());
    let method = req.method().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body_len = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    let json = serde_json::json!({
        "server": name, "method": method, "path": path, "query": query,
        "version": version, "headers": headers, "body_len": body_len,
    });
    let mut r = Response::new(full(json.to_string()));
    r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    r.headers_mut().insert("x-backend", http::HeaderValue::from_str(name).expect("name"));
    r
}

/// A server that accepts, reads the request head and closes the connection without answering
/// (an upstream reset).
pub async fn resetting_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.set_zero_linger();
                drop(s);
            });
        }
    });
    (addr, task)
}

/// Counts answers by backend name.
pub fn tally(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n).or_insert(0) += 1;
    }
    m
}

// --- trace collector ---

/// A span as a test sees it, from either export format.
#[derive(Clone, Debug, PartialEq)]
pub struct SeenSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_id: Option<String>,
    pub name: String,
    /// "SERVER" or "CLIENT" (or "INTERNAL", ...).
    pub kind: String,
    pub service: String,
    pub attributes: BTreeMap<String, String>,
}

/// An OTLP/HTTP (`POST /v1/traces`, protobuf) and Zipkin v2 (`POST /api/v2/spans`, JSON)
/// receiver on 127.0.0.1, decoding what it gets.
pub struct Collector {
    pub addr: SocketAddr,
    pub otlp: Arc<std::sync::Mutex<Vec<SeenSpan>>>,
    pub zipkin: Arc<std::sync::Mutex<Vec<SeenSpan>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Collector {
    pub async fn start() -> Collector {
        use prost::Message;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let otlp: Arc<std::sync::Mutex<Vec<SeenSpan>>> = Arc::default();
        let zipkin: Arc<std::sync::Mutex<Vec<SeenSpan>>> = Arc::default();
        let (o, z) = (otlp.clone(), zipkin.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (o, z) = (o.clone(), z.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (o, z) = (o.clone(), z.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            if path == "/v1/traces" {
                                let msg = trellis_telemetry::otlp::ExportTraceServiceRequest::decode(body)
                                    .expect("OTLP protobuf");
                                let mut seen = o.lock().expect("lock");
                                for rs in msg.resource_spans {
                                    let service = rs
                                        .resource
                                        .iter()
                                        .flat_map(|r| r.attributes.iter())
                                        .find(|kv| kv.key == "service.name")
                                        .and_then(|kv| any_str(kv.value.as_ref()))
                                        .unwrap_or_default();
                                    for ss in rs.scope_spans {
                                        for s in ss.spans {
                                            seen.push(SeenSpan {
                                                trace_id: hex(&s.trace_id),
                                                span_id: hex(&s.span_id),
                                                parent_id: (!s.parent_span_id.is_empty())
                                                    .then(|| hex(&s.parent_span_id)),
                                                name: s.name.clone(),
                                                kind: match s.kind {
                                                    2 => "SERVER".into(),
                                                    3 => "CLIENT".into(),
                                                    1 => "INTERNAL".into(),
                                                    k => format!("KIND{k}"),
                                                },
                                                service: service.clone(),
                                                attributes: s
                                                    .attributes
                                                    .iter()
                                                    .map(|kv| {
                                                        (kv.key.clone(), any_str(kv.value.as_ref()).unwrap_or_default())
                                                    })
                                                    .collect(),
                                            });
                                        }
                                    }
                                }
                            } else if path == "/api/v2/spans" {
                                let list: Vec<serde_json::Value> = serde_json::from_slice(&body).expect("zipkin json");
                                let mut seen = z.lock().expect("lock");
                                for s in list {
                                    let str_of = |v: &serde_json::Value| v.as_str().map(String::from);
                                    seen.push(SeenSpan {
                                        trace_id: str_of(&s["traceId"]).unwrap_or_default(),
                                        span_id: str_of(&s["id"]).unwrap_or_default(),
                                        parent_id: str_of(&s["parentId"]),
                                        name: str_of(&s["name"]).unwrap_or_default(),
                                        kind: str_of(&s["kind"]).unwrap_or_default(),
                                        service: str_of(&s["localEndpoint"]["serviceName"]).unwrap_or_default(),
                                        attributes: s["tags"]
                                            .as_object()
                                            .map(|m| {
                                                m.iter()
                                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                                                    .collect()
                                            })
                                            .unwrap_or_default(),
                                    });
                                }
                            }
                            Ok::<_, Infallible>(Response::new(empty()))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector { addr, otlp, zipkin, task }
    }

    pub fn otlp_url(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    pub fn zipkin_url(&self) -> String {
        format!("http://{}/api/v2/spans", self.addr)
    }

    pub fn otlp_spans(&self) -> Vec<SeenSpan> {
        self.otlp.lock().expect("lock").clone()
    }

    pub fn zipkin_spans(&self) -> Vec<SeenSpan> {
        self.zipkin.lock().expect("lock").clone()
    }

    /// Waits until `pred` holds for the OTLP spans received so far.
    pub async fn wait_otlp(&self, what: &str, pred: impl Fn(&[SeenSpan]) -> bool) -> Vec<SeenSpan> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.otlp_spans();
            if pred(&spans) {
                return spans;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; have {} spans: {spans:#?}", spans.len());
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on the collector
        }
    }
}

fn any_str(v: Option<&trellis_telemetry::otlp::AnyValue>) -> Option<String> {
    use trellis_telemetry::otlp::any_value::Value;
    match v?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

/// Opens a config subscription as a proxy with `spec` (a ProxySpec as JSON) and `token`: Ok once
/// the control plane sends its first message, the refusal otherwise.
pub async fn subscribe(cp: &str, spec: serde_json::Value, token: &str) -> Result<(), tonic::Status> {
    use trellis_api::control::{control_client::ControlClient, proxy_message, Hello, ProxyMessage};
    let mut c = ControlClient::connect(format!("http://{cp}")).await.expect("control plane");
    let hello = Hello {
        proxy_id: format!(
            "sidecar~{}.{}",
            spec["name"].as_str().unwrap_or_default(),
            spec["namespace"].as_str().unwrap_or_default()
        ),
        spec_json: spec.to_string().into_bytes(),
        current_version: String::new(),
        token: token.to_string(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ProxyMessage { kind: Some(proxy_message::Kind::Hello(hello)) }).await.expect("send");
    let mut stream = c.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    stream.message().await.map(|_| ())
}

/// Sends raw `bytes` to 127.0.0.1:`port` and returns everything answered until the server
/// closes (bounded to 5 s): for requests a client library would normalise away.
pub async fn raw_exchange(port: u16, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP/1.1 server on `bind` (e.g. `127.0.0.2:0`, a host outside the mesh) answering every
/// request with `body`; its address.
#[allow(dead_code)]
pub async fn fixed_http_server(bind: &str, body: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(full(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}
