//! The routing snapshot: everything one proxy needs, compiled from config, as plain data.
//!
//! This is the contract between whoever compiles config (the proxy itself in static mode, the
//! control plane otherwise) and the data plane, which instantiates it into lock-free lookup
//! tables. It is what `/config_dump` shows. Shape, from outside in:
//! listeners → route tables → virtual hosts → ordered routes → weighted clusters → endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::model::networking::Labels;
use crate::model::Duration;

/// One proxy's complete configuration at one version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// A content hash: equal snapshots have equal versions.
    pub version: String,
    pub node: NodeInfo,
    pub listeners: Vec<Listener>,
    pub route_tables: BTreeMap<String, RouteTable>,
    pub clusters: BTreeMap<String, Cluster>,
    /// What Istio `Telemetry` resources say for this proxy (unset fields: the proxy's defaults).
    #[serde(default)]
    pub telemetry: TelemetryPolicy,
    /// AuthorizationPolicies selecting this proxy's workload (mesh, namespace and workload scope).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization: Vec<AuthzPolicy>,
    /// RequestAuthentication JWT rules selecting this proxy's workload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<crate::model::security::JwtRule>,
    /// Local rate limits on this proxy's listeners (EnvoyFilter local_ratelimit, RateLimit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimitPolicy>,
}

/// A token bucket in front of one side of a proxy: `tokens_per_fill` tokens every
/// `fill_interval`, at most `max_tokens`; a request takes one or gets 429.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateLimitPolicy {
    /// `Kind namespace/name` of the resource it came from.
    pub name: String,
    /// The listeners it applies to; `None`: all of this proxy's.
    pub direction: Option<Direction>,
    /// Per route: every route this selects gets a bucket of its own (Envoy's
    /// `typed_per_filter_config`); `None`: one bucket for the whole side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<RouteScope>,
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    /// Share of requests the limit is applied to (`filter_enabled`), and of those, the share
    /// actually refused when over it (`filter_enforced`); 100 and 100 by default.
    pub enabled_percent: f64,
    pub enforced_percent: f64,
    /// Added to the responses of refused requests (`response_headers_to_add`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_headers: Vec<(String, String)>,
}

impl RateLimitPolicy {
    /// Whether this per-route limit selects route `r` of virtual host `vhost` in route table
    /// `table`: by side, port, virtual host (named as Istio names Envoy's), route name and
    /// action. A side-wide limit (no `routes`) selects none.
    pub fn selects_route(&self, table: &str, vhost: &str, r: &Route) -> bool {
        let Some(scope) = &self.routes else { return false };
        let Some((side, port)) = table.split_once('|') else { return false };
        let (direction, istio_vhost) = match side {
            "inbound" => (Direction::Inbound, format!("inbound|http|{port}")),
            "outbound" => (Direction::Outbound, vhost.to_string()),
            "gateway" => (Direction::Gateway, format!("{vhost}:{port}")),
            _ => return false,
        };
        let action = match r.action {
            Action::Forward(_) => "ROUTE",
            Action::Redirect(_) => "REDIRECT",
            Action::Direct { .. } => "DIRECT_RESPONSE",
        };
        self.direction.is_none_or(|d| d == direction)
            && scope.port.is_none_or(|want| port.parse::<u16>().ok() == Some(want))
            && scope.vhost.as_deref().is_none_or(|v| v.eq_ignore_ascii_case(&istio_vhost))
            && scope.route.as_deref().is_none_or(|n| n == r.name)
            && scope.action.as_deref().is_none_or(|a| a == action)
    }
}

/// The routes a per-route rate limit selects, as an EnvoyFilter's `routeConfiguration` match
/// names them; an unset field matches every route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteScope {
    /// The route table's port (the listener's, or the service port for outbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Envoy's virtual host name as Istio gives it: `inbound|http|<port>`,
    /// `<service FQDN>:<port>` outbound, `<host>:<port>` on a gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost: Option<String>,
    /// The route's name (a VirtualService `http[].name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// `ROUTE`, `REDIRECT` or `DIRECT_RESPONSE`; `None`: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthzAction {
    Allow,
    Deny,
    Audit,
}

