//! linkerd2-proxy as a peer, when the user supplies its binary (`LINKERD2_PROXY_BIN`).
//!
//! linkerd2-proxy does not run without its control plane, and it learns where a connection
//! was going from `SO_ORIGINAL_DST`, so this module provides both, as a Linkerd pod has them:
//!
//! - **Traffic capture** as `linkerd-init` sets it up: iptables `nat OUTPUT` rules that
//!   redirect the application's connections to the proxy's outbound port, and the client
//!   proxy's connections to the server proxy's inbound port. Proxies run as their own users
//!   (as Linkerd's run as uid 2102) so the rules can tell them apart. The rules live in a
//!   private network namespace that the harness enters first (see [`enter_private_netns`]),
//!   so nothing on the machine is changed and nothing is left behind.
//! - **A stand-in control plane** (one gRPC server on loopback, which the proxy reaches
//!   without TLS as it does any loopback control address) speaking linkerd2-proxy-api:
//!   `identity.Identity/Certify` signs the proxy's CSR with a CA made for the run;
//!   `outbound.OutboundPolicies/Watch` answers what Linkerd's policy controller answers for a
//!   Service with no routes (protocol detection, one default route, a peak-EWMA balancer fed
//!   by `destination.Destination/Get`); `Destination/Get` streams the endpoint with its TLS
//!   identity and the HTTP/2 protocol hint when a server proxy is in front of it, as the
//!   destination controller does for meshed pods; `inbound.InboundServerPolicies/WatchPort`
//!   answers the `all-unauthenticated` default server. `Destination/GetProfile` says there is
//!   no ServiceProfile.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use linkerd2_proxy_api::{destination as dst, http_route, identity, inbound, meta, net, outbound};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::load::Target;
use crate::peers::{free_port, http_get, http_ok, local, wait_ready_or, Backends, Pinning, Proc, Setup};

/// Set in the harness once it runs in its own network namespace.
const NETNS_ENV: &str = "TRELLIS_BENCH_NETNS";
/// The pod's address in the private namespace (on `lo`): what the application calls and the
/// endpoints' address, as linkerd2-proxy refuses to connect to loopback endpoints.
const POD_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 77, 0, 1);
/// The users the proxies run as (Linkerd's proxy runs as 2102).
const CLIENT_UID: u32 = 2102;
const SERVER_UID: u32 = 2103;
const TRUST_DOMAIN: &str = "cluster.local";

/// The measured proxy's `proxy_build_info` (from its admin `/metrics`).
static VERSION: OnceLock<String> = OnceLock::new();

/// The version of the linkerd2-proxy measured, for the report.
pub fn version() -> String {
    match (VERSION.get(), std::env::var("LINKERD2_PROXY_BIN")) {
        (Some(v), _) => v.clone(),
        (None, Ok(bin)) => format!("{bin} (not started)"),
        (None, Err(_)) => "not supplied".into(),
    }
}

