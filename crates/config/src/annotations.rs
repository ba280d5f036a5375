//! Istio annotations on Kubernetes objects, checked as `istioctl analyze`'s annotation analyzer
//! does: on Namespaces, Services, Pods and Deployments (their own `metadata.annotations`), an
//! annotation in an Istio domain must be one Istio defines (IST0108), on a kind it applies to
//! (IST0107), with a valid value (IST0125); deprecated ones are noted (IST0135). The registry is
//! Istio's own ([`crate::istio_annotations`]).

use crate::cidr::Cidr;
use crate::finding::{Code, Finding};
use crate::istio_annotations::{Annotation, ANNOTATIONS};
use crate::model::{Kind, Resource};
use crate::path;

/// Annotations Istio writes itself, never checked.
const IGNORED: &[&str] = &["sidecar.istio.io/status", "gateway.istio.io/controller-version", "istio.io/rev"];

const INJECT: &str = "sidecar.istio.io/inject";

pub(crate) fn run(resources: &[Resource]) -> Vec<Finding> {
    let mut out = Vec::new();
    for r in resources {
        let kind = match r.kind {
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::Deployment => "Deployment",
            _ => continue,
        };
        for (key, value) in &r.meta.annotations {
            let at = path!["metadata", "annotations", key.as_str()];
            let Some(a) = check(kind, key, value, r.meta.labels.contains_key(INJECT)) else { continue };
            match a {
                Outcome::Unknown => {
                    out.push(Finding::at(
                        Code::UnknownAnnotation,
                        r,
                        &at,
                        format!("unknown annotation {key:?}: Istio defines no such annotation, so it has no effect"),
                    ));
                }
                Outcome::Known { deprecated, misplaced, invalid } => {
                    if deprecated {
                        let hint =
                            if key == INJECT { " in favor of the \"sidecar.istio.io/inject\" label" } else { "" };
                        out.push(Finding::at(
                            Code::DeprecatedAnnotation,
                            r,
                            &at,
                            format!("annotation {key:?} has been deprecated{hint} and may not work in future versions"),
                        ));
                    }
                    if let Some(kinds) = misplaced {
                        out.push(Finding::at(
                            Code::MisplacedAnnotation,
                            r,
                            &at,
                            format!("misplaced annotation: {key} can only be applied to {kinds}, not to a {kind}"),
                        ));
                    } else if let Some(err) = invalid {
                        out.push(Finding::at(
                            Code::InvalidAnnotation,
                            r,
                            &at,
                            format!("invalid annotation {key}: {err}"),
                        ));
                    }
                }
            }
        }
    }
    out
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Unknown,
    Known { deprecated: bool, misplaced: Option<String>, invalid: Option<String> },
}

/// What the analyzer says of one annotation on a `kind` (`None`: not an Istio annotation, or one
/// Istio writes itself). `inject_label`: the object also has the `sidecar.istio.io/inject`
/// label, which makes the deprecated annotation of the same name harmless.
fn check(kind: &str, key: &str, value: &str, inject_label: bool) -> Option<Outcome> {
    if !is_istio(key) || IGNORED.contains(&key) {
        return None;
    }
    let Some(a) = lookup(key) else { return Some(Outcome::Unknown) };
    let deprecated = a.deprecated && !(key == INJECT && inject_label);
    if a.resources.contains(&"Any") {
        return Some(Outcome::Known { deprecated, misplaced: None, invalid: None });
    }
    if !a.resources.contains(&kind) {
        return Some(Outcome::Known { deprecated, misplaced: Some(a.resources.join(", ")), invalid: None });
    }
    Some(Outcome::Known { deprecated, misplaced: None, invalid: validate(key, value).err() })
}

/// An annotation in one of Istio's domains: `kubernetes.io/ingress.class`, or a key whose
/// prefix (before `/`) ends with `istio.io`.
fn is_istio(key: &str) -> bool {
    if key == "kubernetes.io/ingress.class" {
        return true;
    }
    let prefix = key.split_once('/').map(|(p, _)| p).unwrap_or(key);
    prefix.ends_with("istio.io")
}

