//! The instantiated snapshot: what the hot path reads.
//!
//! [`Runtime::build`] turns a plain-data [`spec::Snapshot`] into lookup tables with compiled
//! regexes, header values and balancers, and endpoints drawn from the shared [`Pools`]. A build
//! error rejects the whole snapshot (the proxy keeps the one it has). A request loads one
//! `Arc<Runtime>` and uses it to the end, so it never sees half of a config.

pub mod error;
pub mod route;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use trellis_config::snapshot::{self as spec, ListenerRouting, UpstreamProtocol};

use http::HeaderValue;
use trellis_telemetry::identity::ServiceLabels;
use trellis_telemetry::Identity;

use trellis_identity::tls::CredentialStore;

use crate::balance::Balancer;
use crate::upstream::{Endpoint, Pools, TlsSetup};
pub use error::{BuildError, Problem, Resource};
pub use route::{Route, RouteTable};

/// The name of the cluster of requests passed through to where they were going.
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// The route of `ALLOW_ANY` passthrough: to [`PASSTHROUGH`], whose endpoint each request names.
fn passthrough_route() -> Route {
    let cluster = Arc::new(Cluster {
        name: Arc::from(PASSTHROUGH),
        protocol: UpstreamProtocol::Downstream,
        connect_timeout: Duration::from_secs(10),
        endpoints: Vec::new(),
        identities: Vec::new(),
        balancer: Balancer::new(&spec::LbPolicy::RoundRobin, &[]),
        service: Arc::new(ServiceLabels::new(PASSTHROUGH, PASSTHROUGH, "")),
        peer_header: None,
        mesh_peers: Vec::new(),
        authority: String::new(),
        mtls: false,
        budget: crate::pipeline::retry::Budget::new(spec::RetryBudget::default()),
        outlier: None,
        pool: spec::PoolPolicy::default(),
        passthrough: true,
    });
    let spec_route = spec::Route {
        name: "allow_any".into(),
        source: None,
        matches: Vec::new(),
        action: spec::Action::Forward(spec::Forward {
            destinations: vec![spec::WeightedCluster {
                cluster: PASSTHROUGH.into(),
                weight: 100,
                request_headers: Default::default(),
                response_headers: Default::default(),
            }],
            rewrite: None,
        }),
        request_headers: Default::default(),
        response_headers: Default::default(),
        timeout: None,
        retry: None,
        fault: None,
        cors: None,
        mirrors: Vec::new(),
    };
    let clusters = HashMap::from([(PASSTHROUGH.to_string(), cluster)]);
    route::Route::build_one(&spec_route, &clusters).expect("the passthrough route builds")
}

pub struct Runtime {
    pub snapshot: Arc<spec::Snapshot>,
    /// This proxy's identity, for telemetry.
    pub me: Arc<Identity>,
    /// Tracing and access-log settings in force.
    pub telemetry: crate::telemetry::Effective,
    /// AuthorizationPolicies and JWT rules for this workload.
    pub authz: crate::security::authz::Authorizer,
    pub jwt: crate::security::jwt::JwtAuth,
    tables: HashMap<String, Arc<RouteTable>>,
    /// Outbound tables by port, for `ByRequestPort` and `Fixed` listeners.
    outbound: HashMap<u16, Arc<RouteTable>>,
    listeners: HashMap<String, (ListenerRouting, Option<spec::MtlsMode>, bool)>,
    pub clusters: HashMap<String, Arc<Cluster>>,
    /// Local rate limits, each with its token bucket.
    pub rate_limits: Vec<crate::pipeline::ratelimit::Limiter>,
    /// TCP proxying, by listener name (and `<listener>|<port>` for a capturing listener's
    /// TCP ports).
    tcp: HashMap<String, Arc<TcpProxy>>,
    /// Where an outbound request for a host the registry does not know goes under
    /// `ALLOW_ANY`: Istio's PassthroughCluster (the endpoint is the request's destination).
    pub passthrough: Route,
    /// TLS that gateway listeners terminate, by listener name.
    gateway_tls: HashMap<String, Arc<crate::listener::tls::GatewayTls>>,
}