/// Whether linkerd2-proxy scenarios can run, and if not, why (the text of their rows).
pub fn availability() -> Result<PathBuf, String> {
    let Ok(bin) = std::env::var("LINKERD2_PROXY_BIN") else {
        return Err("not run: LINKERD2_PROXY_BIN unset".into());
    };
    let bin = PathBuf::from(bin);
    if !bin.is_file() {
        return Err(format!("not run: LINKERD2_PROXY_BIN={} is not a file", bin.display()));
    }
    if !in_private_netns() {
        return Err("not run: a private network namespace for iptables capture could not be made (needs root and `unshare --net`)".into());
    }
    match Command::new("iptables").args(["-t", "nat", "-S", "OUTPUT"]).output() {
        Ok(o) if o.status.success() => Ok(bin),
        Ok(o) => Err(format!("not run: iptables failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(_) => Err("not run: iptables not installed (Debian package iptables)".into()),
    }
}

/// Whether the harness runs in its private network namespace.
pub fn in_private_netns() -> bool {
    std::env::var_os(NETNS_ENV).is_some()
}

/// When linkerd2-proxy is to be measured, runs the whole harness again inside a private
/// network namespace (loopback only) so that its iptables rules touch nothing else; every
/// scenario then runs there, on the same loopback, for a like-for-like table. Returns the
/// exit code to leave with when it did; `None` to go on here (not asked for, or not possible:
/// then the linkerd2-proxy rows say why).
pub fn enter_private_netns() -> Option<i32> {
    if std::env::var_os("LINKERD2_PROXY_BIN").is_none() || std::env::var_os(NETNS_ENV).is_some() {
        return None;
    }
    let probe = Command::new("unshare").args(["--net", "true"]).stderr(Stdio::null()).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("bench: cannot make a private network namespace (unshare --net); linkerd2-proxy rows will say so");
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    eprintln!("bench: entering a private network namespace for the iptables capture linkerd2-proxy needs");
    let status = Command::new("unshare")
        .args(["--net", "--", "sh", "-c"])
        .arg(format!("ip link set lo up && ip addr add {POD_IP}/32 dev lo && exec \"$0\" \"$@\""))
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(NETNS_ENV, "1")
        .status();
    match status {
        Ok(s) => Some(s.code().unwrap_or(1)),
        Err(e) => {
            eprintln!("bench: unshare failed: {e}");
            None
        }
    }
}

/// iptables `nat OUTPUT` rules, deleted on drop.
struct Capture {
    rules: Vec<Vec<String>>,
}

impl Capture {
    /// Redirects connections to `ports` on the pod address made by `uid` to `to_port`.
    fn redirect(&mut self, uid: u32, ports: &[u16], to_port: u16) -> anyhow::Result<()> {
        for p in ports {
            let rule: Vec<String> = [
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                &POD_IP.to_string(),
                "--dport",
                &p.to_string(),
                "-m",
                "owner",
                "--uid-owner",
                &uid.to_string(),
                "-j",
                "REDIRECT",
                "--to-ports",
                &to_port.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let out = Command::new("iptables").args(["-t", "nat", "-A"]).args(&rule).output()?;
            anyhow::ensure!(out.status.success(), "iptables: {}", String::from_utf8_lossy(&out.stderr).trim());
            self.rules.push(rule);
        }
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        for rule in &self.rules {
            let _ = Command::new("iptables").args(["-t", "nat", "-D"]).args(rule).output();
        }
    }
}

// --- the stand-in control plane ---

/// Where an original destination port leads: the endpoint, and the server proxy's identity
/// when one is in front of it.
#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    server_identity: Option<String>,
}

#[derive(Clone)]
struct ControlPlane {
    ca: Arc<Ca>,
    /// Keyed by the original destination port.
    endpoints: Arc<HashMap<u16, Endpoint>>,
}

struct Ca {
    key: rcgen::KeyPair,
    cert_pem: String,
}

impl Ca {
    fn new() -> anyhow::Result<Ca> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, format!("identity.linkerd.{TRUST_DOMAIN}"));
        params.distinguished_name = dn;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(300)).into();
        params.not_after = (now + Duration::from_secs(86_400)).into();
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert_pem: cert.pem(), key })
    }

    /// Signs a CSR (DER) for `name`, a DNS-like Linkerd identity.
    fn sign(&self, csr_der: &[u8], name: &str) -> anyhow::Result<(Vec<u8>, SystemTime)> {
        let csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = SystemTime::now();
        let until = now + Duration::from_secs(86_400);
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = until.into();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let leaf = params.signed_by(&csr.public_key, &issuer)?;
        Ok((leaf.der().to_vec(), until))
    }
}

type Watch<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One message, then the stream stays open (as the controllers' watches do).
fn watch<T: Send + 'static>(first: T) -> Watch<T> {
    Box::pin(tokio_stream::iter([Ok(first)]).chain(tokio_stream::pending()))
}