fn lookup(key: &str) -> Option<&'static Annotation> {
    ANNOTATIONS.binary_search_by(|a| a.name.cmp(key)).ok().map(|i| &ANNOTATIONS[i])
}

/// The value checks Istio's injector applies (and the analyzer reports).
fn validate(key: &str, value: &str) -> Result<(), String> {
    match key {
        "sidecar.istio.io/interceptionMode" => match value {
            "REDIRECT" | "TPROXY" | "NONE" => Ok(()),
            _ => Err(format!("interception mode {value:?} is not one of REDIRECT, TPROXY, NONE")),
        },
        "status.sidecar.istio.io/port" => port(value.trim()).map(|_| ()),
        "readiness.status.sidecar.istio.io/initialDelaySeconds"
        | "readiness.status.sidecar.istio.io/periodSeconds"
        | "readiness.status.sidecar.istio.io/failureThreshold" => {
            value.trim().parse::<i32>().map(|_| ()).map_err(|_| format!("{value:?} is not a 32-bit integer"))
        }
        "traffic.sidecar.istio.io/includeOutboundIPRanges" if value.trim() == "*" => Ok(()),
        "traffic.sidecar.istio.io/includeOutboundIPRanges" | "traffic.sidecar.istio.io/excludeOutboundIPRanges" => {
            list(value).try_for_each(|c| match c.contains('/').then(|| Cidr::parse(c)).flatten() {
                Some(_) => Ok(()),
                None => Err(format!("{c:?} is not a CIDR block")),
            })
        }
        "traffic.sidecar.istio.io/includeInboundPorts" if value.trim() == "*" => Ok(()),
        "traffic.sidecar.istio.io/includeInboundPorts"
        | "traffic.sidecar.istio.io/excludeInboundPorts"
        | "traffic.sidecar.istio.io/excludeOutboundPorts" => list(value).try_for_each(|p| port(p).map(|_| ())),
        "traffic.sidecar.istio.io/excludeInterfaces"
        | "traffic.sidecar.istio.io/kubevirtInterfaces"
        | "istio.io/reroute-virtual-interfaces" => list(value).try_for_each(interface),
        "prometheus.istio.io/merge-metrics" => match value {
            "1" | "t" | "T" | "TRUE" | "true" | "True" | "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(()),
            _ => Err(format!("{value:?} is not a boolean")),
        },
        "sidecar.istio.io/proxyCPU"
        | "sidecar.istio.io/proxyMemory"
        | "sidecar.istio.io/proxyCPULimit"
        | "sidecar.istio.io/proxyMemoryLimit" => quantity(value),
        "proxy.istio.io/config" => match yaml_rust2::YamlLoader::load_from_str(value) {
            Ok(docs) if docs.iter().all(|d| d.as_hash().is_some() || d.is_null()) => Ok(()),
            Ok(_) => Err("not a ProxyConfig: expected a YAML mapping".into()),
            Err(e) => Err(format!("not YAML: {e}")),
        },
        _ => Ok(()),
    }
}

/// A comma-separated list's items, trimmed; an empty value is an empty list.
fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn port(p: &str) -> Result<u16, String> {
    p.parse::<u16>().map_err(|_| format!("{p:?} is not a port (0-65535)"))
}

/// A network interface name as Linux allows it (at most 15 characters).
fn interface(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = name.len() <= 15
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not an interface name"))
    }
}