/// A cluster: endpoints, how to balance over them, and how to talk to them.
pub struct Cluster {
    pub name: Arc<str>,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub endpoints: Vec<(Arc<Endpoint>, u32)>,
    /// The identity of each endpoint, in the same order.
    pub identities: Vec<Arc<Identity>>,
    pub balancer: Balancer,
    pub service: Arc<ServiceLabels>,
    /// Peer metadata sent with requests to this cluster's mesh peers (none towards the local
    /// app, nor to endpoints outside the mesh: it names the caller's workload).
    pub peer_header: Option<HeaderValue>,
    /// Whether each endpoint (same order as `endpoints`) runs a mesh proxy: it speaks mesh
    /// mTLS or carries Istio's `security.istio.io/tlsMode: istio` label.
    pub mesh_peers: Vec<bool>,
    /// The authority requests get when the client sent none (an HTTP/1.0 request without
    /// `Host`): the service's host, with its port unless 80; empty for inbound clusters (the
    /// endpoint's address is used).
    pub authority: String,
    /// Spoken to with mesh mutual TLS.
    pub mtls: bool,
    /// The retry budget: retries in flight against requests in flight.
    pub budget: Arc<crate::pipeline::retry::Budget>,
    /// Outlier detection over `endpoints` (same order), when the DestinationRule asks for it.
    pub outlier: Option<crate::balance::outlier::Outlier>,
    /// Connection-pool limits: per endpoint (put in force by [`Runtime::activate`]) and for the
    /// cluster (`max_requests`, `max_retries`, checked by the pipeline).
    pub pool: spec::PoolPolicy,
    /// Istio's PassthroughCluster: each request names its own endpoint.
    pub passthrough: bool,
}

