//! Compilation: validated config + one proxy's identity → that proxy's [`Snapshot`].
//!
//! Istio's semantics are decided here, once, so the data plane only looks things up:
//! which VirtualServices bind to which gateway or to the mesh, which match blocks apply to this
//! proxy, which DestinationRule policy applies to which port and subset, which endpoints a subset
//! selects. The output is deterministic: the same inputs give the same snapshot and version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};

use crate::analyze::{hosts_intersect, strip_ns, MESH_GATEWAY};
use crate::encode::{Encoded, Parts};
use crate::model::networking::{
    ClientTlsSettings, DestinationRule, Gateway, HeaderOperations, Headers, HttpMatchRequest, HttpRoute, Labels,
    LoadBalancerSettings, StringMatch, TrafficPolicy, VirtualService,
};
use crate::model::{Duration, Resource, Spec};
use crate::registry::{selects, Protocol, Registry, Service, Workload};
use crate::snapshot::*;

/// Who the snapshot is for and where its listeners go (a proxy's bootstrap).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProxySpec {
    pub role: Role,
    /// The workload (sidecar) or gateway deployment name.
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    /// Where gateway listeners bind.
    pub bind_address: IpAddr,
    /// Gateway server port → local port (Gateway port 80 served on 8080).
    pub port_map: BTreeMap<u16, u16>,
    pub inbound: Vec<InboundSpec>,
    /// The HTTP proxy listener for the workload's egress.
    pub outbound: Option<SocketAddr>,
    pub upstreams: Vec<UpstreamSpec>,
    /// The workload's service account (its identity is
    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`).
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The proxy's admin address (metadata: for `trellis prometheus-config`).
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Transparent capture (a Pod whose traffic iptables redirects to the proxy): the inbound
    /// and outbound listeners that receive it. `inbound` then lists the app's ports, each
    /// served through the capture listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureSpec>,
    /// This instance of the workload (a Pod's name), when there may be several: it keeps their
    /// entries apart in the control plane's status. Nothing is compiled from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// Where captured traffic arrives (Istio's 15006 and 15001 by default).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CaptureSpec {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
}

impl Default for ProxySpec {
    fn default() -> Self {
        ProxySpec {
            role: Role::Sidecar,
            name: String::new(),
            namespace: crate::model::DEFAULT_NAMESPACE.to_string(),
            labels: Labels::new(),
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port_map: BTreeMap::new(),
            inbound: Vec::new(),
            outbound: None,
            upstreams: Vec::new(),
            admin: None,
            capture: None,
            instance: None,
            service_account: default_service_account(),
            trust_domain: default_trust_domain(),
        }
    }
}

/// An inbound listener in front of a local application port.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InboundSpec {
    pub listen: SocketAddr,
    pub app: SocketAddr,
    /// The application protocol if known (`Downstream` otherwise).
    pub protocol: Option<UpstreamProtocol>,
}

/// A local port bound to a named upstream (`host:port`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamSpec {
    pub listen: SocketAddr,
    pub host: String,
    pub port: u16,
}

fn default_service_account() -> String {
    "default".into()
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

/// `spiffe://td/ns/NS/sa/SA`.
pub fn spiffe_uri(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// The label Istio puts on workloads whose sidecar speaks mesh mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// Envoy's default connect timeout, which Istio keeps.
const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Compiles the snapshot for `proxy`.
pub fn compile(resources: &[Resource], extra: &[Workload], proxy: &ProxySpec) -> Snapshot {
    let registry = Registry::build(resources, extra);
    let mut snap = build(resources, &registry, proxy, false);
    snap.version = version_of(&snap);
    snap
}

/// The snapshot without its version. With `skip_shared`, a sidecar's outbound tables for the
/// ports services listen on (what [`Generation`] shares between sidecars) are left out.
fn build(resources: &[Resource], registry: &Registry, proxy: &ProxySpec, skip_shared: bool) -> Snapshot {
    let mut cx = Compiler { resources, registry, proxy, clusters: BTreeMap::new(), skip_shared };
    let mut snap = Snapshot {
        version: String::new(),
        node: NodeInfo {
            role: proxy.role,
            name: proxy.name.clone(),
            namespace: proxy.namespace.clone(),
            labels: proxy.labels.clone(),
            identity: Some(spiffe_uri(&proxy.trust_domain, &proxy.namespace, &proxy.service_account)),
        },
        ..Default::default()
    };
    match proxy.role {
        Role::Gateway => cx.gateway(&mut snap),
        Role::Sidecar => cx.sidecar(&mut snap),
    }
    snap.clusters = std::mem::take(&mut cx.clusters);
    snap.telemetry = telemetry_policy(resources, proxy);
    snap.authorization = authorization(resources, proxy);
    snap.jwt_rules = jwt_rules(resources, proxy);
    snap.rate_limits = rate_limits(resources, proxy);
    snap
}

/// Local rate limits selecting this proxy: EnvoyFilter local_ratelimit patches (selected by
/// `workloadSelector.labels`, in the proxy's namespace or the root namespace) and RateLimits
/// (by `selector.matchLabels`); a RateLimit applies to a sidecar's inbound side and to a
/// gateway's listeners.
fn rate_limits(resources: &[Resource], proxy: &ProxySpec) -> Vec<RateLimitPolicy> {
    let mut out = Vec::new();
    for r in resources {
        match &r.spec {
            Spec::EnvoyFilter(ef) => {
                let labels = ef.workload_selector.as_ref().map(|s| &s.labels).filter(|l| !l.is_empty());
                let in_scope = r.namespace() == proxy.namespace || r.namespace() == ROOT_NAMESPACE;
                if !in_scope || labels.is_some_and(|l| !selects(l, &proxy.labels)) {
                    continue;
                }
                for (_, p) in crate::envoy_filter::patches(&r.id(), ef) {
                    if let crate::envoy_filter::Patch::RateLimit(rl) = p {
                        out.push(rl);
                    }
                }
            }
            Spec::RateLimit(rl) => {
                let sel = rl
                    .selector
                    .as_ref()
                    .map(|s| crate::model::security::WorkloadSelector { match_labels: s.match_labels.clone() });
                if rl.requests == 0 || scope_level(r, sel.as_ref(), proxy).is_none() {
                    continue;
                }
                let interval =
                    rl.interval.filter(|i| !i.0.is_zero()).unwrap_or(Duration(std::time::Duration::from_secs(1)));
                let policy = RateLimitPolicy {
                    name: r.id(),
                    direction: Some(match proxy.role {
                        Role::Gateway => Direction::Gateway,
                        Role::Sidecar => Direction::Inbound,
                    }),
                    routes: None,
                    max_tokens: rl.burst.unwrap_or(rl.requests).max(1),
                    tokens_per_fill: rl.requests,
                    fill_interval: interval,
                    enabled_percent: 100.0,
                    enforced_percent: 100.0,
                    response_headers: Vec::new(),
                };
                if rl.routes.is_empty() {
                    out.push(policy);
                } else {
                    // Named routes are a gateway's or a caller's (outbound): any side.
                    for route in &rl.routes {
                        let routes =
                            Some(crate::snapshot::RouteScope { route: Some(route.clone()), ..Default::default() });
                        out.push(RateLimitPolicy { direction: None, routes, ..policy.clone() });
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// A content hash of a snapshot (its version string): the hash of its resources' hashes, the
/// same the control plane computes for what it ships ([`Encoded`]).
pub fn version_of(snap: &Snapshot) -> String {
    Encoded::new(snap, None).map(|e| e.version).unwrap_or_default()
}

/// One namespace's shared outbound parts, compiled by the first sidecar that needs them.
type SharedCell = Arc<OnceLock<Result<Arc<Parts>, String>>>;

/// What the proxies of one accepted config share: the service registry, and the encoded
/// outbound route tables and clusters of the sidecars of each namespace (they differ only by
/// namespace, trust domain and, when some VirtualService matches `sourceLabels`, labels). The
/// control plane builds one per config generation, so pushing to a thousand sidecars compiles
/// and encodes those tables once per namespace, not once per proxy.
#[derive(Default)]
pub struct Generation {
    registry: Registry,
    source_labels: bool,
    outbound: Mutex<HashMap<String, SharedCell>>,
}

impl Generation {
    pub fn new(resources: &[Resource]) -> Generation {
        let source_labels = virtual_services(resources)
            .any(|(_, vs)| vs.http.iter().flat_map(|h| &h.matches).any(|m| !m.source_labels.is_empty()));
        Generation { registry: Registry::build(resources, &[]), source_labels, outbound: Mutex::default() }
    }

    /// `proxy`'s snapshot, encoded; equal in content and version to [`compile`]'s.
    pub fn compile(&self, resources: &[Resource], proxy: &ProxySpec) -> Result<Encoded, String> {
        let shared = match proxy.role {
            Role::Sidecar if proxy.outbound.is_some() || !proxy.upstreams.is_empty() || proxy.capture.is_some() => {
                Some(self.shared_outbound(resources, proxy)?)
            }
            _ => None,
        };
        let own = build(resources, &self.registry, proxy, shared.is_some());
        Encoded::new(&own, shared).map_err(|e| format!("cannot encode snapshot: {e}"))
    }

    /// Whether `proxy`'s shared parts are compiled already, so that [`Generation::compile`] only
    /// has its own, small, parts left to do.
    pub fn is_warm(&self, proxy: &ProxySpec) -> bool {
        let key = self.shared_key(proxy);
        self.outbound.lock().unwrap_or_else(|p| p.into_inner()).get(&key).is_some_and(|c| c.get().is_some())
    }

    fn shared_key(&self, proxy: &ProxySpec) -> String {
        let labels = if self.source_labels { proxy.labels.clone() } else { Labels::new() };
        format!("{}\0{}\0{:?}", proxy.namespace, proxy.trust_domain, labels)
    }

    fn shared_outbound(&self, resources: &[Resource], proxy: &ProxySpec) -> Result<Arc<Parts>, String> {
        let labels = if self.source_labels { proxy.labels.clone() } else { Labels::new() };
        let key = self.shared_key(proxy);
        let cell = self.outbound.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().clone();
        cell.get_or_init(|| {
            let neutral = ProxySpec {
                namespace: proxy.namespace.clone(),
                trust_domain: proxy.trust_domain.clone(),
                labels,
                outbound: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
                ..ProxySpec::default()
            };
            let snap = build(resources, &self.registry, &neutral, false);
            Parts::encode(&snap.route_tables, &snap.clusters)
                .map(Arc::new)
                .map_err(|e| format!("cannot encode snapshot: {e}"))
        })
        .clone()
    }
}

/// What a workload port speaks, as far as config says.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PortKind {
    Http,
    Tcp,
    /// A Service port whose name and `appProtocol` name no protocol: detected per connection.
    Undeclared,
}

/// A Gateway server as a port's listener serves it: its resource, hosts, and whether it only
/// redirects to HTTPS.
type GatewayServer<'r> = (&'r Resource, Vec<String>, bool);

struct Compiler<'a> {
    resources: &'a [Resource],
    registry: &'a Registry,
    proxy: &'a ProxySpec,
    clusters: BTreeMap<String, Cluster>,
    /// Leave out the outbound tables [`Generation`] shares.
    skip_shared: bool,
}

fn virtual_services(resources: &[Resource]) -> impl Iterator<Item = (&Resource, &VirtualService)> {
    resources.iter().filter_map(|r| match &r.spec {
        Spec::VirtualService(vs) => Some((r, vs)),
        _ => None,
    })
}

impl<'a> Compiler<'a> {
    fn destination_rule(&self, hostname: &str) -> Option<&DestinationRule> {
        self.destination_rule_resource(hostname).and_then(|r| match &r.spec {
            Spec::DestinationRule(dr) => Some(dr),
            _ => None,
        })
    }

    fn destination_rule_resource(&self, hostname: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| match &r.spec {
            Spec::DestinationRule(dr) => self.registry.canonical(&dr.host, r.namespace()) == hostname,
            _ => false,
        })
    }

    // --- gateways ---

    fn gateway(&mut self, snap: &mut Snapshot) {
        // Servers by port: (gateway resource, server hosts, redirect to HTTPS).
        let mut by_port: BTreeMap<u16, Vec<GatewayServer<'_>>> = BTreeMap::new();
        let mut tls_by_port: BTreeMap<u16, ListenerTls> = BTreeMap::new();
        // TCP and TLS-passthrough servers by port: (gateway, server hosts, passthrough).
        let mut l4_by_port: BTreeMap<u16, Vec<GatewayServer<'_>>> = BTreeMap::new();
        // Ports with an ISTIO_MUTUAL server: their listener requires mesh mTLS.
        let mut mesh_ports: BTreeSet<u16> = BTreeSet::new();
        for r in self.resources {
            let Spec::Gateway(Gateway { selector, servers }) = &r.spec else {
                continue;
            };
            if !selects(selector, &self.proxy.labels) {
                continue;
            }
            for (i, s) in servers.iter().enumerate() {
                let proto = Protocol::parse(&s.port.protocol);
                let Ok(port) = u16::try_from(s.port.number) else {
                    continue;
                };
                let tls = s.tls_settings();
                let mode = tls.as_ref().and_then(|t| t.mode.as_deref());
                // ISTIO_MUTUAL: the server ends the mesh's own mTLS (the egress-gateway pattern:
                // sidecars reach it with their workload certificates, as they reach each other).
                let mesh = matches!(proto, Protocol::Https | Protocol::Tls) && mode == Some("ISTIO_MUTUAL");
                let terminated = tls
                    .as_ref()
                    .filter(|_| proto == Protocol::Https && !mesh)
                    .and_then(|t| server_tls(r, i, &s.hosts, t));
                let http = proto.is_http() || (proto == Protocol::Https && (terminated.is_some() || mesh));
                if port == 0 {
                    continue;
                }
                if mesh {
                    mesh_ports.insert(port);
                }
                if !http {
                    let passthrough = matches!(proto, Protocol::Https | Protocol::Tls) && mode == Some("PASSTHROUGH");
                    if proto == Protocol::Tcp || passthrough || mesh {
                        l4_by_port.entry(port).or_default().push((r, s.hosts.clone(), passthrough));
                    }
                    continue;
                }
                if let Some(t) = terminated {
                    tls_by_port.entry(port).or_default().servers.push(t);
                }
                let redirect = tls.as_ref().is_some_and(|t| t.https_redirect) && proto.is_http();
                by_port.entry(port).or_default().push((r, s.hosts.clone(), redirect));
            }
        }
        for (port, servers) in l4_by_port {
            if by_port.contains_key(&port) {
                continue; // HTTP on this port wins, as one listener serves one protocol.
            }
            let proxy = self.gateway_l4(&servers, port);
            let local = self.proxy.port_map.get(&port).copied().unwrap_or(port);
            snap.listeners.push(Listener {
                name: format!("gateway-{port}"),
                address: SocketAddr::new(self.proxy.bind_address, local),
                direction: Direction::Gateway,
                routing: ListenerRouting::Tcp(proxy),
                mtls: mesh_ports.contains(&port).then_some(MtlsMode::Strict),
                tls: None,
                registry_only: false,
            });
        }
        for (port, servers) in by_port {
            let table_name = format!("gateway|{port}");
            let local = self.proxy.port_map.get(&port).copied().unwrap_or(port);
            snap.listeners.push(Listener {
                name: format!("gateway-{port}"),
                address: SocketAddr::new(self.proxy.bind_address, local),
                direction: Direction::Gateway,
                routing: ListenerRouting::Table(table_name.clone()),
                // Certificates the gateway serves win over the mesh's on a port that has both.
                mtls: (mesh_ports.contains(&port) && !tls_by_port.contains_key(&port)).then_some(MtlsMode::Strict),
                tls: tls_by_port.remove(&port),
                registry_only: false,
            });
            let mut vhosts: Vec<VirtualHost> = Vec::new();
            let vss: Vec<(&Resource, &VirtualService)> = virtual_services(self.resources).collect();
            for (vr, vs) in vss {
                for (gr, server_hosts, redirect) in &servers {
                    let gw_name = format!("{}/{}", gr.namespace(), gr.name());
                    let bound = vs.gateways.iter().any(|g| qualify(g, vr.namespace()) == gw_name);
                    if !bound {
                        continue;
                    }
                    for h in &vs.hosts {
                        for sh in server_hosts {
                            if !server_admits_namespace(sh, vr.namespace(), gr.namespace()) {
                                continue;
                            }
                            let sh = strip_ns(sh);
                            if !hosts_intersect(h, sh) {
                                continue;
                            }
                            let domain = more_specific(h, sh).to_ascii_lowercase();
                            let routes = if *redirect {
                                vec![https_redirect(&gw_name)]
                            } else {
                                self.routes(vr, vs, Some(&gw_name), port)
                            };
                            match vhosts.iter_mut().find(|v| v.domains == [domain.clone()]) {
                                Some(v) => v.routes.extend(routes),
                                None => {
                                    vhosts.push(VirtualHost { name: domain.clone(), domains: vec![domain], routes })
                                }
                            }
                        }
                    }
                }
            }
            snap.route_tables.insert(table_name, RouteTable { virtual_hosts: vhosts });
        }
    }

    /// A gateway port's TCP servers (VirtualService `tcp` routes bound to them) or TLS
    /// passthrough servers (`tls` routes, by SNI within the servers' hosts).
    fn gateway_l4(&mut self, servers: &[GatewayServer<'_>], port: u16) -> TcpProxy {
        let passthrough = servers.iter().any(|s| s.2);
        let mut routes = Vec::new();
        let vss: Vec<(&Resource, &VirtualService)> = virtual_services(self.resources).collect();
        for (vr, vs) in vss {
            for (gr, server_hosts, _) in servers {
                let gw_name = format!("{}/{}", gr.namespace(), gr.name());
                if !vs.gateways.iter().any(|g| qualify(g, vr.namespace()) == gw_name) {
                    continue;
                }
                let for_this = |gateways: &[String], p: Option<u32>| {
                    (gateways.is_empty() || gateways.iter().any(|g| qualify(g, vr.namespace()) == gw_name))
                        && p.is_none_or(|p| p == u32::from(port))
                };
                let hosts: Vec<&str> = server_hosts.iter().map(|h| strip_ns(h)).collect();
                if passthrough {
                    for (i, tr) in vs.tls.iter().enumerate() {
                        let mut sni: Vec<String> = Vec::new();
                        let mut applies = false;
                        for m in tr.matches.iter().filter(|m| for_this(&m.gateways, m.port)) {
                            applies = true;
                            // SNI names within what the server admits.
                            sni.extend(
                                m.sni_hosts
                                    .iter()
                                    .filter(|h| hosts.iter().any(|sh| hosts_intersect(h, sh)))
                                    .map(|h| h.to_ascii_lowercase()),
                            );
                        }
                        if !applies || sni.is_empty() {
                            continue;
                        }
                        let destinations = self.l4_destinations(vr, &tr.route, port);
                        if !destinations.is_empty() {
                            routes.push(TcpRoute {
                                name: format!("{} tls[{i}]", vr.id()),
                                destination_subnets: Vec::new(),
                                sni_hosts: sni,
                                destinations,
                            });
                        }
                    }
                } else {
                    for (i, tr) in vs.tcp.iter().enumerate() {
                        if !tr.matches.is_empty() && !tr.matches.iter().any(|m| for_this(&m.gateways, m.port)) {
                            continue;
                        }
                        let destinations = self.l4_destinations(vr, &tr.route, port);
                        if !destinations.is_empty() {
                            routes.push(TcpRoute {
                                name: format!("{} tcp[{i}]", vr.id()),
                                destination_subnets: Vec::new(),
                                sni_hosts: Vec::new(),
                                destinations,
                            });
                        }
                    }
                }
            }
        }
        TcpProxy { routes, sni: passthrough }
    }

    /// The clusters and weights of an L4 route's destinations that resolve.
    fn l4_destinations(
        &mut self,
        r: &Resource,
        route: &[crate::model::networking::RouteDestination],
        port: u16,
    ) -> Vec<(String, u32)> {
        route
            .iter()
            .filter(|d| self.registry.resolve(&d.destination.host, r.namespace()).is_some())
            .map(|d| {
                let dest_port = d.destination.port.as_ref().map(|p| p.number as u16);
                let cluster = self.cluster_for(
                    &d.destination.host,
                    r.namespace(),
                    dest_port,
                    port,
                    d.destination.subset.as_deref(),
                );
                (cluster, d.weight.unwrap_or(if route.len() == 1 { 100 } else { 0 }).max(0) as u32)
            })
            .collect()
    }

    // --- sidecars ---

    fn sidecar(&mut self, snap: &mut Snapshot) {
        let capture = self.proxy.capture;
        let mut captured_inbound: BTreeMap<u16, CapturedPort> = BTreeMap::new();
        for ib in &self.proxy.inbound {
            // Captured: tables by the app's port (the connection's original destination).
            let port = if capture.is_some() { ib.app.port() } else { ib.listen.port() };
            let cluster = format!("inbound|{port}||");
            self.clusters.insert(
                cluster.clone(),
                Cluster {
                    name: cluster.clone(),
                    service: self.proxy.name.clone(),
                    service_name: self.proxy.name.clone(),
                    service_namespace: self.proxy.namespace.clone(),
                    port: ib.app.port(),
                    subset: None,
                    protocol: ib.protocol.unwrap_or(UpstreamProtocol::Downstream),
                    lb: LbPolicy::RoundRobin,
                    connect_timeout: Duration(DEFAULT_CONNECT_TIMEOUT),
                    endpoints: vec![Endpoint {
                        address: ib.app.to_string(),
                        labels: self.proxy.labels.clone(),
                        weight: 1,
                        workload: Some(self.proxy.name.clone()),
                        namespace: Some(self.proxy.namespace.clone()),
                        identity: None,
                        mtls: false,
                    }],
                    tls: None,
                    retry_budget: RetryBudget::default(),
                    outlier: None,
                    pool: PoolPolicy::default(),
                    source: None,
                },
            );
            let mtls = peer_authentication(self.resources, self.proxy, ib.app.port());
            let kind = match ib.protocol {
                Some(UpstreamProtocol::Tcp) => PortKind::Tcp,
                Some(_) => PortKind::Http,
                None => self.inbound_kind(ib),
            };
            // Undeclared: TCP when the first bytes are not an HTTP request.
            let detect = (kind == PortKind::Undeclared)
                .then(|| TcpProxy { routes: vec![default_tcp_route(cluster.clone())], sni: false });
            if kind == PortKind::Tcp {
                let tcp = TcpProxy { routes: vec![default_tcp_route(cluster)], sni: false };
                if capture.is_some() {
                    let table = format!("inbound|{port}");
                    captured_inbound
                        .insert(port, CapturedPort { table, mtls: Some(mtls), tcp: Some(tcp), detect: false });
                    continue;
                }
                snap.listeners.push(Listener {
                    name: format!("inbound-{port}"),
                    address: ib.listen,
                    direction: Direction::Inbound,
                    routing: ListenerRouting::Tcp(tcp),
                    mtls: Some(mtls),
                    tls: None,
                    registry_only: false,
                });
                continue;
            }
            let table = format!("inbound|{port}");
            snap.route_tables.insert(
                table.clone(),
                RouteTable {
                    virtual_hosts: vec![VirtualHost {
                        name: "inbound".into(),
                        domains: vec!["*".into()],
                        routes: vec![Route {
                            name: "default".into(),
                            source: None,
                            matches: Vec::new(),
                            action: Action::Forward(Forward {
                                destinations: vec![WeightedCluster {
                                    cluster,
                                    weight: 100,
                                    request_headers: HeaderOps::default(),
                                    response_headers: HeaderOps::default(),
                                }],
                                rewrite: None,
                            }),
                            request_headers: HeaderOps::default(),
                            response_headers: HeaderOps::default(),
                            timeout: None,
                            // The app next door: no retries (Istio retries on the client side only).
                            retry: None,
                            fault: None,
                            cors: None,
                            mirrors: Vec::new(),
                        }],
                    }],
                },
            );
            if capture.is_some() {
                captured_inbound.insert(
                    port,
                    CapturedPort { table, mtls: Some(mtls), tcp: detect.clone(), detect: detect.is_some() },
                );
                continue;
            }
            let routing = match detect {
                Some(tcp) => ListenerRouting::Detect { http: Box::new(ListenerRouting::Table(table)), tcp },
                None => ListenerRouting::Table(table),
            };
            snap.listeners.push(Listener {
                name: format!("inbound-{port}"),
                address: ib.listen,
                direction: Direction::Inbound,
                routing,
                mtls: Some(mtls),
                tls: None,
                registry_only: false,
            });
        }
        if let Some(c) = capture {
            // Ports the app did not declare: the workload-wide mode (port 0 matches no
            // port-level setting).
            let passthrough_mtls = Some(peer_authentication(self.resources, self.proxy, 0));
            snap.listeners.push(Listener {
                name: "inbound-capture".into(),
                address: c.inbound,
                direction: Direction::Inbound,
                routing: ListenerRouting::OriginalDst { ports: captured_inbound, passthrough_mtls },
                mtls: None,
                tls: None,
                registry_only: false,
            });
        }
        if self.proxy.outbound.is_none() && self.proxy.upstreams.is_empty() && capture.is_none() {
            return;
        }
        let registry_only = outbound_traffic_policy(self.resources, self.proxy) == "REGISTRY_ONLY";
        // Outbound tables, one per port any service listens on (and 80 for plain `http://name`).
        let mut shared: BTreeSet<u16> =
            self.registry.services.iter().flat_map(|s| s.ports.iter().map(|p| p.number)).collect();
        shared.insert(80);
        let mut ports = if self.skip_shared { BTreeSet::new() } else { shared.clone() };
        ports.extend(self.proxy.upstreams.iter().map(|u| u.port).filter(|p| !self.skip_shared || !shared.contains(p)));
        for port in ports {
            let table = self.outbound_table(port);
            snap.route_tables.insert(outbound_table(port), table);
        }
        if let Some(c) = capture {
            // Every port a service speaks HTTP on is served as HTTP; any other destination
            // passes through as TCP.
            let http_ports: BTreeSet<u16> = self
                .registry
                .services
                .iter()
                .flat_map(|s| s.ports.iter().filter(|p| p.protocol.is_http()).map(|p| p.number))
                .collect();
            let mut ports: BTreeMap<u16, CapturedPort> = http_ports
                .into_iter()
                .map(|p| (p, CapturedPort { table: outbound_table(p), mtls: None, tcp: None, detect: false }))
                .collect();
            // Ports a service declares TCP, or declares no protocol for (detected per connection:
            // HTTP by its table, else TCP): by the service's ClusterIP (the connection's original
            // destination), each service's own routes; any other address passes through.
            let registry = self.registry;
            for svc in &registry.services {
                let ips: Vec<String> =
                    svc.aliases.iter().filter(|a| a.parse::<IpAddr>().is_ok()).map(|a| format!("{a}/32")).collect();
                if ips.is_empty() {
                    continue;
                }
                for p in svc.ports.iter().filter(|p| p.protocol.is_opaque() || p.protocol == Protocol::Unknown) {
                    if ports.get(&p.number).is_some_and(|c| c.tcp.is_none()) {
                        continue; // Another service serves HTTP on this port number.
                    }
                    let mut proxy = self.tcp_proxy(svc, p.number);
                    for r in &mut proxy.routes {
                        if r.destination_subnets.is_empty() {
                            r.destination_subnets = ips.clone();
                        }
                    }
                    let entry = ports.entry(p.number).or_insert_with(|| CapturedPort {
                        table: outbound_table(p.number),
                        mtls: None,
                        tcp: Some(TcpProxy::default()),
                        detect: false,
                    });
                    if let Some(t) = &mut entry.tcp {
                        t.sni |= proxy.sni;
                        t.routes.extend(proxy.routes);
                    }
                    entry.detect |= p.protocol == Protocol::Unknown;
                }
            }
            snap.listeners.push(Listener {
                name: "outbound-capture".into(),
                address: c.outbound,
                direction: Direction::Outbound,
                routing: ListenerRouting::OriginalDst { ports, passthrough_mtls: None },
                mtls: None,
                tls: None,
                registry_only,
            });
        }
        if let Some(addr) = self.proxy.outbound {
            snap.listeners.push(Listener {
                name: "outbound".into(),
                address: addr,
                direction: Direction::Outbound,
                routing: ListenerRouting::ByRequestPort,
                mtls: None,
                tls: None,
                registry_only,
            });
        }
        for u in &self.proxy.upstreams {
            // A service port declared TCP (or TLS, which the app speaks itself) is proxied as TCP.
            let svc = self.registry.resolve(&u.host, &self.proxy.namespace).cloned();
            let protocol = svc.as_ref().and_then(|s| s.port(u.port)).map(|p| p.protocol);
            let fixed = ListenerRouting::Fixed { host: u.host.clone(), port: u.port };
            let routing = match (svc, protocol) {
                (Some(svc), Some(p)) if p.is_opaque() => ListenerRouting::Tcp(self.tcp_proxy(&svc, u.port)),
                // Undeclared: HTTP if the app speaks it first, else TCP.
                (Some(svc), Some(Protocol::Unknown)) => {
                    ListenerRouting::Detect { http: Box::new(fixed), tcp: self.tcp_proxy(&svc, u.port) }
                }
                _ => fixed,
            };
            snap.listeners.push(Listener {
                name: format!("upstream-{}", u.listen.port()),
                address: u.listen,
                direction: Direction::Outbound,
                routing,
                mtls: None,
                tls: None,
                registry_only,
            });
        }
    }

    /// What this workload's `app_port` speaks when its proxy was not told: as Istio reads it,
    /// from the Service ports that select the workload and target that port — TCP when they
    /// declare an opaque protocol, undeclared when their name says none, HTTP otherwise (and
    /// when no Service names the port, as before).
    fn inbound_kind(&self, ib: &InboundSpec) -> PortKind {
        // Endpoints name the app's port (a Pod's container port), or, for `trellis up`
        // workloads, the sidecar's inbound port in front of it.
        let ports = [ib.app.port(), ib.listen.port()];
        let me = self.proxy;
        let ip = me.bind_address.to_string();
        let protocol = self.registry.services.iter().find_map(|svc| {
            let w = svc.endpoints.iter().find(|w| {
                w.namespace == me.namespace && (w.name == me.name || (!ip.starts_with("127.") && w.address == ip))
            })?;
            svc.ports.iter().find(|p| ports.contains(&w.port_for(p))).map(|p| p.protocol)
        });
        match protocol {
            Some(p) if p.is_opaque() => PortKind::Tcp,
            Some(Protocol::Unknown) => PortKind::Undeclared,
            _ => PortKind::Http,
        }
    }

    /// TCP to `svc`'s `port` as this sidecar sees it: the `tcp` routes of the first mesh
    /// VirtualService claiming the service (their matches on port, source labels and namespace
    /// decided here; destination subnets per connection), else the service's own cluster.
    fn tcp_proxy(&mut self, svc: &Service, port: u16) -> TcpProxy {
        let claimed = virtual_services(self.resources).find(|(r, vs)| {
            let for_mesh = vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == MESH_GATEWAY);
            for_mesh
                && (!vs.tcp.is_empty() || !vs.tls.is_empty())
                && vs
                    .hosts
                    .iter()
                    .any(|h| self.registry.resolve(h, r.namespace()).is_some_and(|s| s.hostname == svc.hostname))
        });
        let mut routes = Vec::new();
        let mut sni = false;
        if let Some((r, vs)) = claimed {
            // TLS the app speaks itself: `tls` routes by the ClientHello's SNI, before `tcp` ones.
            for (i, tr) in vs.tls.iter().enumerate() {
                let names: Vec<String> = tr
                    .matches
                    .iter()
                    .filter(|m| {
                        (m.gateways.is_empty() || m.gateways.iter().any(|g| g == MESH_GATEWAY))
                            && selects(&m.source_labels, &self.proxy.labels)
                            && m.source_namespace.as_ref().is_none_or(|n| n == &self.proxy.namespace)
                            && m.port.is_none_or(|p| p == u32::from(port))
                    })
                    .flat_map(|m| m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()))
                    .collect();
                if names.is_empty() {
                    continue;
                }
                let destinations = self.l4_destinations(r, &tr.route, port);
                if destinations.is_empty() {
                    continue;
                }
                sni = true;
                routes.push(TcpRoute {
                    name: format!("{} tls[{i}]", r.id()),
                    destination_subnets: Vec::new(),
                    sni_hosts: names,
                    destinations,
                });
            }
            for (i, tr) in vs.tcp.iter().enumerate() {
                let applies: Vec<&crate::model::networking::L4MatchAttributes> = tr
                    .matches
                    .iter()
                    .filter(|m| {
                        (m.gateways.is_empty() || m.gateways.iter().any(|g| g == MESH_GATEWAY))
                            && selects(&m.source_labels, &self.proxy.labels)
                            && m.source_namespace.as_ref().is_none_or(|n| n == &self.proxy.namespace)
                            && m.port.is_none_or(|p| p == u32::from(port))
                    })
                    .collect();
                if !tr.matches.is_empty() && applies.is_empty() {
                    continue;
                }
                // Several match blocks: any may hold; a block without subnets matches every address.
                let destination_subnets = if applies.iter().any(|m| m.destination_subnets.is_empty()) {
                    Vec::new()
                } else {
                    applies.iter().flat_map(|m| m.destination_subnets.clone()).collect()
                };
                let destinations = self.l4_destinations(r, &tr.route, port);
                if destinations.is_empty() {
                    continue;
                }
                routes.push(TcpRoute {
                    name: format!("{} tcp[{i}]", r.id()),
                    destination_subnets,
                    sni_hosts: Vec::new(),
                    destinations,
                });
            }
        }
        if routes.is_empty() || sni {
            // Connections no `tls` route names (or without SNI) go to the service itself.
            routes.push(default_tcp_route(self.cluster(&svc.hostname, &svc.namespace, port, None)));
        }
        TcpProxy { routes, sni }
    }

    fn outbound_table(&mut self, port: u16) -> RouteTable {
        let ns = self.proxy.namespace.clone();
        // The first mesh VirtualService claiming a host wins (Istio's rule for sidecars).
        let mut claimed: BTreeMap<String, (&'a Resource, &'a VirtualService)> = BTreeMap::new();
        let mut unresolved: Vec<(String, &'a Resource, &'a VirtualService)> = Vec::new();
        let registry = self.registry;
        for (r, vs) in virtual_services(self.resources) {
            let for_mesh = vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == MESH_GATEWAY);
            if !for_mesh {
                continue;
            }
            for h in &vs.hosts {
                match registry.resolve(h, r.namespace()) {
                    Some(svc) if !h.starts_with('*') => {
                        claimed.entry(svc.hostname.clone()).or_insert((r, vs));
                    }
                    _ => unresolved.push((h.to_ascii_lowercase(), r, vs)),
                }
            }
        }
        let mut vhosts = Vec::new();
        let services: Vec<&Service> =
            registry.services.iter().filter(|s| s.port(port).is_some() && !s.hostname.starts_with('*')).collect();
        for svc in services {
            let domains = svc.domains(&ns);
            let routes = match claimed.get(&svc.hostname) {
                Some((r, vs)) => self.routes(r, vs, None, port),
                None => {
                    let cluster = self.cluster(&svc.hostname, &svc.namespace, port, None);
                    vec![default_route(cluster)]
                }
            };
            vhosts.push(VirtualHost { name: format!("{}:{port}", svc.hostname), domains, routes });
        }
        for (h, r, vs) in unresolved {
            let routes = self.routes(r, vs, None, port);
            if !routes.is_empty() {
                vhosts.push(VirtualHost { name: format!("{h}:{port}"), domains: vec![h], routes });
            }
        }
        RouteTable { virtual_hosts: vhosts }
    }

    // --- routes ---

    /// The routes of a VirtualService as seen by one gateway (`Some(ns/name)`) or by the mesh.
    fn routes(&mut self, r: &Resource, vs: &VirtualService, gateway: Option<&str>, port: u16) -> Vec<Route> {
        let mut out = Vec::new();
        for (i, hr) in vs.http.iter().enumerate() {
            let matches: Vec<RouteMatch> = hr
                .matches
                .iter()
                .filter(|m| self.match_applies(m, r.namespace(), gateway, port))
                .map(compile_match)
                .collect();
            if !hr.matches.is_empty() && matches.is_empty() {
                continue; // No match block applies to this proxy.
            }
            let Some(action) = self.action(r, hr, port) else {
                continue;
            };
            let (request_headers, response_headers) = header_ops(hr.headers.as_ref());
            out.push(Route {
                name: hr.name.clone().unwrap_or_else(|| format!("{}.{}.{i}", r.name(), r.namespace())),
                source: Some(format!("{} http[{i}]", r.id())),
                matches,
                action,
                request_headers,
                response_headers,
                timeout: hr.timeout.filter(|t| !t.0.is_zero()),
                retry: retry_policy(hr.retries.as_ref()),
                fault: hr.fault.as_ref().and_then(fault),
                cors: hr.cors_policy.as_ref().map(cors),
                mirrors: self.mirrors(hr, r.namespace(), port),
            });
        }
        out
    }

    fn match_applies(&self, m: &HttpMatchRequest, ns: &str, gateway: Option<&str>, port: u16) -> bool {
        if !m.gateways.is_empty() {
            let ok = match gateway {
                Some(gw) => m.gateways.iter().any(|g| qualify(g, ns) == gw),
                None => m.gateways.iter().any(|g| g == MESH_GATEWAY),
            };
            if !ok {
                return false;
            }
        }
        if !selects(&m.source_labels, &self.proxy.labels) {
            return false;
        }
        if let Some(sn) = &m.source_namespace {
            if sn != &self.proxy.namespace {
                return false;
            }
        }
        // On sidecars a port match selects the outbound table; gateways check it per request
        // against the listener port, which is this table's port too.
        m.port.is_none_or(|p| p == u32::from(port))
    }

    fn action(&mut self, r: &Resource, hr: &HttpRoute, port: u16) -> Option<Action> {
        if let Some(d) = &hr.direct_response {
            let body = d.body.as_ref().and_then(|b| b.string.clone().or_else(|| b.bytes.clone())).unwrap_or_default();
            return Some(Action::Direct { status: d.status as u16, body });
        }
        if let Some(rd) = &hr.redirect {
            return Some(Action::Redirect(Redirect {
                uri: rd.uri.clone(),
                authority: rd.authority.clone(),
                port: rd.port.and_then(|p| u16::try_from(p).ok()),
                port_from_request: rd.derive_port.as_deref() == Some("FROM_REQUEST_PORT"),
                scheme: rd.scheme.clone(),
                code: rd.redirect_code.map(|c| c as u16).unwrap_or(301),
            }));
        }
        if hr.route.is_empty() {
            return None;
        }
        let single = hr.route.len() == 1;
        let destinations = hr
            .route
            .iter()
            .map(|d| {
                let dest_port = d.destination.port.as_ref().and_then(|p| u16::try_from(p.number).ok());
                let cluster = self.cluster_for(
                    &d.destination.host,
                    r.namespace(),
                    dest_port,
                    port,
                    d.destination.subset.as_deref(),
                );
                let (request_headers, response_headers) = header_ops(d.headers.as_ref());
                WeightedCluster {
                    cluster,
                    weight: if single { 100 } else { d.weight.unwrap_or(0).max(0) as u32 },
                    request_headers,
                    response_headers,
                }
            })
            .collect();
        let rewrite = hr.rewrite.as_ref().map(|rw| Rewrite {
            uri: rw.uri.clone(),
            authority: rw.authority.clone(),
            uri_regex: rw.uri_regex_rewrite.as_ref().map(|x| (x.pattern.clone(), x.rewrite.clone())),
        });
        Some(Action::Forward(Forward { destinations, rewrite }))
    }

    /// The cluster for a destination: its port is the one named, else the service's only port,
    /// else the port the request came for.
    /// `mirror` (+ `mirrorPercentage`, or the deprecated `mirrorPercent`) and `mirrors`: the
    /// clusters to copy requests to (hosts that do not resolve mirror nothing).
    fn mirrors(&mut self, hr: &crate::model::networking::HttpRoute, ns: &str, port: u16) -> Vec<Mirror> {
        let share = |p: Option<&crate::model::networking::Percent>, legacy: Option<i64>| {
            p.map(|p| p.value).or(legacy.map(|l| l as f64)).unwrap_or(100.0).clamp(0.0, 100.0)
        };
        let mut out = Vec::new();
        let mut add = |this: &mut Self, d: &crate::model::networking::Destination, percent: f64| {
            if d.host.is_empty() || this.registry.resolve(&d.host, ns).is_none() {
                return;
            }
            let dest_port = d.port.as_ref().map(|p| p.number as u16);
            let cluster = this.cluster_for(&d.host, ns, dest_port, port, d.subset.as_deref());
            out.push(Mirror { cluster, percent });
        };
        if let Some(m) = &hr.mirror {
            add(self, m, share(hr.mirror_percentage.as_ref(), hr.mirror_percent));
        }
        for m in hr.mirrors.iter().flatten() {
            add(self, &m.destination, share(m.percentage.as_ref(), None));
        }
        out
    }

    fn cluster_for(
        &mut self,
        host: &str,
        ns: &str,
        dest_port: Option<u16>,
        req_port: u16,
        subset: Option<&str>,
    ) -> String {
        let (hostname, svc_ns, port) = match self.registry.resolve(host, ns) {
            Some(svc) => {
                let port =
                    dest_port.unwrap_or_else(|| if svc.ports.len() == 1 { svc.ports[0].number } else { req_port });
                let hostname =
                    if svc.hostname.starts_with('*') { host.to_ascii_lowercase() } else { svc.hostname.clone() };
                (hostname, svc.namespace.clone(), port)
            }
            None => (host.to_ascii_lowercase(), ns.to_string(), dest_port.unwrap_or(req_port)),
        };
        self.cluster(&hostname, &svc_ns, port, subset)
    }

    fn cluster(&mut self, hostname: &str, ns: &str, port: u16, subset: Option<&str>) -> String {
        let name = format!("outbound|{port}|{}|{hostname}", subset.unwrap_or(""));
        if self.clusters.contains_key(&name) {
            return name;
        }
        let svc = self.registry.resolve(hostname, ns).cloned();
        let dr = self.destination_rule(hostname).cloned();
        let subset_def = subset.and_then(|s| dr.as_ref().and_then(|d| d.subsets.iter().find(|x| x.name == s)).cloned());
        // Policy precedence: subset (port level, then whole) over rule (port level, then whole).
        let lb = [
            subset_def.as_ref().and_then(|s| s.traffic_policy.as_ref()),
            dr.as_ref().and_then(|d| d.traffic_policy.as_ref()),
        ]
        .into_iter()
        .flatten()
        .find_map(|tp| lb_settings(tp, port))
        .map(lb_policy)
        .unwrap_or(LbPolicy::RoundRobin);
        let (protocol, endpoints) = match &svc {
            None => (UpstreamProtocol::Downstream, Vec::new()),
            Some(svc) => {
                let sp = svc.port(port).cloned();
                let protocol = match sp.as_ref().map(|p| p.protocol) {
                    Some(Protocol::Http) => UpstreamProtocol::Http1,
                    Some(Protocol::Http2 | Protocol::Grpc) => UpstreamProtocol::Http2,
                    _ => UpstreamProtocol::Downstream,
                };
                let endpoints = match &sp {
                    None => Vec::new(),
                    Some(_) if svc.resolve_dns => vec![Endpoint {
                        address: format!("{}:{}", svc.hostname, sp.as_ref().map(|p| p.number).unwrap_or(port)),
                        labels: Labels::new(),
                        weight: 1,
                        workload: None,
                        namespace: None,
                        identity: None,
                        mtls: false,
                    }],
                    Some(sp) => svc
                        .endpoints
                        .iter()
                        .filter(|w| subset_def.as_ref().is_none_or(|s| selects(&s.labels, &w.labels)))
                        .filter(|_| subset.is_none() || subset_def.is_some())
                        .filter(|w| w.has_address())
                        .map(|w| Endpoint {
                            address: join_host_port(&w.address, w.port_for(sp)),
                            labels: w.labels.clone(),
                            weight: w.weight,
                            workload: Some(w.name.clone()),
                            namespace: Some(w.namespace.clone()),
                            identity: Some(spiffe_uri(
                                &self.proxy.trust_domain,
                                &w.namespace,
                                w.service_account.as_deref().unwrap_or("default"),
                            )),
                            mtls: w.labels.get(TLS_MODE_LABEL).is_some_and(|m| m == "istio"),
                        })
                        .collect(),
                };
                (protocol, endpoints)
            }
        };
        let (service_name, service_namespace) = match &svc {
            Some(s) => (s.short_name.clone().unwrap_or_else(|| s.hostname.clone()), s.namespace.clone()),
            None => (hostname.to_string(), ns.to_string()),
        };
        // TLS: the DestinationRule's mode if it sets one (subset, then port level, then whole),
        // else auto mTLS when every endpoint has a mesh sidecar.
        let tls_setting = [
            subset_def.as_ref().and_then(|s| s.traffic_policy.as_ref()),
            dr.as_ref().and_then(|d| d.traffic_policy.as_ref()),
        ]
        .into_iter()
        .flatten()
        .find_map(|tp| tls_settings(tp, port))
        .cloned();
        let retry_budget = [
            subset_def.as_ref().and_then(|s| s.traffic_policy.as_ref()),
            dr.as_ref().and_then(|d| d.traffic_policy.as_ref()),
        ]
        .into_iter()
        .flatten()
        .find_map(|tp| tp.retry_budget.as_ref())
        .map(|b| {
            let d = RetryBudget::default();
            RetryBudget {
                percent: b.percent.as_ref().map(|p| p.value).unwrap_or(d.percent),
                min_concurrency: b.min_retry_concurrency.unwrap_or(d.min_concurrency),
            }
        })
        .unwrap_or_default();
        let outlier = [
            subset_def.as_ref().and_then(|s| s.traffic_policy.as_ref()),
            dr.as_ref().and_then(|d| d.traffic_policy.as_ref()),
        ]
        .into_iter()
        .flatten()
        .find_map(|tp| outlier_settings(tp, port))
        .map(outlier_policy);
        let pool_setting = [
            subset_def.as_ref().and_then(|s| s.traffic_policy.as_ref()),
            dr.as_ref().and_then(|d| d.traffic_policy.as_ref()),
        ]
        .into_iter()
        .flatten()
        .find_map(|tp| pool_settings(tp, port));
        let pool = pool_setting.map(pool_policy).unwrap_or_default();
        let connect_timeout = pool_setting
            .and_then(|p| p.tcp.as_ref()?.connect_timeout)
            .filter(|t| !t.0.is_zero())
            .unwrap_or(Duration(DEFAULT_CONNECT_TIMEOUT));
        let mesh_tls = || UpstreamTls::IstioMutual {
            identities: {
                let mut ids: Vec<String> = endpoints.iter().filter_map(|e| e.identity.clone()).collect();
                ids.sort();
                ids.dedup();
                ids
            },
        };
        let tls = match tls_setting.as_ref().and_then(|t| t.mode.as_deref()) {
            Some("DISABLE") => None,
            Some("ISTIO_MUTUAL") => Some(mesh_tls()),
            Some(mode @ ("SIMPLE" | "MUTUAL")) => {
                let t = tls_setting.clone().unwrap_or_default();
                Some(UpstreamTls::Origination {
                    sni: t.sni.clone(),
                    ca_certificates: t.ca_certificates.clone(),
                    client_certificate: if mode == "MUTUAL" { t.client_certificate.clone() } else { None },
                    private_key: if mode == "MUTUAL" { t.private_key.clone() } else { None },
                    subject_alt_names: t.subject_alt_names.clone(),
                    insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
                })
            }
            _ if !endpoints.is_empty() && endpoints.iter().all(|e| e.mtls) => Some(mesh_tls()),
            _ => None,
        };
        self.clusters.insert(
            name.clone(),
            Cluster {
                name: name.clone(),
                service: hostname.to_string(),
                service_name,
                service_namespace,
                port,
                subset: subset.map(str::to_string),
                protocol,
                lb,
                connect_timeout,
                endpoints,
                tls,
                retry_budget,
                outlier,
                pool,
                source: self.destination_rule_resource(hostname).map(Resource::id),
            },
        );
        name
    }
}

/// Istio's root namespace: `Telemetry` there without a selector applies mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// Merges `Telemetry` resources for one proxy: mesh-wide, then its namespace, then those
/// selecting its workload (later ones override field by field).
fn telemetry_policy(resources: &[Resource], proxy: &ProxySpec) -> TelemetryPolicy {
    let mut layers: Vec<(u8, &crate::model::telemetry::Telemetry)> = Vec::new();
    for r in resources {
        let Spec::Telemetry(t) = &r.spec else { continue };
        let selected = t.selector.as_ref().map(|s| s.match_labels.clone()).filter(|l| !l.is_empty());
        let level = match (r.namespace(), selected) {
            (ns, None) if ns == ROOT_NAMESPACE => 0,
            (ns, None) if ns == proxy.namespace => 1,
            (ns, Some(labels)) if ns == proxy.namespace && selects(&labels, &proxy.labels) => 2,
            _ => continue,
        };
        layers.push((level, t));
    }
    layers.sort_by_key(|(l, _)| *l);
    let mut p = TelemetryPolicy::default();
    for (_, t) in layers {
        for tr in &t.tracing {
            if tr.random_sampling_percentage.is_some() {
                p.sampling_percent = tr.random_sampling_percentage;
            }
            if tr.disable_span_reporting.is_some() {
                p.span_reporting_disabled = tr.disable_span_reporting;
            }
        }
        for al in &t.access_logging {
            p.access_log = Some(!al.disabled.unwrap_or(false));
            if let Some(f) = &al.filter {
                p.access_log_filter = crate::filter::Filter::parse(&f.expression).ok().map(|_| f.expression.clone());
            }
        }
    }
    p
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The `outboundTrafficPolicy.mode` in force for `proxy`, as Istio picks its Sidecar: one in the
/// workload's namespace selecting it, else that namespace's without a selector, else the root
/// namespace's without a selector (the mesh default); `ALLOW_ANY` when none says.
fn outbound_traffic_policy<'r>(resources: &'r [Resource], proxy: &ProxySpec) -> &'r str {
    let sidecars = || {
        resources.iter().filter_map(|r| match &r.spec {
            Spec::Sidecar(sc) => Some((r, sc)),
            _ => None,
        })
    };
    let mode =
        |sc: &'r crate::model::networking::Sidecar| sc.outbound_traffic_policy.as_ref().and_then(|p| p.mode.as_deref());
    let selecting = sidecars().find(|(r, sc)| {
        r.namespace() == proxy.namespace
            && sc.workload_selector.as_ref().is_some_and(|s| !s.labels.is_empty() && selects(&s.labels, &proxy.labels))
    });
    let namespace = || {
        sidecars().find(|(r, sc)| {
            r.namespace() == proxy.namespace && sc.workload_selector.as_ref().is_none_or(|s| s.labels.is_empty())
        })
    };
    let root = || {
        sidecars().find(|(r, sc)| {
            r.namespace() == ROOT_NAMESPACE && sc.workload_selector.as_ref().is_none_or(|s| s.labels.is_empty())
        })
    };
    selecting.or_else(namespace).or_else(root).and_then(|(_, sc)| mode(sc)).unwrap_or("ALLOW_ANY")
}

