//! Forwarding: the upstream request (rewrites, header operations, hop-by-hop headers, the wire
//! protocol), then tries — balance, send under the per-try timeout, and retry as the route's
//! policy and the cluster's budget allow — all under the route's timeout (or the client's
//! shorter `grpc-timeout`); the response back with its header operations.

use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use hyper::body::Incoming;

use trellis_config::snapshot::{RetryPolicy, UpstreamProtocol};
use trellis_telemetry::metrics::{EjectionLabels, OverflowLabels, RetryLabels};

use super::mirror;
use super::replay::ReplayBody;
use super::retry::{self, Outcome};
use super::select::Selected;
use super::tunnel;
use super::{direction, is_grpc, ConnInfo};
use crate::balance::{outlier, PickCtx};
use crate::http::{boxed, headers, Body, Flag, ProxyError};
use crate::runtime::route::Forward;
use crate::runtime::{Cluster, Runtime};
use crate::state::Shared;
use crate::telemetry::{Counted, RequestRecord};
use crate::upstream::{body::Tracked, SendError, Wire};

#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    shared: &std::sync::Arc<Shared>,
    rt: &Runtime,
    conn: &ConnInfo,
    sel: &Selected<'_>,
    forward: &Forward,
    mut parts: http::request::Parts,
    body: Incoming,
    record: &mut RequestRecord,
) -> Result<Response<Body>, ProxyError> {
    let route = sel.route;
    let dest = forward.pick();
    let cluster = &dest.cluster;
    record.cluster = Some(cluster.name.clone());
    if direction::client_side(conn.direction) {
        record.service = cluster.service.clone();
    }
    let grpc = is_grpc(&parts.headers);
    let deadline = deadline(route.timeout, &parts.headers, grpc);
    // An HTTP/1.1 Upgrade (WebSocket): the Upgrade header survives stripping, the request goes
    // over HTTP/1.1, and a 101 turns both connections into a tunnel.
    let upgrade = tunnel::request(&mut parts);

    // The upstream request, but for what depends on the endpoint.
    let (wire, orig_proto) = match upgrade {
        Some(_) => (Wire::Http1, None),
        None => wire(cluster, &parts, grpc),
    };
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = &upgrade {
        u.restore(&mut parts.headers);
    }
    headers::ensure_request_id(&mut parts.headers);
    direction::on_request(conn, &mut parts.headers);
    let mut path_and_query = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut up_authority = sel.authority.clone();
    if let Some(rw) = &forward.rewrite {
        if let Some(new) = rewrite_path(rw, sel.prefix, path_and_query.path()) {
            let pq = match path_and_query.query() {
                Some(q) => format!("{new}?{q}"),
                None => new,
            };
            path_and_query = PathAndQuery::try_from(pq)
                .map_err(|e| ProxyError::bad_request(format!("rewritten path is invalid: {e}")))?;
        }
        if let Some(a) = &rw.authority {
            up_authority = a.to_str().unwrap_or_default().to_string();
            parts.headers.insert(header::HOST, a.clone());
        }
    }
    route.request_headers.apply(&mut parts.headers);
    dest.request_headers.apply(&mut parts.headers);
    if up_authority.is_empty() {
        // No authority from the client (HTTP/1.0 without Host): the destination's, since an
        // HTTP/1.1 request needs Host (RFC 9112 §3.2). Inbound clusters have one endpoint.
        up_authority = match cluster.endpoints.first() {
            Some((ep, _)) if cluster.authority.is_empty() => ep.address.clone(),
            _ => cluster.authority.clone(),
        };
    }
    parts.uri = match wire {
        // CONNECT keeps its authority-form target.
        Wire::Http1 if upgrade.as_ref().is_some_and(|u| u.is_connect()) => Uri::builder()
            .authority(up_authority.as_str())
            .build()
            .map_err(|e| ProxyError::bad_request(format!("invalid CONNECT authority: {e}")))?,
        Wire::Http1 => {
            if !parts.headers.contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::from_str(&up_authority) {
                    parts.headers.insert(header::HOST, v);
                }
            }
            parts.version = Version::HTTP_11;
            Uri::from(path_and_query)
        }
        Wire::Http2 => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(up_authority.as_str())
                .path_and_query(path_and_query)
                .build()
                .map_err(|e| ProxyError::bad_request(format!("invalid authority: {e}")))?
        }
    };
    if let Some(d) = record.details.as_mut() {
        d.request_id = parts.headers.get(headers::X_REQUEST_ID).cloned();
    }

    // Tries. A request whose body may have reached the upstream is sent again only when the
    // route's policy allows its method and the body was kept (see `replay`); one that was never
    // written (connection refused, stream refused) may always go again.
    let body = boxed(Counted::new(body, record.request_bytes.clone(), record.request_messages.clone()));
    let policy = route.retry.as_ref();
    let hints = policy.map(|p| retry::Hints::of(p, &parts.headers, grpc));
    let resend = upgrade.is_none() && policy.is_some_and(|p| p.any_method || retry::idempotent(&parts.method));
    // What a retry rebuilds the request from: taken before the per-try headers (trace context,
    // the HTTP/1 version over the mesh), which are generated values that would each cost an
    // allocation to copy; a retry adds them again.
    let template = resend.then(|| Template::of(&parts));
    let per_try_headers = |h: &mut HeaderMap, trace: &crate::telemetry::TraceState| {
        if let Some(v) = orig_proto {
            h.insert(headers::ORIG_PROTO, HeaderValue::from_static(v));
        }
        trace.inject(h, shared.telemetry.formats);
    };
    per_try_headers(&mut parts.headers, &record.trace);
    // Mirrors this request is copied to (each draws on its own), if it can be copied whole.
    let ended = http_body::Body::is_end_stream(&body);
    let mirrors: Vec<&crate::runtime::route::Mirror> = if route.mirrors.is_empty() || upgrade.is_some() {
        Vec::new()
    } else {
        route.mirrors.iter().filter(|m| mirror::hit(m)).filter(|_| mirror::copyable(&parts.headers, ended)).collect()
    };
    // A request without a body (most GETs) is replayed as an empty body, with no copy kept.
    let (replay, body) = if (resend || !mirrors.is_empty()) && !ended {
        let r = ReplayBody::new(body);
        (Some(Replay::Body(r.replay())), boxed(r))
    } else if resend || !mirrors.is_empty() {
        (Some(Replay::Empty), body)
    } else {
        (None, body)
    };
    for m in mirrors {
        let copy = match &replay {
            Some(Replay::Body(Some(r))) => r.replay().map(boxed),
            _ => Some(crate::http::empty()),
        };
        if let Some(copy) = copy {
            let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            mirror::send(shared, m, &parts.method, pq, &up_authority, &parts.headers, copy, conn.peer.ip());
        }
    }
    let replay = if resend { replay } else { None };
    // `http2MaxRequests`: requests in flight to the service.
    if cluster.pool.max_requests.is_some_and(|m| cluster.budget.in_flight() >= m as usize) {
        return Err(overflow(shared, cluster, "requests"));
    }
    let _counted = cluster.budget.request();
    let mut _retry_slot = None;
    let mut tried: Vec<usize> = Vec::new();
    let mut req = Request::from_parts(parts, body);
    let mut retries = 0u32;
    // Passthrough (ALLOW_ANY): the one endpoint is where the request was going.
    let passthrough = cluster.passthrough.then(|| {
        let target = match conn.original_dst {
            Some(o) => o.to_string(),
            None => format!("{}:{}", sel.host, sel.port.unwrap_or(if sel.scheme == "https" { 443 } else { 80 })),
        };
        shared.pools.endpoint(&target)
    });
    loop {
        let pick = match &passthrough {
            Some(_) => (usize::MAX, None),
            None => pick(cluster, &req, conn, &tried, policy)?,
        };
        let endpoint = match &passthrough {
            Some(ep) => ep,
            None => &cluster.endpoints[pick.0].0,
        };
        record.upstream = Some(endpoint.clone());
        if direction::client_side(conn.direction) {
            if let Some(id) = cluster.identities.get(pick.0) {
                record.destination = id.clone();
                if cluster.mtls {
                    record.destination_principal = id.principal.clone();
                    record.source_principal = rt.me.principal.clone();
                }
            }
        }
        if let Some(peer) = &cluster.peer_header {
            if cluster.mesh_peers.get(pick.0).copied().unwrap_or(false) {
                req.headers_mut().insert(trellis_telemetry::peer::PEER_HEADER, peer.clone());
            } else if retries > 0 {
                // A request that came back unsent may carry it from a try to a mesh peer.
                req.headers_mut().remove(trellis_telemetry::peer::PEER_HEADER);
            }
        }
        record.attempts = retries + 1;
        // A CONNECT ends here when no mesh peer is ahead to end it.
        let peer_ahead =
            direction::client_side(conn.direction) && cluster.mesh_peers.get(pick.0).copied().unwrap_or(false);
        if upgrade.as_ref().is_some_and(|u| u.is_connect()) && !peer_ahead {
            let u = upgrade.expect("a CONNECT");
            let r = u.terminate(&endpoint.address, cluster.connect_timeout).await;
            let outcome = match &r {
                Ok(_) => outlier::Result::Status(200),
                Err(_) => outlier::Result::LocalFailure,
            };
            observe(shared, cluster, pick.0, outcome);
            return r;
        }
        let mut in_flight = endpoint.start_request();
        let tried_at = Instant::now();
        let send = endpoint.send(req, wire, cluster.connect_timeout, &mut in_flight);
        let per_try = policy.and_then(|p| p.per_try_timeout.map(|t| t.0));
        let limit = match (per_try, deadline) {
            (Some(t), Some((at, _))) => Some(t.min(at.saturating_duration_since(Instant::now()))),
            (t, d) => t.or(d.map(|(at, _)| at.saturating_duration_since(Instant::now()))),
        };
        let result = match limit {
            Some(t) => match tokio::time::timeout(t, send).await {
                Ok(r) => Tried::Done(r),
                Err(_) if deadline.is_some_and(|(at, _)| Instant::now() >= at) => {
                    observe(shared, cluster, pick.0, outlier::Result::LocalFailure);
                    return Err(ProxyError::timeout(deadline.map(|(_, t)| t).unwrap_or(t)));
                }
                Err(_) => Tried::PerTryTimeout,
            },
            None => Tried::Done(send.await),
        };
        if let Tried::Done(Err(e)) = &result {
            if e.error.flag == Flag::UpstreamOverflow {
                shared.metrics.overflows.get_or_create(&overflow_labels(cluster, "pending_requests")).inc();
            }
        }
        if matches!(cluster.balancer, crate::balance::Balancer::PeakEwma) {
            endpoint.observe_latency(tried_at.elapsed());
        }
        match &result {
            Tried::Done(Ok(resp)) => observe(shared, cluster, pick.0, outlier::Result::Status(resp.status().as_u16())),
            Tried::Done(Err(e)) if matches!(e.error.flag, Flag::UpstreamConnectFailure | Flag::UpstreamReset) => {
                observe(shared, cluster, pick.0, outlier::Result::LocalFailure)
            }
            Tried::PerTryTimeout => observe(shared, cluster, pick.0, outlier::Result::LocalFailure),
            Tried::Done(Err(_)) => {}
        }
        // Does this outcome ask for another try, and may the request go again?
        let asked = policy.zip(hints.as_ref()).and_then(|(p, hints)| {
            let outcome = match &result {
                Tried::Done(Ok(resp)) => Outcome::Response { status: resp.status(), headers: resp.headers() },
                Tried::Done(Err(e)) => Outcome::Error(&e.error),
                Tried::PerTryTimeout => Outcome::PerTryTimeout,
            };
            (retries < p.attempts).then(|| retry::reason(p, hints, &outcome)).flatten().map(|r| (p, r))
        });
        let next = asked.and_then(|(p, reason)| {
            let returned = matches!(&result, Tried::Done(Err(SendError { request: Some(_), .. })));
            let body = if returned {
                None
            } else {
                match replay.as_ref()? {
                    Replay::Empty => Some(crate::http::empty()),
                    Replay::Body(r) => Some(boxed(r.as_ref()?.replay()?)),
                }
            };
            Some((p, reason, body))
        });
        let Some((p, reason, body)) = next else {
            return match result {
                Tried::Done(Ok(resp)) if upgrade.as_ref().is_some_and(|u| u.accepted(&resp)) => {
                    Ok(upgrade.expect("an upgrade").open(resp, in_flight))
                }
                Tried::Done(Ok(resp)) if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                    Err(ProxyError::reset(&cluster.name, "101 to a request that asked for no upgrade"))
                }
                Tried::Done(Ok(resp)) => Ok(respond(resp, route, dest, pick.1, in_flight)),
                Tried::Done(Err(e)) => Err(e.error),
                Tried::PerTryTimeout => Err(ProxyError::timeout(per_try.unwrap_or_default())),
            };
        };
        // Back off (jittered), then take a place in the budget: it counts retries on their way
        // to the upstream, so a burst of failures cannot multiply the upstream's load.
        let pause = retry::backoff(p.backoff.0, retries + 1);
        match deadline {
            Some((at, t)) if Instant::now() + pause >= at => return Err(ProxyError::timeout(t)),
            _ => tokio::time::sleep(pause).await,
        }
        let labels = |outcome| RetryLabels { cluster_name: cluster.name.clone(), outcome, reason };
        let Some(slot) = cluster.budget.retry(cluster.pool.max_retries) else {
            shared.metrics.retries.get_or_create(&labels("budget_exhausted")).inc();
            return match result {
                Tried::Done(Ok(resp)) => Ok(respond(resp, route, dest, pick.1, in_flight)),
                Tried::Done(Err(e)) => Err(e.error),
                Tried::PerTryTimeout => Err(ProxyError::timeout(per_try.unwrap_or_default())),
            };
        };
        shared.metrics.retries.get_or_create(&labels("sent")).inc();
        _retry_slot = Some(slot);
        retries += 1;
        tried.push(pick.0);
        req = match (result, body, template.as_ref()) {
            (Tried::Done(Err(SendError { request: Some(r), .. })), _, _) => r,
            (_, Some(b), Some(tpl)) => {
                let mut r = tpl.request(b);
                per_try_headers(r.headers_mut(), &record.trace);
                r
            }
            _ => unreachable!("a retry has a request to send"),
        };
        drop(in_flight);
    }
}

