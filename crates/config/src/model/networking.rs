//! `networking.istio.io` kinds, as Istio documents them (v1alpha3, v1beta1 and v1 share one schema).
//!
//! Field names follow Istio's YAML exactly. Fields Trellis reads but does not act on yet are kept
//! as raw JSON values, so `trellis analyze` can say "not enforced yet" instead of "unknown field".

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value as Json;

use super::Duration;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VirtualService {
    pub hosts: Vec<String>,
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tls: Vec<TlsRoute>,
    pub tcp: Vec<TcpRoute>,
    pub export_to: Vec<String>,
}

/// A VirtualService `tcp` route: the first whose match holds proxies the connection.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TcpRoute {
    #[serde(rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    pub route: Vec<RouteDestination>,
}

/// A VirtualService `tls` route: TLS passed through, routed by the ClientHello's SNI.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TlsRoute {
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatchAttributes>,
    pub route: Vec<RouteDestination>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TlsMatchAttributes {
    pub sni_hosts: Vec<String>,
    pub destination_subnets: Vec<String>,
    pub port: Option<u32>,
    pub source_labels: Labels,
    pub gateways: Vec<String>,
    pub source_namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct L4MatchAttributes {
    pub destination_subnets: Vec<String>,
    pub port: Option<u32>,
    pub source_labels: Labels,
    pub gateways: Vec<String>,
    pub source_namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    pub route: Vec<HttpRouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub delegate: Option<Json>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<Duration>,
    pub headers: Option<Headers>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFaultInjection>,
    pub mirror: Option<Destination>,
    pub mirrors: Option<Vec<HttpMirrorPolicy>>,
    pub mirror_percentage: Option<Percent>,
    /// Deprecated (an integer percentage).
    pub mirror_percent: Option<i64>,
    pub cors_policy: Option<CorsPolicy>,
}

/// One of `HTTPRoute.mirrors`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    pub percentage: Option<Percent>,
}

/// `HTTPRoute.corsPolicy`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct CorsPolicy {
    pub allow_origins: Vec<StringMatch>,
    /// Deprecated: exact origins.
    pub allow_origin: Vec<String>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<Duration>,
    pub allow_credentials: Option<bool>,
    /// `FORWARD` (default) or `IGNORE`: what happens to a preflight whose origin is not allowed.
    pub unmatched_preflights: Option<String>,
    pub allow_private_network: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: BTreeMap<String, StringMatch>,
    pub port: Option<u32>,
    pub source_labels: Labels,
    pub gateways: Vec<String>,
    pub query_params: BTreeMap<String, StringMatch>,
    pub ignore_uri_case: bool,
    pub without_headers: BTreeMap<String, StringMatch>,
    pub source_namespace: Option<String>,
    pub stat_prefix: Option<String>,
}

