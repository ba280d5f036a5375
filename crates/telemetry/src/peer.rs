//! Peer metadata exchange: the client proxy adds one header naming itself and the service it
//! called; the server proxy reads it (and removes it before the app sees the request) to label
//! its metrics with the source. With mutual TLS the principal comes from the certificate
//! instead of the header.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::identity::{Identity, ServiceLabels};

pub const PEER_HEADER: HeaderName = HeaderName::from_static("x-trellis-peer");

/// Encodes the caller's identity and the destination service as `k=v;k=v` (percent-escaped).
pub fn encode(me: &Identity, service: &ServiceLabels) -> Option<HeaderValue> {
    let fields = [
        ("w", &*me.workload),
        ("n", &*me.namespace),
        ("a", &*me.app),
        ("v", &*me.version),
        ("cs", &*me.canonical_service),
        ("cr", &*me.canonical_revision),
        ("sh", &*service.host),
        ("sn", &*service.name),
        ("sns", &*service.namespace),
    ];
    let mut out = String::with_capacity(160);
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        out.push_str(k);
        out.push('=');
        escape(v, &mut out);
    }
    HeaderValue::from_str(&out).ok()
}

/// Removes the peer header and decodes it: `(source identity, destination service)`.
pub fn take(headers: &mut HeaderMap) -> Option<(Identity, ServiceLabels)> {
    let v = headers.remove(PEER_HEADER)?;
    let s = v.to_str().ok()?;
    let mut id = Identity::unknown();
    let mut svc = ServiceLabels::unknown();
    for pair in s.split(';') {
        let (k, v) = pair.split_once('=')?;
        let v: std::sync::Arc<str> = std::sync::Arc::from(unescape(v)?);
        match k {
            "w" => id.workload = v,
            "n" => id.namespace = v,
            "a" => id.app = v,
            "v" => id.version = v,
            "cs" => id.canonical_service = v,
            "cr" => id.canonical_revision = v,
            "sh" => svc.host = v,
            "sn" => svc.name = v,
            "sns" => svc.namespace = v,
            _ => {}
        }
    }
    Some((id, svc))
}

fn escape(v: &str, out: &mut String) {
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._/:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

fn unescape(v: &str) -> Option<String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_header() {
        let labels = [("app".to_string(), "reviews".to_string()), ("version".to_string(), "v2;x=y".to_string())]
            .into_iter()
            .collect();
        let me = Identity::new("reviews-v2", "bookinfo", &labels, None);
        let svc = ServiceLabels::new("ratings.bookinfo.svc.cluster.local", "ratings", "bookinfo");
        let mut h = HeaderMap::new();
        h.insert(PEER_HEADER, encode(&me, &svc).expect("encodes"));
        let (id, s) = take(&mut h).expect("decodes");
        assert_eq!(id.workload.as_ref(), "reviews-v2");
        assert_eq!(id.version.as_ref(), "v2;x=y");
        assert_eq!(s, svc);
        assert!(h.get(PEER_HEADER).is_none(), "the header is removed");
    }
}
