//! Distributed tracing: reading and writing trace context (W3C `traceparent`/`tracestate`, B3
//! multi-header and single `b3`, AWS X-Ray `x-amzn-trace-id`), sampling decisions, and the spans
//! a proxy records. Exporting lives in `export`.

use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue};

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
const XRAY: HeaderName = HeaderName::from_static("x-amzn-trace-id");

/// Which context formats a proxy writes (it always reads all of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Formats {
    pub w3c: bool,
    pub b3: bool,
    pub b3_single: bool,
    pub xray: bool,
}

impl Default for Formats {
    /// W3C and B3 multi-header, Istio's defaults.
    fn default() -> Self {
        Formats { w3c: true, b3: true, b3_single: false, xray: false }
    }
}

impl Formats {
    /// Parses `w3c,b3,b3-single,xray`.
    pub fn parse(s: &str) -> Result<Formats, String> {
        let mut f = Formats { w3c: false, b3: false, b3_single: false, xray: false };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "w3c" | "tracecontext" => f.w3c = true,
                "b3" | "b3multi" => f.b3 = true,
                "b3-single" | "b3single" => f.b3_single = true,
                "xray" | "x-ray" => f.xray = true,
                other => return Err(format!("unknown trace format {other:?}: use w3c, b3, b3-single or xray")),
            }
        }
        Ok(f)
    }
}

/// Context read from a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Incoming {
    /// The trace and the caller's span, when the request carries them.
    pub parent: Option<(TraceId, SpanId)>,
    /// The caller's sampling decision, if it made one.
    pub sampled: Option<bool>,
    pub tracestate: Option<HeaderValue>,
}

fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    // 64-bit B3 trace ids are left-padded to 128 bits.
    let padded;
    let s = if s.len() < N * 2 && s.len() == N {
        padded = format!("{:0>width$}", s, width = N * 2);
        padded.as_str()
    } else {
        s
    };
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    (out != [0u8; N]).then_some(out)
}

/// Bytes as lower-case hex, written where they are displayed (no `String` of their own).
pub struct Hex<'a>(pub &'a [u8]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const D: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 64];
        let n = self.0.len().min(32);
        for (i, b) in self.0[..n].iter().enumerate() {
            buf[2 * i] = D[(b >> 4) as usize];
            buf[2 * i + 1] = D[(b & 15) as usize];
        }
        f.write_str(std::str::from_utf8(&buf[..2 * n]).map_err(|_| std::fmt::Error)?)
    }
}

fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

pub fn trace_hex(t: &TraceId) -> String {
    hex(t)
}

pub fn span_hex(s: &SpanId) -> String {
    hex(s)
}

/// A trace id from its hex form (as in `traceparent`; a 64-bit B3 id is left-padded).
pub fn parse_trace_hex(s: &str) -> Option<TraceId> {
    hex_to(s)
}

/// A span id from its hex form.
pub fn parse_span_hex(s: &str) -> Option<SpanId> {
    hex_to(s)
}

fn header<'a>(h: &'a HeaderMap, n: &HeaderName) -> Option<&'a str> {
    h.get(n).and_then(|v| v.to_str().ok())
}

/// Reads trace context; the first format present wins (W3C, B3 single, B3 multi, X-Ray).
pub fn extract(h: &HeaderMap) -> Incoming {
    let tracestate = h.get(TRACESTATE).cloned();
    if let Some(tp) = header(h, &TRACEPARENT) {
        let p: Vec<&str> = tp.trim().split('-').collect();
        if p.len() >= 4 && p[0].len() == 2 && p[0] != "ff" {
            if let (Some(t), Some(s), Ok(flags)) = (hex_to::<16>(p[1]), hex_to::<8>(p[2]), u8::from_str_radix(p[3], 16))
            {
                return Incoming { parent: Some((t, s)), sampled: Some(flags & 1 == 1), tracestate };
            }
        }
    }
    if let Some(b3) = header(h, &B3) {
        let p: Vec<&str> = b3.trim().split('-').collect();
        let sampled = |s: &str| match s {
            "1" | "d" => Some(true),
            "0" => Some(false),
            _ => None,
        };
        if p.len() == 1 {
            return Incoming { parent: None, sampled: sampled(p[0]), tracestate: None };
        }
        if let (Some(t), Some(s)) = (hex_to::<16>(p[0]), hex_to::<8>(p[1])) {
            return Incoming { parent: Some((t, s)), sampled: p.get(2).and_then(|v| sampled(v)), tracestate: None };
        }
    }
    let b3_sampled = header(h, &B3_FLAGS).filter(|f| *f == "1").map(|_| true).or_else(|| {
        header(h, &B3_SAMPLED).and_then(|v| match v {
            "1" | "true" => Some(true),
            "0" | "false" => Some(false),
            _ => None,
        })
    });
    if let (Some(t), Some(s)) = (header(h, &B3_TRACE).and_then(hex_to::<16>), header(h, &B3_SPAN).and_then(hex_to::<8>))
    {
        return Incoming { parent: Some((t, s)), sampled: b3_sampled, tracestate: None };
    }
    if let Some(x) = header(h, &XRAY) {
        let mut root = None;
        let mut parent = None;
        let mut sampled = None;
        for kv in x.split(';') {
            match kv.trim().split_once('=') {
                Some(("Root", v)) => {
                    // 1-<8 hex epoch>-<24 hex>
                    let parts: Vec<&str> = v.split('-').collect();
                    if parts.len() == 3 && parts[0] == "1" {
                        root = hex_to::<16>(&format!("{}{}", parts[1], parts[2]));
                    }
                }
                Some(("Parent", v)) => parent = hex_to::<8>(v),
                Some(("Sampled", v)) => sampled = Some(v == "1"),
                _ => {}
            }
        }
        if let (Some(t), Some(s)) = (root, parent) {
            return Incoming { parent: Some((t, s)), sampled, tracestate: None };
        }
        return Incoming { parent: None, sampled, tracestate: None };
    }
    Incoming { parent: None, sampled: b3_sampled, tracestate }
}

