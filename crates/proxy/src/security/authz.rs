//! AuthorizationPolicy with Istio's semantics, compiled once per snapshot:
//!
//! - AUDIT policies never block; the first that matches is reported;
//! - a request matching any DENY policy is denied;
//! - if any ALLOW policy applies to the workload, a request must match one of them;
//! - a policy matches when any of its rules does; a rule when its `from` (any), `to` (any) and
//!   every `when` match; inside a source or operation every field set must match (values
//!   OR-ed), and `not*` fields must not.
//!
//! Patterns (principals, namespaces, hosts, paths, condition values) are exact, `prefix*`,
//! `*suffix` or `*`. Principals are written without `spiffe://`.
//!
//! TCP connections ([`Authorizer::evaluate_tcp`]) have no HTTP attributes; as in Istio, an
//! ALLOW (or AUDIT) rule that uses an HTTP-only field never matches them, and a DENY rule is
//! applied without its HTTP-only fields — stricter, never looser.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use trellis_config::authz_keys::indexed;
use trellis_config::cidr::Cidr;
use trellis_config::model::security::{Condition, Operation, Rule, Source};
use trellis_config::snapshot::{AuthzAction, AuthzPolicy};

/// What a request brings to authorization.
pub struct Attrs<'a> {
    /// `td/ns/NS/sa/SA` of the mTLS peer.
    pub principal: Option<&'a str>,
    pub source_ip: IpAddr,
    pub remote_ip: IpAddr,
    pub request_principal: Option<&'a str>,
    pub claims: Option<&'a serde_json::Value>,
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub port: u16,
    pub dest_ip: IpAddr,
    pub headers: &'a HeaderMap,
}

impl Attrs<'_> {
    fn namespace(&self) -> Option<&str> {
        let p = self.principal?;
        let rest = &p[p.find("/ns/")? + 4..];
        Some(rest.split('/').next().unwrap_or(rest))
    }
}

#[derive(Clone, Debug)]
enum Pat {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pat {
    fn new(s: &str) -> Pat {
        let s = s.strip_prefix("spiffe://").unwrap_or(s);
        if s == "*" {
            Pat::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Pat::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            Pat::Suffix(p.to_string())
        } else {
            Pat::Exact(s.to_string())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pat::Any => true,
            Pat::Exact(e) => v == e,
            Pat::Prefix(p) => v.starts_with(p.as_str()),
            Pat::Suffix(s) => v.ends_with(s.as_str()),
        }
    }

    /// Ignoring ASCII case (hosts); the pattern is lower case.
    fn matches_ignore_case(&self, v: &str) -> bool {
        let v = v.as_bytes();
        match self {
            Pat::Any => true,
            Pat::Exact(e) => v.eq_ignore_ascii_case(e.as_bytes()),
            Pat::Prefix(p) => v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p.as_bytes()),
            Pat::Suffix(s) => v.len() >= s.len() && v[v.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes()),
        }
    }
}

/// A list of patterns: `pos` must match (if set), `neg` must not.
#[derive(Clone, Debug, Default)]
struct Field {
    pos: Vec<Pat>,
    neg: Vec<Pat>,
}

impl Field {
    fn new(pos: &[String], neg: &[String]) -> Field {
        Field { pos: pos.iter().map(|s| Pat::new(s)).collect(), neg: neg.iter().map(|s| Pat::new(s)).collect() }
    }

    fn is_empty(&self) -> bool {
        self.pos.is_empty() && self.neg.is_empty()
    }

    /// A missing value fails a positive field and passes a negative one.
    fn check(&self, value: Option<&str>) -> bool {
        let pos = self.pos.is_empty() || value.is_some_and(|v| self.pos.iter().any(|p| p.matches(v)));
        let neg = self.neg.is_empty() || !value.is_some_and(|v| self.neg.iter().any(|p| p.matches(v)));
        pos && neg
    }

    /// Several values (e.g. a list claim): positive if any matches, negative if none does.
    fn check_any<'v, I: Iterator<Item = &'v str>>(&self, values: impl Fn() -> I) -> bool {
        let pos = self.pos.is_empty() || values().any(|v| self.pos.iter().any(|p| p.matches(v)));
        let neg = self.neg.is_empty() || !values().any(|v| self.neg.iter().any(|p| p.matches(v)));
        pos && neg
    }

