//! HTTP/1.1 Upgrade (WebSocket and the like) through the proxy: the request keeps its
//! `Upgrade` header (hop-by-hop, but the point of the exchange) and goes over HTTP/1.1 — also
//! between mesh sidecars, on its own mTLS connection; when the upstream answers 101, the client
//! gets the 101 and both connections become one byte tunnel until either side closes.

use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::http::{empty, Body};
use crate::upstream::InFlight;

/// An upgrade the client asked for.
pub(super) struct Upgrade {
    protocol: HeaderValue,
    client: OnUpgrade,
}

/// The upgrade an HTTP/1.1 request asks for (`Connection: upgrade` and `Upgrade`), taken out of
/// the request.
pub(super) fn request(parts: &mut http::request::Parts) -> Option<Upgrade> {
    if parts.version != Version::HTTP_11 {
        return None;
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
    Some(Upgrade { protocol, client })
}

impl Upgrade {
    /// Puts back what hop-by-hop stripping removed.
    pub(super) fn restore(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
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
