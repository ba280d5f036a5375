//! The service registry derived from config: which hosts exist, on which ports, served by which
//! endpoints. Built from ServiceEntry, WorkloadEntry and Kubernetes Service resources, plus any
//! workloads a caller adds (the local mesh adds the processes it runs). `analyze` asks it whether
//! a host exists; `compile` asks it for endpoints.

use std::collections::{BTreeMap, HashMap};

use crate::model::networking::{Labels, WorkloadEntry};
use crate::model::{Resource, Spec};

/// The suffix Kubernetes gives service hostnames.
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// An application protocol, from a port's `protocol`, `appProtocol` or name prefix (Istio's rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Https,
    Tls,
    Tcp,
    Unknown,
}

impl Protocol {
    pub fn parse(s: &str) -> Protocol {
        match s.to_ascii_lowercase().as_str() {
            "http" | "http1" | "http/1.1" => Protocol::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => Protocol::Http2,
            "grpc" | "grpc-web" => Protocol::Grpc,
            "https" => Protocol::Https,
            "tls" => Protocol::Tls,
            "tcp" | "mongo" | "mysql" | "redis" | "postgres" | "postgresql" | "amqp" | "kafka" | "nats" => {
                Protocol::Tcp
            }
            _ => Protocol::Unknown,
        }
    }

    /// Istio's port-name convention: `http`, `http-web`, `grpc-api`, ...
    pub fn from_port_name(name: &str) -> Protocol {
        let prefix = name.split('-').next().unwrap_or(name);
        Protocol::parse(prefix)
    }

    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }

    /// Bytes the proxy passes on without reading them: TCP, and TLS the app speaks itself.
    pub fn is_opaque(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Tls | Protocol::Https)
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ServicePort {
    pub number: u16,
    pub name: String,
    pub protocol: Protocol,
    /// The workload port, by number or by the name of a workload's port.
    pub target_port: Option<TargetPort>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// An instance that serves a service: an address, its named ports and its labels. An empty
/// address is a workload known only from a manifest (a Deployment's pod template): it counts for
/// selection and has no endpoint.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub address: String,
    pub ports: BTreeMap<String, u16>,
    pub labels: Labels,
    pub weight: u32,
    pub service_account: Option<String>,
}

impl Workload {
    pub fn from_entry(name: &str, namespace: &str, we: &WorkloadEntry) -> Option<Workload> {
        Some(Workload {
            name: name.to_string(),
            namespace: namespace.to_string(),
            address: we.address.clone()?,
            ports: we.ports.iter().filter_map(|(k, v)| Some((k.clone(), u16::try_from(*v).ok()?))).collect(),
            labels: we.labels.clone(),
            weight: we.weight.unwrap_or(1).max(1),
            service_account: we.service_account.clone(),
        })
    }

    /// The port this workload serves `port` of a service on (Istio's rule: the workload's port of
    /// the same name, else the target port, else the service port).
    pub fn has_address(&self) -> bool {
        !self.address.is_empty()
    }

    pub fn port_for(&self, port: &ServicePort) -> u16 {
        if let Some(p) = self.ports.get(&port.name) {
            return *p;
        }
        match &port.target_port {
            Some(TargetPort::Number(n)) => *n,
            Some(TargetPort::Name(name)) => self.ports.get(name).copied().unwrap_or(port.number),
            None => port.number,
        }
    }
}

/// The ready endpoints of the EndpointSlices of Service `namespace/service`.
fn slice_endpoints(resources: &[Resource], namespace: &str, service: &str) -> Vec<Workload> {
    let mut out = Vec::new();
    for r in resources {
        let Spec::EndpointSlice(slice) = &r.spec else { continue };
        if r.namespace() != namespace
            || r.meta.labels.get(crate::model::kube::SERVICE_NAME_LABEL).map(String::as_str) != Some(service)
        {
            continue;
        }
        let ports: BTreeMap<String, u16> = slice
            .ports
            .iter()
            .filter_map(|p| Some((p.name.clone().unwrap_or_default(), u16::try_from(p.port?).ok()?)))
            .collect();
        for (i, e) in slice.endpoints.iter().enumerate() {
            if e.conditions.ready == Some(false) {
                continue;
            }
            for (j, address) in e.addresses.iter().enumerate() {
                out.push(Workload {
                    name: format!("{}-{i}-{j}", r.name()),
                    namespace: namespace.to_string(),
                    address: address.clone(),
                    ports: ports.clone(),
                    labels: Labels::new(),
                    weight: 1,
                    service_account: None,
                });
            }
        }
    }
    out
}