/// How a retry gets the request body again.
enum Replay {
    /// The request had no body.
    Empty,
    /// The copy kept while the body streamed (`None`: it could not be kept).
    Body(Option<ReplayBody>),
}

enum Tried {
    Done(Result<Response<Incoming>, SendError>),
    PerTryTimeout,
}

/// What a retry needs to build the request again.
struct Template {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Template {
    fn of(parts: &http::request::Parts) -> Template {
        Template {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    fn request(&self, body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// The endpoint for this try, among those outlier detection has not ejected; a retry prefers
/// one not tried yet when the policy says so.
fn pick(
    cluster: &Cluster,
    req: &Request<Body>,
    conn: &ConnInfo,
    tried: &[usize],
    policy: Option<&RetryPolicy>,
) -> Result<(usize, Option<crate::balance::NewCookie>), ProxyError> {
    let ctx = PickCtx { headers: req.headers(), query: req.uri().query(), source_ip: conn.peer.ip() };
    let healthy = |i: usize| cluster.outlier.as_ref().is_none_or(|o| o.usable(i));
    let avoid = policy.is_some_and(|p| p.other_hosts) && !tried.is_empty();
    let fresh = if avoid {
        cluster.balancer.pick(&cluster.endpoints, &ctx, &|i| healthy(i) && !tried.contains(&i))
    } else {
        None
    };
    fresh
        .or_else(|| cluster.balancer.pick(&cluster.endpoints, &ctx, &healthy))
        .ok_or_else(|| ProxyError::no_healthy_upstream(&cluster.name))
}

/// A connection-pool limit of the cluster refused the request: 503 `UO`, counted.
fn overflow(shared: &Shared, cluster: &Cluster, limit: &'static str) -> ProxyError {
    shared.metrics.overflows.get_or_create(&overflow_labels(cluster, limit)).inc();
    ProxyError::overflow(&cluster.name, limit)
}

fn overflow_labels(cluster: &Cluster, limit: &'static str) -> OverflowLabels {
    OverflowLabels { cluster_name: cluster.name.clone(), limit }
}

/// Counts a try's outcome for outlier detection (and the ejection it causes).
pub(crate) fn observe(shared: &Shared, cluster: &Cluster, i: usize, result: outlier::Result) {
    let Some(o) = &cluster.outlier else { return };
    if let Some(reason) = o.record(i, result) {
        tracing::info!(cluster = %cluster.name, endpoint = %cluster.endpoints[i].0.address, reason, "endpoint ejected");
        shared.metrics.ejections.get_or_create(&EjectionLabels { cluster_name: cluster.name.clone(), reason }).inc();
    }
}

/// The wire protocol to the cluster, and the HTTP/1 version to restore when an HTTP/1 request
/// rides the mesh peers' HTTP/2 connection.
fn wire(cluster: &Cluster, parts: &http::request::Parts, grpc: bool) -> (Wire, Option<&'static str>) {
    let wire = match cluster.protocol {
        UpstreamProtocol::Http2 => Wire::Http2,
        UpstreamProtocol::Http1 if !grpc => Wire::Http1,
        UpstreamProtocol::Http1 => Wire::Http2,
        UpstreamProtocol::Downstream | UpstreamProtocol::Tcp if parts.version == Version::HTTP_2 || grpc => Wire::Http2,
        UpstreamProtocol::Downstream | UpstreamProtocol::Tcp => Wire::Http1,
    };
    // Between mesh proxies, HTTP/1 requests ride one multiplexed HTTP/2 connection per peer (no
    // TLS handshake per pooled connection); the peer restores HTTP/1 towards its application.
    // Upgrade requests (WebSocket) keep their own HTTP/1.1 connection.
    let orig = (cluster.mtls && wire == Wire::Http1 && !parts.headers.contains_key(header::UPGRADE))
        .then_some(if parts.version == Version::HTTP_10 { "HTTP/1.0" } else { "HTTP/1.1" });
    match orig {
        Some(v) => (Wire::Http2, Some(v)),
        None => (wire, None),
    }
}

/// When the request must be answered by: the route's timeout, or a gRPC client's shorter
/// `grpc-timeout` (as Istio sets Envoy's `max_grpc_timeout` to the route timeout).
fn deadline(route: Option<Duration>, headers: &HeaderMap, grpc: bool) -> Option<(Instant, Duration)> {
    let client =
        grpc.then(|| headers.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(grpc_timeout)).flatten();
    let t = match (route, client) {
        (Some(r), Some(c)) => r.min(c),
        (r, c) => r.or(c)?,
    };
    Some((Instant::now() + t, t))
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The response on its way back: hop-by-hop headers out, the route's and destination's header
/// operations, a consistent-hash cookie when one was minted.
fn respond(
    resp: Response<Incoming>,
    route: &crate::runtime::route::Route,
    dest: &crate::runtime::route::Destination,
    cookie: Option<crate::balance::NewCookie>,
    in_flight: crate::upstream::InFlight,
) -> Response<Body> {
    let (mut rparts, rbody) = resp.into_parts();
    headers::strip_hop_by_hop(&mut rparts.headers);
    route.response_headers.apply(&mut rparts.headers);
    dest.response_headers.apply(&mut rparts.headers);
    if let Some(cookie) = cookie {
        if let Ok(v) = HeaderValue::from_str(&cookie.0) {
            rparts.headers.append(header::SET_COOKIE, v);
        }
    }
    Response::from_parts(rparts, boxed(Tracked::new(rbody, in_flight)))
}

/// Istio's `rewrite.uri` replaces the matched prefix (or the whole path when the match was
/// not a prefix); `uriRegexRewrite` substitutes every match in the path.
fn rewrite_path(rw: &crate::runtime::route::Rewrite, matched_prefix: Option<&str>, path: &str) -> Option<String> {
    if let Some(uri) = &rw.uri {
        return Some(match matched_prefix {
            Some(p) if path.len() >= p.len() => {
                let rest = &path[p.len()..];
                if uri.ends_with('/') && rest.starts_with('/') {
                    format!("{uri}{}", &rest[1..])
                } else {
                    format!("{uri}{rest}")
                }
            }
            _ => uri.clone(),
        });
    }
    rw.uri_regex.as_ref().map(|(re, rep)| re.replace_all(path, rep.as_str()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::route::Rewrite;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("5"), None);
        assert_eq!(grpc_timeout("123456789S"), None, "at most 8 digits");
        assert_eq!(grpc_timeout("10x"), None);
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_static("50m"));
        let (_, t) = deadline(Some(Duration::from_secs(1)), &h, true).expect("deadline");
        assert_eq!(t, Duration::from_millis(50), "the client's shorter deadline");
        let (_, t) = deadline(Some(Duration::from_millis(20)), &h, true).expect("deadline");
        assert_eq!(t, Duration::from_millis(20), "capped by the route's");
        assert!(deadline(None, &h, false).is_none(), "grpc-timeout is read on gRPC requests only");
    }

    #[test]
    fn rewrites_replace_the_matched_prefix_or_the_whole_path() {
        let rw = |uri: &str| Rewrite { uri: Some(uri.into()), authority: None, uri_regex: None };
        assert_eq!(rewrite_path(&rw("/v2"), Some("/v1"), "/v1/items").as_deref(), Some("/v2/items"));
        assert_eq!(rewrite_path(&rw("/"), Some("/api/"), "/api/items").as_deref(), Some("/items"));
        assert_eq!(rewrite_path(&rw("/v2/"), Some("/v1"), "/v1/items").as_deref(), Some("/v2/items"));
        assert_eq!(
            rewrite_path(&rw("/health"), None, "/status").as_deref(),
            Some("/health"),
            "exact match: whole path"
        );
        let re = Rewrite {
            uri: None,
            authority: None,
            uri_regex: Some((regex::Regex::new("^/service/([^/]+)(/.*)$").expect("re"), "${2}/instance/${1}".into())),
        };
        assert_eq!(rewrite_path(&re, None, "/service/foo/v1/api").as_deref(), Some("/v1/api/instance/foo"));
        let none = Rewrite { uri: None, authority: None, uri_regex: None };
        assert_eq!(rewrite_path(&none, Some("/"), "/x"), None);
    }
}