/// `httpsRedirect`: every request is sent to the same URL over HTTPS (301), as Envoy's
/// `require_tls`.
fn https_redirect(gateway: &str) -> Route {
    Route {
        name: format!("https-redirect.{gateway}"),
        source: None,
        matches: Vec::new(),
        action: Action::Redirect(Redirect {
            uri: None,
            authority: None,
            port: None,
            port_from_request: false,
            scheme: Some("https".into()),
            code: 301,
        }),
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        timeout: None,
        retry: None,
        fault: None,
        cors: None,
        mirrors: Vec::new(),
    }
}

/// The TLS a Gateway server terminates (`SIMPLE`, `MUTUAL`), if it does.
fn server_tls(
    r: &Resource,
    i: usize,
    hosts: &[String],
    t: &crate::model::networking::ServerTlsSettings,
) -> Option<TlsServer> {
    let mutual = match t.mode.as_deref().unwrap_or("SIMPLE") {
        "SIMPLE" => false,
        "MUTUAL" | "OPTIONAL_MUTUAL" => true,
        _ => return None,
    };
    let credential = match (&t.credential_name, &t.server_certificate, &t.private_key) {
        (Some(name), _, _) => TlsCredential::Named(name.clone()),
        (None, Some(cert), Some(key)) => TlsCredential::Files {
            certificate: cert.clone(),
            private_key: key.clone(),
            ca_certificates: t.ca_certificates.clone(),
        },
        _ => return None,
    };
    Some(TlsServer {
        hosts: hosts.iter().map(|h| strip_ns(h).to_ascii_lowercase()).collect(),
        credential,
        mutual,
        subject_alt_names: t.subject_alt_names.clone(),
        min_version: t.min_protocol_version.clone().filter(|v| v != "TLS_AUTO"),
        max_version: t.max_protocol_version.clone().filter(|v| v != "TLS_AUTO"),
        cipher_suites: t.cipher_suites.clone(),
        source: format!("{} servers[{i}]", r.id()),
    })
}

