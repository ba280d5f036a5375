//! `trellis analyze`: every rule that checks a config, each producing positioned findings with a
//! stable code (see docs/analyze.md). The same rules gate the proxy's live reload and the
//! control plane, so what `analyze` accepts is exactly what Trellis will serve.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::finding::{Code, Finding};
use crate::model::networking::{HttpMatchRequest, HttpRoute, StringMatch, TrafficPolicy, VirtualService};
use crate::model::{Kind, Resource, Spec};
use crate::path;
use crate::registry::{selects, Protocol, Registry, Workload};
use crate::yaml::Seg;

/// The gateway name Istio reserves for sidecars.
pub const MESH_GATEWAY: &str = "mesh";

/// Runs every rule over `resources` (already loaded), with `extra` workloads known to the caller.
pub fn analyze(resources: &[Resource], extra: &[Workload]) -> Vec<Finding> {
    let registry = Registry::build(resources, extra);
    let mut cx = Cx {
        registry: &registry,
        findings: Vec::new(),
        subsets: HashMap::new(),
        gateways: HashMap::new(),
        pa_scopes: HashMap::new(),
    };
    cx.duplicates(resources);
    for r in resources {
        match &r.spec {
            Spec::Gateway(gw) => {
                cx.gateways.insert((r.namespace().to_string(), r.name().to_string()), r);
                for (i, s) in gw.servers.iter().enumerate() {
                    cx.gateway_server(r, i, s);
                }
            }
            Spec::DestinationRule(dr) => {
                let host = registry.canonical(&dr.host, r.namespace());
                let set = cx.subsets.entry(host).or_default();
                for s in &dr.subsets {
                    set.insert(s.name.clone());
                }
            }
            _ => {}
        }
    }
    let mut mesh_hosts: HashMap<String, (String, usize)> = HashMap::new();
    for r in resources {
        match &r.spec {
            Spec::VirtualService(vs) => cx.virtual_service(r, vs, &mut mesh_hosts),
            Spec::DestinationRule(dr) => {
                if dr.host.is_empty() {
                    cx.push(Code::Schema, r, path!["spec", "host"], "missing required field `host`".into());
                }
                let svc = registry.resolve(&dr.host, r.namespace());
                if let Some(tp) = &dr.traffic_policy {
                    cx.traffic_policy(r, path!["spec", "trafficPolicy"], tp);
                }
                let mut names = HashSet::new();
                for (i, s) in dr.subsets.iter().enumerate() {
                    if s.name.is_empty() {
                        cx.push(Code::Schema, r, path!["spec", "subsets", i], "subset has no `name`".into());
                    } else if !names.insert(s.name.as_str()) {
                        cx.push(
                            Code::Schema,
                            r,
                            path!["spec", "subsets", i, "name"],
                            format!("subset {:?} is defined twice", s.name),
                        );
                    }
                    if let Some(tp) = &s.traffic_policy {
                        cx.traffic_policy(r, path!["spec", "subsets", i, "trafficPolicy"], tp);
                    }
                    if let Some(svc) = svc {
                        if !svc.resolve_dns && !svc.endpoints.iter().any(|w| selects(&s.labels, &w.labels)) {
                            cx.push(
                                Code::SubsetSelectsNothing,
                                r,
                                path!["spec", "subsets", i, "labels"],
                                format!(
                                    "subset {:?} selects no endpoint of {}: its traffic will fail with 503 (UH)",
                                    s.name, svc.hostname
                                ),
                            );
                        }
                    }
                }
            }
            Spec::ServiceEntry(se) => {
                if se.hosts.is_empty() {
                    cx.push(Code::Schema, r, path!["spec", "hosts"], "a ServiceEntry needs at least one host".into());
                }
                for (i, p) in se.ports.iter().enumerate() {
                    cx.port_number(r, path!["spec", "ports", i, "number"], p.number);
                }
                if let Some(res) = &se.resolution {
                    if !["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"].contains(&res.as_str()) {
                        cx.push(
                            Code::Schema,
                            r,
                            path!["spec", "resolution"],
                            format!("unknown resolution {res:?}: use NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
                        );
                    }
                }
                for (i, e) in se.endpoints.iter().enumerate() {
                    if e.address.as_deref().unwrap_or("").is_empty() {
                        cx.push(Code::Schema, r, path!["spec", "endpoints", i], "endpoint has no `address`".into());
                    }
                }
            }
            Spec::WorkloadEntry(we) => {
                if we.address.as_deref().unwrap_or("").is_empty() {
                    cx.push(Code::Schema, r, path!["spec", "address"], "missing required field `address`".into());
                }
                for (name, port) in &we.ports {
                    cx.port_number(r, path!["spec", "ports", name.as_str()], *port);
                }
            }
            Spec::Service(svc) => {
                for (i, p) in svc.ports.iter().enumerate() {
                    cx.port_number(r, path!["spec", "ports", i, "port"], p.port);
                }
            }
            Spec::Workload(w) => {
                if w.command.is_empty() {
                    cx.push(Code::Schema, r, path!["spec", "command"], "a Workload needs a `command`".into());
                }
                if let Some(p) = w.app_port {
                    cx.port_number(r, path!["spec", "appPort"], p);
                }
                if let Some(p) = &w.protocol {
                    if !matches!(Protocol::parse(p), Protocol::Http | Protocol::Http2 | Protocol::Grpc) {
                        cx.push(
                            Code::Schema,
                            r,
                            path!["spec", "protocol"],
                            format!("unknown protocol {p:?}: use HTTP, HTTP2 or GRPC"),
                        );
                    }
                }
                for (i, u) in w.upstreams.iter().enumerate() {
                    if registry.resolve(u, r.namespace()).is_none() {
                        cx.push(
                            Code::HostNotFound,
                            r,
                            path!["spec", "upstreams", i],
                            format!("upstream {u:?} is not defined by any Service, ServiceEntry or workload"),
                        );
                    }
                }
            }
            Spec::Telemetry(t) => {
                for (i, tr) in t.tracing.iter().enumerate() {
                    if let Some(p) = tr.random_sampling_percentage {
                        if !(0.0..=100.0).contains(&p) {
                            cx.push(
                                Code::Schema,
                                r,
                                path!["spec", "tracing", i, "randomSamplingPercentage"],
                                format!("{p} is not a percentage (0-100)"),
                            );
                        }
                    }
                    for (field, present) in [("match", tr.match_.is_some()), ("customTags", tr.custom_tags.is_some())] {
                        if present {
                            cx.push(
                                Code::NotEnforced,
                                r,
                                path!["spec", "tracing", i, field],
                                format!("tracing.{field} is parsed but not enforced yet"),
                            );
                        }
                    }
                }
                for (i, al) in t.access_logging.iter().enumerate() {
                    if let Some(f) = &al.filter {
                        if let Err(e) = crate::filter::Filter::parse(&f.expression) {
                            cx.push(
                                Code::NotEnforced,
                                r,
                                path!["spec", "accessLogging", i, "filter", "expression"],
                                format!("{e}; this filter is not applied (every request is logged)"),
                            );
                        }
                    }
                    if al.match_.is_some() {
                        cx.push(
                            Code::NotEnforced,
                            r,
                            path!["spec", "accessLogging", i, "match"],
                            "accessLogging.match is parsed but not enforced yet".into(),
                        );
                    }
                }
                if t.metrics.is_some() {
                    cx.push(
                        Code::NotEnforced,
                        r,
                        path!["spec", "metrics"],
                        "metrics overrides are parsed but not enforced yet".into(),
                    );
                }
                if t.target_ref.is_some() || t.target_refs.is_some() {
                    cx.push(
                        Code::NotEnforced,
                        r,
                        path!["spec", "targetRefs"],
                        "targetRefs are not enforced yet; use selector".into(),
                    );
                }
            }
            Spec::PeerAuthentication(pa) => cx.peer_authentication(r, pa, resources),
            Spec::AuthorizationPolicy(ap) => cx.authorization_policy(r, ap, resources, extra),
            Spec::RequestAuthentication(ra) => cx.request_authentication(r, ra, resources, extra),
            Spec::EnvoyFilter(ef) => {
                use crate::envoy_filter::Patch;
                for (i, p) in crate::envoy_filter::patches(&r.id(), ef) {
                    let at = |tail: Vec<Seg>| [path!["spec", "configPatches", i], tail].concat();
                    match p {
                        Patch::RateLimit(rl) if rl.enabled_percent == 0.0 || rl.enforced_percent == 0.0 => cx.push(
                            Code::NotEnforced,
                            r,
                            at(path!["patch", "value"]),
                            "this local rate limit refuses nothing: filter_enabled or filter_enforced is absent or 0% (Envoy's default)".into(),
                        ),
                        Patch::RateLimit(_) | Patch::FilterOnly => {}
                        Patch::Unsupported(msg) => cx.push(Code::UnsupportedEnvoyFilter, r, at(Vec::new()), msg),
                        Patch::Invalid(path, msg) => cx.push(Code::Schema, r, at(path), msg),
                    }
                }
            }
            Spec::Sidecar(sc) => {
                if let Some(mode) = sc.outbound_traffic_policy.as_ref().and_then(|p| p.mode.as_deref()) {
                    if mode != "ALLOW_ANY" && mode != "REGISTRY_ONLY" {
                        cx.push(
                            Code::Schema,
                            r,
                            path!["spec", "outboundTrafficPolicy", "mode"],
                            format!("unknown mode {mode:?}: use ALLOW_ANY or REGISTRY_ONLY"),
                        );
                    }
                }
                for (field, set) in [
                    ("egress", sc.egress.is_some()),
                    ("ingress", sc.ingress.is_some()),
                    ("inboundConnectionPool", sc.inbound_connection_pool.is_some()),
                ] {
                    if set {
                        cx.push(Code::NotEnforced, r, path!["spec", field], format!("{field} is not enforced yet"));
                    }
                }
                if sc.outbound_traffic_policy.as_ref().is_some_and(|p| p.egress_proxy.is_some()) {
                    cx.push(
                        Code::NotEnforced,
                        r,
                        path!["spec", "outboundTrafficPolicy", "egressProxy"],
                        "egressProxy is not enforced yet".into(),
                    );
                }
            }
            Spec::RateLimit(rl) => {
                if rl.requests == 0 {
                    cx.push(
                        Code::Schema,
                        r,
                        path!["spec", "requests"],
                        "requests (per interval) must be at least 1".into(),
                    );
                }
                if rl.interval.is_some_and(|i| i.0 < std::time::Duration::from_millis(50)) {
                    cx.push(Code::Schema, r, path!["spec", "interval"], "interval must be at least 50ms".into());
                }
            }
            Spec::Gateway(_) | Spec::PodTemplate(_) | Spec::Metadata | Spec::EndpointSlice(_) => {}
        }
    }
    cx.findings.extend(crate::crosscheck::run(resources, &registry));
    cx.findings.extend(crate::schema_warnings::run(resources));
    cx.findings.extend(crate::annotations::run(resources));
    cx.findings.extend(crate::conditions::run(resources));
    cx.findings
}

/// The trust domain principals are checked against.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Whether a workload selector (None or empty: everything in scope) selects any workload or
/// gateway the config declares in `ns` (the root namespace's selectors apply everywhere).
fn selects_any(
    selector: Option<&crate::model::security::WorkloadSelector>,
    ns: &str,
    resources: &[Resource],
    extra: &[Workload],
) -> bool {
    let Some(labels) = selector.map(|s| &s.match_labels).filter(|l| !l.is_empty()) else { return true };
    let in_scope = |wns: &str| ns == crate::compile::ROOT_NAMESPACE || wns == ns;
    resources.iter().any(|r| match &r.spec {
        Spec::Workload(_) => in_scope(r.namespace()) && selects(labels, &r.meta.labels),
        Spec::WorkloadEntry(we) => in_scope(r.namespace()) && selects(labels, &we.labels),
        Spec::PodTemplate(t) => in_scope(r.namespace()) && selects(labels, &t.labels),
        // A gateway deployment carries its Gateways' selector labels.
        Spec::Gateway(g) => !g.selector.is_empty() && selects(labels, &g.selector),
        _ => false,
    }) || extra.iter().any(|w| in_scope(&w.namespace) && selects(labels, &w.labels))
}

struct Cx<'a> {
    registry: &'a Registry,
    findings: Vec<Finding>,
    /// Subset names by canonical host.
    subsets: HashMap<String, HashSet<String>>,
    gateways: HashMap<(String, String), &'a Resource>,
    /// PeerAuthentications by (namespace, selector), the first one seen.
    pa_scopes: HashMap<(String, String), String>,
}