/// One AuthorizationPolicy as the data plane evaluates it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthzPolicy {
    /// `namespace/name`, reported in access logs and metrics.
    pub name: String,
    pub action: AuthzAction,
    /// A request matches the policy when it matches any rule (none: matches nothing).
    pub rules: Vec<crate::model::security::Rule>,
}

/// PeerAuthentication's mode for an inbound port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Mutual TLS only; plaintext connections are refused.
    Strict,
    /// Mutual TLS or plaintext, told apart by the first bytes.
    Permissive,
    /// Plaintext only.
    Disable,
}

/// How to speak TLS to a cluster's endpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamTls {
    /// Mesh mutual TLS with the proxy's own certificate; the server must hold one of
    /// `identities` (SPIFFE URIs; empty: any identity of the mesh).
    IstioMutual { identities: Vec<String> },
    /// TLS origination (DestinationRule `SIMPLE`, or `MUTUAL` with a client certificate).
    Origination {
        sni: Option<String>,
        /// PEM file of the CAs to trust (none: the system's).
        ca_certificates: Option<String>,
        client_certificate: Option<String>,
        private_key: Option<String>,
        subject_alt_names: Vec<String>,
        insecure_skip_verify: bool,
    },
}

/// Tracing and access-log settings from `Telemetry` resources (workload over namespace over
/// mesh).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TelemetryPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling_percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_reporting_disabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log_filter: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub role: Role,
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    /// The proxy's SPIFFE id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Sidecar,
    Gateway,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Serves a Gateway's servers.
    Gateway,
    /// In front of the local workload.
    Inbound,
    /// The workload's egress.
    Outbound,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub direction: Direction,
    /// How a request picks its route table.
    pub routing: ListenerRouting,
    /// Inbound listeners: PeerAuthentication's mode for this port. Gateway listeners: STRICT
    /// for a port whose servers say `tls.mode: ISTIO_MUTUAL` (sidecars reach it over mesh mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// Gateway listeners: the TLS they terminate (HTTPS servers, SIMPLE or MUTUAL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// Outbound listeners: `outboundTrafficPolicy` REGISTRY_ONLY — a destination the registry
    /// does not know is refused (HTTP 502 `NR`, TCP closed; Istio's BlackHoleCluster) instead
    /// of passed through (ALLOW_ANY, Istio's PassthroughCluster).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub registry_only: bool,
}

/// The TLS a gateway port terminates: one entry per server; the first whose hosts match the
/// client's SNI serves the handshake (without SNI, or with no match, the first).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ListenerTls {
    pub servers: Vec<TlsServer>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TlsServer {
    /// SNI names it serves: `example.com`, `*.example.com`, `*`.
    pub hosts: Vec<String>,
    pub credential: TlsCredential,
    /// MUTUAL: clients must present a certificate signed by the credential's CA.
    #[serde(default)]
    pub mutual: bool,
    /// MUTUAL: the client certificate must carry one of these SANs (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// `TLSV1_2` or `TLSV1_3` (older versions are not offered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_version: Option<String>,
    /// Cipher suites by their IANA or OpenSSL-style names (TLS 1.2); empty: the defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cipher_suites: Vec<String>,
    /// `Gateway ns/name servers[i]`.
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsCredential {
    /// PEM files by path, read by the proxy (and read again when they change).
    Files { certificate: String, private_key: String, ca_certificates: Option<String> },
    /// `credentialName`: the proxy's credentials directory holds `<name>/tls.crt`, `tls.key`
    /// and, for MUTUAL, `ca.crt` (or `<name>-cacert/ca.crt`), as a Kubernetes TLS Secret's keys.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerRouting {
    /// Every request uses this table.
    Table(String),
    /// The table is `outbound|<port>`, by the port of the request's authority (80 if none): an
    /// HTTP proxy for the workload's `HTTP_PROXY` and Host-addressed requests.
    ByRequestPort,
    /// Requests are routed as if addressed to `host:port` (a local port bound to a named upstream,
    /// for clients that cannot use a proxy).
    Fixed { host: String, port: u16 },
    /// Transparent capture (iptables REDIRECT): each connection's original destination port
    /// (`SO_ORIGINAL_DST`) picks its table and mTLS mode; a port not listed is passed through as
    /// TCP to the original destination, untouched.
    OriginalDst {
        ports: BTreeMap<u16, CapturedPort>,
        /// Inbound: the mode for ports not listed (STRICT refuses their plaintext passthrough).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        passthrough_mtls: Option<MtlsMode>,
    },
    /// Every connection is proxied as TCP.
    Tcp(TcpProxy),
    /// An undeclared protocol: each connection is served as HTTP (by `http`) when its first
    /// bytes are an HTTP request, else proxied as TCP — a client that waits for the server
    /// (a server-first protocol) is proxied as TCP after a short window, never stalled.
    Detect { http: Box<ListenerRouting>, tcp: TcpProxy },
}

/// A port of a capturing listener that Trellis serves: as HTTP with route table `table`, or,
/// when `tcp` is set, as TCP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapturedPort {
    pub table: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProxy>,
    /// Both `table` and `tcp` are set: the protocol is detected per connection.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detect: bool,
}

