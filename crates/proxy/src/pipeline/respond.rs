//! Answers the proxy gives itself, without an upstream: `directResponse` and `redirect`.

use http::header::{self, HeaderValue};
use http::{Response, Uri};

use super::select::Selected;
use crate::http::{full, Body};

/// A `directResponse`: the status, the body as text, the route's response headers.
pub(super) fn direct(
    status: http::StatusCode,
    body: &bytes::Bytes,
    route: &crate::runtime::route::Route,
) -> Response<Body> {
    let mut resp = Response::new(full(body.clone()));
    *resp.status_mut() = status;
    if !body.is_empty() {
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    route.response_headers.apply(resp.headers_mut());
    resp
}

pub(super) fn redirect_to(rd: &trellis_config::snapshot::Redirect, uri: &Uri, sel: &Selected<'_>) -> Response<Body> {
    redirect(rd, uri, sel.scheme, &sel.host, sel.port, sel.route)
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
}
