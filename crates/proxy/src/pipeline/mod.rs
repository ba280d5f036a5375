//! The request path: one pipeline of phases every listener shares.
//!
//! ```text
//! handle ─ direction::restore_version, direction::record   (telemetry record, reporter, peer)
//!   │
//!   ├─ ratelimit  local token buckets (429 RL)                             [per side]
//!   ├─ authority check (400 DPE); CONNECT over HTTP/2 refused (400)
//!   ├─ admit      RequestAuthentication (401), AuthorizationPolicy (403)   [inbound, gateway]
//!   ├─ select     route table → virtual host → first matching route (404 NR)
//!   ├─ ratelimit  the route's own token bucket, if a per-route limit selects it (429 RL)
//!   ├─ fault      delay (DI), abort (FI) a share of requests
//!   ├─ cors       preflights answered; allowed origins' responses decorated
//!   ├─ respond    directResponse, redirect
//!   └─ forward    mirrors (copies, fire and forget; mirror); Upgrade kept, CONNECT forwarded or
//!                 terminated (tunnel); upstream request (rewrites, headers, wire protocol); tries: balance, send
//!                 under per-try timeout, retry per policy and budget (retry, replay); the
//!                 response back with its header operations — all under the route timeout
//! ```
//!
//! Each phase is a plain function over the request, dispatched statically (no boxed services
//! per request); what a phase needs from config — matchers, keys, CIDRs, retry policies,
//! budgets — was compiled once per snapshot in `runtime`. docs/ARCHITECTURE.md says why
//! phases rather than tower layers. Errors become responses in one place (`http::error`);
//! nothing here buffers a body but the bounded copy a retry may replay.

mod admit;
mod cors;
mod direction;
mod fault;
mod forward;
pub(crate) use forward::observe;
mod mirror;
pub mod ratelimit;
mod replay;
mod respond;
pub mod retry;
mod select;
mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header;
use http::{Request, Response};
use hyper::body::Incoming;

use trellis_config::snapshot::Direction;

use crate::http::{boxed, headers, Body, ProxyError};
use crate::runtime::route::Action;
use crate::runtime::Runtime;
use crate::state::Shared;
use crate::telemetry::{Recorded, RequestRecord};

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
    /// The client's TLS was terminated here (a gateway's HTTPS server).
    pub tls: bool,
    /// Where the client meant to connect, when iptables redirected it to this proxy.
    pub original_dst: Option<SocketAddr>,
    /// The peer's address as an `x-forwarded-for` value, made once per connection (gateways).
    pub forwarded_for: std::sync::OnceLock<http::HeaderValue>,
}

/// Serves one request; never fails (errors become responses). Every request is recorded once
/// (metrics, span, access log), when its response body ends or is dropped.
pub async fn handle(shared: Arc<Shared>, conn: Arc<ConnInfo>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let rt = shared.runtime();
    let wire_version = req.version();
    direction::restore_version(&conn, &mut req);
    let mut record = direction::record(&shared, &rt, &conn, &mut req, start);
    let (mut resp, flag) = match proxy(&shared, &rt, &conn, req, &mut record).await {
        // Phases may have flagged a response they let through (DI: a delay was injected).
        Ok(r) => (r, record.flags),
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

async fn proxy(
    shared: &Arc<Shared>,
    rt: &Runtime,
    conn: &ConnInfo,
    req: Request<Incoming>,
    record: &mut RequestRecord,
) -> Result<Response<Body>, ProxyError> {
    for l in rt.rate_limits.iter().filter(|l| l.applies(conn.direction)) {
        if let Some(refused) = limit(shared, l, record) {
            return Ok(refused);
        }
    }
    if req.method() == http::Method::CONNECT && req.version() != http::Version::HTTP_11 {
        return Err(ProxyError::bad_request("CONNECT is served over HTTP/1.1 only"));
    }
    let authority = headers::request_authority(req.uri(), req.version(), req.headers())?;
    let (mut parts, body) = req.into_parts();
    headers::host_from_target(&mut parts);
    if direction::admits(conn.direction) {
        admit::run(shared, rt, conn, &mut parts, authority.as_ref(), record).await?;
    }
    let sel = match select::route(rt, conn, &mut parts, authority.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            if e.status == http::StatusCode::BAD_GATEWAY {
                // Refused by REGISTRY_ONLY: reported as Istio reports it.
                record.service = Arc::new(trellis_telemetry::identity::ServiceLabels::new(
                    "BlackHoleCluster",
                    "BlackHoleCluster",
                    "",
                ));
            }
            return Err(e);
        }
    };
    record.route = Some(sel.route.name.clone());
    if let Some(refused) = sel.route.rate_limit.as_ref().and_then(|l| limit(shared, l, record)) {
        return Ok(refused);
    }
    if let Some(f) = &sel.route.fault {
        if let Some(aborted) = fault::inject(f, is_grpc(&parts.headers), shared, record).await {
            return Ok(aborted);
        }
    }
    let mut decorate = None;
    if let Some(c) = &sel.route.cors {
        match cors::decide(c, &parts.method, &parts.headers) {
            cors::Decision::Respond(r) => return Ok(r),
            cors::Decision::Decorate(origin) => decorate = Some((c, origin)),
            cors::Decision::Pass => {}
        }
    }
    let mut resp = match &sel.route.action {
        Action::Direct { status, body } => respond::direct(*status, body, sel.route),
        Action::Redirect(rd) => respond::redirect_to(rd, &parts.uri, &sel),
        Action::Forward(f) => forward::run(shared, rt, conn, &sel, f, parts, body, record).await?,
    };
    if let Some((c, origin)) = decorate {
        cors::decorate(c, origin, resp.headers_mut());
    }
    Ok(resp)
}

/// Takes a token from `l`: the 429 to answer when there is none (and the limit is enforced).
fn limit(shared: &Shared, l: &ratelimit::Limiter, record: &mut RequestRecord) -> Option<Response<Body>> {
    match l.check() {
        ratelimit::Verdict::Allow => None,
        ratelimit::Verdict::Counted => {
            count_limited(shared, l, "counted");
            None
        }
        ratelimit::Verdict::Limited(r) => {
            count_limited(shared, l, "refused");
            record.flags = "RL";
            Some(r)
        }
    }
}

fn count_limited(shared: &Shared, l: &ratelimit::Limiter, outcome: &'static str) {
    let labels = trellis_telemetry::metrics::RateLimitLabels { policy: l.policy.name.clone().into(), outcome };
    shared.metrics.rate_limited.get_or_create(&labels).inc();
}

fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}
