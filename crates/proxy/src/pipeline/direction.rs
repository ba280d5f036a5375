//! Everything that depends on the listener's direction, in one place:
//!
//! - **gateway**: the mesh's edge. Requests come from outside: policies apply, the gateway
//!   records who sent them (`x-forwarded-for`, `x-forwarded-proto`), and reports as the client
//!   side (`reporter="source"`) of the call into the mesh.
//! - **inbound**: in front of the local workload. HTTP/1 requests that crossed the mesh on the
//!   peers' HTTP/2 connection get their version back; the peer's identity (mTLS) and metadata
//!   (`x-trellis-peer`) name the source; policies apply; `reporter="destination"`.
//! - **outbound**: the workload's egress, as an HTTP proxy or a bound local port. Policies are
//!   the server's business, not the client's; `reporter="source"`.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header;
use http::{HeaderMap, Request, Version};
use hyper::body::Incoming;

use trellis_config::snapshot::Direction;
use trellis_telemetry::identity::{unknown_identity, unknown_service};
use trellis_telemetry::metrics::Reporter;

use super::{is_grpc, ConnInfo};
use crate::http::headers;
use crate::runtime::Runtime;
use crate::state::Shared;
use crate::telemetry::{Details, RequestRecord, TraceState};

/// Inbound (or a gateway reached over mesh mTLS, ISTIO_MUTUAL): an HTTP/1 request the peer
/// proxy carried over HTTP/2 becomes HTTP/1 again.
pub(super) fn restore_version(conn: &ConnInfo, req: &mut Request<Incoming>) {
    if (conn.direction == Direction::Inbound || conn.mtls) && req.version() == Version::HTTP_2 {
        if let Some(v) = req.headers_mut().remove(headers::ORIG_PROTO) {
            *req.version_mut() = match v.as_bytes() {
                b"HTTP/1.0" => Version::HTTP_10,
                _ => Version::HTTP_11,
            };
        }
    }
}

/// Whether authentication and authorization policies apply on this side.
pub(super) fn admits(direction: Direction) -> bool {
    direction != Direction::Outbound
}

/// Whether this side reports as the client (`reporter="source"`): it names the destination
/// service and workload from the cluster it picks.
pub(super) fn client_side(direction: Direction) -> bool {
    direction != Direction::Inbound
}

/// Headers this side adds to (and takes from) every forwarded request.
pub(super) fn on_request(conn: &ConnInfo, h: &mut HeaderMap) {
    // Peer metadata is this proxy's to send (to mesh peers only): one that came with the
    // request (a client's, or a mesh peer's ending at a gateway) goes no further.
    if conn.direction != Direction::Inbound {
        h.remove(trellis_telemetry::peer::PEER_HEADER);
    }
    if conn.direction == Direction::Gateway {
        let client = conn.forwarded_for.get_or_init(|| headers::address_value(conn.peer.ip()));
        headers::set_forwarded(h, client, if conn.tls { "https" } else { "http" });
    }
}

/// The request's telemetry record, with what this side knows of source and destination.
pub(super) fn record(
    shared: &Arc<Shared>,
    rt: &Runtime,
    conn: &ConnInfo,
    req: &mut Request<Incoming>,
    start: Instant,
) -> RequestRecord {
    let protocol = if is_grpc(req.headers()) { "grpc" } else { "http" };
    let trace = TraceState::start(req.headers(), &rt.telemetry);
    let details = RequestRecord::wants_details(&trace, &rt.telemetry).then(|| {
        Box::new(Details {
            start_time: SystemTime::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: req.uri().authority().is_none().then(|| req.headers().get(header::HOST).cloned()).flatten(),
            scheme: if req.uri().scheme_str() == Some("https") { "https" } else { "http" },
            version: req.version(),
            user_agent: req.headers().get(header::USER_AGENT).cloned(),
            // Replaced by the id the request leaves with (its own, or generated) when it is sent.
            request_id: req.headers().get(headers::X_REQUEST_ID).cloned(),
            downstream: conn.peer,
        })
    });
    let me = rt.me.clone();
    match conn.direction {
        Direction::Inbound => {
            let (source, service) =
                shared.peers.take(req.headers_mut()).unwrap_or_else(|| (unknown_identity(), unknown_service()));
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
            let mut r = RequestRecord::new(
                shared.clone(),
                &rt.telemetry,
                start,
                Reporter::Source,
                me,
                unknown_identity(),
                unknown_service(),
                protocol,
                trace,
                details,
            );
            r.gateway = conn.direction == Direction::Gateway;
            r
        }
    }
}