fn default_tcp_route(cluster: String) -> TcpRoute {
    TcpRoute {
        name: "default".into(),
        destination_subnets: Vec::new(),
        sni_hosts: Vec::new(),
        destinations: vec![(cluster, 100)],
    }
}

fn default_route(cluster: String) -> Route {
    Route {
        name: "default".into(),
        source: None,
        matches: Vec::new(),
        action: Action::Forward(Forward {
            destinations: vec![WeightedCluster {
                cluster,
                weight: 100,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
            }],
            rewrite: None,
        }),
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        timeout: None,
        retry: Some(RetryPolicy::istio_default()),
        fault: None,
        cors: None,
        mirrors: Vec::new(),
    }
}

fn cors(c: &crate::model::networking::CorsPolicy) -> Cors {
    let mut allow_origins: Vec<StringMatcher> = c.allow_origins.iter().filter_map(string_matcher).collect();
    allow_origins.extend(c.allow_origin.iter().map(|o| StringMatcher::Exact(o.clone())));
    Cors {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age: c.max_age,
        allow_credentials: c.allow_credentials.unwrap_or(false),
        forward_unmatched_preflights: !c
            .unmatched_preflights
            .as_deref()
            .is_some_and(|u| u.eq_ignore_ascii_case("IGNORE")),
        allow_private_network: c.allow_private_network.unwrap_or(false),
    }
}