impl<'a> Cx<'a> {
    fn push(&mut self, code: Code, r: &Resource, path: Vec<Seg>, message: String) {
        self.findings.push(Finding::at(code, r, &path, message));
    }

    fn peer_authentication(
        &mut self,
        r: &Resource,
        pa: &crate::model::security::PeerAuthentication,
        resources: &[Resource],
    ) {
        let modes = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];
        if let Some(m) = pa.mtls.as_ref().and_then(|m| m.mode.as_deref()) {
            if !modes.contains(&m) {
                self.push(
                    Code::Schema,
                    r,
                    path!["spec", "mtls", "mode"],
                    format!("unknown mode {m:?}: use STRICT, PERMISSIVE, DISABLE or UNSET"),
                );
            }
        }
        for (port, m) in &pa.port_level_mtls {
            if port.parse::<u16>().is_err() {
                self.push(
                    Code::Schema,
                    r,
                    path!["spec", "portLevelMtls", port.as_str()],
                    format!("{port:?} is not a port number"),
                );
            }
            if let Some(mode) = m.mode.as_deref().filter(|m| !modes.contains(m)) {
                self.push(
                    Code::Schema,
                    r,
                    path!["spec", "portLevelMtls", port.as_str(), "mode"],
                    format!("unknown mode {mode:?}"),
                );
            }
        }
        let selector = pa.selector.as_ref().map(|s| &s.match_labels).filter(|l| !l.is_empty());
        if selector.is_none() && !pa.port_level_mtls.is_empty() {
            self.push(
                Code::Schema,
                r,
                path!["spec", "portLevelMtls"],
                "portLevelMtls needs a workload selector (Istio ignores it otherwise)".into(),
            );
        }
        // Two policies at the same scope for the same workloads: which one wins is undefined.
        let key = (r.namespace().to_string(), format!("{selector:?}"));
        match self.pa_scopes.get(&key) {
            Some(first) => {
                let msg = format!("conflicts with {first}: both set the mode for the same workloads");
                self.push(Code::ConflictingPeerAuthentication, r, path!["metadata", "name"], msg);
            }
            None => {
                self.pa_scopes.insert(key, r.id());
            }
        }
        if !selects_any(pa.selector.as_ref(), r.namespace(), resources, &[]) {
            self.push(Code::SelectsNothing, r, path!["spec", "selector"], "the selector matches no workload".into());
        }
    }

    fn principal_domain(&mut self, r: &Resource, path: Vec<Seg>, principal: &str) {
        let p = principal.trim_start_matches("spiffe://");
        if p == "*" || p.starts_with('*') {
            return;
        }
        if let Some((td, rest)) = p.split_once('/') {
            if rest.starts_with("ns/") && td != TRUST_DOMAIN {
                self.push(
                    Code::ForeignTrustDomain,
                    r,
                    path,
                    format!("principal {principal:?} is in trust domain {td:?}, not {TRUST_DOMAIN:?}: no mesh workload can hold it"),
                );
            }
        }
    }

    fn authorization_policy(
        &mut self,
        r: &Resource,
        ap: &crate::model::security::AuthorizationPolicy,
        resources: &[Resource],
        extra: &[Workload],
    ) {
        match ap.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" | "DENY" | "AUDIT" => {}
            "CUSTOM" => self.push(
                Code::NotEnforced,
                r,
                path!["spec", "action"],
                "CUSTOM (external authorization) is not enforced yet; this policy is ignored".into(),
            ),
            other => self.push(
                Code::Schema,
                r,
                path!["spec", "action"],
                format!("unknown action {other:?}: use ALLOW, DENY or AUDIT"),
            ),
        }
        if ap.target_ref.is_some() || ap.target_refs.is_some() {
            self.push(
                Code::NotEnforced,
                r,
                path!["spec", "targetRefs"],
                "targetRefs are not enforced yet; use selector".into(),
            );
        }
        for (i, rule) in ap.rules.iter().flatten().enumerate() {
            for (j, f) in rule.from.iter().enumerate() {
                for (k, p) in f.source.principals.iter().chain(&f.source.not_principals).enumerate() {
                    let field = if k < f.source.principals.len() { "principals" } else { "notPrincipals" };
                    let idx = if k < f.source.principals.len() { k } else { k - f.source.principals.len() };
                    self.principal_domain(r, path!["spec", "rules", i, "from", j, "source", field, idx], p);
                }
                for (field, blocks) in [
                    ("ipBlocks", &f.source.ip_blocks),
                    ("notIpBlocks", &f.source.not_ip_blocks),
                    ("remoteIpBlocks", &f.source.remote_ip_blocks),
                    ("notRemoteIpBlocks", &f.source.not_remote_ip_blocks),
                ] {
                    for (k, b) in blocks.iter().enumerate() {
                        if crate::cidr::Cidr::parse(b).is_none() {
                            self.push(
                                Code::Schema,
                                r,
                                path!["spec", "rules", i, "from", j, "source", field, k],
                                format!("{b:?} is not an IP address or CIDR block"),
                            );
                        }
                    }
                }
            }
            for (j, t) in rule.to.iter().enumerate() {
                for (k, p) in t.operation.ports.iter().chain(&t.operation.not_ports).enumerate() {
                    if p.parse::<u16>().is_err() {
                        self.push(
                            Code::Schema,
                            r,
                            path!["spec", "rules", i, "to", j, "operation", "ports", k],
                            format!("{p:?} is not a port number"),
                        );
                    }
                }
            }
            for (j, c) in rule.when.iter().enumerate() {
                if !crate::authz_keys::is_supported(&c.key) {
                    self.push(
                        Code::Schema,
                        r,
                        path!["spec", "rules", i, "when", j, "key"],
                        format!("unknown condition key {:?}", c.key),
                    );
                }
                if c.key == "source.principal" {
                    for (k, v) in c.values.iter().enumerate() {
                        self.principal_domain(r, path!["spec", "rules", i, "when", j, "values", k], v);
                    }
                }
            }
        }
        if !selects_any(ap.selector.as_ref(), r.namespace(), resources, extra) {
            self.push(
                Code::SelectsNothing,
                r,
                path!["spec", "selector"],
                "the selector matches no workload: this policy applies to nothing".into(),
            );
        }
    }

    fn request_authentication(
        &mut self,
        r: &Resource,
        ra: &crate::model::security::RequestAuthentication,
        resources: &[Resource],
        extra: &[Workload],
    ) {
        for (i, rule) in ra.jwt_rules.iter().enumerate() {
            if rule.issuer.is_empty() {
                self.push(Code::Schema, r, path!["spec", "jwtRules", i], "a JWT rule needs an `issuer`".into());
            }
            match (&rule.jwks, &rule.jwks_uri) {
                (Some(j), _) => {
                    if let Err(e) = crate::jwks::check(j) {
                        self.push(
                            Code::InvalidJwks,
                            r,
                            path!["spec", "jwtRules", i, "jwks"],
                            format!("jwks does not parse: {e}"),
                        );
                    }
                }
                (None, Some(u)) => {
                    if !(u.starts_with("http://") || u.starts_with("https://")) {
                        self.push(
                            Code::Schema,
                            r,
                            path!["spec", "jwtRules", i, "jwksUri"],
                            format!("{u:?} is not an http(s) URL"),
                        );
                    }
                }
                (None, None) => self.push(
                    Code::Schema,
                    r,
                    path!["spec", "jwtRules", i],
                    "set `jwks` or `jwksUri` (OpenID discovery is not supported)".into(),
                ),
            }
        }
        if !selects_any(ra.selector.as_ref(), r.namespace(), resources, extra) {
            self.push(
                Code::SelectsNothing,
                r,
                path!["spec", "selector"],
                "the selector matches no workload: this policy applies to nothing".into(),
            );
        }
    }

    fn duplicates(&mut self, resources: &[Resource]) {
        let mut seen: HashMap<(Kind, &str, &str), &Resource> = HashMap::new();
        for r in resources {
            if let Some(first) = seen.get(&(r.kind, r.namespace(), r.name())) {
                let msg = format!(
                    "{} is defined twice; the first definition ({}:{}) is used",
                    r.id(),
                    first.source.file.display(),
                    first.pos(&[]).line
                );
                self.push(Code::DuplicateResource, r, path!["metadata", "name"], msg);
            } else {
                seen.insert((r.kind, r.namespace(), r.name()), r);
            }
        }
    }

    fn port_number(&mut self, r: &Resource, path: Vec<Seg>, n: u32) {
        if n == 0 || n > 65535 {
            self.push(Code::Schema, r, path, format!("port {n} is out of range 1-65535"));
        }
    }

    fn gateway_server(&mut self, r: &Resource, i: usize, s: &crate::model::networking::Server) {
        self.port_number(r, path!["spec", "servers", i, "port", "number"], s.port.number);
        if s.hosts.is_empty() {
            self.push(Code::Schema, r, path!["spec", "servers", i, "hosts"], "a server needs at least one host".into());
        }
        let tls = s.tls_settings();
        let https = Protocol::parse(&s.port.protocol) == Protocol::Https;
        let mode = tls.as_ref().and_then(|t| t.mode.clone().or_else(|| https.then(|| "SIMPLE".into())));
        let terminated = https && matches!(mode.as_deref(), Some("SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL"));
        match Protocol::parse(&s.port.protocol) {
            Protocol::Http | Protocol::Http2 | Protocol::Grpc => {}
            Protocol::Https if terminated => {}
            Protocol::Https | Protocol::Tls if matches!(mode.as_deref(), Some("PASSTHROUGH" | "ISTIO_MUTUAL")) => {}
            Protocol::Tcp => {}
            Protocol::Https | Protocol::Tls => self.push(
                Code::NotEnforced,
                r,
                path!["spec", "servers", i, "port", "protocol"],
                format!(
                    "{} servers with tls mode {} are not enforced yet: no listener is opened for port {}",
                    s.port.protocol,
                    mode.as_deref().unwrap_or("(none)"),
                    s.port.number
                ),
            ),
            Protocol::Unknown => self.push(
                Code::Schema,
                r,
                path!["spec", "servers", i, "port", "protocol"],
                format!("unknown protocol {:?}: use HTTP, HTTP2, GRPC, HTTPS, TLS or TCP", s.port.protocol),
            ),
        }
        let Some(t) = tls else { return };
        let at = |f: &str| path!["spec", "servers", i, "tls", f];
        if terminated {
            let files = t.server_certificate.is_some() && t.private_key.is_some();
            if t.credential_name.is_none() && !files {
                self.push(
                    Code::Schema,
                    r,
                    path!["spec", "servers", i, "tls"],
                    format!(
                        "{} needs credentialName, or serverCertificate and privateKey",
                        mode.as_deref().unwrap_or("")
                    ),
                );
            }
            if mode.as_deref() != Some("SIMPLE") && t.credential_name.is_none() && t.ca_certificates.is_none() {
                self.push(
                    Code::Schema,
                    r,
                    at("caCertificates"),
                    "MUTUAL needs caCertificates (or credentialName with a CA)".into(),
                );
            }
            for (f, v) in
                [("minProtocolVersion", &t.min_protocol_version), ("maxProtocolVersion", &t.max_protocol_version)]
            {
                if matches!(v.as_deref(), Some("TLSV1_0" | "TLSV1_1")) {
                    self.push(
                        Code::NotEnforced,
                        r,
                        at(f),
                        "TLS 1.0 and 1.1 are not offered: Trellis speaks TLS 1.2 and 1.3".into(),
                    );
                }
            }
        } else if mode.is_some() && !matches!(mode.as_deref(), Some("PASSTHROUGH" | "ISTIO_MUTUAL")) {
            self.push(
                Code::NotEnforced,
                r,
                at("mode"),
                format!("tls mode {} is not enforced yet", mode.as_deref().unwrap_or("")),
            );
        }
    }

    fn traffic_policy(&mut self, r: &Resource, base: Vec<Seg>, tp: &TrafficPolicy) {
        let at = |extra: &[Seg]| {
            let mut p = base.clone();
            p.extend_from_slice(extra);
            p
        };
        if let Some(lb) = &tp.load_balancer {
            self.load_balancer(r, at(&["loadBalancer".into()]), lb);
        }
        let outliers = std::iter::once((at(&["outlierDetection".into()]), tp.outlier_detection.as_ref())).chain(
            tp.port_level_settings.iter().enumerate().map(|(i, p)| {
                (at(&["portLevelSettings".into(), i.into(), "outlierDetection".into()]), p.outlier_detection.as_ref())
            }),
        );
        for (path, o) in outliers.collect::<Vec<_>>() {
            let Some(o) = o else { continue };
            let field = |f: &str| [path.clone(), vec![Seg::from(f)]].concat();
            for (name, v) in
                [("maxEjectionPercent", o.max_ejection_percent), ("minHealthPercent", o.min_health_percent)]
            {
                if v.is_some_and(|v| !(0..=100).contains(&v)) {
                    self.push(Code::Schema, r, field(name), format!("{name} is a percentage (0-100)"));
                }
            }
            for (name, v) in [
                ("consecutiveErrors", o.consecutive_errors),
                ("consecutive5xxErrors", o.consecutive_5xx_errors),
                ("consecutiveGatewayErrors", o.consecutive_gateway_errors),
                ("consecutiveLocalOriginFailures", o.consecutive_local_origin_failures),
            ] {
                if v.is_some_and(|v| v < 0) {
                    self.push(Code::Schema, r, field(name), format!("{name} must be 0 or more"));
                }
            }
            for (name, v) in [("interval", o.interval), ("baseEjectionTime", o.base_ejection_time)] {
                if v.is_some_and(|d| !d.0.is_zero() && d.0 < std::time::Duration::from_millis(1)) {
                    self.push(Code::Schema, r, field(name), format!("{name} must be at least 1ms"));
                }
            }
        }
        if let Some(cp) = &tp.connection_pool {
            let unsupported = [
                ("tcp", "maxConnectionDuration", cp.tcp.as_ref().and_then(|t| t.max_connection_duration).is_some()),
                ("http", "h2UpgradePolicy", cp.http.as_ref().and_then(|h| h.h2_upgrade_policy.as_ref()).is_some()),
                ("http", "maxConcurrentStreams", cp.http.as_ref().and_then(|h| h.max_concurrent_streams).is_some()),
                ("http", "useClientProtocol", cp.http.as_ref().and_then(|h| h.use_client_protocol).is_some()),
            ];
            for (part, field, present) in unsupported {
                if present {
                    self.push(
                        Code::NotEnforced,
                        r,
                        at(&["connectionPool".into(), part.into(), field.into()]),
                        format!("connectionPool.{part}.{field} is parsed but not enforced yet"),
                    );
                }
            }
        }
        if let Some(b) = &tp.retry_budget {
            if b.percent.as_ref().is_some_and(|p| !(0.0..=100.0).contains(&p.value)) {
                self.push(
                    Code::Schema,
                    r,
                    at(&["retryBudget".into(), "percent".into(), "value".into()]),
                    "a percentage between 0 and 100".into(),
                );
            }
        }
        for (i, pl) in tp.port_level_settings.iter().enumerate() {
            if let Some(lb) = &pl.load_balancer {
                self.load_balancer(r, at(&["portLevelSettings".into(), i.into(), "loadBalancer".into()]), lb);
            }
        }
        for (field, present) in
            [("tls", tp.tls.is_some()), ("tunnel", tp.tunnel.is_some()), ("proxyProtocol", tp.proxy_protocol.is_some())]
        {
            if present {
                self.push(
                    Code::NotEnforced,
                    r,
                    at(&[field.into()]),
                    format!("trafficPolicy.{field} is parsed but not enforced yet"),
                );
            }
        }
    }

    fn load_balancer(&mut self, r: &Resource, base: Vec<Seg>, lb: &crate::model::networking::LoadBalancerSettings) {
        let mut p = base.clone();
        if let Some(simple) = &lb.simple {
            if !["UNSPECIFIED", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "PEAK_EWMA"]
                .contains(&simple.as_str())
            {
                p.push("simple".into());
                self.push(
                    Code::Schema,
                    r,
                    p,
                    format!("unknown load balancer {simple:?}: use ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH, or Trellis's PEAK_EWMA"),
                );
                return;
            }
            if lb.consistent_hash.is_some() {
                p.push("simple".into());
                self.push(Code::Schema, r, p, "set either `simple` or `consistentHash`, not both".into());
                return;
            }
        }
        if let Some(ch) = &lb.consistent_hash {
            let keys = [
                ch.http_header_name.is_some(),
                ch.http_cookie.is_some(),
                ch.use_source_ip == Some(true),
                ch.http_query_parameter_name.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if keys != 1 {
                p.push("consistentHash".into());
                self.push(
                    Code::Schema,
                    r,
                    p,
                    "consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into(),
                );
            } else if let Some(c) = &ch.http_cookie {
                if c.name.is_empty() {
                    p.extend(["consistentHash".into(), "httpCookie".into()]);
                    self.push(Code::Schema, r, p, "httpCookie needs a `name`".into());
                }
            }
        }
        if lb.locality_lb_setting.is_some() {
            let mut p = base;
            p.push("localityLbSetting".into());
            self.push(Code::NotEnforced, r, p, "localityLbSetting is parsed but not enforced yet".into());
        }
    }

    fn gateway_ref(&self, r: &Resource, name: &str) -> Option<Option<&'a Resource>> {
        if name == MESH_GATEWAY {
            return Some(None);
        }
        self.gateways.get(&crate::model::networking::gateway_ref(name, r.namespace())).map(|g| Some(*g))
    }

    fn virtual_service(
        &mut self,
        r: &Resource,
        vs: &VirtualService,
        mesh_hosts: &mut HashMap<String, (String, usize)>,
    ) {
        if vs.hosts.is_empty() {
            self.push(Code::Schema, r, path!["spec", "hosts"], "a VirtualService needs at least one host".into());
        }
        let mut bound_gateways: Vec<&Resource> = Vec::new();
        for (i, g) in vs.gateways.iter().enumerate() {
            match self.gateway_ref(r, g) {
                None => self.push(
                    Code::GatewayNotFound,
                    r,
                    path!["spec", "gateways", i],
                    format!("referenced gateway {g:?} is not defined (no Gateway {g} in namespace {})", r.namespace()),
                ),
                Some(Some(gw)) => bound_gateways.push(gw),
                Some(None) => {}
            }
        }
        let applies_to_mesh = vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == MESH_GATEWAY);
        for (i, host) in vs.hosts.iter().enumerate() {
            if host.is_empty() {
                self.push(Code::Schema, r, path!["spec", "hosts", i], "empty host".into());
                continue;
            }
            if applies_to_mesh {
                let key = self.registry.canonical(host, r.namespace());
                match mesh_hosts.get(&key) {
                    Some((other, _)) if other != &r.id() => {
                        let msg = format!("host {host:?} is also claimed by {other}; for sidecars only the first VirtualService applies");
                        self.push(Code::DuplicateHost, r, path!["spec", "hosts", i], msg);
                    }
                    _ => {
                        mesh_hosts.insert(key, (r.id(), i));
                    }
                }
            }
            for gw in &bound_gateways {
                let Spec::Gateway(g) = &gw.spec else { continue };
                let matched =
                    g.servers.iter().flat_map(|s| s.hosts.iter()).any(|sh| hosts_intersect(strip_ns(sh), host));
                if !matched {
                    self.push(
                        Code::HostNotInGateway,
                        r,
                        path!["spec", "hosts", i],
                        format!("host {host:?} is not served by any server of {}; the gateway ignores it", gw.id()),
                    );
                }
            }
        }
        for (i, route) in vs.http.iter().enumerate() {
            self.http_route(r, i, route);
        }
        self.shadowing(r, &vs.http);
        for (i, route) in vs.tcp.iter().enumerate() {
            if route.route.is_empty() {
                self.push(
                    Code::Schema,
                    r,
                    path!["spec", "tcp", i],
                    "a tcp route needs at least one destination".into(),
                );
            }
            for (j, m) in route.matches.iter().enumerate() {
                for (k, subnet) in m.destination_subnets.iter().enumerate() {
                    if crate::cidr::Cidr::parse(subnet).is_none() {
                        self.push(
                            Code::Schema,
                            r,
                            path!["spec", "tcp", i, "match", j, "destinationSubnets", k],
                            format!("{subnet:?} is not an IP address or CIDR"),
                        );
                    }
                }
            }
        }
        for (i, route) in vs.tls.iter().enumerate() {
            if route.route.is_empty() {
                self.push(
                    Code::Schema,
                    r,
                    path!["spec", "tls", i],
                    "a tls route needs at least one destination".into(),
                );
            }
            for (j, m) in route.matches.iter().enumerate() {
                if m.sni_hosts.is_empty() {
                    self.push(
                        Code::Schema,
                        r,
                        path!["spec", "tls", i, "match", j, "sniHosts"],
                        "a tls match needs sniHosts".into(),
                    );
                }
            }
        }
    }

    fn http_route(&mut self, r: &Resource, i: usize, route: &HttpRoute) {
        let base = path!["spec", "http", i];
        let at = |extra: &[Seg]| {
            let mut p = base.clone();
            p.extend_from_slice(extra);
            p
        };
        let actions = [
            !route.route.is_empty(),
            route.redirect.is_some(),
            route.direct_response.is_some(),
            route.delegate.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if actions == 0 {
            self.push(
                Code::Schema,
                r,
                base.clone(),
                "http route needs one of route, redirect, directResponse or delegate".into(),
            );
        } else if actions > 1 {
            self.push(
                Code::Schema,
                r,
                base.clone(),
                "http route may have only one of route, redirect, directResponse or delegate".into(),
            );
        }
        for (m, mr) in route.matches.iter().enumerate() {
            let mp = |extra: &[Seg]| {
                let mut p = at(&["match".into(), m.into()]);
                p.extend_from_slice(extra);
                p
            };
            for (field, sm) in
                [("uri", &mr.uri), ("scheme", &mr.scheme), ("method", &mr.method), ("authority", &mr.authority)]
            {
                if let Some(sm) = sm {
                    self.string_match(r, mp(&[field.into()]), sm, false);
                }
            }
            for (field, map) in
                [("headers", &mr.headers), ("queryParams", &mr.query_params), ("withoutHeaders", &mr.without_headers)]
            {
                for (name, sm) in map {
                    self.string_match(r, mp(&[field.into(), name.as_str().into()]), sm, true);
                }
            }
            if let Some(port) = mr.port {
                self.port_number(r, mp(&["port".into()]), port);
            }
            for (g, name) in mr.gateways.iter().enumerate() {
                if self.gateway_ref(r, name).is_none() {
                    self.push(
                        Code::GatewayNotFound,
                        r,
                        mp(&["gateways".into(), g.into()]),
                        format!("referenced gateway {name:?} is not defined"),
                    );
                }
            }
        }
        // Destinations, weights, subsets.
        let mut total: i64 = 0;
        for (d, dest) in route.route.iter().enumerate() {
            let dp = at(&["route".into(), d.into()]);
            let host = &dest.destination.host;
            let mut p = dp.clone();
            p.extend(["destination".into(), "host".into()]);
            if host.is_empty() {
                self.push(Code::Schema, r, p, "missing required field `destination.host`".into());
                continue;
            }
            let w = dest.weight.unwrap_or(0);
            if w < 0 {
                let mut p = dp.clone();
                p.push("weight".into());
                self.push(Code::Schema, r, p, format!("weight {w} is negative"));
            }
            total += w;
            match self.registry.resolve(host, r.namespace()) {
                None => self.push(
                    Code::HostNotFound,
                    r,
                    p,
                    format!("referenced host {host:?} is not defined by any Service, ServiceEntry or workload; requests to it fail with 503 (UH)"),
                ),
                Some(svc) => {
                    if let Some(port) = &dest.destination.port {
                        if svc.port(port.number as u16).is_none() && !svc.ports.is_empty() {
                            let mut p = dp.clone();
                            p.extend(["destination".into(), "port".into(), "number".into()]);
                            let ports = svc.ports.iter().map(|p| p.number.to_string()).collect::<Vec<_>>().join(", ");
                            self.push(Code::DestinationPortNotFound, r, p, format!("{} has no port {} (ports: {ports})", svc.hostname, port.number));
                        }
                    }
                }
            }
            if let Some(subset) = &dest.destination.subset {
                let key = self.registry.canonical(host, r.namespace());
                if !self.subsets.get(&key).is_some_and(|s| s.contains(subset)) {
                    let mut p = dp.clone();
                    p.extend(["destination".into(), "subset".into()]);
                    self.push(
                        Code::SubsetNotFound,
                        r,
                        p,
                        format!("referenced subset {subset:?} of host {host:?} is not defined in any DestinationRule"),
                    );
                }
            }
        }
        if route.route.len() > 1 && total != 100 {
            let weights = route.route.iter().map(|d| d.weight.unwrap_or(0).to_string()).collect::<Vec<_>>().join(" + ");
            self.push(
                Code::WeightsNot100,
                r,
                at(&["route".into()]),
                format!("route weights sum to {total} ({weights}), not 100"),
            );
        }
        if let Some(rw) = &route.rewrite {
            if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
                self.push(
                    Code::Schema,
                    r,
                    at(&["rewrite".into()]),
                    "set either `uri` or `uriRegexRewrite`, not both".into(),
                );
            }
            if let Some(rr) = &rw.uri_regex_rewrite {
                if let Err(e) = regex::Regex::new(&rr.pattern) {
                    self.push(
                        Code::InvalidRegex,
                        r,
                        at(&["rewrite".into(), "uriRegexRewrite".into(), "match".into()]),
                        regex_message(&rr.pattern, &e),
                    );
                }
            }
        }
        if let Some(rd) = &route.redirect {
            if let Some(code) = rd.redirect_code {
                if ![301, 302, 303, 307, 308].contains(&code) {
                    self.push(
                        Code::Schema,
                        r,
                        at(&["redirect".into(), "redirectCode".into()]),
                        format!("redirect code {code} is not one of 301, 302, 303, 307, 308"),
                    );
                }
            }
            if let Some(dp) = &rd.derive_port {
                if !["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"].contains(&dp.as_str()) {
                    self.push(
                        Code::Schema,
                        r,
                        at(&["redirect".into(), "derivePort".into()]),
                        format!("unknown derivePort {dp:?}"),
                    );
                }
            }
        }
        if let Some(dr) = &route.direct_response {
            if !(200..=599).contains(&dr.status) {
                self.push(
                    Code::Schema,
                    r,
                    at(&["directResponse".into(), "status".into()]),
                    format!("status {} is not an HTTP status (200-599)", dr.status),
                );
            }
        }
        if let Some(f) = &route.fault {
            self.fault(r, &at(&["fault".into()]), f);
        }
        if let Some(c) = &route.cors_policy {
            for (i, o) in c.allow_origins.iter().enumerate() {
                self.string_match(r, at(&["corsPolicy".into(), "allowOrigins".into(), i.into()]), o, false);
            }
            if c.unmatched_preflights
                .as_deref()
                .is_some_and(|u| !u.eq_ignore_ascii_case("FORWARD") && !u.eq_ignore_ascii_case("IGNORE"))
            {
                self.push(
                    Code::Schema,
                    r,
                    at(&["corsPolicy".into(), "unmatchedPreflights".into()]),
                    "unmatchedPreflights is FORWARD or IGNORE".into(),
                );
            }
        }
        if let Some(rt) = &route.retries {
            if rt.attempts.is_some_and(|a| a < 0) {
                self.push(
                    Code::Schema,
                    r,
                    at(&["retries".into(), "attempts".into()]),
                    "attempts must be 0 or more".into(),
                );
            }
            if let Some(text) = &rt.retry_on {
                if let Err(e) = crate::snapshot::RetryOn::parse_list(text) {
                    self.push(Code::Schema, r, at(&["retries".into(), "retryOn".into()]), e);
                }
            }
            if rt.per_try_timeout.is_some_and(|t| !t.0.is_zero() && t.0 < std::time::Duration::from_millis(1)) {
                self.push(
                    Code::Schema,
                    r,
                    at(&["retries".into(), "perTryTimeout".into()]),
                    "perTryTimeout must be at least 1ms".into(),
                );
            }
            for (field, present) in [("retryRemoteLocalities", rt.retry_remote_localities.is_some())] {
                if present {
                    self.push(
                        Code::NotEnforced,
                        r,
                        at(&["retries".into(), field.into()]),
                        format!("retries.{field} is parsed but not enforced yet (no locality-aware balancing)"),
                    );
                }
            }
        }
        for (field, present) in [("delegate", route.delegate.is_some())] {
            if present {
                self.push(Code::NotEnforced, r, at(&[field.into()]), format!("{field} is parsed but not enforced yet"));
            }
        }
    }

    /// `fault`: a delay needs `fixedDelay`; an abort exactly one of `httpStatus` (200-599),
    /// `grpcStatus` (a code name or number); percentages are 0-100.
    fn fault(&mut self, r: &Resource, base: &[Seg], f: &crate::model::networking::HttpFaultInjection) {
        let at = |tail: &[&str]| [base, &tail.iter().map(|t| Seg::from(*t)).collect::<Vec<_>>()].concat();
        let percent_ok =
            |p: &Option<crate::model::networking::Percent>| p.as_ref().is_none_or(|p| (0.0..=100.0).contains(&p.value));
        if f.delay.is_none() && f.abort.is_none() {
            self.push(Code::Schema, r, base.to_vec(), "fault needs a delay or an abort".into());
        }
        if let Some(d) = &f.delay {
            if d.exponential_delay.is_some() {
                self.push(
                    Code::Schema,
                    r,
                    at(&["delay", "exponentialDelay"]),
                    "exponentialDelay is not supported (as in Istio): use fixedDelay".into(),
                );
            } else if d.fixed_delay.is_none_or(|t| t.0 < std::time::Duration::from_millis(1)) {
                self.push(Code::Schema, r, at(&["delay"]), "a delay needs fixedDelay of at least 1ms".into());
            }
            if !percent_ok(&d.percentage) || d.percent.is_some_and(|p| !(0..=100).contains(&p)) {
                self.push(Code::Schema, r, at(&["delay", "percentage"]), "a percentage between 0 and 100".into());
            }
        }
        if let Some(a) = &f.abort {
            let set = [a.http_status.is_some(), a.grpc_status.is_some(), a.http2_error.is_some()]
                .iter()
                .filter(|x| **x)
                .count();
            if set != 1 {
                self.push(
                    Code::Schema,
                    r,
                    at(&["abort"]),
                    "an abort needs exactly one of httpStatus, grpcStatus, http2Error".into(),
                );
            } else if a.http2_error.is_some() {
                self.push(
                    Code::NotEnforced,
                    r,
                    at(&["abort", "http2Error"]),
                    "abort.http2Error is parsed but not enforced yet: no request is aborted".into(),
                );
            } else if let Some(code) = a.http_status.filter(|c| !(200..=599).contains(c)) {
                self.push(
                    Code::Schema,
                    r,
                    at(&["abort", "httpStatus"]),
                    format!("httpStatus {code} is not an HTTP status (200-599)"),
                );
            } else if let Some(g) = a.grpc_status.as_deref().filter(|g| crate::snapshot::grpc_code(g).is_none()) {
                self.push(
                    Code::Schema,
                    r,
                    at(&["abort", "grpcStatus"]),
                    format!("grpcStatus {g:?} is not a gRPC status (UNAVAILABLE, 14, ...)"),
                );
            }
            if !percent_ok(&a.percentage) {
                self.push(Code::Schema, r, at(&["abort", "percentage"]), "a percentage between 0 and 100".into());
            }
        }
    }

    fn string_match(&mut self, r: &Resource, path: Vec<Seg>, sm: &StringMatch, presence_ok: bool) {
        let set = [sm.exact.is_some(), sm.prefix.is_some(), sm.regex.is_some()].iter().filter(|b| **b).count();
        if set > 1 {
            self.push(Code::Schema, r, path, "set only one of exact, prefix, regex".into());
        } else if set == 0 && !presence_ok {
            self.push(Code::Schema, r, path, "set one of exact, prefix, regex".into());
        } else if let Some(re) = &sm.regex {
            if let Err(e) = regex::Regex::new(re) {
                let mut p = path;
                p.push("regex".into());
                self.push(Code::InvalidRegex, r, p, regex_message(re, &e));
            }
        }
    }

    /// Flags routes and match blocks that can never be reached because an earlier route matches
    /// every request they would.
    fn shadowing(&mut self, r: &Resource, routes: &[HttpRoute]) {
        let all = HttpMatchRequest::default();
        for (i, route) in routes.iter().enumerate() {
            let blocks: Vec<&HttpMatchRequest> =
                if route.matches.is_empty() { vec![&all] } else { route.matches.iter().collect() };
            let mut shadowed = Vec::new();
            for (k, b) in blocks.iter().enumerate() {
                let by = routes[..i].iter().enumerate().find(|(_, earlier)| {
                    if earlier.matches.is_empty() {
                        return true;
                    }
                    earlier.matches.iter().any(|a| covers(a, b))
                });
                if let Some((j, _)) = by {
                    shadowed.push((k, j));
                }
            }
            if !shadowed.is_empty() && shadowed.len() == blocks.len() {
                let j = shadowed[0].1;
                let what = if routes[j].matches.is_empty() {
                    "has no match (a catch-all)"
                } else {
                    "matches every request it would"
                };
                self.push(
                    Code::ShadowedMatch,
                    r,
                    path!["spec", "http", i],
                    format!("this route is never used: route {j}{} {what}", route_name(&routes[j])),
                );
            } else {
                for (k, j) in shadowed {
                    self.push(
                        Code::ShadowedMatch,
                        r,
                        path!["spec", "http", i, "match", k],
                        format!(
                            "this match is never used: route {j}{} matches every request it would",
                            route_name(&routes[j])
                        ),
                    );
                }
            }
        }
    }
}

