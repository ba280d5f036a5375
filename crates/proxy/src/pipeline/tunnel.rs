//! HTTP/1.1 Upgrade (WebSocket and the like) and CONNECT through the proxy.
//!
//! An Upgrade request keeps its `Upgrade` header (hop-by-hop, but the point of the exchange) and
//! goes over HTTP/1.1 — also between mesh sidecars, on its own mTLS connection; when the upstream
//! answers 101, the client gets the 101 and both connections become one byte tunnel until either
//! side closes.
//!
//! A CONNECT request (`CONNECT host:port`) is routed by its authority like any request. Towards
//! a mesh peer it is forwarded over the mTLS connection, as Envoy forwards CONNECT upstream, and
//! a 2xx opens the tunnel; the last proxy before the destination — the inbound side, or a client
//! side whose endpoint has no sidecar — terminates it: it connects to the endpoint over TCP,
//! answers 200 and joins the two (Envoy's `connect_config`).

use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::http::{empty, Body};
use crate::upstream::InFlight;

/// An upgrade the client asked for.
pub(super) struct Upgrade {
    /// The `Upgrade` protocol; `None` for CONNECT.
    protocol: Option<HeaderValue>,
    client: OnUpgrade,
}

/// The upgrade an HTTP/1.1 request asks for (`Connection: upgrade` and `Upgrade`), taken out of
/// the request.
pub(super) fn request(parts: &mut http::request::Parts) -> Option<Upgrade> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    if parts.method == http::Method::CONNECT {
        let client = parts.extensions.remove::<OnUpgrade>()?;
        return Some(Upgrade { protocol: None, client });
    }
    let asks = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    let protocol = parts.headers.get(header::UPGRADE)?.clone();
    if !asks {
        return None;
    }
    let client = parts.extensions.remove::<OnUpgrade>()?;
    Some(Upgrade { protocol: Some(protocol), client })
}

impl Upgrade {
    /// Puts back what hop-by-hop stripping removed.
    pub(super) fn restore(&self, headers: &mut HeaderMap) {
        if let Some(p) = &self.protocol {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, p.clone());
        }
    }

    pub(super) fn is_connect(&self) -> bool {
        self.protocol.is_none()
    }

    /// Whether `resp` opens the tunnel: 101 to an Upgrade, 2xx to a CONNECT.
    pub(super) fn accepted(&self, resp: &Response<Incoming>) -> bool {
        match self.protocol {
            Some(_) => resp.status() == http::StatusCode::SWITCHING_PROTOCOLS,
            None => resp.status().is_success(),
        }
    }

    /// Terminates a CONNECT here: a TCP connection to `address`, 200 to the client, and the two
    /// joined.
    pub(super) async fn terminate(
        self,
        address: &str,
        timeout: std::time::Duration,
    ) -> Result<Response<Body>, crate::http::ProxyError> {
        use crate::http::ProxyError;
        let upstream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ProxyError::connect_failure(address, e)),
            Err(_) => return Err(ProxyError::connect_failure(address, "connect timeout")),
        };
        let _ = upstream.set_nodelay(true);
        let client = self.client;
        tokio::spawn(async move {
            let client = match client.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT: the client went away");
                    return;
                }
            };
            let (mut a, mut b) = (TokioIo::new(client), upstream);
            if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
                tracing::debug!(error = %e, "tunnel ended");
            }
        });
        Ok(Response::new(empty()))
    }

    /// The upstream switched protocols: answer the client with its 101 and join the two
    /// connections.
    pub(super) fn open(self, mut resp: Response<Incoming>, in_flight: InFlight) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut resp);
        in_flight.upgraded();
        let client = self.client;
        tokio::spawn(async move {
            let (client, upstream) = match tokio::try_join!(client, upstream) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
                tracing::debug!(error = %e, "tunnel ended");
            }
        });
        let (parts, _) = resp.into_parts();
        Response::from_parts(parts, empty())
    }
}