/// A route's faults (what analyze rejected is left out: a delay without `fixedDelay`, an abort
/// without a status this proxy can answer).
fn fault(f: &crate::model::networking::HttpFaultInjection) -> Option<Fault> {
    // Without a percentage, every request (Istio).
    let share = |p: Option<&crate::model::networking::Percent>, legacy: Option<i64>| {
        p.map(|p| p.value).or(legacy.map(|l| l as f64)).unwrap_or(100.0).clamp(0.0, 100.0)
    };
    let delay = f.delay.as_ref().and_then(|d| {
        let delay = d.fixed_delay?;
        Some(FaultDelay { delay, percent: share(d.percentage.as_ref(), d.percent) })
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let status = match (a.http_status, a.grpc_status.as_deref()) {
            (Some(code), _) => AbortStatus::Http(u16::try_from(code).ok().filter(|c| (200..=599).contains(c))?),
            (None, Some(g)) => AbortStatus::Grpc(grpc_code(g)?),
            _ => return None,
        };
        Some(FaultAbort { status, percent: share(a.percentage.as_ref(), None) })
    });
    (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
}

/// A route's retry policy: its own `retries`, else Istio's default; none when `attempts` is 0.
/// (A `retryOn` that does not parse was reported by analyze; its known conditions apply.)
fn retry_policy(r: Option<&crate::model::networking::HttpRetry>) -> Option<RetryPolicy> {
    let Some(r) = r else { return Some(RetryPolicy::istio_default()) };
    let attempts = r.attempts.unwrap_or(2).max(0) as u32;
    if attempts == 0 {
        return None;
    }
    let default = RetryPolicy::istio_default();
    let (retry_on, status_codes) = match r.retry_on.as_deref() {
        Some(text) => RetryOn::parse_list(text).unwrap_or_else(|_| {
            let known = text.split(',').filter_map(|t| RetryOn::parse_list(t).ok());
            known.fold((Vec::new(), Vec::new()), |(mut on, mut codes), (o, c)| {
                on.extend(o);
                codes.extend(c);
                (on, codes)
            })
        }),
        None => (default.retry_on, default.status_codes),
    };
    Some(RetryPolicy {
        attempts,
        per_try_timeout: r.per_try_timeout.filter(|t| !t.0.is_zero()),
        retry_on,
        status_codes,
        any_method: true,
        backoff: r.backoff.filter(|b| !b.0.is_zero()).unwrap_or(Duration(crate::snapshot::DEFAULT_RETRY_BACKOFF)),
        other_hosts: r.retry_ignore_previous_hosts.unwrap_or(true),
    })
}

fn pool_settings(tp: &TrafficPolicy, port: u16) -> Option<&crate::model::networking::ConnectionPool> {
    tp.port_level_settings
        .iter()
        .find(|p| p.port.as_ref().is_some_and(|s| s.number == u32::from(port)))
        .and_then(|p| p.connection_pool.as_ref())
        .or(tp.connection_pool.as_ref())
}

/// Istio's limits are "unlimited" by default (2^32-1); 0 means the default.
fn pool_policy(p: &crate::model::networking::ConnectionPool) -> PoolPolicy {
    let limit = |v: Option<i64>| v.filter(|v| *v > 0 && *v < i64::from(u32::MAX)).map(|v| v as u32);
    let (tcp, http) = (p.tcp.clone().unwrap_or_default(), p.http.clone().unwrap_or_default());
    PoolPolicy {
        max_connections: limit(tcp.max_connections),
        max_pending: limit(http.http1_max_pending_requests),
        max_requests: limit(http.http2_max_requests),
        max_requests_per_connection: limit(http.max_requests_per_connection),
        max_retries: limit(http.max_retries),
        idle_timeout: http
            .idle_timeout
            .or(tcp.idle_timeout)
            .filter(|t| !t.0.is_zero())
            .unwrap_or(Duration(DEFAULT_UPSTREAM_IDLE_TIMEOUT)),
        keepalive: tcp.tcp_keepalive.map(|k| Keepalive {
            // Linux's defaults for what is not set.
            time: k.time.unwrap_or(Duration(std::time::Duration::from_secs(7200))),
            interval: k.interval.unwrap_or(Duration(std::time::Duration::from_secs(75))),
            probes: k.probes.unwrap_or(9),
        }),
    }
}

fn outlier_settings(tp: &TrafficPolicy, port: u16) -> Option<&crate::model::networking::OutlierDetection> {
    tp.port_level_settings
        .iter()
        .find(|p| p.port.as_ref().is_some_and(|s| s.number == u32::from(port)))
        .and_then(|p| p.outlier_detection.as_ref())
        .or(tp.outlier_detection.as_ref())
}

/// Istio's outlier detection defaults: 5 consecutive 5xx, 10s interval, 30s base ejection,
/// at most 10% ejected (at least one host), no minimum healthy share.
fn outlier_policy(o: &crate::model::networking::OutlierDetection) -> OutlierPolicy {
    let n = |v: Option<i64>, d: u32| v.map(|v| v.clamp(0, i64::from(u32::MAX)) as u32).unwrap_or(d);
    // The deprecated `consecutiveErrors` meant gateway errors.
    let legacy_gateway = o.consecutive_errors.filter(|_| o.consecutive_gateway_errors.is_none());
    OutlierPolicy {
        consecutive_5xx: n(o.consecutive_5xx_errors, if legacy_gateway.is_some() { 0 } else { 5 }),
        consecutive_gateway: n(o.consecutive_gateway_errors.or(legacy_gateway), 0),
        consecutive_local_origin: n(o.consecutive_local_origin_failures, 5),
        split_local_origin: o.split_external_local_origin_errors.unwrap_or(false),
        interval: o.interval.filter(|d| !d.0.is_zero()).unwrap_or(Duration(std::time::Duration::from_secs(10))),
        base_ejection: o
            .base_ejection_time
            .filter(|d| !d.0.is_zero())
            .unwrap_or(Duration(std::time::Duration::from_secs(30))),
        max_ejection_percent: n(o.max_ejection_percent, 10).min(100),
        min_health_percent: n(o.min_health_percent, 0).min(100),
    }
}

fn tls_settings(tp: &TrafficPolicy, port: u16) -> Option<&ClientTlsSettings> {
    tp.port_level_settings
        .iter()
        .find(|p| p.port.as_ref().is_some_and(|s| s.number == u32::from(port)))
        .and_then(|p| p.tls.as_ref())
        .or(tp.tls.as_ref())
}

/// Where a mesh-, namespace- or workload-scoped security resource applies: `Some(level)` (0
/// mesh, 1 namespace, 2 workload) when it selects this proxy.
fn scope_level(
    r: &Resource,
    selector: Option<&crate::model::security::WorkloadSelector>,
    proxy: &ProxySpec,
) -> Option<u8> {
    let labels = selector.map(|s| &s.match_labels).filter(|l| !l.is_empty());
    match labels {
        None if r.namespace() == ROOT_NAMESPACE => Some(0),
        None if r.namespace() == proxy.namespace => Some(1),
        Some(l) if r.namespace() == proxy.namespace && selects(l, &proxy.labels) => Some(2),
        Some(l) if r.namespace() == ROOT_NAMESPACE && selects(l, &proxy.labels) => Some(2),
        _ => None,
    }
}

/// PeerAuthentication's mode for one workload port: workload (port level, then whole) over
/// namespace over mesh; PERMISSIVE when nothing says otherwise (Istio's default).
pub fn peer_authentication(resources: &[Resource], proxy: &ProxySpec, port: u16) -> MtlsMode {
    let mut layers: Vec<(u8, &crate::model::security::PeerAuthentication)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::PeerAuthentication(pa) => scope_level(r, pa.selector.as_ref(), proxy).map(|l| (l, pa)),
            _ => None,
        })
        .collect();
    layers.sort_by_key(|(l, _)| std::cmp::Reverse(*l));
    for (level, pa) in layers {
        let port_mode =
            if level == 2 { pa.port_level_mtls.get(&port.to_string()).and_then(|m| m.mode.as_deref()) } else { None };
        let mode = port_mode.filter(|m| *m != "UNSET").or(pa
            .mtls
            .as_ref()
            .and_then(|m| m.mode.as_deref())
            .filter(|m| *m != "UNSET"));
        match mode {
            Some("STRICT") => return MtlsMode::Strict,
            Some("DISABLE") => return MtlsMode::Disable,
            Some("PERMISSIVE") => return MtlsMode::Permissive,
            _ => continue,
        }
    }
    MtlsMode::Permissive
}

