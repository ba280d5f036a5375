//! Fault injection (VirtualService `fault`), as Envoy's fault filter: a share of the route's
//! requests waits `fixedDelay` before going on (flag `DI`), a share is answered at once with
//! an HTTP status or, for gRPC, a trailers-only gRPC status (flag `FI`); nothing is sent
//! upstream for an aborted request. Shares are drawn per request.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use trellis_config::snapshot::{AbortStatus, Fault};
use trellis_telemetry::metrics::FaultLabels;

use crate::http::error::FLAGS_HEADER;
use crate::http::{empty, full, Body};
use crate::state::Shared;
use crate::telemetry::RequestRecord;

/// Applies the route's faults: `Some(response)` when the request is aborted.
pub(super) async fn inject(
    fault: &Fault,
    grpc: bool,
    shared: &Shared,
    record: &mut RequestRecord,
) -> Option<Response<Body>> {
    let route = record.route.clone().unwrap_or_else(|| "-".into());
    let mut delayed = false;
    if let Some(d) = fault.delay.as_ref().filter(|d| hit(d.percent)) {
        shared.metrics.faults.get_or_create(&FaultLabels { route: route.clone(), kind: "delay" }).inc();
        tokio::time::sleep(d.delay.0).await;
        record.flags = "DI";
        delayed = true;
    }
    let a = fault.abort.as_ref().filter(|a| hit(a.percent))?;
    shared.metrics.faults.get_or_create(&FaultLabels { route, kind: "abort" }).inc();
    let flags = if delayed { "DI,FI" } else { "FI" };
    record.flags = flags;
    Some(abort(a.status, grpc, flags))
}

fn hit(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

fn abort(status: AbortStatus, grpc: bool, flags: &'static str) -> Response<Body> {
    let mut resp = match status {
        AbortStatus::Grpc(code) if grpc => {
            let mut r = Response::new(empty());
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert("grpc-message", HeaderValue::from_static("fault filter abort"));
            r
        }
        // A gRPC status asked of a plain HTTP request: the HTTP status gRPC maps it from.
        AbortStatus::Grpc(code) => with_status(grpc_to_http(code)),
        AbortStatus::Http(code) => with_status(StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)),
    };
    resp.headers_mut().insert(FLAGS_HEADER, HeaderValue::from_static(flags));
    resp
}

fn with_status(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(full("fault filter abort"));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The HTTP status for a gRPC code (gRPC's HTTP mapping, reversed as Envoy does).
fn grpc_to_http(code: u32) -> StatusCode {
    match code {
        0 => StatusCode::OK,
        3 | 9 | 11 => StatusCode::BAD_REQUEST,
        16 => StatusCode::UNAUTHORIZED,
        7 => StatusCode::FORBIDDEN,
        5 => StatusCode::NOT_FOUND,
        6 | 10 => StatusCode::CONFLICT,
        8 => StatusCode::TOO_MANY_REQUESTS,
        1 => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        12 => StatusCode::NOT_IMPLEMENTED,
        14 => StatusCode::SERVICE_UNAVAILABLE,
        4 => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares() {
        assert!(hit(100.0));
        assert!(!hit(0.0));
        let n = (0..20_000).filter(|_| hit(25.0)).count();
        assert!((4_500..5_500).contains(&n), "{n} of 20000 at 25%");
    }

    #[test]
    fn aborts() {
        let r = abort(AbortStatus::Http(503), false, "FI");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[FLAGS_HEADER], "FI");
        let g = abort(AbortStatus::Grpc(14), true, "FI");
        assert_eq!((g.status(), &g.headers()["grpc-status"]), (StatusCode::OK, &HeaderValue::from_static("14")));
        assert_eq!(abort(AbortStatus::Grpc(14), false, "FI").status(), 503);
    }
}