/// How connections are proxied as TCP: the first route whose match holds picks a cluster by
/// weight (VirtualService `tcp` routes, or the service's own cluster).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpProxy {
    pub routes: Vec<TcpRoute>,
    /// Read the TLS ClientHello's SNI (without consuming it) before routing: TLS passthrough.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sni: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TcpRoute {
    /// `VirtualService ns/name tcp[i]`, or `default`.
    pub name: String,
    /// The connection's destination address must be in one of these CIDRs (`destinationSubnets`);
    /// empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<String>,
    /// The ClientHello's SNI must match one of these (`*.example.com` too); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
    /// Clusters and their weights.
    pub destinations: Vec<(String, u32)>,
}

/// Name of the outbound route table for a port.
pub fn outbound_table(port: u16) -> String {
    format!("outbound|{port}")
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteTable {
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VirtualHost {
    pub name: String,
    /// Exact hosts, `*.suffix` wildcards or `*`; matched without the port, case-insensitively.
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub name: String,
    /// The VirtualService rule it came from: `VirtualService ns/name http[i]`.
    pub source: Option<String>,
    /// Alternatives: the route applies when any matches; empty means every request.
    pub matches: Vec<RouteMatch>,
    pub action: Action,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub request_headers: HeaderOps,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub response_headers: HeaderOps,
    pub timeout: Option<Duration>,
    /// None: the route never retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Cors>,
    /// Clusters a share of the route's requests is copied to (fire and forget).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    // Rate limits attach here (later release).
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mirror {
    pub cluster: String,
    /// Of requests, 0-100.
    pub percent: f64,
}

/// Cross-origin resource sharing for a route (VirtualService `corsPolicy`), as Envoy's CORS
/// filter applies it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cors {
    pub allow_origins: Vec<StringMatcher>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    pub allow_credentials: bool,
    /// A preflight from an origin not allowed goes on to the upstream (`FORWARD`, the default);
    /// else the proxy answers it without CORS headers.
    pub forward_unmatched_preflights: bool,
    #[serde(default)]
    pub allow_private_network: bool,
}

/// Faults injected into a share of a route's requests (VirtualService `fault`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultDelay {
    pub delay: Duration,
    /// Of requests, 0-100.
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultAbort {
    pub status: AbortStatus,
    pub percent: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortStatus {
    Http(u16),
    /// A gRPC status code, answered as a trailers-only gRPC response.
    Grpc(u32),
}

/// gRPC status codes by name, as `grpcStatus` writes them.
pub const GRPC_CODES: &[(&str, u32)] = &[
    ("OK", 0),
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

/// A `grpcStatus` value: a code name (`UNAVAILABLE`) or number.
pub fn grpc_code(text: &str) -> Option<u32> {
    GRPC_CODES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(text))
        .map(|(_, c)| *c)
        .or_else(|| text.parse().ok().filter(|c| *c <= 16))
}

/// When and how often a request is tried again (VirtualService `retries`, or Istio's default
/// policy when the route sets none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Vec<RetryOn>,
    /// `retriable-status-codes`: the codes named in `retryOn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
    /// Whether non-idempotent methods (POST, PATCH, ...) are retried after the request reached
    /// the upstream: only when the route's own `retries` says so, never by default.
    pub any_method: bool,
    /// The base interval of the jittered exponential backoff.
    pub backoff: Duration,
    /// A retry prefers an endpoint not tried yet.
    pub other_hosts: bool,
}

/// A condition `retryOn` names (Envoy's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    #[serde(rename = "5xx")]
    FiveXx,
    GatewayError,
    Reset,
    ConnectFailure,
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    RefusedStream,
    RetriableStatusCodes,
    RetriableHeaders,
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

impl RetryOn {
    pub const ALL: &'static [(&'static str, RetryOn)] = &[
        ("5xx", RetryOn::FiveXx),
        ("gateway-error", RetryOn::GatewayError),
        ("reset", RetryOn::Reset),
        ("connect-failure", RetryOn::ConnectFailure),
        ("retriable-4xx", RetryOn::Retriable4xx),
        ("refused-stream", RetryOn::RefusedStream),
        ("retriable-status-codes", RetryOn::RetriableStatusCodes),
        ("retriable-headers", RetryOn::RetriableHeaders),
        ("cancelled", RetryOn::Cancelled),
        ("deadline-exceeded", RetryOn::DeadlineExceeded),
        ("internal", RetryOn::Internal),
        ("resource-exhausted", RetryOn::ResourceExhausted),
        ("unavailable", RetryOn::Unavailable),
    ];

    /// Parses a `retryOn` value: conditions and HTTP status codes, comma-separated.
    pub fn parse_list(text: &str) -> Result<(Vec<RetryOn>, Vec<u16>), String> {
        let (mut on, mut codes) = (Vec::new(), Vec::new());
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if let Some((_, c)) = RetryOn::ALL.iter().find(|(n, _)| *n == token) {
                if !on.contains(c) {
                    on.push(*c);
                }
            } else if let Some(code) = token.parse::<u16>().ok().filter(|c| (100..=599).contains(c)) {
                codes.push(code);
            } else if matches!(token, "envoy-ratelimited" | "http3-post-connect-failure") {
                // Envoy conditions with no meaning here (no rate-limit service, no HTTP/3).
            } else {
                let known: Vec<&str> = RetryOn::ALL.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "unknown retryOn condition {token:?} (known: {}, or an HTTP status code)",
                    known.join(", ")
                ));
            }
        }
        if !codes.is_empty() && !on.contains(&RetryOn::RetriableStatusCodes) {
            on.push(RetryOn::RetriableStatusCodes);
        }
        Ok((on, codes))
    }
}

