//! Route tables as the hot path reads them: virtual host lookup by host (exact, then longest
//! wildcard suffix, then `*`), then the first route whose match applies. Regexes are compiled
//! here, once per snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use regex::Regex;

use trellis_config::snapshot as spec;

use super::error::{BuildError, Problem, Resource};
use super::Cluster;
use crate::http::headers::HeaderRewrite;

/// What a route may look at in a request.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
}

pub struct RouteTable {
    vhosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    /// `(suffix, index)` for `*.suffix` domains, longest first.
    suffixes: Vec<(String, usize)>,
    any: Option<usize>,
}

pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Route>,
}

pub struct Route {
    pub name: Arc<str>,
    pub source: Option<String>,
    matches: Vec<Match>,
    pub action: Action,
    pub request_headers: HeaderRewrite,
    pub response_headers: HeaderRewrite,
    pub timeout: Option<std::time::Duration>,
    pub retry: Option<spec::RetryPolicy>,
    pub fault: Option<spec::Fault>,
    pub cors: Option<Cors>,
    pub mirrors: Vec<Mirror>,
    /// A per-route local rate limit, with this route's own bucket.
    pub rate_limit: Option<crate::pipeline::ratelimit::Limiter>,
}

/// A cluster a share of the route's requests is copied to.
pub struct Mirror {
    pub cluster: Arc<Cluster>,
    pub percent: f64,
}

/// A route's CORS policy with its origin matchers compiled and its header values made.
pub struct Cors {
    origins: Vec<Str>,
    pub methods: Option<HeaderValue>,
    pub headers: Option<HeaderValue>,
    pub expose: Option<HeaderValue>,
    pub max_age: Option<HeaderValue>,
    pub credentials: bool,
    pub forward_unmatched_preflights: bool,
    pub private_network: bool,
}

impl Cors {
    fn build(c: &spec::Cors) -> Result<Cors, Problem> {
        let list = |v: &[String]| {
            let joined = v.join(",");
            (!v.is_empty())
                .then(|| HeaderValue::from_str(&joined).map_err(|_| Problem::CorsValue(joined.clone())))
                .transpose()
        };
        Ok(Cors {
            origins: c.allow_origins.iter().map(Str::build).collect::<Result<_, _>>()?,
            methods: list(&c.allow_methods)?,
            headers: list(&c.allow_headers)?,
            expose: list(&c.expose_headers)?,
            max_age: c.max_age.map(|d| HeaderValue::from(d.0.as_secs())),
            credentials: c.allow_credentials,
            forward_unmatched_preflights: c.forward_unmatched_preflights,
            private_network: c.allow_private_network,
        })
    }

    /// Whether `origin` is one the policy allows.
    pub fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|o| match o {
            // `*` allows every origin (Envoy's exact "*").
            Str::Exact(e) if e == "*" => true,
            o => o.matches(origin),
        })
    }
}

pub enum Action {
    Forward(Forward),
    Redirect(spec::Redirect),
    Direct { status: StatusCode, body: Bytes },
}

pub struct Forward {
    pub destinations: Vec<Destination>,
    total_weight: u32,
    pub rewrite: Option<Rewrite>,
}

pub struct Destination {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
    pub request_headers: HeaderRewrite,
    pub response_headers: HeaderRewrite,
}

pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<HeaderValue>,
    pub uri_regex: Option<(Regex, String)>,
}

struct Match {
    uri: Option<Str>,
    ignore_uri_case: bool,
    scheme: Option<Str>,
    method: Option<Str>,
    authority: Option<Str>,
    headers: Vec<KeyMatch>,
    query: Vec<KeyMatch>,
}

enum Str {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

struct KeyMatch {
    name: String,
    value: Option<Str>,
    invert: bool,
}

/// The match block that selected a route, for rewrites that replace "the matched prefix".
pub struct Matched<'a> {
    pub route: &'a Route,
    pub prefix: Option<&'a str>,
}

// === impl RouteTable ===