fn dur(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn default_meta(name: &str) -> meta::Metadata {
    meta::Metadata { kind: Some(meta::metadata::Kind::Default(name.into())) }
}

fn match_all() -> http_route::HttpRouteMatch {
    http_route::HttpRouteMatch {
        path: Some(http_route::PathMatch { kind: Some(http_route::path_match::Kind::Prefix("/".into())) }),
        ..Default::default()
    }
}

/// The authority a service is discovered by.
fn service_name(port: u16) -> String {
    format!("svc-{port}.default.svc.{TRUST_DOMAIN}:{port}")
}

fn identity_name(service_account: &str) -> String {
    format!("{service_account}.default.serviceaccount.identity.linkerd.{TRUST_DOMAIN}")
}

#[tonic::async_trait]
impl identity::identity_server::Identity for ControlPlane {
    async fn certify(
        &self,
        req: Request<identity::CertifyRequest>,
    ) -> Result<Response<identity::CertifyResponse>, Status> {
        let req = req.into_inner();
        // The token file holds the identity the workload may have (a service-account token
        // stands in for it in a cluster).
        if req.token != req.identity.as_bytes() {
            return Err(Status::permission_denied("the token does not grant this identity"));
        }
        let (leaf, until) = self
            .ca
            .sign(&req.certificate_signing_request, &req.identity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(identity::CertifyResponse {
            leaf_certificate: leaf,
            intermediate_certificates: Vec::new(),
            valid_until: Some(until.into()),
        }))
    }
}

#[tonic::async_trait]
impl dst::destination_server::Destination for ControlPlane {
    type GetStream = Watch<dst::Update>;
    type GetProfileStream = Watch<dst::DestinationProfile>;

    async fn get(&self, req: Request<dst::GetDestination>) -> Result<Response<Self::GetStream>, Status> {
        let path = req.into_inner().path;
        let port = path.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        let Some(ep) = port.and_then(|p| self.endpoints.get(&p)) else {
            return Err(Status::invalid_argument(format!("unknown service {path}")));
        };
        let addr = dst::WeightedAddr {
            addr: Some(net::TcpAddress::from(ep.addr)),
            weight: 10_000,
            metric_labels: HashMap::from([("pod".to_string(), "server".to_string())]),
            tls_identity: ep.server_identity.as_ref().map(|name| dst::TlsIdentity {
                strategy: Some(dst::tls_identity::Strategy::DnsLikeIdentity(dst::tls_identity::DnsLikeIdentity {
                    name: name.clone(),
                })),
                server_name: Some(dst::tls_identity::DnsLikeIdentity { name: name.clone() }),
            }),
            protocol_hint: ep.server_identity.as_ref().map(|_| dst::ProtocolHint {
                protocol: Some(dst::protocol_hint::Protocol::H2(dst::protocol_hint::H2 {})),
                opaque_transport: None,
            }),
            ..Default::default()
        };
        let update = dst::Update {
            update: Some(dst::update::Update::Add(dst::WeightedAddrSet {
                addrs: vec![addr],
                metric_labels: HashMap::from([("namespace".to_string(), "default".to_string())]),
            })),
        };
        Ok(Response::new(watch(update)))
    }

    async fn get_profile(&self, _: Request<dst::GetDestination>) -> Result<Response<Self::GetProfileStream>, Status> {
        Err(Status::invalid_argument("no ServiceProfile"))
    }
}

#[tonic::async_trait]
impl outbound::outbound_policies_server::OutboundPolicies for ControlPlane {
    type WatchStream = Watch<outbound::OutboundPolicy>;

    async fn get(&self, req: Request<outbound::TrafficSpec>) -> Result<Response<outbound::OutboundPolicy>, Status> {
        self.policy(req.into_inner()).map(Response::new)
    }

    async fn watch(&self, req: Request<outbound::TrafficSpec>) -> Result<Response<Self::WatchStream>, Status> {
        self.policy(req.into_inner()).map(|p| Response::new(watch(p)))
    }
}

impl ControlPlane {
    /// What the policy controller answers for a Service with no routes attached.
    fn policy(&self, spec: outbound::TrafficSpec) -> Result<outbound::OutboundPolicy, Status> {
        let port = match spec.target {
            Some(outbound::traffic_spec::Target::Addr(a)) => a.port as u16,
            _ => return Err(Status::not_found("only addresses are known")),
        };
        if !self.endpoints.contains_key(&port) {
            return Err(Status::not_found(format!("no service on port {port}")));
        }
        let name = service_name(port);
        let backend = outbound::Backend {
            metadata: Some(default_meta("service")),
            queue: Some(outbound::Queue { capacity: 100, failfast_timeout: Some(dur(Duration::from_secs(3))) }),
            kind: Some(outbound::backend::Kind::Balancer(outbound::backend::BalanceP2c {
                discovery: Some(outbound::backend::EndpointDiscovery {
                    kind: Some(outbound::backend::endpoint_discovery::Kind::Dst(
                        outbound::backend::endpoint_discovery::DestinationGet { path: name },
                    )),
                }),
                load: Some(outbound::backend::balance_p2c::Load::PeakEwma(outbound::backend::balance_p2c::PeakEwma {
                    default_rtt: Some(dur(Duration::from_millis(30))),
                    decay: Some(dur(Duration::from_secs(10))),
                })),
            })),
        };
        let http_route = outbound::HttpRoute {
            metadata: Some(default_meta("http")),
            hosts: Vec::new(),
            rules: vec![outbound::http_route::Rule {
                matches: vec![match_all()],
                backends: Some(outbound::http_route::Distribution {
                    kind: Some(outbound::http_route::distribution::Kind::FirstAvailable(
                        outbound::http_route::distribution::FirstAvailable {
                            backends: vec![outbound::http_route::RouteBackend {
                                backend: Some(backend.clone()),
                                ..Default::default()
                            }],
                        },
                    )),
                }),
                ..Default::default()
            }],
        };
        let opaque_route = outbound::OpaqueRoute {
            metadata: Some(default_meta("opaq")),
            rules: vec![outbound::opaque_route::Rule {
                backends: Some(outbound::opaque_route::Distribution {
                    kind: Some(outbound::opaque_route::distribution::Kind::FirstAvailable(
                        outbound::opaque_route::distribution::FirstAvailable {
                            backends: vec![outbound::opaque_route::RouteBackend {
                                backend: Some(backend),
                                filters: Vec::new(),
                            }],
                        },
                    )),
                }),
                filters: Vec::new(),
            }],
        };
        let http1 = outbound::proxy_protocol::Http1 { routes: vec![http_route.clone()], failure_accrual: None };
        let http2 = outbound::proxy_protocol::Http2 { routes: vec![http_route], failure_accrual: None };
        Ok(outbound::OutboundPolicy {
            metadata: Some(meta::Metadata {
                kind: Some(meta::metadata::Kind::Resource(meta::Resource {
                    group: "core".into(),
                    kind: "Service".into(),
                    name: format!("svc-{port}"),
                    namespace: "default".into(),
                    port: port as u32,
                    ..Default::default()
                })),
            }),
            protocol: Some(outbound::ProxyProtocol {
                kind: Some(outbound::proxy_protocol::Kind::Detect(outbound::proxy_protocol::Detect {
                    timeout: Some(dur(Duration::from_secs(10))),
                    opaque: Some(outbound::proxy_protocol::Opaque { routes: vec![opaque_route] }),
                    http1: Some(http1),
                    http2: Some(http2),
                })),
            }),
        })
    }
}

#[tonic::async_trait]
impl inbound::inbound_server_policies_server::InboundServerPolicies for ControlPlane {
    type WatchPortStream = Watch<inbound::Server>;

    async fn get_port(&self, _: Request<inbound::PortSpec>) -> Result<Response<inbound::Server>, Status> {
        Ok(Response::new(default_server()))
    }

    async fn watch_port(&self, _: Request<inbound::PortSpec>) -> Result<Response<Self::WatchPortStream>, Status> {
        Ok(Response::new(watch(default_server())))
    }
}

/// The `all-unauthenticated` default server: protocol detection, one default route, any
/// client allowed.
fn default_server() -> inbound::Server {
    let labels = HashMap::from([
        ("group".to_string(), String::new()),
        ("kind".to_string(), "default".to_string()),
        ("name".to_string(), "all-unauthenticated".to_string()),
    ]);
    let any = |ip: std::net::IpAddr| inbound::Network {
        net: Some(net::IpNetwork { ip: Some(ip.into()), prefix_len: 0 }),
        except: Vec::new(),
    };
    inbound::Server {
        protocol: Some(inbound::ProxyProtocol {
            kind: Some(inbound::proxy_protocol::Kind::Detect(inbound::proxy_protocol::Detect {
                timeout: Some(dur(Duration::from_secs(10))),
                http_routes: vec![inbound::HttpRoute {
                    metadata: Some(default_meta("default")),
                    hosts: Vec::new(),
                    authorizations: Vec::new(),
                    rules: vec![inbound::http_route::Rule { matches: vec![match_all()], filters: Vec::new() }],
                }],
                http_local_rate_limit: None,
            })),
        }),
        server_ips: Vec::new(),
        authorizations: vec![inbound::Authz {
            networks: vec![any([0, 0, 0, 0].into()), any(std::net::Ipv6Addr::UNSPECIFIED.into())],
            authentication: Some(inbound::Authn {
                permit: Some(inbound::authn::Permit::Unauthenticated(inbound::authn::PermitUnauthenticated {})),
            }),
            labels: labels.clone(),
            metadata: Some(default_meta("all-unauthenticated")),
        }],
        labels,
    }
}

/// Serves the stand-in control plane on loopback; aborted on drop.
struct Served(tokio::task::JoinHandle<()>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve(cp: ControlPlane) -> anyhow::Result<(SocketAddr, Served)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let router = tonic::transport::Server::builder()
        .add_service(identity::identity_server::IdentityServer::new(cp.clone()))
        .add_service(dst::destination_server::DestinationServer::new(cp.clone()))
        .add_service(outbound::outbound_policies_server::OutboundPoliciesServer::new(cp.clone()))
        .add_service(inbound::inbound_server_policies_server::InboundServerPoliciesServer::new(cp));
    let task = tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming(incoming).await {
            eprintln!("bench: linkerd2-proxy control-plane stand-in stopped: {e}");
        }
    });
    Ok((addr, Served(task)))
}

