//! Route selection: the listener's route table (by listener, by the request's port, or a fixed
//! upstream), the virtual host for the request's host, then the first route whose match
//! applies (404 `NR` when none does).

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::uri::Authority;

use trellis_config::snapshot::ListenerRouting;

use super::ConnInfo;
use crate::http::ProxyError;
use crate::runtime::route::{RequestView, Route};
use crate::runtime::{RouteTable, Runtime};

/// The route a request takes, and what selecting it learned about the request.
pub(super) struct Selected<'a> {
    pub route: &'a Route,
    /// The prefix the matching `uri` match had, for `rewrite.uri`.
    pub prefix: Option<&'a str>,
    /// The request's host, lower case, without a trailing dot.
    pub host: String,
    /// The authority as the request (or the fixed upstream) gave it, port included.
    pub authority: String,
    pub scheme: &'static str,
    pub port: Option<u16>,
}

pub(super) fn route<'a>(
    rt: &'a Runtime,
    conn: &ConnInfo,
    parts: &mut http::request::Parts,
    authority: Option<&Authority>,
) -> Result<Selected<'a>, ProxyError> {
    let scheme = if conn.tls || parts.uri.scheme_str() == Some("https") { "https" } else { "http" };
    let (mut host, port) = match authority {
        Some(a) => (a.host().to_ascii_lowercase(), a.port_u16()),
        None => (String::new(), None),
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let no_route = |host: &str, parts: &http::request::Parts| ProxyError::no_route(host, parts.uri.path());
    let routing = match rt.listener(&conn.listener).ok_or_else(|| no_route(&host, parts))? {
        // Detected as HTTP: routed as the listener's HTTP side says.
        ListenerRouting::Detect { http, .. } => &**http,
        r => r,
    };
    let table: Option<&Arc<RouteTable>> = match routing {
        ListenerRouting::Table(name) => rt.table(name),
        ListenerRouting::ByRequestPort => rt.outbound_table(port.unwrap_or(default_port)),
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
        // Proxied as TCP before any request is read.
        ListenerRouting::Tcp(_) | ListenerRouting::Detect { .. } => None,
    };
    let host_len = host.trim_end_matches('.').len();
    host.truncate(host_len);
    let authority_str = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| authority.map(|a| a.to_string()))
        .unwrap_or_default();
    let Some(vhost) = table.and_then(|t| t.virtual_host(&host)) else {
        // A destination the registry does not know.
        return match () {
            _ if rt.registry_only(&conn.listener) => Err(ProxyError::blackhole(&host)),
            // ALLOW_ANY: on to where the request was going (Istio's PassthroughCluster).
            _ if conn.direction == trellis_config::snapshot::Direction::Outbound && !host.is_empty() => {
                Ok(Selected { route: &rt.passthrough, prefix: None, host, authority: authority_str, scheme, port })
            }
            _ => Err(no_route(&host, parts)),
        };
    };
    let view = RequestView {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        scheme,
        authority: &authority_str,
        headers: &parts.headers,
    };
    let matched = vhost.route(&view).ok_or_else(|| no_route(&host, parts))?;
    Ok(Selected { route: matched.route, prefix: matched.prefix, host, authority: authority_str, scheme, port })
}
