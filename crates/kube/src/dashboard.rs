//! `trellis dashboard --kubernetes`: the console of a control plane that runs in a cluster,
//! served on this machine through the API server's Service proxy
//! (`/api/v1/namespaces/NS/services/http:NAME:PORT/proxy/...`) with the caller's own kubeconfig
//! credentials, as `kubectl proxy` does, for one Service only.
//!
//! Why the Service proxy and not a port-forward (as `istioctl dashboard` does): a port-forward
//! streams through the kubelet of the Pod's node and needs `pods/portforward`; the Service proxy
//! needs only `get` on `services/proxy` in the control plane's namespace, works wherever the API
//! server reaches Pod IPs, and picks a ready Pod of the Service by itself.
//!
//! The API server rewrites absolute links in the HTML it proxies (`/assets/app.js` becomes
//! `/api/v1/.../proxy/assets/app.js`); requests for those come back here with the prefix, which
//! is taken off before it is put back, so both spellings reach the same file.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited};
use k8s_openapi::api::core::v1::Service;

/// The largest request body passed on (the console's own page sends none this large).
const MAX_BODY: usize = 16 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The control plane's Service whose console is served.
#[derive(Clone, Debug)]
pub struct Console {
    pub namespace: String,
    pub service: String,
    pub port: u16,
}

impl Console {
    /// The API server's path of the Service's proxy, without a trailing `/`.
    pub fn prefix(&self) -> String {
        format!("/api/v1/namespaces/{}/services/http:{}:{}/proxy", self.namespace, self.service, self.port)
    }

    /// The API server's URI for a path and query of the console (`/api/status`), or for one the
    /// API server's rewriting already prefixed.
    fn upstream(&self, path_and_query: &str) -> String {
        let prefix = self.prefix();
        let rest = match path_and_query.strip_prefix(&prefix) {
            Some(r) if r.is_empty() || r.starts_with('/') || r.starts_with('?') => r,
            _ => path_and_query,
        };
        if rest.is_empty() || rest.starts_with('?') {
            format!("{prefix}/{rest}")
        } else {
            format!("{prefix}{rest}")
        }
    }

