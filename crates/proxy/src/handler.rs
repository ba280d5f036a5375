//! The request pipeline every listener shares:
//!
//! 1. validate the request's authority (400 on a bad one);
//! 2. pick the route table (by listener, by the request's port, or fixed) and the virtual host;
//! 3. pick the first matching route (404 `NR` if none);
//! 4. act: direct response, redirect, or forward — pick a weighted destination, balance over
//!    its endpoints (503 `UH` if none), rewrite, apply header operations, strip hop-by-hop
//!    headers, and stream the request to the endpoint's pool under the route timeout
//!    (503 `UF`/`UR`, 504 `UT`);
//! 5. stream the response back with response header operations.
//!
//! Direction-specific steps (forwarded-for on gateways, ...) live in `gateway`, `inbound` and
//! `outbound`; error-to-response mapping lives in `http::error`. Nothing here buffers a body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;

use trellis_config::snapshot::{Direction, ListenerRouting, UpstreamProtocol};
use trellis_telemetry::metrics::Reporter;

use crate::balance::PickCtx;
use crate::http::{boxed, full, headers, Body, ProxyError};
use crate::runtime::route::{Action, RequestView};
use crate::runtime::{RouteTable, Runtime};
use crate::state::Shared;
use crate::telemetry::{Counted, Details, Recorded, RequestRecord, TraceState};
use crate::upstream::{body::Tracked, Wire};
use crate::{gateway, inbound, outbound};

/// The connection a request arrived on.
#[derive(Debug)]
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub direction: Direction,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The peer's SPIFFE id, when the connection is mesh mTLS.
    pub peer_identity: Option<Arc<str>>,
    pub mtls: bool,
    /// Where the client meant to connect, when iptables redirected it to this proxy.
    pub original_dst: Option<SocketAddr>,
}

/// Serves one request; never fails (errors become responses). Every request is recorded once
/// (metrics, span, access log), when its response body ends or is dropped.
pub async fn handle(shared: Arc<Shared>, conn: Arc<ConnInfo>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let rt = shared.runtime();
    let wire_version = req.version();
    if conn.direction == Direction::Inbound && wire_version == Version::HTTP_2 {
        if let Some(v) = req.headers_mut().remove(headers::ORIG_PROTO) {
            *req.version_mut() = match v.as_bytes() {
                b"HTTP/1.0" => Version::HTTP_10,
                _ => Version::HTTP_11,
            };
        }
    }
    let downstream_version = req.version();
    let protocol = if is_grpc(req.headers()) { "grpc" } else { "http" };
    let trace = TraceState::start(req.headers(), &rt.telemetry);
    let details = RequestRecord::wants_details(&trace, &rt.telemetry).then(|| {
        Box::new(Details {
            start_time: SystemTime::now(),
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            authority: req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| header_str(req.headers(), header::HOST))
                .unwrap_or_default(),
            scheme: if req.uri().scheme_str() == Some("https") { "https" } else { "http" },
            version: downstream_version,
            user_agent: header_str(req.headers(), header::USER_AGENT),
            request_id: header_str(req.headers(), headers::X_REQUEST_ID),
            downstream: conn.peer,
        })
    });
    let unknown = trellis_telemetry::identity::unknown_identity;
    let mut record = match conn.direction {
        Direction::Inbound => {
            let (source, service) = match shared.peers.take(req.headers_mut()) {
                Some(peer) => peer,
                None => (unknown(), trellis_telemetry::identity::unknown_service()),
            };
            let me = rt.me.clone();
            let mut r = RequestRecord::new(
                shared.clone(),
                &rt.telemetry,
                start,
                Reporter::Destination,
                source,
                me,
                service,
                protocol,
                trace,
                details,
            );
            if conn.mtls {
                r.security = "mutual_tls";
                if let Some(p) = &conn.peer_identity {
                    r.source_principal = p.clone();
                }
                r.destination_principal = rt.me.principal.clone();
            }
            r
        }
        Direction::Outbound | Direction::Gateway => {
            let service = trellis_telemetry::identity::unknown_service();
            let me = rt.me.clone();
            let mut r = RequestRecord::new(
                shared.clone(),
                &rt.telemetry,
                start,
                Reporter::Source,
                me,
                unknown(),
                service,
                protocol,
                trace,
                details,
            );
            r.gateway = conn.direction == Direction::Gateway;
            r
        }
    };
    let (mut resp, flag) = match proxy(&shared, &rt, &conn, req, &mut record).await {
        Ok(r) => (r, "-"),
        Err(e) => {
            tracing::debug!(listener = %conn.listener, flag = %e.flag, "{e}");
            let flag = e.flag.as_str();
            (e.into_response(), flag)
        }
    };
    *resp.version_mut() = wire_version;
    record.status = resp.status().as_u16();
    record.flags = flag;
    let (parts, body) = resp.into_parts();
    let body = Recorded::new(body, record, &parts.headers);
    Response::from_parts(parts, boxed(body))
}