/// Writes the context of a new span into outgoing headers: the configured formats, and any
/// format the request already carried (so a B3-only app keeps working with W3C configured).
pub fn inject(
    h: &mut HeaderMap,
    formats: Formats,
    trace: &TraceId,
    span: &SpanId,
    parent: Option<&SpanId>,
    sampled: bool,
) {
    let had_w3c = h.contains_key(TRACEPARENT);
    let had_b3 = h.contains_key(B3_TRACE) || h.contains_key(B3_SAMPLED);
    let had_b3_single = h.contains_key(B3);
    let had_xray = h.contains_key(XRAY);
    let (t, s) = (hex(trace), hex(span));
    let flag = if sampled { "1" } else { "0" };
    let set = |h: &mut HeaderMap, n: HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(n, v);
        }
    };
    if formats.w3c || had_w3c {
        set(h, TRACEPARENT, format!("00-{t}-{s}-0{flag}"));
    }
    if formats.b3 || had_b3 {
        set(h, B3_TRACE, t.clone());
        set(h, B3_SPAN, s.clone());
        match parent {
            Some(p) => set(h, B3_PARENT, hex(p)),
            None => {
                h.remove(B3_PARENT);
            }
        }
        set(h, B3_SAMPLED, flag.to_string());
        h.remove(B3_FLAGS);
    }
    if formats.b3_single || had_b3_single {
        let mut v = format!("{t}-{s}-{flag}");
        if let Some(p) = parent {
            v.push('-');
            v.push_str(&hex(p));
        }
        set(h, B3, v);
    }
    if formats.xray || had_xray {
        set(h, XRAY, format!("Root=1-{}-{};Parent={s};Sampled={flag}", &t[..8], &t[8..]));
    }
}

pub fn new_trace_id() -> TraceId {
    fastrand::u128(1..).to_be_bytes()
}

pub fn new_span_id() -> SpanId {
    fastrand::u64(1..).to_be_bytes()
}

/// Decides whether a new trace is sampled: `percent` of them, at random.
pub fn sample(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
    /// An operation inside a process (an app's own span, as `data_transformation`).
    Internal,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Str(Arc<str>),
    Int(i64),
}

impl From<&str> for Attr {
    fn from(s: &str) -> Self {
        Attr::Str(Arc::from(s))
    }
}

impl From<String> for Attr {
    fn from(s: String) -> Self {
        Attr::Str(Arc::from(s))
    }
}

impl From<Arc<str>> for Attr {
    fn from(s: Arc<str>) -> Self {
        Attr::Str(s)
    }
}

impl From<i64> for Attr {
    fn from(v: i64) -> Self {
        Attr::Int(v)
    }
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct SpanData {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Attr)>,
    pub error: bool,
    /// The reporting service (`<canonical service>.<namespace>`), the span's resource.
    pub service: Arc<str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w3c_round_trip_and_sampling_flag() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let inc = extract(&h);
        let (t, s) = inc.parent.expect("parent");
        assert_eq!(trace_hex(&t), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span_hex(&s), "00f067aa0ba902b7");
        assert_eq!(inc.sampled, Some(true));
        let mine = new_span_id();
        inject(&mut h, Formats::default(), &t, &mine, Some(&s), true);
        assert_eq!(h[TRACEPARENT], format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", span_hex(&mine)).as_str());
        assert_eq!(h[B3_PARENT], "00f067aa0ba902b7");
        assert_eq!(h[B3_SAMPLED], "1");
    }

    #[test]
    fn b3_single_multi_and_xray_are_read() {
        let mut h = HeaderMap::new();
        h.insert(B3, HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0-05e3ac9a4f6e3b90"));
        let inc = extract(&h);
        assert_eq!(inc.sampled, Some(false));
        assert_eq!(span_hex(&inc.parent.expect("p").1), "e457b5a2e4d86bd1");
        let mut h = HeaderMap::new();
        h.insert(B3_TRACE, HeaderValue::from_static("463ac35c9f6413ad"));
        h.insert(B3_SPAN, HeaderValue::from_static("a2fb4a1d1a96d312"));
        h.insert(B3_SAMPLED, HeaderValue::from_static("1"));
        let inc = extract(&h);
        assert_eq!(trace_hex(&inc.parent.expect("p").0), "0000000000000000463ac35c9f6413ad");
        let mut h = HeaderMap::new();
        h.insert(
            XRAY,
            HeaderValue::from_static("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"),
        );
        let inc = extract(&h);
        assert_eq!(trace_hex(&inc.parent.expect("p").0), "5759e988bd862e3fe1be46a994272793");
        assert_eq!(inc.sampled, Some(true));
        // A bare sampling decision.
        let mut h = HeaderMap::new();
        h.insert(B3, HeaderValue::from_static("0"));
        assert_eq!(extract(&h), Incoming { parent: None, sampled: Some(false), tracestate: None });
    }

    #[test]
    fn xray_is_written_when_asked() {
        let mut h = HeaderMap::new();
        let t = new_trace_id();
        let s = new_span_id();
        inject(&mut h, Formats::parse("xray").expect("formats"), &t, &s, None, true);
        let v = h[XRAY].to_str().expect("str").to_string();
        let back = extract(&h);
        assert_eq!(back.parent, Some((t, s)), "{v}");
        assert!(h.get(TRACEPARENT).is_none());
    }
}