    /// A host, with or without its port, ignoring case (Istio's `hosts` match).
    fn check_host(&self, host: &str) -> bool {
        let bare = host.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map(|(h, _)| h);
        let any = |pats: &[Pat]| {
            pats.iter().any(|p| p.matches_ignore_case(host) || bare.is_some_and(|b| p.matches_ignore_case(b)))
        };
        (self.pos.is_empty() || any(&self.pos)) && !any(&self.neg)
    }
}

#[derive(Clone, Debug, Default)]
struct Ips {
    pos: Vec<Cidr>,
    neg: Vec<Cidr>,
}

impl Ips {
    fn new(pos: &[String], neg: &[String]) -> Ips {
        Ips {
            pos: pos.iter().filter_map(|s| Cidr::parse(s)).collect(),
            neg: neg.iter().filter_map(|s| Cidr::parse(s)).collect(),
        }
    }

    fn check(&self, ip: IpAddr) -> bool {
        (self.pos.is_empty() || self.pos.iter().any(|c| c.contains(ip))) && !self.neg.iter().any(|c| c.contains(ip))
    }
}

struct SourceM {
    principals: Field,
    request_principals: Field,
    namespaces: Field,
    ip_blocks: Ips,
    remote_ip_blocks: Ips,
}

struct OperationM {
    /// Lower case; matched ignoring case.
    hosts: Field,
    ports: (Vec<u16>, Vec<u16>),
    methods: Field,
    paths: Field,
}

enum Key {
    Header(http::HeaderName),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    RequestPrincipal,
    Audiences,
    Presenter,
    Claim(Vec<String>),
    DestIp,
    DestPort,
    Sni,
}

struct ConditionM {
    key: Key,
    values: Field,
    /// The values as CIDRs, for the address keys.
    ips: Ips,
    /// The values as ports, for `destination.port`.
    ports: (Vec<u16>, Vec<u16>),
}

struct RuleM {
    from: Vec<SourceM>,
    to: Vec<OperationM>,
    when: Vec<ConditionM>,
    /// Uses a field only HTTP requests have (request principals, hosts, methods, paths,
    /// request headers or claims).
    http_only: bool,
}

struct PolicyM {
    name: Arc<str>,
    rules: Vec<RuleM>,
}

/// The decision for one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Allowed; names the ALLOW policy that matched, if one had to.
    Allow { policy: Option<Arc<str>> },
    /// Denied by a DENY policy, or because no ALLOW policy matched (`policy` is then `None`).
    Deny { policy: Option<Arc<str>> },
}

/// The authorization policies of one snapshot.
#[derive(Default)]
pub struct Authorizer {
    allow: Vec<PolicyM>,
    deny: Vec<PolicyM>,
    audit: Vec<PolicyM>,
}

impl Authorizer {
    pub fn new(policies: &[AuthzPolicy]) -> Authorizer {
        let mut a = Authorizer::default();
        for p in policies {
            let m = PolicyM { name: Arc::from(p.name.as_str()), rules: p.rules.iter().map(rule).collect() };
            match p.action {
                AuthzAction::Allow => a.allow.push(m),
                AuthzAction::Deny => a.deny.push(m),
                AuthzAction::Audit => a.audit.push(m),
            }
        }
        a
    }

    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty() && self.audit.is_empty()
    }

    /// The decision, and the AUDIT policy that matched, if any.
    pub fn evaluate(&self, a: &Attrs<'_>) -> (Decision, Option<Arc<str>>) {
        self.decide(a, false)
    }

    /// The decision for a TCP connection (no HTTP attributes in `a`).
    pub fn evaluate_tcp(&self, a: &Attrs<'_>) -> (Decision, Option<Arc<str>>) {
        self.decide(a, true)
    }

    fn decide(&self, a: &Attrs<'_>, tcp: bool) -> (Decision, Option<Arc<str>>) {
        let audit = self.audit.iter().find(|p| p.matches(a, tcp)).map(|p| p.name.clone());
        if let Some(p) = self.deny.iter().find(|p| p.matches_deny(a, tcp)) {
            return (Decision::Deny { policy: Some(p.name.clone()) }, audit);
        }
        if self.allow.is_empty() {
            return (Decision::Allow { policy: None }, audit);
        }
        match self.allow.iter().find(|p| p.matches(a, tcp)) {
            Some(p) => (Decision::Allow { policy: Some(p.name.clone()) }, audit),
            None => (Decision::Deny { policy: None }, audit),
        }
    }
}