/// How the mesh reaches a Gateway server's port: the protocol a sidecar speaks to it and the
/// scheme it is shown with (`http`, `https`, `tls`, `tcp`, or `mesh-mtls` for an ISTIO_MUTUAL
/// server, which sidecars reach with HTTP (an HTTPS server) or TCP (a TLS server) inside mesh
/// mTLS). `None`: an unknown protocol.
pub fn gateway_server_scheme(s: &crate::model::networking::Server) -> Option<(Protocol, &'static str)> {
    let mode = s.tls_settings().and_then(|t| t.mode);
    Some(match Protocol::parse(&s.port.protocol) {
        p @ (Protocol::Http | Protocol::Http2 | Protocol::Grpc) => (p, "http"),
        Protocol::Https if mode.as_deref() == Some("ISTIO_MUTUAL") => (Protocol::Http, "mesh-mtls"),
        Protocol::Tls if mode.as_deref() == Some("ISTIO_MUTUAL") => (Protocol::Tcp, "mesh-mtls"),
        Protocol::Https if mode.as_deref() != Some("PASSTHROUGH") => (Protocol::Https, "https"),
        p @ (Protocol::Https | Protocol::Tls) => (p, "tls"),
        Protocol::Tcp => (Protocol::Tcp, "tcp"),
        Protocol::Unknown => return None,
    })
}

/// The Services a mesh install provides for its gateways, as Istio's does: a Gateway selecting
/// `istio: <x>` is reached at `istio-<x>.istio-system.svc.cluster.local` on its servers' ports,
/// served by the gateway instances in `istio-system` (a declared Service of that name wins).
fn gateway_services(resources: &[Resource], workloads: &[Workload], reg: &mut Registry) {
    let root = crate::compile::ROOT_NAMESPACE;
    let mut by_name: BTreeMap<String, (Labels, BTreeMap<u16, Protocol>, String)> = BTreeMap::new();
    for r in resources {
        let Spec::Gateway(g) = &r.spec else { continue };
        let Some(x) = g.selector.get("istio") else { continue };
        let entry =
            by_name.entry(format!("istio-{x}")).or_insert_with(|| (g.selector.clone(), BTreeMap::new(), r.id()));
        for s in &g.servers {
            if let (Some((proto, _)), Ok(port)) = (gateway_server_scheme(s), u16::try_from(s.port.number)) {
                // One listener serves one protocol; HTTP wins a port (as the compiler decides).
                let p = entry.1.entry(port).or_insert(proto);
                if proto.is_http() {
                    *p = proto;
                }
            }
        }
    }
    for (name, (selector, ports, defined_by)) in by_name {
        if ports.is_empty() {
            continue;
        }
        let ports = ports
            .into_iter()
            .map(|(number, protocol)| ServicePort {
                number,
                name: format!("{}-{number}", format!("{protocol:?}").to_ascii_lowercase()),
                protocol,
                target_port: None,
            })
            .collect();
        reg.add(Service {
            hostname: format!("{name}.{root}.{CLUSTER_DOMAIN}"),
            namespace: root.to_string(),
            aliases: vec![format!("{name}.{root}"), format!("{name}.{root}.svc")],
            short_name: Some(name),
            ports,
            endpoints: workloads
                .iter()
                .filter(|w| w.namespace == root && selects(&selector, &w.labels))
                .cloned()
                .collect(),
            resolve_dns: false,
            defined_by,
        });
    }
}