impl RouteTable {
    /// Builds table `name`; `per_route` are the per-route rate limits that may select its routes.
    pub fn build(
        name: &str,
        t: &spec::RouteTable,
        clusters: &HashMap<String, Arc<Cluster>>,
        per_route: &[&spec::RateLimitPolicy],
    ) -> Result<RouteTable, BuildError> {
        let mut table = RouteTable { vhosts: Vec::new(), exact: HashMap::new(), suffixes: Vec::new(), any: None };
        for (i, vh) in t.virtual_hosts.iter().enumerate() {
            let routes = vh
                .routes
                .iter()
                .map(|r| {
                    let at = |p: Problem| {
                        p.at(Resource::Route {
                            table: name.to_string(),
                            route: r.name.clone(),
                            source: r.source.clone(),
                        })
                    };
                    let mut route = Route::build(r, clusters).map_err(at)?;
                    // As EnvoyFilter MERGE patches: the last that selects the route wins.
                    if let Some(p) = per_route.iter().rev().find(|p| p.selects_route(name, &vh.name, r)) {
                        route.rate_limit = Some(crate::pipeline::ratelimit::Limiter::new((*p).clone()).map_err(at)?);
                    }
                    Ok(route)
                })
                .collect::<Result<Vec<_>, _>>()?;
            table.vhosts.push(VirtualHost { name: vh.name.clone(), routes });
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                if d == "*" {
                    table.any.get_or_insert(i);
                } else if let Some(suffix) = d.strip_prefix('*') {
                    if !table.suffixes.iter().any(|(s, _)| s == suffix) {
                        table.suffixes.push((suffix.to_string(), i));
                    }
                } else {
                    table.exact.entry(d).or_insert(i);
                }
            }
        }
        table.suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        Ok(table)
    }

    /// The virtual host for `host` (lower case, without port).
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let idx = self
            .exact
            .get(host)
            .copied()
            .or_else(|| {
                self.suffixes.iter().find(|(s, _)| host.ends_with(s.as_str()) && host.len() > s.len()).map(|(_, i)| *i)
            })
            .or(self.any)?;
        self.vhosts.get(idx)
    }
}

impl VirtualHost {
    /// The first route that matches (Istio: first match wins).
    pub fn route(&self, req: &RequestView<'_>) -> Option<Matched<'_>> {
        for route in &self.routes {
            if route.matches.is_empty() {
                return Some(Matched { route, prefix: None });
            }
            for m in &route.matches {
                if m.matches(req) {
                    let prefix = match &m.uri {
                        Some(Str::Prefix(p)) => Some(p.as_str()),
                        _ => None,
                    };
                    return Some(Matched { route, prefix });
                }
            }
        }
        None
    }
}

impl Route {
    /// One route outside any table (the runtime's passthrough route).
    pub(crate) fn build_one(r: &spec::Route, clusters: &HashMap<String, Arc<Cluster>>) -> Result<Route, Problem> {
        Route::build(r, clusters)
    }

    fn build(r: &spec::Route, clusters: &HashMap<String, Arc<Cluster>>) -> Result<Route, Problem> {
        let action = match &r.action {
            spec::Action::Direct { status, body } => Action::Direct {
                status: StatusCode::from_u16(*status).map_err(|_| Problem::Status(*status))?,
                body: Bytes::from(body.clone()),
            },
            spec::Action::Redirect(rd) => Action::Redirect(rd.clone()),
            spec::Action::Forward(f) => {
                let destinations = f
                    .destinations
                    .iter()
                    .map(|d| {
                        Ok(Destination {
                            cluster: clusters
                                .get(&d.cluster)
                                .cloned()
                                .ok_or_else(|| Problem::UnknownCluster(d.cluster.clone()))?,
                            weight: d.weight,
                            request_headers: HeaderRewrite::build(&d.request_headers)?,
                            response_headers: HeaderRewrite::build(&d.response_headers)?,
                        })
                    })
                    .collect::<Result<Vec<_>, Problem>>()?;
                if destinations.is_empty() {
                    return Err(Problem::NoDestinations);
                }
                let rewrite = match &f.rewrite {
                    None => None,
                    Some(rw) => Some(Rewrite {
                        uri: rw.uri.clone(),
                        authority: rw
                            .authority
                            .as_ref()
                            .map(|a| HeaderValue::from_str(a).map_err(|_| Problem::Authority(a.clone())))
                            .transpose()?,
                        uri_regex: rw
                            .uri_regex
                            .as_ref()
                            .map(|(p, rep)| {
                                Regex::new(p).map(|re| (re, re2_replacement(rep))).map_err(|e| Problem::regex(p, e))
                            })
                            .transpose()?,
                    }),
                };
                let total_weight = destinations.iter().map(|d| d.weight).sum();
                Action::Forward(Forward { destinations, total_weight, rewrite })
            }
        };
        Ok(Route {
            name: Arc::from(r.name.as_str()),
            source: r.source.clone(),
            matches: r.matches.iter().map(Match::build).collect::<Result<_, _>>()?,
            action,
            request_headers: HeaderRewrite::build(&r.request_headers)?,
            response_headers: HeaderRewrite::build(&r.response_headers)?,
            timeout: r.timeout.map(|t| t.0),
            retry: r.retry.clone(),
            fault: r.fault.clone(),
            cors: r.cors.as_ref().map(Cors::build).transpose()?,
            rate_limit: None,
            mirrors: r
                .mirrors
                .iter()
                .map(|m| {
                    let cluster =
                        clusters.get(&m.cluster).cloned().ok_or_else(|| Problem::UnknownCluster(m.cluster.clone()))?;
                    Ok(Mirror { cluster, percent: m.percent })
                })
                .collect::<Result<Vec<_>, Problem>>()?,
        })
    }
}

impl Forward {
    /// Picks a destination by weight (Envoy's weighted clusters: uniformly random).
    pub fn pick(&self) -> &Destination {
        if self.destinations.len() == 1 || self.total_weight == 0 {
            return &self.destinations[0];
        }
        let mut x = fastrand::u32(..self.total_weight);
        for d in &self.destinations {
            if x < d.weight {
                return d;
            }
            x -= d.weight;
        }
        &self.destinations[self.destinations.len() - 1]
    }
}

/// Envoy and Istio write regex substitutions as `\1`; the regex crate as `${1}`.
fn re2_replacement(rep: &str) -> String {
    let mut out = String::with_capacity(rep.len());
    let mut chars = rep.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                let mut n = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    n.push(*d);
                    chars.next();
                }
                out.push_str(&format!("${{{n}}}"));
            }
            '$' => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