fn header_str(h: &http::HeaderMap, name: impl http::header::AsHeaderName) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

async fn proxy(
    shared: &Shared,
    rt: &Runtime,
    conn: &ConnInfo,
    req: Request<Incoming>,
    record: &mut RequestRecord,
) -> Result<Response<Body>, ProxyError> {
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::bad_request("CONNECT tunnels are not supported yet"));
    }
    let authority = headers::request_authority(req.uri(), req.version(), req.headers())?;
    let (mut parts, body) = req.into_parts();
    headers::host_from_target(&mut parts);
    if conn.direction != Direction::Outbound {
        authenticate_and_authorize(shared, rt, conn, &mut parts, authority.as_ref(), record).await?;
    }
    let scheme = parts.uri.scheme_str().unwrap_or("http").to_string();
    let (mut host, req_port) = match &authority {
        Some(a) => (a.host().to_ascii_lowercase(), a.port_u16()),
        None => (String::new(), None),
    };
    let default_port = if scheme == "https" { 443 } else { 80 };

    // Pick the route table.
    let routing = rt.listener(&conn.listener).ok_or_else(|| ProxyError::no_route(&host, parts.uri.path()))?;
    let table: &Arc<RouteTable> = match routing {
        ListenerRouting::Table(name) => rt.table(name),
        ListenerRouting::ByRequestPort => rt.outbound_table(req_port.unwrap_or(default_port)),
        ListenerRouting::OriginalDst { ports, .. } => {
            conn.original_dst.and_then(|o| ports.get(&o.port())).and_then(|p| rt.table(&p.table))
        }
        ListenerRouting::Fixed { host: h, port } => {
            host = h.to_ascii_lowercase();
            let a = if *port == 80 { h.clone() } else { format!("{h}:{port}") };
            if let Ok(v) = HeaderValue::from_str(&a) {
                parts.headers.insert(header::HOST, v);
            }
            rt.outbound_table(*port)
        }
    }
    .ok_or_else(|| ProxyError::no_route(&host, parts.uri.path()))?;
    let host = host.trim_end_matches('.');
    let authority_str = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| authority.as_ref().map(|a| a.to_string()))
        .unwrap_or_default();

    let vhost = table.virtual_host(host).ok_or_else(|| ProxyError::no_route(host, parts.uri.path()))?;
    let view = RequestView {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        scheme: &scheme,
        authority: &authority_str,
        headers: &parts.headers,
    };
    let matched = vhost.route(&view).ok_or_else(|| ProxyError::no_route(host, parts.uri.path()))?;
    let route = matched.route;
    record.route = Some(route.name.clone());

    let forward = match &route.action {
        Action::Direct { status, body } => {
            let mut resp = Response::new(full(body.clone()));
            *resp.status_mut() = *status;
            if !body.is_empty() {
                resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            route.response_headers.apply(resp.headers_mut());
            return Ok(resp);
        }
        Action::Redirect(rd) => return Ok(redirect(rd, &parts.uri, &scheme, host, req_port, route)),
        Action::Forward(f) => f,
    };

    let dest = forward.pick();
    let cluster = &dest.cluster;
    record.cluster = Some(cluster.name.clone());
    if conn.direction != Direction::Inbound {
        record.service = cluster.service.clone();
    }
    let pick = cluster
        .balancer
        .pick(
            &cluster.endpoints,
            &PickCtx { headers: &parts.headers, query: parts.uri.query(), source_ip: conn.peer.ip() },
        )
        .ok_or_else(|| ProxyError::no_healthy_upstream(&cluster.name))?;
    let (endpoint, _) = &cluster.endpoints[pick.0];
    record.upstream = Some(endpoint.clone());
    if conn.direction != Direction::Inbound {
        if let Some(id) = cluster.identities.get(pick.0) {
            record.destination = id.clone();
            if cluster.mtls {
                record.destination_principal = id.principal.clone();
                record.source_principal = rt.me.principal.clone();
            }
        }
    }

    // Build the upstream request.
    let grpc = is_grpc(&parts.headers);
    let mut wire = match cluster.protocol {
        UpstreamProtocol::Http2 => Wire::Http2,
        UpstreamProtocol::Http1 if !grpc => Wire::Http1,
        UpstreamProtocol::Http1 => Wire::Http2,
        UpstreamProtocol::Downstream if parts.version == Version::HTTP_2 || grpc => Wire::Http2,
        UpstreamProtocol::Downstream => Wire::Http1,
    };
    // Between mesh proxies, HTTP/1 requests ride one multiplexed HTTP/2 connection per peer (no
    // TLS handshake per pooled connection); the peer restores HTTP/1 towards its application.
    // Upgrade requests (WebSocket) keep their own HTTP/1.1 connection.
    let orig_proto = (cluster.mtls && wire == Wire::Http1 && !parts.headers.contains_key(header::UPGRADE)).then(|| {
        if parts.version == Version::HTTP_10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        }
    });
    if orig_proto.is_some() {
        wire = Wire::Http2;
    }
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::ensure_request_id(&mut parts.headers);
    match conn.direction {
        Direction::Gateway => gateway::on_request(&mut parts.headers, conn),
        Direction::Inbound => inbound::on_request(&mut parts.headers, conn),
        Direction::Outbound => outbound::on_request(&mut parts.headers, conn),
    }
    let mut path_and_query = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut up_authority = authority_str.clone();
    if let Some(rw) = &forward.rewrite {
        if let Some(new) = rewrite_path(rw, matched.prefix, path_and_query.path()) {
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
        // HTTP/1.1 request needs Host (RFC 9112 §3.2).
        up_authority = if cluster.authority.is_empty() { endpoint.address.clone() } else { cluster.authority.clone() };
    }
    parts.uri = match wire {
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
            let a = up_authority;
            parts.headers.remove(header::HOST);
            Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(a.as_str())
                .path_and_query(path_and_query)
                .build()
                .map_err(|e| ProxyError::bad_request(format!("invalid authority: {e}")))?
        }
    };
    if let Some(v) = orig_proto {
        parts.headers.insert(headers::ORIG_PROTO, HeaderValue::from_static(v));
    }
    if let Some(peer) = &cluster.peer_header {
        if cluster.mesh_peers.get(pick.0).copied().unwrap_or(false) {
            parts.headers.insert(trellis_telemetry::peer::PEER_HEADER, peer.clone());
        }
    }
    record.trace.inject(&mut parts.headers, shared.telemetry.formats);
    if let Some(d) = record.details.as_mut() {
        d.request_id = header_str(&parts.headers, headers::X_REQUEST_ID);
    }
    let upstream_req = Request::from_parts(
        parts,
        boxed(Counted::new(body, record.request_bytes.clone(), record.request_messages.clone())),
    );

    let mut in_flight = endpoint.start_request();
    let send = endpoint.send(upstream_req, wire, cluster.connect_timeout, &mut in_flight);
    let resp = match route.timeout {
        Some(t) => tokio::time::timeout(t, send).await.map_err(|_| ProxyError::timeout(t))??,
        None => send.await?,
    };

    let (mut rparts, rbody) = resp.into_parts();
    headers::strip_hop_by_hop(&mut rparts.headers);
    route.response_headers.apply(&mut rparts.headers);
    dest.response_headers.apply(&mut rparts.headers);
    if let Some(cookie) = pick.1 {
        if let Ok(v) = HeaderValue::from_str(&cookie.0) {
            rparts.headers.append(header::SET_COOKIE, v);
        }
    }
    Ok(Response::from_parts(rparts, boxed(Tracked::new(rbody, in_flight))))
}