fn authorization(resources: &[Resource], proxy: &ProxySpec) -> Vec<AuthzPolicy> {
    resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::AuthorizationPolicy(ap) => {
                scope_level(r, ap.selector.as_ref(), proxy)?;
                let action = match ap.action.as_deref().unwrap_or("ALLOW") {
                    "ALLOW" => AuthzAction::Allow,
                    "DENY" => AuthzAction::Deny,
                    "AUDIT" => AuthzAction::Audit,
                    _ => return None, // CUSTOM: not enforced (reported by analyze)
                };
                Some(AuthzPolicy {
                    name: format!("{}/{}", r.namespace(), r.name()),
                    action,
                    rules: ap.rules.clone().unwrap_or_default(),
                })
            }
            _ => None,
        })
        .collect()
}

fn jwt_rules(resources: &[Resource], proxy: &ProxySpec) -> Vec<crate::model::security::JwtRule> {
    resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::RequestAuthentication(ra) => {
                scope_level(r, ra.selector.as_ref(), proxy).map(|_| ra.jwt_rules.clone())
            }
            _ => None,
        })
        .flatten()
        .collect()
}

fn lb_settings(tp: &TrafficPolicy, port: u16) -> Option<&LoadBalancerSettings> {
    tp.port_level_settings
        .iter()
        .find(|p| p.port.as_ref().is_some_and(|s| s.number == u32::from(port)))
        .and_then(|p| p.load_balancer.as_ref())
        .or(tp.load_balancer.as_ref())
}