// === impl Match ===

impl Str {
    fn build(s: &spec::StringMatcher) -> Result<Str, Problem> {
        Ok(match s {
            spec::StringMatcher::Exact(e) => Str::Exact(e.clone()),
            spec::StringMatcher::Prefix(p) => Str::Prefix(p.clone()),
            spec::StringMatcher::Regex(r) => {
                Str::Regex(Regex::new(&format!("^(?:{r})$")).map_err(|e| Problem::regex(r, e))?)
            }
        })
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Str::Exact(e) => v == e,
            Str::Prefix(p) => v.starts_with(p.as_str()),
            Str::Regex(r) => r.is_match(v),
        }
    }
}

impl Match {
    fn build(m: &spec::RouteMatch) -> Result<Match, Problem> {
        let opt = |s: &Option<spec::StringMatcher>| s.as_ref().map(Str::build).transpose();
        let keys = |v: &[spec::KeyMatcher]| {
            v.iter()
                .map(|k| Ok(KeyMatch { name: k.name.clone(), value: opt(&k.value)?, invert: k.invert }))
                .collect::<Result<Vec<_>, Problem>>()
        };
        Ok(Match {
            uri: opt(&m.uri)?,
            ignore_uri_case: m.ignore_uri_case,
            scheme: opt(&m.scheme)?,
            method: opt(&m.method)?,
            authority: opt(&m.authority)?,
            headers: keys(&m.headers)?,
            query: keys(&m.query_params)?,
        })
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(u) = &self.uri {
            let ok = if self.ignore_uri_case {
                match u {
                    Str::Regex(r) => r.is_match(&req.path.to_ascii_lowercase()) || r.is_match(req.path),
                    _ => u.matches(&req.path.to_ascii_lowercase()),
                }
            } else {
                u.matches(req.path)
            };
            if !ok {
                return false;
            }
        }
        if let Some(m) = &self.method {
            if !m.matches(req.method.as_str()) {
                return false;
            }
        }
        if let Some(s) = &self.scheme {
            if !s.matches(req.scheme) {
                return false;
            }
        }
        if let Some(a) = &self.authority {
            if !a.matches(req.authority) {
                return false;
            }
        }
        for h in &self.headers {
            let value = header_value(req.headers, &h.name);
            let hit = match (&h.value, value) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(m), Some(v)) => m.matches(&v),
            };
            if hit == h.invert {
                return false;
            }
        }
        for q in &self.query {
            let value = query_value(req.query, &q.name);
            let hit = match (&q.value, value) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(m), Some(v)) => m.matches(v),
            };
            if hit == q.invert {
                return false;
            }
        }
        true
    }
}

/// A header's value; several values are joined with `,` as Envoy does.
fn header_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?.to_str().ok()?;
    match all.next() {
        None => Some(std::borrow::Cow::Borrowed(first)),
        Some(second) => {
            let mut s = format!("{first},{}", second.to_str().ok()?);
            for v in all {
                s.push(',');
                s.push_str(v.to_str().ok()?);
            }
            Some(std::borrow::Cow::Owned(s))
        }
    }
}

fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_replacement_syntax() {
        assert_eq!(re2_replacement(r"\2/instance/\1"), "${2}/instance/${1}");
        assert_eq!(re2_replacement("/a$b"), "/a$$b");
    }

    #[test]
    fn query_lookup() {
        assert_eq!(query_value(Some("a=1&b=2&flag"), "b"), Some("2"));
        assert_eq!(query_value(Some("a=1&b=2&flag"), "flag"), Some(""));
        assert_eq!(query_value(None, "a"), None);
    }
}
