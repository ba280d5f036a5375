//! Header handling on the request path: hop-by-hop stripping (RFC 9110 §7.6.1), request ids,
//! forwarded-for headers, and the compiled form of VirtualService header operations.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use trellis_config::snapshot::HeaderOps;

use crate::runtime::error::Problem;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Set by an outbound proxy that carries an HTTP/1 request to a mesh peer over HTTP/2; the
/// peer's inbound side removes it and forwards the request as the HTTP/1 it was.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-trellis-orig-proto");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers, including those the `Connection` header names. `TE: trailers`
/// survives (gRPC needs it end to end).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // The hop-by-hop headers (RFC 9110 §7.6.1 and the ones proxies have always dropped); TE is
    // last, handled apart. Most messages carry none, or only `Connection: keep-alive`: one pass
    // over the names finds which are present (cheap comparisons), so absent ones are never
    // hashed into the map.
    const HOP: [HeaderName; 9] = [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TRAILER,
        header::TE,
    ];
    let mut present = 0u16;
    for k in headers.keys() {
        if let Some(i) = HOP.iter().position(|h| h == k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Every Connection field line counts (it is a list, and may be split over several
        // lines); the names it lists go too, but TE (gRPC needs `TE: trailers` end to end) and
        // the ones removed anyway.
        let mut listed: Vec<HeaderName> = Vec::new();
        for conn in headers.get_all(header::CONNECTION) {
            let Ok(list) = conn.to_str() else { continue };
            for name in list.split(',').map(str::trim) {
                if ["te", "close", "keep-alive", "upgrade", ""].iter().any(|t| name.eq_ignore_ascii_case(t)) {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                    listed.push(n);
                }
            }
        }
        for n in listed {
            headers.remove(n);
        }
    }
    for (i, h) in HOP.iter().enumerate().take(HOP.len() - 1) {
        if present & (1 << i) != 0 {
            headers.remove(h);
        }
    }
    if present & (1 << (HOP.len() - 1)) != 0 {
        if let Some(te) = headers.get(header::TE) {
            let trailers =
                te.to_str().map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))).unwrap_or(false);
            if trailers {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
            } else {
                headers.remove(header::TE);
            }
        }
    }
}

/// Adds an `x-request-id` (a UUID v4) when the request has none.
pub fn ensure_request_id(headers: &mut HeaderMap) {
    if !headers.contains_key(X_REQUEST_ID) {
        // Random bits from a fast PRNG: a request id needs uniqueness, not unpredictability, and
        // the OS generator costs a system call per request.
        let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let s = id.hyphenated().encode_lower(&mut buf);
        if let Ok(v) = HeaderValue::from_str(s) {
            headers.insert(X_REQUEST_ID, v);
        }
    }
}

/// Gateways append the client address to `x-forwarded-for` and set `x-forwarded-proto`, as
/// an edge Envoy does.
/// `client` is the client's address as a header value ([`address_value`]), made once per
/// connection.
pub fn set_forwarded(headers: &mut HeaderMap, client: &HeaderValue, proto: &'static str) {
    let value = match headers.get(&X_FORWARDED_FOR).map(|v| v.as_bytes()) {
        Some(prev) if !prev.is_empty() => {
            let joined = [prev, b", ", client.as_bytes()].concat();
            HeaderValue::from_bytes(&joined).ok()
        }
        _ => Some(client.clone()),
    };
    if let Some(v) = value {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

/// An address as a header value.
pub fn address_value(ip: std::net::IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The request's authority: the absolute-form target's, else `Host` (HTTP/1), else
/// `:authority` (HTTP/2, in the URI). HTTP/1.1 without Host, several Hosts, or an authority
/// with userinfo or without a host (in the target or in Host) are 400s; HTTP/1.0 may have none.
pub fn request_authority(
    uri: &http::Uri,
    version: http::Version,
    headers: &HeaderMap,
) -> Result<Option<http::uri::Authority>, crate::http::ProxyError> {
    use crate::http::ProxyError;
    if let Some(a) = uri.authority() {
        // RFC 9110 §4.2.4: userinfo in a target is an error; a target needs a host.
        if a.as_str().contains('@') || a.host().is_empty() {
            return Err(ProxyError::bad_request(format!("invalid request target authority {:?}", a.as_str())));
        }
        return Ok(Some(a.clone()));
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return if version == http::Version::HTTP_11 {
            Err(ProxyError::bad_request("missing Host header"))
        } else {
            Ok(None)
        };
    };
    if hosts.next().is_some() {
        return Err(ProxyError::bad_request("more than one Host header"));
    }
    match http::uri::Authority::try_from(host.as_bytes()) {
        Ok(a) if !a.as_str().contains('@') && !a.host().is_empty() => Ok(Some(a)),
        _ => {
            Err(ProxyError::bad_request(format!("invalid Host header {:?}", String::from_utf8_lossy(host.as_bytes()))))
        }
    }
}

/// Makes `Host` the target's authority (userinfo dropped) when the target has one: RFC 9112
/// §3.2.2 says a proxy MUST ignore a received Host and generate it from an absolute-form
/// target (RFC 9113 §8.3.1: `:authority` wins too), so the upstream sees the authority the
/// request was routed by. HTTP/2 requests without Host are left alone (it stays in the URI).
pub fn host_from_target(parts: &mut http::request::Parts) {
    let Some(a) = parts.uri.authority() else { return };
    let target = a.as_str().rsplit('@').next().unwrap_or_default();
    let stale = match parts.headers.get(header::HOST) {
        Some(h) => h.as_bytes() != target.as_bytes(),
        None => parts.version < http::Version::HTTP_2,
    };
    if stale {
        if let Ok(v) = HeaderValue::from_str(target) {
            parts.headers.insert(header::HOST, v);
        }
    }
}

/// Header operations, validated once at snapshot build time.
#[derive(Clone, Debug, Default)]
pub struct HeaderRewrite {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderRewrite {
    pub fn build(ops: &HeaderOps) -> Result<Self, Problem> {
        let pair = |(k, v): &(String, String)| -> Result<(HeaderName, HeaderValue), Problem> {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| Problem::HeaderName(k.clone()))?;
            let value = HeaderValue::from_str(v).map_err(|_| Problem::HeaderValue(k.clone()))?;
            Ok((name, value))
        };
        Ok(HeaderRewrite {
            set: ops.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: ops.add.iter().map(pair).collect::<Result<_, _>>()?,
            remove: ops
                .remove
                .iter()
                .map(|k| HeaderName::from_bytes(k.as_bytes()).map_err(|_| Problem::HeaderName(k.clone())))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies set, then add, then remove (Envoy's order).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            headers.append(k.clone(), v.clone());
        }
        for k in &self.remove {
            headers.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_listed_and_keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private, te"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-private").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(h.get("x-keep").is_some());
    }

    #[test]
    fn every_connection_line_counts() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-second"));
        h.insert("x-second", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-second").is_none(), "a name listed on the second Connection line survived");
    }

    #[test]
    fn request_id_generated_once() {
        let mut h = HeaderMap::new();
        ensure_request_id(&mut h);
        let id = h.get(X_REQUEST_ID).cloned();
        assert_eq!(id.as_ref().map(|v| v.len()), Some(36));
        ensure_request_id(&mut h);
        assert_eq!(h.get(X_REQUEST_ID), id.as_ref());
    }
}