fn lb_policy(lb: &LoadBalancerSettings) -> LbPolicy {
    if let Some(ch) = &lb.consistent_hash {
        let min = ch.ring_hash.as_ref().and_then(|r| r.minimum_ring_size).or(ch.minimum_ring_size).unwrap_or(1024);
        let hash = if let Some(h) = &ch.http_header_name {
            HashPolicy::Header(h.to_ascii_lowercase())
        } else if let Some(c) = &ch.http_cookie {
            HashPolicy::Cookie { name: c.name.clone(), path: c.path.clone(), ttl: c.ttl }
        } else if let Some(q) = &ch.http_query_parameter_name {
            HashPolicy::QueryParam(q.clone())
        } else {
            HashPolicy::SourceIp
        };
        return LbPolicy::RingHash { hash, min_ring_size: min.clamp(16, 1 << 23) };
    }
    match lb.simple.as_deref() {
        Some("LEAST_REQUEST" | "LEAST_CONN") => LbPolicy::LeastRequest,
        Some("PEAK_EWMA") => LbPolicy::PeakEwma,
        Some("RANDOM") => LbPolicy::Random,
        _ => LbPolicy::RoundRobin,
    }
}

fn header_ops(h: Option<&Headers>) -> (HeaderOps, HeaderOps) {
    let conv = |o: Option<&HeaderOperations>| match o {
        None => HeaderOps::default(),
        Some(o) => HeaderOps {
            set: o.set.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect(),
            add: o.add.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect(),
            remove: o.remove.iter().map(|k| k.to_ascii_lowercase()).collect(),
        },
    };
    match h {
        None => (HeaderOps::default(), HeaderOps::default()),
        Some(h) => (conv(h.request.as_ref()), conv(h.response.as_ref())),
    }
}

