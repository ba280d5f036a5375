//! Proxy errors, the side they come from, and the one place they become responses.
//!
//! Every locally generated error carries a response flag with Envoy's meaning, so operators
//! who know Envoy's access logs read ours the same way; logs and metrics share the flag.

use std::fmt;

use http::{header, HeaderValue, Response, StatusCode};

use super::{full, Body};

/// Envoy's response flags (the subset Trellis produces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flag {
    /// No route configured for the request.
    NoRoute,
    /// No healthy upstream host in the cluster.
    NoHealthyUpstream,
    /// Upstream connection failure.
    UpstreamConnectFailure,
    /// Upstream reset the connection or stream before the response.
    UpstreamReset,
    /// Upstream request timeout.
    UpstreamTimeout,
    /// A connection-pool limit was reached (circuit breaking).
    UpstreamOverflow,
    /// Downstream protocol error (a request the proxy cannot accept).
    DownstreamProtocolError,
    /// Downstream connection terminated (client went away).
    DownstreamTerminated,
    /// Denied by an AuthorizationPolicy (Trellis' flag; Envoy reports it in response details).
    RbacDenied,
    /// A JWT was presented and failed validation (Trellis' flag).
    JwtDenied,
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::NoRoute => "NR",
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamConnectFailure => "UF",
            Flag::UpstreamReset => "UR",
            Flag::UpstreamTimeout => "UT",
            Flag::UpstreamOverflow => "UO",
            Flag::DownstreamProtocolError => "DPE",
            Flag::DownstreamTerminated => "DC",
            Flag::RbacDenied => "RBAC",
            Flag::JwtDenied => "JWT",
        }
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which side of the proxy an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
    Proxy,
}

/// An error the proxy answers for itself.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProxyError {
    pub flag: Flag,
    pub status: StatusCode,
    pub side: Side,
    /// Safe to retry: the request never reached an upstream application.
    pub retryable: bool,
    /// The upstream refused the HTTP/2 stream (`REFUSED_STREAM`): it never processed it.
    pub refused: bool,
    pub message: String,
}

/// Response header naming the flag on locally generated responses, for debugging.
pub const FLAGS_HEADER: &str = "x-trellis-response-flags";

impl ProxyError {
    pub fn no_route(host: &str, path: &str) -> Self {
        ProxyError {
            flag: Flag::NoRoute,
            status: StatusCode::NOT_FOUND,
            side: Side::Proxy,
            retryable: false,
            refused: false,
            message: format!("no route for host {host:?} and path {path:?}"),
        }
    }

    /// `outboundTrafficPolicy: REGISTRY_ONLY` and a host the registry does not know: 502 `NR`
    /// (Istio's BlackHoleCluster).
    pub fn blackhole(host: &str) -> Self {
        ProxyError {
            flag: Flag::NoRoute,
            status: StatusCode::BAD_GATEWAY,
            side: Side::Proxy,
            retryable: false,
            refused: false,
            message: format!("{host:?} is not a service of the mesh, and outboundTrafficPolicy is REGISTRY_ONLY"),
        }
    }

    pub fn no_healthy_upstream(cluster: &str) -> Self {
        ProxyError {
            flag: Flag::NoHealthyUpstream,
            status: StatusCode::SERVICE_UNAVAILABLE,
            side: Side::Upstream,
            retryable: true,
            refused: false,
            message: format!("no healthy upstream in cluster {cluster}"),
        }
    }

    pub fn connect_failure(endpoint: &str, reason: impl fmt::Display) -> Self {
        ProxyError {
            flag: Flag::UpstreamConnectFailure,
            status: StatusCode::SERVICE_UNAVAILABLE,
            side: Side::Upstream,
            retryable: true,
            refused: false,
            message: format!("upstream connect error to {endpoint}: {reason}"),
        }
    }

    pub fn reset(endpoint: &str, reason: impl fmt::Display) -> Self {
        ProxyError {
            flag: Flag::UpstreamReset,
            status: StatusCode::SERVICE_UNAVAILABLE,
            side: Side::Upstream,
            retryable: false,
            refused: false,
            message: format!("upstream {endpoint} reset before response headers: {reason}"),
        }
    }

    pub fn timeout(after: std::time::Duration) -> Self {
        ProxyError {
            flag: Flag::UpstreamTimeout,
            status: StatusCode::GATEWAY_TIMEOUT,
            side: Side::Upstream,
            retryable: true,
            refused: false,
            message: format!(
                "upstream request timeout after {}",
                trellis_config::model::duration::format_duration(after)
            ),
        }
    }

    /// A connection-pool limit of `cluster` refused the request (`limit` names it).
    pub fn overflow(cluster: &str, limit: &str) -> Self {
        ProxyError {
            flag: Flag::UpstreamOverflow,
            status: StatusCode::SERVICE_UNAVAILABLE,
            side: Side::Upstream,
            retryable: false,
            refused: false,
            message: format!(
                "upstream connect error or disconnect/reset before headers: overflow of {limit} to {cluster}"
            ),
        }
    }

    /// Istio's answer to a request an AuthorizationPolicy denies.
    pub fn rbac_denied() -> Self {
        ProxyError {
            flag: Flag::RbacDenied,
            status: StatusCode::FORBIDDEN,
            side: Side::Downstream,
            retryable: false,
            refused: false,
            message: "RBAC: access denied".into(),
        }
    }

    /// A presented JWT failed validation.
    pub fn jwt_denied(message: String) -> Self {
        ProxyError {
            flag: Flag::JwtDenied,
            status: StatusCode::UNAUTHORIZED,
            side: Side::Downstream,
            retryable: false,
            refused: false,
            message,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ProxyError {
            flag: Flag::DownstreamProtocolError,
            status: StatusCode::BAD_REQUEST,
            side: Side::Downstream,
            retryable: false,
            refused: false,
            message: message.into(),
        }
    }

    pub fn downstream_gone(reason: impl fmt::Display) -> Self {
        ProxyError {
            flag: Flag::DownstreamTerminated,
            status: StatusCode::BAD_REQUEST,
            side: Side::Downstream,
            retryable: false,
            refused: false,
            message: format!("downstream request body failed: {reason}"),
        }
    }

    /// The upstream took longer than the route's timeout, or the client's `grpc-timeout`.
    pub fn is_timeout(&self) -> bool {
        self.flag == Flag::UpstreamTimeout
    }

    /// The response for this error: status, a one-line text body ending in the flag, and the
    /// flag in [`FLAGS_HEADER`].
    pub fn into_response(self) -> Response<Body> {
        // Istio's exact bodies for denials; everything else names its flag.
        let body = match self.flag {
            Flag::RbacDenied | Flag::JwtDenied => self.message.clone(),
            _ => format!("{} ({})\n", self.message, self.flag),
        };
        let mut resp = Response::new(full(body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        h.insert(FLAGS_HEADER, HeaderValue::from_static(self.flag.as_str()));
        resp
    }
}