/// RequestAuthentication (401 on a bad token), then AuthorizationPolicy (403 when denied).
async fn authenticate_and_authorize(
    shared: &Shared,
    rt: &Runtime,
    conn: &ConnInfo,
    parts: &mut http::request::Parts,
    authority: Option<&Authority>,
    record: &mut RequestRecord,
) -> Result<(), ProxyError> {
    use crate::security::authz::{Attrs, Decision};
    use crate::security::jwt::Outcome;
    use trellis_telemetry::metrics::AuthzLabels;
    let verified = match rt.jwt.authenticate(parts).await {
        Outcome::NoToken => None,
        Outcome::Valid(v) => Some(v),
        Outcome::Invalid(msg) => return Err(ProxyError::jwt_denied(msg)),
    };
    record.request_principal = verified.as_ref().map(|v| v.principal.clone());
    if rt.authz.is_empty() {
        return Ok(());
    }
    let host = authority.map(|a| a.as_str()).unwrap_or("");
    let attrs = Attrs {
        principal: conn.peer_identity.as_deref().map(|p| p.trim_start_matches("spiffe://")),
        source_ip: conn.peer.ip(),
        remote_ip: conn.peer.ip(),
        request_principal: verified.as_ref().map(|v| v.principal.as_str()),
        claims: verified.as_ref().map(|v| &v.claims),
        host,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        port: conn.local.port(),
        dest_ip: conn.local.ip(),
        headers: &parts.headers,
    };
    let (decision, audit) = rt.authz.evaluate(&attrs);
    let metrics = &shared.metrics.authz_decisions;
    if let Some(a) = &audit {
        metrics.get_or_create(&AuthzLabels { decision: "audit", policy: a.clone() }).inc();
    }
    record.authz_audit = audit;
    match decision {
        Decision::Allow { policy } => {
            if let Some(p) = &policy {
                metrics.get_or_create(&AuthzLabels { decision: "allow", policy: p.clone() }).inc();
            }
            record.authz_policy = policy;
            Ok(())
        }
        Decision::Deny { policy } => {
            let p = policy.unwrap_or_else(|| Arc::from("(no ALLOW policy matched)"));
            metrics.get_or_create(&AuthzLabels { decision: "deny", policy: p.clone() }).inc();
            record.authz_policy = Some(p);
            Err(ProxyError::rbac_denied())
        }
    }
}

fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
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

fn redirect(
    rd: &trellis_config::snapshot::Redirect,
    uri: &Uri,
    scheme: &str,
    host: &str,
    req_port: Option<u16>,
    route: &crate::runtime::route::Route,
) -> Response<Body> {
    let location = redirect_location(rd, uri, scheme, host, req_port);
    let mut resp = Response::new(crate::http::empty());
    *resp.status_mut() = http::StatusCode::from_u16(rd.code).unwrap_or(http::StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    route.response_headers.apply(resp.headers_mut());
    resp
}

/// Where a redirect sends the client: Istio's `redirect` fields over the request's scheme,
/// host, port, path and query.
fn redirect_location(
    rd: &trellis_config::snapshot::Redirect,
    uri: &Uri,
    scheme: &str,
    host: &str,
    req_port: Option<u16>,
) -> String {
    let scheme_changed = rd.scheme.as_deref().is_some_and(|s| s != scheme);
    let scheme = rd.scheme.as_deref().unwrap_or(scheme);
    let (auth_host, auth_port) = match &rd.authority {
        Some(a) => match a.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse::<u16>().ok()),
            _ => (a.clone(), None),
        },
        // The request's authority as received, port included, unless the redirect moves the
        // client to another scheme (whose default port then applies), as Envoy does.
        None => (host.to_string(), if scheme_changed { None } else { req_port }),
    };
    let port = rd.port.or(auth_port).or(if rd.port_from_request { req_port } else { None });
    let default = if scheme == "https" { 443 } else { 80 };
    let port = match port {
        Some(p) if p != default => format!(":{p}"),
        _ => String::new(),
    };
    let path = rd.uri.clone().unwrap_or_else(|| uri.path().to_string());
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    format!("{scheme}://{auth_host}{port}{path}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::route::Rewrite;
    use trellis_config::snapshot::Redirect;

    fn rd(f: impl FnOnce(&mut Redirect)) -> Redirect {
        let mut r =
            Redirect { uri: None, authority: None, port: None, port_from_request: false, scheme: None, code: 301 };
        f(&mut r);
        r
    }

    #[test]
    fn redirect_locations() {
        let uri: Uri = "/old?k=v".parse().expect("uri");
        let at = |r: &Redirect, port: Option<u16>| redirect_location(r, &uri, "http", "shop.test", port);
        assert_eq!(at(&rd(|r| r.uri = Some("/new".into())), Some(8080)), "http://shop.test:8080/new?k=v");
        assert_eq!(at(&rd(|r| r.uri = Some("/new".into())), None), "http://shop.test/new?k=v");
        assert_eq!(at(&rd(|r| r.scheme = Some("https".into())), Some(8080)), "https://shop.test/old?k=v");
        assert_eq!(at(&rd(|r| r.authority = Some("other.test".into())), Some(8080)), "http://other.test/old?k=v");
        assert_eq!(at(&rd(|r| r.authority = Some("other.test:9000".into())), None), "http://other.test:9000/old?k=v");
        assert_eq!(
            at(&rd(|r| (r.authority, r.port_from_request) = (Some("o.test".into()), true)), Some(8443)),
            "http://o.test:8443/old?k=v"
        );
        assert_eq!(at(&rd(|r| r.port = Some(80)), Some(8080)), "http://shop.test/old?k=v", "default port elided");
        assert_eq!(
            at(&rd(|r| (r.scheme, r.port) = (Some("https".into()), Some(8443))), None),
            "https://shop.test:8443/old?k=v"
        );
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