/// The TLS client configurations for a cluster, and a key naming that variant for the pools.
fn tls_setup(
    t: &spec::UpstreamTls,
    identity: Option<&Arc<CredentialStore>>,
    service: &str,
) -> Result<(String, TlsSetup), Problem> {
    use trellis_identity::tls::{ALPN_H2, ALPN_HTTP11};
    match t {
        spec::UpstreamTls::IstioMutual { identities } => {
            let store = identity.cloned().unwrap_or_default();
            let ids = identities
                .iter()
                .map(|i| {
                    trellis_identity::SpiffeId::parse(i)
                        .map_err(|e| Problem::Identity { id: i.clone(), reason: e.to_string() })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let tls = |e: trellis_identity::Error| Problem::Tls(e.to_string());
            let h1 = trellis_identity::tls::mesh_client(store.clone(), ids.clone(), ALPN_HTTP11).map_err(tls)?;
            let h2 = trellis_identity::tls::mesh_client(store.clone(), ids.clone(), ALPN_H2).map_err(tls)?;
            let tcp = trellis_identity::tls::mesh_client(store, ids, trellis_identity::tls::ALPN_TCP).map_err(tls)?;
            let server_name = rustls::pki_types::ServerName::from(
                rustls::pki_types::DnsName::try_from_str("mesh.trellis").expect("a valid DNS name"),
            );
            Ok((format!("mtls:{}", identities.join(",")), TlsSetup { h1, h2, tcp, server_name }))
        }
        spec::UpstreamTls::Origination {
            sni,
            ca_certificates,
            client_certificate,
            private_key,
            subject_alt_names,
            insecure_skip_verify,
        } => {
            let read =
                |p: &str| std::fs::read_to_string(p).map_err(|e| Problem::Read { path: p.to_string(), source: e });
            let pem = |p: &String| {
                let path = p.clone();
                move |e: trellis_identity::Error| Problem::Pem { path, reason: e.to_string() }
            };
            let ca = ca_certificates.as_deref().map(read).transpose()?;
            let client = match (client_certificate, private_key) {
                (Some(c), Some(k)) => Some((
                    trellis_identity::cert::parse_pem_certs(&read(c)?).map_err(pem(c))?,
                    trellis_identity::cert::parse_pem_key(&read(k)?).map_err(pem(k))?,
                )),
                (None, None) => None,
                _ => return Err(Problem::IncompleteClientCertificate),
            };
            let tls = |e: trellis_identity::Error| Problem::Tls(e.to_string());
            let h1 = trellis_identity::tls::origination(
                ca.as_deref(),
                client.as_ref().map(|(c, k)| (c.clone(), k.clone_key())),
                *insecure_skip_verify,
                ALPN_HTTP11,
            )
            .map_err(tls)?;
            let h2 = trellis_identity::tls::origination(ca.as_deref(), client, *insecure_skip_verify, ALPN_H2)
                .map_err(tls)?;
            // The name to verify (and send as SNI): the first expected SAN, else the SNI, else the host.
            let name = subject_alt_names.first().or(sni.as_ref()).map(String::as_str).unwrap_or(service).to_string();
            let server_name =
                rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| Problem::ServerName(name.clone()))?;
            let key = format!(
                "tls:{name}:{}:{}",
                ca_certificates.as_deref().unwrap_or("system"),
                client_certificate.as_deref().unwrap_or("-")
            );
            // Opaque TCP inside originated TLS: no application protocol to announce.
            let mut tcp = (*h1).clone();
            tcp.alpn_protocols.clear();
            Ok((key, TlsSetup { h1, h2, tcp: Arc::new(tcp), server_name }))
        }
    }
}

impl Runtime {
    /// Puts what this runtime configures on shared endpoints in force: their connection-pool
    /// limits. Called once it serves (a rejected snapshot changes nothing).
    pub fn activate(&self) {
        for c in self.clusters.values() {
            let limits = crate::upstream::Limits {
                max_connections: c.pool.max_connections,
                max_pending: c.pool.max_pending,
                max_requests_per_connection: c.pool.max_requests_per_connection,
                idle_timeout: c.pool.idle_timeout.0,
                keepalive: c.pool.keepalive,
            };
            for (ep, _) in &c.endpoints {
                ep.set_limits(limits.clone());
            }
        }
    }

    /// An empty runtime (before the first snapshot).
    pub fn empty() -> Runtime {
        Runtime {
            snapshot: Arc::new(spec::Snapshot::default()),
            me: Arc::new(Identity::unknown()),
            telemetry: crate::telemetry::Effective {
                sampling_percent: 0.0,
                export_spans: false,
                access_log: false,
                filter: None,
                span_service: Arc::from("unknown"),
            },
            authz: Default::default(),
            jwt: Default::default(),
            tables: HashMap::new(),
            outbound: HashMap::new(),
            listeners: HashMap::new(),
            clusters: HashMap::new(),
            rate_limits: Vec::new(),
            tcp: HashMap::new(),
            gateway_tls: HashMap::new(),
            passthrough: passthrough_route(),
        }
    }

    pub fn build(
        snapshot: Arc<spec::Snapshot>,
        pools: &Pools,
        opts: &crate::telemetry::TelemetryOptions,
        exporting: bool,
        identity: Option<&Arc<CredentialStore>>,
        jwks: &crate::security::jwt::JwksCache,
        credentials_dir: Option<&std::path::Path>,
    ) -> Result<Runtime, BuildError> {
        let authz = crate::security::authz::Authorizer::new(&snapshot.authorization);
        let jwt = crate::security::jwt::JwtAuth::build(&snapshot.jwt_rules, jwks)?;
        let node = &snapshot.node;
        let me = Arc::new(Identity::new(&node.name, &node.namespace, &node.labels, node.identity.as_deref()));
        let policy = &snapshot.telemetry;
        let telemetry = crate::telemetry::Effective {
            sampling_percent: policy.sampling_percent.unwrap_or(opts.sampling_percent),
            export_spans: exporting && !policy.span_reporting_disabled.unwrap_or(false),
            access_log: policy.access_log.unwrap_or(opts.access_log),
            filter: policy.access_log_filter.as_deref().and_then(|f| trellis_config::filter::Filter::parse(f).ok()),
            span_service: Arc::from(format!("{}.{}", me.canonical_service, me.namespace)),
        };
        let mut clusters = HashMap::new();
        for (name, c) in &snapshot.clusters {
            let tls = match &c.tls {
                None => None,
                Some(t) => Some(
                    tls_setup(t, identity, &c.service)
                        .map_err(|p| p.at(Resource::Cluster { name: name.clone(), source: c.source.clone() }))?,
                ),
            };
            let endpoints: Vec<(Arc<Endpoint>, u32)> = c
                .endpoints
                .iter()
                .map(|e| {
                    (
                        pools.endpoint_with(&e.address, tls.as_ref().map(|(k, t)| (k.as_str(), t.clone()))),
                        e.weight.max(1),
                    )
                })
                .collect();
            let identities = c
                .endpoints
                .iter()
                .map(|e| {
                    let (w, ns) = (e.workload.as_deref().unwrap_or(""), e.namespace.as_deref().unwrap_or(""));
                    Arc::new(Identity::new(w, ns, &e.labels, e.identity.as_deref()))
                })
                .collect();
            let mtls = matches!(c.tls, Some(spec::UpstreamTls::IstioMutual { .. }));
            let mesh_peers = c
                .endpoints
                .iter()
                .map(|e| mtls || e.labels.get(trellis_config::compile::TLS_MODE_LABEL).is_some_and(|m| m == "istio"))
                .collect();
            let authority = match (name.starts_with("inbound|"), c.port) {
                (true, _) => String::new(),
                (false, 80) => c.service.clone(),
                (false, port) => format!("{}:{port}", c.service),
            };
            let balancer = Balancer::new(&c.lb, &endpoints);
            let service = Arc::new(ServiceLabels::new(&c.service, &c.service_name, &c.service_namespace));
            let peer_header =
                if name.starts_with("inbound|") { None } else { trellis_telemetry::peer::encode(&me, &service) };
            clusters.insert(
                name.clone(),
                Arc::new(Cluster {
                    name: Arc::from(name.as_str()),
                    protocol: c.protocol,
                    connect_timeout: c.connect_timeout.0,
                    endpoints,
                    identities,
                    balancer,
                    service,
                    peer_header,
                    mesh_peers,
                    authority,
                    mtls,
                    budget: crate::pipeline::retry::Budget::new(c.retry_budget),
                    outlier: c.outlier.clone().map(|p| crate::balance::outlier::Outlier::new(p, c.endpoints.len())),
                    pool: c.pool.clone(),
                    passthrough: false,
                }),
            );
        }
        let mut tables = HashMap::new();
        let mut outbound = HashMap::new();
        let per_route: Vec<&spec::RateLimitPolicy> =
            snapshot.rate_limits.iter().filter(|p| p.routes.is_some()).collect();
        for (name, t) in &snapshot.route_tables {
            let table = Arc::new(RouteTable::build(name, t, &clusters, &per_route)?);
            if let Some(port) = name.strip_prefix("outbound|").and_then(|p| p.parse::<u16>().ok()) {
                outbound.insert(port, table.clone());
            }
            tables.insert(name.clone(), table);
        }
        let mut listeners = HashMap::new();
        let mut tcp = HashMap::new();
        let mut gateway_tls = HashMap::new();
        for l in &snapshot.listeners {
            let at = |p: Problem| p.at(Resource::Listener(l.name.clone()));
            if let Some(t) = &l.tls {
                let built = crate::listener::tls::GatewayTls::build(t, credentials_dir).map_err(|p| {
                    // Name the Gateway server whose certificate failed.
                    let source = t.servers.first().map(|s| s.source.clone());
                    BuildError { resource: Resource::GatewayServer { listener: l.name.clone(), source }, problem: p }
                })?;
                gateway_tls.insert(l.name.clone(), Arc::new(built));
            }
            match &l.routing {
                ListenerRouting::Tcp(t) | ListenerRouting::Detect { tcp: t, .. } => {
                    tcp.insert(l.name.clone(), Arc::new(TcpProxy::build(t, &clusters).map_err(at)?));
                }
                ListenerRouting::OriginalDst { ports, .. } => {
                    for (port, p) in ports {
                        if let Some(t) = &p.tcp {
                            let built = TcpProxy::build(t, &clusters).map_err(at)?;
                            tcp.insert(format!("{}|{port}", l.name), Arc::new(built));
                        }
                    }
                }
                _ => {}
            }
            let used: Vec<&String> = match &l.routing {
                ListenerRouting::Table(t) => vec![t],
                ListenerRouting::OriginalDst { ports, .. } => {
                    ports.values().filter(|p| p.tcp.is_none() || p.detect).map(|p| &p.table).collect()
                }
                ListenerRouting::Detect { http, .. } => match &**http {
                    ListenerRouting::Table(t) => vec![t],
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            for t in used {
                if !tables.contains_key(t) {
                    return Err(Problem::UnknownRouteTable(t.clone()).at(Resource::Listener(l.name.clone())));
                }
            }
            listeners.insert(l.name.clone(), (l.routing.clone(), l.mtls, l.registry_only));
        }
        pools.collect();
        let rate_limits = snapshot
            .rate_limits
            .iter()
            .filter(|p| p.routes.is_none())
            .map(|p| {
                crate::pipeline::ratelimit::Limiter::new(p.clone())
                    .map_err(|e| e.at(Resource::RateLimit(p.name.clone())))
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        Ok(Runtime {
            passthrough: passthrough_route(),
            snapshot,
            me,
            telemetry,
            authz,
            jwt,
            tables,
            outbound,
            listeners,
            clusters,
            rate_limits,
            tcp,
            gateway_tls,
        })
    }

    pub fn version(&self) -> &str {
        &self.snapshot.version
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerRouting> {
        self.listeners.get(name).map(|l| &l.0)
    }

    /// Whether a listener detects the protocol of each connection (HTTP, else TCP).
    pub fn detects(&self, name: &str) -> bool {
        matches!(self.listeners.get(name).map(|l| &l.0), Some(ListenerRouting::Detect { .. }))
    }

    /// Whether an outbound listener refuses destinations the registry does not know.
    pub fn registry_only(&self, name: &str) -> bool {
        self.listeners.get(name).is_some_and(|l| l.2)
    }

    /// The PeerAuthentication mode of an inbound listener (`None`: not an mTLS-capable port).
    pub fn listener_mtls(&self, name: &str) -> Option<spec::MtlsMode> {
        self.listeners.get(name).and_then(|l| l.1)
    }

    /// What a capturing listener does with a connection to `original` port: serve it as HTTP
    /// with this mTLS mode, or pass it through as TCP.
    pub fn captured(&self, name: &str, original: u16) -> Captured {
        match self.listeners.get(name).map(|l| &l.0) {
            Some(ListenerRouting::OriginalDst { ports, passthrough_mtls }) => match ports.get(&original) {
                Some(p) if p.detect => Captured::Detect(p.mtls),
                Some(p) if p.tcp.is_some() => Captured::Tcp(p.mtls),
                Some(p) => Captured::Http(p.mtls),
                None if *passthrough_mtls == Some(spec::MtlsMode::Strict) => Captured::Refuse,
                None => Captured::Passthrough,
            },
            _ => Captured::Passthrough,
        }
    }

    /// Whether a listener captures traffic (its connections have an original destination).
    pub fn is_capturing(&self, name: &str) -> bool {
        matches!(self.listeners.get(name).map(|l| &l.0), Some(ListenerRouting::OriginalDst { .. }))
    }
}

/// See [`Runtime::captured`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Captured {
    Http(Option<spec::MtlsMode>),
    /// Proxied as TCP ([`Runtime::tcp`] with the port).
    Tcp(Option<spec::MtlsMode>),
    /// HTTP or TCP, by what the connection's first bytes are.
    Detect(Option<spec::MtlsMode>),
    Passthrough,
    /// Plaintext to an undeclared port of a STRICT workload.
    Refuse,
}

/// A listener's (or captured port's) TCP routes, with their clusters resolved.
pub struct TcpProxy {
    routes: Vec<TcpRoute>,
    /// Routes by the ClientHello's SNI (TLS passthrough): the listener reads it first.
    pub sni: bool,
}

pub struct TcpRoute {
    pub name: Arc<str>,
    subnets: Vec<trellis_config::cidr::Cidr>,
    /// Lower case; `*.example.com` patterns too.
    sni_hosts: Vec<String>,
    destinations: Vec<(Arc<Cluster>, u32)>,
    total: u32,
}

impl TcpProxy {
    /// No routes: every connection goes where it was going (captured), or is refused.
    pub fn empty() -> TcpProxy {
        TcpProxy { routes: Vec::new(), sni: false }
    }

    fn build(t: &spec::TcpProxy, clusters: &HashMap<String, Arc<Cluster>>) -> Result<TcpProxy, Problem> {
        let mut routes = Vec::new();
        for r in &t.routes {
            let destinations = r
                .destinations
                .iter()
                .map(|(c, w)| Ok((clusters.get(c).cloned().ok_or_else(|| Problem::UnknownCluster(c.clone()))?, *w)))
                .collect::<Result<Vec<_>, Problem>>()?;
            if destinations.is_empty() {
                return Err(Problem::NoDestinations);
            }
            routes.push(TcpRoute {
                name: Arc::from(r.name.as_str()),
                subnets: r.destination_subnets.iter().filter_map(|s| trellis_config::cidr::Cidr::parse(s)).collect(),
                sni_hosts: r.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                total: destinations.iter().map(|d| d.1).sum(),
                destinations,
            });
        }
        Ok(TcpProxy { routes, sni: t.sni })
    }

    /// The route for a connection to `destination` (with the ClientHello's `sni`, when read),
    /// and the cluster it picks by weight.
    pub fn route(&self, destination: std::net::IpAddr, sni: Option<&str>) -> Option<(&TcpRoute, &Arc<Cluster>)> {
        let sni_ok = |r: &TcpRoute| {
            r.sni_hosts.is_empty()
                || sni.is_some_and(|name| {
                    let name = name.to_ascii_lowercase();
                    r.sni_hosts.iter().any(|h| match h.strip_prefix('*') {
                        Some(suffix) => name.ends_with(suffix) && name.len() > suffix.len(),
                        None => *h == name,
                    })
                })
        };
        let r = self
            .routes
            .iter()
            .find(|r| (r.subnets.is_empty() || r.subnets.iter().any(|c| c.contains(destination))) && sni_ok(r))?;
        if r.total == 0 {
            return Some((r, &r.destinations[0].0));
        }
        let mut x = fastrand::u32(..r.total);
        for (c, w) in &r.destinations {
            if x < *w {
                return Some((r, c));
            }
            x -= w;
        }
        Some((r, &r.destinations[0].0))
    }
}

impl Runtime {
    /// How `listener` (and for a capturing listener, the connection's original `port`)
    /// proxies TCP, if it does.
    pub fn tcp(&self, listener: &str, port: Option<u16>) -> Option<&Arc<TcpProxy>> {
        match port {
            Some(p) if self.is_capturing(listener) => self.tcp.get(&format!("{listener}|{p}")),
            _ => self.tcp.get(listener),
        }
    }

    /// The TLS gateway listener `name` terminates, if it does.
    pub fn gateway_tls(&self, name: &str) -> Option<&Arc<crate::listener::tls::GatewayTls>> {
        self.gateway_tls.get(name)
    }

    pub fn table(&self, name: &str) -> Option<&Arc<RouteTable>> {
        self.tables.get(name)
    }

    pub fn outbound_table(&self, port: u16) -> Option<&Arc<RouteTable>> {
        self.outbound.get(&port)
    }
}
