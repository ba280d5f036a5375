//! The warnings of Istio's validation (IST0133 SchemaWarning): fields that are valid but
//! ignored, deprecated, or likely not what the author meant. They read the document as
//! written (many of these fields are not modelled beyond their shape), with Istio's conditions
//! and wording.

use std::collections::BTreeSet;

use crate::finding::{Code, Finding};
use crate::model::{Kind, Resource};
use crate::path;
use crate::yaml::{Node, Seg, Value};

/// Cipher suites Istio accepts in a Gateway's `tls.cipherSuites` (Envoy's BoringSSL names).
const CIPHER_SUITES: &[&str] = &[
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA",
    "AES256-SHA",
    "DES-CBC3-SHA",
];

const EMPTY_SELECTOR: &str = "workload selector specified without labels: it selects every workload in the namespace";

pub(crate) fn run(resources: &[Resource]) -> Vec<Finding> {
    let mut out = Vec::new();
    for r in resources {
        let Some(spec) = r.source.doc.get("spec") else { continue };
        let mut warn = |at: Vec<Seg>, msg: String| {
            out.push(Finding::at(Code::SchemaWarning, r, &[path!["spec"], at].concat(), msg));
        };
        match r.kind {
            Kind::Gateway => gateway(spec, &mut warn),
            Kind::VirtualService => virtual_service(spec, &mut warn),
            Kind::DestinationRule => destination_rule(spec, &mut warn),
            Kind::ServiceEntry => service_entry(spec, &mut warn),
            Kind::WorkloadEntry if text(spec.get("address")).is_empty() && !text(spec.get("network")).is_empty() => {
                let network = text(spec.get("network"));
                warn(path!["network"], format!("address is unset with network {network:?}"));
            }
            Kind::PeerAuthentication | Kind::RequestAuthentication | Kind::Telemetry | Kind::AuthorizationPolicy => {
                if let Some(sel) = spec.get("selector") {
                    if entries(sel.get("matchLabels")) == 0 {
                        warn(path!["selector"], EMPTY_SELECTOR.into());
                    }
                }
                match r.kind {
                    Kind::RequestAuthentication => request_authentication(spec, &mut warn),
                    Kind::Telemetry => telemetry(spec, &mut warn),
                    Kind::AuthorizationPolicy => authorization_policy(spec, &mut warn),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    out
}

type Warn<'a> = dyn FnMut(Vec<Seg>, String) + 'a;

fn gateway(spec: &Node, warn: &mut Warn<'_>) {
    for (i, server) in items(spec.get("servers")).iter().enumerate() {
        let Some(tls) = server.get("tls") else { continue };
        let at = |k: &str| path!["servers", i, "tls", k];
        let protocol = text(get(server, &["port", "protocol"]));
        if flag(tls.get("httpsRedirect")) && !protocol.eq_ignore_ascii_case("HTTP") {
            warn(at("httpsRedirect"), "tls.httpsRedirect should only be used with http servers".into());
        }
        let ciphers = items(tls.get("cipherSuites"));
        if matches!(text(tls.get("minProtocolVersion")), "TLSV1_0" | "TLSV1_1") && ciphers.is_empty() {
            warn(at("minProtocolVersion"), "TLS version below TLSV1_2 require setting compatible ciphers as by default they no longer include compatible ciphers.".into());
        }
        let (mut seen, mut invalid, mut duplicate) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for c in ciphers.iter().map(|c| text(Some(c))) {
            if !CIPHER_SUITES.contains(&c) {
                invalid.insert(c);
            } else if !seen.insert(c) {
                duplicate.insert(c);
            }
        }
        if !invalid.is_empty() {
            warn(at("cipherSuites"), format!("ignoring invalid cipher suites: {invalid:?}"));
        }
        if !duplicate.is_empty() {
            warn(at("cipherSuites"), format!("ignoring duplicate cipher suites: {duplicate:?}"));
        }
        let mode = text(tls.get("mode"));
        let cert_fields = [
            "caCrl",
            "serverCertificate",
            "privateKey",
            "caCertificates",
            "tlsCertificates",
            "credentialName",
            "credentialNames",
        ];
        if matches!(mode, "PASSTHROUGH" | "AUTO_PASSTHROUGH") && cert_fields.iter().any(|f| tls.get(f).is_some()) {
            warn(at("mode"), format!("{mode} mode does not use certificates, they will be ignored"));
        }
        let credential = tls.get("credentialName").is_some() || !items(tls.get("credentialNames")).is_empty();
        if matches!(mode, "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL")
            && !credential
            && items(tls.get("tlsCertificates")).len() > 2
        {
            let name = if mode == "SIMPLE" { "SIMPLE" } else { "MUTUAL" };
            warn(at("tlsCertificates"), format!("{name} TLS can support up to 2 server certificates"));
        }
    }
}

fn virtual_service(spec: &Node, warn: &mut Warn<'_>) {
    for (i, rule) in items(spec.get("http")).iter().enumerate() {
        if rule.get("mirrorPercent").is_some() {
            warn(
                path!["http", i, "mirrorPercent"],
                "using deprecated setting \"mirrorPercent\", use \"mirrorPercentage\" instead".into(),
            );
        }
        if let Some(body) = get(rule, &["directResponse", "body"]) {
            let size = text(body.get("string")).len().max(text(body.get("bytes")).len() * 3 / 4);
            if size > 100 * 1024 && size <= 1024 * 1024 {
                warn(
                    path!["http", i, "directResponse", "body"],
                    "large direct_responses may impact control plane performance".into(),
                );
            }
        }
    }
    // Gateways named `name.namespace` (the legacy form); Istio stops at the first name
    // without a `/`, so does this.
    let mut names: Vec<(Vec<Seg>, &str)> =
        items(spec.get("gateways")).iter().enumerate().map(|(g, n)| (path!["gateways", g], text(Some(n)))).collect();
    for (t, rule) in items(spec.get("tls")).iter().enumerate() {
        for (m, mr) in items(rule.get("match")).iter().enumerate() {
            for (s, sni) in items(mr.get("sniHosts")).iter().enumerate() {
                let host = text(Some(sni));
                if host.parse::<std::net::IpAddr>().is_ok() {
                    warn(
                        path!["tls", t, "match", m, "sniHosts", s],
                        format!(
                            "using an IP address ({host:?}) goes against SNI spec and most clients do not support this"
                        ),
                    );
                }
            }
            for (g, n) in items(mr.get("gateways")).iter().enumerate() {
                names.push((path!["tls", t, "match", m, "gateways", g], text(Some(n))));
            }
        }
    }
    if let Some((at, name)) = names.into_iter().find(|(_, n)| !n.contains('/')) {
        if let Some((gw, ns)) = name.split_once('.') {
            warn(
                at,
                format!(
                    "using legacy gatewayName format {name:?}; prefer the <namespace>/<name> format: \"{ns}/{gw}\""
                ),
            );
        }
    }
}

fn destination_rule(spec: &Node, warn: &mut Warn<'_>) {
    if let Some(ws) = spec.get("workloadSelector") {
        if entries(ws.get("matchLabels")) == 0 {
            warn(path!["workloadSelector"], EMPTY_SELECTOR.into());
        }
    }
    // Istio checks the top-level traffic policy only.
    let Some(tp) = spec.get("trafficPolicy") else { return };
    if number(get(tp, &["outlierDetection", "consecutiveErrors"])) != 0.0 {
        warn(
            path!["trafficPolicy", "outlierDetection", "consecutiveErrors"],
            "outlier detection consecutive errors is deprecated, use consecutiveGatewayErrors or consecutive5xxErrors instead".into(),
        );
    }
    if number(get(tp, &["loadBalancer", "consistentHash", "minimumRingSize"])) != 0.0 {
        warn(
            path!["trafficPolicy", "loadBalancer", "consistentHash", "minimumRingSize"],
            "consistent hash MinimumRingSize is deprecated, use ConsistentHashLB's RingHash configuration instead"
                .into(),
        );
    }
    if let Some(locality) = get(tp, &["loadBalancer", "localityLbSetting"]) {
        let failover =
            !items(locality.get("failover")).is_empty() || !items(locality.get("failoverPriority")).is_empty();
        if failover && tp.get("outlierDetection").is_none() {
            warn(
                path!["trafficPolicy", "loadBalancer", "localityLbSetting"],
                "outlier detection policy must be provided for failover".into(),
            );
        }
    }
}

fn service_entry(spec: &Node, warn: &mut Warn<'_>) {
    let resolution = text(spec.get("resolution"));
    if let Some(ws) = spec.get("workloadSelector") {
        if entries(ws.get("labels")) == 0 {
            warn(
                path!["workloadSelector"],
                "service entry: workload selector specified without labels, will be applied to all services in namespace".into(),
            );
        }
        if resolution == "NONE" {
            warn(path!["workloadSelector"], "workloadSelector should not be set when resolution mode is NONE".into());
        }
    }
    let hosts = items(spec.get("hosts"));
    for (h, host) in hosts.iter().enumerate() {
        let host = text(Some(host));
        if host.contains('*') && host != "*" && !host.starts_with("*.") && resolution != "DYNAMIC_DNS" {
            warn(path!["hosts", h], format!("partial wildcard {host:?} not allowed"));
        }
    }
    let tcp_family = |p: &Node| {
        let proto = text(p.get("protocol")).to_ascii_uppercase();
        matches!(proto.as_str(), "" | "TCP" | "TLS" | "MONGO" | "MYSQL" | "REDIS")
    };
    if matches!(resolution, "DNS" | "DNS_ROUND_ROBIN")
        && !items(spec.get("addresses")).is_empty()
        && hosts.len() > 1
        && items(spec.get("ports")).iter().any(tcp_family)
    {
        warn(
            path!["hosts"],
            "service entry can not have more than one host specified simultaneously with address and tcp port".into(),
        );
    }
}

fn request_authentication(spec: &Node, warn: &mut Warn<'_>) {
    for (i, rule) in items(spec.get("jwtRules")).iter().enumerate() {
        let Ok(jwks) = serde_json::from_str::<serde_json::Value>(text(rule.get("jwks"))) else { continue };
        let keys = jwks["keys"].as_array().cloned().unwrap_or_default();
        for (k, key) in keys.iter().enumerate() {
            // A private member (`d`, RSA's primes) or a symmetric key.
            let private = ["d", "p", "q"].iter().any(|m| key.get(m).is_some()) || key["kty"] == "oct";
            if private {
                warn(
                    path!["jwtRules", i, "jwks"],
                    format!("jwks key at index {k} contains private key material; only public keys are used for verification"),
                );
            }
        }
    }
}

fn telemetry(spec: &Node, warn: &mut Warn<'_>) {
    let tracing = items(spec.get("tracing"));
    if tracing.len() > 1 {
        warn(path!["tracing"], "multiple tracing is not currently supported".into());
    }
    for (i, t) in tracing.iter().enumerate() {
        if items(t.get("providers")).len() > 1 {
            warn(path!["tracing", i, "providers"], "multiple providers is not currently supported".into());
        }
    }
    for (m, metrics) in items(spec.get("metrics")).iter().enumerate() {
        for (o, ov) in items(metrics.get("overrides")).iter().enumerate() {
            if let Some(Value::Map(tags)) = ov.get("tagOverrides").map(|t| &t.value) {
                if tags.iter().any(|(k, _)| text(Some(k)).is_empty()) {
                    warn(
                        path!["metrics", m, "overrides", o, "tagOverrides"],
                        "tagOverrides.name may not be empty".into(),
                    );
                }
            }
        }
    }
}

/// A DENY rule that uses only HTTP attributes denies every TCP connection in its scope (TCP
/// has no paths or methods to fail the match on), which is rarely what its author meant.
fn authorization_policy(spec: &Node, warn: &mut Warn<'_>) {
    if text(spec.get("action")) != "DENY" {
        return;
    }
    const TCP_SOURCE: &[&str] = &[
        "principals",
        "notPrincipals",
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
        "namespaces",
        "notNamespaces",
        "serviceAccounts",
        "notServiceAccounts",
    ];
    for (i, rule) in items(spec.get("rules")).iter().enumerate() {
        let sources: Vec<&Node> = items(rule.get("from")).iter().filter_map(|f| f.get("source")).collect();
        let operations: Vec<&Node> = items(rule.get("to")).iter().filter_map(|t| t.get("operation")).collect();
        let tcp_in_from = sources.iter().any(|s| TCP_SOURCE.iter().any(|k| s.get(k).is_some()));
        let tcp_in_to = operations.iter().any(|o| o.get("ports").is_some() || o.get("notPorts").is_some());
        let (from, to) = (!sources.is_empty(), !operations.is_empty());
        if (from && !to && !tcp_in_from) || (to && !tcp_in_to) {
            warn(
                path!["rules", i],
                "configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to the use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify the port".into(),
            );
        }
    }
}

fn get<'a>(node: &'a Node, keys: &[&str]) -> Option<&'a Node> {
    keys.iter().try_fold(node, |n, k| n.get(k))
}

fn text(node: Option<&Node>) -> &str {
    node.and_then(Node::as_str).unwrap_or("")
}

fn flag(node: Option<&Node>) -> bool {
    text(node) == "true"
}

fn number(node: Option<&Node>) -> f64 {
    text(node).parse().unwrap_or(0.0)
}

fn items(node: Option<&Node>) -> &[Node] {
    node.map_or(&[], Node::items)
}

fn entries(node: Option<&Node>) -> usize {
    match node.map(|n| &n.value) {
        Some(Value::Map(entries)) => entries.len(),
        _ => 0,
    }
}