fn string_matcher(sm: &StringMatch) -> Option<StringMatcher> {
    if let Some(e) = &sm.exact {
        Some(StringMatcher::Exact(e.clone()))
    } else if let Some(p) = &sm.prefix {
        Some(StringMatcher::Prefix(p.clone()))
    } else {
        sm.regex.as_ref().map(|r| StringMatcher::Regex(r.clone()))
    }
}

fn compile_match(m: &HttpMatchRequest) -> RouteMatch {
    let keys = |map: &BTreeMap<String, StringMatch>, invert: bool, lower: bool| {
        map.iter()
            .map(|(k, v)| KeyMatcher {
                name: if lower { k.to_ascii_lowercase() } else { k.clone() },
                value: string_matcher(v),
                invert,
            })
            .collect::<Vec<_>>()
    };
    let mut headers = keys(&m.headers, false, true);
    headers.extend(keys(&m.without_headers, true, true));
    let uri = m.uri.as_ref().and_then(string_matcher).map(|u| match (u, m.ignore_uri_case) {
        (StringMatcher::Exact(s), true) => StringMatcher::Exact(s.to_ascii_lowercase()),
        (StringMatcher::Prefix(s), true) => StringMatcher::Prefix(s.to_ascii_lowercase()),
        (u, _) => u,
    });
    RouteMatch {
        uri,
        ignore_uri_case: m.ignore_uri_case,
        scheme: m.scheme.as_ref().and_then(string_matcher),
        method: m.method.as_ref().and_then(string_matcher),
        authority: m.authority.as_ref().and_then(string_matcher),
        headers,
        query_params: keys(&m.query_params, false, false),
        port: m.port.and_then(|p| u16::try_from(p).ok()),
    }
}

/// `name` or `ns/name` → `ns/name`.
fn qualify(gateway: &str, ns: &str) -> String {
    let (ns, name) = crate::model::networking::gateway_ref(gateway, ns);
    format!("{ns}/{name}")
}

/// Gateway server hosts may be written `ns/host`: `*/` and `./` (the gateway's own namespace).
fn server_admits_namespace(server_host: &str, vs_ns: &str, gw_ns: &str) -> bool {
    match server_host.split_once('/') {
        None => true,
        Some(("*", _)) => true,
        Some((".", _)) => vs_ns == gw_ns,
        Some((ns, _)) => ns == vs_ns,
    }
}