fn source(s: &Source) -> SourceM {
    SourceM {
        principals: Field::new(&s.principals, &s.not_principals),
        request_principals: Field::new(&s.request_principals, &s.not_request_principals),
        namespaces: Field::new(&s.namespaces, &s.not_namespaces),
        ip_blocks: Ips::new(&s.ip_blocks, &s.not_ip_blocks),
        remote_ip_blocks: Ips::new(&s.remote_ip_blocks, &s.not_remote_ip_blocks),
    }
}

fn ports(v: &[String]) -> Vec<u16> {
    v.iter().filter_map(|p| p.parse().ok()).collect()
}

fn operation(o: &Operation) -> OperationM {
    let lower = |v: &[String]| v.iter().map(|h| h.to_ascii_lowercase()).collect::<Vec<_>>();
    OperationM {
        hosts: Field::new(&lower(&o.hosts), &lower(&o.not_hosts)),
        ports: (ports(&o.ports), ports(&o.not_ports)),
        methods: Field::new(&o.methods, &o.not_methods),
        paths: Field::new(&o.paths, &o.not_paths),
    }
}

fn condition(c: &Condition) -> ConditionM {
    let key = match c.key.as_str() {
        "source.ip" => Key::SourceIp,
        "remote.ip" => Key::RemoteIp,
        "source.namespace" => Key::SourceNamespace,
        "source.principal" => Key::SourcePrincipal,
        "request.auth.principal" => Key::RequestPrincipal,
        "request.auth.audiences" => Key::Audiences,
        "request.auth.presenter" => Key::Presenter,
        "destination.ip" => Key::DestIp,
        "destination.port" => Key::DestPort,
        "connection.sni" => Key::Sni,
        k => match (indexed(k, "request.headers"), indexed(k, "request.auth.claims")) {
            (Some(h), _) => match h.first().and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()) {
                Some(name) => Key::Header(name),
                // Not a valid header name: no request has it (analyze reports the key).
                None => Key::Claim(vec!["\u{0}unknown".into()]),
            },
            (_, Some(path)) => Key::Claim(path.iter().map(|s| s.to_string()).collect()),
            // Unknown keys are reported by analyze; they never match.
            _ => Key::Claim(vec!["\u{0}unknown".into()]),
        },
    };
    ConditionM {
        key,
        values: Field::new(&c.values, &c.not_values),
        ips: Ips::new(&c.values, &c.not_values),
        ports: (ports(&c.values), ports(&c.not_values)),
    }
}

fn rule(r: &Rule) -> RuleM {
    let from: Vec<SourceM> = r.from.iter().map(|f| source(&f.source)).collect();
    let to: Vec<OperationM> = r.to.iter().map(|t| operation(&t.operation)).collect();
    let when: Vec<ConditionM> = r.when.iter().map(condition).collect();
    let http_only = from.iter().any(|s| !s.request_principals.is_empty())
        || to.iter().any(|o| !o.hosts.is_empty() || !o.methods.is_empty() || !o.paths.is_empty())
        || when.iter().any(|c| c.key.http_only());
    RuleM { from, to, when, http_only }
}

impl Key {
    fn http_only(&self) -> bool {
        matches!(self, Key::Header(_) | Key::RequestPrincipal | Key::Audiences | Key::Presenter | Key::Claim(_))
    }
}

/// The values of a claim as strings: a string, or each of a list's (as Istio compares them).
fn claim_strings(v: &serde_json::Value) -> Vec<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    match v {
        serde_json::Value::String(s) => vec![Cow::Borrowed(s.as_str())],
        serde_json::Value::Array(a) => a.iter().flat_map(claim_strings).collect(),
        serde_json::Value::Bool(b) => vec![Cow::Owned(b.to_string())],
        serde_json::Value::Number(n) => vec![Cow::Owned(n.to_string())],
        _ => Vec::new(),
    }
}

impl PolicyM {
    /// ALLOW and AUDIT: on TCP, a rule with an HTTP-only field never matches.
    fn matches(&self, a: &Attrs<'_>, tcp: bool) -> bool {
        self.rules.iter().any(|r| !(tcp && r.http_only) && r.matches(a, tcp))
    }