/// `true` when every label of `selector` is on `labels`.
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Service {
    /// The canonical name: the FQDN of a Kubernetes Service, or a ServiceEntry host as written.
    pub hostname: String,
    pub namespace: String,
    /// Every name that reaches this service from any namespace (short names are added per caller).
    pub aliases: Vec<String>,
    /// The short name, reachable from the service's own namespace.
    pub short_name: Option<String>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Workload>,
    /// `DNS` services with no endpoints resolve their hostname at connect time.
    pub resolve_dns: bool,
    /// `Kind namespace/name` of the resource that defined it.
    pub defined_by: String,
}

impl Service {
    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// The domains a caller in `namespace` may use for this service.
    pub fn domains(&self, namespace: &str) -> Vec<String> {
        let mut d = vec![self.hostname.clone()];
        d.extend(self.aliases.iter().cloned());
        if let Some(short) = &self.short_name {
            if self.namespace == namespace {
                d.push(short.clone());
            }
        }
        d.sort();
        d.dedup();
        d
    }
}

/// All services the config defines.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    pub services: Vec<Service>,
    by_name: HashMap<String, usize>,
    wildcards: Vec<(String, usize)>,
}

impl Registry {
    /// Builds the registry from resources, plus `extra` workloads (processes a local mesh runs).
    pub fn build(resources: &[Resource], extra: &[Workload]) -> Registry {
        let mut workloads: Vec<Workload> = extra.to_vec();
        for r in resources {
            if let Spec::WorkloadEntry(we) = &r.spec {
                if let Some(w) = Workload::from_entry(r.name(), r.namespace(), we) {
                    workloads.push(w);
                }
            }
        }
        // Local processes (the Trellis `Workload` kind) are instances too. Their addresses and
        // ports are known once `trellis up` runs them (it then declares WorkloadEntries of the
        // same name); until then they count for selection, without ports.
        for r in resources {
            if let Spec::Workload(_) = &r.spec {
                if !workloads.iter().any(|w| w.name == r.name() && w.namespace == r.namespace()) {
                    workloads.push(Workload {
                        name: r.name().to_string(),
                        namespace: r.namespace().to_string(),
                        address: "127.0.0.1".into(),
                        ports: BTreeMap::new(),
                        labels: r.meta.labels.clone(),
                        weight: 1,
                        service_account: None,
                    });
                }
            }
        }
        // Pods and the kinds that run them: their templates are workloads for selection (subsets,
        // selectors); a ready Pod from a cluster has an address and is an endpoint.
        for r in resources {
            if let Spec::PodTemplate(t) = &r.spec {
                workloads.push(Workload {
                    name: r.name().to_string(),
                    namespace: r.namespace().to_string(),
                    address: t.address.clone().unwrap_or_default(),
                    ports: t.ports.clone(),
                    labels: t.labels.clone(),
                    weight: 1,
                    service_account: t.service_account.clone(),
                });
            }
        }
        let mut reg = Registry::default();
        for r in resources {
            match &r.spec {
                Spec::ServiceEntry(se) => {
                    let ports: Vec<ServicePort> = se
                        .ports
                        .iter()
                        .filter_map(|p| {
                            let name = p.name.clone().unwrap_or_default();
                            Some(ServicePort {
                                number: u16::try_from(p.number).ok()?,
                                protocol: p
                                    .protocol
                                    .as_deref()
                                    .map(Protocol::parse)
                                    .unwrap_or_else(|| Protocol::from_port_name(&name)),
                                target_port: p.target_port.and_then(|t| u16::try_from(t).ok()).map(TargetPort::Number),
                                name,
                            })
                        })
                        .collect();
                    let mut endpoints: Vec<Workload> = se
                        .endpoints
                        .iter()
                        .enumerate()
                        .filter_map(|(i, we)| Workload::from_entry(&format!("{}-{i}", r.name()), r.namespace(), we))
                        .collect();
                    if let Some(sel) = &se.workload_selector {
                        endpoints.extend(
                            workloads
                                .iter()
                                .filter(|w| w.namespace == r.namespace() && selects(&sel.labels, &w.labels))
                                .cloned(),
                        );
                    }
                    let dns = se.resolution.as_deref() == Some("DNS") && endpoints.is_empty();
                    for host in &se.hosts {
                        reg.add(Service {
                            hostname: host.to_ascii_lowercase(),
                            namespace: r.namespace().to_string(),
                            aliases: Vec::new(),
                            short_name: None,
                            ports: ports.clone(),
                            endpoints: endpoints.clone(),
                            resolve_dns: dns && !host.starts_with('*'),
                            defined_by: r.id(),
                        });
                    }
                }
                Spec::Service(svc) => {
                    let ns = r.namespace();
                    let name = r.name().to_ascii_lowercase();
                    let ports = svc
                        .ports
                        .iter()
                        .filter_map(|p| {
                            let pname = p.name.clone().unwrap_or_default();
                            Some(ServicePort {
                                number: u16::try_from(p.port).ok()?,
                                protocol: p
                                    .app_protocol
                                    .as_deref()
                                    .map(Protocol::parse)
                                    .filter(|p| *p != Protocol::Unknown)
                                    .unwrap_or_else(|| Protocol::from_port_name(&pname)),
                                target_port: p.target_port.as_ref().map(|t| match t.parse::<u16>() {
                                    Ok(n) => TargetPort::Number(n),
                                    Err(_) => TargetPort::Name(t.clone()),
                                }),
                                name: pname,
                            })
                        })
                        .collect();
                    let endpoints = if svc.selector.is_empty() {
                        // No selector: whatever EndpointSlices name this Service.
                        slice_endpoints(resources, ns, &name)
                    } else {
                        workloads
                            .iter()
                            .filter(|w| w.namespace == ns && selects(&svc.selector, &w.labels))
                            .cloned()
                            .collect()
                    };
                    // A captured call may name the Service by its ClusterIP.
                    let mut aliases = vec![format!("{name}.{ns}"), format!("{name}.{ns}.svc")];
                    aliases.extend(
                        svc.cluster_ip
                            .iter()
                            .chain(svc.cluster_ips.iter())
                            .filter(|ip| !ip.is_empty() && ip.as_str() != "None")
                            .cloned(),
                    );
                    reg.add(Service {
                        hostname: format!("{name}.{ns}.{CLUSTER_DOMAIN}"),
                        namespace: ns.to_string(),
                        aliases,
                        short_name: Some(name),
                        ports,
                        endpoints,
                        resolve_dns: false,
                        defined_by: r.id(),
                    });
                }
                _ => {}
            }
        }
        gateway_services(resources, &workloads, &mut reg);
        reg
    }