fn route_name(r: &HttpRoute) -> String {
    r.name.as_ref().map(|n| format!(" ({n:?})")).unwrap_or_default()
}

fn regex_message(re: &str, e: &regex::Error) -> String {
    let detail = e.to_string();
    let last = detail.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
    format!("invalid regex {re:?}: {last}")
}

/// `ns/host` in Gateway servers names the namespace of the VirtualServices it admits.
pub fn strip_ns(h: &str) -> &str {
    h.split_once('/').map(|(_, h)| h).unwrap_or(h)
}

/// Whether two host patterns (each possibly `*` or `*.suffix`) can match a common host.
pub fn hosts_intersect(a: &str, b: &str) -> bool {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    if a == "*" || b == "*" || a == b {
        return true;
    }
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(sa), Some(sb)) => sa.ends_with(sb) || sb.ends_with(sa),
        (Some(sa), None) => b.ends_with(sa),
        (None, Some(sb)) => a.ends_with(sb),
        (None, None) => false,
    }
}

/// `true` when every request matching `b` also matches `a` (conservative: `false` when unsure).
fn covers(a: &HttpMatchRequest, b: &HttpMatchRequest) -> bool {
    fn sm_covers(a: &Option<StringMatch>, b: &Option<StringMatch>, ci_a: bool, ci_b: bool) -> bool {
        let Some(a) = a else { return true };
        let Some(b) = b else { return false };
        if ci_b && !ci_a {
            return false;
        }
        let norm = |s: &str| {
            if ci_a {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        match (a, b) {
            (StringMatch { exact: Some(x), .. }, StringMatch { exact: Some(y), .. }) => norm(x) == norm(y),
            (StringMatch { prefix: Some(p), .. }, StringMatch { exact: Some(s), .. })
            | (StringMatch { prefix: Some(p), .. }, StringMatch { prefix: Some(s), .. }) => {
                norm(s).starts_with(&norm(p))
            }
            (StringMatch { regex: Some(x), .. }, StringMatch { regex: Some(y), .. }) => x == y,
            (StringMatch { exact: None, prefix: None, regex: None }, _) => true,
            _ => false,
        }
    }
    fn map_covers(a: &BTreeMap<String, StringMatch>, b: &BTreeMap<String, StringMatch>) -> bool {
        a.iter().all(|(k, am)| b.get(k).is_some_and(|bm| sm_covers(&Some(am.clone()), &Some(bm.clone()), false, false)))
    }
    // A matcher that is "present" with no value never covers less than itself.
    if !a.gateways.is_empty() || !b.gateways.is_empty() {
        return a.gateways == b.gateways && a.gateways.is_empty();
    }
    sm_covers(&a.uri, &b.uri, a.ignore_uri_case, b.ignore_uri_case)
        && sm_covers(&a.scheme, &b.scheme, false, false)
        && sm_covers(&a.method, &b.method, false, false)
        && sm_covers(&a.authority, &b.authority, false, false)
        && map_covers(&a.headers, &b.headers)
        && map_covers(&a.query_params, &b.query_params)
        && a.without_headers.iter().all(|(k, v)| b.without_headers.get(k) == Some(v))
        && (a.port.is_none() || a.port == b.port)
        && selects(&a.source_labels, &b.source_labels)
        && (a.source_namespace.is_none() || a.source_namespace == b.source_namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_intersection() {
        assert!(hosts_intersect("*", "foo.com"));
        assert!(hosts_intersect("*.com", "foo.com"));
        assert!(hosts_intersect("*.foo.com", "*.com"));
        assert!(!hosts_intersect("bar.com", "foo.com"));
    }

    #[test]
    fn prefix_covers_longer_prefix() {
        let a = HttpMatchRequest {
            uri: Some(StringMatch { prefix: Some("/api".into()), ..Default::default() }),
            ..Default::default()
        };
        let b = HttpMatchRequest {
            uri: Some(StringMatch { exact: Some("/api/x".into()), ..Default::default() }),
            ..Default::default()
        };
        assert!(covers(&a, &b));
        assert!(!covers(&b, &a));
    }
}