/// A Kubernetes resource quantity: `100m`, `1.5`, `128Mi`, `1e3`.
fn quantity(v: &str) -> Result<(), String> {
    let bad = || Err(format!("{v:?} is not a resource quantity (e.g. 100m, 128Mi)"));
    let s = v.strip_prefix(['+', '-']).unwrap_or(v);
    let digits = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits);
    if num.is_empty() || num == "." || num.matches('.').count() > 1 {
        return bad();
    }
    let suffix_ok = matches!(
        suffix,
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    if suffix_ok {
        Ok(())
    } else {
        bad()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(deprecated: bool, misplaced: Option<&str>, invalid: bool) -> Option<Outcome> {
        Some(Outcome::Known { deprecated, misplaced: misplaced.map(String::from), invalid: invalid.then(String::new) })
    }

    fn outcome(kind: &str, key: &str, value: &str) -> Option<Outcome> {
        check(kind, key, value, false).map(|o| match o {
            Outcome::Known { deprecated, misplaced, invalid } => {
                Outcome::Known { deprecated, misplaced, invalid: invalid.map(|_| String::new()) }
            }
            o => o,
        })
    }

    #[test]
    fn registry_is_sorted_for_lookup() {
        assert!(ANNOTATIONS.windows(2).all(|w| w[0].name < w[1].name));
        assert!(lookup("sidecar.istio.io/inject").is_some());
    }

    #[test]
    fn only_istio_domains_are_checked() {
        assert_eq!(outcome("Pod", "example.com/anything", "x"), None);
        assert_eq!(outcome("Pod", "sidecar.istio.io/status", "{}"), None);
        assert_eq!(outcome("Pod", "istio.io/rev", "canary"), None);
        assert_eq!(outcome("Pod", "sidecar.istio.io/no-such-thing", "x"), Some(Outcome::Unknown));
        assert_eq!(outcome("Pod", "fooistio.io/x", "x"), Some(Outcome::Unknown));
    }

    #[test]
    fn placement_deprecation_and_values() {
        assert_eq!(outcome("Pod", "sidecar.istio.io/proxyCPU", "100m"), known(false, None, false));
        assert_eq!(outcome("Pod", "sidecar.istio.io/proxyCPU", "lots"), known(false, None, true));
        assert!(matches!(
            outcome("Service", "sidecar.istio.io/proxyCPU", "100m"),
            Some(Outcome::Known { misplaced: Some(_), .. })
        ));
        assert!(matches!(outcome("Pod", INJECT, "true"), Some(Outcome::Known { deprecated: true, .. })));
        assert!(matches!(check("Pod", INJECT, "true", true), Some(Outcome::Known { deprecated: false, .. })));
        assert_eq!(outcome("Pod", "sidecar.istio.io/interceptionMode", "TPROXY"), known(false, None, false));
        assert_eq!(outcome("Pod", "sidecar.istio.io/interceptionMode", "tproxy"), known(false, None, true));
    }

    #[test]
    fn value_checks() {
        assert!(validate("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/8, 192.168.0.0/16").is_ok());
        assert!(validate("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0").is_err());
        assert!(validate("traffic.sidecar.istio.io/includeOutboundIPRanges", "*").is_ok());
        assert!(validate("traffic.sidecar.istio.io/excludeInboundPorts", "8080, 9090").is_ok());
        assert!(validate("traffic.sidecar.istio.io/excludeInboundPorts", "80000").is_err());
        assert!(validate("traffic.sidecar.istio.io/excludeInterfaces", "eth0,veth_1").is_ok());
        assert!(validate("traffic.sidecar.istio.io/excludeInterfaces", "0eth").is_err());
        assert!(validate("prometheus.istio.io/merge-metrics", "yes").is_err());
        assert!(validate("proxy.istio.io/config", "holdApplicationUntilProxyStarts: true").is_ok());
        assert!(validate("proxy.istio.io/config", "- a list").is_err());
        for q in ["100m", "1.5", "128Mi", "1e3", "2"] {
            assert!(quantity(q).is_ok(), "{q}");
        }
        for q in ["", "Mi", "1.2.3", "12XB", "1e"] {
            assert!(quantity(q).is_err(), "{q}");
        }
    }
}