// --- the proxies ---

/// A proxy's listeners.
struct Ports {
    outbound: u16,
    inbound: u16,
    admin: u16,
}

/// Starts one linkerd2-proxy as `uid`, with its identity documents, and waits for `/ready`
/// (which needs its certificate).
async fn start_proxy(
    pin: &Pinning,
    bin: &Path,
    dir: &Path,
    name: &str,
    uid: u32,
    cp: SocketAddr,
    trust_anchors: &str,
) -> anyhow::Result<(Proc, f64, Ports)> {
    let ports = Ports { outbound: free_port(), inbound: free_port(), admin: free_port() };
    let id = identity_name(name);
    let id_dir = dir.join(format!("{name}-identity"));
    std::fs::create_dir_all(&id_dir)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::new(vec![id.clone()])?.serialize_request(&key)?;
    std::fs::write(id_dir.join("key.p8"), key.serialize_der())?;
    std::fs::write(id_dir.join("csr.der"), csr.der())?;
    std::fs::write(id_dir.join("token"), &id)?;
    for f in ["", "key.p8", "csr.der", "token"] {
        std::os::unix::fs::chown(id_dir.join(f), Some(uid), Some(uid))?;
    }
    // `BENCH_LINKERD_LOG=<dir>`: keep the proxies' logs there, at debug level.
    let keep_log = std::env::var_os("BENCH_LINKERD_LOG").map(PathBuf::from);
    let log = keep_log.as_deref().unwrap_or(dir).join(format!("linkerd2-proxy-{name}.log"));
    let env: Vec<(&str, String)> = vec![
        ("LINKERD2_PROXY_LOG", if keep_log.is_some() { "linkerd=debug,info" } else { "warn" }.into()),
        ("LINKERD2_PROXY_CORES", "1".into()),
        ("LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR", local(ports.outbound).to_string()),
        ("LINKERD2_PROXY_INBOUND_LISTEN_ADDR", local(ports.inbound).to_string()),
        ("LINKERD2_PROXY_ADMIN_LISTEN_ADDR", local(ports.admin).to_string()),
        ("LINKERD2_PROXY_CONTROL_LISTEN_ADDR", local(free_port()).to_string()),
        ("LINKERD2_PROXY_DESTINATION_SVC_ADDR", cp.to_string()),
        ("LINKERD2_PROXY_POLICY_SVC_ADDR", cp.to_string()),
        ("LINKERD2_PROXY_POLICY_WORKLOAD", format!("{{\"ns\":\"default\",\"pod\":\"{name}\"}}")),
        ("LINKERD2_PROXY_IDENTITY_SVC_ADDR", cp.to_string()),
        ("LINKERD2_PROXY_IDENTITY_DIR", id_dir.display().to_string()),
        ("LINKERD2_PROXY_IDENTITY_TOKEN_FILE", id_dir.join("token").display().to_string()),
        ("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", trust_anchors.to_string()),
        ("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", id),
        ("LINKERD2_PROXY_INBOUND_DEFAULT_POLICY", "all-unauthenticated".into()),
        (
            "LINKERD2_PROXY_DESTINATION_CONTEXT",
            format!("{{\"ns\":\"default\", \"nodeName\":\"bench\", \"pod\":\"{name}\"}}"),
        ),
    ];
    let t = Instant::now();
    let mut cmd = pin.command(bin);
    // It logs to standard output.
    cmd.envs(env).uid(uid).gid(uid).stderr(Stdio::null()).stdout(std::fs::File::create(&log)?);
    let child = cmd.spawn()?;
    let proc = Proc { name: format!("linkerd2-proxy {name}"), child };
    let admin = local(ports.admin);
    wait_ready_or(
        || http_ok(admin, "/ready"),
        &format!("linkerd2-proxy ({name})"),
        || std::fs::read_to_string(&log).unwrap_or_default().lines().rev().take(5).collect::<Vec<_>>().join("\n"),
    )
    .await?;
    let ready = t.elapsed().as_secs_f64() * 1000.0;
    if VERSION.get().is_none() {
        let info = http_get(admin, "/metrics")
            .and_then(|m| m.lines().find(|l| l.starts_with("proxy_build_info")).map(str::to_string));
        let _ = VERSION.set(info.unwrap_or_else(|| "unknown (no proxy_build_info)".into()));
    }
    Ok((proc, ready, ports))
}