    /// DENY: on TCP, a rule applies without its HTTP-only fields.
    fn matches_deny(&self, a: &Attrs<'_>, tcp: bool) -> bool {
        self.rules.iter().any(|r| r.matches(a, tcp))
    }
}

impl RuleM {
    fn matches(&self, a: &Attrs<'_>, tcp: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a, tcp)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a, tcp)))
            && self.when.iter().all(|c| (tcp && c.key.http_only()) || c.matches(a))
    }
}

impl SourceM {
    fn matches(&self, a: &Attrs<'_>, tcp: bool) -> bool {
        self.principals.check(a.principal)
            && (tcp || self.request_principals.check(a.request_principal))
            && self.namespaces.check(a.namespace())
            && self.ip_blocks.check(a.source_ip)
            && self.remote_ip_blocks.check(a.remote_ip)
    }
}

impl OperationM {
    fn matches(&self, a: &Attrs<'_>, tcp: bool) -> bool {
        (self.ports.0.is_empty() || self.ports.0.contains(&a.port))
            && !self.ports.1.contains(&a.port)
            && (tcp
                || (self.hosts.check_host(a.host)
                    && self.methods.check(Some(a.method))
                    && self.paths.check(Some(a.path))))
    }
}

impl ConditionM {
    fn matches(&self, a: &Attrs<'_>) -> bool {
        // A condition on an address with no valid CIDR never matches.
        let ip_check = |ip: IpAddr| self.ips.check(ip) && (!self.ips.pos.is_empty() || !self.ips.neg.is_empty());
        match &self.key {
            Key::SourceIp => ip_check(a.source_ip),
            Key::RemoteIp => ip_check(a.remote_ip),
            Key::DestIp => ip_check(a.dest_ip),
            Key::DestPort => {
                (self.ports.0.is_empty() || self.ports.0.contains(&a.port)) && !self.ports.1.contains(&a.port)
            }
            Key::Header(h) => {
                let values = || a.headers.get_all(h).iter().filter_map(|v| v.to_str().ok());
                if values().next().is_none() {
                    self.values.check(None)
                } else {
                    self.values.check_any(values)
                }
            }
            Key::SourceNamespace => self.values.check(a.namespace()),
            Key::SourcePrincipal => self.values.check(a.principal),
            Key::RequestPrincipal => self.values.check(a.request_principal),
            Key::Audiences => {
                let aud = a.claims.and_then(|c| c.get("aud")).map(claim_strings).unwrap_or_default();
                self.values.check_any(|| aud.iter().map(|s| s.as_ref()))
            }
            Key::Presenter => self.values.check(a.claims.and_then(|c| c.get("azp")).and_then(|v| v.as_str())),
            Key::Claim(path) => {
                let mut v = a.claims;
                for p in path {
                    v = v.and_then(|x| x.get(p));
                }
                match v {
                    Some(v) => {
                        let values = claim_strings(v);
                        self.values.check_any(|| values.iter().map(|s| s.as_ref()))
                    }
                    None => self.values.check(None),
                }
            }
            Key::Sni => self.values.check(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_config::model::security::{From, To};

    fn attrs<'a>(headers: &'a HeaderMap, principal: Option<&'a str>, method: &'a str, path: &'a str) -> Attrs<'a> {
        Attrs {
            principal,
            source_ip: "10.0.0.5".parse().expect("ip"),
            remote_ip: "10.0.0.5".parse().expect("ip"),
            request_principal: None,
            claims: None,
            host: "reviews",
            method,
            path,
            port: 9080,
            dest_ip: "127.0.0.1".parse().expect("ip"),
            headers,
        }
    }

    fn policy(name: &str, action: AuthzAction, rules: Vec<Rule>) -> AuthzPolicy {
        AuthzPolicy { name: name.into(), action, rules }
    }

    #[test]
    fn deny_beats_allow_and_allow_requires_a_match() {
        let allow_get = Rule {
            from: vec![From {
                source: Source {
                    principals: vec!["cluster.local/ns/default/sa/productpage".into()],
                    ..Default::default()
                },
            }],
            to: vec![To {
                operation: Operation {
                    methods: vec!["GET".into()],
                    paths: vec!["/api/*".into()],
                    ..Default::default()
                },
            }],
            when: vec![],
        };
        let deny_admin = Rule {
            to: vec![To { operation: Operation { paths: vec!["*/admin".into()], ..Default::default() } }],
            ..Default::default()
        };
        let a = Authorizer::new(&[
            policy("ns/allow", AuthzAction::Allow, vec![allow_get]),
            policy("ns/deny", AuthzAction::Deny, vec![deny_admin]),
        ]);
        let h = HeaderMap::new();
        let pp = Some("cluster.local/ns/default/sa/productpage");
        assert_eq!(a.evaluate(&attrs(&h, pp, "GET", "/api/x")).0, Decision::Allow { policy: Some("ns/allow".into()) });
        assert_eq!(a.evaluate(&attrs(&h, pp, "POST", "/api/x")).0, Decision::Deny { policy: None });
        assert_eq!(
            a.evaluate(&attrs(&h, pp, "GET", "/api/admin")).0,
            Decision::Deny { policy: Some("ns/deny".into()) }
        );
        assert_eq!(
            a.evaluate(&attrs(&h, None, "GET", "/api/x")).0,
            Decision::Deny { policy: None },
            "no identity, no match"
        );
    }

    #[test]
    fn hosts_ignore_case_and_port_and_conditions_use_prepared_ports_and_cidrs() {
        let rule = Rule {
            to: vec![To {
                operation: Operation {
                    hosts: vec!["Reviews.Default".into(), "*.Example.COM".into()],
                    not_hosts: vec!["admin.example.com".into()],
                    ..Default::default()
                },
            }],
            when: vec![
                Condition { key: "destination.port".into(), values: vec!["9080".into()], ..Default::default() },
                Condition { key: "source.ip".into(), values: vec!["10.0.0.0/24".into()], ..Default::default() },
            ],
            ..Default::default()
        };
        let a = Authorizer::new(&[policy("ns/allow", AuthzAction::Allow, vec![rule])]);
        let h = HeaderMap::new();
        let with = |host: &'static str, port: u16, ip: &str| {
            let mut at = attrs(&h, None, "GET", "/");
            at.host = host;
            at.port = port;
            at.source_ip = ip.parse().expect("ip");
            matches!(a.evaluate(&at).0, Decision::Allow { .. })
        };
        assert!(with("reviews.default", 9080, "10.0.0.5"));
        assert!(with("REVIEWS.default:9080", 9080, "10.0.0.5"), "case and port are ignored");
        assert!(with("shop.example.com", 9080, "10.0.0.5"));
        assert!(!with("Admin.Example.com:443", 9080, "10.0.0.5"), "notHosts ignore case too");
        assert!(!with("reviews.default", 9081, "10.0.0.5"), "destination.port");
        assert!(!with("reviews.default", 9080, "10.0.1.5"), "source.ip");
    }

    #[test]
    fn not_principals_star_matches_requests_without_identity() {
        let rule = Rule {
            from: vec![From { source: Source { not_principals: vec!["*".into()], ..Default::default() } }],
            ..Default::default()
        };
        let a = Authorizer::new(&[policy("ns/deny-anon", AuthzAction::Deny, vec![rule])]);
        let h = HeaderMap::new();
        assert!(matches!(a.evaluate(&attrs(&h, None, "GET", "/")).0, Decision::Deny { .. }));
        assert!(matches!(
            a.evaluate(&attrs(&h, Some("cluster.local/ns/a/sa/b"), "GET", "/")).0,
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn header_and_claim_conditions() {
        let rule = Rule {
            when: vec![
                Condition { key: "request.headers[x-env]".into(), values: vec!["prod".into()], not_values: vec![] },
                Condition {
                    key: "request.auth.claims[groups]".into(),
                    values: vec!["admins".into()],
                    not_values: vec![],
                },
            ],
            ..Default::default()
        };
        let a = Authorizer::new(&[policy("ns/p", AuthzAction::Allow, vec![rule])]);
        let mut h = HeaderMap::new();
        h.insert("x-env", "prod".parse().expect("v"));
        let claims = serde_json::json!({"groups": ["dev", "admins"]});
        let mut at = attrs(&h, None, "GET", "/");
        at.claims = Some(&claims);
        assert!(matches!(a.evaluate(&at).0, Decision::Allow { .. }));
        let claims = serde_json::json!({"groups": ["dev"]});
        at.claims = Some(&claims);
        assert!(matches!(a.evaluate(&at).0, Decision::Deny { .. }));
    }
}
