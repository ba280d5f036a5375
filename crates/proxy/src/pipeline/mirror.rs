//! Mirroring (VirtualService `mirror`, `mirrorPercentage`, `mirrors`), as Envoy's shadowing: a
//! share of a route's requests is copied to another cluster, its authority suffixed with
//! `-shadow`, fire and forget — the copy runs in its own task, its response is read and
//! dropped, and nothing about it (a dead, slow or failing mirror) reaches the client. A request
//! whose body cannot be copied whole (longer than the replay limit, or of unknown length) is not
//! mirrored.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body_util::BodyExt;

use trellis_telemetry::metrics::MirrorLabels;

use super::replay::MAX_REPLAY_BYTES;
use crate::balance::PickCtx;
use crate::http::Body;
use crate::runtime::route::Mirror;
use crate::state::Shared;
use crate::upstream::Wire;

/// A mirror that does not answer in this long is given up (it never delays the client).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a request with these headers can be mirrored whole: no body, or a known length
/// under the replay limit.
pub(super) fn copyable(headers: &HeaderMap, body_ended: bool) -> bool {
    body_ended
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n <= MAX_REPLAY_BYTES)
}

/// `example.com:8080` → `example.com-shadow:8080`.
pub(super) fn shadow_authority(authority: &str) -> String {
    if let Some((addr, tail)) = authority.strip_prefix('[').and_then(|r| r.split_once(']')) {
        return format!("[{addr}]-shadow{tail}");
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

/// Whether this request is copied to `m` (each request draws on its own).
pub(super) fn hit(m: &Mirror) -> bool {
    m.percent >= 100.0 || (m.percent > 0.0 && fastrand::f64() * 100.0 < m.percent)
}

/// Sends the copy in its own task.
#[allow(clippy::too_many_arguments)]
pub(super) fn send(
    shared: &std::sync::Arc<Shared>,
    m: &Mirror,
    method: &Method,
    path_and_query: &str,
    authority: &str,
    headers: &HeaderMap,
    body: Body,
    source_ip: std::net::IpAddr,
) {
    let cluster = m.cluster.clone();
    let ctx = PickCtx { headers, query: None, source_ip };
    let healthy = |i: usize| cluster.outlier.as_ref().is_none_or(|o| o.usable(i));
    let labels = |outcome| MirrorLabels { cluster_name: cluster.name.clone(), outcome };
    let Some((i, _)) = cluster.balancer.pick(&cluster.endpoints, &ctx, &healthy) else {
        shared.metrics.mirrors.get_or_create(&labels("no_endpoint")).inc();
        return;
    };
    let endpoint = cluster.endpoints[i].0.clone();
    let shadow = shadow_authority(authority);
    let wire = match cluster.protocol {
        trellis_config::snapshot::UpstreamProtocol::Http2 => Wire::Http2,
        _ => Wire::Http1,
    };
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.headers_mut() = headers.clone();
    let built = match wire {
        Wire::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            if let Ok(v) = HeaderValue::from_str(&shadow) {
                req.headers_mut().insert(header::HOST, v);
            }
            path_and_query.parse::<Uri>().map(|u| *req.uri_mut() = u).is_ok()
        }
        Wire::Http2 => {
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
            format!("http://{shadow}{path_and_query}").parse::<Uri>().map(|u| *req.uri_mut() = u).is_ok()
        }
    };
    if !built {
        shared.metrics.mirrors.get_or_create(&labels("invalid")).inc();
        return;
    }
    let connect_timeout = cluster.connect_timeout;
    let shared = shared.clone();
    tokio::spawn(async move {
        let labels = MirrorLabels { cluster_name: cluster.name.clone(), outcome: "sent" };
        shared.metrics.mirrors.get_or_create(&labels).inc();
        let mut in_flight = endpoint.start_request();
        let run = async {
            let resp = endpoint.send(req, wire, connect_timeout, &mut in_flight).await.ok()?;
            let ok = !resp.status().is_server_error();
            let _ = resp.into_body().collect().await;
            Some(ok)
        };
        let outcome = match tokio::time::timeout(MIRROR_TIMEOUT, run).await {
            Ok(Some(true)) => "answered",
            Ok(Some(false)) => "failed",
            Ok(None) => "failed",
            Err(_) => "timed_out",
        };
        shared.metrics.mirrors.get_or_create(&MirrorLabels { cluster_name: cluster.name.clone(), outcome }).inc();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_authorities() {
        assert_eq!(shadow_authority("shop.test"), "shop.test-shadow");
        assert_eq!(shadow_authority("shop.test:8080"), "shop.test-shadow:8080");
        assert_eq!(shadow_authority("[::1]:8080"), "[::1]-shadow:8080");
        assert_eq!(shadow_authority("10.0.0.1"), "10.0.0.1-shadow");
    }

    #[test]
    fn only_whole_bodies_are_copied() {
        let mut h = HeaderMap::new();
        assert!(copyable(&h, true));
        assert!(!copyable(&h, false), "unknown length");
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1024"));
        assert!(copyable(&h, false));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(MAX_REPLAY_BYTES + 1));
        assert!(!copyable(&h, false));
    }
}