/// linkerd2-proxy as the client's sidecar (1 proxy: straight to the backends), or client and
/// server sidecars with mutual TLS between them (2 proxies). The load generator calls the
/// backends' own addresses; iptables sends its connections through the proxies.
pub async fn setup(pin: &Pinning, bin: &Path, be: Backends, chain: usize) -> anyhow::Result<Setup> {
    let tmp = tempfile::tempdir()?;
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    // The proxies run as their own users: give them a copy they can execute.
    let exe = tmp.path().join("linkerd2-proxy");
    std::fs::copy(bin, &exe)?;
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let server_identity = (chain == 2).then(|| identity_name("server"));
    let ports = [be.http.port(), be.grpc.port()];
    let pod = |a: SocketAddr| SocketAddr::from((POD_IP, a.port()));
    let endpoints = [be.http, be.grpc]
        .into_iter()
        .map(|a| (a.port(), Endpoint { addr: pod(a), server_identity: server_identity.clone() }))
        .collect();
    let ca = Arc::new(Ca::new()?);
    let anchors = ca.cert_pem.clone();
    let (cp, served) = serve(ControlPlane { ca, endpoints: Arc::new(endpoints) }).await?;
    let mut procs = Vec::new();
    let mut ready = Vec::new();
    let mut capture = Capture { rules: Vec::new() };
    if chain == 2 {
        let (p, r, server) = start_proxy(pin, &exe, tmp.path(), "server", SERVER_UID, cp, &anchors).await?;
        procs.push(p);
        ready.push(r);
        // The client proxy's connections to the server pod go to the server proxy's inbound port.
        capture.redirect(CLIENT_UID, &ports, server.inbound)?;
    }
    let (p, r, client) = start_proxy(pin, &exe, tmp.path(), "client", CLIENT_UID, cp, &anchors).await?;
    procs.insert(0, p);
    ready.insert(0, r);
    // The application's (the load generator's, uid 0) connections go to the client proxy.
    capture.redirect(0, &ports, client.outbound)?;
    Ok(Setup {
        h1: Target::Http1(format!("http://{}/", pod(be.http))),
        h2: Some(Target::Http2(format!("http://{}/", pod(be.http)))),
        grpc: Some(Target::Grpc(format!("http://{}", pod(be.grpc)))),
        procs,
        ready_ms: ready,
        tmp,
        _keep: vec![Box::new(capture), Box::new(served)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use linkerd2_proxy_api::{
        destination::destination_client::DestinationClient, identity::identity_client::IdentityClient,
    };
    use linkerd2_proxy_api::{
        inbound::inbound_server_policies_client::InboundServerPoliciesClient,
        outbound::outbound_policies_client::OutboundPoliciesClient,
    };

    /// The stand-in answers linkerd2-proxy-api's own clients as the proxy needs: a certificate
    /// for the CSR's key, chained to the trust anchors; a policy for a known port (and
    /// NotFound for others); the endpoint with its identity and HTTP/2 hint; the default server.
    #[tokio::test]
    async fn stand_in_answers_the_proxy_api() -> anyhow::Result<()> {
        use anyhow::Context;
        let ca = Arc::new(Ca::new()?);
        let anchors = ca.cert_pem.clone();
        let ep = Endpoint { addr: SocketAddr::from((POD_IP, 8080)), server_identity: Some(identity_name("server")) };
        let (addr, _served) = serve(ControlPlane { ca, endpoints: Arc::new(HashMap::from([(8080, ep)])) }).await?;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;

        let id = identity_name("client");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::new(vec![id.clone()])?.serialize_request(&key)?;
        let mut identity = IdentityClient::new(channel.clone());
        let request = |token: &str| identity::CertifyRequest {
            identity: id.clone(),
            token: token.as_bytes().to_vec(),
            certificate_signing_request: csr.der().to_vec(),
        };
        let denied = identity.certify(request("someone-else")).await.err().context("an error expected")?;
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        let cert = identity.certify(request(&id)).await?.into_inner();
        let (_, leaf) = x509_parser::parse_x509_certificate(&cert.leaf_certificate)?;
        assert_eq!(
            leaf.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice(),
            "signed for the CSR's key"
        );
        let sans = leaf.subject_alternative_name()?.context("SANs")?;
        assert_eq!(format!("{:?}", sans.value.general_names), format!("[DNSName({id:?})]"));
        let root = x509_parser::pem::parse_x509_pem(anchors.as_bytes())?.1;
        leaf.verify_signature(Some(root.parse_x509()?.public_key()))?;

        let mut policies = OutboundPoliciesClient::new(channel.clone());
        let spec = |port: u16| outbound::TrafficSpec {
            source_workload: String::new(),
            target: Some(outbound::traffic_spec::Target::Addr(SocketAddr::from((POD_IP, port)).into())),
        };
        let unknown = policies.watch(spec(9)).await.err().context("an error expected")?;
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        let policy = policies.watch(spec(8080)).await?.into_inner().next().await.context("a message")??;
        let Some(outbound::proxy_protocol::Kind::Detect(detect)) = policy.protocol.and_then(|p| p.kind) else {
            panic!("protocol detection expected")
        };
        assert_eq!(detect.http1.context("http1")?.routes.len(), 1);

        let mut destination = DestinationClient::new(channel.clone());
        let get = dst::GetDestination { path: service_name(8080), ..Default::default() };
        let update = destination.get(get).await?.into_inner().next().await.context("a message")??;
        let Some(dst::update::Update::Add(set)) = update.update else { panic!("an endpoint expected") };
        let addr = &set.addrs[0];
        assert_eq!(SocketAddr::try_from(addr.addr.context("address")?)?, SocketAddr::from((POD_IP, 8080)));
        assert!(addr.protocol_hint.is_some());
        assert_eq!(
            addr.tls_identity.as_ref().and_then(|t| t.server_name.as_ref()).context("server name")?.name,
            identity_name("server")
        );

        let mut inbound = InboundServerPoliciesClient::new(channel);
        let server = inbound.watch_port(inbound::PortSpec { workload: String::new(), port: 8080 }).await?;
        let server = server.into_inner().next().await.context("a message")??;
        assert_eq!(server.labels["name"], "all-unauthenticated");
        Ok(())
    }
}
