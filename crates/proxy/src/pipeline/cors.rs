//! CORS (VirtualService `corsPolicy`), as Envoy's CORS filter: a preflight (`OPTIONS` with
//! `Origin` and `Access-Control-Request-Method`) from an allowed origin is answered here with
//! the policy's headers and never reaches the upstream; one from another origin goes on to the
//! upstream (`unmatchedPreflights: FORWARD`, the default) or is answered without CORS headers
//! (`IGNORE`). Other requests from an allowed origin get `Access-Control-Allow-Origin` (and
//! credentials, exposed headers) on their response.

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode};

use crate::http::{empty, Body};
use crate::runtime::route::Cors;

/// What CORS decided for a request.
pub(super) enum Decision {
    /// Answer now (a preflight).
    Respond(Response<Body>),
    /// Forward; add these to the response (an allowed origin's actual request).
    Decorate(HeaderValue),
    /// Not a CORS request, or an origin not allowed: nothing to add.
    Pass,
}

pub(super) fn decide(cors: &Cors, method: &Method, headers: &HeaderMap) -> Decision {
    let Some(origin) = headers.get(header::ORIGIN) else { return Decision::Pass };
    let allowed = origin.to_str().is_ok_and(|o| cors.allows(o));
    let preflight = method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    match (preflight, allowed) {
        (true, true) => Decision::Respond(preflight_response(cors, origin, headers)),
        (true, false) if !cors.forward_unmatched_preflights => {
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::OK;
            Decision::Respond(r)
        }
        (false, true) => Decision::Decorate(origin.clone()),
        _ => Decision::Pass,
    }
}

fn preflight_response(cors: &Cors, origin: &HeaderValue, req: &HeaderMap) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if let Some(m) = &cors.methods {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, m.clone());
    }
    if let Some(a) = &cors.headers {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, a.clone());
    }
    if let Some(m) = &cors.max_age {
        h.insert(header::ACCESS_CONTROL_MAX_AGE, m.clone());
    }
    if cors.credentials {
        h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    if cors.private_network && req.get("access-control-request-private-network").is_some_and(|v| v == "true") {
        h.insert("access-control-allow-private-network", HeaderValue::from_static("true"));
    }
    r
}

/// The headers an allowed origin's actual request gets on its response.
pub(super) fn decorate(cors: &Cors, origin: HeaderValue, resp: &mut HeaderMap) {
    resp.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if cors.credentials {
        resp.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    if let Some(e) = &cors.expose {
        resp.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
    }
}
