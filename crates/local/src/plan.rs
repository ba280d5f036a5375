//! From config to processes: which workloads, sidecars, gateways and control plane to run, on
//! which ports, with which environment. Pure: it allocates ports but starts nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use trellis_config::model::trellis::Workload as WorkloadSpec;
use trellis_config::registry::{gateway_server_scheme, selects, Protocol, Registry};
use trellis_config::{Resource, Spec};

/// Hands out ports from one contiguous block that was free when chosen. The block lies below
/// the kernel's ephemeral range (32768 and up on Linux), so outgoing connections, which draw
/// from that range, cannot take a port between now and the moment its process binds it. Each
/// mesh holds an advisory lock on its block (a file in the temporary directory, `flock`ed for
/// as long as the plan lives), so two meshes started at once never pick the same block.
#[derive(Debug)]
pub struct Ports {
    next: u16,
    end: u16,
    _lock: Option<std::fs::File>,
}

const BLOCK: u16 = 256;

impl Ports {
    pub fn reserve() -> std::io::Result<Ports> {
        for _ in 0..200 {
            let start = 20_000 + fastrand::u16(0..(12_000 / BLOCK)) * BLOCK;
            let lock = std::env::temp_dir().join(format!("trellis-ports-{start}.lock"));
            let lock = match std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock) {
                Ok(f) if f.try_lock().is_ok() => Some(f),
                Ok(_) => continue, // another mesh holds this block
                Err(_) => None,    // no temporary directory to lock in: the bind check alone
            };
            if (start..start + BLOCK).all(bindable) {
                return Ok(Ports { next: start, end: start + BLOCK, _lock: lock });
            }
        }
        Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free block of 256 ports between 20000 and 32000"))
    }

    pub fn take(&mut self) -> std::io::Result<u16> {
        while self.next < self.end {
            let p = self.next;
            self.next += 1;
            if bindable(p) {
                return Ok(p);
            }
        }
        Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "the mesh needs more than 256 ports"))
    }
}