/// Istio's base backoff interval (Envoy's default).
pub const DEFAULT_RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(25);

impl RetryPolicy {
    /// Istio's policy for a route that sets no `retries`: 2 retries on connection failures,
    /// refused streams, gRPC `unavailable`/`cancelled` and 503 — for idempotent methods only,
    /// where Istio retries any method.
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
                RetryOn::RetriableStatusCodes,
            ],
            status_codes: vec![503],
            any_method: false,
            backoff: Duration(DEFAULT_RETRY_BACKOFF),
            other_hosts: true,
        }
    }
}

/// Retries in flight to a cluster are limited to `percent` of its requests in flight, but at
/// least `min_concurrency` (Envoy's `retry_budget`; Istio's DestinationRule `retryBudget`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryBudget {
    pub percent: f64,
    pub min_concurrency: u32,
}

impl Default for RetryBudget {
    /// Envoy's defaults: 20% and 3.
    fn default() -> RetryBudget {
        RetryBudget { percent: 20.0, min_concurrency: 3 }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatcher>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub ignore_uri_case: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatcher>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatcher>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatcher>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub headers: Vec<KeyMatcher>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub query_params: Vec<KeyMatcher>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    /// A whole-string match (RE2 syntax, as Envoy's safe_regex).
    Regex(String),
}

/// A header or query parameter condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMatcher {
    pub name: String,
    /// `None`: the key must be present (any value).
    pub value: Option<StringMatcher>,
    /// `withoutHeaders`: the condition must not hold.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub invert: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Forward(Forward),
    Redirect(Redirect),
    Direct { status: u16, body: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Forward {
    pub destinations: Vec<WeightedCluster>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightedCluster {
    pub cluster: String,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub request_headers: HeaderOps,
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub response_headers: HeaderOps,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rewrite {
    /// Replaces the matched prefix (or the whole path for exact/regex matches).
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// `(pattern, replacement)` applied to the path.
    pub uri_regex: Option<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    /// Keep the request's port (`derivePort: FROM_REQUEST_PORT`).
    pub port_from_request: bool,
    pub scheme: Option<String>,
    pub code: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeaderOps {
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub set: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub add: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// `outbound|<port>|<subset>|<host>` or `inbound|<port>||`, as Envoy names them.
    pub name: String,
    /// The service's FQDN (or ServiceEntry host).
    pub service: String,
    /// Its short name and namespace, for telemetry labels.
    #[serde(default)]
    pub service_name: String,
    #[serde(default)]
    pub service_namespace: String,
    pub port: u16,
    pub subset: Option<String>,
    pub protocol: UpstreamProtocol,
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    pub endpoints: Vec<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    #[serde(default)]
    pub retry_budget: RetryBudget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierPolicy>,
    #[serde(default)]
    pub pool: PoolPolicy,
    /// The DestinationRule whose policies it carries: `DestinationRule namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Connection-pool limits (DestinationRule `connectionPool`); `None`: unlimited.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolPolicy {
    /// Connections to one endpoint (`tcp.maxConnections`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection to one endpoint (`http.http1MaxPendingRequests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    /// Requests in flight to the service (`http.http2MaxRequests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// Retries in flight to the service (`http.maxRetries`), besides the retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// An upstream connection idle this long is closed, before the upstream's own idle timeout
    /// can close it under a request (`http.idleTimeout`).
    pub idle_timeout: Duration,
    /// TCP keepalive on upstream connections (`tcp.tcpKeepalive`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<Keepalive>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Keepalive {
    pub time: Duration,
    pub interval: Duration,
    pub probes: u32,
}

/// Trellis's upstream idle timeout when the DestinationRule sets none: under the idle
/// timeouts common servers close keep-alive connections after (Node.js 5s, nginx 75s), so a
/// pooled connection is dropped by the proxy first. (Istio's default is 1h.)
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

impl Default for PoolPolicy {
    fn default() -> PoolPolicy {
        PoolPolicy {
            max_connections: None,
            max_pending: None,
            max_requests: None,
            max_requests_per_connection: None,
            max_retries: None,
            idle_timeout: Duration(DEFAULT_UPSTREAM_IDLE_TIMEOUT),
            keepalive: None,
        }
    }
}

/// Outlier detection with Istio's defaults filled in (0 turns a counter off).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutlierPolicy {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    /// Counted apart only when `split_local_origin` (else connection failures, resets and
    /// timeouts count as 5xx and gateway errors, as Envoy does).
    pub consecutive_local_origin: u32,
    pub split_local_origin: bool,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// Whatever the downstream spoke (gRPC always goes over HTTP/2).
    Downstream,
    /// Opaque TCP (a port declared `tcp`, `mongo`, `mysql`, `redis`, `tls`, ...).
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    RoundRobin,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    /// Power of two choices over each endpoint's peak-EWMA latency × its load (Linkerd's and
    /// Finagle's balancer): slow endpoints get less traffic before they fail. A Trellis value of
    /// `simple` (`PEAK_EWMA`); Istio has none.
    PeakEwma,
    Random,
    RingHash {
        hash: HashPolicy,
        min_ring_size: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashPolicy {
    Header(String),
    Cookie { name: String, path: Option<String>, ttl: Option<Duration> },
    SourceIp,
    QueryParam(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `ip:port`, or `hostname:port` resolved at connect time.
    pub address: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub labels: Labels,
    pub weight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub namespace: Option<String>,
    /// The SPIFFE id of the workload behind the endpoint.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub identity: Option<String>,
    /// It has a sidecar that speaks mesh mTLS (Istio's `security.istio.io/tlsMode: istio`).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub mtls: bool,
}