/// Istio's `StringMatch` oneof: exactly one of `exact`, `prefix`, `regex`; none means "present".
#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Destination,
    pub weight: Option<i64>,
    pub headers: Option<Headers>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct HeaderOperations {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u32>,
    pub derive_port: Option<String>,
    pub scheme: Option<String>,
    pub redirect_code: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct HttpDirectResponse {
    pub status: u32,
    pub body: Option<HttpBody>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct HttpBody {
    pub string: Option<String>,
    pub bytes: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DestinationRule {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    pub export_to: Vec<String>,
    pub workload_selector: Option<WorkloadSelector>,
}

/// `HTTPRoute.retries`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRetry {
    /// Retries allowed (not counting the first try); 0 disables retries.
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<Duration>,
    /// Comma-separated conditions (Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on`
    /// names) and status codes.
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
    /// Whether a retry avoids the hosts already tried (Istio's default: yes).
    pub retry_ignore_previous_hosts: Option<bool>,
    /// The base interval of the jittered exponential backoff between tries (default 25ms).
    pub backoff: Option<Duration>,
}

/// `TrafficPolicy.connectionPool`: limits on connections and requests to a service.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ConnectionPool {
    pub tcp: Option<TcpPool>,
    pub http: Option<HttpPool>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TcpPool {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<Duration>,
    pub idle_timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpPool {
    #[serde(rename = "http1MaxPendingRequests")]
    pub http1_max_pending_requests: Option<i64>,
    #[serde(rename = "http2MaxRequests")]
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Option<i64>,
    pub idle_timeout: Option<Duration>,
    pub h2_upgrade_policy: Option<String>,
    pub use_client_protocol: Option<bool>,
    pub max_concurrent_streams: Option<i64>,
}

/// `TrafficPolicy.outlierDetection`: endpoints that keep failing are ejected for a while.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Deprecated: consecutive 502/503/504 (Envoy's old meaning).
    pub consecutive_errors: Option<i64>,
    pub consecutive_5xx_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub consecutive_local_origin_failures: Option<i64>,
    pub split_external_local_origin_errors: Option<bool>,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<i64>,
    pub min_health_percent: Option<i64>,
}

/// `HTTPRoute.fault`: delays and aborts injected into a share of requests.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpFaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay: Option<Duration>,
    pub exponential_delay: Option<Json>,
    pub percentage: Option<Percent>,
    /// Deprecated (an integer percentage).
    pub percent: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct FaultAbort {
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub http2_error: Option<String>,
    pub percentage: Option<Percent>,
}

/// `TrafficPolicy.retryBudget`: retries in flight are limited to `percent` of the requests in
/// flight to the service, but at least `minRetryConcurrency`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RetryBudget {
    pub percent: Option<Percent>,
    pub min_retry_concurrency: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Percent {
    pub value: f64,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub port_level_settings: Vec<PortTrafficPolicy>,
    // Enforced by later releases.
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
    pub tunnel: Option<Json>,
    pub proxy_protocol: Option<Json>,
    pub retry_budget: Option<RetryBudget>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
}

/// DestinationRule `trafficPolicy.tls`: how to speak TLS to the destination.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClientTlsSettings {
    /// DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL.
    pub mode: Option<String>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHash>,
    pub locality_lb_setting: Option<Json>,
    pub warmup_duration_secs: Option<Json>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ConsistentHash {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub ring_hash: Option<RingHash>,
    pub maglev: Option<Maglev>,
    pub minimum_ring_size: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct HttpCookie {
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<Duration>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RingHash {
    pub minimum_ring_size: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Maglev {
    pub table_size: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    pub labels: Labels,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WorkloadSelector {
    pub labels: Labels,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Gateway {
    pub selector: Labels,
    pub servers: Vec<Server>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Server {
    pub port: ServerPort,
    pub bind: Option<String>,
    pub hosts: Vec<String>,
    pub tls: Option<Json>,
    pub name: Option<String>,
    pub default_endpoint: Option<String>,
}

impl Server {
    /// The server's `tls` block, typed (`None` when absent or not an object).
    pub fn tls_settings(&self) -> Option<ServerTlsSettings> {
        serde_json::from_value(self.tls.clone()?).ok()
    }
}

/// A Gateway server's `tls` (Istio's `ServerTLSSettings`).
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServerTlsSettings {
    pub https_redirect: bool,
    /// PASSTHROUGH, SIMPLE, MUTUAL, AUTO_PASSTHROUGH, ISTIO_MUTUAL, OPTIONAL_MUTUAL.
    pub mode: Option<String>,
    pub server_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    pub subject_alt_names: Vec<String>,
    /// TLS_AUTO, TLSV1_0, TLSV1_1, TLSV1_2, TLSV1_3.
    pub min_protocol_version: Option<String>,
    pub max_protocol_version: Option<String>,
    pub cipher_suites: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServerPort {
    pub number: u32,
    pub protocol: String,
    pub name: Option<String>,
    pub target_port: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceEntry {
    pub hosts: Vec<String>,
    pub addresses: Vec<String>,
    pub ports: Vec<ServicePort>,
    pub location: Option<String>,
    pub resolution: Option<String>,
    pub endpoints: Vec<WorkloadEntry>,
    pub workload_selector: Option<WorkloadSelector>,
    pub export_to: Vec<String>,
    pub subject_alt_names: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u32,
    pub protocol: Option<String>,
    pub name: Option<String>,
    pub target_port: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub address: Option<String>,
    pub ports: BTreeMap<String, u32>,
    pub labels: Labels,
    pub network: Option<String>,
    pub locality: Option<String>,
    pub weight: Option<u32>,
    pub service_account: Option<String>,
}

/// The `(namespace, name)` a VirtualService's `gateways` entry names, as Istio resolves it:
/// `ns/name` (`./name`: the VirtualService's namespace), a short `name` in the VirtualService's
/// namespace, or the legacy `name.ns` / `name.ns.svc.cluster.local`.
pub fn gateway_ref(gateway: &str, vs_namespace: &str) -> (String, String) {
    match gateway.split_once('/') {
        Some((".", name)) => (vs_namespace.to_string(), name.to_string()),
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => match gateway.split_once('.') {
            Some((name, rest)) => (rest.split('.').next().unwrap_or(rest).to_string(), name.to_string()),
            None => (vs_namespace.to_string(), gateway.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::gateway_ref;

    #[test]
    fn gateway_names_resolve_as_istio_does() {
        let r = |g: &str| gateway_ref(g, "shop");
        assert_eq!(r("gw"), ("shop".into(), "gw".into()));
        assert_eq!(r("edge/gw"), ("edge".into(), "gw".into()));
        assert_eq!(r("./gw"), ("shop".into(), "gw".into()));
        assert_eq!(r("gw.edge"), ("edge".into(), "gw".into()));
        assert_eq!(r("gw.edge.svc.cluster.local"), ("edge".into(), "gw".into()));
    }
}

/// `EnvoyFilter`: kept as written; Trellis reads the documented local rate limit
/// (`envoy.filters.http.local_ratelimit` inserted as an HTTP filter) and reports any other patch
/// as unsupported.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EnvoyFilter {
    pub workload_selector: Option<WorkloadSelector>,
    pub target_refs: Option<Json>,
    pub config_patches: Vec<Json>,
    pub priority: Option<i64>,
}

/// `Sidecar`: what a workload's sidecar may reach. Trellis reads `outboundTrafficPolicy`; the
/// `egress` and `ingress` listeners are reported as not enforced.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Sidecar {
    pub workload_selector: Option<WorkloadSelector>,
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    pub egress: Option<Json>,
    pub ingress: Option<Json>,
    pub inbound_connection_pool: Option<Json>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    /// `ALLOW_ANY` (the default) or `REGISTRY_ONLY`.
    pub mode: Option<String>,
    pub egress_proxy: Option<Json>,
}