/// Whether any app could bind `127.0.0.1:port` now, even one that does not set `SO_REUSEADDR`.
/// (Listeners made by Rust's std set it, and to them a port whose last connections are still in
/// `TIME_WAIT`, as a mesh that just stopped leaves its apps' ports for a minute, looks free; an
/// app binding it without the option, as Python's `socket` does by default, then fails with
/// "address already in use" until the kernel forgets those connections.)
fn bindable(port: u16) -> bool {
    let Ok(s) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else { return false };
    s.bind(&local(port).into()).is_ok()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One workload with everything allocated for it.
#[derive(Clone, Debug)]
pub struct WorkloadPlan {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub spec: WorkloadSpec,
    /// Directory of the file that declared it (relative working directories start here).
    pub base_dir: PathBuf,
    pub app: SocketAddr,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    /// `(service name, service port, local port)` for each upstream.
    pub upstreams: Vec<(String, u16, SocketAddr)>,
    /// Names of the services that select this workload.
    pub services: Vec<String>,
    /// The app speaks opaque TCP (its sidecar proxies bytes, not HTTP).
    pub opaque: bool,
}

/// The namespace local gateways run in, as Istio installs its gateways (their identities,
/// telemetry and the Services that reach them, e.g. `istio-egressgateway.istio-system`).
pub const GATEWAY_NAMESPACE: &str = trellis_config::compile::ROOT_NAMESPACE;

/// One gateway deployment (all Gateways with the same selector share it).
#[derive(Clone, Debug)]
pub struct GatewayPlan {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub admin: SocketAddr,
    /// Gateway server ports it will listen on.
    pub ports: Vec<u16>,
    /// How each port is spoken to (`http`, `https`, `tls`, `tcp`, or `mesh-mtls` for an
    /// ISTIO_MUTUAL server), by port: the URLs `trellis up` prints for the gateway.
    pub schemes: BTreeMap<u16, &'static str>,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub workloads: Vec<WorkloadPlan>,
    pub gateways: Vec<GatewayPlan>,
    /// The mesh's block of ports (its lock held while the plan lives).
    block: std::sync::Arc<std::sync::Mutex<Ports>>,
}

impl Plan {
    /// One more port from the mesh's block (the console's, when none is given).
    pub fn spare_port(&self) -> std::io::Result<u16> {
        self.block.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Plans the mesh. Admin ports are `admin_base`, `admin_base + 1`, ... (gateways first, then
    /// workloads in config order) so a scrape config stays valid across runs; a port in use, or
    /// `admin_base` 0, falls back to a free one.
    pub fn build(resources: &[Resource], admin_base: u16) -> std::io::Result<Plan> {
        let registry = Registry::build(resources, &[]);
        let ports = std::sync::Arc::new(std::sync::Mutex::new(Ports::reserve()?));
        let free_port = || ports.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut next_admin = admin_base;
        let mut admin_port = || -> std::io::Result<u16> {
            if next_admin != 0 {
                let p = next_admin;
                next_admin = next_admin.saturating_add(1);
                if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
                    return Ok(p);
                }
            }
            free_port()
        };
        let gateway_count = resources.iter().filter(|r| matches!(r.spec, Spec::Gateway(_))).count();
        let gateway_admins: Vec<u16> = (0..gateway_count).map(|_| admin_port()).collect::<std::io::Result<_>>()?;
        let mut workloads = Vec::new();
        for r in resources {
            let Spec::Workload(w) = &r.spec else { continue };
            let app = match w.app_port {
                Some(p) => p as u16,
                None => free_port()?,
            };
            let upstreams = w
                .upstreams
                .iter()
                .map(|u| {
                    let port = registry
                        .resolve(u, r.namespace())
                        .and_then(|s| s.ports.first())
                        .map(|p| p.number)
                        .unwrap_or(80);
                    Ok((u.clone(), port, local(free_port()?)))
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            let selecting: Vec<&trellis_config::registry::Service> = registry
                .services
                .iter()
                .filter(|s| s.endpoints.iter().any(|e| e.name == r.name() && e.namespace == r.namespace()))
                .collect();
            // The app speaks opaque TCP when it says so, or, saying nothing, when the services
            // selecting it declare only TCP ports (as Istio reads the protocol off the Service).
            let opaque = match w.protocol.as_deref().map(Protocol::parse) {
                Some(p) => p.is_opaque(),
                None => {
                    let ports: Vec<Protocol> =
                        selecting.iter().flat_map(|s| s.ports.iter().map(|p| p.protocol)).collect();
                    !ports.is_empty() && ports.iter().all(|p| p.is_opaque())
                }
            };
            let services =
                selecting.iter().map(|s| s.short_name.clone().unwrap_or_else(|| s.hostname.clone())).collect();
            workloads.push(WorkloadPlan {
                name: r.name().to_string(),
                namespace: r.namespace().to_string(),
                labels: r.meta.labels.clone(),
                spec: w.clone(),
                base_dir: r.source.file.parent().map(Path::to_path_buf).unwrap_or_default(),
                app: local(app),
                inbound: local(free_port()?),
                outbound: local(free_port()?),
                admin: local(admin_port()?),
                upstreams,
                services,
                opaque,
            });
        }
        let mut by_selector: BTreeMap<BTreeMap<String, String>, BTreeMap<u16, &'static str>> = BTreeMap::new();
        for r in resources {
            let Spec::Gateway(g) = &r.spec else { continue };
            let ports = by_selector.entry(g.selector.clone()).or_default();
            for s in &g.servers {
                let (Some((_, scheme)), Ok(port)) = (gateway_server_scheme(s), u16::try_from(s.port.number)) else {
                    continue;
                };
                // One listener serves one protocol; HTTP wins a port (as the compiler decides).
                let e = ports.entry(port).or_insert(scheme);
                if scheme == "http" {
                    *e = scheme;
                }
            }
        }
        let mut gateways = Vec::new();
        for (labels, schemes) in by_selector {
            let ports: Vec<u16> = schemes.keys().copied().collect();
            let name = match labels.get("istio") {
                Some(v) => format!("istio-{v}"),
                None if labels.is_empty() => "gateway".to_string(),
                None => format!("gateway-{}", labels.values().cloned().collect::<Vec<_>>().join("-")),
            };
            let admin = gateway_admins.get(gateways.len()).copied().map(Ok).unwrap_or_else(&free_port)?;
            gateways.push(GatewayPlan { name, labels, admin: local(admin), ports, schemes });
        }
        Ok(Plan { workloads, gateways, block: ports })
    }

    /// WorkloadEntries declaring where each local workload is reachable (its sidecar's inbound
    /// port), for the control plane's registry: every port name of every service selecting it.
    pub fn workload_entries(&self, resources: &[Resource]) -> String {
        let registry = Registry::build(resources, &[]);
        let mut out = String::from("# Written by `trellis up`: where each local workload's sidecar listens.\n");
        for w in &self.workloads {
            let mut names: Vec<String> = registry
                .services
                .iter()
                .filter(|s| s.endpoints.iter().any(|e| e.name == w.name && e.namespace == w.namespace))
                .flat_map(|s| s.ports.iter().map(|p| p.name.clone()))
                .collect();
            names.push("http".into());
            names.sort();
            names.dedup();
            let ports: Vec<String> = names.iter().map(|n| format!("{}: {}", yaml_str(n), w.inbound.port())).collect();
            // Every local workload has a sidecar that speaks mesh mTLS (Istio's label for it).
            let mut all_labels = w.labels.clone();
            all_labels.insert(trellis_config::compile::TLS_MODE_LABEL.to_string(), "istio".to_string());
            let labels: Vec<String> =
                all_labels.iter().map(|(k, v)| format!("{}: {}", yaml_str(k), yaml_str(v))).collect();
            out.push_str(&format!(
                "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  address: 127.0.0.1\n  ports: {{{}}}\n  labels: {{{}}}\n",
                yaml_str(&w.name),
                yaml_str(&w.namespace),
                ports.join(", "),
                labels.join(", "),
            ));
            out.push_str(&format!("  serviceAccount: {}\n", yaml_str(&w.service_account())));
        }
        for g in &self.gateways {
            out.push_str(&g.registry_entry(resources));
        }
        out
    }
}

impl GatewayPlan {
    /// The gateway as an instance of the Services in `istio-system` that select it (the one the
    /// registry provides for `istio: <x>` gateways, and any the config declares): a WorkloadEntry
    /// at 127.0.0.1. A local gateway listens on its servers' port numbers, which are those
    /// Services' ports, so each named port maps to its own number.
    fn registry_entry(&self, resources: &[Resource]) -> String {
        let mut ports: Vec<String> = Vec::new();
        for r in resources.iter().filter(|r| r.namespace() == GATEWAY_NAMESPACE) {
            let Spec::Service(svc) = &r.spec else { continue };
            if svc.selector.is_empty() || !selects(&svc.selector, &self.labels) {
                continue;
            }
            ports
                .extend(svc.ports.iter().map(|p| format!("{}: {}", yaml_str(p.name.as_deref().unwrap_or("")), p.port)));
        }
        let labels: Vec<String> =
            self.labels.iter().map(|(k, v)| format!("{}: {}", yaml_str(k), yaml_str(v))).collect();
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {}, namespace: {GATEWAY_NAMESPACE}}}\nspec:\n  address: 127.0.0.1\n  ports: {{{}}}\n  labels: {{{}}}\n  serviceAccount: {}\n",
            yaml_str(&self.name),
            ports.join(", "),
            labels.join(", "),
            yaml_str(&self.name),
        )
    }
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

/// `service-b` → `SERVICE_B`.
pub fn env_name(service: &str) -> String {
    service.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect()
}

impl WorkloadPlan {
    /// The app's environment: its port, the standard proxy variables pointing at its sidecar,
    /// one URL and one local address per upstream, then the workload's own `env` (which wins).
    pub fn env(&self) -> Vec<(String, String)> {
        let proxy = format!("http://{}", self.outbound);
        let mut env = vec![
            ("PORT".to_string(), self.app.port().to_string()),
            ("HTTP_PROXY".into(), proxy.clone()),
            ("http_proxy".into(), proxy),
            ("NO_PROXY".into(), "localhost,127.0.0.1,::1".into()),
            ("no_proxy".into(), "localhost,127.0.0.1,::1".into()),
            ("TRELLIS_WORKLOAD".into(), self.name.clone()),
            ("TRELLIS_NAMESPACE".into(), self.namespace.clone()),
        ];
        for (svc, port, local) in &self.upstreams {
            let url = if *port == 80 { format!("http://{svc}") } else { format!("http://{svc}:{port}") };
            env.push((format!("{}_URL", env_name(svc)), url));
            env.push((format!("{}_ADDR", env_name(svc)), local.to_string()));
        }
        for (k, v) in &self.spec.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        env
    }

    /// The sidecar's command-line arguments (after `trellis proxy`, or for `trellis-proxy`).
    pub fn sidecar_args(&self, control_plane: SocketAddr) -> Vec<String> {
        let proto = match self.spec.protocol.as_deref().map(Protocol::parse) {
            _ if self.opaque => ",tcp",
            Some(Protocol::Http2 | Protocol::Grpc) => ",http2",
            _ => "",
        };
        let mut args = vec![
            "--control-plane".to_string(),
            control_plane.to_string(),
            "--workload".into(),
            self.name.clone(),
            "--namespace".into(),
            self.namespace.clone(),
            "--service-account".into(),
            self.service_account(),
            "--admin".into(),
            self.admin.to_string(),
            "--inbound".into(),
            format!("{}={}{proto}", self.inbound, self.app),
            "--outbound".into(),
            self.outbound.to_string(),
            "--drain-timeout".into(),
            "2s".into(),
        ];
        for (k, v) in &self.labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        for (svc, port, local) in &self.upstreams {
            args.push("--upstream".into());
            args.push(format!("{local}={svc}:{port}"));
        }
        args
    }

    /// The app's program and arguments, the program resolved next to `trellis` first.
    pub fn command(&self, trellis_dir: &Path) -> Option<(PathBuf, Vec<String>)> {
        let (first, rest) = self.spec.command.split_first()?;
        let mut args: Vec<String> = rest.to_vec();
        args.extend(self.spec.args.iter().cloned());
        let program = if first.contains('/') {
            let p = PathBuf::from(first);
            if p.is_relative() {
                self.base_dir.join(p)
            } else {
                p
            }
        } else if trellis_dir.join(first).is_file() {
            trellis_dir.join(first)
        } else {
            PathBuf::from(first)
        };
        Some((program, args))
    }

    pub fn working_dir(&self) -> PathBuf {
        match &self.spec.working_dir {
            Some(d) => self.base_dir.join(d),
            None => self.base_dir.clone(),
        }
    }

    /// The workload's service account: its own, else its name (each local process its own
    /// identity).
    pub fn service_account(&self) -> String {
        self.spec.service_account.clone().unwrap_or_else(|| self.name.clone())
    }

    pub fn version(&self) -> String {
        self.labels.get("version").cloned().unwrap_or_else(|| "-".into())
    }
}

impl GatewayPlan {
    pub fn args(&self, control_plane: SocketAddr) -> Vec<String> {
        let mut args = vec![
            "--role".to_string(),
            "gateway".into(),
            "--control-plane".into(),
            control_plane.to_string(),
            "--workload".into(),
            self.name.clone(),
            "--namespace".into(),
            GATEWAY_NAMESPACE.into(),
            "--service-account".into(),
            self.name.clone(),
            "--admin".into(),
            self.admin.to_string(),
            "--drain-timeout".into(),
            "2s".into(),
        ];
        for (k, v) in &self.labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args
    }
}

#[cfg(test)]
mod port_tests {
    use std::io::{Read, Write};

    /// A port whose server side closed first is in `TIME_WAIT`: free to std's listeners, not to
    /// an app that binds without `SO_REUSEADDR`, so the mesh does not hand it out.
    #[test]
    fn a_port_in_time_wait_is_not_handed_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        server.write_all(b"bye").expect("write");
        drop(server); // the server closes first: its end (local port `port`) goes to TIME_WAIT
        let mut buf = Vec::new();
        client.read_to_end(&mut buf).expect("read to the server's close");
        drop(client);
        drop(listener);
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "std's listeners reuse it");
        assert!(!super::bindable(port), "port {port} in TIME_WAIT was called bindable");
        // A port nobody used is.
        let fresh = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        assert!(super::bindable(fresh));
    }
}