fn more_specific<'a>(a: &'a str, b: &'a str) -> &'a str {
    let score = |h: &str| {
        if h == "*" {
            0
        } else if h.starts_with('*') {
            h.len()
        } else {
            usize::MAX
        }
    };
    if score(a) >= score(b) {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::snapshot::{Action, Direction, MtlsMode};

    pub(super) fn load(yaml: &str) -> Vec<Resource> {
        let loaded = crate::load::load_str(Path::new("mesh.yaml"), yaml);
        assert!(loaded.findings.iter().all(|f| !f.is_error()), "{:?}", loaded.findings);
        loaded.resources
    }

    const SERVICE: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: STATIC\n  endpoints:\n  - {address: 127.0.0.1, ports: {http: 9001}, labels: {version: v1}}\n  - {address: 127.0.0.2, ports: {http: 9002}, labels: {version: v2}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n---\n";

    fn split(w1: u32, w2: u32, gateways: &str) -> String {
        format!(
            "{SERVICE}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n{gateways}  http:\n  - route:\n    - {{destination: {{host: reviews, subset: v1}}, weight: {w1}}}\n    - {{destination: {{host: reviews, subset: v2}}, weight: {w2}}}\n"
        )
    }

    fn sidecar() -> ProxySpec {
        ProxySpec {
            name: "productpage".into(),
            labels: [("app".to_string(), "productpage".to_string())].into(),
            outbound: Some("127.0.0.1:15001".parse().expect("addr")),
            ..ProxySpec::default()
        }
    }

    fn gateway(labels: &[(&str, &str)]) -> ProxySpec {
        ProxySpec {
            role: Role::Gateway,
            name: "gw".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            port_map: [(80, 18080)].into(),
            ..ProxySpec::default()
        }
    }

    /// The routes whose virtual host serves `domain`, across every table.
    fn routes_for<'a>(snap: &'a Snapshot, domain: &str) -> Vec<&'a crate::snapshot::Route> {
        snap.route_tables
            .values()
            .flat_map(|t| &t.virtual_hosts)
            .filter(|v| v.domains.iter().any(|d| d == domain))
            .flat_map(|v| &v.routes)
            .collect()
    }

    #[test]
    fn a_weighted_split_targets_subset_clusters_holding_only_their_endpoints() {
        let resources = load(&split(80, 20, ""));
        let snap = compile(&resources, &[], &sidecar());
        let routes = routes_for(&snap, "reviews");
        assert_eq!(routes.len(), 1, "{routes:#?}");
        let Action::Forward(f) = &routes[0].action else { panic!("{:?}", routes[0].action) };
        let dests: Vec<(&str, u32)> = f.destinations.iter().map(|d| (d.cluster.as_str(), d.weight)).collect();
        assert_eq!(dests, [("outbound|80|v1|reviews", 80), ("outbound|80|v2|reviews", 20)]);
        let v1 = &snap.clusters["outbound|80|v1|reviews"];
        assert_eq!(v1.endpoints.iter().map(|e| e.address.as_str()).collect::<Vec<_>>(), ["127.0.0.1:9001"]);
        let v2 = &snap.clusters["outbound|80|v2|reviews"];
        assert_eq!(v2.endpoints.iter().map(|e| e.address.as_str()).collect::<Vec<_>>(), ["127.0.0.2:9002"]);
        assert_eq!(routes[0].source.as_deref(), Some("VirtualService default/reviews http[0]"));
    }

    #[test]
    fn the_version_is_a_content_hash() {
        let a = compile(&load(&split(80, 20, "")), &[], &sidecar());
        let again = compile(&load(&split(80, 20, "")), &[], &sidecar());
        let b = compile(&load(&split(50, 50, "")), &[], &sidecar());
        assert_eq!(a.version, again.version);
        assert_ne!(a.version, b.version);
        assert_eq!(a.version, version_of(&a));
    }

    #[test]
    fn gateway_listeners_follow_the_selector_and_the_port_map() {
        let mut y = split(100, 0, "  gateways: [gw]\n");
        y.push_str("---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  selector: {istio: ingressgateway}\n  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [\"*\"]}]\n");
        let resources = load(&y);
        let selected = compile(&resources, &[], &gateway(&[("istio", "ingressgateway")]));
        let ports: Vec<u16> = selected.listeners.iter().map(|l| l.address.port()).collect();
        assert_eq!(ports, [18080], "Gateway port 80 served on its mapped local port");
        assert_eq!(selected.listeners[0].direction, Direction::Gateway);
        assert_eq!(routes_for(&selected, "reviews").len(), 1, "the VirtualService bound to the gateway");
        let other = compile(&resources, &[], &gateway(&[("istio", "egressgateway")]));
        assert!(other.listeners.is_empty(), "a gateway the selector does not match serves nothing");
        // Bound to the gateway only: sidecars do not get it (no `mesh` in gateways).
        let side = compile(&resources, &[], &sidecar());
        let on_sidecar = routes_for(&side, "reviews");
        assert!(
            on_sidecar.iter().all(|r| r.source.is_none()),
            "the gateway's VirtualService leaked to a sidecar: {on_sidecar:#?}"
        );
    }

    #[test]
    fn istio_mutual_gateway_servers_require_mesh_mtls_and_the_mesh_provides_the_gateway_service() {
        let y = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: egress}\nspec:\n  selector: {istio: egressgateway}\n  servers:\n  - {port: {number: 80, name: https, protocol: HTTPS}, hosts: [api.example.com], tls: {mode: ISTIO_MUTUAL}}\n  - {port: {number: 443, name: tls, protocol: TLS}, hosts: [db.example.com], tls: {mode: ISTIO_MUTUAL}}\n  - {port: {number: 8080, name: http, protocol: HTTP}, hosts: [\"*\"]}\n";
        let resources = load(y);
        let snap = compile(&resources, &[], &gateway(&[("istio", "egressgateway")]));
        let by_port = |p: u16| snap.listeners.iter().find(|l| l.address.port() == p).expect("listener");
        assert_eq!(by_port(18080).mtls, Some(MtlsMode::Strict), "HTTPS ISTIO_MUTUAL (port 80, mapped)");
        assert!(matches!(by_port(18080).routing, ListenerRouting::Table(_)), "then routed as HTTP");
        assert_eq!(by_port(443).mtls, Some(MtlsMode::Strict), "TLS ISTIO_MUTUAL");
        assert!(matches!(by_port(443).routing, ListenerRouting::Tcp(_)), "then by tcp routes");
        assert_eq!(by_port(8080).mtls, None, "a plain HTTP server stays plain");
        // Sidecars reach it as Istio's install names it, on its servers' ports: HTTP (HTTPS
        // server) or TCP (TLS server) inside mTLS.
        let reg = Registry::build(&resources, &[]);
        let svc = reg
            .resolve("istio-egressgateway.istio-system.svc.cluster.local", "default")
            .expect("the gateway's Service");
        let ports: Vec<(u16, Protocol)> = svc.ports.iter().map(|p| (p.number, p.protocol)).collect();
        assert_eq!(ports, [(80, Protocol::Http), (443, Protocol::Tcp), (8080, Protocol::Http)]);
    }

    #[test]
    fn peer_authentication_is_workload_then_namespace_then_mesh_with_port_overrides() {
        let y = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: ns, namespace: legacy}\nspec: {mtls: {mode: PERMISSIVE}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: app, namespace: legacy}\nspec:\n  selector: {matchLabels: {app: old}}\n  mtls: {mode: UNSET}\n  portLevelMtls: {\"9090\": {mode: DISABLE}}\n";
        let resources = load(y);
        let in_ns = |ns: &str, app: &str| ProxySpec {
            namespace: ns.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ..ProxySpec::default()
        };
        assert_eq!(peer_authentication(&resources, &in_ns("default", "a"), 8080), MtlsMode::Strict, "mesh-wide");
        assert_eq!(peer_authentication(&resources, &in_ns("legacy", "a"), 8080), MtlsMode::Permissive, "namespace");
        assert_eq!(
            peer_authentication(&resources, &in_ns("legacy", "old"), 8080),
            MtlsMode::Permissive,
            "UNSET inherits"
        );
        assert_eq!(peer_authentication(&resources, &in_ns("legacy", "old"), 9090), MtlsMode::Disable, "port level");
        assert_eq!(peer_authentication(&[], &in_ns("default", "a"), 80), MtlsMode::Permissive, "Istio's default");
    }

    #[test]
    fn hosts_and_ports_join_as_authorities() {
        assert_eq!(join_host_port("reviews", 80), "reviews:80");
        assert_eq!(more_specific("*.example.com", "api.example.com"), "api.example.com");
        assert_eq!(qualify("gw", "default"), "default/gw");
        assert_eq!(qualify("other/gw", "default"), "other/gw");
    }
}

#[cfg(test)]
mod tcp_tests {

    use super::*;

    use super::tests::load;

    /// Kubernetes objects as the cluster shows them: a Redis Service (ClusterIP) over a Pod.
    const K8S: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: redis, namespace: shop}\nspec:\n  selector: {app: redis}\n  clusterIP: 10.96.0.20\n  ports: [{name: tcp-redis, port: 6379, targetPort: 6379}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: redis-0, namespace: shop, labels: {app: redis}}\nspec:\n  containers: [{name: redis, ports: [{containerPort: 6379}]}]\nstatus: {podIP: 10.0.0.7}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: redis, namespace: shop}\nspec:\n  host: redis\n  subsets: [{name: primary, labels: {app: redis}}]\n";

    fn captured(name: &str, ip: &str, labels: &[(&str, &str)], app_ports: &[u16]) -> ProxySpec {
        let ip: IpAddr = ip.parse().expect("ip");
        ProxySpec {
            name: name.into(),
            namespace: "shop".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            bind_address: ip,
            inbound: app_ports
                .iter()
                .map(|p| InboundSpec {
                    listen: "0.0.0.0:15006".parse().expect("addr"),
                    app: SocketAddr::new(ip, *p),
                    protocol: None,
                })
                .collect(),
            capture: Some(CaptureSpec {
                inbound: "0.0.0.0:15006".parse().expect("addr"),
                outbound: "0.0.0.0:15001".parse().expect("addr"),
            }),
            ..ProxySpec::default()
        }
    }

    fn ports(snap: &Snapshot, listener: &str) -> BTreeMap<u16, CapturedPort> {
        let l = snap.listeners.iter().find(|l| l.name == listener).expect("listener");
        let ListenerRouting::OriginalDst { ports, .. } = &l.routing else { panic!("{:?}", l.routing) };
        ports.clone()
    }

    #[test]
    fn a_port_its_service_declares_tcp_is_proxied_as_tcp_on_both_sides() {
        let resources = load(K8S);
        let server = compile(&resources, &[], &captured("redis-0", "10.0.0.7", &[("app", "redis")], &[6379]));
        let inbound = ports(&server, "inbound-capture");
        let tcp = inbound[&6379].tcp.as_ref().expect("the Pod's redis port is TCP, as its Service says");
        assert_eq!(tcp.routes[0].destinations, [("inbound|6379||".to_string(), 100)]);

        let client = compile(&resources, &[], &captured("web-0", "10.0.0.9", &[("app", "web")], &[8080]));
        assert!(ports(&client, "inbound-capture")[&8080].tcp.is_none(), "an undeclared app port stays HTTP");
        let outbound = ports(&client, "outbound-capture");
        let tcp = outbound[&6379].tcp.as_ref().expect("calls to the Redis Service are proxied as TCP");
        assert_eq!(tcp.routes[0].destination_subnets, ["10.96.0.20/32"], "by the Service's ClusterIP");
        assert_eq!(tcp.routes[0].destinations, [("outbound|6379||redis.shop.svc.cluster.local".to_string(), 100)]);
    }

    #[test]
    fn virtualservice_tcp_routes_split_by_weight_and_match_ports() {
        let mut y = K8S.to_string();
        y.push_str("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: redis, namespace: shop}\nspec:\n  hosts: [redis]\n  tcp:\n  - match: [{port: 7000}]\n    route: [{destination: {host: redis}}]\n  - route:\n    - {destination: {host: redis, subset: primary}, weight: 90}\n    - {destination: {host: redis}, weight: 10}\n");
        let resources = load(&y);
        let client = compile(&resources, &[], &captured("web-0", "10.0.0.9", &[("app", "web")], &[]));
        let tcp = ports(&client, "outbound-capture")[&6379].tcp.clone().expect("tcp");
        assert_eq!(tcp.routes.len(), 1, "the port-7000 route does not apply to 6379: {tcp:?}");
        assert_eq!(tcp.routes[0].name, "VirtualService shop/redis tcp[1]");
        assert_eq!(
            tcp.routes[0].destinations,
            [
                ("outbound|6379|primary|redis.shop.svc.cluster.local".to_string(), 90),
                ("outbound|6379||redis.shop.svc.cluster.local".to_string(), 10)
            ]
        );
        assert!(client.clusters.contains_key("outbound|6379|primary|redis.shop.svc.cluster.local"));
    }

    #[test]
    fn sidecar_tls_routes_pick_by_sni_and_fall_back_to_the_service() {
        let mut y = K8S
            .replace("name: tcp-redis, port: 6379, targetPort: 6379", "name: tls-redis, port: 6379, targetPort: 6379");
        y.push_str("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: redis, namespace: shop}\nspec:\n  hosts: [redis]\n  tls:\n  - match: [{sniHosts: [Primary.Redis.Test], port: 6379}]\n    route: [{destination: {host: redis, subset: primary}}]\n");
        let resources = load(&y);
        let client = compile(&resources, &[], &captured("web-0", "10.0.0.9", &[("app", "web")], &[]));
        let tcp = ports(&client, "outbound-capture")[&6379].tcp.clone().expect("tcp");
        assert!(tcp.sni, "the sidecar reads the SNI first: {tcp:?}");
        assert_eq!(tcp.routes[0].sni_hosts, ["primary.redis.test"]);
        assert_eq!(
            tcp.routes[0].destinations,
            [("outbound|6379|primary|redis.shop.svc.cluster.local".to_string(), 100)]
        );
        assert!(tcp.routes[1].sni_hosts.is_empty(), "then the service itself");
        assert_eq!(tcp.routes[1].destinations, [("outbound|6379||redis.shop.svc.cluster.local".to_string(), 100)]);
    }

    #[test]
    fn a_port_no_service_declares_a_protocol_for_is_detected_on_both_sides() {
        let mut y = K8S.to_string();
        y.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n  selector: {app: db}\n  clusterIP: 10.96.0.30\n  ports: [{port: 3306, targetPort: 3306}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: shop, labels: {app: db}}\nspec:\n  containers: [{name: db, ports: [{containerPort: 3306}]}]\nstatus: {podIP: 10.0.0.8}\n");
        let resources = load(&y);
        let server = compile(&resources, &[], &captured("db-0", "10.0.0.8", &[("app", "db")], &[3306]));
        let inbound = &ports(&server, "inbound-capture")[&3306];
        assert!(inbound.detect && inbound.tcp.is_some(), "the Pod's port: HTTP or TCP per connection: {inbound:?}");
        let client = compile(&resources, &[], &captured("web-0", "10.0.0.9", &[("app", "web")], &[]));
        let outbound = &ports(&client, "outbound-capture")[&3306];
        assert!(outbound.detect, "{outbound:?}");
        let tcp = outbound.tcp.as_ref().expect("tcp side");
        assert_eq!(tcp.routes[0].destination_subnets, ["10.96.0.30/32"]);
        assert_eq!(outbound.table, "outbound|3306");
    }
}