    /// Checks, before serving, that the Service exists with the console's port and that the
    /// console answers through the API server; the error says what to do about it.
    pub async fn check(&self, client: &kube::Client) -> Result<(), String> {
        let (ns, name) = (&self.namespace, &self.service);
        let api: kube::Api<Service> = kube::Api::namespaced(client.clone(), ns);
        let svc = match api.get_opt(name).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(format!(
                    "no Service {name} in namespace {ns}: is Trellis installed there (`helm install trellis \
                     deploy/helm/trellis --namespace {ns} --create-namespace`)? --namespace and --service name \
                     another"
                ))
            }
            Err(e) => return Err(format!("cannot read Service {ns}/{name}: {}", api_error(&e))),
        };
        let ports: Vec<String> = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| match &p.name {
                Some(n) => format!("{} ({n})", p.port),
                None => p.port.to_string(),
            })
            .collect();
        if !svc.spec.iter().flat_map(|s| s.ports.iter().flatten()).any(|p| p.port == i32::from(self.port)) {
            return Err(format!(
                "Service {ns}/{name} has no port {} (it has {}): the chart's console is off (`--set \
                 console.enabled=true` turns it on), or on another port (--service-port)",
                self.port,
                if ports.is_empty() { "none".to_string() } else { ports.join(", ") }
            ));
        }
        let req = Request::get(self.upstream("/api/status"))
            .header(header::ACCEPT, "application/json")
            .body(kube::client::Body::empty())
            .map_err(|e| e.to_string())?;
        let resp = client.send(req).await.map_err(|e| format!("the API server did not answer: {}", api_error(&e)))?;
        let status = resp.status();
        let body = resp.into_body().collect_bytes().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        match status {
            s if s.is_success() => Ok(()),
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => Err(format!(
                "the API server does not let these credentials reach Service {ns}/{name}: they need `get` on \
                 `services/proxy` in namespace {ns} ({status}: {})",
                status_message(&text)
            )),
            StatusCode::SERVICE_UNAVAILABLE if text.contains("no endpoints available") => {
                Err(format!("no ready Pod behind Service {ns}/{name} (`kubectl -n {ns} get pods` shows why)"))
            }
            _ => Err(format!(
                "the console of Service {ns}/{name} did not answer through the API server ({status}: {})",
                status_message(&text)
            )),
        }
    }

    /// Serves the console on `listener` until the task is dropped: each request goes to the API
    /// server's Service proxy, with the client's credentials.
    pub async fn serve(self, client: kube::Client, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let console = std::sync::Arc::new(self);
        loop {
            let (stream, _) = listener.accept().await?;
            let (console, client) = (console.clone(), client.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (console, client) = (console.clone(), client.clone());
                    async move { Ok::<_, std::convert::Infallible>(console.forward(&client, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn forward(&self, client: &kube::Client, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return text(StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}")),
        };
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut up = Request::builder().method(parts.method.clone()).uri(self.upstream(path));
        if let Some(h) = up.headers_mut() {
            copy_headers(&parts.headers, h);
        }
        let up = match up.body(kube::client::Body::from(body)) {
            Ok(r) => r,
            Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let resp = match client.send(up).await {
            Ok(r) => r,
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("the Kubernetes API server did not answer: {}", api_error(&e)),
                )
            }
        };
        let (mut parts, body) = resp.into_parts();
        let mut headers = HeaderMap::new();
        copy_headers(&parts.headers, &mut headers);
        // A redirect the API server wrote with its prefix: the same place, here.
        if let Some(l) = headers.get(header::LOCATION).and_then(|l| l.to_str().ok()) {
            if let Some(rest) = l.strip_prefix(&self.prefix()) {
                if let Ok(v) = header::HeaderValue::from_str(if rest.is_empty() { "/" } else { rest }) {
                    headers.insert(header::LOCATION, v);
                }
            }
        }
        parts.headers = headers;
        Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed_unsync())
    }
}

/// Copies end-to-end headers (RFC 9110 §7.6.1: not `Connection` or what it names, not the
/// hop-by-hop ones, not `Host`, which the client sets for the API server).
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    let named: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    for (k, v) in from {
        let hop = matches!(
            k.as_str(),
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "host"
                | "authorization"
        );
        if !hop && !named.iter().any(|n| n == k.as_str()) {
            to.append(k.clone(), v.clone());
        }
    }
}

fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg + "\n")).map_err(|e| match e {}).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// The `message` of a Kubernetes `Status` body, else the body as it is (shortened).
fn status_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
        .unwrap_or_else(|| body.trim().chars().take(300).collect())
}

fn api_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

/// Where `trellis dashboard --kubernetes` listens: the console's port on loopback by default.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("cannot listen on {addr}: in use (a `trellis up` console?); --port 0 takes any free port")
        } else {
            format!("cannot listen on {addr}: {e}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> Console {
        Console { namespace: "trellis-system".into(), service: "trellis-control".into(), port: 15014 }
    }

    #[test]
    fn paths_go_under_the_service_proxy_once() {
        let c = console();
        let p = "/api/v1/namespaces/trellis-system/services/http:trellis-control:15014/proxy";
        assert_eq!(c.prefix(), p);
        assert_eq!(c.upstream("/"), format!("{p}/"));
        assert_eq!(c.upstream("/api/traces?service=a&limit=5"), format!("{p}/api/traces?service=a&limit=5"));
        // Links the API server rewrote come back with its prefix: not doubled.
        assert_eq!(c.upstream(&format!("{p}/assets/app.js")), format!("{p}/assets/app.js"));
        assert_eq!(c.upstream(p), format!("{p}/"));
        assert_eq!(c.upstream(&format!("{p}?x=1")), format!("{p}/?x=1"));
        // A path that only begins like the prefix is the console's own.
        assert_eq!(c.upstream(&format!("{p}x/y")), format!("{p}{p}x/y"));
    }

    #[test]
    fn only_end_to_end_headers_are_passed_on() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("host", "127.0.0.1:15014"),
            ("authorization", "Bearer someone-elses"),
            ("accept", "application/json"),
            ("content-type", "application/x-protobuf"),
        ] {
            h.append(k, header::HeaderValue::from_static(v));
        }
        let mut out = HeaderMap::new();
        copy_headers(&h, &mut out);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "content-type"]);
    }
}