    fn add(&mut self, svc: Service) {
        if self.by_name.contains_key(&svc.hostname) {
            return; // The first definition wins, as in Istio.
        }
        let idx = self.services.len();
        if let Some(suffix) = svc.hostname.strip_prefix('*') {
            self.wildcards.push((suffix.to_string(), idx));
            self.wildcards.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        } else {
            self.by_name.insert(svc.hostname.clone(), idx);
            for a in &svc.aliases {
                self.by_name.entry(a.clone()).or_insert(idx);
            }
        }
        self.services.push(svc);
    }

    /// Resolves a host as a resource in `namespace` names it: exact names, then the short name in
    /// that namespace, then wildcard ServiceEntry hosts.
    pub fn resolve(&self, host: &str, namespace: &str) -> Option<&Service> {
        let host = host.to_ascii_lowercase();
        if let Some(i) = self.by_name.get(&host) {
            return Some(&self.services[*i]);
        }
        if !host.contains('.') {
            if let Some(i) = self.by_name.get(&format!("{host}.{namespace}.{CLUSTER_DOMAIN}")) {
                return Some(&self.services[*i]);
            }
        }
        self.wildcards.iter().find(|(suffix, _)| host.ends_with(suffix.as_str())).map(|(_, i)| &self.services[*i])
    }

    /// The canonical form of a host named in `namespace`: the service's hostname when it resolves,
    /// else the host, expanded to an FQDN when it is a bare name.
    pub fn canonical(&self, host: &str, namespace: &str) -> String {
        match self.resolve(host, namespace) {
            Some(s) if !s.hostname.starts_with('*') => s.hostname.clone(),
            _ => host.to_ascii_lowercase(),
        }
    }
}
